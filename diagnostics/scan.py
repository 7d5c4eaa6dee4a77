"""One streaming pass over many rows for the feature dashboards: per feature, a histogram of its
activations, its top-k rows and a uniform sample (reservoir) of its firings, all vectorised (no
Python loop over features). Rare features need many rows to fire at all: the pass reads the whole
cache, or --scan-tokens rows of it, or that many fresh rows of a synthetic run's source.

Rows are identified by their index in the pass. For a cache the pass keeps each row's context id
and token (for the text around it); for a synthetic source, each row's true active set (for
the true features behind a firing)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from .config import DiagnoseConfig

if TYPE_CHECKING:
    pass

HIST_LO, HIST_HI, HIST_BINS = -3.0, 3.0, 60  # log10 activation bins: 1e-3 .. 1e3, 0.1 decade each


class Scan(NamedTuple):
    n_rows: int  # rows read
    hist: Tensor  # int64 [F, HIST_BINS]: firings per log10-activation bin (clamped at the ends)
    top_val: Tensor  # float32 [F, k]: the largest activations, descending (0: none)
    top_row: Tensor  # int64 [F, k]: their rows (-1: none)
    sample_val: Tensor  # float32 [F, r]: a uniform sample of each feature's firings (0: none)
    sample_row: Tensor  # int64 [F, r]: their rows (-1: none)
    where: dict  # per row: cache "context"/"tokens" [n], or synthetic "row_ptr" (counts)/"feature"


def _update_top(
    val: Tensor, row: Tensor, new: Tensor, new_row: Tensor, key: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Keep the k best of (kept, new) per feature: the largest values, or with `key` the
    smallest keys (a uniform sample: bottom-k of random keys)."""
    k = val.shape[1]
    v = torch.cat([val, new.T], dim=1)
    r = torch.cat([row, new_row.expand(new.shape[1], -1)], dim=1)
    if key is None:
        best = v.topk(k, dim=1).indices
        return v.gather(1, best), r.gather(1, best), None
    best = key.topk(k, dim=1, largest=False).indices
    return v.gather(1, best), r.gather(1, best), key.gather(1, best)


def scan(
    batches: Iterator[tuple[Tensor, dict]],
    sae,
    n_rows: int,
    k: int = 8,
    r: int = 24,
    seed: int = 0,
    device: str = "cpu",
) -> Scan:
    """Read (x [B, d_in], per-row info) batches until n_rows rows; info's tensors are
    concatenated into Scan.where."""
    d_sae = sae.W_dec.shape[0]
    hist = torch.zeros(d_sae * HIST_BINS, dtype=torch.int64)
    top_val, top_row = torch.zeros(d_sae, k), torch.full((d_sae, k), -1, dtype=torch.int64)
    s_val, s_row = torch.zeros(d_sae, r), torch.full((d_sae, r), -1, dtype=torch.int64)
    s_key = torch.full((d_sae, r), float("inf"))
    g = torch.Generator().manual_seed(seed)
    where: dict[str, list[Tensor]] = {}
    done = 0
    scale = HIST_BINS / (HIST_HI - HIST_LO)
    with torch.no_grad(), tqdm(total=n_rows, desc="scan", unit="row", disable=None) as bar:
        for x, info in batches:
            x = x[: n_rows - done]
            f = sae.encode(x.to(device)).float().cpu()  # [B, F]
            rows = torch.arange(done, done + len(x))
            fid_row, fid = (f > 0).nonzero(as_tuple=True)
            v = f[fid_row, fid]
            b = ((v.log10() - HIST_LO) * scale).floor().long().clamp(0, HIST_BINS - 1)
            hist += torch.bincount(fid * HIST_BINS + b, minlength=d_sae * HIST_BINS)
            top_val, top_row, _ = _update_top(top_val, top_row, f, rows)
            key = torch.where(f > 0, torch.rand(f.shape, generator=g), torch.inf)
            s_val, s_row, s_key = _update_top(s_val, s_row, f, rows, torch.cat([s_key, key.T], 1))
            for name, t in info.items():
                where.setdefault(name, []).append(t)
            done += len(x)
            bar.update(len(x))
            if done >= n_rows:
                break
    s_row = torch.where(torch.isfinite(s_key), s_row, -1)
    s_val = torch.where(torch.isfinite(s_key), s_val, 0.0)
    top_row = torch.where(top_val > 0, top_row, -1)
    return Scan(
        done, hist.view(d_sae, HIST_BINS), top_val, top_row, s_val, s_row,
        {n: torch.cat(ts) for n, ts in where.items()},
    )  # fmt: skip


