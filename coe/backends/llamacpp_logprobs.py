"""Token log-probabilities of a llama.cpp completion's prompt (``echo``), as the OpenAI API
gives them: ``tokens``, ``token_logprobs`` (the first None), ``top_logprobs``, ``text_offset``.

llama-cpp-python's own echo pairs each prompt token with the distribution its own position
predicts (the *next* token's) and leaves out the generated token when it was not evaluated, so
a prompt's log-likelihood (what lm-eval-harness reads) comes out wrong. Here token i is scored
by the logits of position i - 1, read from the model's kept logits (``logits_all``); the
generated tokens' log-probabilities (which llama-cpp-python scores right) follow.
"""

from __future__ import annotations

import json

import numpy as np


def plain(obj):
    """``obj`` with numpy numbers made Python floats (JSON, the response cache)."""
    return None if obj is None else json.loads(json.dumps(obj, default=float))


def prompt_logprobs(llm, tokens: list[int], top: int) -> dict:
    """The OpenAI completion logprobs of ``tokens`` (the prompt as evaluated, a leading BOS
    left out), each scored by the row of ``llm.scores`` before it."""
    start = 1 if tokens and tokens[0] == llm.token_bos() else 0
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = 0
    for i in range(start, len(tokens)):
        piece = llm.detokenize([tokens[i]], prev_tokens=tokens[:i]).decode("utf-8", "ignore")
        out["tokens"].append(piece)
        out["text_offset"].append(offset)
        offset += len(piece)
        if i == start or i == 0:  # the API's convention: the first token has none
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        row = np.asarray(llm.scores[i - 1], np.float64)
        m = row.max()
        logp = row - (m + np.log(np.exp(row - m).sum()))
        out["token_logprobs"].append(float(logp[tokens[i]]))
        best = np.argpartition(-logp, top)[:top] if top else []
        alts = {llm.detokenize([int(t)], prev_tokens=tokens[:i]).decode("utf-8", "ignore"):
                float(logp[t]) for t in best}
        alts[piece] = float(logp[tokens[i]])
        out["top_logprobs"].append(alts)
    return out


def echoed(llm, tokens: list[int], top: int, completion: dict | None) -> dict:
    """The prompt's logprobs followed by the generated tokens' (``completion``: what
    llama-cpp-python returned for them, its offsets counted from the prompt's end)."""
    out = prompt_logprobs(llm, tokens, top)
    if completion:
        shift = sum(len(t) for t in out["tokens"]) - (completion["text_offset"] or [0])[0]
        out["tokens"] += completion["tokens"]
        out["token_logprobs"] += plain(completion["token_logprobs"])
        out["top_logprobs"] += plain(completion["top_logprobs"])
        out["text_offset"] += [o + shift for o in completion["text_offset"]]
    return out
