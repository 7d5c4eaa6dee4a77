"""The on-disk activation cache: `build_cache` (the `saekit cache` verb) and `Cache`, the handle
`saekit.cache(...)` returns and `saekit.load_cache(path)` opens.

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

import torch
from torch import Tensor

from .cache_config import CacheConfig
from .cache_format import read_manifest
from .cache_reader import CacheReader
from .cache_workers import build_cache_worker, worker_of
from .cache_writer import prepare_cache, run_cache


class Cache:
    """A complete, verified cache dir of one site. `Cache.open(path)` checks its manifest (and
    that every shard it lists exists); the shards' checksums are checked as they are read."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest

    @classmethod
    def open(cls, path: str | Path) -> Cache:
        """The cache in `path`; SaekitError if it is missing, incomplete or corrupt."""
        return cls(Path(path), read_manifest(path))

    @property
    def d_in(self) -> int:
        return self.manifest["d_in"]

    @property
    def n_tokens(self) -> int:
        """Rows (one per cached token) in the cache."""
        return self.manifest["n_tokens"]

    @property
    def hook_name(self) -> str | None:
        return self.manifest.get("hook_name")

    @property
    def site(self) -> str | None:
        return self.manifest.get("site")

    @property
    def model(self) -> str | None:
        """The name the model was loaded by."""
        return self.manifest.get("model")

    def reader(
        self,
        batch_size: int,
        seed: int = 0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> CacheReader:
        """The shuffled, endless batch stream the trainer reads (`.batches()`)."""
        return CacheReader(self.path, batch_size, seed=seed, device=device, dtype=dtype)

    def sample(self, n_rows: int, seed: int = 0) -> Tensor:
        """`n_rows` rows drawn at random, [n_rows, d_in] float32 on the CPU."""
        return CacheReader(self.path, batch_size=1).sample(n_rows, seed)

    def __repr__(self) -> str:
        return (
            f"Cache({str(self.path)!r}, model={self.model!r}, hook={self.hook_name!r}, "
            f"tokens={self.n_tokens:,}, d_in={self.d_in})"
        )


def build_cache(cfg: CacheConfig) -> Cache | dict[str, Cache]:
    """Cache the activations of `cfg.site` (or `cfg.hook`): the Cache in `cfg.out`, or with
    several sites, {site name: its Cache in a sub-dir of `cfg.out`}. Split over workers, each
    worker returns its own dir's Cache, and the one that merges returns the merged one."""
    index, count = worker_of(cfg)
    if count > 1:  # split over workers (activations/cache_workers.py)
        return Cache.open(build_cache_worker(cfg, index, count))
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
    if len(job.writers) == 1:
        return Cache.open(job.writers[0].out)
    return {s.name: Cache.open(w.out) for s, w in zip(job.sites, job.writers, strict=True)}