def cache_batches(cache_dir: str | Path, batch_size: int) -> Iterator[tuple[Tensor, dict]]:
    """A cache's rows in order, shard by shard, with each row's token and context id."""
    from ..activations.cache_reader import CacheReader

    reader = CacheReader(cache_dir, batch_size=1)
    for i in range(len(reader.shards)):
        t = reader.load_shard(i)
        acts, ctx, tok = t["activations"], t["context"].long(), t["tokens"].int()
        for s in range(0, len(acts), batch_size):
            info = {"context": ctx[s : s + batch_size], "tokens": tok[s : s + batch_size]}
            yield acts[s : s + batch_size].float(), info


def synthetic_batches(source, batch_size: int, seed: int) -> Iterator[tuple[Tensor, dict]]:
    """Fresh rows of a synthetic source (a stream of their own) with their true active sets."""
    for i in range(2**62):
        b = source.sample_batch(batch_size, seed=seed * 1_000_003 + i)
        a = b.active
        yield b.x, {"row_ptr": a.row_ptr[1:] - a.row_ptr[:-1], "feature": a.feature}


def active_of(where: dict, rows: np.ndarray) -> list[list[int]]:
    """The true features active in each of `rows` (synthetic scans): where["row_ptr"] holds
    each row's count of active features, where["feature"] their ids, row after row."""
    n_active = where["row_ptr"].numpy()
    ptr = np.concatenate([[0], np.cumsum(n_active)])
    feat = where["feature"].numpy()
    return [feat[ptr[i] : ptr[i + 1]].tolist() if i >= 0 else [] for i in rows.tolist()]


def context_text(
    where: dict, rows: np.ndarray, vocab: list[str], before: int = 10, after: int = 3
) -> list[tuple[str, str, str]]:
    """(text before, the token, text after) of each of `rows` (cache scans): a cache holds a
    context's rows one after another, so the neighbours of a row in the same context are the
    rows beside it; ("", "", "") for -1."""
    ctx, tok = where["context"].numpy(), where["tokens"].numpy()
    n = len(ctx)
    text = lambda ids: "".join(vocab[i] if i < len(vocab) else f"<{i}>" for i in ids)  # noqa: E731
    out = []
    for r in rows.tolist():
        if r < 0:
            out.append(("", "", ""))
            continue
        lo, hi = max(0, r - before), min(n, r + after + 1)
        same = ctx[lo:hi] == ctx[r]
        ids = tok[lo:hi].tolist()
        pre = [i for i, k in zip(ids[: r - lo], same[: r - lo], strict=True) if k]
        post = [i for i, k in zip(ids[r - lo + 1 :], same[r - lo + 1 :], strict=True) if k]
        out.append((text(pre), text([int(tok[r])]), text(post)))
    return out


def dashboard_scan(cfg: DiagnoseConfig, inp) -> Scan | None:
    """The dashboards' streaming pass (diagnostics/scan.py): the --cache from its start, or fresh
    rows of a synthetic run's source; None when there is nothing to scan or --scan-tokens 0."""
    if cfg.scan_tokens == 0:
        return None
    if cfg.cache is not None:
        from ..activations.cache_format import read_manifest

        n = min(int(read_manifest(cfg.cache)["n_tokens"]), cfg.scan_tokens or 10_000_000)
        batches = cache_batches(cfg.cache, cfg.batch_size)
    elif (inp.run / "synthetic.json").is_file():
        from ..activations.synthetic import SyntheticSource

        n = cfg.scan_tokens or 262_144
        batches = synthetic_batches(SyntheticSource.load(inp.run), cfg.batch_size, cfg.seed)
    else:
        return None
    return scan(batches, inp.sae, n, seed=cfg.seed, device=cfg.device)
