"""`saekit diagnose`: classify features, run the trajectory test, and write the report dir.

`diagnose(cfg)` is a short sequence of steps: check the flags (diagnostics/config.py); load the
SAE, the density history and the model; measure density (from the history, or afresh on the
cache); classes and geometry; the trajectory test (diagnostics/groups.py); logit weights; assemble one `ReportData`; write
features.csv, summary.json and report.html (diagnostics/report.py, figures.py, page.py).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from ..sae.errors import SaekitError
from ..sae.outdir import remove_owned
from ..training.density import RESOLVE_FIRINGS, resolves
from ..training.run import (
    History,
    read_metrics,
)
from .config import DiagnoseConfig, check_inputs, check_out
from .contexts import CacheRows, contexts_text, measure_on_cache
from .features import (
    CLASSES,
    LIVE,
    ULTRA_RARE,
    FreshDensity,
    TopLogits,
    classify,
    feature_geometry,
    rare_cluster_geometry,
    run_logit_tokens,
    vocab_strings,
)
from .groups import run_trajectory
from .inputs import RunInputs, load_inputs, load_run_model, synthetic_run
from .page import read_evaluation, write_report
from .report import Report, ReportData
from .scan import dashboard_scan


def choose_features(cfg: DiagnoseConfig, classes: torch.Tensor, control: torch.Tensor) -> list[int]:
    """--features, or up to --n-show each of live, ultra-rare and control-group features."""
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


class Density(NamedTuple):
    counts: torch.Tensor  # int64 [F]: firings over the window
    n_tokens: int  # tokens in the window
    source: str  # where the window came from, in words
    window: dict  # summary.json's "window"
    fresh: FreshDensity | None  # the fresh measurement (with --cache)
    rows: CacheRows | None  # where the measured cache rows came from (with --cache)
    chosen: list[int] | None  # with --cache: the features tracked for contexts


def density_from_history(cfg: DiagnoseConfig, hist: History) -> Density:
    """Counts over the last window, or the last windows pooled to --min-window-tokens."""
    tok = hist.window_tokens.flip(0).cumsum(0)
    n_pool = int((tok < max(cfg.min_window_tokens, 1)).sum()) + 1
    n_pool = min(n_pool, len(tok))
    window = {
        "windows_pooled": n_pool,
        "tokens": int(hist.window_tokens[-n_pool:].sum()),
        "first_window_end_step": int(hist.window_end_step[-n_pool]),
        "last_window_end_step": int(hist.window_end_step[-1]),
    }
    source = f"training history: the last {n_pool} window(s)"
    counts = hist.counts[-n_pool:].sum(0)
    return Density(counts, window["tokens"], source, window, None, None, None)


def density_from_cache(cfg: DiagnoseConfig, inp: RunInputs) -> Density:
    """Counts (and top contexts of the features to show) afresh on the cache's last rows."""
    hist, d_sae = inp.history, len(inp.control)
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
    chosen = choose_features(cfg, pre_cls, inp.control)
    track = torch.tensor(chosen, dtype=torch.long)
    _, fresh, rows = measure_on_cache(
        cfg.cache,
        inp.sae,
        track,
        cfg.n_top_contexts,
        cfg.tokens,
        cfg.batch_size,
        inp.meta.get("hook_name"),
    )
    if fresh.n_tokens == 0:
        raise SaekitError(f"cache {cfg.cache} holds no rows; rebuild it")
    n = fresh.n_tokens
    source = f"fresh measurement on the last {n} rows of the cache {cfg.cache}"
    return Density(
        fresh.counts, n, source, {"windows_pooled": None, "tokens": n}, fresh, rows, chosen
    )


def density_from_synthetic(cfg: DiagnoseConfig, inp: RunInputs) -> Density:
    """Counts afresh on --tokens fresh synthetic rows (apart from the training stream), of the
    run's own source or of --synthetic's spec."""
    from ..activations.source import parse_synthetic
    from ..activations.synthetic import SyntheticSource

    own = not cfg.synthetic
    src = SyntheticSource.load(inp.run) if own else SyntheticSource(parse_synthetic(cfg.synthetic))
    counts = torch.zeros(len(inp.control), dtype=torch.int64)
    chunk = 65_536
    with torch.no_grad():
        for k, start in enumerate(range(0, cfg.tokens, chunk)):
            x = src.sample(min(chunk, cfg.tokens - start), seed=cfg.seed * 100_003 + k)
            for b in range(0, len(x), cfg.batch_size):
                f = inp.sae.encode(x[b : b + cfg.batch_size].to(cfg.device))
                counts += (f > 0).sum(0).cpu()
    n = cfg.tokens
    which = "the run's synthetic source" if own else "the --synthetic spec"
    source = f"fresh measurement on {n} fresh rows of {which}"
    return Density(counts, n, source, {"windows_pooled": None, "tokens": n}, None, None, None)


