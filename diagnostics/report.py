"""`saekit diagnose`: classify features, run the dying test, and write the report dir.

Outputs (design.md): `report.html` (one self-contained page, plotly.js inlined once),
`features.csv` (a row per feature) and `summary.json`.

features.csv conventions: `log10_density` is `-inf` for features with zero firings; a value
that cannot be computed (a slope with fewer than 2 nonzero windows, logit tokens when they are
off) is an empty field; `top_logit_tokens` / `bottom_logit_tokens` are JSON lists of token texts,
highest (lowest) logit weight first.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..sae.errors import SaekitError, check_device
from ..training.run import History, last_metrics, load_history
from . import dying
from .features import (
    CLASSES,
    LIVE,
    ULTRA_RARE,
    FreshDensity,
    classify,
    direct_path_caveat,
    feature_geometry,
    ln_final_scale,
    logit_site,
    measure_density,
    rare_cluster_geometry,
    top_logit_tokens,
    vocab_strings,
)

CSV_COLUMNS = (
    "index",
    "density",
    "log10_density",
    "class",
    "encoder_bias",
    "de_projection",
    "enc_dec_cosine",
    "decoder_norm",
    "density_slope",
    "held_out",
    "top_logit_tokens",
    "bottom_logit_tokens",
)
REPORT_FILES = ("report.html", "features.csv", "summary.json")
CLASS_COLOURS = {"dead": "#7f7f7f", "ultra_rare": "#d62728", "live": "#1f77b4"}
OUTCOME_COLOURS = {
    "keeps_falling": "#d62728",
    "settles": "#2ca02c",
    "died": "#000000",
    "too_few_points": "#bcbd22",
}
MAX_SCATTER = 20_000  # points in the 3-D scatter
MAX_HEAT_ROWS = 500  # features in the heat map (evenly spaced ranks when more): ~1 per pixel row
MAX_HEAT_COLS = 300  # windows (adjacent windows pooled when more)
MAX_LINES = 20  # trajectories per group in the line plots


@dataclass
class DiagnoseConfig:
    """Classify an SAE's features (dead / ultra-rare / live), measure their geometry and logit
    weights, run the dying test on the density history, and write report.html, features.csv and
    summary.json."""

    run: str
    """run dir written by `saekit train`"""
    out: str
    """report dir to write report.html, features.csv and summary.json into"""
    cache: str | None = None
    """cache dir: measure every feature's density afresh on --tokens rows from the end of the
    cache (instead of the last training window) and show top-activating contexts"""
    tokens: int = 200_000
    """with --cache: how many cache rows (tokens) to measure density on"""
    batch_size: int = 4096
    """with --cache: rows per SAE forward pass"""
    dead_threshold: float = 0.0
    """dead: density at most this (0: zero firings in the window)"""
    ultra_rare_threshold: float = 1e-6
    """ultra-rare: density above the dead threshold and below this"""
    min_window_tokens: int = 0
    """density from training history: pool the last windows until they hold at least this many
    tokens (0: the last window only)"""
    rare_threshold: float = 1e-5
    """dying test: besides the control group, features whose density was below this in some
    window since their last resampling are tested"""
    dying_windows: int = 3
    """dying test: a feature with zero firings in all of its last this-many windows died"""
    dying_window_tokens: int | None = None
    """dying test: pool training windows (never across a resampling) to at least this many
    tokens each (default: 3 / rare-threshold, so a feature at the rare threshold expects 3
    firings per window)"""
    alpha: float = 0.01
    """dying test: significance level of the one-sided t-test on the slope"""
    features: list[int] = field(default_factory=list)
    """features to show logit weights and contexts for (empty: a few live, ultra-rare and
    control-group features, chosen with --seed)"""
    n_show: int = 4
    """when --features is empty: how many features of each group to show"""
    n_top_contexts: int = 8
    """with --cache: top-activating contexts shown per chosen feature"""
    n_logit_tokens: int = 10
    """top and bottom logit tokens listed per feature"""
    logits: bool = True
    """compute logit weights (loads the run's model)"""
    ln_scale: float | None = None
    """ln_final's typical scale for the logit weights (default: measured on ~2k tokens of the
    run's dataset, test split)"""
    device: str = "cpu"
    """torch device"""
    seed: int = 0
    """seed for choosing features to show and for sampling plots"""
    overwrite: bool = False
    """replace an existing report in --out"""


# ---------------------------------------------------------------------------- cache reading


def _cache_rows(cache_dir: Path, n_rows: int):
    """The cache's verified reader, the indices of the last shards holding `n_rows` rows, and how
    many rows of the first of them to skip."""
    from ..activations.cache import CacheReader

    reader = CacheReader(cache_dir, batch_size=1)
    picked: list[int] = []
    total = 0
    for i in reversed(range(len(reader.shards))):
        if total >= n_rows:
            break
        picked.append(i)
        total += int(reader.shards[i]["rows"])
    picked.reverse()
    return reader, picked, max(total - n_rows, 0)


def measure_on_cache(
    cfg: DiagnoseConfig, sae, track: torch.Tensor, k: int, hook: str | None = None
):
    """Fresh density on the last cfg.tokens rows of the cache, plus the rows' tokens, contexts
    and positions (for showing contexts)."""
    cache_dir = Path(cfg.cache)
    reader, shards, skip = _cache_rows(cache_dir, cfg.tokens)
    d_in = sae.W_dec.shape[1]
    if reader.d_in != d_in or (hook and reader.manifest.get("hook_name") not in (None, hook)):
        raise SaekitError(
            f"cache {cache_dir} holds {reader.manifest.get('hook_name')} (d_in {reader.d_in}) but the SAE "
            f"was trained on {hook} (d_in {d_in}); pass a cache of the run's site"
        )
    toks, ctxs, poss = [], [], []

    def batches():
        first = True
        for shard in shards:
            t = reader.load_shard(shard)
            s = skip if first else 0
            first = False
            # load_shard has checked the keys: activations, tokens, context, position.
            acts = t["activations"][s:]
            toks.append(t["tokens"][s:].long())
            ctxs.append(t["context"][s:].long())
            poss.append(t["position"][s:].long())
            for i in range(0, len(acts), cfg.batch_size):
                yield acts[i : i + cfg.batch_size].float()

    n = min(cfg.tokens, sum(int(reader.shards[i]["rows"]) for i in shards) - skip)
    with tqdm(total=n, desc="density", unit="tok", disable=None) as bar:
        fresh = measure_density(sae, batches(), track, k=k, progress=bar)
    rows = (torch.cat(toks), torch.cat(ctxs), torch.cat(poss)) if toks else None
    return reader.manifest, fresh, rows


def contexts_text(
    rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    top_rows: torch.Tensor,
    vocab: list[str],
    before: int = 12,
    after: int = 4,
) -> list[list[tuple[str, str, str]]]:
    """For each tracked feature, its top rows as (text before, activating token, text after),
    built from the cache rows with the same context id and neighbouring positions."""
    tokens, ctx, pos = rows
    width = int(pos.max()) + before + after + 2
    keys = ctx * width + pos
    order = keys.argsort()
    sorted_keys = keys[order]
    out: list[list[tuple[str, str, str]]] = []
    for r in top_rows.tolist():
        feats: list[tuple[str, str, str]] = []
        for row in r:
            if row < 0:
                continue
            offs = torch.arange(-before, after + 1)
            want = ctx[row] * width + pos[row] + offs
            j = torch.searchsorted(sorted_keys, want).clamp_max(len(keys) - 1)
            found = sorted_keys[j] == want
            ids = tokens[order[j]]
            text = [
                "".join(vocab[int(t)] for t, f in zip(ids[sel], found[sel], strict=True) if f)
                for sel in (offs < 0, offs > 0)
            ]
            feats.append((text[0], vocab[int(tokens[row])], text[1]))
        out.append(feats)
    return out


# ---------------------------------------------------------------------------- the verb


def _check_out(cfg: DiagnoseConfig) -> Path:
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise SaekitError(f"--out {out} is a file; pass a directory")
    existing = [f for f in REPORT_FILES if (out / f).exists()]
    if existing and not cfg.overwrite:
        raise SaekitError(f"{out} already holds {existing[0]}; pass --overwrite or another --out")
    return out


def _check_config(cfg: DiagnoseConfig) -> None:
    """SaekitError for any flag out of its range (nan included), before anything is loaded."""
    checks = [
        (0 < cfg.alpha < 1, f"--alpha must be between 0 and 1 (got {cfg.alpha})"),
        (
            0 <= cfg.dead_threshold < cfg.ultra_rare_threshold <= 1,
            "need 0 <= --dead-threshold < --ultra-rare-threshold <= 1 "
            f"(got {cfg.dead_threshold} and {cfg.ultra_rare_threshold})",
        ),
        (
            0 < cfg.rare_threshold <= 1,
            f"--rare-threshold must be in (0, 1] (got {cfg.rare_threshold})",
        ),
        (cfg.dying_windows >= 1, f"--dying-windows must be >= 1 (got {cfg.dying_windows})"),
        (
            cfg.dying_window_tokens is None or cfg.dying_window_tokens >= 1,
            f"--dying-window-tokens must be >= 1 (got {cfg.dying_window_tokens})",
        ),
        (
            cfg.min_window_tokens >= 0,
            f"--min-window-tokens must be >= 0 (got {cfg.min_window_tokens})",
        ),
        (cfg.n_show >= 0, f"--n-show must be >= 0 (got {cfg.n_show})"),
        (cfg.n_top_contexts >= 1, f"--n-top-contexts must be >= 1 (got {cfg.n_top_contexts})"),
        (cfg.n_logit_tokens >= 1, f"--n-logit-tokens must be >= 1 (got {cfg.n_logit_tokens})"),
        (
            cfg.ln_scale is None or 0 < cfg.ln_scale < math.inf,
            f"--ln-scale must be a finite number > 0 (got {cfg.ln_scale})",
        ),
        (cfg.tokens >= 1, f"--tokens must be >= 1 (got {cfg.tokens})"),
        (cfg.batch_size >= 1, f"--batch-size must be >= 1 (got {cfg.batch_size})"),
    ]
    for ok, msg in checks:
        if not ok:
            raise SaekitError(msg)
    check_device(cfg.device)


def _fmt(x: float) -> str:
    if math.isnan(x):
        return ""
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.9g}"


