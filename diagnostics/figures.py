"""The report's figures: one function per figure, each taking the ReportData and returning a
`Panel` (title, plotly figure, note), or None when the run has nothing to draw it from.

The story panels come first (diagnostics/story.py, scatter.py); page.py's FIGURES lists every
figure in page order: a new figure is a new function added there. Each figure that samples
features draws its own sample with --seed, independent of which other figures run.
"""

from __future__ import annotations

import html
import math
from typing import Any, NamedTuple

import numpy as np

from .features import CLASSES, ULTRA_RARE
from .report import ReportData

CLASS_COLOURS = {"dead": "#7f7f7f", "ultra_rare": "#d62728", "live": "#1f77b4"}
OUTCOME_COLOURS = {
    "falling": "#d62728",
    "settled": "#2ca02c",
    "died": "#000000",
    "unresolved": "#bcbd22",
}
MAX_SCATTER = 20_000  # points in the 3-D scatter
MAX_HEAT_ROWS = 500  # features in the heat map (evenly spaced ranks when more): ~1 per pixel row
MAX_HEAT_COLS = 300  # windows (adjacent windows pooled when more)
MAX_LINES = 20  # trajectories per group in the line plots
NO_HISTORY = "No density history in the run dir: nothing to draw over training."
LAYOUT = dict(template="plotly_white", height=420, margin=dict(l=60, r=20, t=50, b=50))


class Panel(NamedTuple):
    title: str  # the section heading
    figure: Any  # plotly.graph_objects.Figure, or None: the note says why there is nothing to draw
    note: str  # HTML shown under the heading ("" for none)
    body: str = ""  # HTML shown under the note (a table)


def log_density_plot(data: ReportData) -> tuple[np.ndarray, float]:
    """log10 density per feature with dead features at `floor`, half a decade below what the
    window resolves (so they show on a log axis), and that floor."""
    with np.errstate(divide="ignore"):
        logd = np.log10(data.density)
    floor = math.log10(1.0 / data.summary["window"]["tokens"]) - 0.5
    return np.where(np.isfinite(logd), logd, floor).astype(np.float32), floor


def _pool_windows(hist, max_cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def event_shapes(steps: np.ndarray) -> list[dict]:
    """Dotted vertical lines at the (first 100) resampling events."""
    line = dict(color="#999", dash="dot", width=1)
    return [
        dict(type="line", xref="x", yref="paper", x0=s, x1=s, y0=0, y1=1, line=line)
        for s in steps[:100].tolist()
    ]


def density_heatmap(data: ReportData) -> Panel | None:
    """Every feature's (or an even sample's) log10 density per training window."""
    import plotly.graph_objects as go

    hist = data.history
    if hist is None or not len(hist.counts):
        return Panel("Density over training", None, NO_HISTORY)
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
        shapes=event_shapes(hist.resample_steps.numpy()),
        **{**LAYOUT, "height": 500},
    )
    f.update_yaxes(showticklabels=False)
    note = "Blank cells: zero firings in that window. Dotted lines: resampling events."
    if data.n_features > MAX_HEAT_ROWS:
        note += f" {MAX_HEAT_ROWS} of {data.n_features} features shown (evenly spaced in the density ranking)."
    if len(hist.counts) > MAX_HEAT_COLS:
        note += f" Adjacent windows pooled into {MAX_HEAT_COLS} columns."
    return Panel("Density over training", f, note)


def display_windows(hist, min_tokens: int) -> np.ndarray:
    """Start index of each display window: adjacent training windows merged, from the end
    backwards, until each holds >= min_tokens tokens, never across a resampling event (so a
    feature's line never mixes two of its lives)."""
    tok = hist.window_tokens.numpy()
    end = hist.window_end_step.numpy()
    events = hist.resample_steps.numpy()
    starts: list[int] = []
    acc = 0
    for w in range(len(tok) - 1, -1, -1):
        acc += int(tok[w])
        event_before = w > 0 and bool(((events >= end[w - 1]) & (events < end[w])).any())
        if acc >= min_tokens or event_before or w == 0:
            starts.append(w)
            acc = 0
    return np.array(starts[::-1], dtype=np.int64)


def _pooled(data: ReportData, cols: np.ndarray, used: np.ndarray | None):
    """(end steps [W'], tokens [W'], log10 density [W', len(cols)]) over display windows of at
    least 3 / rare-threshold tokens (a feature at the rare threshold expects 3 firings in each),
    counting only the windows `used` [W, F] marks (None: all); NaN (a gap) for none or zero."""
    hist = data.history
    starts = display_windows(hist, math.ceil(3 / data.cfg.rare_threshold))
    tok = hist.window_tokens.numpy()[:, None].astype(np.float64)
    c = hist.counts.numpy()[:, cols].astype(np.float64)
    t = np.broadcast_to(tok, c.shape)
    if used is not None:
        c, t = np.where(used[:, cols], c, 0.0), np.where(used[:, cols], t, 0.0)
    pc, pt = np.add.reduceat(c, starts, axis=0), np.add.reduceat(t, starts, axis=0)
    ends = np.append(starts[1:], len(tok)) - 1
    with np.errstate(divide="ignore", invalid="ignore"):
        ld = np.log10(pc / pt)
    ld = np.where(np.isfinite(ld), ld, np.nan).astype(np.float32)
    return hist.window_end_step.numpy()[ends], np.add.reduceat(tok[:, 0], starts), ld