def ground_truth_step(
    cfg: DiagnoseConfig, inp: RunInputs, dens: Density, classes: torch.Tensor
) -> tuple[Any, dict | None]:
    """Score the SAE against the run's true features when it trained on synthetic activations
    (diagnostics/ground_truth.py): (GroundTruthScore, summary.json's "ground_truth"), or
    (None, None) for other runs."""
    if not (inp.run / "synthetic.json").is_file():
        return None, None
    from ..activations.synthetic import SyntheticSource
    from .ground_truth import CLASSES as GT_CLASSES
    from .ground_truth import ScoreConfig, score

    truth = SyntheticSource.load(inp.run)
    gt = score(inp.sae, truth, dens.counts, dens.n_tokens, ScoreConfig(seed=cfg.seed))
    summary = gt.summary()
    label = np.asarray(gt.label)
    ultra = (classes == ULTRA_RARE).numpy()
    n_ultra = int(ultra.sum())
    real = int((label[ultra] == "real_rare").sum())
    summary["ultra_rare"] = {
        "threshold": cfg.ultra_rare_threshold,
        "n": n_ultra,
        **{c: int((label[ultra] == c).sum()) for c in GT_CLASSES},
        "share_real": real / n_ultra if n_ultra else None,
        # below ~10 expected firings at the threshold, ultra-rare and dead are not told apart
        "resolved": resolves(dens.n_tokens, cfg.ultra_rare_threshold),
    }
    summary["density_source"] = dens.source
    return gt, summary


def resolution_warnings(cfg: DiagnoseConfig, n_tokens: int) -> list[str]:
    """A warning per class threshold the window is too short to resolve."""
    resolvable = RESOLVE_FIRINGS / n_tokens
    return [
        f"The {name} threshold {thr:g} is below what the window can resolve "
        f"({RESOLVE_FIRINGS} firings in {n_tokens} tokens = {resolvable:.3g}): a feature below it "
        f"fired a few times or none, so the {name} count is not reported. Use more tokens "
        "(--min-window-tokens, or --cache with --tokens) or a higher threshold."
        for name, thr in (("ultra-rare", cfg.ultra_rare_threshold), ("dead", cfg.dead_threshold))
        if 0 < thr < resolvable
    ]


class Logits(NamedTuple):
    top: TopLogits | None  # top and bottom tokens per feature (None: not computed)
    vocab: list[str]  # the token texts the ids index
    info: dict  # summary.json's "logit_weights"


def logit_weights_step(
    cfg: DiagnoseConfig,
    model,
    meta: dict,
    W_dec: torch.Tensor,
    vocab: list[str],
    warnings: list[str],
) -> Logits:
    """Top and bottom logit tokens of every feature (when --logits and the site has a path)."""
    if not cfg.logits:
        return Logits(None, vocab, {"computed": False})
    assert model is not None
    top, info, warning = run_logit_tokens(model, meta, W_dec, cfg.n_logit_tokens, cfg.ln_scale)
    if warning:
        warnings.append(warning)
    if info.get("recipe") == "logits":  # the decoder rows are logits: ids index W_dec's columns
        vocab = vocab_strings(model.tokenizer, W_dec.shape[1])
    return Logits(top, vocab, info)


