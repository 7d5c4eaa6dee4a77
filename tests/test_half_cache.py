"""Caches in half the bytes (`saekit cache --dtype bfloat16|float16`): the same rows rounded, the
same checksummed format and reader, and training, diagnose (fresh density from the cache) and
evaluate all run on them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from saekit.activations.cache_format import read_manifest
from saekit.activations.cache_reader import CacheReader
from saekit.scripts.cli import main as cli_main

TOKENS = 3000


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict[str, Path]:
    """The default model's mlp_post over the same tokens in each storage dtype, via the CLI,
    with the same rows per shard (so the reader's shuffle is the same)."""
    root = tmp_path_factory.mktemp("half")
    out = {}
    for dtype in ("float32", "bfloat16", "float16"):
        out[dtype] = root / dtype
        mb = "1" if dtype == "float32" else "0.5"
        cli_main(["cache", "--out", str(out[dtype]), "--tokens", str(TOKENS), "--context-size",
                  "64", "--shard-mb", mb, "--dtype", dtype])  # fmt: skip
    return out


def test_half_caches_hold_the_rounded_rows_in_half_the_bytes(caches):
    full = CacheReader(caches["float32"], batch_size=256, seed=3)
    m32 = read_manifest(caches["float32"])
    for dtype in ("bfloat16", "float16"):
        m = read_manifest(caches[dtype])
        assert m["dtype"] == dtype and m["n_tokens"] == m32["n_tokens"] == TOKENS
        assert m["stats"]["mean_norm"] == pytest.approx(m32["stats"]["mean_norm"], rel=1e-6)
        half = CacheReader(caches[dtype], batch_size=256, seed=3, dtype=getattr(torch, dtype))
        rows = torch.cat([half.load_shard(i)["activations"] for i in range(len(half.shards))])
        rows32 = torch.cat([full.load_shard(i)["activations"] for i in range(len(full.shards))])
        assert rows.dtype == getattr(torch, dtype) and torch.equal(rows, rows32.to(rows.dtype))
        bytes_half = sum((caches[dtype] / s["file"]).stat().st_size for s in m["shards"])
        bytes_full = sum((caches["float32"] / s["file"]).stat().st_size for s in m32["shards"])
        assert bytes_half < 0.56 * bytes_full  # the tokens/context/position columns stay
        # The trainer's float32 batches: the same stream, the rows rounded.
        a = next(CacheReader(caches[dtype], batch_size=256, seed=3).batches())
        b = next(full.batches())
        assert a.dtype == torch.float32 and torch.equal(a, b.to(rows.dtype).float())
        assert torch.equal(half.sample(100, seed=1), full.sample(100, seed=1).to(rows.dtype))


def test_train_diagnose_evaluate_on_a_bfloat16_cache(caches, tmp_path):
    """A run trained on the bfloat16 cache (bfloat16 matmuls too) nearly matches one trained on
    the float32 cache; diagnose measures fresh density on the bfloat16 cache; evaluate runs."""
    runs = {}
    for dtype in ("float32", "bfloat16"):
        runs[dtype] = tmp_path / dtype
        cli_main(["train", "--cache", str(caches[dtype]), "--out", str(runs[dtype]),
                  "--features", "256", "--steps", "40", "--batch-size", "256", "--log-every",
                  "20", "--checkpoint-every", "0", "--matmul-dtype", "bfloat16"])  # fmt: skip
    last = [json.loads((runs[d] / "metrics.jsonl").read_text().splitlines()[-1]) for d in runs]
    assert last[1]["fvu"] == pytest.approx(last[0]["fvu"], rel=0.05)
    assert last[1]["l0"] == pytest.approx(last[0]["l0"], rel=0.05)
    rep = tmp_path / "rep"
    cli_main(["diagnose", "--run", str(runs["bfloat16"]), "--out", str(rep), "--cache",
              str(caches["bfloat16"]), "--tokens", "2000", "--no-logits"])  # fmt: skip
    s = json.loads((rep / "summary.json").read_text())
    assert s["window"]["tokens"] == 2000 and "fresh" in s["density_source"]
    assert s["l0"] == pytest.approx(last[1]["l0"], rel=0.3)
    cli_main(["evaluate", "--run", str(runs["bfloat16"]), "--tokens", "1024", "--batch-size", "8"])
    ev = json.loads((runs["bfloat16"] / "eval.json").read_text())
    assert 0 < ev["fvu_pooled"] < 1 and ev["loss_recovered_zero"] > 0


def test_float16_overflow_is_refused_while_caching(tmp_path):
    """Activations beyond float16's 65504 become inf: the writer stops at that batch in one
    line instead of writing a cache that every reader would refuse."""
    from saekit.activations.cache_writer import SiteWriter
    from saekit.activations.sites import Site
    from saekit.sae.errors import SaekitError

    site = Site("resid_post", 0, "blocks.0.hook_resid_post", 4, 1)
    meta = {k: torch.zeros(3, dtype=torch.int64) for k in ("tokens", "context", "position")}
    acts = torch.tensor([[1.0, 2, 3, 4], [5, 6, 7, 8], [1e4, 7e4, 0, 0]])
    for dtype, fails in ((torch.bfloat16, False), (torch.float16, True)):
        w = SiteWriter(site, tmp_path, {"shard_rows": 8, "shards": []}, dtype, target=100)
        if fails:
            with pytest.raises(
                SaekitError, match="resid_post: activations are not finite as float16"
            ):
                w.add(acts, None, meta, 0, submit=None)
        else:
            w.add(acts, None, meta, 0, submit=None)
            assert w.fill == 3 and torch.isfinite(w.norms[0]).all()
