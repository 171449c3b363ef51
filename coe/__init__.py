"""coe: Composition of Experts. Route each question to the experts strongest at what it needs,
run each model once over all its questions, and aggregate the answers."""

import os

# OpenMP threads (llama.cpp's, torch's) sleep instead of spinning while they wait, so a run
# shares the machine gracefully; libgomp reads this once, when it is first loaded, hence here,
# before any of coe's imports (see coe.experts.llamacpp.wait_passively). The user's setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


from coe.config import PoolConfig, load_config
from coe.errors import CoeError, ConfigError, ExpertError, InputError
from coe.executor import Executor, LocalExecutor, RunStats
from coe.orchestrator import Orchestrator, RunResult
from coe.questions import load_questions
from coe.registry import AGGREGATORS, BACKENDS, EXECUTORS, ROUTERS
from coe.types import ExpertResponse, Question, QuestionResult, Route

__all__ = ["AGGREGATORS", "BACKENDS", "CoeError", "ConfigError", "EXECUTORS", "Executor",
           "ExpertError", "ExpertResponse", "InputError", "LocalExecutor", "Orchestrator",
           "PoolConfig", "Question", "QuestionResult", "ROUTERS", "Route", "RunResult", "RunStats",
           "load_config", "load_questions"]
__version__ = "0.1.0"