def choose_features(cfg: DiagnoseConfig, classes: torch.Tensor, control: torch.Tensor) -> list[int]:
    d_sae = len(classes)
    if cfg.features:
        bad = [i for i in cfg.features if not 0 <= i < d_sae]
        if bad:
            raise SaekitError(f"--features {bad[0]} is out of range; the SAE has {d_sae} features")
        return list(dict.fromkeys(cfg.features))
    g = torch.Generator().manual_seed(cfg.seed)
    chosen: list[int] = []
    for sel in (classes == LIVE, classes == ULTRA_RARE, control):
        idx = sel.nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)[: cfg.n_show]]
        chosen += [i for i in sorted(idx.tolist()) if i not in chosen]
    return chosen


def _scale_tokens(meta: dict, model, n_tokens: int = 2048) -> torch.Tensor:
    """~n_tokens of the run's dataset (its test split when it has one) to measure ln_final's
    scale on."""
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


def diagnose(cfg: DiagnoseConfig) -> Path:
    """Write report.html, features.csv and summary.json into cfg.out; returns the report dir."""
    t0 = time.time()
    run = Path(cfg.run)
    if not run.is_dir():
        raise SaekitError(
            f"--run {run} is not a directory; pass a run dir written by `saekit train`"
        )
    out = _check_out(cfg)
    _check_config(cfg)
    for name, v in (("ultra-rare-threshold", cfg.ultra_rare_threshold), ("alpha", cfg.alpha)):
        if not v > 0:
            raise SaekitError(f"--{name} must be > 0, got {v}")
    if cfg.dead_threshold < 0 or cfg.dead_threshold >= cfg.ultra_rare_threshold:
        raise SaekitError("--dead-threshold must be >= 0 and below --ultra-rare-threshold")
    if cfg.cache is not None and not Path(cfg.cache).is_dir():
        raise SaekitError(
            f"--cache {cfg.cache} is not a directory; pass a cache dir from `saekit cache`"
        )
    if cfg.tokens < 1 or cfg.batch_size < 1:
        raise SaekitError("--tokens and --batch-size must be >= 1")

    from ..sae.io import load_sae

    sae, meta = load_sae(run, device=cfg.device)
    sae.eval()
    d_sae = sae.W_dec.shape[0]
    bad = [i for i in cfg.features if not 0 <= i < d_sae]
    if bad:
        raise SaekitError(f"--features {bad[0]} is out of range; the SAE has {d_sae} features")
    if cfg.cache is not None:
        from ..activations.cache import read_manifest
        from .evaluate import check_cache_of_run

        check_cache_of_run(Path(cfg.cache), read_manifest(cfg.cache), meta, run)
    hist_path = run / "density_history.safetensors"
    hist = load_history(hist_path, d_sae) if hist_path.is_file() else None
    if hist is None and cfg.cache is None:
        raise SaekitError(
            f"{run} has no density_history.safetensors; pass --cache to measure density afresh"
        )
    if hist is not None and len(hist.counts) == 0 and cfg.cache is None:
        raise SaekitError(f"{hist_path} holds no windows (training too short); pass --cache")
    metrics = last_metrics(run / "metrics.jsonl")
    control = hist.control_mask if hist is not None else torch.zeros(d_sae, dtype=torch.bool)

    W_enc, b_enc, W_dec = (t.detach().float().cpu() for t in (sae.W_enc, sae.b_enc, sae.W_dec))
    warnings: list[str] = []

    # The model: for logit weights and token texts (loaded first: it fails fast when offline).
    site, layer, hook_name = meta.get("site"), meta.get("layer"), meta.get("hook_name", "")
    vocab: list[str] = []
    model = None
    if cfg.logits or cfg.cache is not None:
        from ..activations.models import load_model

        try:
            model = load_model(meta.get("model_name") or "default", device=cfg.device)
        except SaekitError as e:
            if cfg.logits:
                raise SaekitError(f"{e} (or pass --no-logits to skip logit weights)") from None
            warnings.append(f"Contexts show token ids: the run's model did not load ({e}).")
        if model is not None:
            vocab = vocab_strings(model.tokenizer, model.cfg.d_vocab)
            if cfg.logits and cfg.n_logit_tokens > model.cfg.d_vocab:
                raise SaekitError(
                    f"--n-logit-tokens {cfg.n_logit_tokens} exceeds the model's vocabulary of {model.cfg.d_vocab} tokens; lower it"
                )

    # Density: the last training window(s), or afresh on the cache.
    fresh: FreshDensity | None = None
    ctx_rows = None
    window: dict[str, Any] = {}
    if cfg.cache is None:
        assert hist is not None
        tok = hist.window_tokens.flip(0).cumsum(0)
        n_pool = int((tok < max(cfg.min_window_tokens, 1)).sum()) + 1
        n_pool = min(n_pool, len(tok))
        counts = hist.counts[-n_pool:].sum(0)
        n_tokens = int(hist.window_tokens[-n_pool:].sum())
        source = f"training history: the last {n_pool} window(s)"
        window = {
            "windows_pooled": n_pool,
            "tokens": n_tokens,
            "first_window_end_step": int(hist.window_end_step[-n_pool]),
            "last_window_end_step": int(hist.window_end_step[-1]),
        }
        chosen_pre = None
    else:
        # Which features to track must be known before the pass: choose from the history's
        # classes when there is one, else from a first guess of "everything live".
        pre_cls = (
            classify(
                hist.counts[-1],
                int(hist.window_tokens[-1]),
                cfg.dead_threshold,
                cfg.ultra_rare_threshold,
            )
            if hist is not None and len(hist.counts)
            else torch.full((d_sae,), LIVE)
        )
        chosen_pre = choose_features(cfg, pre_cls, control)
        _, fresh, ctx_rows = measure_on_cache(
            cfg,
            sae,
            torch.tensor(chosen_pre, dtype=torch.long),
            cfg.n_top_contexts,
            meta.get("hook_name"),
        )
        if fresh.n_tokens == 0:
            raise SaekitError(f"cache {cfg.cache} holds no rows; rebuild it")
        counts, n_tokens = fresh.counts, fresh.n_tokens
        source = f"fresh measurement on the last {n_tokens} rows of the cache {cfg.cache}"
        window = {"windows_pooled": None, "tokens": n_tokens}
    resolvable = 1.0 / n_tokens
    for name, thr in (("ultra-rare", cfg.ultra_rare_threshold), ("dead", cfg.dead_threshold)):
        if 0 < thr < resolvable:
            warnings.append(
                f"The {name} threshold {thr:g} is below what the window can resolve "
                f"(1/{n_tokens} tokens = {resolvable:.3g}): a feature below it shows as zero firings, "
                f"so the {name} count cannot be told apart from the dead count. Use more tokens "
                "(--min-window-tokens, or --cache with --tokens) or a higher threshold."
            )
    density = counts.double() / n_tokens
    classes = classify(counts, n_tokens, cfg.dead_threshold, cfg.ultra_rare_threshold)
    geo = feature_geometry(W_enc, b_enc, W_dec)
    chosen = chosen_pre if chosen_pre is not None else choose_features(cfg, classes, control)

    # Dying test and per-feature slopes.
    dtest = None
    slope = np.full(d_sae, np.nan)
    dying_summary: dict[str, Any] = {"verdict": "No density history in the run dir: no dying test."}
    if hist is not None and len(hist.counts):
        dtest = dying.dying_test(
            hist.counts,
            hist.window_tokens,
            hist.window_end_step,
            hist.resample_steps,
            hist.resampled,
            hist.control_mask,
            rare_threshold=cfg.rare_threshold,
            last_windows=cfg.dying_windows,
            alpha=cfg.alpha,
            min_window_tokens=cfg.dying_window_tokens,
        )
        slope = dtest.fit.slope
        dying_summary = dying.summarize(dtest, cfg.alpha)

    # Logit weights.
    logit_info: dict[str, Any] = {"computed": False}
    top = None
    if cfg.logits:
        assert model is not None
        recipe = logit_site(site, hook_name, W_dec.shape[1], model)
        if recipe is None:
            warnings.append(
                f"No logit weights: site {site or hook_name} has no known path to the logits."
            )
        else:
            scale = (
                cfg.ln_scale
                if cfg.ln_scale is not None
                else ln_final_scale(model, _scale_tokens(meta, model))
            )
            top = top_logit_tokens(W_dec, model, recipe, layer, scale, k=cfg.n_logit_tokens)
            if recipe == "logits":
                vocab = vocab_strings(model.tokenizer, W_dec.shape[1])
            caveat = direct_path_caveat(model, site, layer)
            logit_info = {
                "computed": True,
                "recipe": recipe,
                "ln_final_scale": scale,
                "ln_final_scale_source": "--ln-scale" if cfg.ln_scale is not None else "measured",
                "direct_path_caveat": caveat,
            }
            if caveat:
                warnings.append(caveat)

    geometry = rare_cluster_geometry(W_enc, W_dec, classes, neuron_basis=(site == "mlp_post"))

    # features.csv
    def tok_lists(ids: torch.Tensor | None) -> list[str]:
        if ids is None:
            return [""] * d_sae
        return [json.dumps([vocab[i] for i in row], ensure_ascii=False) for row in ids.tolist()]

    top_txt = tok_lists(top.top_ids if top is not None else None)
    bot_txt = tok_lists(top.bottom_ids if top is not None else None)
    with np.errstate(divide="ignore"):
        log10 = np.log10(density.numpy())
    cols = [
        [str(i) for i in range(d_sae)],
        [_fmt(x) for x in density.tolist()],
        [_fmt(x) for x in log10.tolist()],
        [CLASSES[c] for c in classes.tolist()],
        [_fmt(x) for x in geo.encoder_bias.tolist()],
        [_fmt(x) for x in geo.de_projection.tolist()],
        [_fmt(x) for x in geo.enc_dec_cosine.tolist()],
        [_fmt(x) for x in geo.decoder_norm.tolist()],
        [_fmt(x) for x in slope.tolist()],
        ["true" if b else "false" for b in control.tolist()],
        top_txt,
        bot_txt,
    ]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    w.writerows(zip(*cols, strict=True))

    # summary.json
    n_cls = {name: int((classes == c).sum()) for c, name in enumerate(CLASSES)}
    if fresh is not None:
        l0, fvu, l0_src = fresh.l0, fresh.fvu, "fresh measurement on the cache rows"
    else:
        l0, fvu = metrics.get("l0"), metrics.get("fvu")
        l0_src = f"metrics.jsonl, last line (step {metrics.get('step')})" if metrics else None
    summary = {
        "run": str(run),
        "cache": cfg.cache,
        "n_features": d_sae,
        "counts": n_cls,
        "fractions": {k: v / d_sae for k, v in n_cls.items()},
        "held_out": int(control.sum()),
        "thresholds": {"dead": cfg.dead_threshold, "ultra_rare": cfg.ultra_rare_threshold},
        "density_source": source,
        "window": window,
        "resolvable_threshold": resolvable,
        "history": None
        if hist is None
        else {
            "n_windows": len(hist.counts),
            "window_tokens_min": int(hist.window_tokens.min()) if len(hist.counts) else None,
            "window_tokens_max": int(hist.window_tokens.max()) if len(hist.counts) else None,
            "density_window": hist.metadata.get("density_window"),
            "n_resampling_events": len(hist.resample_steps),
        },
        "l0": l0,
        "fvu": fvu,
        "l0_fvu_source": l0_src,
        "dying_test": dying_summary,
        "geometry": geometry,
        "logit_weights": logit_info,
        "shown_features": chosen,
        "warnings": warnings,
        "csv_conventions": (
            "log10_density is -inf for zero firings; empty field = not computable; density_slope "
            "is the OLS slope of log10 density per training step over the dying test's pooled "
            "windows since the feature's last resampling in which it fired"
        ),
    }

    # report.html
    contexts = None
    if fresh is not None and ctx_rows is not None:
        vocab = vocab or vocab_strings(None, int(ctx_rows[0].max()) + 1)
        contexts = contexts_text(ctx_rows, fresh.top_rows, vocab)
    page = render_html(
        cfg,
        summary,
        density.numpy(),
        classes.numpy(),
        geo,
        hist,
        dtest,
        top,
        vocab,
        chosen,
        contexts,
        fresh,
    )

    from ..sae.io import atomic_write_bytes, atomic_write_json

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "features.csv", buf.getvalue().encode())
    atomic_write_json(out / "summary.json", _jsonable(summary))
    atomic_write_bytes(out / "report.html", page.encode())
    print(
        f"diagnose: {d_sae} features: {n_cls['dead']} dead, {n_cls['ultra_rare']} ultra-rare, "
        f"{n_cls['live']} live; report in {out} ({time.time() - t0:.1f}s)"
    )
    return out