def rare_trajectories(data: ReportData) -> Panel | None:
    """Density over training of a sample of ultra-rare and of control-group features."""
    import plotly.graph_objects as go

    title = "Rare and control-group features over training"
    hist = data.history
    if hist is None or not len(hist.counts):
        return Panel(title, None, NO_HISTORY)
    rng = np.random.default_rng(data.cfg.seed)
    rare = np.flatnonzero((data.classes == ULTRA_RARE) & ~data.control)
    groups = (
        ("ultra-rare", np.sort(rng.permutation(rare)[:MAX_LINES]), "#d62728"),
        (
            "control group",
            np.sort(rng.permutation(np.flatnonzero(data.control))[:MAX_LINES]),
            "#9467bd",
        ),
    )
    f = go.Figure()
    tok = None
    for gname, idx, colour in groups:
        if not len(idx):
            continue
        steps, tok, ld = _pooled(data, idx, None)
        for j, i in enumerate(idx.tolist()):
            f.add_scatter(
                x=steps,
                y=ld[:, j],
                mode="lines+markers",
                line=dict(color=colour, width=1),
                marker=dict(size=3),
                name=gname,
                legendgroup=gname,
                showlegend=j == 0,
                hovertemplate=f"feature {i}<br>step %{{x}}<br>log10 density %{{y:.2f}}<extra></extra>",
                customdata=np.full(len(steps), i),
            )
    f.update_layout(
        xaxis_title="training step",
        yaxis_title="log10 density",
        shapes=event_shapes(hist.resample_steps.numpy()),
        **LAYOUT,
    )
    span = "" if tok is None else f" ({int(tok.min())}-{int(tok.max())} tokens each)"
    note = (
        f"Up to {MAX_LINES} features per group, over training windows pooled to resolve the rare "
        f"threshold{span}; gaps are windows with zero firings; dotted lines are resampling events."
    )
    if not f.data:
        return Panel(title, None, "No ultra-rare or control-group features to draw.")
    return Panel(title, f, note)


def trajectory_outcomes(data: ReportData) -> Panel | None:
    """A sample of the trajectory test's members per outcome, each over the windows it tested."""
    import plotly.graph_objects as go

    from .trajectory import OUTCOMES

    title = "Trajectory test: falling, settled, died, unresolved"
    t = data.trajectory
    if t is None:
        return Panel(title, None, NO_HISTORY)
    rng = np.random.default_rng(data.cfg.seed)
    f = go.Figure()
    for outcome in OUTCOMES:
        idx = np.sort(rng.permutation(np.flatnonzero(t.outcome == outcome))[:MAX_LINES])
        if not len(idx):
            continue
        steps, _, ld = _pooled(data, idx, t.used)
        for j, i in enumerate(idx.tolist()):
            trend = "" if np.isnan(t.trend[i]) else (
                f", trend {t.trend[i]:.3g} [{t.trend_low[i]:.3g}, {t.trend_high[i]:.3g}] "
                "decades per 1e7 tokens"
            )  # fmt: skip
            f.add_scatter(
                x=steps,
                y=ld[:, j],
                mode="lines+markers",
                line=dict(color=OUTCOME_COLOURS[outcome], width=1),
                marker=dict(size=3),
                name=outcome,
                legendgroup=outcome,
                showlegend=j == 0,
                hovertemplate=f"feature {i} ({t.group[i]}): {outcome}{trend}<br>step %{{x}}<br>log10 density %{{y:.2f}}<extra></extra>",
                customdata=np.full(len(steps), i),
            )
    f.update_layout(xaxis_title="training step", yaxis_title="log10 density", **LAYOUT)
    note = (
        f"Up to {MAX_LINES} features per outcome, each over the windows the test used (after "
        "its last resampling or hold-out, its burn-in and, for rare features, the windows that "
        f"chose them). {html.escape(data.summary['trajectory_test']['verdict'])}"
    )
    if not f.data:
        return Panel(
            title,
            None,
            "The trajectory test had no members to draw: "
            + html.escape(data.summary["trajectory_test"]["verdict"]),
        )
    return Panel(title, f, note)


def _class_histogram(data: ReportData, values: np.ndarray, title: str, x_title: str) -> Panel:
    """Overlaid histograms of `values` [F], one per class, normalised within the class."""
    import plotly.graph_objects as go

    f = go.Figure()
    for c, name in enumerate(CLASSES):
        sel = data.classes == c
        if sel.any():
            f.add_histogram(
                x=values[sel],
                name=f"{name} ({int(sel.sum())})",
                marker_color=CLASS_COLOURS[name],
                nbinsx=80,
                histnorm="probability",
            )
    f.update_layout(
        barmode="overlay", xaxis_title=x_title, yaxis_title="fraction of class", **LAYOUT
    )
    f.update_traces(opacity=0.7)
    return Panel(title, f, "")


def de_projection_by_class(data: ReportData) -> Panel:
    de = data.geometry.de_projection.numpy().astype(np.float32)
    return _class_histogram(data, de, "D/E projection per class", "D/E projection")


def encoder_bias_by_class(data: ReportData) -> Panel:
    bias = data.geometry.encoder_bias.numpy().astype(np.float32)
    return _class_histogram(data, bias, "Encoder bias per class", "encoder bias")
