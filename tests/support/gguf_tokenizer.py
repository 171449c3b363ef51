"""A Hugging Face tokenizer folder made from a GGUF's own vocabulary (no hub download), for
clients that count tokens themselves (lm-eval-harness's loglikelihood tasks): SmolLM2's
byte-level BPE (``tokenizer.ggml.model`` gpt2, pre-tokenizer ``smollm``: digits one by one,
then GPT-2's byte-level split), its tokens and merges read with the ``gguf`` package."""

from __future__ import annotations

from pathlib import Path


def _field(reader, name: str):
    import gguf

    f = reader.fields[name]
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        return [bytes(f.parts[i]).decode() for i in f.data]
    return f.parts[f.data[0]].tolist()[0]


def tokenizer_folder(gguf_path: Path, out: Path) -> Path:
    import gguf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    r = gguf.GGUFReader(str(gguf_path))
    assert bytes(r.fields["tokenizer.ggml.model"].parts[-1]).decode() == "gpt2"
    tokens = _field(r, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _field(r, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    eos = tokens[_field(r, "tokenizer.ggml.eos_token_id")]
    bos = tokens[_field(r, "tokenizer.ggml.bos_token_id")]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=bos,
                                   additional_special_tokens=[t for t in tokens[:17]
                                                              if t.startswith("<")])
    fast.save_pretrained(out)
    return out
