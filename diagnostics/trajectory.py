"""The trajectory test: is a rare feature's firing rate falling, settled, or has it died?

Each tested feature's firing counts per window are modelled as Poisson with the window's
exposure as offset, zero windows included, relative to a live baseline: the expected count in
window w is  n_w * B_w * exp(a + b * t_w),  where n_w is the window's tokens, B_w the live
baseline's relative rate (so global sparsification is not read as dying) and t_w the window's
midpoint in units of 1e7 tokens. With a free intercept a, the likelihood of b is the multinomial
likelihood of where the feature's S firings fell, given S: it has no nuisance parameter left and
is maximised and profiled in one dimension, vectorised over features.

- trend b: the log-linear (exponential) slope, reported in decades per 1e7 tokens relative to
  the baseline, with its profile-likelihood interval at level 1 - 2*alpha (the one an
  equivalence test at alpha inverts).
- shapes: constant (b = 0), exponential, and power law  rate ~ (1 + age/tau)^-k  (age: tokens
  since the segment start; tau on a grid, profiled), compared by (quasi-)AIC.
- overdispersion: quasi-Poisson. Likelihood ratios are divided by phi, the feature's Pearson
  dispersion but never below 1 nor below the members' pooled dispersion (a bursty feature seen
  through few firings per window cannot estimate its own), and referred to Student's t on
  n - 2 degrees of freedom.
- outcomes (first that applies): `died`: zero firings over the final stretch of windows while
  the feature fired S times before; given S, the chance that all firings miss the final stretch
  is (1 - q)^(S/phi0) (q: the stretch's share of the exposure, phi0: the earlier windows'
  dispersion). `falling`: one-sided signed-root likelihood-ratio test of b < 0. `settled`:
  both one-sided tests of |b| < band reject (TOST), i.e. the interval lies inside the band.
  Each family is Benjamini-Hochberg-controlled at alpha across the tested features. Otherwise
  `unresolved` (neither; a significantly rising feature too), as is any member with fewer than
  `min_firings` firings or `min_windows` windows (too few to decide; with fewer than ~5
  firings the likelihood-ratio test loses its size, 10 leaves a margin). Features that are not members: `not_tested`. A feature
  falling significantly but slower than the band is `falling`: its trend says how fast.
- segments and burn-in: a feature's history starts at its last resampling (or the start of
  training); windows that start before that point plus `burn_in_tokens` are dropped.
- membership must not look at the windows tested: a feature chosen for being rare or silent
  in some windows is biased toward `falling`/`died` over those same windows. The control group
  is tested from its hold-out on (`segment_starts(..., held_out=...)`), since it was chosen on
  the dead window before it; "rare" members should be chosen on windows the test does not see
  (an earlier stretch, with segment_start moved past it).
- the baseline's own noise is not propagated (its relative standard error per window is
  returned; with hundreds of live features it is ~1%, far below a rare feature's).

The calibration (planted histories near the resolution floor) is in tests/test_trajectory.py
and `python -m saekit.scripts.experiments.calibrate_trajectory`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy import stats

from ..sae.errors import SaekitError
from .trend_fit import B_MAX, bound, fit_slope, pearson, scaled, signed_root

OUTCOMES = ("falling", "settled", "died", "unresolved")
NOT_TESTED = "not_tested"
SHAPES = ("constant", "exponential", "power")
TIME_UNIT = 1e7  # tokens: trends are in decades per 1e7 tokens
LN10 = math.log(10.0)
# Power-law tau, as fractions of each feature's largest age (tokens since its segment start):
# from nearly a pure power of age (0.01) to nearly exponential (10).
TAU_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
TEST_NAME = (
    "quasi-Poisson log-linear trend of firing counts relative to the live baseline "
    "(signed-root likelihood ratio, TOST for settled, Benjamini-Hochberg per outcome)"
)


@dataclass
class TrajectoryConfig:
    """Settings of the trajectory test."""

    alpha: float = 0.05
    """false discovery rate of `falling`, `settled` and `died` (Benjamini-Hochberg within each);
    the reported trend interval is the 1 - 2*alpha one"""
    band: float = 0.3
    """equivalence band of `settled`: |trend| below this many decades per 1e7 tokens"""
    burn_in_tokens: int = 131_072
    """tokens after each feature's segment start (last resampling, or the start of training)
    whose windows are dropped"""
    min_firings: int = 10
    """members with fewer firings over their windows are `unresolved` without a test"""
    min_windows: int = 3
    """members with fewer windows are `unresolved` without a test (at least 3: the trend and the
    dispersion need n - 2 >= 1 degrees of freedom)"""
    baseline_group: str = "live"
    """group label of the live baseline's features"""


