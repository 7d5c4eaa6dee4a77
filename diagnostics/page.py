"""report.html: one self-contained page (plotly.js inlined once) assembled from the ReportData
and the figures' panels: the story first (a sentence with the verdict, then FIGURES in order),
the summary table, the chosen features. A click on any plotted feature opens its dashboard."""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from pathlib import Path

from . import figures, scatter, story
from .features import CLASSES
from .figures import Panel
from .report import ReportData, features_csv, jsonable
from .story import num, sci

# Page order: the story (bands, histogram, geometry, training, evaluation, ground truth), then
# the details. A new figure is a function (ReportData -> Panel | None) added here.
FIGURES: tuple[Callable[[ReportData], Panel | None], ...] = (
    story.density_bands,
    story.density_histogram,
    scatter.density_bias_de_3d,
    scatter.projections_2d,
    story.training_curves,
    story.evaluation,
    story.recovery_curve,
    figures.density_heatmap,
    figures.rare_trajectories,
    figures.trajectory_outcomes,
    figures.de_projection_by_class,
    figures.encoder_bias_by_class,
)

# A click on a point that carries a feature index (customdata, or a heat map row "f123") opens
# that feature's dashboard.
CLICK_THROUGH = (
    "<script>document.querySelectorAll('.js-plotly-plot').forEach(function(d){"
    "d.on('plotly_click',function(e){var p=e.points[0],c=p.customdata;"
    "if(Array.isArray(c))c=c[0];if(c===undefined&&typeof p.y==='string'&&p.y[0]==='f')c=parseInt(p.y.slice(1));"
    "if(typeof c==='number'&&isFinite(c))window.location.href='features.html#'+c;});});</script>"
)


def panels(data: ReportData) -> list[Panel]:
    """Every figure the data can draw, in page order."""
    return [p for fig in FIGURES if (p := fig(data)) is not None]


CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:20px auto;padding:0 12px;color:#222}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}
.note{color:#555;font-size:90%}.warn{background:#fff3cd;padding:6px 10px;border-left:4px solid #e0a800}
.err{color:#b00;white-space:pre-wrap}.tok{font-family:monospace;white-space:pre}mark{background:#ffd54f}
.ctx{font-family:monospace;white-space:pre-wrap;font-size:90%}.story{font-size:112%;line-height:1.45}
"""

# Script errors and console.error calls are shown on the page: a broken plot must not fail
# silently (and the browser test reads them from the DOM).
ERROR_CATCHER = (
    "<script>window.saekitErrors=[];function saekitShowErrors(){var d=document.getElementById('js-errors');"
    "if(d){d.textContent=window.saekitErrors.join('\\n');}}"
    "window.addEventListener('error',function(e){window.saekitErrors.push('error: '+e.message);saekitShowErrors();});"
    "var saekitConsoleError=console.error;console.error=function(){window.saekitErrors.push('console.error: '+"
    "Array.prototype.map.call(arguments,String).join(' '));saekitShowErrors();return saekitConsoleError.apply(console,arguments);};"
    "</script>"
)


def head(title: str) -> str:
    """<head> with the error catcher, the CSS and plotly.js (inlined: the page works offline),
    and the start of <body>."""
    from plotly.offline import get_plotlyjs

    return "\n".join(
        [
            f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
            ERROR_CATCHER,
            f"<style>{CSS}</style>",
            f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>",
        ]
    )


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.2f}%"


def _geometry_rows(g: dict) -> list[tuple[str, object]]:
    rows: list[tuple[str, object]] = []
    for name in ("ultra_rare", "control", "live"):
        r = g.get(name)
        if r is None or r["encoder_mean_cosine_to_mean_direction"] is None:
            continue
        rows.append(
            (
                f"{name}: encoder mean cosine to the mean direction / top singular value's share (random: {r['encoder_top_singular_share_random']:.3f})",
                f"{r['encoder_mean_cosine_to_mean_direction']:.3f} / {r['encoder_top_singular_share']:.3f}",
            )
        )
        if r.get("encoder_negative_mass_mean") is not None:
            rows.append(
                (
                    f"{name}: encoder's squared norm in the negative orthant, mean / median (random: 0.5); all ≤ 0",
                    f"{r['encoder_negative_mass_mean']:.3f} / {r['encoder_negative_mass_median']:.3f}; {_pct(r['encoder_all_nonpositive_fraction'])}",
                )
            )
        if r.get("decoder_top10_neuron_mass") is not None:
            rows.append(
                (
                    f"{name}: decoder mass in top 10 neurons / L1÷L2÷√d",
                    f"{r['decoder_top10_neuron_mass']:.3f} / {r['decoder_l1_l2_ratio_over_sqrt_d']:.3f}",
                )
            )
    return rows


def _ground_truth_rows(gt: dict | None) -> list[tuple[str, object]]:
    """A synthetic run's scoring against its true features (summary.json's ground_truth)."""
    if not gt:
        return []
    m, rare, ultra = gt["matching"], gt["rare"]["live"], gt["ultra_rare"]
    curve = ", ".join(
        f"{b['p_lo']:.0e}: {b['n_matched']}/{b['n_true']}" for b in gt["recovery_curve"]
    )
    share = "n/a" if ultra["share_real"] is None else _pct(ultra["share_real"])
    return [
        ("ground truth: matched", f"{m['n_matched']} of {m['n_true']} true features (decoder cosine ≥ {m['cos_threshold']:g}, {m['method']})"),
        ("ground truth: recovery by true frequency", curve),
        (f"ground truth: live features below {gt['rare']['density_below']:g}",
         f"{rare['n']}: {rare['real_rare']} real rare, {rare['absorbed']} absorbed, {rare['artifact']} artifact, "
         f"{rare['unresolved']} unresolved, {rare['imprecise']} imprecise"),
        ("ground truth: ultra-rare features that are real", f"{ultra['real_rare']} of {ultra['n']} ({share})"
         + ("" if ultra["resolved"] else "; the window cannot resolve ultra-rare densities")),
    ]  # fmt: skip


def _class_cell(s: dict, k: str) -> str:
    if s["counts"][k] is None:  # a count the window cannot resolve
        return f"not resolvable (the window resolves densities ≥ {s['resolvable_threshold']:.3g}: 10 firings)"
    return f"{s['counts'][k]} ({_pct(s['fractions'][k])})"


def _trajectory_rows(t: dict) -> list[tuple[str, object]]:
    if "counts" not in t:
        return []
    rows: list[tuple[str, object]] = [("trajectory test", t["test"])]
    for g, v in t["by_group"].items():
        cnt = ", ".join(f"{k} {n}" for k, n in v["counts"].items())
        rows.append((f"trajectory test: {g} ({v['n']}; {v['n_tested']} tested)", cnt))
    b = t["baseline"]
    if b["n_features"]:
        trend = b["trend_decades_per_1e7_tokens"]
        trend_txt = "" if trend is None else f", trend {trend:.3g} decades per 1e7 tokens"
        rows.append(("trajectory test: live baseline", f"{b['n_features']} features{trend_txt}"))
    rows.append(
        (
            "trajectory test: settings",
            f"alpha {t['alpha']:g} (Benjamini-Hochberg), settled band ±{t['band_decades_per_1e7_tokens']:g} "
            f"decades per 1e7 tokens, burn-in {t['burn_in_tokens']} tokens, "
            f"{t['windows']['n']} windows of {t['windows']['tokens_min']}-{t['windows']['tokens_max']} tokens",
        )
    )
    return rows


def story_head(s: dict) -> str:
    """The page's opening: what was found, in two sentences (classes, control group, ground
    truth), and the trajectory test's verdict."""
    c = s["counts"]
    rare = (
        f"ultra-rare (< {s['thresholds']['ultra_rare']:g}) not resolvable in {s['window']['tokens']:,} tokens"
        if c["ultra_rare"] is None
        else f"{c['ultra_rare']} ultra-rare (< {s['thresholds']['ultra_rare']:g})"
    )
    found = f"{s['n_features']:,} features: {c['dead']} dead, {rare}, {c['live']} live"
    found += f"; held-out control group {s['held_out']}" if s["held_out"] else "; no control group"
    gt = s.get("ground_truth")
    if gt:
        r = gt["rare"]["live"]
        found += (
            f". Against the true features: of {r['n']} live features below "
            f"{gt['rare']['density_below']:g}, {r['real_rare']} are real rare, {r['absorbed']} "
            f"absorbed and {r['artifact']} artifacts"
        )
    verdict = s["trajectory_test"]["verdict"]
    return (
        f"<p class='story'>{html.escape(found)}.</p>"
        f"<p class='story'><b>Trajectory test:</b> {html.escape(verdict)}</p>"
        "<p class='note'><a href='features.html'>Every feature's dashboard</a> "
        "(search by index or token); click any point in a plot to open its feature.</p>"
    )


def summary_table(s: dict) -> str:
    """The warnings and the summary table."""
    rows: list[tuple[str, object]] = [("features", s["n_features"])]
    rows += [(k, _class_cell(s, k)) for k in CLASSES]
    rows += [
        ("held-out control group", s["held_out"]),
        (
            "thresholds",
            f"dead: density ≤ {s['thresholds']['dead']:g}; ultra-rare: below {s['thresholds']['ultra_rare']:g}",
        ),
        (
            "density measured on",
            f"{s['density_source']} ({s['window']['tokens']} tokens; resolves densities ≥ {s['resolvable_threshold']:.3g}, 10 firings)",
        ),
        ("L0", num(s["l0"])),
        ("FVU", num(s["fvu"])),
        ("L0/FVU from", s["l0_fvu_source"]),
    ]
    rows += _geometry_rows(s["geometry"])
    t = s["trajectory_test"]
    rows += _trajectory_rows(t)
    li = s["logit_weights"]
    if li.get("computed"):
        rows.append(
            (
                "logit weights",
                f"{li['recipe']} recipe, ln_final scale {li['ln_final_scale']:.4g} ({li['ln_final_scale_source']})",
            )
        )
    rows += _ground_truth_rows(s.get("ground_truth"))
    body = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows
    )
    warn = "".join(f"<p class='warn'>{html.escape(w)}</p>" for w in s["warnings"])
    return f"<h2>Summary</h2>{warn}<table>{body}</table>"


