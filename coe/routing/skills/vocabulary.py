"""The skill vocabulary: ``coe/data/skills.yaml`` (name -> one-line description), extended or
overridden by ``skills:`` in the experts yaml."""

from __future__ import annotations

from pathlib import Path

import yaml

VOCABULARY = Path(__file__).resolve().parents[2] / "data" / "skills.yaml"  # package data: coe/data


def load_vocabulary(config=None) -> dict[str, str]:
    text = VOCABULARY.read_text(encoding="utf-8")
    vocab = {str(k): str(v) for k, v in yaml.safe_load(text).items()}
    if config is not None:
        vocab.update(config.skills)
    return vocab