class Trajectory(NamedTuple):
    """Per-feature results ([F] arrays) and the windows they came from."""

    outcome: np.ndarray  # [F] str: one of OUTCOMES, or NOT_TESTED
    group: np.ndarray  # [F] str: the input labels
    trend: np.ndarray  # [F] log-linear trend, decades per 1e7 tokens, relative to the baseline
    trend_low: np.ndarray  # [F] its 1 - 2*alpha profile-likelihood interval (may be +-inf)
    trend_high: np.ndarray  # [F]
    p_falling: np.ndarray  # [F] one-sided p-value of trend < 0 (NaN: not tested)
    p_settled: np.ndarray  # [F] TOST p-value of |trend| < band
    p_died: np.ndarray  # [F] p-value of the final zero stretch (1: the last window fired)
    q_falling: np.ndarray  # [F] Benjamini-Hochberg q-values of the three
    q_settled: np.ndarray  # [F]
    q_died: np.ndarray  # [F]
    firings: np.ndarray  # [F] int: firings over the feature's windows
    density: np.ndarray  # [F] firings / tokens over the feature's windows
    expected: np.ndarray  # [F] firings expected in the final zero stretch at the earlier rate
    shape: np.ndarray  # [F] str: best of SHAPES by (quasi-)AIC, "" when not fitted
    dispersion: np.ndarray  # [F] Pearson dispersion of the log-linear fit (NaN: not fitted)
    n_windows: np.ndarray  # [F] int: windows in the feature's history after burn-in
    used: np.ndarray  # [W, F] bool: the windows each feature's test used
    baseline: np.ndarray  # [W] the live baseline's relative rate (NaN: not estimated)
    baseline_se: np.ndarray  # [W] its relative standard error (Poisson; NaN: no baseline)
    n_baseline: int  # live features in the baseline (0: no baseline, B = 1)
    dispersion_pool: float  # the members' pooled Pearson dispersion (1.0 when none was tested)
    window_tokens: np.ndarray  # [W]
    tokens_seen: np.ndarray  # [W] tokens seen at each window's end
    config: TrajectoryConfig


