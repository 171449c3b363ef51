"""Skills a question needs (Symbolic-MoE): inferred by embedding match to a skill vocabulary,
or written as keywords by an LLM expert; similar keywords merged so profiles do not fragment.

Every inferrer maps a batch of questions to ``{skill: weight}`` per question."""

from __future__ import annotations

from coe.routing.skills.embedding import VocabularySkills
from coe.routing.skills.keywords import KeywordSkills, parse_keywords
from coe.routing.skills.merge import SkillCanon
from coe.routing.skills.vocabulary import load_vocabulary


def build_skill_inferrer(config, executor=None, kind: str | None = None,
                         expert: str | None = None):
    """``vocabulary`` (no model) or ``keywords`` written by ``expert`` (default: the yaml's
    ``router.keyword_expert``) through ``executor``."""
    kind = kind or config.router.skills or "vocabulary"
    if kind == "vocabulary":
        return VocabularySkills(config)
    if kind == "keywords":
        return KeywordSkills(config, executor, expert=expert)
    from coe.core.errors import ConfigError

    raise ConfigError(f"unknown skill inference {kind!r} (expected vocabulary or keywords)")


__all__ = ["KeywordSkills", "SkillCanon", "VocabularySkills", "build_skill_inferrer",
           "load_vocabulary", "parse_keywords"]
