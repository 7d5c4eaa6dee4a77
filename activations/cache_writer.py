"""Writing a cache from a model: `prepare_cache` checks everything and lays out the dirs, then
`run_cache` runs the forward passes, cuts each site's rows into shards (`SiteWriter`) and writes
them on a background thread. The dir format is in cache_format.py."""

from __future__ import annotations

import ctypes
import queue
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..sae.errors import SaekitError, check_interrupt
from ..sae.io import atomic_write_json
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
from .cache_files import ShardImage, commit_file, write_safetensors
from .cache_format import (
    CHECKSUM,
    CONTEXTS,
    DTYPES,
    FORMAT_VERSION,
    MANIFEST,
    SHARD_KEYS,
    load_raw_manifest,
    new_manifest,
    read_verified,
    set_shards,
    verified_bytes,
)
from .sites import Site, harvest_flat, resolve_sites


def keep_freed_memory() -> None:
    """Ask glibc to keep freed memory for reuse instead of returning it to the OS.

    A forward pass frees and reallocates the same MB-sized buffers every batch; glibc by default
    hands blocks that large back to the kernel and page-faults them in again (~0.8M minor faults
    per 1M tokens of the default model, ~20% of its CPU time). Memory then stays at its peak,
    which caching keeps small. Process-wide; a no-op where glibc is not the allocator."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: serve blocks up to 1 GB from the heap
        libc.mallopt(-1, 1 << 31)  # M_TRIM_THRESHOLD: keep up to 2 GB of free heap
    except (OSError, AttributeError):
        pass


class SiteWriter:
    """Cuts one site's rows of the global row sequence into shards, gathering each batch's rows
    straight into the shard image being filled."""

    def __init__(self, site: Site, out: Path, manifest: dict, dtype: torch.dtype, target: int):
        self.site, self.out, self.manifest, self.dtype, self.target = (
            site,
            out,
            manifest,
            dtype,
            target,
        )
        self.shard_rows = manifest["shard_rows"]
        self.next_row = sum(s["rows"] for s in manifest["shards"])  # first row not yet taken
        self.started = len(manifest["shards"])  # shard images begun
        self.shard: ShardImage | None = None
        self.fill = 0
        self.unlisted = 0  # shards on disk that the manifest on disk does not list yet
        self.listed_at, self.list_s = time.monotonic(), 0.0  # last manifest write, its seconds
        self.meta: list[dict[str, Tensor]] = []
        self.norms: list[Tensor] = []

    def add(
        self, acts: Tensor, index: Tensor | None, meta: dict[str, Tensor], row0: int, submit
    ) -> None:
        """This batch's rows are global rows [row0, row0 + n): `acts[index]` (or `acts` if
        `index` is None) with `meta` (tokens, context, position); take the ones not written."""
        lo = max(self.next_row - row0, 0)
        hi = min(len(meta["tokens"]), self.target - row0)
        while lo < hi:
            if self.shard is None:
                rows = min(self.shard_rows, self.target - self.next_row)
                name = f"shard-{self.started:05d}.safetensors"
                self.shard = ShardImage(name, rows, self.site.d_in, self.dtype)
                self.started += 1
            take = min(hi - lo, self.shard.rows - self.fill)
            dst = self.shard.activations[self.fill : self.fill + take]
            if index is None:
                dst.copy_(acts[lo : lo + take])
            elif acts.device.type == "cpu" and acts.dtype == dst.dtype:
                torch.index_select(acts, 0, index[lo : lo + take], out=dst)
            else:
                dst.copy_(acts.index_select(0, index[lo : lo + take]))
            self.shard.rows_filled(self.fill + take)
            norms = dst.float().norm(dim=1)
            if not bool(torch.isfinite(norms).all()):  # float16 overflows above 65504
                dtype = str(self.dtype).removeprefix("torch.")
                raise SaekitError(
                    f"{self.site.name}: activations are not finite as {dtype} (inf or NaN; "
                    "float16 holds at most 65504); re-run with --dtype bfloat16 (float32's range) "
                    "or float32 and --overwrite"
                )
            self.norms.append(norms)
            self.meta.append({k: v[lo : lo + take] for k, v in meta.items()})
            self.fill += take
            self.next_row += take
            lo += take
            if self.fill == self.shard.rows:
                shard = self.shard
                shard.put_meta(*(torch.cat([m[k] for m in self.meta]) for k in SHARD_KEYS[1:]))
                norm_sum = float(torch.cat(self.norms).double().sum())
                self.shard, self.fill, self.meta, self.norms = None, 0, [], []
                submit(self, shard, norm_sum)

    def store(self, shard: ShardImage, sha: str, norm_sum: float) -> None:
        """I/O thread: the shard on disk and in place, then the manifest that lists it. Both
        are renamed into place, so that a killed run leaves only whole files. Neither is
        fsynced: on this VM a flush per shard cost ~5% of caching time (the host writes its
        cache of the disk back), and the kernel flushes within seconds anyway. After a power
        loss, `--resume` finds a shard that never reached the disk by its checksum and makes
        it again (`_keep_whole_shards`)."""
        commit_file(shard.write(self.out / shard.name), self.out / shard.name, durable=False)
        entry = {"file": shard.name, "rows": shard.rows, "bytes": shard.nbytes, CHECKSUM: sha,
                 "norm_sum": norm_sum}  # fmt: skip
        self.manifest["shards"].append(entry)
        self.unlisted += 1
        # The manifest grows with every shard: rewritten after each one, tiny shards would make
        # caching quadratic (issue 23: 4k one-row shards took 73 s). Rewrite it after each
        # shard only while that costs < 10% of the time (or when 1/16 more shards wait), so a
        # kill loses at most ~1 s of shards or 1/16 of them, which --resume makes again.
        waited = time.monotonic() - self.listed_at
        if self.unlisted * 16 >= len(self.manifest["shards"]) or waited >= 10 * self.list_s:
            self.write_manifest()

    def write_manifest(self) -> None:
        """The manifest on disk, listing every shard on disk."""
        t0 = time.monotonic()
        set_shards(self.manifest, self.manifest["shards"])
        atomic_write_json(self.out / MANIFEST, self.manifest, durable=False)
        self.unlisted = 0
        self.listed_at = time.monotonic()
        self.list_s = self.listed_at - t0


def _keep_whole_shards(d: Path, m: dict) -> None:
    """--resume: drop the manifest's shards from the first one that is missing or damaged (a
    power loss can leave listed shards that never reached the disk); they are made again."""
    shards = m["shards"]
    bar = tqdm(shards, desc="verify", unit="shard", file=sys.stderr, leave=False)
    for i, s in enumerate(bar):
        try:
            verified_bytes(d / s["file"], s)
        except SaekitError as e:
            bar.close()
            print(f"saekit cache: {e.args[0].split(';')[0]}; making it and the {len(shards) - i - 1} after it again",
                  file=sys.stderr)  # fmt: skip
            set_shards(m, shards[:i])
            m["complete"] = False
            atomic_write_json(d / MANIFEST, m)
            return


class _ShardPipeline:
    """Writes and lists full shards on a background thread that mostly waits on the disk. At
    most `depth` shards wait for it, which bounds memory; the default (8 shards, 256 MB at the
    default --shard-mb) rides out the disk's stalls here: with 3 the forward pass waited on the
    queue for ~6% of the run."""

    def __init__(self, depth: int = 8):
        self.error: BaseException | None = None
        self.stopping = False
        self.io_q: queue.Queue = queue.Queue(maxsize=depth)
        self.io = threading.Thread(target=self._io_loop, daemon=True)
        self.io.start()
        self.writers: dict[int, SiteWriter] = {}

    def submit(self, writer: SiteWriter, shard: ShardImage, norm_sum: float) -> None:
        self._check()
        self.writers[id(writer)] = writer
        self.io_q.put((writer, shard, shard.checksum(), norm_sum))

    def _list_all(self) -> None:
        """After the I/O thread stopped: each manifest lists every shard written."""
        if self.error is None:
            for w in self.writers.values():
                if w.unlisted:
                    w.write_manifest()

    def _io_loop(self) -> None:
        while (item := self.io_q.get()) is not None:
            if self.error is None and not self.stopping:
                writer, *args = item
                try:
                    writer.store(*args)
                except BaseException as e:  # noqa: BLE001 - re-raised on the main thread
                    self.error = e

    def close(self) -> None:
        """Write what is queued (a killed run loses nothing either way: the shards so far are
        in the manifest), then stop."""
        try:
            self.io_q.put(None)
            self.io.join()
        except BaseException:  # interrupted while the queue drains
            self.stop()
            raise
        self._check()
        self._list_all()

    def stop(self) -> None:
        """On an interrupt (Ctrl-C, SIGTERM): finish the shard being written, drop the queued
        ones (`--resume` makes them again), and wait for the thread, so that no half-written
        file is left when the process exits. A second Ctrl-C does not cut this short."""
        self.stopping = True
        while self.io.is_alive():
            try:
                self.io_q.put_nowait(None)
            except queue.Full:
                pass
            try:
                self.io.join(timeout=0.05)
            except KeyboardInterrupt:
                pass
        self._list_all()

    def _check(self) -> None:
        if self.error is not None:
            raise self.error


@dataclass
class CacheJob:
    """A validated cache run whose dirs, contexts and manifests are on disk: `run_cache` fills it."""

    cfg: CacheConfig
    model: Any  # HookedTransformer
    sites: list[Site]
    writers: list[SiteWriter]
    ids: Tensor  # [K] context ids in the corpus
    ctx: Tensor  # [K, context_size] int64 tokens
    keep: Tensor  # [K, context_size] bool: positions whose rows are cached


def prepare_cache(cfg: CacheConfig) -> CacheJob:
    """Validate everything (before writing anything), then create the dirs, contexts and
    manifests (or take them over from an interrupted run with --resume)."""
    from .models import model_spec

    check_config(cfg)
    out = Path(cfg.out)
    check_out(out, cfg)
    model = load_cacheable_model(cfg)
    tokenizer = model.tokenizer
    sites = resolve_sites(model, cfg.site, cfg.layer, cfg.hook)
    dirs = [out] if len(sites) == 1 else [out / s.name for s in sites]
    settings = [
        cache_settings(cfg, s, model_spec(model), tokenizer, shard_rows(cfg, s.d_in)) for s in sites
    ]
    existing = _resumed_manifests(cfg, dirs, settings)
    ids = ctx = None
    for d, m in zip(dirs, existing, strict=True):
        if m is not None:
            t = read_verified(d / CONTEXTS, m["contexts"])
            ids, ctx = t["context"], t["tokens"].long()
            break
    if ctx is None:
        ids, ctx = choose_contexts(cfg, tokenizer)

    # Everything is validated: from here on we write.
    if cfg.overwrite and out.is_dir():
        remove_owned(out, "cache")  # all ours (check_out), but the lock
    contexts = {"context": ids.contiguous(), "tokens": ctx.to(torch.int32)}
    writers = []
    for d, m, st, s in zip(dirs, existing, settings, sites, strict=True):
        d.mkdir(parents=True, exist_ok=True)
        for p in d.glob("*.tmp-*"):
            p.unlink()  # left by a killed run
        if m is None:
            nbytes, sha = write_safetensors(d / CONTEXTS, contexts)
            entry = {"file": CONTEXTS, "n_contexts": len(ids), "bytes": nbytes, CHECKSUM: sha}
            m = new_manifest(st, entry, s.site)
            atomic_write_json(d / MANIFEST, m)
        else:
            _keep_whole_shards(d, m)
        writers.append(SiteWriter(s, d, m, DTYPES[cfg.dtype], cfg.tokens))
    keep = keep_mask(ctx, tokenizer.bos_token_id, cfg.include_bos)
    return CacheJob(cfg, model, sites, writers, ids, ctx, keep)


def _resumed_manifests(cfg: CacheConfig, dirs: list[Path], settings: list[dict]) -> list:
    """--resume: each site dir's manifest (None where there is none yet), which must have been
    made with the same settings; without --resume, all None."""
    existing = [load_raw_manifest(d) if cfg.resume else None for d in dirs]
    out = Path(cfg.out)
    if cfg.resume and len(dirs) > 1 and (out / MANIFEST).exists():
        raise SaekitError(
            f"{out} holds a single-site cache; --resume it with the site it was made with"
        )
    for d, m, st in zip(dirs, existing, settings, strict=True):
        if m is None:
            continue
        if m.get("format_version") != FORMAT_VERSION:
            raise SaekitError(
                f"{d} was made by an older saekit (cache format {m.get('format_version')!r}); it cannot be resumed: rebuild it with --overwrite"
            )
        diff = [k for k in st if m.get(k) != st[k]]
        if diff:
            k = diff[0]
            raise SaekitError(
                f"--resume of {d} with different settings: {k} was {m.get(k)!r}, now {st[k]!r}; use the original flags or --overwrite"
            )
    return existing


def run_cache(job: CacheJob) -> float:
    """Run the forward passes and write the shards; returns the seconds this took."""
    t0 = time.perf_counter()
    keep_freed_memory()
    cfg, model, sites, writers, ids, ctx, keep = (
        job.cfg,
        job.model,
        job.sites,
        job.writers,
        job.ids,
        job.ctx,
        job.keep,
    )
    cum = keep.sum(1).cumsum(0).tolist()  # rows up to and including each context
    starts = [0] + cum[:-1]
    done = min(w.next_row for w in writers)
    first_ctx = next((i for i, c in enumerate(cum) if c > done), len(cum))
    B = cfg.batch_size
    positions = torch.arange(cfg.context_size, dtype=torch.int32)
    bar = tqdm(
        total=cfg.tokens, initial=done, unit="tok", unit_scale=True, desc="cache", file=sys.stderr
    )
    pipeline = _ShardPipeline()
    try:
        for b0 in range((first_ctx // B) * B, len(ctx), B):
            check_interrupt()  # a SIGINT/SIGTERM whose exception Python swallowed
            tok = ctx[b0 : b0 + B]
            k = keep[b0 : b0 + B]
            idx = k.reshape(-1).nonzero().squeeze(1)
            acts = harvest_flat(model, tok.to(cfg.device), idx.to(cfg.device), sites)
            meta = {
                "tokens": tok.reshape(-1)[idx].to(torch.int32),
                "context": ids[b0 : b0 + B].repeat_interleave(k.sum(1)),
                "position": positions.repeat(len(tok))[idx],
            }
            for w, (a, a_idx) in zip(writers, acts, strict=True):
                w.add(a, a_idx, meta, starts[b0], pipeline.submit)
            bar.update(max(0, min(cum[min(b0 + B, len(cum)) - 1], cfg.tokens) - bar.n))
    except BaseException:
        bar.close()
        pipeline.stop()
        raise
    bar.close()
    pipeline.close()
    for w in writers:
        w.manifest["complete"] = True
        atomic_write_json(w.out / MANIFEST, w.manifest, durable=False)
    return time.perf_counter() - t0
