"""`saekit cache` split over K workers, and `saekit cache-merge` (docs/scaling.md).

Worker i of K runs the model over context j of the seeded context order for every j % K == i
(the same contexts, cut at the same total of --tokens rows, that one process would cache) and
writes a complete cache of its own into OUT/worker-i/. Workers share nothing but the filesystem:
start them as separate jobs (`--num-workers K --worker-index i`) or under torchrun (the rank is
the worker index). When the last one finishes it merges; `saekit cache-merge --out OUT` does
the same by hand. The merge writes only OUT/manifest.json and OUT/contexts.safetensors: the
shards stay in the worker dirs and the manifest lists them by relative path with their checksums,
so `CacheReader(OUT)` reads one cache holding every row exactly once.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..sae.errors import SaekitError
from ..sae.io import atomic_write_json
from ..sae.lock import DirLock
from ..sae.outdir import remove_owned
from .cache_config import (
    CacheConfig,
    cache_settings,
    check_config,
    check_out,
    choose_contexts,
    keep_mask,
    load_cacheable_model,
    shard_rows,
)
from .cache_files import write_safetensors
from .cache_format import (
    CHECKSUM,
    CONTEXTS,
    DTYPES,
    FORMAT_VERSION,
    MANIFEST,
    load_raw_manifest,
    new_manifest,
    read_verified,
)
from .cache_writer import CacheJob, SiteWriter, run_cache

# Settings that may differ between a worker's manifest and the merged one.
WORKER_KEYS = ("worker", "target_tokens", "contexts", "n_tokens", "stats", "shards", "complete")


def worker_of(cfg: CacheConfig) -> tuple[int, int]:
    """(index, count) of this worker: the flags, else torchrun's RANK / WORLD_SIZE, else (0, 1)."""
    count = cfg.num_workers
    index = cfg.worker_index
    if count == 1 and index is None and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        count, index = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    index = 0 if index is None else index
    if count < 1 or not 0 <= index < count:
        raise SaekitError(
            f"--worker-index {index} is not in 0..{count - 1} (--num-workers {count}); pass an index below --num-workers"
        )
    return index, count


def worker_dir(out: str | Path, index: int) -> Path:
    return Path(out) / f"worker-{index}"


def build_cache_worker(cfg: CacheConfig, index: int, count: int) -> Path:
    """Cache worker `index`'s share of the contexts into OUT/worker-index; merge if it is last.
    Returns OUT once merged, else the worker's own dir (a complete cache of its share)."""
    t0 = time.perf_counter()
    check_config(cfg)
    if cfg.device == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per worker
        cfg = dataclasses.replace(cfg, device=f"cuda:{os.environ['LOCAL_RANK']}")
    if cfg.resume:
        raise SaekitError(
            "--resume is not supported with several workers; rerun the interrupted worker with --overwrite"
        )
    out = worker_dir(cfg.out, index)
    if Path(cfg.out).is_file():
        raise SaekitError(f"--out {cfg.out} is a file; choose a directory")
    if (Path(cfg.out) / MANIFEST).exists() and not cfg.overwrite:
        raise SaekitError(
            f"--out {cfg.out} already holds a cache; pass --overwrite or choose another --out"
        )
    check_out(out, cfg)
    with DirLock(out, "cache"):  # one writer per worker dir; checked again under the lock
        check_out(out, cfg)
        target = _cache_share(cfg, index, count, out)
    print(
        f"saekit cache: worker {index}/{count}: {target:,} tokens "
        f"in {time.perf_counter() - t0:.1f}s -> {out}",
        file=sys.stderr,
    )
    done = [load_raw_manifest(worker_dir(cfg.out, i)) for i in range(count)]
    if all(d is not None and d.get("complete") for d in done):
        # Two workers may finish together: the second waits for the first's merge, then merges
        # again (the same bytes).
        return merge_cache(MergeConfig(out=Path(cfg.out)), wait=120.0)
    return out


def _cache_share(cfg: CacheConfig, index: int, count: int, out: Path) -> int:
    """Cache worker `index`'s contexts into `out` (locked by the caller); returns its rows."""
    from .models import model_spec
    from .sites import resolve_sites

    model = load_cacheable_model(cfg)
    tok = model.tokenizer
    sites = resolve_sites(model, cfg.site, cfg.layer, cfg.hook)
    if len(sites) > 1:
        raise SaekitError(
            "several workers cache one site at a time; run one `saekit cache --num-workers` per --site"
        )
    site = sites[0]
    settings = cache_settings(cfg, site, model_spec(model), tok, shard_rows(cfg, site.d_in))

    ids, ctx = choose_contexts(cfg, tok)  # the single-process contexts, in the same order
    keep = keep_mask(ctx, tok.bos_token_id, cfg.include_bos)
    rows = keep.sum(1)
    rows[-1] -= int(rows.sum()) - cfg.tokens  # one process cuts the last context at --tokens
    mine = torch.arange(len(ids)) % count == index
    target = int(rows[mine].sum())
    if target == 0:
        raise SaekitError(
            f"worker {index} of {count} gets no tokens ({len(ids)} contexts); use fewer --num-workers"
        )

    if cfg.overwrite and out.is_dir():
        remove_owned(out, "cache")  # all ours (check_out), but the lock
    out.mkdir(parents=True, exist_ok=True)
    contexts = {"context": ids[mine].contiguous(), "tokens": ctx[mine].to(torch.int32)}
    nbytes, sha = write_safetensors(out / CONTEXTS, contexts)
    entry = {"file": CONTEXTS, "n_contexts": int(mine.sum()), "bytes": nbytes, CHECKSUM: sha}
    m = new_manifest({**settings, "target_tokens": target}, entry, site.site)
    m["worker"] = {"index": index, "count": count, "total_tokens": cfg.tokens}
    atomic_write_json(out / MANIFEST, m)
    writer = SiteWriter(site, out, m, DTYPES[cfg.dtype], target)
    job_cfg = dataclasses.replace(cfg, out=out, tokens=target)
    run_cache(CacheJob(job_cfg, model, sites, [writer], ids[mine], ctx[mine], keep[mine]))
    return target


