"""coe: Composition of Experts. Route each question to the experts strongest at what it needs,
run each model once over all its questions, and aggregate the answers."""

import os

# OpenMP threads (llama.cpp's, torch's) sleep instead of spinning while they wait, so a run
# shares the machine gracefully; libgomp reads this once, when it is first loaded, hence here,
# before any of coe's imports (see coe.backends.llamacpp.wait_passively). The user's setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from coe.core import compat  # noqa: E402

compat.install()  # the 0.1 module names (coe.experts, coe.routers...) for one more release

from coe.apps.api import Orchestrator, RunResult  # noqa: E402
from coe.core.config import PoolConfig, load_config  # noqa: E402
from coe.core.errors import CoeError, ConfigError, ExpertError, InputError  # noqa: E402
from coe.core.registry import AGGREGATORS, BACKENDS, EXECUTORS, ROUTERS  # noqa: E402
from coe.core.types import ExpertResponse, Question, QuestionResult, Route  # noqa: E402
from coe.execution import Executor, LocalExecutor, RunStats  # noqa: E402
from coe.io.questions import load_questions  # noqa: E402

__all__ = ["AGGREGATORS", "BACKENDS", "CoeError", "ConfigError", "EXECUTORS", "Executor",
           "ExpertError", "ExpertResponse", "InputError", "LocalExecutor", "Orchestrator",
           "PoolConfig", "Question", "QuestionResult", "ROUTERS", "Route", "RunResult", "RunStats",
           "load_config", "load_questions"]
__version__ = "0.1.0"
