"""Reading the end of a cache for `saekit diagnose --cache`: a fresh density measurement on its
last rows, and the text around each chosen feature's top-activating rows."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..sae.errors import SaekitError
from .features import FreshDensity, measure_density


class CacheRows(NamedTuple):
    """Where each measured cache row came from (all [n_rows] int64)."""

    tokens: Tensor  # the token at the row's position
    context: Tensor  # the context (document row) id
    position: Tensor  # the position within that context


class Context(NamedTuple):
    """One top-activating row of a feature, as text."""

    before: str  # the text of the tokens before the activating one (same context)
    token: str  # the activating token
    after: str  # the text of the tokens after it
    activation: float  # the feature's activation on that row


def last_shards(reader, n_rows: int) -> tuple[list[int], int]:
    """The indices of the reader's last shards holding `n_rows` rows, and how many rows of the
    first of them to skip."""
    picked: list[int] = []
    total = 0
    for i in reversed(range(len(reader.shards))):
        if total >= n_rows:
            break
        picked.append(i)
        total += int(reader.shards[i]["rows"])
    picked.reverse()
    return picked, max(total - n_rows, 0)


def measure_on_cache(
    cache_dir: str | Path,
    sae,
    track: Tensor,
    k: int,
    n_rows: int,
    batch_size: int,
    hook: str | None = None,
) -> tuple[dict, FreshDensity, CacheRows | None]:
    """Fresh density on the last `n_rows` rows of the cache (top `k` rows kept for the `track`ed
    features), plus where every measured row came from (for showing contexts)."""
    from ..activations.cache_reader import CacheReader

    cache_dir = Path(cache_dir)
    reader = CacheReader(cache_dir, batch_size=1)
    shards, skip = last_shards(reader, n_rows)
    d_in = sae.W_dec.shape[1]
    if reader.d_in != d_in or (hook and reader.manifest.get("hook_name") not in (None, hook)):
        raise SaekitError(
            f"cache {cache_dir} holds {reader.manifest.get('hook_name')} (d_in {reader.d_in}) but the SAE "
            f"was trained on {hook} (d_in {d_in}); pass a cache of the run's site"
        )
    toks: list[Tensor] = []
    ctxs: list[Tensor] = []
    poss: list[Tensor] = []

    def batches() -> Iterator[Tensor]:
        for j, shard in enumerate(shards):
            t = reader.load_shard(shard)
            s = skip if j == 0 else 0
            # load_shard has checked the keys: activations, tokens, context, position.
            acts = t["activations"][s:]
            toks.append(t["tokens"][s:].long())
            ctxs.append(t["context"][s:].long())
            poss.append(t["position"][s:].long())
            for i in range(0, len(acts), batch_size):
                yield acts[i : i + batch_size].float()

    n = min(n_rows, sum(int(reader.shards[i]["rows"]) for i in shards) - skip)
    with tqdm(total=n, desc="density", unit="tok", disable=None) as bar:
        fresh = measure_density(sae, batches(), track, k=k, progress=bar)
    rows = CacheRows(torch.cat(toks), torch.cat(ctxs), torch.cat(poss)) if toks else None
    return reader.manifest, fresh, rows


def contexts_text(
    rows: CacheRows,
    top_rows: Tensor,
    top_values: Tensor,
    vocab: list[str],
    before: int = 12,
    after: int = 4,
) -> list[list[Context]]:
    """For each tracked feature, its top rows (-1: none) as text, built from the cache rows with
    the same context id and neighbouring positions."""
    tokens, ctx, pos = rows
    width = int(pos.max()) + before + after + 2
    keys = ctx * width + pos
    order = keys.argsort()
    sorted_keys = keys[order]
    offs = torch.arange(-before, after + 1)
    out: list[list[Context]] = []
    for r, v in zip(top_rows.tolist(), top_values.tolist(), strict=True):
        feats: list[Context] = []
        for row, value in zip(r, v, strict=True):
            if row < 0:
                continue
            want = ctx[row] * width + pos[row] + offs
            j = torch.searchsorted(sorted_keys, want).clamp_max(len(keys) - 1)
            found = sorted_keys[j] == want
            ids = tokens[order[j]]
            text = [
                "".join(vocab[int(t)] for t, f in zip(ids[sel], found[sel], strict=True) if f)
                for sel in (offs < 0, offs > 0)
            ]
            feats.append(Context(text[0], vocab[int(tokens[row])], text[1], value))
        out.append(feats)
    return out