@dataclass
class MergeConfig:
    """Join the caches written by `saekit cache --num-workers K` into one cache in --out."""

    out: Path
    """The --out the workers were given (holds worker-0/ ... worker-K-1/)."""


def _checked_worker_manifest(path: Path) -> dict:
    """A worker's manifest, refused in one line if it lacks the fields a merge reads."""
    m = load_raw_manifest(path)
    ok = isinstance(m, dict)
    w = m.get("worker") if ok else None
    ok = ok and isinstance(w, dict)
    ok = ok and all(isinstance(w.get(k), int) for k in ("index", "count", "total_tokens"))
    ok = ok and w["count"] >= 1 and isinstance(m.get("contexts"), dict)
    shards = m.get("shards") if ok else None
    ok = ok and isinstance(shards, list)
    ok = ok and all(
        isinstance(s, dict)
        and isinstance(s.get("file"), str)
        and isinstance(s.get("rows"), int)
        and isinstance(s.get("norm_sum"), (int, float))
        for s in shards
    )
    if not ok:
        raise SaekitError(
            f"{path / MANIFEST} is not a saekit worker manifest (missing or mistyped worker, contexts or shards fields); recache that worker"
        )
    return m


def merge_cache(cfg: MergeConfig, wait: float = 0.0) -> Path:
    """Write OUT/manifest.json listing every worker's shards (and their contexts); returns OUT.
    `wait`: seconds to wait for another process writing OUT (else refused at once)."""
    out = Path(cfg.out)
    if not (worker_dir(out, 0) / MANIFEST).is_file():
        raise SaekitError(
            f"{out} holds no worker-0/{MANIFEST}; run `saekit cache --num-workers K --worker-index i --out {out}` first"
        )
    with DirLock(out, "cache-merge", wait=wait):
        return _merge(out)


def _merge(out: Path) -> Path:
    first = _checked_worker_manifest(worker_dir(out, 0))
    count = first["worker"]["count"]
    ms = []
    for i in range(count):
        if not (worker_dir(out, i) / MANIFEST).is_file():
            m = None
        else:
            m = _checked_worker_manifest(worker_dir(out, i))
        if m is None or not m.get("complete"):
            raise SaekitError(
                f"worker {i} of {count} has not finished in {worker_dir(out, i)}; run or finish it, then merge"
            )
        diff = [k for k in set(m) | set(first) if k not in WORKER_KEYS and m.get(k) != first.get(k)]
        if diff or m["worker"]["count"] != count or m["worker"]["index"] != i:
            raise SaekitError(
                f"worker {i} in {out} was made with other settings ({', '.join(sorted(diff)) or 'worker'}); recache it with the same flags"
            )
        ms.append(m)
    shards = [
        {**s, "file": f"{worker_dir('', i)}/{s['file']}"}
        for i, m in enumerate(ms)
        for s in m["shards"]
    ]
    rows = sum(s["rows"] for s in shards)
    total = first["worker"]["total_tokens"]
    if rows != total:  # checked before anything is written: a refused merge leaves OUT as it was
        raise SaekitError(
            f"the workers in {out} hold {rows:,} rows, not the {total:,} asked for; recache them"
        )
    # Contexts in merged row order: worker 0's, then worker 1's, ...
    ctx = [read_verified(worker_dir(out, i) / CONTEXTS, m["contexts"]) for i, m in enumerate(ms)]
    contexts = {k: torch.cat([c[k] for c in ctx]) for k in ("context", "tokens")}
    nbytes, sha = write_safetensors(out / CONTEXTS, contexts)
    norm_sum = sum(s["norm_sum"] for s in shards)
    merged = {k: v for k, v in first.items() if k != "worker"}
    merged.update(
        target_tokens=total,
        contexts={
            "file": CONTEXTS,
            "n_contexts": len(contexts["context"]),
            "bytes": nbytes,
            CHECKSUM: sha,
        },
        n_tokens=rows,
        stats={"mean_norm": norm_sum / rows, "norm_sum": norm_sum, "rows": rows},
        shards=shards,
        complete=True,
        merged_from={"workers": count},
        format_version=FORMAT_VERSION,
    )
    atomic_write_json(out / MANIFEST, merged)
    print(
        f"saekit cache-merge: {count} workers, {rows:,} tokens, {len(shards)} shards -> {out}",
        file=sys.stderr,
    )
    return out
