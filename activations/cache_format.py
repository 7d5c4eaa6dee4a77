"""The on-disk activation cache format: its constants, checksums and manifest, and verified reads.

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

import hashlib
import json
import math
from pathlib import Path

import torch
import xxhash
from safetensors.torch import load as st_load
from torch import Tensor

from ..sae.errors import SaekitError
from ..sae.lock import check_not_written

FORMAT_VERSION = 2  # 2: files are checked with XXH3-128 (1 used SHA-256)
# The checksum of every cache file, and its key in the manifest. Caching hashes every byte it
# writes (2 KB a token for mlp_post) and training every shard it reads, so the hash's speed is
# the cache's speed on a small model: SHA-256 runs at 1.1 GB/s on one core here (SHA-NI), BLAKE3
# at 4.9, XXH3 at 11, and caching with SHA-256 cost ~10% of the forward pass, BLAKE3 ~5%
# (docs/benchmarks.md). The checksum guards against accidental damage (a torn copy, a bad disk,
# an edit); a cryptographic hash would add nothing, since whoever can rewrite a shard can
# rewrite the manifest beside it.
CHECKSUM = "xxh3_128"
new_hash = xxhash.xxh3_128
# Format 1 caches (SHA-256) are still read, so caches made before the change need no rebuild;
# new caches are format 2 (a format 1 cache cannot be resumed: its settings differ).
FORMAT_CHECKSUM = {1: "sha256", 2: CHECKSUM}
_HASHES = {"sha256": hashlib.sha256, CHECKSUM: new_hash}
MANIFEST = "manifest.json"
CONTEXTS = "contexts.safetensors"
SHARD_KEYS = ("activations", "tokens", "context", "position")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BOS_NOTE = "rows whose token is BOS (position 0 and document separators) are not cached"


def entry_checksum(entry: dict) -> str:
    """A manifest entry's checksum (either format's), or "" if it has none."""
    for key in _HASHES:
        if isinstance(entry.get(key), str):
            return entry[key]
    return ""


def verified_bytes(path: Path, entry: dict) -> bytes:
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


def read_verified(path: Path, entry: dict) -> dict[str, Tensor]:
    """Tensors of a file whose size and checksum must match its manifest entry."""
    data = verified_bytes(path, entry)
    name = path.name
    try:
        return st_load(data)
    except Exception as e:  # noqa: BLE001 - safetensors raises several types
        raise SaekitError(
            f"cache file {name} in {path.parent} is not valid safetensors ({e}); rebuild the cache"
        ) from None


def load_raw_manifest(path: Path) -> dict | None:
    """The parsed manifest.json of a cache dir, not yet verified (None if there is none): for
    --resume, merges, and matching a run to its cache. `read_manifest` is the verified read."""
    if not (path / MANIFEST).is_file():
        return None
    try:
        return json.loads((path / MANIFEST).read_text())
    except json.JSONDecodeError as e:
        raise SaekitError(
            f"{path / MANIFEST} is not valid JSON ({e}); rebuild with --overwrite"
        ) from None


def read_manifest(cache_dir: str | Path) -> dict:
    """The manifest of a complete cache; SaekitError if it is missing, incomplete or corrupt."""
    d = Path(cache_dir)
    if not d.is_dir():
        raise SaekitError(f"cache dir {d} does not exist; build it with saekit cache --out {d}")
    m = load_raw_manifest(d)
    if not (isinstance(m, dict) and m.get("complete")):
        # refused as being written, not as incomplete (a site's dir: its parent is locked)
        check_not_written(d, "cache")
        check_not_written(d.resolve().parent, "cache", ("cache",))
    if m is None:
        subs = sorted(p.name for p in d.iterdir() if (p / MANIFEST).is_file())
        if subs:
            raise SaekitError(
                f"{d} holds one cache per site; pass one of {', '.join(str(d / s) for s in subs)}"
            )
        raise SaekitError(
            f"{d} is not a saekit cache (no {MANIFEST}); build it with saekit cache --out {d}"
        )
    if not isinstance(m, dict) or m.get("format_version") not in FORMAT_CHECKSUM:
        raise SaekitError(
            f"{d / MANIFEST} is not a saekit cache manifest of format 1 or 2; rebuild the cache"
        )
    if not m.get("complete"):
        raise SaekitError(
            f"cache {d} is incomplete ({m.get('n_tokens', 0)} of {m.get('target_tokens', '?')} tokens); finish it with saekit cache --resume --out {d}"
        )
    _check_shard_list(d, m)
    _check_stats(d, m)
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
    key = FORMAT_CHECKSUM.get(m.get("format_version"), CHECKSUM)
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


def _check_stats(d: Path, m: dict) -> None:
    """stats.mean_norm is a finite number > 0 (it scales the L1 coefficient and the inputs: 0
    divides by zero, a negative one flips the sparsity penalty's sign)."""
    st = m.get("stats")
    v = st.get("mean_norm") if isinstance(st, dict) else None
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf
    for s in m["shards"] if not ok else ():  # a NaN / inf mean: name the shard that made it
        norm = s.get("norm_sum")
        if isinstance(norm, float) and not math.isfinite(norm):
            raise SaekitError(
                f"cache file {d / s['file']} holds NaN or inf activations (norm_sum {norm}); rebuild the cache from activations that are finite"
            )
    if not ok:
        raise SaekitError(
            f"{d / MANIFEST}: stats.mean_norm is {v!r}, not a finite number > 0 (edited, or every "
            "cached activation is zero); rebuild the cache with saekit cache --overwrite, at a "
            "site whose activations are not all zero"
        )


def new_manifest(settings: dict, contexts_entry: dict, site: str) -> dict:
    """The manifest of a new, empty cache of `site` made with `settings`."""
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
    if site == "mlp_out_logits":
        m["derivation"] = (
            "((mlp_out - mean over d_model if ln_final centres) / s) * ln_final.w @ W_U, no biases; "
            "s = mean of ln_final.hook_scale over the cached positions of the same forward batch"
        )
    return m


def set_shards(m: dict, shards: list[dict]) -> None:
    """A manifest's shard list, and the totals derived from it."""
    m["shards"] = shards
    st = m["stats"]
    st["norm_sum"] = sum(s["norm_sum"] for s in shards)  # summed in order: resume-exact
    st["rows"] = sum(s["rows"] for s in shards)
    st["mean_norm"] = st["norm_sum"] / st["rows"] if st["rows"] else None
    m["n_tokens"] = st["rows"]
