"""Executors: the one place that loads models and makes generations (``base``), with a plan
per call (``plan``) and one residency policy (``residency``); in this process (``local``) or on
Ray actors (``ray``). ``build_executor`` is the one place any app makes one."""

from __future__ import annotations

import os

from coe.core.config import PoolConfig
from coe.core.registry import EXECUTORS
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
from coe.execution.residency import Residency, Resident, Slot
from coe.io.cache import ResponseCache

__all__ = ["PLAN_HEADER", "Execution", "Executor", "LocalExecutor", "Plan", "PlanGroup",
           "Resident", "Residency", "RunStats", "Slot", "build_executor", "default_memory_gb",
           "plan_row", "plan_summary"]


def default_memory_gb() -> float:
    """Half of this machine's physical memory."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 / 2**30
    except (ValueError, OSError, AttributeError):
        return 8.0


def build_executor(config: PoolConfig, *, cache: ResponseCache | None = None,
                   progress: bool = False, fail_fast: bool = False, serving: bool = False,
                   max_resident: int | None = None, memory_gb: float | None = None,
                   kind: str | None = None) -> Executor:
    """The executor of ``config`` (the yaml's ``executor.kind`` and ``options``, or ``kind``).

    A batch command (``serving`` False) frees its models when its run ends, one model holding
    weights resident at a time unless the yaml's options say otherwise. A server keeps them
    (``keep_resident``) within ``max_resident`` and ``memory_gb``: given here (the command
    line), else the yaml's ``serve:`` section, else as many as fit in half this machine's
    memory (an executor placing models in this process; on Ray, each node's own resources
    bound what its actors hold)."""
    residency: dict = {}
    cls = EXECUTORS.get(kind or config.executor.kind)
    if serving:
        max_resident = max_resident or config.serve.max_resident_models
        memory_gb = memory_gb or config.serve.memory_gb
        if memory_gb is None and max_resident is None and cls.placement == "process":
            memory_gb = default_memory_gb()
        residency = {"max_resident": max_resident, "memory_gb": memory_gb}
    else:
        residency = {k: v for k, v in (("max_resident", max_resident), ("memory_gb", memory_gb))
                     if v is not None}
    return cls.from_config(config, cache=cache, progress=progress, fail_fast=fail_fast,
                           keep_resident=serving, **residency)
