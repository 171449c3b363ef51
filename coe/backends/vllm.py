"""vLLM on a GPU: one offline ``vllm.LLM`` per load, one call with every prompt, then free it.

Imported lazily (``pip install coe[vllm]``). Kept thin: the engine batches internally, so the
backend hands it all the prompts assigned to this model in a single ``chat``/``generate`` call,
and on unload deletes the engine and empties the CUDA cache so the next model fits.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from coe.backends.base import Backend, Capabilities, Generation, GenRequest, OnResult, truncation
from coe.core.config import ExpertConfig, Resources
from coe.core.errors import ConfigError, ExpertError

NEEDS_VLLM = "backend 'vllm' needs the vllm package (pip install 'coe[vllm]')"
# Memory estimate: the weight files' size x 1.2 (activations, CUDA graphs). vLLM itself takes
# gpu_memory_utilization of the GPU whatever the model; set memory_gb to budget that instead.
OVERHEAD = 1.2


def weights_bytes(path: Path) -> int:
    """The size of the weights at ``path``: a file's, or a folder's ``*.safetensors`` (else
    ``*.bin``, else ``*.gguf``: a folder holding both formats is not counted twice)."""
    if path.is_file():
        return path.stat().st_size
    for suffix in (".safetensors", ".bin", ".gguf"):
        sizes = [f.stat().st_size for f in path.glob(f"*{suffix}")]
        if sizes:
            return sum(sizes)
    return 0


def local_model(model: str) -> Path | None:
    """Where ``model`` is on disk: the path it names, or its Hugging Face cache snapshot."""
    p = Path(model).expanduser()
    if p.exists():
        return p
    hf_home = Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser()
    hub = Path(os.environ.get("HF_HUB_CACHE", hf_home / "hub")).expanduser()
    snapshots = hub / f"models--{model.replace('/', '--')}" / "snapshots"
    found = sorted(snapshots.glob("*"), key=lambda d: d.stat().st_mtime)  # none: not there
    return found[-1] if found else None


def _in_ray() -> bool:
    """Whether this process is a Ray worker (the ray executor's actor)."""
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


class VLLMExpert(ExpertConfig):
    backend: Literal["vllm"]
    tensor_parallel_size: int = Field(1, gt=0)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    max_model_len: int | None = Field(None, gt=0)
    dtype: str = "auto"

    def load_key(self) -> tuple:
        return ("vllm", self.model, self.tensor_parallel_size, self.gpu_memory_utilization,
                self.max_model_len, self.dtype)


class VLLMBackend(Backend):
    config_model = VLLMExpert
    capabilities = Capabilities(gpu=True)

    @classmethod
    def check(cls, config, base_dir) -> None:
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError(NEEDS_VLLM)

    def __init__(self, config, base_dir=None):
        super().__init__(config, base_dir)
        self.llm = None
        self._vllm = None

    def estimate_bytes(self) -> int:
        """The model's weight files x ``OVERHEAD`` (0 when they are not on disk here)."""
        path = local_model(self.config.model)
        return int(weights_bytes(path) * OVERHEAD) if path else 0

    def default_resources(self) -> Resources:
        """A CPU and one GPU per tensor-parallel rank."""
        return Resources(num_cpus=1, num_gpus=self.config.tensor_parallel_size)

    def gang_size(self) -> int:
        return self.config.tensor_parallel_size

    def fingerprint(self) -> str:
        return self.label  # the model id (cache keys as before load keys had a default)

    def load(self) -> None:
        try:
            import vllm
        except ImportError:
            raise ExpertError(self.config.name, NEEDS_VLLM) from None
        self._vllm = vllm
        c = self.config
        kw = dict(model=c.model, tensor_parallel_size=c.tensor_parallel_size,
                  gpu_memory_utilization=c.gpu_memory_utilization, dtype=c.dtype)
        if c.max_model_len:
            kw["max_model_len"] = c.max_model_len
        if c.tensor_parallel_size > 1 and _in_ray():
            # the ranks run as Ray workers in the placement group the executor reserved
            kw["distributed_executor_backend"] = "ray"
        try:
            self.llm = vllm.LLM(**kw)
        except (RuntimeError, ValueError, MemoryError) as e:  # CUDA OOM is a RuntimeError
            raise ExpertError(c.name, f"cannot load {c.model} with vLLM: {e}") from None

    def _params(self, r: GenRequest):
        s = r.sampling
        return self._vllm.SamplingParams(temperature=s.temperature, top_p=s.top_p,
                                         max_tokens=s.max_tokens, stop=list(s.stop) or None,
                                         seed=s.seed)

    @staticmethod
    def _generation(out, seconds: float, max_tokens: int) -> Generation:
        completion = out.outputs[0]
        n = len(completion.token_ids or ())
        finish = getattr(completion, "finish_reason", None)  # "stop" | "length" | None
        return Generation(text=completion.text, seconds=seconds,
                          prompt_tokens=len(out.prompt_token_ids or ()), completion_tokens=n,
                          finish_reason=finish, truncated_by=truncation(finish, n, max_tokens))

    def generate(self, requests: list[GenRequest], on_result: OnResult) -> None:
        chat = [i for i, r in enumerate(requests) if r.messages is not None]
        plain = [i for i, r in enumerate(requests) if r.messages is None]
        for idx, is_chat in ((chat, True), (plain, False)):
            if not idx:
                continue
            params = [self._params(requests[i]) for i in idx]
            t0 = time.perf_counter()
            if is_chat:
                outs = self.llm.chat([requests[i].chat() for i in idx], params, use_tqdm=False)
            else:
                outs = self.llm.generate([requests[i].prompt for i in idx], params, use_tqdm=False)
            # vLLM batches the whole call; each generation is charged its share of it.
            share = (time.perf_counter() - t0) / len(idx)
            for i, out in zip(idx, outs):
                on_result(i, self._generation(out, share, requests[i].sampling.max_tokens))

    def unload(self) -> None:
        self.llm = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass
