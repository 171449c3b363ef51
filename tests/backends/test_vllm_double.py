"""The vLLM backend against a TEST DOUBLE of the ``vllm`` module (vLLM needs a GPU, which these
machines do not have). The double records the calls the backend makes; it checks the contract
with vLLM's offline API: one ``LLM`` per load, *all* of a model's prompts in one ``chat`` or
``generate`` call with per-prompt ``SamplingParams``, and the engine dropped on unload."""

import sys
import types
import weakref
from dataclasses import dataclass, field

import pytest

from coe.apps.api import Orchestrator
from coe.core.config import parse_config
from coe.io.questions import Question


@dataclass
class _Completion:
    text: str
    token_ids: list = field(default_factory=list)


@dataclass
class _RequestOutput:
    prompt_token_ids: list
    outputs: list


class VLLMTestDouble:
    """Stands in for the vllm package. Not a model: it answers 'Answer: B' to everything."""

    def __init__(self, fail_load_for=()):
        self.engines = []  # (kwargs, weakref to engine)
        self.calls = []  # (model, method, n prompts, sampling params)
        self.fail_load_for = set(fail_load_for)
        module = types.ModuleType("vllm")
        double = self

        class SamplingParams:
            def __init__(self, **kw):
                self.kw = kw

        class LLM:
            def __init__(self, **kw):
                if kw["model"] in double.fail_load_for:
                    raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
                self.kw = kw
                double.engines.append((kw, weakref.ref(self)))

            def _answer(self, method, prompts, params, use_tqdm=True):
                assert isinstance(params, list) and len(params) == len(prompts)
                double.calls.append((self.kw["model"], method, len(prompts), params))
                return [_RequestOutput([1, 2, 3], [_Completion("Answer: B", [7, 8])]) for _ in prompts]

            def chat(self, messages, sampling_params=None, use_tqdm=True):
                assert all(isinstance(m, list) and m[0]["role"] == "system" for m in messages)
                return self._answer("chat", messages, sampling_params)

            def generate(self, prompts, sampling_params=None, use_tqdm=True):
                assert all(isinstance(p, str) for p in prompts)
                return self._answer("generate", prompts, sampling_params)

        module.LLM, module.SamplingParams = LLM, SamplingParams
        self.module = module


@pytest.fixture
def vllm_double(monkeypatch):
    double = VLLMTestDouble(fail_load_for={"too/big-70b"})
    monkeypatch.setitem(sys.modules, "vllm", double.module)
    return double


def pool(*extra):
    return parse_config({"experts": [
        {"name": "qwen", "backend": "vllm", "model": "Qwen/Qwen2.5-0.5B-Instruct", "dtype": "float16",
         "max_model_len": 4096, "sampling": {"temperature": 0.2, "max_tokens": 32, "seed": 1}},
        {"name": "qwen-critic", "backend": "vllm", "model": "Qwen/Qwen2.5-0.5B-Instruct", "dtype": "float16",
         "max_model_len": 4096, "system_prompt": "You are a harsh critic."},
        {"name": "base", "backend": "vllm", "model": "some/base-1b", "prompt_format": "completion"},
        *extra,
    ], "router": {"kind": "all"}})


QS = [Question(id=str(i), question=f"Question {i}", choices=["a", "b", "c"], answer="B") for i in range(7)]


def test_one_engine_per_model_all_prompts_in_one_call(vllm_double):
    with Orchestrator(pool(), cache=False) as orch:
        run = orch.run(QS)
    assert run.stats.loads == 2 and run.stats.naive_loads == 21
    assert [kw["model"] for kw, _ in vllm_double.engines] == ["Qwen/Qwen2.5-0.5B-Instruct", "some/base-1b"]
    assert vllm_double.engines[0][0]["max_model_len"] == 4096
    # the two personas' 14 chat prompts in one call, the base model's 7 completions in another
    assert [(m, how, n) for m, how, n, _ in vllm_double.calls] == [
        ("Qwen/Qwen2.5-0.5B-Instruct", "chat", 14), ("some/base-1b", "generate", 7)]
    params = vllm_double.calls[0][3][0].kw
    assert params["temperature"] == 0.2 and params["max_tokens"] == 32 and params["seed"] == 1
    assert all(r.final_answer == "B" and r.correct for r in run.results)
    assert run.results[0].responses[0].completion_tokens == 2


def test_unload_drops_the_engine(vllm_double):
    with Orchestrator(pool(), cache=False) as orch:
        orch.run(QS[:2])
    import gc

    gc.collect()
    assert all(ref() is None for _, ref in vllm_double.engines)


def test_out_of_memory_on_load_is_reported_and_others_continue(vllm_double):
    big = {"name": "big", "backend": "vllm", "model": "too/big-70b"}
    with Orchestrator(pool(big), cache=False) as orch:
        run = orch.run(QS[:3])
    assert "CUDA out of memory" in run.stats.failures["big"]
    assert all("big" in r.route.failed and r.final_answer == "B" for r in run.results)


def test_missing_vllm_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import fails
    with Orchestrator(pool(), cache=False, fail_fast=True) as orch:
        from coe.core.errors import ExpertError

        with pytest.raises(ExpertError, match=r"needs the vllm package \(pip install 'coe\[vllm\]'\)"):
            orch.run(QS[:1])
