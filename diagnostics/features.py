"""Per-feature statistics on plain tensors: classes, encoder/decoder geometry, logit weights, the
geometry of the rare cluster, and a fresh density measurement on cached activations.

Everything here takes tensors (W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], counts)
so it can be tested on planted values; `diagnostics/diagnose.py` wires it to a run dir (and
`run_logit_tokens` to a run's model and dataset).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import Tensor

from ..sae.errors import SaekitError
from ..training.mechanisms import firing_offset

CLASSES = ("dead", "ultra_rare", "live")
DEAD, ULTRA_RARE, LIVE = 0, 1, 2
RESIDUAL_SITES = ("resid_pre", "resid_mid", "resid_post", "mlp_out", "attn_out")
# (site, is-last-layer) pairs whose direct path to the logits is their only path.
_EXACT_SITES = ("resid_post", "mlp_out", "mlp_post")


def classify(
    counts: Tensor, tokens: int, dead_threshold: float = 0.0, ultra_rare_threshold: float = 1e-6
) -> Tensor:
    """Class per feature (DEAD / ULTRA_RARE / LIVE) from firing counts over `tokens` tokens.

    dead: density <= dead_threshold (0: zero firings); ultra-rare: above that and below
    ultra_rare_threshold; live: the rest.
    """
    density = counts.double() / tokens
    cls = torch.full(counts.shape, LIVE, dtype=torch.int64)
    cls[density < ultra_rare_threshold] = ULTRA_RARE
    cls[density <= dead_threshold] = DEAD
    return cls


class FeatureGeometry(NamedTuple):
    encoder_bias: Tensor  # [F]
    de_projection: Tensor  # [F] unit decoder vector . encoder vector
    enc_dec_cosine: Tensor  # [F]
    decoder_norm: Tensor  # [F]


def feature_geometry(W_enc: Tensor, b_enc: Tensor, W_dec: Tensor) -> FeatureGeometry:
    enc = W_enc.T.float()
    dec_norm = W_dec.float().norm(dim=1)
    dec_unit = W_dec.float() / dec_norm.clamp_min(1e-12)[:, None]
    de = (dec_unit * enc).sum(1)
    cos = de / enc.norm(dim=1).clamp_min(1e-12)
    return FeatureGeometry(b_enc.float(), de, cos, dec_norm)


def encoder_alignment(enc: Tensor) -> dict:
    """How a set of encoder vectors (rows of enc [n, d_in], any norms) lie with respect to each
    other, on unit vectors: the mean cosine to their normalised mean direction (1 = identical,
    ~0 = spread), and the top singular value's share of the squared Frobenius norm (1 = all on
    one line, either sign; about (sqrt(n) + sqrt(d))^2 / (n d) for random directions, the
    Marchenko-Pastur edge, given beside it)."""
    n, d = enc.shape
    e = enc / enc.norm(dim=1, keepdim=True).clamp_min(1e-12)
    mean_dir = e.mean(0)
    mean_dir = mean_dir / mean_dir.norm().clamp_min(1e-12)
    top = torch.linalg.eigvalsh(e.T.double() @ e.double())[-1] / n  # ||e||_F^2 = n
    return {
        "encoder_mean_cosine_to_mean_direction": float((e @ mean_dir).mean()),
        "encoder_top_singular_share": float(top),
        "encoder_top_singular_share_random": min(1.0, (n**0.5 + d**0.5) ** 2 / (n * d)),
    }


def negative_orthant(enc: Tensor) -> dict:
    """For non-negative inputs: a feature whose encoder is all <= 0 (with a negative effective
    threshold) has every input on the silent side of its hyperplane. Per set of encoder rows
    enc [n, d_in]: the mean and median share of each row's squared norm in its negative
    entries (0.5 for random directions), and the fraction of rows with no positive entry."""
    sq = enc.double().pow(2)
    share = (sq * (enc < 0)).sum(1) / sq.sum(1).clamp_min(1e-300)
    return {
        "encoder_negative_mass_mean": float(share.mean()),
        "encoder_negative_mass_median": float(share.median()),
        "encoder_all_nonpositive_fraction": float((enc <= 0).all(1).double().mean()),
    }


def rare_cluster_geometry(
    W_enc: Tensor,
    W_dec: Tensor,
    classes: Tensor,
    neuron_basis: bool,
    control: Tensor | None = None,
    non_negative: bool = False,
) -> dict:
    """Do ultra-rare features share one encoder direction, or hide behind a hyperplane with all
    data on one side? Per class (and for the `control` group when given): `encoder_alignment`;
    with `non_negative` inputs (e.g. ReLU MLP neurons) `negative_orthant`; for `mlp_post` runs
    (neuron_basis) the decoder sparsity in the neuron basis: the L1/L2 ratio divided by
    sqrt(d_in) (1 = dense, 1/sqrt(d_in) = one neuron) and the fraction of squared norm in the
    top 10 neurons. Values are None for a class with fewer than 2 features."""
    out: dict = {}
    enc = W_enc.T.float()
    sets = [(name, classes == c) for c, name in enumerate(CLASSES)]
    if control is not None:
        sets.append(("control", control.bool()))
    for name, sel in sets:
        n = int(sel.sum())
        row: dict = {"n": n, **dict.fromkeys(encoder_alignment(enc[:2]))}
        if non_negative:
            row.update(dict.fromkeys(negative_orthant(enc[:1])))
        if n >= 2:
            row.update(encoder_alignment(enc[sel]))
            if non_negative:
                row.update(negative_orthant(enc[sel]))
        if neuron_basis:
            row["decoder_l1_l2_ratio_over_sqrt_d"] = None
            row["decoder_top10_neuron_mass"] = None
            if n >= 2:
                d = W_dec[sel].float()
                l2 = d.norm(dim=1).clamp_min(1e-12)
                ratio = d.abs().sum(1) / l2 / d.shape[1] ** 0.5
                sq = d.pow(2)
                top = sq.topk(min(10, d.shape[1]), dim=1).values.sum(1) / sq.sum(1).clamp_min(1e-24)
                row["decoder_l1_l2_ratio_over_sqrt_d"] = float(ratio.mean())
                row["decoder_top10_neuron_mass"] = float(top.mean())
        out[name] = row
    return out


def logit_site(site: str | None, hook_name: str, d_in: int, model) -> str | None:
    """Which logit-weight recipe applies: "mlp_post", "residual", "logits", or None (unknown)."""
    if site == "mlp_out_logits":
        return "logits"
    if site == "mlp_post" or (site is None and hook_name.endswith("mlp.hook_post")):
        return "mlp_post"
    if site in RESIDUAL_SITES or (site is None and d_in == model.cfg.d_model):
        return "residual"
    return None


def direct_path_caveat(model, site: str | None, layer: int | None) -> str | None:
    """A sentence when the logit weights are the direct path only (None when exact)."""
    last = model.cfg.n_layers - 1
    if site == "mlp_out_logits" or (site in _EXACT_SITES and layer == last):
        return None
    return (
        f"Site {site} at layer {layer} comes before the end of the last layer ({last}): logit "
        "weights are the direct path only (through ln_final's linear approximation and W_U), "
        "ignoring every later layer's effect."
    )


def ln_final_scale(model, tokens: Tensor) -> float:
    """ln_final's typical scale: mean of ln_final.hook_scale over the non-BOS positions of
    `tokens` [batch, pos]. None-normalised models return 1."""
    if not hasattr(model, "ln_final") or not hasattr(model.ln_final, "hook_scale"):
        return 1.0
    scales: list[Tensor] = []
    with torch.no_grad():
        model.run_with_hooks(
            tokens.to(model.cfg.device),
            fwd_hooks=[("ln_final.hook_scale", lambda s, hook: scales.append(s[:, 1:].flatten()))],
        )
    return float(torch.cat(scales).float().mean())


def logit_weights(W_dec: Tensor, model, recipe: str, layer: int | None, scale: float) -> Tensor:
    """Logit weights [F, d_vocab] of decoder rows W_dec [F, d_in], each row shifted to median 0.

    mlp_post: W_dec @ W_out[layer] first; then ln_final's linear approximation (centre over
    d_model for LayerNorm, divide by `scale`, multiply by ln_final.w) and W_U. "logits": the rows
    are already logit directions.
    """
    v = W_dec.to(model.W_U.device, model.W_U.dtype)
    if recipe == "logits":
        logits = v
    else:
        if recipe == "mlp_post":
            v = v @ model.blocks[layer].mlp.W_out
        if model.cfg.normalization_type in ("LN", "LNPre"):
            v = v - v.mean(-1, keepdim=True)
        if model.cfg.normalization_type is not None:
            v = v / scale
        w = getattr(model.ln_final, "w", None)
        if isinstance(w, Tensor):
            v = v * w
        logits = v @ model.W_U
    return logits - logits.median(-1, keepdim=True).values


class TopLogits(NamedTuple):
    top_ids: Tensor  # [F, k] highest logit weights first
    top_values: Tensor  # [F, k]
    bottom_ids: Tensor  # [F, k] lowest first
    bottom_values: Tensor  # [F, k]


@torch.no_grad()
def top_logit_tokens(
    W_dec: Tensor, model, recipe: str, layer: int | None, scale: float, k: int = 10
) -> TopLogits:
    """Top and bottom k logit tokens of every feature, in chunks so F x d_vocab never lives in
    memory at once (16k features x 50k tokens would be 3 GB)."""
    d_vocab = model.cfg.d_vocab if recipe != "logits" else W_dec.shape[1]
    chunk = max(1, (1 << 24) // d_vocab)
    parts: list[tuple[Tensor, ...]] = []
    for i in range(0, W_dec.shape[0], chunk):
        lw = logit_weights(W_dec[i : i + chunk], model, recipe, layer, scale)
        top = lw.topk(k, dim=1)
        bot = lw.topk(k, dim=1, largest=False)
        parts.append((top.indices, top.values, bot.indices, bot.values))
    return TopLogits(*(torch.cat([p[j] for p in parts]).cpu() for j in range(4)))


def scale_tokens(meta: dict, model, n_tokens: int = 2048) -> Tensor:
    """~n_tokens of a run's dataset (cfg.json metadata `meta`; its test split when it has one)
    to measure ln_final's scale on."""
    from ..activations.corpus import load_texts, tokenize_contexts

    ds = meta.get("dataset") or "default"
    name, column = (
        (ds.get("name", "default"), ds.get("text_column", "text"))
        if isinstance(ds, dict)
        else (ds, "text")
    )
    ctx = min(int(meta.get("context_size") or 128), model.cfg.n_ctx)
    try:
        try:
            texts = load_texts(name, split="test", text_column=column)
        except SaekitError:
            texts = load_texts(name, split="train", text_column=column)
        toks = tokenize_contexts(texts, model.tokenizer, ctx, max_tokens=n_tokens)
    except SaekitError as e:
        raise SaekitError(f"{e} (or pass --ln-scale to skip measuring ln_final's scale)") from None
    if len(toks) == 0:
        raise SaekitError(
            f"dataset {name} is too short to measure ln_final's scale; pass --ln-scale"
        )
    return toks