def _jsonable(x: Any) -> Any:
    """NaN/inf are not JSON: write them as null."""
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# ---------------------------------------------------------------------------- HTML


def _pool_windows(hist: History, max_cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(counts [W', F], tokens [W'], end steps [W']) with adjacent windows pooled to <= max_cols."""
    c = hist.counts.numpy()
    tok = hist.window_tokens.numpy()
    steps = hist.window_end_step.numpy()
    n = len(tok)
    if n <= max_cols:
        return c, tok, steps
    edges = np.linspace(0, n, max_cols + 1).astype(int)
    c = np.add.reduceat(c, edges[:-1], axis=0)
    tok = np.add.reduceat(tok, edges[:-1])
    return c, tok, steps[edges[1:] - 1]


def _log_density(c: np.ndarray, tok: np.ndarray) -> np.ndarray:
    """log10 density with NaN (a gap in the plots) where a feature did not fire."""
    with np.errstate(divide="ignore"):
        d = np.log10(c / tok.reshape(-1, *([1] * (c.ndim - 1))))
    return np.where(np.isfinite(d), d, np.nan).astype(np.float32)


def _event_shapes(steps: np.ndarray) -> list[dict]:
    return [
        dict(
            type="line",
            xref="x",
            yref="paper",
            x0=s,
            x1=s,
            y0=0,
            y1=1,
            line=dict(color="#999", dash="dot", width=1),
        )
        for s in steps[:100].tolist()
    ]


def render_html(
    cfg: DiagnoseConfig,
    summary: dict,
    density: np.ndarray,
    classes: np.ndarray,
    geo,
    hist: History | None,
    dtest,
    top,
    vocab: list[str],
    chosen: list[int],
    contexts,
    fresh,
) -> str:
    import plotly.graph_objects as go
    from plotly.offline import get_plotlyjs

    rng = np.random.default_rng(cfg.seed)
    d_sae = len(density)
    # Hover: the feature index (customdata) and its top 3 logit tokens, kept short: this text
    # is most of the page's weight at 16k features.
    hover = np.full(d_sae, "", dtype=object)
    if top is not None:
        hover = np.array(
            [
                html.escape(" ".join(f"'{vocab[t]}'" for t in row[:3]), quote=False)
                for row in top.top_ids.tolist()
            ],
            dtype=object,
        )
    n_tok = summary["window"]["tokens"]
    with np.errstate(divide="ignore"):
        logd = np.log10(density)
    floor = math.log10(1.0 / n_tok) - 0.5  # where dead features sit on a log axis
    logd_plot = np.where(np.isfinite(logd), logd, floor).astype(np.float32)
    figs: list[tuple[str, Any, str]] = []  # (title, figure, note)
    layout = dict(template="plotly_white", height=420, margin=dict(l=60, r=20, t=50, b=50))

    # 1. log10 density histogram by class.
    f = go.Figure()
    for c, name in enumerate(CLASSES):
        sel = classes == c
        if sel.any():
            f.add_histogram(
                x=logd_plot[sel],
                name=f"{name} ({int(sel.sum())})",
                marker_color=CLASS_COLOURS[name],
                nbinsx=80,
            )
    f.update_layout(
        barmode="overlay", xaxis_title="log10 density", yaxis_title="features", **layout
    )
    f.update_traces(opacity=0.75)
    figs.append(
        (
            "Feature density",
            f,
            f"Dead features (zero firings) are drawn at {floor:.2f}, half a decade below 1/{n_tok} tokens.",
        )
    )

    if hist is not None and len(hist.counts):
        c, tok, steps = _pool_windows(hist, MAX_HEAT_COLS)
        ld = _log_density(c, tok)  # [W, F]
        final = np.nan_to_num(ld[-1], nan=-99.0)
        order = np.argsort(-final, kind="stable")
        if len(order) > MAX_HEAT_ROWS:
            order = order[np.linspace(0, len(order) - 1, MAX_HEAT_ROWS).round().astype(int)]
        f = go.Figure(
            go.Heatmap(
                z=ld[:, order].T,
                x=steps,
                y=[f"f{i}" for i in order],  # categorical: one row per feature, labelled by index
                hovertemplate="feature %{y}<br>step %{x}<br>log10 density %{z:.2f}<extra></extra>",
                colorscale="Viridis",
                colorbar=dict(title="log10 density"),
            )
        )
        f.update_layout(
            xaxis_title="training step (window end)",
            yaxis_title="features, sorted by final density",
            shapes=_event_shapes(hist.resample_steps.numpy()),
            **{**layout, "height": 500},
        )
        f.update_yaxes(showticklabels=False)
        note = "Blank cells: zero firings in that window. Dotted lines: resampling events."
        if d_sae > MAX_HEAT_ROWS:
            note += f" {MAX_HEAT_ROWS} of {d_sae} features shown (evenly spaced in the density ranking)."
        if len(hist.counts) > MAX_HEAT_COLS:
            note += f" Adjacent windows pooled into {MAX_HEAT_COLS} columns."
        figs.append(("Density over training", f, note))

    if dtest is not None:
        # Trajectories use the dying test's pooled windows (each large enough to resolve the
        # rare threshold), not the raw training windows.
        ld_full = np.where(np.isfinite(dtest.log_density), dtest.log_density, np.nan)
        all_steps = dtest.steps
        f = go.Figure()
        rare = np.flatnonzero((classes == ULTRA_RARE) & ~hist.control_mask.numpy())
        groups = (
            ("ultra-rare", rare, "#d62728"),
            ("control group", np.flatnonzero(hist.control_mask.numpy()), "#9467bd"),
        )
        for gname, idx, colour in groups:
            idx = rng.permutation(idx)[:MAX_LINES]
            for j, i in enumerate(sorted(idx.tolist())):
                f.add_scatter(
                    x=all_steps,
                    y=ld_full[:, i],
                    mode="lines+markers",
                    line=dict(color=colour, width=1),
                    marker=dict(size=3),
                    name=gname,
                    legendgroup=gname,
                    showlegend=j == 0,
                    hovertemplate=f"feature {i}<br>step %{{x}}<br>log10 density %{{y:.2f}}<extra></extra>",
                )
        f.update_layout(
            xaxis_title="training step",
            yaxis_title="log10 density",
            shapes=_event_shapes(hist.resample_steps.numpy()),
            **layout,
        )
        figs.append(
            (
                "Rare and control-group features over training",
                f,
                f"Up to {MAX_LINES} features per group, over the dying test's pooled windows "
                f"({int(dtest.window_tokens.min())}-{int(dtest.window_tokens.max())} tokens each); "
                "gaps are windows with zero firings; dotted lines are resampling events.",
            )
        )

        f = go.Figure()
        steps = all_steps.astype(np.float64)
        for outcome in dying.OUTCOMES:
            idx = np.flatnonzero(dtest.outcome == outcome)
            idx = np.sort(rng.permutation(idx)[:MAX_LINES])
            for j, i in enumerate(idx.tolist()):
                seg = steps > dtest.start_step[i]
                y = np.where(seg, ld_full[:, i], np.nan)
                slope_txt = (
                    ""
                    if np.isnan(dtest.fit.slope[i])
                    else f" slope {dtest.fit.slope[i]:.3g}/step, p={dtest.fit.p_falling[i]:.2g}"
                )
                f.add_scatter(
                    x=steps,
                    y=y,
                    mode="lines+markers",
                    line=dict(color=OUTCOME_COLOURS[outcome], width=1),
                    marker=dict(size=3),
                    name=outcome,
                    legendgroup=outcome,
                    showlegend=j == 0,
                    hovertemplate=f"feature {i} ({dtest.group[i]}): {outcome}{slope_txt}<br>step %{{x}}<br>log10 density %{{y:.2f}}<extra></extra>",
                )
        f.update_layout(xaxis_title="training step", yaxis_title="log10 density", **layout)
        figs.append(
            (
                "Dying test trajectories",
                f,
                f"Up to {MAX_LINES} features per outcome, each over its current segment (since its last resampling). {html.escape(summary['dying_test']['verdict'])}",
            )
        )

    # 3-D scatter.
    idx = np.arange(d_sae)
    if d_sae > MAX_SCATTER:
        idx = np.sort(rng.choice(d_sae, MAX_SCATTER, replace=False))
    f = go.Figure()
    bias = geo.encoder_bias.numpy().astype(np.float32)
    de = geo.de_projection.numpy().astype(np.float32)
    for c, name in enumerate(CLASSES):
        sel = idx[classes[idx] == c]
        if len(sel):
            f.add_scatter3d(
                x=logd_plot[sel],
                y=bias[sel],
                z=de[sel],
                mode="markers",
                name=name,
                marker=dict(size=2, color=CLASS_COLOURS[name]),
                text=hover[sel].tolist(),
                customdata=sel.astype(np.int32),
                hovertemplate="feature %{customdata}"
                + ("<br>top tokens: %{text}" if top is not None else "")
                + "<br>log10 density %{x:.2f}<br>bias %{y:.3g}<br>D/E %{z:.3g}<extra></extra>",
            )
    f.update_layout(
        scene=dict(
            xaxis_title="log10 density", yaxis_title="encoder bias", zaxis_title="D/E projection"
        ),
        **{**layout, "height": 600},
    )
    note = "Drag to rotate. Dead features sit at the left wall."
    if d_sae > MAX_SCATTER:
        note += f" A random {MAX_SCATTER} of {d_sae} features."
    figs.append(("Log density × encoder bias × D/E projection", f, note))

    for title, values, xt in (
        ("D/E projection per class", de, "D/E projection"),
        ("Encoder bias per class", bias, "encoder bias"),
    ):
        f = go.Figure()
        for c, name in enumerate(CLASSES):
            sel = classes == c
            if sel.any():
                f.add_histogram(
                    x=values[sel],
                    name=f"{name} ({int(sel.sum())})",
                    marker_color=CLASS_COLOURS[name],
                    nbinsx=80,
                    histnorm="probability",
                )
        f.update_layout(
            barmode="overlay", xaxis_title=xt, yaxis_title="fraction of class", **layout
        )
        f.update_traces(opacity=0.7)
        figs.append((title, f, ""))

    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>saekit diagnose report</title>",
        # Script errors and console.error calls are shown on the page: a broken plot must not
        # fail silently (and the browser test reads them from the DOM).
        "<script>window.saekitErrors=[];function saekitShowErrors(){var d=document.getElementById('js-errors');"
        "if(d){d.textContent=window.saekitErrors.join('\\n');}}"
        "window.addEventListener('error',function(e){window.saekitErrors.push('error: '+e.message);saekitShowErrors();});"
        "var saekitConsoleError=console.error;console.error=function(){window.saekitErrors.push('console.error: '+"
        "Array.prototype.map.call(arguments,String).join(' '));saekitShowErrors();return saekitConsoleError.apply(console,arguments);};"
        "</script>",
        f"<style>{_CSS}</style>",
        f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>",
        "<pre id='js-errors' class='err'></pre>",
        f"<h1>saekit diagnose: {html.escape(summary['run'])}</h1>",
        _summary_html(summary),
    ]
    for k, (title, fig, note) in enumerate(figs):
        parts.append(f"<h2>{html.escape(title)}</h2>")
        if note:
            parts.append(f"<p class='note'>{note}</p>")
        parts.append(
            fig.to_html(
                full_html=False,
                include_plotlyjs=False,
                div_id=f"plot-{k}",
                config={"displaylogo": False},
            )
        )
    parts.append(_chosen_html(summary, chosen, classes, density, top, vocab, contexts, fresh, cfg))
    parts.append("<script>saekitShowErrors();</script></body></html>")
    return "\n".join(parts)


_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:20px auto;padding:0 12px;color:#222}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}
.note{color:#555;font-size:90%}.warn{background:#fff3cd;padding:6px 10px;border-left:4px solid #e0a800}
.err{color:#b00;white-space:pre-wrap}.tok{font-family:monospace;white-space:pre}mark{background:#ffd54f}
.ctx{font-family:monospace;white-space:pre-wrap;font-size:90%}
"""


def _summary_html(s: dict) -> str:
    def pct(x: float | None) -> str:
        return "" if x is None else f"{100 * x:.2f}%"

    rows = [("features", s["n_features"])]
    rows += [(f"{k}", f"{s['counts'][k]} ({pct(s['fractions'][k])})") for k in CLASSES]
    rows += [
        ("held-out control group", s["held_out"]),
        (
            "thresholds",
            f"dead: density ≤ {s['thresholds']['dead']:g}; ultra-rare: below {s['thresholds']['ultra_rare']:g}",
        ),
        (
            "density measured on",
            f"{s['density_source']} ({s['window']['tokens']} tokens; resolves densities ≥ {s['resolvable_threshold']:.3g})",
        ),
        ("L0", s["l0"]),
        ("FVU", s["fvu"]),
        ("L0/FVU from", s["l0_fvu_source"]),
    ]
    g = s["geometry"]
    for name in ("ultra_rare", "live"):
        v = g[name]["encoder_mean_cosine_to_mean_direction"]
        rows.append(
            (
                f"{name}: mean cosine of encoder vectors to their mean direction",
                "" if v is None else f"{v:.3f}",
            )
        )
        if (
            "decoder_top10_neuron_mass" in g[name]
            and g[name]["decoder_top10_neuron_mass"] is not None
        ):
            rows.append(
                (
                    f"{name}: decoder mass in top 10 neurons / L1÷L2÷√d",
                    f"{g[name]['decoder_top10_neuron_mass']:.3f} / {g[name]['decoder_l1_l2_ratio_over_sqrt_d']:.3f}",
                )
            )
    dt = s["dying_test"]
    if "counts" in dt:
        rows.append(("dying test", dt["test"]))
        rows += [
            (f"dying test: {k}", f"{v} ({pct(dt['fractions'][k])})")
            for k, v in dt["counts"].items()
        ]
    li = s["logit_weights"]
    if li.get("computed"):
        rows.append(
            (
                "logit weights",
                f"{li['recipe']} recipe, ln_final scale {li['ln_final_scale']:.4g} ({li['ln_final_scale_source']})",
            )
        )
    body = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows
    )
    warn = "".join(f"<p class='warn'>{html.escape(w)}</p>" for w in s["warnings"])
    return f"<h2>Summary</h2>{warn}<p><b>Dying test:</b> {html.escape(dt['verdict'])}</p><table>{body}</table>"


def _chosen_html(summary, chosen, classes, density, top, vocab, contexts, fresh, cfg) -> str:
    out = ["<h2>Chosen features: logit weights and top-activating contexts</h2>"]
    if summary["logit_weights"].get("direct_path_caveat"):
        out.append(
            f"<p class='note'>{html.escape(summary['logit_weights']['direct_path_caveat'])}</p>"
        )
    if not chosen:
        out.append("<p>No features to show.</p>")
    for j, i in enumerate(chosen):
        out.append(f"<h3>feature {i}: {CLASSES[classes[i]]}, density {density[i]:.3g}</h3>")
        if top is not None:
            rows = []
            for ids, vals, label in (
                (top.top_ids[i], top.top_values[i], "top"),
                (top.bottom_ids[i], top.bottom_values[i], "bottom"),
            ):
                cells = "".join(
                    f"<td><span class='tok'>{html.escape(repr(vocab[t]))}</span> {v:+.3f}</td>"
                    for t, v in zip(ids.tolist(), vals.tolist(), strict=True)
                )
                rows.append(f"<tr><th>{label}</th>{cells}</tr>")
            out.append(f"<table>{''.join(rows)}</table>")
        if contexts is not None and j < len(contexts):
            vals = fresh.top_values[j].tolist()
            items = [
                f"<li class='ctx'>{v:.3g}: {html.escape(a)}<mark>{html.escape(t)}</mark>{html.escape(b)}</li>"
                for (a, t, b), v in zip(contexts[j], vals, strict=False)
            ]
            out.append(
                "<ol>" + "".join(items) + "</ol>"
                if items
                else "<p class='note'>No activations in the measured rows.</p>"
            )
    return "\n".join(out)
