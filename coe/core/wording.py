"""Counts in messages: "1 question", "2 questions", "6,016 questions"."""

from __future__ import annotations


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` and ``noun``, plural unless ``n`` is 1 (``plural``: when not ``noun + "s"``)."""
    word = noun if n == 1 else (plural or noun + "s")
    return f"{n:,} {word}"
