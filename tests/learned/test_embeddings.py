"""The embedding encoders: the static (model2vec) model distilled from the bundled MiniLM, its
store under the cache folder (built once, whole or not at all), and what it routes.

The session's static model lives in the shared ``models`` folder (tests/conftest.py): the first
test that embeds anything distils it. Tests that damage a store copy it into a cache folder of
their own first.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from coe.learned.embeddings import MANIFEST, MINILM, STATIC, Embedder, StaticEncoder, static_source

REPO = Path(__file__).resolve().parents[2]


def own_cache(tmp_path: Path, monkeypatch, with_store: bool) -> Path:
    """A cache folder of this test's own (no shared ``models``), holding a copy of the
    session's static store when ``with_store``."""
    shared = StaticEncoder()
    src = shared.ensure()
    cache = tmp_path / "own-cache"
    (cache / "models").mkdir(parents=True)
    if with_store:
        shutil.copytree(src, cache / "models" / src.name)
    monkeypatch.setenv("COE_CACHE_DIR", str(cache))
    return cache / "models" / src.name


def test_static_references():
    assert static_source("static") == MINILM
    assert static_source("static:package:other") == "package:other"
    assert static_source(MINILM) is None


def test_static_vectors_are_unit_norm_and_put_like_texts_together():
    emb = Embedder(STATIC)
    texts = ["What is the derivative of x squared?", "Differentiate the function x^2.",
             "Which court hears appeals from federal district courts?", ""]
    v = emb.encode(texts)
    assert v.shape == (4, emb.dim) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v[:3], axis=1), 1.0, atol=1e-5)
    sims = v @ v.T
    assert sims[0, 1] > sims[0, 2] and sims[0, 1] > sims[1, 2]
    assert emb.encode([]).shape == (0, emb.dim)
    # the same texts, batched differently, give the same vectors
    assert np.allclose(emb.encode(texts[1:2]), v[1:2], atol=1e-6)


def test_static_embedder_holds_no_memo_and_writes_no_cache_file():
    emb = Embedder(STATIC)
    emb.encode([f"question {i}" for i in range(50)])
    assert emb._memo == {}
    cache = Path(os.environ["COE_CACHE_DIR"])
    assert not list(cache.glob("embeddings-*.sqlite"))


def test_a_store_is_built_once_and_reused(tmp_path, monkeypatch, capfd):
    own_cache(tmp_path, monkeypatch, with_store=True)
    enc = StaticEncoder()
    enc.model
    assert "distilling" not in capfd.readouterr().err  # the copied store was used as it is


def damage_store(store: Path, damage: str) -> None:
    weights = store / "model.safetensors"
    if damage == "no manifest":
        (store / MANIFEST).unlink()
    elif damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "edited weights":
        weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    elif damage == "a file missing":
        (store / "tokenizer.json").unlink()
    elif damage == "empty folder":
        shutil.rmtree(store)
        store.mkdir()
    else:
        (store / MANIFEST).write_text("{not json", encoding="utf-8")


@pytest.mark.parametrize("damage", ["no manifest", "truncated weights", "edited weights",
                                    "a file missing", "empty folder", "manifest not json"])
def test_a_damaged_store_is_not_taken_as_whole(tmp_path, monkeypatch, damage):
    from coe.learned.embeddings import _manifest_ok

    store = own_cache(tmp_path, monkeypatch, with_store=True)
    assert _manifest_ok(store)
    damage_store(store, damage)
    assert not _manifest_ok(store)


def test_a_damaged_store_is_rebuilt_never_half_read(tmp_path, monkeypatch, capfd):
    """...saying when it starts how long it takes, with a progress bar (progress on, as the
    CLI has it without -q)."""
    from coe.core import progress

    store = own_cache(tmp_path, monkeypatch, with_store=True)
    good = (store / "model.safetensors").read_bytes()
    expected = StaticEncoder().encode(["a question about contracts"])
    capfd.readouterr()
    damage_store(store, "truncated weights")
    enc = StaticEncoder()
    monkeypatch.setattr(progress, "_enabled", True)
    v = enc.encode(["a question about contracts"])
    err = capfd.readouterr().err
    assert "rebuilding a damaged static embedding model" in err, err
    assert "once: it takes about 33-93 s on 2 cores" in err
    assert "distilling the static encoder" in err  # the bar
    assert (store / MANIFEST).exists()
    assert not [p for p in store.parent.iterdir() if p.name.startswith(".")]  # no temp left
    # distilling is deterministic: the same weights and vectors again
    assert (store / "model.safetensors").read_bytes() == good
    assert np.allclose(v, expected)


def test_a_store_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    from coe.core.errors import StorageError

    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("COE_CACHE_DIR", str(blocker))
    with pytest.raises(StorageError) as e:
        StaticEncoder().ensure()
    assert "cannot store the static embedding model" in str(e.value)
    assert "\n" not in str(e.value)


def test_a_killed_distillation_leaves_no_store_and_the_next_run_builds_it(tmp_path):
    """A process killed while distilling leaves only its temporary folder; the next one
    builds the store whole."""
    cache = tmp_path / "cache"
    env = {**os.environ, "COE_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1"}
    code = ("import os, signal, model2vec.distill.distillation as d\n"
            "real = d.distill_from_model\n"
            "def die(*a, **k):\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n"
            "d.distill_from_model = die\n"
            "from coe.learned.embeddings import StaticEncoder\n"
            "StaticEncoder().ensure()\n")
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == -9
    models = cache / "models"
    assert [p.name for p in models.iterdir() if not p.name.startswith(".")] == []
    shared = Path(os.environ["COE_CACHE_DIR"]) / "models"
    tag = StaticEncoder().tag
    # the next process: copy the session's store in place of distilling again is not allowed
    # here; it must build its own from the half-done state
    r = subprocess.run([sys.executable, "-c", "from coe.learned.embeddings import StaticEncoder; "
                        "print(StaticEncoder().ensure())"], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(models / tag)
    assert "distilling a static embedding model" in r.stderr
    assert (models / tag / MANIFEST).exists()
    assert (shared / tag / "model.safetensors").read_bytes() == \
        (models / tag / "model.safetensors").read_bytes()


def test_the_sparse_product_agrees_with_model2vec_s_own_encode():
    enc = StaticEncoder()
    texts = ["What is the derivative of x squared?", "", "a " * 2000,
             "Zxqv qqq unseen-tokens ¿¡ 漢字", "The answer is (B)."]
    ours = enc.encode(texts)
    theirs = enc.model.encode(texts, use_multiprocessing=False).astype(np.float32)
    assert np.allclose(ours, theirs, atol=2e-3)  # model2vec sums in float16
    assert np.all(ours[1] == 0)


def test_encoding_many_texts_with_a_transformer_shows_a_bar_unless_quiet(capfd, monkeypatch):
    """MiniLM encodes ~45 questions a second on 2 cores: 6,000 of them are minutes, never
    silent (progress on, as the CLI has it without -q); off, nothing is printed."""
    from coe.core import progress

    texts = [f"question number {i}" for i in range(200)]
    emb = Embedder(MINILM, disk_cache=False)
    monkeypatch.setattr(progress, "_enabled", True)
    emb.encode(texts)
    assert "Batches" in capfd.readouterr().err
    emb.clear()
    monkeypatch.setattr(progress, "_enabled", False)
    emb.encode(texts)
    assert capfd.readouterr().err == ""
