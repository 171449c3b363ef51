"""coe: Composition of Experts. Route each question to the experts strongest at what it needs,
run each model once over all its questions, and aggregate the answers."""

from coe.config import PoolConfig, load_config
from coe.errors import CoeError, ConfigError, ExpertError, InputError
from coe.orchestrator import Orchestrator, RunResult
from coe.questions import Question, load_questions
from coe.results import ExpertResponse, QuestionResult

__all__ = ["CoeError", "ConfigError", "ExpertError", "ExpertResponse", "InputError",
           "Orchestrator", "PoolConfig", "Question", "QuestionResult", "RunResult",
           "load_config", "load_questions"]
__version__ = "0.1.0"
