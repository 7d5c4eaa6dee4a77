"""The report's first panels, the rare-feature story at a glance: features per density band over
training, the density histogram on a fixed axis, training curves, the evaluation and, for a
synthetic run, the recovery of true features. Each returns a `Panel`; one with nothing to draw
returns a Panel without a figure whose note says why (the page never shows empty axes)."""

from __future__ import annotations

import html
import math

import numpy as np

from ..training.density import RESOLVE_FIRINGS
from .figures import LAYOUT, Panel, display_windows, event_shapes
from .report import ReportData

# Density bands of the band plot: (label, lower bound inclusive, colour); dead is zero firings.
BANDS = (
    ("dead (0 firings)", None, "#7f7f7f"),
    ("below 1e-6", 0.0, "#d62728"),
    ("1e-6 to 1e-4", 1e-6, "#ff7f0e"),
    ("1e-4 to 1e-2", 1e-4, "#2ca02c"),
    ("above 1e-2", 1e-2, "#1f77b4"),
)
HIST_MIN = -8.0  # the histogram's fixed axis: 1e-8 .. 1
DEAD_X = -8.5  # where zero-firing features are drawn, left of the axis' 1e-8


def sci(x: float | None) -> str:
    """A density in scientific notation with 2 significant digits ("3.1e-06"); "" for None."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return "0" if x == 0 else f"{x:.1e}"


def num(x: float | None, digits: int = 3) -> str:
    """A measured number rounded to what it means: 3 significant digits ("0.163")."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}g}"


