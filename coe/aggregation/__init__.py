"""Aggregators: ``vote`` (consistency voting), ``llm`` (an aggregator expert), ``single``, and
any registered in ``coe.core.registry.AGGREGATORS`` (by the API or a ``coe.aggregation`` entry
point)."""

from __future__ import annotations

from coe.aggregation.base import Aggregator
from coe.aggregation.vote import VoteAggregator, vote
from coe.core.registry import AGGREGATORS


def build_aggregator(kind: str, config, strength: dict[str, float] | None = None,
                     expert: str | None = None) -> Aggregator:
    """The aggregator registered as ``kind``; an unknown kind is a one-line ConfigError.
    ``strength`` (expert -> prior accuracy, breaking vote ties) defaults to the yaml's."""
    if strength is None:
        strength = {e.name: e.strength for e in config.experts if e.strength is not None}
    return AGGREGATORS.get(kind).from_config(config, strength=strength, expert=expert)


__all__ = ["AGGREGATORS", "Aggregator", "VoteAggregator", "build_aggregator", "vote"]
