"""The dying test: do rare features keep losing density, settle, or die?

For each feature in the test (the held-out control group, and features that were rare at some
window since their last resampling) we fit log10 density against training step by ordinary least
squares over the windows of its current segment (since its last resampling) on which it fired
at least once. A window with zero firings has no finite log density,
so it is left out of the fit; a feature with zero firings in all of its last `last_windows`
windows "died completely". Of the rest, a feature "keeps falling" when the OLS slope is
significantly below zero by a one-sided t-test (t = slope / SE(slope), n - 2 degrees of freedom,
p < alpha); otherwise it "settles". Fewer than `min_points` nonzero windows: "too few points".
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

OUTCOMES = ("keeps_falling", "settles", "died", "too_few_points")
TEST_NAME = "one-sided t-test on the OLS slope of log10 density against training step"


class LogDensityFit(NamedTuple):
    slope: np.ndarray  # [F] log10 density per step (NaN when fewer than 2 points)
    intercept: np.ndarray  # [F]
    n: np.ndarray  # [F] number of windows in the fit
    t: np.ndarray  # [F] slope / SE(slope) (NaN when fewer than 3 points)
    p_falling: np.ndarray  # [F] one-sided p-value for slope < 0 (NaN when fewer than 3 points)


class DyingTest(NamedTuple):
    members: np.ndarray  # [F] bool: in the test
    group: np.ndarray  # [F] str: "control", "rare" or ""
    outcome: np.ndarray  # [F] str: one of OUTCOMES, or "" for non-members
    fit: LogDensityFit
    start_step: np.ndarray  # [F] the step the feature's current segment began at
    steps: np.ndarray  # [W'] end step of each pooled window
    log_density: np.ndarray  # [W', F] log10 density per pooled window (-inf: no firings)
    window_tokens: np.ndarray  # [W'] tokens in each pooled window


def _betacf(a: np.ndarray, b: np.ndarray, x: np.ndarray, iters: int = 300) -> np.ndarray:
    """Continued fraction of the incomplete beta function (modified Lentz), vectorised."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = np.ones_like(x)
    d = 1.0 - qab * x / qap
    d = np.where(np.abs(d) < tiny, tiny, d)
    d = 1.0 / d
    h = d.copy()
    for m in range(1, iters + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = np.where(np.abs(d) < tiny, tiny, d)
        c = 1.0 + aa / c
        c = np.where(np.abs(c) < tiny, tiny, c)
        d = 1.0 / d
        h = h * d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = np.where(np.abs(d) < tiny, tiny, d)
        c = 1.0 + aa / c
        c = np.where(np.abs(c) < tiny, tiny, c)
        d = 1.0 / d
        delta = d * c
        h = h * delta
        if np.all(np.abs(delta - 1.0) < 1e-14):
            break
    return h


def betainc(a: np.ndarray, b: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Regularised incomplete beta I_x(a, b) for arrays (scipy is not a runtime dependency)."""
    from math import lgamma

    a, b, x = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in (a, b, x)))
    x = np.clip(x, 0.0, 1.0)
    lg = np.vectorize(lgamma)
    with np.errstate(divide="ignore", invalid="ignore"):
        lbt = lg(a + b) - lg(a) - lg(b) + a * np.log(x) + b * np.log1p(-x)
        bt = np.exp(lbt)
        swap = x >= (a + 1.0) / (a + b + 2.0)
        # The continued fraction converges fast for x < (a+1)/(a+b+2); use symmetry otherwise.
        xa, aa, ba = np.where(swap, 1.0 - x, x), np.where(swap, b, a), np.where(swap, a, b)
        cf = _betacf(aa, ba, xa)
        out = bt * cf / aa
        out = np.where(swap, 1.0 - out, out)
    out = np.where(x <= 0.0, 0.0, np.where(x >= 1.0, 1.0, out))
    return out


def t_cdf(t: np.ndarray, df: np.ndarray) -> np.ndarray:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    t = np.asarray(t, dtype=np.float64)
    df = np.asarray(df, dtype=np.float64)
    t, df = np.broadcast_arrays(t, df)
    safe_t = np.where(np.isfinite(t), t, 0.0)
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + safe_t**2))  # P(T <= -|t|)
    out = np.where(safe_t < 0, tail, 1.0 - tail)
    out = np.where(t == -np.inf, 0.0, np.where(t == np.inf, 1.0, out))
    return np.where(np.isnan(t) | ~(df > 0), np.nan, out)


def fit_log_density(log_density: np.ndarray, steps: np.ndarray, mask: np.ndarray) -> LogDensityFit:
    """OLS of log_density[w, f] on steps[w] per feature f, over the windows where mask[w, f].

    Vectorised over features; masked-out and non-finite cells are ignored.
    """
    m = mask & np.isfinite(log_density)
    x = np.broadcast_to(steps.astype(np.float64)[:, None], log_density.shape)
    y = np.where(m, log_density, 0.0)
    w = m.astype(np.float64)
    n = w.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        mx = (w * x).sum(0) / n
        my = (w * y).sum(0) / n
        dx = np.where(m, x - mx, 0.0)
        dy = np.where(m, y - my, 0.0)
        sxx = (dx * dx).sum(0)
        slope = (dx * dy).sum(0) / sxx
        intercept = my - slope * mx
        resid = np.where(m, dy - slope * dx, 0.0)
        sse = (resid * resid).sum(0)
        se = np.sqrt(sse / (n - 2) / sxx)
        t = slope / se
    # A perfect fit has SE 0: t is then +-inf (or NaN for a flat perfect fit, i.e. t = 0).
    t = np.where((se == 0) & (slope == 0), 0.0, t)
    ok2 = (n >= 2) & (sxx > 0)
    ok3 = ok2 & (n >= 3)
    slope = np.where(ok2, slope, np.nan)
    intercept = np.where(ok2, intercept, np.nan)
    t = np.where(ok3, t, np.nan)
    p = np.where(ok3, t_cdf(np.where(ok3, t, 0.0), np.maximum(n - 2, 1)), np.nan)
    return LogDensityFit(slope, intercept, n.astype(np.int64), t, p)


def segment_start(
    n_features: int, resample_steps: torch.Tensor, resampled: torch.Tensor
) -> np.ndarray:
    """The step each feature's current segment began at: its last resampling (0 when never).
    Windows ending after it belong to the segment. Holding a feature out changes nothing in
    it, so a control-group feature's segment runs through its hold-out."""
    if len(resample_steps) == 0:
        return np.zeros(n_features, dtype=np.int64)
    steps = resample_steps.cpu().numpy().astype(np.int64)
    last = np.where(resampled.cpu().numpy(), steps[:, None], 0).max(0)
    return last.astype(np.int64)


def pool_windows(
    counts: torch.Tensor,
    window_tokens: torch.Tensor,
    window_end_step: torch.Tensor,
    resample_steps: torch.Tensor,
    min_tokens: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge adjacent windows, from the end backwards, until each holds >= min_tokens tokens,
    never across a resampling event (so every pooled window lies inside one segment). Returns
    (counts [W', F], tokens [W'], end steps [W'])."""
    c = counts.cpu().numpy()
    tok = window_tokens.cpu().numpy().astype(np.int64)
    end = window_end_step.cpu().numpy().astype(np.int64)
    events = resample_steps.cpu().numpy()
    starts: list[int] = []  # first window of each pooled window, last pooled window first
    acc = 0
    for w in range(len(tok) - 1, -1, -1):
        acc += int(tok[w])
        # An event s between windows w-1 and w (end[w-1] <= s < end[w]) closes the group at w.
        event_before = w > 0 and bool(((events >= end[w - 1]) & (events < end[w])).any())
        if acc >= min_tokens or event_before or w == 0:
            starts.append(w)
            acc = 0
    starts.reverse()
    if len(starts) == len(tok):
        return c, tok, end
    idx = np.array(starts)
    ends = np.append(idx[1:], len(tok)) - 1
    return np.add.reduceat(c, idx, axis=0), np.add.reduceat(tok, idx), end[ends]


def dying_test(
    counts: torch.Tensor,
    window_tokens: torch.Tensor,
    window_end_step: torch.Tensor,
    resample_steps: torch.Tensor,
    resampled: torch.Tensor,
    control_mask: torch.Tensor,
    rare_threshold: float = 1e-5,
    last_windows: int = 3,
    alpha: float = 0.01,
    min_points: int = 3,
    min_window_tokens: int | None = None,
) -> DyingTest:
    """Run the dying test on a density history (the tensors of density_history.safetensors).

    Windows are first pooled to at least `min_window_tokens` tokens each (default
    3 / rare_threshold: a feature at the rare threshold then expects 3 firings per window, so
    zero firings in `last_windows` windows happens by chance with probability e^-9).
    Members: the control group, plus every feature whose density was above 0 and below
    `rare_threshold` in some window of its current segment, or that fired in its segment and
    then had zero firings in all of its last `last_windows` windows.
    """
    if min_window_tokens is None:
        min_window_tokens = math.ceil(3 / rare_threshold)
    c, tok, steps = pool_windows(
        counts, window_tokens, window_end_step, resample_steps, min_window_tokens
    )
    n_w, n_f = c.shape
    start = segment_start(n_f, resample_steps, resampled)
    in_seg = steps[:, None] > start[None, :]  # [W, F]
    dens = c / tok.astype(np.float64)[:, None]
    fired = in_seg & (c > 0)
    rare_somewhere = (in_seg & (dens > 0) & (dens < rare_threshold)).any(0)
    # The last `last_windows` windows of each feature's segment: all of them must be zero.
    seg_len = in_seg.sum(0)
    tail = in_seg & (np.arange(n_w)[:, None] >= n_w - np.minimum(seg_len, last_windows)[None, :])
    died = (seg_len >= last_windows) & ~(tail & (c > 0)).any(0)
    control = control_mask.cpu().numpy().astype(bool)
    ever_fired = fired.any(0)
    members = control | rare_somewhere | (died & ever_fired)

    with np.errstate(divide="ignore"):
        logd = np.log10(dens)
    fit = fit_log_density(logd, steps, fired)
    outcome = np.full(n_f, "", dtype=object)
    outcome[members] = "settles"
    outcome[members & (fit.p_falling < alpha)] = "keeps_falling"
    outcome[members & ~(fit.n >= min_points)] = "too_few_points"
    outcome[members & died] = "died"
    group = np.where(control, "control", np.where(members, "rare", "")).astype(object)
    return DyingTest(members, group, outcome, fit, start, steps, logd, tok)


def summarize(test: DyingTest, alpha: float = 0.01) -> dict:
    """Counts, fractions and a verdict sentence for summary.json and the report."""

    def counts_of(sel: np.ndarray) -> dict:
        n = int(sel.sum())
        cnt = {o: int((sel & (test.outcome == o)).sum()) for o in OUTCOMES}
        frac = {o: (cnt[o] / n if n else None) for o in OUTCOMES}
        return {"n": n, "counts": cnt, "fractions": frac}

    out = counts_of(test.members)
    out["test"] = f"{TEST_NAME}, p < {alpha:g}"
    out["alpha"] = alpha
    out["by_group"] = {g: counts_of(test.group == g) for g in ("control", "rare")}
    out["n_windows"] = len(test.steps)
    out["window_tokens_min"] = int(test.window_tokens.min()) if len(test.steps) else None
    out["window_tokens_max"] = int(test.window_tokens.max()) if len(test.steps) else None
    n, cnt = out["n"], out["counts"]
    if n == 0:
        verdict = (
            "No control-group or rare features in this run: the dying test has nothing to test."
        )
    else:
        dying = cnt["keeps_falling"] + cnt["died"]
        tested = n - cnt["too_few_points"]
        pct = lambda k: f"{100 * k / n:.0f}%"  # noqa: E731
        answer = (
            "yes: most of them are still losing density or have died"
            if tested and dying > tested / 2
            else "no: most of them settle at a stable density"
        )
        verdict = (
            f"Of {n} features tested ({out['by_group']['control']['n']} control, "
            f"{out['by_group']['rare']['n']} rare), {cnt['keeps_falling']} ({pct(cnt['keeps_falling'])}) "
            f"keep falling, {cnt['settles']} ({pct(cnt['settles'])}) settle, {cnt['died']} "
            f"({pct(cnt['died'])}) died completely and {cnt['too_few_points']} have too few nonzero "
            f"windows to fit ({TEST_NAME}, p < {alpha:g}). Are rare features dying slowly? {answer}."
        )
    out["verdict"] = verdict
    return out