def build_summary(
    cfg: DiagnoseConfig,
    inp: RunInputs,
    dens: Density,
    classes: torch.Tensor,
    geometry: dict,
    trajectory_summary: dict,
    logits: Logits,
    chosen: list[int],
    warnings: list[str],
) -> dict:
    """summary.json."""
    hist, metrics, d_sae = inp.history, inp.metrics, len(classes)
    n_cls: dict = {name: int((classes == c).sum()) for c, name in enumerate(CLASSES)}
    frac: dict = {k: v / d_sae for k, v in n_cls.items()}
    resolvable = {
        "dead": True,  # zero firings is always seen
        "ultra_rare": resolves(dens.n_tokens, cfg.ultra_rare_threshold),
    }
    if not resolvable["ultra_rare"]:  # below it, mostly features that fired once: not a density
        n_cls["ultra_rare"] = frac["ultra_rare"] = None
    if dens.fresh is not None:
        l0, fvu, l0_src = dens.fresh.l0, dens.fresh.fvu, "fresh measurement on the cache rows"
    else:
        l0, fvu = metrics.get("l0"), metrics.get("fvu")
        l0_src = f"metrics.jsonl, last line (step {metrics.get('step')})" if metrics else None
    history = None
    if hist is not None:
        n_w = len(hist.counts)
        history = {
            "n_windows": n_w,
            "window_tokens_min": int(hist.window_tokens.min()) if n_w else None,
            "window_tokens_max": int(hist.window_tokens.max()) if n_w else None,
            "density_window": hist.metadata.get("density_window"),
            "n_resampling_events": len(hist.resample_steps),
        }
    return {
        "run": str(inp.run),
        "cache": cfg.cache,
        "n_features": d_sae,
        "weights_dtype": inp.meta.get("weights_dtype"),
        "compute_dtype": str(inp.sae.W_enc.dtype).removeprefix("torch."),
        "counts": n_cls,
        "fractions": frac,
        "resolvable": resolvable,
        "held_out": int(inp.control.sum()),
        "thresholds": {"dead": cfg.dead_threshold, "ultra_rare": cfg.ultra_rare_threshold},
        "density_source": dens.source,
        "window": dens.window,
        "resolvable_threshold": RESOLVE_FIRINGS / dens.n_tokens,  # that many firings
        "history": history,
        "l0": l0,
        "fvu": fvu,
        "l0_fvu_source": l0_src,
        "trajectory_test": trajectory_summary,
        "geometry": geometry,
        "logit_weights": logits.info,
        "shown_features": chosen,
        "warnings": warnings,
        "csv_conventions": (
            "log10_density is -inf for zero firings; empty field = not computable; trajectory is "
            "the trajectory test's outcome (falling, settled, died, unresolved, not_tested) for "
            "trajectory_group; trend, trend_low and trend_high are its log-linear trend and "
            "1 - 2*alpha interval in decades per 1e7 tokens relative to the live baseline"
        ),
    }


def input_sign(meta: dict, model, dens: Density) -> dict:
    """Whether the SAE's inputs are non-negative (so the negative-orthant check means
    something): measured on the cache rows with --cache; otherwise known for mlp_post of a model
    whose MLP activation is ReLU (or not); else unknown (None)."""
    site = meta.get("site")
    if dens.fresh is not None:
        x_min = dens.fresh.x_min
        how = f"the smallest of the {dens.n_tokens} measured cache rows' values is {x_min:.4g}"
        return {"non_negative": x_min >= 0, "how": how}
    act = getattr(getattr(model, "cfg", None), "act_fn", None)
    if site == "mlp_post" and act is not None:
        return {"non_negative": act == "relu", "how": f"mlp_post of a model whose act_fn is {act}"}
    if site == "mlp_post":
        return {"non_negative": None, "how": "unknown without the run's model: pass --cache"}
    return {"non_negative": False, "how": f"site {site}: signed activations"}


def margin_of(inp: RunInputs, dens: Density) -> tuple[np.ndarray, str | None]:
    """Each feature's pre-activation margin (its largest pre-activation; NaN: unknown) and
    where it came from: the rows measured with --cache, else the last row of the run's
    mechanisms.safetensors (one batch at the end of training)."""
    n = len(inp.control)
    if dens.fresh is not None:
        return dens.fresh.margin.double().numpy(), f"the {dens.n_tokens} measured cache rows"
    m = inp.mechanisms
    if m is not None and len(m["window_end_step"]):
        step = int(m["window_end_step"][-1])
        src = f"mechanisms.safetensors, the last window's last batch (step {step})"
        return m["margin"][-1].double().numpy(), src
    return np.full(n, np.nan), None


