"""`saekit cache` split over workers and merged (activations/cache_workers.py): the merged cache
holds every (context, position) row of a one-process cache exactly once, with equal activations."""

from __future__ import annotations

import json

import pytest
import torch

from saekit.activations.cache import build_cache
from saekit.activations.cache_config import CacheConfig
from saekit.activations.cache_reader import CacheReader
from saekit.activations.cache_workers import MergeConfig, merge_cache
from saekit.sae.errors import SaekitError

TOKENS = 30_000


def _rows(reader: CacheReader) -> tuple[torch.Tensor, torch.Tensor]:
    """(context, position) keys and activations of every row, sorted by key."""
    shards = [reader.load_shard(i) for i in range(len(reader.shards))]  # verifies checksums too
    key = torch.cat([s["context"] * 10_000 + s["position"] for s in shards])
    acts = torch.cat([s["activations"] for s in shards])
    order = key.argsort()
    return key[order], acts[order]


def test_two_workers_merge_to_the_one_process_cache(tmp_path):
    one = build_cache(CacheConfig(out=tmp_path / "one", tokens=TOKENS, shard_mb=8)).path
    out = tmp_path / "two"
    got = [
        build_cache(CacheConfig(out=out, tokens=TOKENS, shard_mb=8, num_workers=2, worker_index=i))
        for i in range(2)
    ]
    # The first worker returns its own share; the second, which merged, the whole cache.
    assert got[0].path == out / "worker-0" and got[1].path == out
    assert 0 < got[0].n_tokens < TOKENS and got[1].n_tokens == TOKENS
    # The second worker to finish merged: worker-0's manifest alone is not enough.
    assert (out / "manifest.json").is_file()
    a, b = CacheReader(one, 512), CacheReader(out, 512)
    assert a.n_rows == b.n_rows == TOKENS
    ka, aa = _rows(a)
    kb, ab = _rows(b)
    assert torch.equal(ka, kb)  # the same rows...
    assert len(kb.unique()) == len(kb)  # ...each exactly once
    assert torch.allclose(aa, ab, rtol=0, atol=1e-6)  # measured: bitwise equal
    ma, mb = a.manifest, b.manifest
    assert mb["stats"]["mean_norm"] == pytest.approx(ma["stats"]["mean_norm"], rel=1e-12)
    assert {s["file"].split("/")[0] for s in mb["shards"]} == {"worker-0", "worker-1"}
    assert all(len(s["xxh3_128"]) == 32 for s in mb["shards"])
    for k in ("model", "site", "d_in", "dtype", "context_size", "dataset", "seed"):
        assert ma[k] == mb[k], k
    # Worker 1 has the odd contexts of the seeded order.
    ctx = json.loads((out / "worker-1" / "manifest.json").read_text())["contexts"]["n_contexts"]
    assert ctx == ma["contexts"]["n_contexts"] // 2
    # The trainer's reader streams it like any cache; merging again rewrites the same manifest.
    assert next(b.batches()).shape == (512, ma["d_in"])
    before = (out / "manifest.json").read_text()
    merge_cache(MergeConfig(out=out))
    assert (out / "manifest.json").read_text() == before


def test_merge_needs_every_worker(tmp_path):
    out = tmp_path / "c"
    build_cache(CacheConfig(out=out, tokens=5_000, num_workers=3, worker_index=1))
    assert not (out / "manifest.json").exists()  # workers 0 and 2 have not run
    with pytest.raises(SaekitError, match="holds no worker-0"):
        merge_cache(MergeConfig(out=out))
    build_cache(CacheConfig(out=out, tokens=5_000, num_workers=3, worker_index=0))
    with pytest.raises(SaekitError, match="worker 2 of 3 has not finished"):
        merge_cache(MergeConfig(out=out))
    with pytest.raises(SaekitError, match="--worker-index 3 is not in 0..2"):
        build_cache(CacheConfig(out=out, tokens=5_000, num_workers=3, worker_index=3))
