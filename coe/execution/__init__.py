"""Executors: the one place that loads models and makes generations (``base``), with a plan
per call (``plan``); in this process (``local``) or on Ray actors (``ray``)."""

from coe.execution.base import Executor
from coe.execution.local import LocalExecutor
from coe.execution.plan import (
    PLAN_HEADER,
    Execution,
    Plan,
    PlanGroup,
    RunStats,
    plan_row,
    plan_summary,
)

__all__ = ["PLAN_HEADER", "Execution", "Executor", "LocalExecutor", "Plan", "PlanGroup",
           "RunStats", "plan_row", "plan_summary"]