def class_line(summary: dict) -> str:
    """The line "N features: a dead, b ultra-rare, c live", the ultra-rare count only where the
    window resolves it."""
    c = summary["counts"]
    if c["ultra_rare"] is None:
        thr = summary["thresholds"]["ultra_rare"]
        rare = f"ultra-rare not resolvable (the window resolves densities >= {summary['resolvable_threshold']:.3g} at 10 firings, not < {thr:g})"
        dead = f"{c['dead']} with zero firings"
    else:
        rare, dead = f"{c['ultra_rare']} ultra-rare", f"{c['dead']} dead"
    return f"{summary['n_features']} features: {dead}, {rare}, {c['live']} live"


def diagnose(cfg: DiagnoseConfig) -> Report:
    """Write report.html, features.csv and summary.json into cfg.out; returns the Report."""
    from ..sae.lock import DirLock, check_not_written

    t0 = time.time()
    out = check_inputs(cfg)
    check_not_written(cfg.run, "run", ("train",))  # (a report is not made of half a run)
    with DirLock(out, "diagnose"):  # one writer per report dir
        check_out(cfg)  # again, under the lock: another diagnose may have just written it
        return _diagnose(cfg, out, t0)


def _diagnose(cfg: DiagnoseConfig, out: Path, t0: float) -> Report:
    inp = load_inputs(cfg)
    warnings: list[str] = []
    model, vocab = load_run_model(cfg, inp.meta, inp.sae.cfg.d_in, warnings)
    if cfg.cache is not None:
        dens = density_from_cache(cfg, inp)
    elif cfg.synthetic is not None:
        dens = density_from_synthetic(cfg, inp)
    else:
        dens = density_from_history(cfg, inp.history)
    warnings += resolution_warnings(cfg, dens.n_tokens)
    classes = classify(dens.counts, dens.n_tokens, cfg.dead_threshold, cfg.ultra_rare_threshold)
    W_enc, b_enc, W_dec = (
        t.detach().float().cpu() for t in (inp.sae.W_enc, inp.sae.b_enc, inp.sae.W_dec)
    )
    geo = feature_geometry(W_enc, b_enc, W_dec)
    margin, margin_source = margin_of(inp, dens)
    chosen = dens.chosen if dens.chosen is not None else choose_features(cfg, classes, inp.control)
    traj, traj_summary = run_trajectory(cfg, inp.history)
    synthetic = synthetic_run(inp.meta)
    if synthetic:  # no model: nothing to take logit weights or contexts' text from
        logits = Logits(None, [], {"computed": False, "reason": "synthetic activations: no model"})
    else:
        logits = logit_weights_step(cfg, model, inp.meta, W_dec, vocab, warnings)
    vocab = logits.vocab
    neuron_basis = inp.meta.get("site") == "mlp_post"
    inputs = input_sign(inp.meta, model, dens)
    geometry = rare_cluster_geometry(
        W_enc, W_dec, classes, neuron_basis, inp.control, bool(inputs["non_negative"])
    )
    geometry["inputs"] = inputs
    summary = build_summary(
        cfg, inp, dens, classes, geometry, traj_summary, logits, chosen, warnings
    )
    gt, summary["ground_truth"] = ground_truth_step(cfg, inp, dens, classes)
    summary["margin_source"] = margin_source  # features.csv's margin (None: not known)
    contexts = None
    if dens.fresh is not None and dens.rows is not None and not synthetic:
        vocab = vocab or vocab_strings(None, int(dens.rows.tokens.max()) + 1)
        contexts = contexts_text(dens.rows, dens.fresh.top_rows, dens.fresh.top_values, vocab)
    data = ReportData(
        cfg=cfg,
        summary=summary,
        density=(dens.counts.double() / dens.n_tokens).numpy(),
        classes=classes.numpy(),
        geometry=geo,
        control=inp.control.numpy(),
        margin=margin,
        history=inp.history,
        trajectory=traj,
        logits=logits.top,
        vocab=vocab,
        chosen=chosen,
        contexts=contexts,
        warnings=warnings,
        ground_truth=gt,
        metrics=read_metrics(inp.run / "metrics.jsonl"),
        evaluation=read_evaluation(inp.run),
        mechanisms=inp.mechanisms,
    )
    scanned = dashboard_scan(cfg, inp)
    if cfg.overwrite:  # everything is computed: the earlier report goes (none of it stays stale)
        remove_owned(out, "report")
    write_report(out, data, W_dec, scanned)
    print(f"diagnose: {class_line(summary)}; report in {out} ({time.time() - t0:.1f}s)")
    return Report(out)
