"""Aggregators: ``vote`` (consistency voting), ``llm`` (an aggregator expert), ``single``."""

from __future__ import annotations

from coe.errors import ConfigError
from coe.aggregators.base import Aggregator
from coe.aggregators.llm import LLMAggregator
from coe.aggregators.single import SingleAggregator
from coe.aggregators.vote import VoteAggregator, vote

AGGREGATORS = ("vote", "llm", "single")


def build_aggregator(kind: str, config, executor, strength=None, expert=None) -> Aggregator:
    if kind == "vote":
        return VoteAggregator(strength)
    if kind == "llm":
        return LLMAggregator(config, executor, expert=expert, strength=strength)
    if kind == "single":
        return SingleAggregator()
    raise ConfigError(f"unknown aggregator {kind!r} (expected one of {', '.join(AGGREGATORS)})")


__all__ = ["AGGREGATORS", "Aggregator", "LLMAggregator", "SingleAggregator", "VoteAggregator",
           "build_aggregator", "vote"]