def run_logit_tokens(
    model, meta: dict, W_dec: Tensor, k: int, ln_scale: float | None
) -> tuple[TopLogits | None, dict, str | None]:
    """The top and bottom k logit tokens of a run's features (None when its site has no known
    path to the logits), summary.json's "logit_weights" entry, and a warning for the reader (or
    None). ln_scale None: measured on the run's dataset."""
    site, layer, hook_name = meta.get("site"), meta.get("layer"), meta.get("hook_name") or ""
    recipe = logit_site(site, hook_name, W_dec.shape[1], model)
    if recipe == "mlp_post" and layer is None:  # W_out of which block is unknown
        recipe = None
    if recipe is None:
        warning = f"No logit weights: site {site or hook_name or '(unknown)'} has no known path to the logits."
        return None, {"computed": False}, warning
    scale = ln_scale if ln_scale is not None else ln_final_scale(model, scale_tokens(meta, model))
    top = top_logit_tokens(W_dec, model, recipe, layer, scale, k=k)
    caveat = direct_path_caveat(model, site, layer)
    info = {
        "computed": True,
        "recipe": recipe,
        "ln_final_scale": scale,
        "ln_final_scale_source": "--ln-scale" if ln_scale is not None else "measured",
        "direct_path_caveat": caveat,
    }
    return top, info, caveat


