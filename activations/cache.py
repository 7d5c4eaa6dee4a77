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

import sys
import time
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..sae.errors import SaekitError, check_interrupt
from ..sae.lock import DirLock
from .cache_config import CacheConfig, check_config, check_out
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


SYNTHETIC_BATCH = 4096  # a synthetic cache's rows are the generator's batches of this size


def build_synthetic_cache(cfg: CacheConfig) -> Cache:
    """`saekit cache --model synthetic`: --tokens rows of the generator's stream --seed, in
    order (row r is row r mod 4096 of batch r div 4096), with its ground truth saved beside them
    (synthetic.json, synthetic.safetensors). Made anew on --resume: it is cheap to make."""
    from ..sae.outdir import remove_owned
    from .source import parse_synthetic
    from .synthetic import SyntheticSource

    if cfg.model not in ("default", "synthetic") or cfg.hook or cfg.num_workers > 1:
        raise SaekitError(
            "--synthetic makes the activations itself: drop --model, --hook and --num-workers"
        )
    check_config(cfg)
    if cfg.dtype != "float32":
        raise SaekitError("a synthetic cache is float32; drop --dtype")
    out = Path(cfg.out)
    check_out(out, cfg)
    source = SyntheticSource(parse_synthetic(cfg.synthetic))
    with DirLock(out, "cache"):  # one writer per cache dir; --out checked again under the lock
        check_out(out, cfg)
        remove_owned(out, "cache", "--overwrite" if cfg.overwrite else "--resume")  # (not the lock)
        _write_synthetic_cache(cfg, out, source)
    return Cache.open(out)


def _write_synthetic_cache(cfg: CacheConfig, out: Path, source) -> None:
    from ..sae.io import atomic_write_json
    from .cache_config import shard_rows
    from .cache_files import write_safetensors
    from .cache_format import CHECKSUM, FORMAT_VERSION, MANIFEST, set_shards

    source.save(out)
    per_shard, B = shard_rows(cfg, source.d_in), SYNTHETIC_BATCH
    entries, row, made = [], 0, {}
    bar = tqdm(total=cfg.tokens, unit="tok", unit_scale=True, desc="cache", file=sys.stderr)
    while row < cfg.tokens:
        check_interrupt()  # a SIGINT/SIGTERM whose exception Python swallowed
        n = min(per_shard, cfg.tokens - row)
        rows = torch.arange(row, row + n)
        first, last = row // B, (row + n - 1) // B
        # each batch made once, however many small shards it is cut into
        made = {i: made[i] if i in made else source.batch(i, B, stream=cfg.seed).x
                for i in range(first, last + 1)}  # fmt: skip
        x = made[first] if first == last else torch.cat(list(made.values()))
        x = x[row - first * B : row - first * B + n]
        t = {"activations": x, "tokens": torch.full((n,), -1, dtype=torch.int32),
             "context": rows // B, "position": (rows % B).to(torch.int32)}  # fmt: skip
        name = f"shard-{len(entries):05d}.safetensors"
        # no fsync per shard (thousands of tiny shards would take minutes): the manifest,
        # written last and fsynced, lists them with checksums the reader verifies
        nbytes, digest = write_safetensors(out / name, t, durable=False)
        entries.append({"file": name, "rows": n, "bytes": nbytes, CHECKSUM: digest,
                        "norm_sum": float(x.double().norm(dim=1).sum())})  # fmt: skip
        row += n
        bar.update(n)
    bar.close()
    manifest = {
        "format": "saekit-activation-cache", "format_version": FORMAT_VERSION,
        "model": "synthetic", "site": None, "hook_name": "synthetic", "layer": None,
        "d_in": source.d_in, "dtype": "float32", "context_size": None,
        "dataset": {"name": "synthetic", "spec": source.cfg.to_dict()}, "seed": cfg.seed,
        "target_tokens": cfg.tokens, "include_bos": False, "synthetic_batch": B,
        "columns": "tokens -1 (no token); context: the generator's batch index; position: the row in it",
        "complete": True, "stats": {},
    }  # fmt: skip
    set_shards(manifest, entries)
    atomic_write_json(out / MANIFEST, manifest)
    print(
        f"saekit cache: {cfg.tokens:,} synthetic rows (d_in {source.d_in}, {source.n_true} true features) -> {out}"
    )


def build_cache(cfg: CacheConfig) -> Cache | dict[str, Cache]:
    """Cache the activations of `cfg.site` (or `cfg.hook`): the Cache in `cfg.out`, or with
    several sites, {site name: its Cache in a sub-dir of `cfg.out`}. Split over workers, each
    worker returns its own dir's Cache, and the one that merges returns the merged one.
    `--model synthetic` / `--synthetic`: `build_synthetic_cache`."""
    if cfg.model == "synthetic" or cfg.synthetic is not None:
        return build_synthetic_cache(cfg)
    index, count = worker_of(cfg)
    if count > 1:  # split over workers (activations/cache_workers.py)
        return Cache.open(build_cache_worker(cfg, index, count))
    t_start = time.perf_counter()
    check_config(cfg)
    check_out(Path(cfg.out), cfg)  # bad input is refused before the lock makes --out
    with DirLock(cfg.out, "cache"):  # one writer per cache dir; checked again under the lock
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
