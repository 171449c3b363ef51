"""TEST DOUBLE of the ``vllm`` package for the Ray executor's tests (vLLM needs a GPU, which
these machines do not have). Ray workers import it instead of vLLM when the test puts
``tests/support/doubles`` on their ``PYTHONPATH``. Not a model: every answer is "Answer: B". Each
``LLM`` it makes appends a JSON line to ``$VLLM_DOUBLE_LOG``: its keyword arguments, the GPUs
Ray gave the process, and the bundles of the placement group the process runs in."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field


@dataclass
class _Completion:
    text: str
    token_ids: list = field(default_factory=lambda: [7, 8])


@dataclass
class _RequestOutput:
    prompt_token_ids: list
    outputs: list


class SamplingParams:
    def __init__(self, **kw):
        self.kw = kw


class LLM:
    def __init__(self, **kw):
        import ray

        pg = ray.util.get_current_placement_group()
        entry = {"kwargs": kw, "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                 "bundles": pg.bundle_specs if pg is not None else None, "pid": os.getpid()}
        with open(os.environ["VLLM_DOUBLE_LOG"], "a") as f:
            f.write(json.dumps(entry) + "\n")

    def _answer(self, prompts, params):
        assert isinstance(params, list) and len(params) == len(prompts)
        return [_RequestOutput([1, 2, 3], [_Completion("Answer: B")]) for _ in prompts]

    def chat(self, messages, sampling_params=None, use_tqdm=True):
        return self._answer(messages, sampling_params)

    def generate(self, prompts, sampling_params=None, use_tqdm=True):
        return self._answer(prompts, sampling_params)