def panel_html(k: int, panel: Panel) -> str:
    """A panel's heading, note and plot div (id plot-k; plotly.js comes from the head)."""
    parts = [f"<h2>{html.escape(panel.title)}</h2>"]
    if panel.note:
        parts.append(f"<p class='note'>{panel.note}</p>")
    if panel.body:
        parts.append(panel.body)
    if panel.figure is None:
        return "\n".join(parts)
    parts.append(
        panel.figure.to_html(
            full_html=False,
            include_plotlyjs=False,
            div_id=f"plot-{k}",
            config={"displaylogo": False},
        )
    )
    return "\n".join(parts)


def _logit_table(data: ReportData, i: int) -> str:
    top = data.logits
    assert top is not None
    rows = []
    for ids, vals, label in (
        (top.top_ids[i], top.top_values[i], "top"),
        (top.bottom_ids[i], top.bottom_values[i], "bottom"),
    ):
        cells = "".join(
            f"<td><span class='tok'>{html.escape(repr(data.vocab[t]))}</span> {v:+.3f}</td>"
            for t, v in zip(ids.tolist(), vals.tolist(), strict=True)
        )
        rows.append(f"<tr><th>{label}</th>{cells}</tr>")
    return f"<table>{''.join(rows)}</table>"


def chosen_features(data: ReportData) -> str:
    """A section per chosen feature: its logit weights and top-activating contexts."""
    out = ["<h2>Chosen features: logit weights and top-activating contexts</h2>"]
    caveat = data.summary["logit_weights"].get("direct_path_caveat")
    if caveat:
        out.append(f"<p class='note'>{html.escape(caveat)}</p>")
    if not data.chosen:
        out.append("<p>No features to show.</p>")
    for j, i in enumerate(data.chosen):
        out.append(
            f"<h3><a href='features.html#{i}'>feature {i}</a>: {CLASSES[data.classes[i]]}, "
            f"density {sci(float(data.density[i]))}</h3>"
        )
        if data.logits is not None:
            out.append(_logit_table(data, i))
        if data.contexts is not None and j < len(data.contexts):
            items = [
                f"<tr><td>{num(c.activation)}</td><td class='ctx'>{html.escape(c.before)}"
                f"<mark title='activation {num(c.activation)}'>{html.escape(c.token)}</mark>"
                f"{html.escape(c.after)}</td></tr>"
                for c in data.contexts[j]
            ]
            out.append(
                "<table><tr><th>activation</th><th>context</th></tr>" + "".join(items) + "</table>"
                if items
                else "<p class='note'>No activations in the measured rows.</p>"
            )
    return "\n".join(out)


def render_page(data: ReportData, panels: Sequence[Panel]) -> str:
    """The whole of report.html."""
    parts = [
        head(f"saekit report: {Path(data.summary['run']).name}"),
        "<pre id='js-errors' class='err'></pre>",
        # the run dir's name reads as a title; its full path (a temp dir, a home) goes on hover
        f"<h1 title='{html.escape(data.summary['run'])}'>saekit report: "
        f"{html.escape(Path(data.summary['run']).name)}</h1>",
        story_head(data.summary),
    ]
    k = 0  # plot divs are numbered plot-0, plot-1, ... (panels without a figure have none)
    for p in panels:
        parts.append(panel_html(k, p))
        k += p.figure is not None
    parts.append(summary_table(data.summary))
    parts.append(chosen_features(data))
    parts.append(CLICK_THROUGH)
    parts.append("<script>saekitShowErrors();</script></body></html>")
    return "\n".join(parts)


def read_evaluation(run: Path) -> dict | None:
    """The run's eval.json (None when absent or unreadable: the page says so)."""
    import json

    try:
        return json.loads((run / "eval.json").read_text())
    except (OSError, ValueError):
        return None


def write_report(out: Path, data: ReportData, W_dec=None, scanned=None) -> None:
    """features.csv, summary.json, report.html and (given the decoder) the feature dashboards,
    each file written atomically."""
    from ..sae.io import atomic_write_bytes, atomic_write_json

    table = features_csv(data)
    page = render_page(data, panels(data))
    files = {}
    if W_dec is not None:  # built before anything is written: a failure leaves no half report
        from .dashboard import dashboard_files

        files = dashboard_files(data, W_dec, scanned, data.cfg.cache)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "features.csv", table.encode())
    atomic_write_json(out / "summary.json", jsonable(data.summary))
    for name, body in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / name, body)
    atomic_write_bytes(out / "report.html", page.encode())