def band_counts(counts: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """[W, len(BANDS)]: features per density band in each window (counts [W, F], tokens [W])."""
    d = counts / tokens[:, None].astype(np.float64)
    edges = [b[1] for b in BANDS[1:]]
    band = np.where(counts == 0, 0, 1 + np.searchsorted(edges[1:], d, side="right"))
    return np.stack([(band == k).sum(1) for k in range(len(BANDS))], axis=1)


def density_bands(data: ReportData) -> Panel:
    """Stacked areas: how many features sit in each density band, window by window, with the
    resampling events marked."""
    import plotly.graph_objects as go

    title = "Features per density band over training"
    hist = data.history
    if hist is None or not len(hist.counts):
        return Panel(
            title, None, "No density history in the run dir: nothing to draw over training."
        )
    total = int(hist.window_tokens.sum())
    # Pool adjacent windows (never across a resampling) to ~1/20 of training, at most 1e6
    # tokens: each point then resolves a smaller density than one window does.
    starts = display_windows(hist, min(10**6, max(1, total // 20)))
    c = np.add.reduceat(hist.counts.numpy(), starts, axis=0)
    tok = np.add.reduceat(hist.window_tokens.numpy(), starts)
    ends = np.append(starts[1:], len(hist.window_tokens)) - 1
    steps = hist.window_end_step.numpy()[ends]
    n = band_counts(c, tok)
    f = go.Figure()
    for k, (label, _, colour) in enumerate(BANDS):
        f.add_scatter(
            x=steps, y=n[:, k], name=label, mode="lines", stackgroup="bands",
            line=dict(width=0.5, color=colour),
            hovertemplate=f"{label}: %{{y}} features<br>step %{{x}}<extra></extra>",
        )  # fmt: skip
    f.update_layout(
        xaxis_title="training step (window end)",
        yaxis_title="features",
        shapes=event_shapes(hist.resample_steps.numpy()),
        **LAYOUT,
    )
    res = RESOLVE_FIRINGS / tok.max()
    note = (
        f"Each point pools {int(tok.min()):,}-{int(tok.max()):,} tokens, so it resolves densities "
        f"down to {sci(res)} ({RESOLVE_FIRINGS} firings): a feature rarer than that fired a few "
        "times or none in that window. "
        "Dotted lines: resampling events."
    )
    return Panel(title, f, note)


def density_histogram(data: ReportData) -> Panel:
    """log10 density per class on a fixed axis 1e-8..1, dead features in a bar of their own at
    the left, the densities the window cannot resolve shaded."""
    import plotly.graph_objects as go

    from .features import CLASSES
    from .figures import CLASS_COLOURS

    n_tok = data.summary["window"]["tokens"]
    floor = math.log10(RESOLVE_FIRINGS / n_tok)
    with np.errstate(divide="ignore"):
        logd = np.log10(data.density)
    x = np.where(np.isfinite(logd), np.maximum(logd, HIST_MIN), DEAD_X).astype(np.float32)
    f = go.Figure()
    for c, name in enumerate(CLASSES):
        sel = data.classes == c
        if sel.any():
            f.add_histogram(
                x=x[sel], name=f"{name} ({int(sel.sum())})", marker_color=CLASS_COLOURS[name],
                xbins=dict(start=DEAD_X - 0.25, end=0.05, size=0.1),
                hovertemplate="%{y} features<extra></extra>",
            )  # fmt: skip
    ticks = [DEAD_X, *range(-8, 1)]
    f.update_layout(
        barmode="stack",
        xaxis=dict(
            title="density", range=[DEAD_X - 0.3, 0.1], tickvals=ticks,
            ticktext=["0", *(f"1e{t}" if t else "1" for t in range(-8, 1))],
        ),
        yaxis_title="features",
        shapes=[dict(type="rect", xref="x", yref="paper", x0=DEAD_X - 0.3, x1=floor, y0=0,
                     y1=1, fillcolor="#bbb", opacity=0.25, line_width=0, layer="below")],
        annotations=[dict(x=(DEAD_X - 0.3 + floor) / 2, y=1, xref="x", yref="paper",
                          yanchor="bottom", showarrow=False, text="window cannot resolve")],
        **LAYOUT,
    )  # fmt: skip
    note = (
        f"Density over {html.escape(data.summary['density_source'])} ({n_tok:,} tokens). Shaded: "
        f"below {RESOLVE_FIRINGS} firings in {n_tok:,} tokens = {sci(RESOLVE_FIRINGS / n_tok)}, where a "
        "count says little about a density; "
        "features with zero firings are the bar at 0."
    )
    return Panel("Feature density", f, note)


def training_curves(data: ReportData) -> Panel:
    """Loss, L0, FVU and the dead count over training (metrics.jsonl)."""
    from plotly.subplots import make_subplots

    title = "Training curves"
    rows = [m for m in data.metrics if "step" in m]
    if not rows:
        return Panel(title, None, "No metrics.jsonl in the run dir: no training curves to draw.")
    steps = np.array([m["step"] for m in rows])
    keys = (("loss", "loss"), ("l0", "L0"), ("fvu", "FVU"), ("dead", "dead features"))
    f = make_subplots(rows=1, cols=4, subplot_titles=[k[1] for k in keys])
    for j, (key, label) in enumerate(keys):
        y = np.array([np.nan if m.get(key) is None else m[key] for m in rows], dtype=float)
        f.add_scatter(
            x=steps, y=y, mode="lines", name=label, row=1, col=j + 1, showlegend=False,
            hovertemplate=f"step %{{x}}<br>{label} %{{y:.3g}}<extra></extra>",
        )  # fmt: skip
    for ev in data.history.resample_steps.tolist() if data.history is not None else []:
        f.add_vline(x=ev, line=dict(color="#999", dash="dot", width=1))
    f.update_layout(**{**LAYOUT, "height": 300})
    f.update_xaxes(title_text="step")
    return Panel(
        title, f, "Dotted lines: resampling events. The dead count uses the trainer's own window."
    )


def evaluation(data: ReportData) -> Panel:
    """eval.json in a table: reconstruction, and loss recovered and KL when spliced."""
    title = "Evaluation"
    ev = data.evaluation
    if not ev:
        return Panel(title, None, "No eval.json in the run dir: run `saekit evaluate` to add it.")
    rows = [
        ("tokens", f"{ev.get('n_tokens', 0):,}"),
        ("L0", num(ev.get("l0"))),
        ("FVU (pooled)", num(ev.get("fvu_pooled"))),
        ("MSE", num(ev.get("mse"))),
    ]
    if ev.get("spliced"):
        rows += [
            ("CE clean / spliced", f"{num(ev.get('ce_clean'))} / {num(ev.get('ce_spliced'))}"),
            ("loss recovered (vs zero / vs mean ablation)",
             f"{num(ev.get('loss_recovered_zero'))} / {num(ev.get('loss_recovered_mean'))}"),
            ("KL(clean || spliced) per token", num(ev.get("kl_clean_spliced"))),
        ]  # fmt: skip
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    why = ev.get("not_spliced_reason")
    note = html.escape(why.split(", so")[0] + ": no loss recovered or KL.") if why else ""
    return Panel(title, None, note, f"<table>{body}</table>")


def recovery_curve(data: ReportData) -> Panel | None:
    """A synthetic run: recall of true features per decade of true frequency, and the classes
    of the rare SAE features against the truth."""
    import plotly.graph_objects as go

    gt = data.summary.get("ground_truth")
    if not gt:
        return None
    curve = [b for b in gt["recovery_curve"] if b["n_true"]]
    x = [f"{sci(b['p_lo'])}-{sci(b['p_hi'])}" for b in curve]
    f = go.Figure(
        go.Bar(
            x=x, y=[b["recall"] for b in curve],
            text=[f"{b['n_matched']}/{b['n_true']}" for b in curve], textposition="outside",
            hovertemplate="true frequency %{x}<br>recall %{y:.2f} (%{text})<extra></extra>",
        )
    )  # fmt: skip
    f.update_layout(
        xaxis_title="true firing probability", yaxis=dict(title="recall", range=[0, 1.15]), **LAYOUT
    )
    live, m = gt["rare"]["live"], gt["matching"]
    note = (
        f"{m['n_matched']} of {m['n_true']} true features matched (decoder cosine ≥ "
        f"{m['cos_threshold']:g}). Live SAE features below {gt['rare']['density_below']:g}: "
        f"{live['n']}: <b>{live['real_rare']} real rare, {live['absorbed']} absorbed, "
        f"{live['artifact']} artifacts</b>, {live['unresolved']} unresolved, "
        f"{live['imprecise']} imprecise."
    )
    return Panel("Recovery of the true features (synthetic ground truth)", f, note)