def segment_starts(
    window_tokens, window_end_step, resample_steps, resampled, held_out=None
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens seen at each window's end [W], each feature's segment start in tokens [F]) from a
    density history (training.run.History's tensors): the segment starts at the feature's last
    resampling, 0 when never resampled. With `held_out` [events, F], a held-out (control)
    feature's segment starts at its hold-out instead: it was chosen for having no firings in
    the dead window before that event, so those windows cannot be tested."""
    tok = np.asarray(window_tokens, dtype=np.int64)
    end_step = np.asarray(window_end_step, dtype=np.float64)
    seen = np.cumsum(tok)
    ev = np.asarray(resample_steps, dtype=np.float64)
    res = np.asarray(resampled, dtype=bool)
    if res.ndim != 2 or len(res) != len(ev):
        raise SaekitError(
            f"resampled has shape {res.shape}, expected [{len(ev)} events, features]; "
            "pass the density history's `resampled`"
        )
    n_f = res.shape[1]
    if len(ev) == 0:
        return seen, np.zeros(n_f, dtype=np.float64)
    if held_out is not None:
        res = res | np.asarray(held_out, dtype=bool).reshape(res.shape)
    ev_tokens = np.interp(ev, np.r_[0.0, end_step], np.r_[0.0, seen.astype(np.float64)])
    start = np.where(res, ev_tokens[:, None], 0.0).max(0)
    return seen, start


def bh(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg q-values of the finite entries of p (NaN stays NaN)."""
    q = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    if len(ok) == 0:
        return q
    order = ok[np.argsort(p[ok], kind="stable")]
    m = len(order)
    adj = p[order] * m / np.arange(1, m + 1)
    q[order] = np.minimum(np.minimum.accumulate(adj[::-1])[::-1], 1.0)
    return q


def live_baseline(
    counts: np.ndarray, window_tokens: np.ndarray, live: np.ndarray, first: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """The live features' common rate trend B [W] (NaN before window `first`): the mean over live
    features of each one's rate relative to its own mean rate over windows first.., so every
    live feature weighs the same and dense ones do not dominate. Returns (B, B's relative
    standard error [W] under Poisson counts, features used)."""
    c = counts[first:, live].astype(np.float64)
    n = window_tokens[first:].astype(np.float64)
    b, se = np.full(len(window_tokens), np.nan), np.full(len(window_tokens), np.nan)
    if n.sum() == 0:
        return b, se, 0
    mean_rate = c.sum(0) / n.sum()
    keep = mean_rate > 0
    if not keep.any():
        return b, se, 0
    rel = c[:, keep] / n[:, None] / mean_rate[keep]
    b[first:] = rel.mean(1)
    k = int(keep.sum())
    with np.errstate(divide="ignore"):
        se[first:] = np.sqrt((1 / (n[:, None] * mean_rate[keep])).sum(1) / b[first:]) / k
    return b, se, k


def _check(counts, window_tokens, tokens_seen, segment_start, group) -> None:
    n_w, n_f = counts.shape
    if window_tokens.shape != (n_w,) or tokens_seen.shape != (n_w,):
        raise SaekitError(
            f"counts has {n_w} windows but window_tokens/tokens_seen have shapes "
            f"{window_tokens.shape}/{tokens_seen.shape}; pass one entry per window"
        )
    if segment_start.shape != (n_f,) or group.shape != (n_f,):
        raise SaekitError(
            f"counts has {n_f} features but segment_start/group have shapes "
            f"{segment_start.shape}/{group.shape}; pass one entry per feature"
        )
    if (counts < 0).any() or (window_tokens <= 0).any():
        raise SaekitError("counts must be >= 0 and window_tokens > 0; pass a density history")
    if n_w > 1 and (np.diff(tokens_seen) <= 0).any():
        raise SaekitError("tokens_seen must increase from window to window; pass cumulative tokens")
    if not (np.isfinite(tokens_seen).all() and np.isfinite(segment_start).all()):
        raise SaekitError("tokens_seen and segment_start must be finite; pass token counts")


def _check_config(cfg: TrajectoryConfig) -> None:
    if not 0 < cfg.alpha < 0.5 or cfg.band <= 0:
        raise SaekitError(f"alpha must be in (0, 0.5) and band > 0, got {cfg.alpha}, {cfg.band}")
    if cfg.min_windows < 3 or cfg.min_firings < 1 or cfg.burn_in_tokens < 0:
        raise SaekitError(
            f"min_windows must be >= 3, min_firings >= 1 and burn_in_tokens >= 0, got "
            f"{cfg.min_windows}, {cfg.min_firings}, {cfg.burn_in_tokens}"
        )


def trajectory_test(
    counts,
    window_tokens,
    group,
    tokens_seen=None,
    segment_start=None,
    config: TrajectoryConfig | None = None,
) -> Trajectory:
    """Classify each member feature's trajectory over training (see the module docstring).

    counts [W, F] firings per window; window_tokens [W] tokens per window; group [F] str: the
    baseline's label (config.baseline_group, default "live") for live features, "" for features
    neither tested nor in the baseline, any other label (e.g. "control", "rare") for members;
    tokens_seen [W] tokens seen at each window's end (default: the cumulative sum of
    window_tokens); segment_start [F] tokens seen at each feature's last resampling (default 0;
    `segment_starts` derives both from a density history). Arrays may be numpy or CPU torch.
    """
    cfg = config or TrajectoryConfig()
    counts = np.asarray(counts).astype(np.int64)
    window_tokens = np.asarray(window_tokens).astype(np.int64)
    tokens_seen = (
        np.cumsum(window_tokens) if tokens_seen is None else np.asarray(tokens_seen, np.float64)
    )
    n_w, n_f = counts.shape
    segment_start = (
        np.zeros(n_f) if segment_start is None else np.asarray(segment_start, np.float64)
    )
    group = np.asarray(group).astype(str).astype(object)
    _check(counts, window_tokens, tokens_seen, segment_start, group)
    _check_config(cfg)

    w_start = tokens_seen - window_tokens
    mid = (tokens_seen - window_tokens / 2) / TIME_UNIT  # [W] in 1e7 tokens
    used = w_start[:, None] >= segment_start[None, :] + cfg.burn_in_tokens  # [W, F]

    live = (group == cfg.baseline_group) & (segment_start <= 0)
    first = int(np.searchsorted(w_start, cfg.burn_in_tokens))
    base, base_se, n_base = live_baseline(counts, window_tokens, live, min(first, n_w))
    if n_base == 0 or not (base[first:] > 0).all():
        base, n_base = np.where(np.arange(n_w) >= first, 1.0, np.nan), 0
        base_se = np.full(n_w, np.nan)

    members = (group != cfg.baseline_group) & (group != "")
    used &= members[None, :]
    y_all = np.where(used, counts, 0)
    firings = y_all.sum(0)
    n_used = used.sum(0)
    tok_used = (used * window_tokens[:, None]).sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        density = np.where(n_used > 0, firings / tok_used, np.nan)

    nan = np.full(n_f, np.nan)
    res = {k: nan.copy() for k in ("trend", "lo", "hi", "pf", "ps", "pd", "exp", "phi")}
    shape = np.full(n_f, "", dtype=object)
    tested = members & (firings >= cfg.min_firings) & (n_used >= cfg.min_windows)
    idx = np.flatnonzero(tested)
    pool = 1.0
    if len(idx):
        pool = _trend(res, shape, idx, counts, used, window_tokens, base, mid, segment_start, cfg)
    _died(res, counts, used, window_tokens, base, members & (firings > 0), pool)

    q_f, q_s = bh(np.where(tested, res["pf"], np.nan)), bh(np.where(tested, res["ps"], np.nan))
    q_d = bh(np.where(tested, res["pd"], np.nan))
    outcome = np.full(n_f, NOT_TESTED, dtype=object)
    outcome[members] = "unresolved"
    outcome[tested & (q_s <= cfg.alpha)] = "settled"
    outcome[tested & (q_f <= cfg.alpha)] = "falling"
    outcome[tested & (q_d <= cfg.alpha)] = "died"
    return Trajectory(
        outcome=outcome, group=group, trend=res["trend"], trend_low=res["lo"],
        trend_high=res["hi"], p_falling=res["pf"], p_settled=res["ps"], p_died=res["pd"],
        q_falling=q_f, q_settled=q_s, q_died=q_d, firings=firings, density=density,
        expected=res["exp"], shape=shape, dispersion=res["phi"], n_windows=n_used, used=used,
        baseline=base, baseline_se=base_se, n_baseline=n_base, dispersion_pool=pool,
        window_tokens=window_tokens, tokens_seen=tokens_seen, config=cfg,
    )  # fmt: skip


def _died(res: dict, counts, used, window_tokens, base, cols, pool: float) -> None:
    """p_died and expected firings for the features `cols` (they fired at least once)."""
    idx = np.flatnonzero(cols)
    if len(idx) == 0:
        return
    u = used[:, idx]
    y = np.where(u, counts[:, idx], 0).astype(np.float64)
    e = np.where(u, window_tokens[:, None] * np.nan_to_num(base)[:, None], 0.0)
    n_w = len(window_tokens)
    last = n_w - 1 - np.argmax((y > 0)[::-1], axis=0)  # last window that fired
    after = np.arange(n_w)[:, None] > last[None, :]
    stretch, early = u & after, u & ~after
    s = y.sum(0)
    q = (e * stretch).sum(0) / e.sum(0)
    # A bursty feature's zero stretch is less surprising: S / phi0 effective firings, phi0 the
    # constant model's dispersion on the earlier windows (never below the members' pool).
    n0 = early.sum(0)
    x2 = pearson(y, s * e / (e * early).sum(0), early)
    with np.errstate(divide="ignore", invalid="ignore"):
        phi0 = np.maximum(np.where(n0 >= 2, x2 / (n0 - 1), 1.0), max(pool, 1.0))
        res["pd"][idx] = np.exp(s / phi0 * np.log1p(-q))
        res["exp"][idx] = s * q / (1 - q)


def _trend(res, shape, idx, counts, used, window_tokens, base, mid, segment_start, cfg) -> float:
    """Fit the three shapes and test the log-linear trend for the tested features `idx`.
    Returns the members' pooled dispersion."""
    u = used[:, idx]
    y = np.where(u, counts[:, idx], 0).astype(np.float64)
    with np.errstate(divide="ignore"):
        logw = np.where(u, np.log(window_tokens[:, None] * np.nan_to_num(base)[:, None]), -np.inf)
    x, span = scaled(np.broadcast_to(mid[:, None], u.shape), u)  # span in 1e7 tokens
    fit = fit_slope(y, logw, x)
    n = u.sum(0)
    x2 = pearson(y, fit.mu, u)

    # Power law: covariate log(1 + age/tau), tau on a grid relative to the feature's oldest age.
    age = np.where(u, mid[:, None] - segment_start[idx][None, :] / TIME_UNIT, 0.0)
    age_max = age.max(0)
    best, x2_best, b_prev = np.full(len(idx), -np.inf), np.zeros(len(idx)), fit.b
    for g in sorted(TAU_GRID, reverse=True):  # from near-exponential, warm-started
        xp, _ = scaled(np.log1p(age / (g * age_max)), u)
        pf = fit_slope(y, logw, xp, b_prev)
        b_prev = pf.b
        better = pf.loglik > best
        best = np.where(better, pf.loglik, best)
        x2_best = np.where(better, pearson(y, pf.mu, u), x2_best)

    # Quasi-Poisson: a feature's dispersion is its own Pearson estimate, but never below the
    # members' pooled one (from each one's better-fitting decay shape, so misfit does not inflate
    # it); with few firings per window the own estimate alone is too noisy to keep the size.
    pow_wins = -2 * best + 6 < -2 * fit.loglik + 4
    pool = float(
        np.where(pow_wins, x2_best, x2).sum()
        / np.maximum(np.where(pow_wins, n - 3, n - 2), 1).sum()
    )
    phi_hat = x2 / (n - 2)
    phi = np.maximum(np.maximum(phi_hat, 1.0), pool)
    df = (n - 2).astype(np.float64)
    crit = stats.t.ppf(1 - cfg.alpha, df)
    lo = bound(fit, y, logw, x, phi * crit**2, -1)
    hi = bound(fit, y, logw, x, phi * crit**2, +1)
    delta = np.minimum(cfg.band * LN10 * span, B_MAX)  # the band in scaled units
    r0 = signed_root(fit, y, logw, x, np.zeros(len(idx)), phi)
    r_lo = signed_root(fit, y, logw, x, -delta, phi)
    r_hi = signed_root(fit, y, logw, x, delta, phi)
    scale = LN10 * span  # scaled nats -> decades per 1e7 tokens
    res["trend"][idx], res["lo"][idx], res["hi"][idx] = fit.b / scale, lo / scale, hi / scale
    res["pf"][idx] = stats.t.cdf(r0, df)
    res["ps"][idx] = np.maximum(stats.t.sf(r_lo, df), stats.t.cdf(r_hi, df))
    res["phi"][idx] = phi_hat
    aic = np.stack([-2 * fit.loglik0 / phi + 2, -2 * fit.loglik / phi + 4, -2 * best / phi + 6])
    shape[idx] = np.asarray(SHAPES, dtype=object)[aic.argmin(0)]
    return pool


# ---- the summary -----------------------------------------------------------------------------


def summarize(t: Trajectory) -> dict:
    """Counts per outcome per group, the baseline's trend, the settings and windows used, and a
    one-sentence verdict (for summary.json and the report)."""
    cfg = t.config
    members = t.outcome != NOT_TESTED

    def counts_of(sel: np.ndarray) -> dict:
        n = int(sel.sum())
        cnt = {o: int((sel & (t.outcome == o)).sum()) for o in OUTCOMES}
        return {
            "n": n,
            "n_tested": int((sel & np.isfinite(t.p_falling)).sum()),  # enough firings to test
            "counts": cnt,
            "fractions": {o: cnt[o] / n if n else None for o in cnt},
        }

    groups = sorted({str(g) for g in t.group[members]})
    out = counts_of(members)
    out["by_group"] = {g: counts_of(members & (t.group == g)) for g in groups}
    out["test"] = TEST_NAME
    out["alpha"] = cfg.alpha
    out["band_decades_per_1e7_tokens"] = cfg.band
    out["burn_in_tokens"] = cfg.burn_in_tokens
    out["min_firings"] = cfg.min_firings
    out["dispersion_pool"] = t.dispersion_pool
    out["member_windows_median"] = float(np.median(t.n_windows[members])) if members.any() else None
    ok = np.isfinite(t.baseline)
    out["baseline"] = {
        "group": cfg.baseline_group,
        "n_features": t.n_baseline,
        "trend_decades_per_1e7_tokens": _baseline_trend(t) if t.n_baseline else None,
        "relative_se_max": float(np.nanmax(t.baseline_se)) if t.n_baseline else None,
    }
    out["windows"] = {
        "n": len(t.window_tokens),
        "n_after_burn_in": int(ok.sum()),
        "tokens_min": int(t.window_tokens.min()) if len(t.window_tokens) else None,
        "tokens_max": int(t.window_tokens.max()) if len(t.window_tokens) else None,
        "tokens_seen_last": float(t.tokens_seen[-1]) if len(t.tokens_seen) else None,
    }
    out["verdict"] = _verdict(out, cfg)
    return out


def _baseline_trend(t: Trajectory) -> float | None:
    """Least-squares slope of log10 B against tokens (decades per 1e7 tokens), token-weighted."""
    ok = np.isfinite(t.baseline) & (t.baseline > 0)
    if ok.sum() < 2:
        return None
    x = ((t.tokens_seen - t.window_tokens / 2) / TIME_UNIT)[ok]
    w = t.window_tokens[ok].astype(np.float64)
    yv = np.log10(t.baseline[ok])
    xm, ym = np.average(x, weights=w), np.average(yv, weights=w)
    return float(np.sum(w * (x - xm) * (yv - ym)) / np.sum(w * (x - xm) ** 2))


def _verdict(s: dict, cfg: TrajectoryConfig) -> str:
    n, c = s["n"], s["counts"]
    if n == 0:
        return "No features were tested: the trajectory test had no control-group or rare features."
    groups = ", ".join(f"{v['n']} {g}" for g, v in s["by_group"].items())
    base = (
        f"against {s['baseline']['n_features']} live features"
        if s["baseline"]["n_features"]
        else "with no live baseline"
    )
    tally = (
        f"of {n} features ({groups}; {s['n_tested']} with enough firings to test) {base}, "
        f"{c['falling']} are falling, {c['died']} died, "
        f"{c['settled']} settled (trend within +-{cfg.band:g} decades per 1e7 tokens) and "
        f"{c['unresolved']} are unresolved (Benjamini-Hochberg at {cfg.alpha:g})"
    )
    decided = n - c["unresolved"]
    if c["unresolved"] > n / 2:
        return f"Unresolved: {tally}, so these windows cannot tell settling from dying for most of them."
    if c["falling"] + c["died"] > decided / 2:
        return f"Mostly dying: {tally}."
    return f"Mostly settled: {tally}."