def vocab_strings(tokenizer, d_vocab: int) -> list[str]:
    """The text of every token id (ids the tokenizer lacks show as <id>)."""
    if tokenizer is None:
        return [f"<{i}>" for i in range(d_vocab)]
    n = min(d_vocab, len(tokenizer))
    out = tokenizer.batch_decode([[i] for i in range(n)])
    return out + [f"<{i}>" for i in range(n, d_vocab)]


class FreshDensity(NamedTuple):
    counts: Tensor  # [F] int64 rows each feature fired on
    n_tokens: int
    l0: float
    fvu: float
    top_values: Tensor  # [T, k] the top activations of the tracked features
    top_rows: Tensor  # [T, k] their row numbers in the order the batches were given (-1: none)
    x_min: float  # the smallest activation value seen (>= 0: non-negative inputs)
    margin: Tensor  # [F] its largest pre-activation over the rows - its offset: > 0 iff it fired


@torch.no_grad()
def measure_density(
    sae, batches: Iterable[Tensor], track: Tensor, k: int = 10, progress=None
) -> FreshDensity:
    """Density, L0, FVU and the top-k activating rows of features `track`, over `batches`
    [B, d_in] of activations in the SAE's input units."""
    d_sae = sae.W_dec.shape[0]
    dev = sae.W_dec.device
    counts = torch.zeros(d_sae, dtype=torch.int64, device=dev)
    sq_err = torch.zeros((), dtype=torch.float64, device=dev)
    sum_x = torch.zeros(sae.W_dec.shape[1], dtype=torch.float64, device=dev)
    sum_sq = torch.zeros((), dtype=torch.float64, device=dev)
    top_v = torch.full((len(track), k), -float("inf"), device=dev)
    top_r = torch.full((len(track), k), -1, dtype=torch.int64, device=dev)
    x_min = torch.full((), math.inf, dtype=torch.float64, device=dev)
    margin = torch.full((d_sae,), -math.inf, dtype=sae.W_dec.dtype, device=dev)
    track = track.to(dev)
    n = 0
    for x in batches:
        x = x.to(dev, sae.W_dec.dtype)
        out = sae.reconstruct(x)  # the SAE as saved: inference features (batchtopk: threshold)
        pre, acts = out.pre, out.acts  # [B, d_sae], dense for every arch
        counts += (acts > 0).sum(0)
        sq_err += (x - out.recon).double().pow(2).sum()
        sum_x += x.double().sum(0)
        sum_sq += x.double().pow(2).sum()
        x_min = torch.minimum(x_min, x.min().double())
        margin = torch.maximum(margin, pre.amax(0))
        if len(track):
            a = acts[:, track].T  # [T, B]
            rows = torch.arange(n, n + x.shape[0], device=dev).expand(len(track), -1)
            v, idx = torch.cat([top_v, a], 1).topk(k, dim=1)
            top_r = torch.cat([top_r, rows], 1).gather(1, idx)
            top_v = v
        n += x.shape[0]
        if progress is not None:
            progress.update(x.shape[0])
    total_var = sum_sq - sum_x.pow(2).sum() / max(n, 1)
    top_r = torch.where(top_v > 0, top_r, -1)
    return FreshDensity(
        counts.cpu(),
        n,
        float(counts.sum()) / max(n, 1),
        float(sq_err / total_var) if total_var > 0 else float("nan"),
        top_v.cpu(),
        top_r.cpu(),
        float(x_min),
        (margin - firing_offset(sae)).cpu(),  # training/mechanisms.py's margin
    )
