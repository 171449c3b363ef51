"""Plugins: a third-party backend, router and aggregator reach every seam through the
registries, without a fork.

``plugin_dir`` writes a small installed package (its module and a ``.dist-info`` folder with
``entry_points.txt``) into a folder; with that folder on ``PYTHONPATH`` the ``coe`` command
finds the plugin through ``importlib.metadata`` as it finds any pip-installed one. The same
names then work in the yaml, on the command line, in ``coe eval``'s strategies and in the
error messages. A second test registers through the Python API instead.
"""

from __future__ import annotations

import json
import os
import textwrap

import pytest
import yaml

from coe.apps.api import Orchestrator
from coe.core.config import parse_config
from coe.core.errors import ConfigError
from coe.core.registry import AGGREGATORS, BACKENDS, ROUTERS
from coe.core.types import Question, Recruit, Route
from coe.routing.base import Router
from tests.conftest import write_jsonl
from tests.support.cli import coe, one_line_error

PLUGIN = '''
"""A plugin of coe: a backend that always gives one letter, a router that recruits one named
expert, an aggregator that answers only when every expert agrees."""
from collections import Counter
from typing import Literal

from coe.aggregation.base import Aggregator
from coe.core.config import ExpertConfig
from coe.core.errors import ConfigError
from coe.backends.base import Backend
from coe.routing.base import Router
from coe.core.types import FinalAnswer, Generation, Recruit, Route


class EchoExpert(ExpertConfig):
    backend: Literal["echo"]
    letter: str = "A"

    def load_key(self):  # the letter is what is "loaded": experts differing in it do not share
        return ("echo", self.letter)


class EchoBackend(Backend):
    config_model = EchoExpert

    @classmethod
    def check(cls, config, base_dir):
        if config.letter not in "ABCD":
            raise ConfigError(f"letter {config.letter!r} is not one of A-D")

    def load(self):
        pass

    def generate(self, requests, on_result):
        for i, r in enumerate(requests):
            on_result(i, Generation(text=f"I think the answer is ({self.config.letter})."))

    def unload(self):
        pass


class NamedRouter(Router):
    name = "named"

    def __init__(self, config, k=None):
        self.expert = config.router.options.get("expert", config.experts[0].name)
        config.expert(self.expert)

    def route(self, questions):
        return [Route(question_id=q.id, experts=[Recruit(name=self.expert)],
                      reason=f"plugin: always {self.expert}") for q in questions]


class UnanimousAggregator(Aggregator):
    name = "unanimous"

    def aggregate(self, questions, routes, responses, generations=None):
        out = []
        for resp in responses:
            votes = Counter(r.answer for r in resp if r.answer is not None)
            answer = next(iter(votes)) if len(votes) == 1 else None
            out.append(FinalAnswer(answer=answer, aggregator=self.name, votes=dict(votes),
                                   confidence=1.0 if answer else 0.0))
        return out
'''

ENTRY_POINTS = """
[coe.backends]
echo = coe_echo_plugin:EchoBackend

[coe.routers]
named = coe_echo_plugin:NamedRouter
broken = coe_echo_plugin:NoSuchRouter

[coe.aggregators]
unanimous = coe_echo_plugin:UnanimousAggregator
"""


@pytest.fixture
def plugin_dir(tmp_path):
    site = tmp_path / "site"
    info = site / "coe_echo_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (site / "coe_echo_plugin.py").write_text(textwrap.dedent(PLUGIN))
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: coe-echo-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    return site


def plugin_pool(tmp_path, letters="BBC", **top) -> tuple:
    experts = [{"name": f"e{i}", "backend": "echo", "model": "-", "letter": letter}
               for i, letter in enumerate(letters)]
    cfg = tmp_path / "pool.yaml"
    cfg.write_text(yaml.safe_dump({"experts": experts, **top}))
    qs = write_jsonl(tmp_path / "q.jsonl", [
        {"id": f"q{i}", "question": f"Question {i}?", "choices": ["w", "x", "y", "z"],
         "answer": "B"} for i in range(3)])
    return cfg, qs


