"""Aggregators: ``vote`` (consistency voting), ``llm`` (an aggregator expert), ``single``, and
any registered in ``coe.registry.AGGREGATORS`` (by the API or a ``coe.aggregators`` entry
point)."""

from __future__ import annotations

from coe.aggregators.base import Aggregator
from coe.aggregators.vote import VoteAggregator, vote
from coe.registry import AGGREGATORS


def build_aggregator(kind: str, config, strength: dict[str, float] | None = None,
                     expert: str | None = None) -> Aggregator:
    """The aggregator registered as ``kind``; an unknown kind is a one-line ConfigError."""
    return AGGREGATORS.get(kind).from_config(config, strength=strength, expert=expert)


__all__ = ["AGGREGATORS", "Aggregator", "VoteAggregator", "build_aggregator", "vote"]
