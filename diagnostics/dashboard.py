"""A dashboard for every feature, offline, beside report.html: `features.html` (one viewer page,
its script inlined from dashboard.js) and `features/` (data as JS files, which a page opened from
disk can load where it could not fetch JSON): `index.js` (what the search needs for every
feature) and `f-NNNN.js`, CHUNK features each, loaded when one of their features is shown.

Per feature: class, density, geometry, trajectory outcome and trend, margin; the histogram of its
activations and examples from the top and from three activation quantiles of a uniform sample
of its firings (diagnostics/scan.py), as text with the activating token shaded (cache runs) or
as the true features active in the row (synthetic runs); logit weights; the nearest features by
decoder cosine; its density per display window and its margin over training. Numbers are
rounded to what they mean here; features.csv keeps full precision."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .features import CLASSES
from .report import ReportData
from .scan import HIST_BINS, HIST_HI, HIST_LO, Scan, active_of, context_text

CHUNK = 256  # features per data file
N_NEIGHBOURS = 6
EXACT_NN, PROJ_DIM, N_CANDIDATES = 4096, 32, 32  # nearest(): exact up to EXACT_NN features
N_TOP = 5  # top examples shown
N_PER_QUANTILE = 2  # examples from each third of the sampled firings
OUTCOMES = ("not_tested", "falling", "settled", "died", "unresolved")
ASSET = Path(__file__).with_name("dashboard.js")


def g3(x: float) -> float | None:
    """3 significant digits (None for NaN/inf: JSON has neither)."""
    return float(f"{x:.3g}") if math.isfinite(x) else None


def nearest(W_dec: torch.Tensor, n: int = N_NEIGHBOURS, block: int = 2048):
    """(indices [F, n], cosines [F, n]): each feature's nearest others by decoder cosine. Above
    EXACT_NN features the candidates come from a seeded random projection to PROJ_DIM dims
    (exact cosines of the best N_CANDIDATES re-ranked): a full [F, F, d_in] product would cost
    more than the rest of diagnose."""
    unit = W_dec.float() / W_dec.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    n = min(n, len(unit) - 1)
    approx = len(unit) > EXACT_NN and unit.shape[1] > PROJ_DIM
    if approx:
        g = torch.Generator().manual_seed(0)
        proj = unit @ torch.randn(unit.shape[1], PROJ_DIM, generator=g)
        keys = proj / proj.norm(dim=1, keepdim=True).clamp_min(1e-12)
    else:
        keys = unit
    k = min(N_CANDIDATES if approx else n, len(unit) - 1)
    idx, cos = [], []
    for s in range(0, len(unit), block):
        c = keys[s : s + block] @ keys.T
        c[torch.arange(len(c)), torch.arange(s, s + len(c))] = -2.0  # not itself
        v, i = c.topk(k, dim=1)
        if approx:  # exact cosines of the candidates, best n kept
            v = (unit[s : s + block, None, :] * unit[i]).sum(-1)
            v, j = v.topk(n, dim=1)
            i = i.gather(1, j)
        idx.append(i)
        cos.append(v)
    return torch.cat(idx).numpy(), torch.cat(cos).numpy()


def density_windows(data: ReportData) -> tuple[list[int], np.ndarray]:
    """(end steps, log10 density [W', F] with NaN for zero) over display windows that resolve
    the rare threshold (figures.display_windows)."""
    from .figures import display_windows

    hist = data.history
    if hist is None or not len(hist.counts):
        return [], np.zeros((0, data.n_features))
    starts = display_windows(hist, math.ceil(3 / data.cfg.rare_threshold))
    c = np.add.reduceat(hist.counts.numpy().astype(np.float64), starts, axis=0)
    tok = np.add.reduceat(hist.window_tokens.numpy().astype(np.float64), starts)
    ends = np.append(starts[1:], len(hist.window_tokens)) - 1
    with np.errstate(divide="ignore"):
        ld = np.log10(c / tok[:, None])
    return hist.window_end_step.numpy()[ends].tolist(), np.where(np.isfinite(ld), ld, np.nan)


def examples(scan: Scan, i: int) -> list[tuple[str, float, int]]:
    """(which, activation, row) for feature i: its top rows, then N_PER_QUANTILE from each third
    (upper, middle, lower) of its sampled firings."""
    top = zip(scan.top_val[i].tolist()[:N_TOP], scan.top_row[i].tolist()[:N_TOP], strict=True)
    out = [("top", float(v), int(r)) for v, r in top if r >= 0]
    v, r = scan.sample_val[i], scan.sample_row[i]
    ok = r >= 0
    v, r = v[ok], r[ok]
    order = v.argsort(descending=True)
    thirds = np.array_split(order.numpy(), 3) if len(order) >= 3 else []
    taken = {row for _, _, row in out}
    for name, part in zip(("upper third", "middle third", "lower third"), thirds, strict=False):
        picks = [j for j in part if int(r[j]) not in taken][:N_PER_QUANTILE]
        out += [(name, float(v[j]), int(r[j])) for j in picks]
    return out


def _examples_json(data: ReportData, scan: Scan | None, cache: str | None) -> list[list]:
    """Per feature, its examples as JSON-able lists: [which, activation, before, token, after]
    for a cache, [which, activation, [true feature ids]] for a synthetic source."""
    if scan is None:
        return [[] for _ in range(data.n_features)]
    ex = [examples(scan, i) for i in range(data.n_features)]
    rows = np.array([r for e in ex for _, _, r in e], dtype=np.int64)
    if "context" in scan.where and cache is not None:
        texts = iter(context_text(scan.where, rows, data.vocab))
        return [[[w, g3(a), *next(texts)] for w, a, _ in e] for e in ex]
    active = iter(active_of(scan.where, rows))
    return [[[w, g3(a), next(active)[:8]] for w, a, _ in e] for e in ex]


def feature_records(
    data: ReportData, W_dec: torch.Tensor, scan: Scan | None, cache: str | None
) -> list[dict]:
    """One dict per feature: everything its dashboard shows."""
    geo, t, n = data.geometry, data.trajectory, data.n_features
    nn_idx, nn_cos = nearest(W_dec)
    _, dens = density_windows(data)
    mech = data.mechanisms
    margin = mech["margin"].numpy() if mech is not None and len(mech["window_end_step"]) else None
    ex = _examples_json(data, scan, cache)
    gt = data.ground_truth
    recs = []
    for i in range(n):
        r: dict[str, Any] = {
            "i": i, "c": CLASSES[data.classes[i]], "d": g3(float(data.density[i])),
            "b": g3(float(geo.encoder_bias[i])), "de": g3(float(geo.de_projection[i])),
            "cos": g3(float(geo.enc_dec_cosine[i])), "h": int(data.control[i]),
            "m": g3(float(data.margin[i])), "ex": ex[i],
            "dens": [None if math.isnan(x) else round(x, 2) for x in dens[:, i].tolist()],
        }  # fmt: skip
        if t is not None:
            r["g"], r["o"] = str(t.group[i]), str(t.outcome[i])
            r["t"] = [g3(float(t.trend[i])), g3(float(t.trend_low[i])), g3(float(t.trend_high[i]))]
        if margin is not None:
            r["mg"] = [g3(x) for x in margin[:, i].tolist()]
        if len(nn_idx[i]):
            r["nn"] = [
                [int(j), round(float(c), 3)] for j, c in zip(nn_idx[i], nn_cos[i], strict=True)
            ]
        if data.logits is not None:
            lg = data.logits
            r["lt"] = [
                [data.vocab[j], g3(v)]
                for j, v in zip(lg.top_ids[i].tolist(), lg.top_values[i].tolist(), strict=True)
            ]
            r["lb"] = [
                [data.vocab[j], g3(v)]
                for j, v in zip(
                    lg.bottom_ids[i].tolist(), lg.bottom_values[i].tolist(), strict=True
                )
            ]
        if scan is not None:
            h = scan.hist[i].numpy()
            nz = np.flatnonzero(h)
            r["hs"] = [int(nz[0]), *h[nz[0] : nz[-1] + 1].tolist()] if len(nz) else []
        if gt is not None:
            j = int(gt.matching.true_of[i])
            m = gt.matching  # unmatched: the nearest true feature, below the threshold
            r["gt"] = {"true": j, "p": g3(float(gt.p_true[i])), "label": gt.label[i],
                       "cos": g3(float(m.cos[i] if j >= 0 else m.best_cos[i])),
                       "best": int(m.best_true[i])}  # fmt: skip
        recs.append(r)
    return recs


def index_record(data: ReportData, recs: list[dict], scan: Scan | None, cache: str | None) -> dict:
    """features/index.js: what the viewer needs before any chunk: per feature its class,
    density, outcome and searchable tokens; the shared axes and notes."""
    steps, _ = density_windows(data)
    mech = data.mechanisms
    tokens = []
    for r in recs:
        words = [w for w, _ in r.get("lt", [])[:5]]
        words += [e[3] for e in r["ex"][:3] if len(e) == 5]
        tokens.append(" ".join(w.strip() for w in words if w.strip()))
    base = (data.summary.get("trajectory_test") or {}).get("baseline") or {}
    synthetic = scan is not None and "feature" in scan.where
    return {
        "run": data.summary["run"], "n": data.n_features, "chunk": CHUNK,
        "classes": list(CLASSES),
        "c": [CLASSES.index(r["c"]) for r in recs], "d": [r["d"] for r in recs],
        "o": [OUTCOMES.index(r["o"]) if "o" in r else 0 for r in recs], "outcomes": list(OUTCOMES),
        "tk": tokens, "steps": steps,
        "events": data.history.resample_steps.tolist() if data.history is not None else [],
        "mech_steps": mech["window_end_step"].tolist() if mech is not None else [],
        "hist": [HIST_LO, HIST_HI, HIST_BINS],
        "scanned": scan.n_rows if scan is not None else 0,
        "scan_source": ("fresh rows of the run's synthetic source" if synthetic
                        else f"the cache {cache}" if scan is not None else None),
        "synthetic": synthetic,
        "baseline_trend": base.get("trend_decades_per_1e7_tokens"),
        "tokens_per_step": _tokens_per_step(data),
        "rare_threshold": data.cfg.rare_threshold,
    }  # fmt: skip


def _tokens_per_step(data: ReportData) -> float | None:
    h = data.history
    if h is None or not len(h.window_tokens):
        return None
    return float(h.window_tokens.sum()) / max(int(h.window_end_step[-1]), 1)


VIEWER = """<!DOCTYPE html><html><head><meta charset='utf-8'><title>saekit feature dashboards</title>
<style>{css}</style></head><body>
<pre id='js-errors' class='err'></pre>
<div id='bar'><a href='report.html'>&larr; report</a>
<input id='q' placeholder='feature index or token' size='28'> <button id='go'>search</button>
<span id='nav'></span></div>
<div id='hits'></div><div id='dash'><p class='note'>Type a feature index or a token.</p></div>
<script>window.saekitErrors=[];window.addEventListener('error',function(e){{window.saekitErrors.push('error: '+e.message);
document.getElementById('js-errors').textContent=window.saekitErrors.join('\\n');}});</script>
<script>{js}</script>
<script src='features/index.js' onerror='saekitNoIndex()'></script></body></html>"""

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:16px auto;padding:0 12px;color:#222}
#bar{position:sticky;top:0;background:#fff;padding:6px 0;border-bottom:1px solid #ddd}
.err{color:#b00;white-space:pre-wrap}.note{color:#555;font-size:90%}
table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #ddd;padding:2px 7px;text-align:left;vertical-align:top;font-size:92%}
.ctx{font-family:monospace;white-space:pre-wrap}.hit{display:inline-block;margin:2px 6px;cursor:pointer;color:#15c}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:10px 24px}.box h3{margin:8px 0 4px;font-size:105%}
svg{background:#fafafa;border:1px solid #eee}.tag{padding:1px 6px;border-radius:3px;background:#eee}"""


def dashboard_files(
    data: ReportData, W_dec: torch.Tensor, scan: Scan | None, cache: str | None
) -> dict[str, bytes]:
    """features.html and features/ (index.js, f-NNNN.js): {path in the report dir: bytes}."""
    recs = feature_records(data, W_dec, scan, cache)
    index = index_record(data, recs, scan, cache)
    dump = lambda o: json.dumps(o, separators=(",", ":"), ensure_ascii=False)  # noqa: E731
    files = {"features/index.js": f"saekitIndex({dump(index)});".encode()}
    for s in range(0, len(recs), CHUNK):
        body = f"saekitChunk({s // CHUNK},{dump(recs[s : s + CHUNK])});"
        files[f"features/f-{s // CHUNK:04d}.js"] = body.encode()
    files["features.html"] = VIEWER.format(css=CSS, js=ASSET.read_text()).encode()
    return files