def test_a_plugin_installed_with_entry_points_works_from_yaml_cli_and_eval(tmp_path, plugin_dir):
    env = {"PYTHONPATH": f"{plugin_dir}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "COE_CACHE_DIR": str(tmp_path / "cache")}
    cfg, qs = plugin_pool(tmp_path, router={"kind": "named", "options": {"expert": "e1"}},
                          aggregator={"kind": "unanimous"})

    checked = coe("experts", "-c", cfg, "--check", env=env)
    assert checked.returncode == 0, checked.stderr
    assert "e0                       echo" in checked.stdout and "3 experts OK" in checked.stdout

    # the yaml's plugin router and aggregator, over the plugin backend
    run = coe("run", qs, "-c", cfg, "-o", tmp_path / "out.jsonl", "-q", env=env)
    assert run.returncode == 0, run.stderr
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["route"]["experts"] for r in rows] == [[{"name": "e1", "weight": 1.0}]] * 3
    assert {r["route"]["reason"] for r in rows} == {"plugin: always e1"}
    assert [(r["final_answer"], r["aggregator"], r["correct"]) for r in rows] == \
        [("B", "unanimous", True)] * 3

    # a built-in router with the plugin aggregator: B, B, C do not agree
    everyone = coe("run", qs, "-c", cfg, "--router", "all", "-q", env=env)
    assert everyone.returncode == 0, everyone.stderr
    assert {json.loads(x)["final_answer"] for x in everyone.stdout.splitlines()} == {None}

    # evaluation crosses every registered router with every registered aggregator
    ev = coe("eval", qs, "-c", cfg, "-s", "named+unanimous,all+unanimous,all+vote", "--no-plots",
             "--val-fraction", "0", "-o", tmp_path / "report", "-q", env=env)
    assert ev.returncode == 0, ev.stderr
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert {s["name"]: s["accuracy"] for s in report["strategies"]} == \
        {"named+unanimous": 1.0, "all+unanimous": 0.0, "all+vote": 1.0}

    # the names are in the error messages; a plugin that does not load is one line
    one_line_error(coe("run", qs, "-c", cfg, "--router", "nope", env=env), 2,
                   "unknown router 'nope' (expected one of all, category, skill, knn, named, broken)")
    one_line_error(coe("run", qs, "-c", cfg, "--router", "broken", env=env), 2,
                   "router 'broken': cannot load entry point 'coe_echo_plugin:NoSuchRouter' "
                   "(coe.routers): AttributeError")
    # the plugin's own option schema and its own check
    cfg.write_text(cfg.read_text().replace("letter: C", "letter: Q"))
    one_line_error(coe("experts", "-c", cfg, "--check", env=env), 2,
                   "expert 'e2': letter 'Q' is not one of A-D")
    cfg.write_text(cfg.read_text().replace("letter: Q", "colour: red"))
    one_line_error(coe("experts", "-c", cfg, env=env), 2, "expert 'e2': field 'colour': unknown field")


def test_without_the_plugin_its_names_are_unknown(tmp_path):
    cfg, qs = plugin_pool(tmp_path)
    one_line_error(coe("run", qs, "-c", cfg), 2, "expert 'e0': field 'backend': unknown backend "
                   "'echo' (expected one of llamacpp, openai, vllm, replay)")


class ConstantRouter(Router):
    """Registered through the API: every question to the last expert of the pool."""

    def __init__(self, config, k=None):
        self.expert = config.experts[-1].name

    def route(self, questions):
        return [Route(question_id=q.id, experts=[Recruit(name=self.expert)]) for q in questions]


def test_a_router_registered_through_the_api_is_used_from_yaml(replay_pool):
    cfg_path, _ = replay_pool
    ROUTERS.register("constant", ConstantRouter)
    try:
        assert "constant" in ROUTERS.names() and ROUTERS.get("constant") is ConstantRouter
        with pytest.raises(ValueError, match="already registered"):
            ROUTERS.register("constant", ConstantRouter)
        raw = yaml.safe_load(cfg_path.read_text())
        cfg = parse_config({**raw, "router": {"kind": "constant"}}, base_dir=cfg_path.parent)
        qs = [Question(id="r0", question="Question number 0?", choices=["w", "x", "y", "z"],
                       answer="A")]
        with Orchestrator(cfg, cache=False) as orch:
            run = orch.run(qs)
        assert run.results[0].route.names == ["gamma"] and run.results[0].final_answer == "B"
    finally:
        ROUTERS.unregister("constant")
    with pytest.raises(ConfigError, match="unknown router 'constant'"):
        parse_config({**raw, "router": {"kind": "constant"}})
    with pytest.raises(ValueError, match="built-in"):
        BACKENDS.unregister("replay")
    assert AGGREGATORS.names()[:3] == ["vote", "llm", "single"]
