"""Skills written by an LLM (the Symbolic-MoE way): the yaml's ``router.keyword_expert`` is
asked for the skills a question needs, through the executor (one batch, one load, cached).
The reply is parsed robustly (commas, lines, bullets, numbering, quotes), long phrases are
dropped, the count is capped, and near-duplicates are merged by embedding similarity."""

from __future__ import annotations

import re

from coe.core.errors import ConfigError
from coe.routing.skills.merge import SkillCanon
from coe.text.prompts import build_request, format_question

MAX_WORDS = 5

SYSTEM = ("You name the areas of knowledge a question requires: at most {n} short skill "
          "keywords, separated by commas. You never answer the question itself.")
# Few-shot examples: small models otherwise answer the question instead of naming skills.
SHOTS = (
    ("What is the derivative of x^2 + 3x?", "calculus, derivatives"),
    ("Which treaty ended World War I?", "modern history, international relations"),
    ("What is the pH of a 0.01 M HCl solution?", "chemistry, acids and bases"),
    ("Is a promise made without consideration enforceable?", "contract law"),
    ("Which organ produces insulin?", "physiology, endocrinology"),
)


def parse_keywords(text: str, cap: int) -> list[str]:
    text = re.sub(r"(?i)^\s*(keywords|skills)\s*:\s*", "", text.strip())
    parts = re.split(r"[,\n;]|\s-\s|\u2022", text)
    out: list[str] = []
    for p in parts:
        p = re.sub(r"^\s*(?:[-*]|\d+[.)]|[a-z][.)])\s+", "", p.strip(), flags=re.IGNORECASE)  # bullets, numbering, option letters
        p = p.strip(" \t\"'`*.:[]()").lower()
        p = re.sub(r"\s+", " ", p)
        if (not p or len(p.split()) > MAX_WORDS or not re.search(r"[a-z]", p)
                or re.search(r"[=?!]", p)):  # an answer or a question, not a skill
            continue
        if p not in out:
            out.append(p)
        if len(out) >= cap:
            break
    return out


class KeywordSkills:
    def __init__(self, config, executor, expert: str | None = None, max_skills: int | None = None,
                 canon: SkillCanon | None = None):
        self.config = config
        self.executor = executor
        self.expert = expert or config.router.keyword_expert
        if self.expert is None:
            raise ConfigError(f"{config.source}: router.skills 'keywords' needs router.keyword_expert")
        if executor is None:
            raise ConfigError("keyword skills need the executor (an orchestrator's)")
        self.max_skills = max_skills or config.router.max_skills
        self.canon = canon or SkillCanon(config)

    @property
    def source(self) -> str:
        return f"keywords:{self.expert}"

    def infer(self, questions) -> list[dict[str, float]]:
        cfg = self.config.expert(self.expert)
        reqs = []
        shots = tuple(m for ask, skills in SHOTS
                      for m in (("user", f"Question: {ask}\nSkills:"), ("assistant", skills)))
        system = ("system", SYSTEM.format(n=self.max_skills))
        for q in questions:
            ask = ("user", f"Question: {format_question(q)}\nSkills:")
            reqs.append(build_request(cfg, q, stage="skills", messages=(system, *shots, ask)))
        gens = self.executor.run(reqs).generations
        raw = [parse_keywords(g.text, self.max_skills) if g.error is None else [] for g in gens]
        merged = self.canon.canonical_batch(raw)
        out = []
        for names in merged:
            names = list(dict.fromkeys(names))
            out.append({n: round(1.0 / len(names), 4) for n in names} if names else {})
        return out
