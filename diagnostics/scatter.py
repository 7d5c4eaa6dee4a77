"""The geometry panels: the 3-D scatter of log density x encoder bias x D/E projection (Anthropic
2023's separation of the ultra-rare cluster) with a selector of what colours the points (class,
trajectory outcome, control group, and for a synthetic run the ground truth), and its three 2-D
projections. Every point carries its feature index (customdata): a click opens its dashboard."""

from __future__ import annotations

import html

import numpy as np

from .features import CLASSES
from .figures import CLASS_COLOURS, LAYOUT, MAX_SCATTER, OUTCOME_COLOURS, Panel, log_density_plot
from .report import ReportData

GT_COLOURS = {
    "real_rare": "#2ca02c",
    "absorbed": "#ff7f0e",
    "artifact": "#d62728",
    "unresolved": "#bcbd22",
    "imprecise": "#9467bd",
    "": "#c7c7c7",
}


def colourings(data: ReportData) -> list[tuple[str, np.ndarray, dict[str, str]]]:
    """(name, label per feature [F] str, colour per label) for each way of colouring points."""
    out = [("class", np.array(CLASSES, dtype=object)[data.classes], CLASS_COLOURS)]
    if data.trajectory is not None:
        outcome = np.where(data.trajectory.outcome == "not_tested", "not tested",
                           data.trajectory.outcome).astype(object)  # fmt: skip
        out.append(("trajectory outcome", outcome, {**OUTCOME_COLOURS, "not tested": "#d9d9d9"}))
    control = np.where(data.control, "control group", "other").astype(object)
    out.append(("control group", control, {"control group": "#9467bd", "other": "#d9d9d9"}))
    if data.ground_truth is not None:
        gt = np.asarray(data.ground_truth.label, dtype=object)
        out.append(("ground truth (< 1e-5)", gt, GT_COLOURS))
    return out


def _points(data: ReportData) -> np.ndarray:
    n = data.n_features
    if n <= MAX_SCATTER:
        return np.arange(n)
    return np.sort(np.random.default_rng(data.cfg.seed).choice(n, MAX_SCATTER, replace=False))


def _hover_tokens(data: ReportData) -> np.ndarray:
    """Per feature, its top 3 logit tokens ("" without logit weights), kept short: this text is
    most of the page's weight at 16k features."""
    if data.logits is None:
        return np.full(data.n_features, "", dtype=object)
    return np.array(
        [
            html.escape(" ".join(f"'{data.vocab[t]}'" for t in row[:3]), quote=False)
            for row in data.logits.top_ids.tolist()
        ],
        dtype=object,
    )


def density_bias_de_3d(data: ReportData) -> Panel:
    """The 3-D scatter, one trace per label of each colouring; buttons switch colourings."""
    import plotly.graph_objects as go

    idx = _points(data)
    logd, _ = log_density_plot(data)
    bias = data.geometry.encoder_bias.numpy().astype(np.float32)
    de = data.geometry.de_projection.numpy().astype(np.float32)
    hover = _hover_tokens(data)
    tok = "<br>top tokens: %{text}" if data.logits is not None else ""
    f = go.Figure()
    visible: list[list[bool]] = []
    for k, (_, label, colours) in enumerate(colourings(data)):
        first = len(f.data)
        for value, colour in colours.items():
            sel = idx[label[idx] == value]
            if not len(sel):
                continue
            f.add_scatter3d(
                x=logd[sel], y=bias[sel], z=de[sel], mode="markers", visible=k == 0,
                name=value or "not rare", marker=dict(size=2.5, color=colour),
                # the top tokens only in the first colouring: they are most of the page's weight
                text=hover[sel].tolist() if tok and k == 0 else None,
                customdata=sel.astype(np.int32),
                hovertemplate=f"feature %{{customdata}} ({value or 'not rare'}){tok if k == 0 else ''}"
                "<br>log10 density %{x:.2f}<br>bias %{y:.3g}<br>D/E %{z:.3g}<extra></extra>",
            )  # fmt: skip
        visible.append([first <= j < len(f.data) for j in range(10_000)])
    n = len(f.data)
    names = [c[0] for c in colourings(data)]
    buttons = [
        dict(label=f"colour: {nm}", method="restyle", args=[{"visible": v[:n]}])
        for nm, v in zip(names, visible, strict=True)
    ]
    f.update_layout(
        scene=dict(
            xaxis_title="log10 density", yaxis_title="encoder bias", zaxis_title="D/E projection"
        ),
        updatemenus=[dict(buttons=buttons, direction="down", x=0, y=1.12, xanchor="left")],
        **{**LAYOUT, "height": 620},
    )
    note = (
        "Drag to rotate; the menu chooses what colours the points; click a point for its "
        "dashboard. Dead features sit at the left wall."
    )
    if data.n_features > MAX_SCATTER:
        note += f" A random {MAX_SCATTER:,} of {data.n_features:,} features."
    return Panel("Log density × encoder bias × D/E projection", f, note)


def projections_2d(data: ReportData) -> Panel:
    """The 3-D scatter's three 2-D projections, coloured by class."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    idx = _points(data)
    logd, _ = log_density_plot(data)
    cols = {
        "log10 density": logd,
        "encoder bias": data.geometry.encoder_bias.numpy().astype(np.float32),
        "D/E projection": data.geometry.de_projection.numpy().astype(np.float32),
    }
    pairs = (("log10 density", "encoder bias"), ("log10 density", "D/E projection"),
             ("encoder bias", "D/E projection"))  # fmt: skip
    f = make_subplots(rows=1, cols=3, horizontal_spacing=0.07)
    for j, (a, b) in enumerate(pairs):
        for c, name in enumerate(CLASSES):
            sel = idx[data.classes[idx] == c]
            if not len(sel):
                continue
            f.add_trace(
                go.Scattergl(
                    x=cols[a][sel], y=cols[b][sel], mode="markers", name=name, legendgroup=name,
                    showlegend=j == 0, marker=dict(size=3, color=CLASS_COLOURS[name], opacity=0.6),
                    customdata=sel.astype(np.int32),
                    hovertemplate=f"feature %{{customdata}} ({name})<br>{a} %{{x:.3g}}<br>{b} %{{y:.3g}}<extra></extra>",
                ),
                row=1, col=j + 1,
            )  # fmt: skip
        f.update_xaxes(title_text=a, row=1, col=j + 1)
        f.update_yaxes(title_text=b, row=1, col=j + 1)
    f.update_layout(**{**LAYOUT, "height": 380})
    return Panel("The same, in 2-D projections", f, "Click a point for its dashboard.")
