"""The skill vocabulary: ``coe/data/skills.yaml`` (name -> one-line description), extended or
overridden by ``skills:`` in the experts yaml."""

from __future__ import annotations

from pathlib import Path

from coe.core.yamlfile import read_yaml

VOCABULARY = Path(__file__).resolve().parents[2] / "data" / "skills.yaml"  # package data: coe/data


def load_vocabulary(config=None) -> dict[str, str]:
    vocab = {str(k): str(v) for k, v in read_yaml(VOCABULARY).items()}
    if config is not None:
        vocab.update(config.skills)
    return vocab
