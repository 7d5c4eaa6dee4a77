"""Loss recovered: splice the SAE's reconstruction into the model at its hook and measure what the
model loses, next to zero- and mean-ablating the site.

Conventions (written into eval.json as well):
- BOS positions are left alone. The cache excludes BOS rows, so the SAE never saw them; at BOS
  positions every variant (spliced, zero-, mean-ablated) keeps the clean activation, and the
  reconstruction metrics and losses are taken over the other positions only. A loss at position t
  is the prediction of token t+1 made there; it counts when token t is not BOS.
- FVU pooled = Σ‖x−x̂‖² / Σ‖x−x̄‖² over all evaluated tokens, x̄ their mean (1 − SAELens'
  `explained_variance`). FVU per-token mean = mean_t ‖x_t−x̂_t‖² / ‖x_t−x̄_b‖², x̄_b the mean of
  the token's eval batch (1 − SAELens' `explained_variance_legacy`); it is noisier and depends on
  the batch, and is larger than the pooled one when some tokens sit near the mean.
- MSE = mean over tokens of ‖x−x̂‖² (summed over d_in), the training loss' convention.
- loss recovered vs a baseline = (CE_ablated − CE_spliced) / (CE_ablated − CE_clean).
- KL = mean over tokens of KL(clean ‖ spliced) of the next-token distributions.
- Derived sites (`mlp_out_logits`) have no hook: the SAE reconstructs a function of the model's
  activations that the forward pass never computes, so there is nothing to replace. Only the
  reconstruction metrics are measured there (on the same eval tokens, derived as the cache does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..sae.errors import SaekitError, check_device
from .run_info import check_hook, complete_metadata, feature_classes
from .splice import Recon, derived_site_metrics, splice_metrics

# Evaluation runs the SAE in float32 whatever dtype it was trained and saved in (float64 weights
# are rounded, bfloat16 ones exact): the model's activations are float32 too.
COMPUTE_DTYPE = torch.float32


@dataclass
class EvaluateConfig:
    """Splice the SAE's reconstruction into the model at its hook and measure the loss recovered.

    Writes eval.json in the run dir and prints a short table."""

    run: str
    """run dir written by `saekit train`, or any SAELens-format SAE dir"""
    model: str | None = None
    """model the SAE reads (default: cfg.json's metadata.model_name)"""
    hook: str | None = None
    """TransformerLens hook the SAE reads, e.g. blocks.0.mlp.hook_post (default: cfg.json's metadata.hook_name)"""
    context_size: int | None = None
    """tokens per evaluation context (default: cfg.json's metadata.context_size)"""
    dataset: str | None = None
    """corpus to evaluate on; default: the run's dataset (for the default corpus, its held-out split "test")"""
    split: str | None = None
    """split of the dataset; default: "test" for the default corpus, "train" otherwise"""
    tokens: int = 65_536
    """number of tokens to evaluate on (rounded down to whole contexts)"""
    batch_size: int = 32
    """contexts per forward pass"""
    device: str = "cpu"
    """torch device"""
    ablate: str | None = None
    """also splice the SAE with a class of features zeroed at once and report delta-MSE,
    delta-CE and delta-KL against the full SAE: comma-separated items, each one ablation: dead,
    ultra_rare, live (from the density history), control (the held-out control group), or a
    file of feature indices"""


class Evaluation(NamedTuple):
    path: Path  # eval.json
    metrics: dict


def _dataset_spec(meta_dataset, dataset: str | None, split: str | None) -> tuple[str, str, str]:
    """(dataset, split, text column): the run's corpus unless overridden; for the default corpus
    its held-out split "test" (the cache reads "train")."""
    spec = meta_dataset if isinstance(meta_dataset, dict) else {"name": meta_dataset}
    name = dataset if dataset is not None else spec.get("name") or "default"
    same = name == spec.get("name")
    col = spec.get("text_column", "text") if same else "text"
    if split is None:
        split = "test" if name == "default" else (spec.get("split") or "train") if same else "train"
    return name, split, col


def print_table(m: dict) -> None:
    rows = [
        ("L0", "l0"),
        ("MSE (mean over tokens of ||x - x_hat||^2)", "mse"),
        ("FVU pooled", "fvu_pooled"),
        ("FVU per-token mean (SAELens legacy)", "fvu_per_token_mean"),
        ("CE clean", "ce_clean"),
        ("CE spliced", "ce_spliced"),
        ("CE zero-ablated", "ce_zero_ablated"),
        ("CE mean-ablated", "ce_mean_ablated"),
        ("loss recovered vs zero", "loss_recovered_zero"),
        ("loss recovered vs mean", "loss_recovered_mean"),
        ("KL(clean || spliced) per token", "kl_clean_spliced"),
        ("dead fraction", "dead_fraction"),
        ("ultra-rare fraction", "ultra_rare_fraction"),
    ]
    for label, key in rows:
        v = m.get(key)
        if v is None:
            continue
        print(f"  {label:<44} {v:.6g}")


def print_ablations(ablations: dict) -> None:
    """A row per --ablate item: its features and the deltas against the full SAE."""
    for name, r in ablations.items():
        deltas = [f"delta-MSE {r['delta_mse']:.6g}"]
        deltas += [
            f"delta-{k.upper()} {r['delta_' + k]:.6g}"
            for k in ("ce", "kl")
            if r.get("delta_" + k) is not None
        ]
        print(f"  ablate {name} ({r['n_features']} features): {', '.join(deltas)}")


def _finite(x):
    """NaN/inf (not JSON) as None, in nested dicts too."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    return None if isinstance(x, float) and not math.isfinite(x) else x


def check_cache_of_run(cache_dir: Path, manifest: dict, meta: dict, run_dir: Path) -> None:
    """SaekitError unless the cache holds the model, hook and width the run's SAE was trained on."""
    theirs = (manifest.get("model"), manifest.get("hook_name"), manifest.get("d_in"))
    ours = (meta.get("model_name"), meta.get("hook_name"), meta.get("d_in"))
    if any(a is not None and b is not None and a != b for a, b in zip(theirs, ours, strict=True)):
        raise SaekitError(
            f"{cache_dir / 'manifest.json'} is a cache of model {theirs[0]} at {theirs[1]} (d_in {theirs[2]}), "
            f"but the SAE in {run_dir} was trained on model {ours[0]} at {ours[1]} (d_in {ours[2]}); "
            "use a cache of the run's model and site"
        )


def _load_run(cfg: EvaluateConfig) -> tuple[Path, Any, dict]:
    """The run dir, its SAE (eval mode, on cfg.device) and cfg.json's metadata, after checking
    that the metadata names what evaluation needs."""
    from ..sae.io import load_sae
    from ..training.run import HISTORY_FILE, load_history

    run_dir = Path(cfg.run)
    sae, meta = load_sae(run_dir, device=cfg.device, dtype=COMPUTE_DTYPE)
    sae.eval()
    hist = run_dir / HISTORY_FILE
    if hist.is_file():  # checked to be this run's before any long work (feature_classes reads it)
        load_history(hist, sae.W_dec.shape[0])
    meta = complete_metadata(meta, cfg.model, cfg.hook, cfg.context_size)
    flags = {"model_name": "--model", "hook_name": "--hook", "context_size": "--context-size"}
    if meta.get("model_name") == "synthetic":  # synthetic runs need no model, hook or contexts
        flags = {"model_name": "--model"}
    for key, flag in flags.items():
        if meta.get(key) is None:
            raise SaekitError(
                f"{run_dir}/cfg.json metadata lacks {key}; pass {flag} (or re-save the run with saekit)"
            )
    return run_dir, sae, meta


def _cache_kept_bos(run_dir: Path, meta: dict) -> bool:
    """Whether the SAE saw BOS rows: only if its cache kept them (runs before saekit 0.2 name
    their cache by path instead: read it from there, checking it is the run's)."""
    include_bos = bool(meta.get("include_bos", False))
    if meta.get("cache_dir") and (Path(meta["cache_dir"]) / "manifest.json").is_file():
        from ..activations.cache_format import load_raw_manifest

        manifest = load_raw_manifest(Path(meta["cache_dir"])) or {}
        check_cache_of_run(Path(meta["cache_dir"]), manifest, meta, run_dir)
        include_bos = bool(manifest.get("include_bos"))
    return include_bos


def _eval_tokens(
    cfg: EvaluateConfig, model, meta: dict, run_dir: Path, dataset: str, split: str, col: str
) -> Tensor:
    """[n_ctx, context_size] token rows of the eval split: cfg.tokens rounded down to whole
    contexts (at least one)."""
    from ..activations.corpus import load_texts, tokenize_contexts

    ctx = int(meta["context_size"])
    if ctx > model.cfg.n_ctx:
        raise SaekitError(
            f"{run_dir}/cfg.json: field metadata.context_size is {ctx}, more than model {meta['model_name']}'s n_ctx {model.cfg.n_ctx}; fix it or re-run training"
        )
    texts = load_texts(dataset, split=split, text_column=col)
    n_ctx = max(cfg.tokens // ctx, 1)
    return tokenize_contexts(texts, model.tokenizer, ctx, max_tokens=n_ctx * ctx)[:n_ctx]


def _header(meta: dict, dataset: str, split: str, derived: bool, include_bos: bool) -> dict:
    """eval.json's description of what was measured, and the definitions of its numbers."""
    return {
        "model": meta["model_name"],
        "hook_name": meta["hook_name"],
        "site": meta.get("site"),
        "layer": meta.get("layer"),
        "dataset": dataset,
        "split": split,
        "context_size": int(meta["context_size"]),
        "weights_dtype": meta.get("weights_dtype"),
        "compute_dtype": str(COMPUTE_DTYPE).removeprefix("torch."),
        "spliced": not derived,
        "bos_positions": "included (the cache kept BOS rows)"
        if include_bos
        else "kept clean in every variant and excluded from all metrics (the cache leaves BOS rows out)",
        "fvu_pooled_definition": "sum ||x-x_hat||^2 / sum ||x-mean||^2 over all eval tokens",
        "fvu_per_token_mean_definition": "mean over tokens of ||x-x_hat||^2 / ||x-batch mean||^2 (SAELens legacy)",
        "mse_definition": "mean over tokens of ||x-x_hat||^2",
        "loss_recovered_definition": "(CE_ablated - CE_spliced) / (CE_ablated - CE_clean)",
        "kl_definition": "mean over tokens of KL(clean || spliced) of the next-token distribution",
    }


def evaluate(cfg: EvaluateConfig) -> Evaluation:
    """Write eval.json in the run dir (see the module docstring for every number) and print it."""
    from ..sae.lock import DirLock, check_not_written

    run_dir = Path(cfg.run)
    check_not_written(run_dir, "run", ("train",))
    if not (run_dir / "cfg.json").is_file():
        raise SaekitError(
            f"{run_dir} is not a run dir (no cfg.json); pass the dir `saekit train` wrote"
        )
    if cfg.tokens <= 0 or cfg.batch_size <= 0:
        raise SaekitError("--tokens and --batch-size must be positive")
    if cfg.context_size is not None and cfg.context_size < 2:
        raise SaekitError(f"--context-size must be >= 2 (got {cfg.context_size})")
    check_device(cfg.device)
    # eval.json goes into the run dir: refused while `saekit train` (or another evaluate) writes it
    with DirLock(run_dir, "evaluate"):
        return _evaluate(cfg)


def _evaluate(cfg: EvaluateConfig) -> Evaluation:
    from ..activations.models import load_model
    from ..activations.sites import DERIVED
    from ..sae.io import atomic_write_json

    run_dir, sae, meta = _load_run(cfg)
    masks, ablate_note = {}, {}
    if cfg.ablate is not None:
        from .ablate import ablation_masks

        masks, ablate_note = ablation_masks(run_dir, cfg.ablate, sae.W_dec.shape[0])
    if meta["model_name"] == "synthetic":
        return _evaluate_synthetic(cfg, run_dir, sae, meta, masks, ablate_note)
    dataset, split, col = _dataset_spec(meta.get("dataset"), cfg.dataset, cfg.split)
    include_bos = _cache_kept_bos(run_dir, meta)
    model = load_model(meta["model_name"], device=cfg.device)
    model.eval()
    check_hook(model, meta, sae.cfg.d_in)
    tokens = _eval_tokens(cfg, model, meta, run_dir, dataset, split, col)
    bos = None if include_bos else model.tokenizer.bos_token_id

    def sae_fn(x: Tensor, keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
        out = sae.reconstruct(x, keep)  # inference; input normalisation of SAELens SAEs undone
        return out.recon, out.acts

    abl = {k: partial(sae_fn, keep=(~m).to(sae.W_dec)) for k, m in masks.items()}
    derived = meta.get("site") in DERIVED
    if derived:
        m = derived_site_metrics(
            model, tokens, meta, sae_fn, cfg.batch_size, bos, cfg.device, ablations=abl
        )
    else:
        m = splice_metrics(
            model, tokens, meta["hook_name"], sae_fn, cfg.batch_size, bos, cfg.device,
            ablations=abl,
        )  # fmt: skip
    for k, r in m.get("ablations", {}).items():
        m["ablations"][k] = {"n_features": int(masks[k].sum()), **r}
    header = _header(meta, dataset, split, derived, include_bos)
    fired = m.pop("fired")
    metrics = {**header, **m, **feature_classes(run_dir, fired, m["n_tokens"])}
    if masks:
        metrics["ablation_classes"] = ablate_note
    metrics = _finite(metrics)
    path = run_dir / "eval.json"
    atomic_write_json(path, metrics)
    print(
        f"saekit evaluate: {metrics['model']} {meta['hook_name']}, {metrics['n_tokens']:,} tokens of {dataset}/{split}"
    )
    print_table(metrics)
    print_ablations(metrics.get("ablations", {}))
    if derived:
        print(f"  note: {metrics['not_spliced_reason']}")
    print(f"wrote {path}")
    return Evaluation(path, metrics)


@torch.no_grad()
def _evaluate_synthetic(
    cfg: EvaluateConfig, run_dir: Path, sae, meta: dict, masks: dict, ablate_note: dict
) -> Evaluation:
    """A run on synthetic activations: L0, MSE and FVU on --tokens fresh rows of its source
    (apart from the training stream), and the scoring against its true features; --ablate:
    delta-MSE only (no model: no CE, no KL)."""
    from ..activations.synthetic import SyntheticSource
    from ..sae.io import atomic_write_json
    from .ground_truth import ScoreConfig, score

    truth = SyntheticSource.load(run_dir)
    x = truth.sample(cfg.tokens, seed=0xE7A1)
    rec, counts = Recon(), torch.zeros(sae.W_dec.shape[0], dtype=torch.int64)
    keeps = {k: (~m).to(sae.W_dec) for k, m in masks.items()}
    sums = {k: {"sq_err": 0.0} for k in masks}
    for i in range(0, len(x), 4096):
        xb = x[i : i + 4096].to(cfg.device)
        out = sae.reconstruct(xb)
        rec.add(xb, out.recon, out.acts)
        counts += (out.acts > 0).sum(0).cpu()
        for k, keep in keeps.items():
            sums[k]["sq_err"] += (xb - sae.reconstruct(xb, keep).recon).double().pow(2).sum().item()
    gt = score(sae, truth, counts, cfg.tokens, ScoreConfig())
    recon = rec.result()
    fired = recon.pop("fired")
    metrics = {
        "model": "synthetic", "spliced": False, "dataset": "synthetic", "split": None,
        "weights_dtype": meta.get("weights_dtype"),
        "compute_dtype": str(COMPUTE_DTYPE).removeprefix("torch."),
        "not_spliced_reason": "synthetic activations: there is no model to splice the SAE into, "
        "so CE, loss recovered and KL are not measured; L0, MSE and FVU are on fresh rows of the "
        "run's synthetic source, and ground_truth scores the SAE against its true features",
        "fvu_pooled_definition": "sum ||x-x_hat||^2 / sum ||x-mean||^2 over all eval rows",
        "mse_definition": "mean over rows of ||x-x_hat||^2",
        **recon, "n_tokens": rec.n, **feature_classes(run_dir, fired, rec.n), "ground_truth": gt.summary(),
    }  # fmt: skip
    if masks:
        from .ablate import ablation_results

        res = ablation_results(metrics, sums, rec.n, 0)
        metrics["ablations"] = {k: {"n_features": int(masks[k].sum()), **r} for k, r in res.items()}
        metrics["ablation_classes"] = ablate_note
    metrics = _finite(metrics)
    path = run_dir / "eval.json"
    atomic_write_json(path, metrics)
    m = gt.summary()["matching"]
    print(
        f"saekit evaluate: synthetic, {rec.n:,} fresh rows; {m['n_matched']} of {m['n_true']} true features matched"
    )
    print_table(metrics)
    print_ablations(metrics.get("ablations", {}))
    print(f"  note: {metrics['not_spliced_reason']}")
    print(f"wrote {path}")
    return Evaluation(path, metrics)
