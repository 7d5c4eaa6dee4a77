"""The on-disk activation cache: `build_cache`, the `saekit cache` verb.

The pieces, each importing only those above it:
- cache_format.py: the dir layout, manifest and checksums; verified reads (`read_manifest`).
- cache_files.py: writing safetensors files (O_DIRECT shard images, atomic commit), `write_cache`.
- cache_config.py: `CacheConfig`, its checks, the choice of contexts.
- cache_writer.py: `prepare_cache` and `run_cache`, the forward passes cut into shards.
- cache_reader.py: `CacheReader`, the trainer's shuffled batch stream.
- cache_workers.py: the same cache split over K workers, and `saekit cache-merge`.
"""

from __future__ import annotations

import time
from pathlib import Path

from .cache_config import CacheConfig
from .cache_workers import build_cache_worker, worker_of
from .cache_writer import prepare_cache, run_cache


def build_cache(cfg: CacheConfig) -> Path:
    """Cache the activations of `cfg.site` (or `cfg.hook`) and return the output dir."""
    index, count = worker_of(cfg)
    if count > 1:  # split over workers (activations/cache_workers.py)
        return build_cache_worker(cfg, index, count)
    t_start = time.perf_counter()
    job = prepare_cache(cfg)
    t_loop = run_cache(job)
    dt = time.perf_counter() - t_start
    shards = [s for w in job.writers for s in w.manifest["shards"]]
    n_bytes = sum(s["bytes"] for s in shards)
    print(
        f"saekit cache: {cfg.tokens:,} tokens x {len(job.sites)} site(s) ({', '.join(s.name for s in job.sites)}), "
        f"{len(shards)} shards, {n_bytes / 1e6:,.1f} MB in {dt:.1f}s "
        f"({cfg.tokens / max(t_loop, 1e-9):,.0f} tokens/s while caching) -> {cfg.out}"
    )
    return Path(cfg.out)
