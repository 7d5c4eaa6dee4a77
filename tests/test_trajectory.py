"""The trajectory test (diagnostics/trajectory.py) and its calibration on planted histories.

The planted scenarios and window regimes are the calibration script's
(scripts/experiments/calibrate_trajectory.py), so the table it prints and these assertions are
about the same simulations. Size checks allow alpha plus three binomial standard errors of the
simulation count.
"""

from __future__ import annotations

import json
import math
import zlib

import numpy as np
import pytest

from saekit.diagnostics.trajectory import (
    NOT_TESTED,
    OUTCOMES,
    TrajectoryConfig,
    bh,
    segment_starts,
    summarize,
    trajectory_test,
)
from saekit.sae.errors import SaekitError
from saekit.scripts.experiments.calibrate_trajectory import (
    REGIMES,
    SCENARIOS,
    simulate,
    window_rates,
)

CFG = TrajectoryConfig()
ALPHA = CFG.alpha
CONSTANT = [s for s in SCENARIOS if s.startswith("constant")]  # the shared decline: below
SHORT = [r for r, (tok, n) in REGIMES.items() if tok * n < 1e7]


def limit(n: int) -> float:
    """alpha plus three binomial standard errors at n simulations."""
    return ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / max(n, 1))


def planted(scenario: str, regime: str, n: int = 4000, seed: int = 0):
    sc = SCENARIOS[scenario]
    tok, n_w = REGIMES[regime]
    counts, wt, group = simulate(window_rates(sc.rate, tok, n_w), tok, n, seed, sc.dispersion)
    return trajectory_test(counts, wt, group), group == "rare"


def share(t, m, outcome: str) -> float:
    return float(np.mean(t.outcome[m] == outcome))


@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("scenario", CONSTANT)
def test_constant_features_are_not_called_falling_or_died(scenario, regime):
    t, m = planted(scenario, regime, n=10000, seed=zlib.crc32(f"{scenario}|{regime}".encode()))
    assert share(t, m, "falling") <= limit(m.sum())
    assert share(t, m, "died") <= limit(m.sum())
    # The p-values themselves, before Benjamini-Hochberg (which alone would hide a bad size).
    tested = m & np.isfinite(t.p_falling)
    if tested.sum() >= 200:
        assert np.mean(t.p_falling[tested] <= ALPHA) <= limit(tested.sum())
        assert np.mean(t.p_died[tested] <= ALPHA) <= limit(tested.sum())
    # Too few firings to decide: unresolved, never settled.
    few = m & (t.firings < CFG.min_firings)
    assert (t.outcome[few] == "unresolved").all()
    if regime in SHORT:  # +-0.3 decades per 1e7 tokens is not resolvable on < 1e7 tokens
        assert share(t, m, "settled") == 0
    else:
        assert share(t, m, "settled") >= 0.95


@pytest.mark.parametrize(
    "scenario, regime, power",
    [
        ("exponential 1e-4 -> 1e-7", "65k x 38", 0.95),
        ("exponential 1e-4 -> 1e-7", "360k x 24", 0.95),
        ("exponential 1e-4 -> 1e-7", "1e7 x 50", 0.99),
        ("exponential 1e-4 -> 1e-7", "1e8 x 50", 0.99),
        ("exponential 1e-4 -> 1e-7", "65k x 12", None),
        ("hyperbolic 1e-4/(1+t/tau)", "65k x 38", 0.25),
        ("hyperbolic 1e-4/(1+t/tau)", "360k x 24", 0.95),
        ("hyperbolic 1e-4/(1+t/tau)", "1e7 x 50", 0.99),
        ("hyperbolic 1e-4/(1+t/tau)", "1e8 x 50", 0.99),
        ("hyperbolic 1e-4/(1+t/tau)", "65k x 12", None),
    ],
)
def test_power_for_decaying_features(scenario, regime, power):
    t, m = planted(scenario, regime, n=2000, seed=zlib.crc32(f"{scenario}|{regime}".encode()))
    detected = share(t, m, "falling") + share(t, m, "died")
    print(f"\npower {scenario} on {regime}: {detected:.3f} (falling or died)")
    assert share(t, m, "settled") == 0
    if power is not None:  # None: too few windows or firings to expect power; measured only
        assert detected >= power


def test_shapes_are_told_apart_on_long_windows():
    for scenario, want, at_least in [
        ("constant 1e-5", "constant", 0.8),
        ("exponential 1e-4 -> 1e-7", "exponential", 0.9),
        ("hyperbolic 1e-4/(1+t/tau)", "power", 0.95),
    ]:
        t, m = planted(scenario, "1e7 x 50", n=1000, seed=7)
        assert np.mean(t.shape[m] == want) >= at_least, scenario


def test_mixed_population_keeps_the_false_discoveries_down():
    tok, n_w = REGIMES["360k x 24"]
    c0, wt, g0 = simulate(window_rates(SCENARIOS["constant 1e-5"].rate, tok, n_w), tok, 3000, 1)
    rate = SCENARIOS["exponential 1e-4 -> 1e-7"].rate
    c1, _, _ = simulate(window_rates(rate, tok, n_w), tok, 3000, 2, n_live=0)
    counts = np.concatenate([c0, c1], 1)
    group = np.concatenate([g0, np.full(3000, "rare", dtype=object)])
    t = trajectory_test(counts, wt, group)
    null = np.arange(len(group)) < 3000
    decl = np.arange(len(group)) >= len(g0)
    found = np.isin(t.outcome, ("falling", "died"))
    assert np.mean(found[null]) <= limit(3000)
    assert np.mean(found[decl]) >= 0.95
    assert (found & null).sum() / max(found.sum(), 1) <= ALPHA  # the false discovery proportion


def _decline_together(
    regime: str, rare: float, common
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tok, n_w = REGIMES[regime]
    t_mid = (np.arange(n_w) + 0.5) * tok
    return simulate(np.full(n_w, rare), tok, 3000, 3, common=common(t_mid, tok * n_w))


@pytest.mark.parametrize(
    "regime, rare, common",
    [
        ("65k x 38", 1e-4, lambda t, run: 10 ** (-1.5 * t / run)),  # steady sparsification
        ("1e7 x 50", 1e-6, lambda t, run: 10 ** (-1.5 * t / run)),
        ("360k x 24", 3e-5, lambda t, run: 1 + 9 * np.exp(-t / (0.1 * run))),  # early transient
    ],
    ids=["steady-65k", "steady-1e7", "transient-360k"],
)
def test_a_decline_shared_with_the_live_baseline_is_not_falling(regime, rare, common):
    counts, wt, group = _decline_together(regime, rare, common)
    m = group == "rare"
    t = trajectory_test(counts, wt, group)
    assert t.n_baseline == 300
    assert share(t, m, "falling") + share(t, m, "died") <= limit(m.sum())
    tested = m & np.isfinite(t.p_falling)
    assert np.mean(t.p_falling[tested] <= ALPHA) <= limit(tested.sum())
    # Without the baseline the same histories read as dying: the baseline is what prevents it.
    blind = trajectory_test(counts, wt, np.where(m, "rare", ""))
    assert blind.n_baseline == 0
    assert share(blind, m, "falling") + share(blind, m, "died") >= 0.9


def test_windows_before_the_resampling_and_in_the_burn_in_are_ignored():
    tok, n_w, event = 65_536, 40, 12 * 65_536  # resampled after window 12
    cfg = TrajectoryConfig(burn_in_tokens=4 * 65_536)
    start_w = np.arange(n_w) * tok
    rate = np.where(start_w < event, 1e-3, 1e-4)  # its previous life: irrelevant
    burn = (start_w >= event) & (start_w < event + cfg.burn_in_tokens)
    rate = np.where(burn, 1e-4 * 10 ** (1 - (start_w - event) / cfg.burn_in_tokens), rate)
    counts, wt, group = simulate(rate, tok, 2000, 5)
    m = group == "rare"
    seg = np.where(m, float(event), 0.0)
    t = trajectory_test(counts, wt, group, segment_start=seg, config=cfg)
    want = start_w >= event + cfg.burn_in_tokens
    assert (t.used[:, m] == want[:, None]).all() and (t.n_windows[m] == want.sum()).all()
    assert not t.used[:, ~m].any()
    assert share(t, m, "falling") + share(t, m, "died") <= limit(m.sum())
    # The same counts read from the start of training, or with no burn-in, are falling.
    whole = trajectory_test(counts, wt, group, config=cfg)
    assert share(whole, m, "falling") >= 0.9
    no_burn = TrajectoryConfig(burn_in_tokens=0)
    hot = trajectory_test(counts, wt, group, segment_start=seg, config=no_burn)
    assert share(hot, m, "falling") >= 0.9


def test_segment_starts_from_a_density_history():
    # 1,024 tokens per step, windows of 4 steps; the last window holds only 2 steps.
    window_tokens = np.array([4096] * 5 + [2048])
    end_step = np.array([4, 8, 12, 16, 20, 22])
    resampled = np.zeros((2, 4), dtype=bool)
    resampled[0, [1, 2]] = True
    resampled[1, 2] = True
    seen, start = segment_starts(window_tokens, end_step, np.array([8, 21]), resampled)
    assert seen.tolist() == [4096, 8192, 12288, 16384, 20480, 22528]
    assert start.tolist() == [0.0, 8 * 1024, 21 * 1024, 0.0]  # the last event counts
    none, start0 = segment_starts(window_tokens, end_step, np.zeros(0), np.zeros((0, 4), bool))
    assert (start0 == 0).all() and (none == seen).all()


def _control_group(dead: tuple[int, int]):
    """Constant features at 3e-6 on 360k x 24; the control group are those with no firings in
    the dead window (windows dead[0]..dead[1]-1), held out at the end of it, as the trainer
    picks them. Returns (counts, tokens_seen, window_tokens, group, control, naive and hold-out
    segment starts)."""
    tok, n_w = REGIMES["360k x 24"]
    counts, wt, group = simulate(np.full(n_w, 3e-6), tok, 20000, dead[0])
    rare = group == "rare"
    control = rare & (counts[dead[0] : dead[1]].sum(0) == 0)
    group = np.where(control, "control", np.where(rare, "", group))
    end_step = np.arange(1, n_w + 1) * 10
    event = np.array([dead[1] * 10])
    held = np.zeros((1, len(group)), dtype=bool)
    held[0, control] = True
    seen, naive = segment_starts(wt, end_step, event, np.zeros_like(held))
    _, start = segment_starts(wt, end_step, event, np.zeros_like(held), held_out=held)
    assert (start[control] == dead[1] * tok).all() and (naive == 0).all()
    return counts, seen, wt, group, control, naive, start


def test_the_control_group_is_tested_from_its_hold_out():
    # Tested over the windows that chose them, constant features read as falling or dead.
    counts, seen, wt, group, control, naive, start = _control_group((19, 22))
    t = trajectory_test(counts, wt, group, tokens_seen=seen, segment_start=naive)
    m = control & np.isfinite(t.p_falling)
    assert np.mean((t.p_falling[m] <= ALPHA) | (t.p_died[m] <= ALPHA)) > 2 * limit(m.sum())
    # From the hold-out on they are not (here two windows: too few to decide anything)...
    t = trajectory_test(counts, wt, group, tokens_seen=seen, segment_start=start)
    assert (t.outcome[control] == "unresolved").all()
    # ...and with an earlier hold-out the test keeps its size on the windows after it.
    counts, seen, wt, group, control, naive, start = _control_group((9, 12))
    t = trajectory_test(counts, wt, group, tokens_seen=seen, segment_start=start)
    m = control & np.isfinite(t.p_falling)
    assert m.sum() >= 200 and (t.n_windows[control] == 11).all()  # 12 after it, 1 burnt in
    assert np.mean(t.p_falling[m] <= ALPHA) <= limit(m.sum())
    assert np.mean(t.p_died[m] <= ALPHA) <= limit(m.sum())


def test_a_feature_that_stops_firing_died():
    tok, n_w = 65_536, 38
    rate = np.where(np.arange(n_w) < 19, 1e-4, 0.0)
    counts, wt, group = simulate(rate, tok, 1000, 6)
    m = group == "rare"
    t = trajectory_test(counts, wt, group)
    assert share(t, m, "died") >= 0.99
    # Expected firings in the silent stretch at the earlier rate: ~19 windows x 6.6 per window.
    assert np.median(t.expected[m]) == pytest.approx(19 * 1e-4 * tok, rel=0.15)


def test_overdispersion_is_estimated():
    t, m = planted("constant 1e-5, overdispersed x4", "1e7 x 50", n=1000)
    assert np.median(t.dispersion[m]) == pytest.approx(4, rel=0.1)
    assert t.dispersion_pool == pytest.approx(4, rel=0.1)
    t1, m1 = planted("constant 1e-5", "1e7 x 50", n=1000)
    assert np.median(t1.dispersion[m1]) == pytest.approx(1, rel=0.1)


def test_interval_covers_the_planted_trend():
    tok, n_w, trend = 1_000_000, 50, -0.1  # decades per 1e7 tokens
    rate = lambda t, run: 1e-4 * 10 ** (trend * t / 1e7)  # noqa: E731
    counts, wt, group = simulate(window_rates(rate, tok, n_w), tok, 4000, 8)
    t = trajectory_test(counts, wt, group)
    m = group == "rare"
    cover = np.mean((t.trend_low[m] <= trend) & (trend <= t.trend_high[m]))
    assert abs(cover - (1 - 2 * ALPHA)) <= 3 * math.sqrt(0.1 * 0.9 / 4000)
    assert np.median(t.trend[m]) == pytest.approx(trend, rel=0.05)
    assert share(t, m, "falling") >= 0.99  # significant, though inside the band: falling wins


@pytest.mark.parametrize("edge", [-0.3, 0.3])
def test_settled_is_calibrated_at_the_band_edge(edge):
    tok, n_w = 1_000_000, 50
    rate = lambda t, run: 1e-4 * 10 ** (edge * t / 1e7)  # noqa: E731
    counts, wt, group = simulate(window_rates(rate, tok, n_w), tok, 4000, 9)
    t = trajectory_test(counts, wt, group)
    m = group == "rare"
    assert np.mean(t.p_settled[m] <= ALPHA) <= limit(m.sum())
    assert share(t, m, "settled") <= limit(m.sum())


def test_summary_and_verdict():
    tok, n_w = REGIMES["65k x 38"]
    counts, wt, group = simulate(np.full(n_w, 1e-6), tok, 400, 10)
    group[:100] = "control"
    s = summarize(trajectory_test(counts, wt, group))
    json.dumps(s)  # goes into summary.json as it is
    assert s["n"] == 400 and s["by_group"]["control"]["n"] == 100
    assert s["by_group"]["rare"]["counts"]["unresolved"] == 300
    assert s["verdict"].startswith("Unresolved") and s["verdict"].count(". ") == 0
    assert (
        s["baseline"]["n_features"] == 300
        and abs(s["baseline"]["trend_decades_per_1e7_tokens"]) < 0.5
    )
    assert s["alpha"] == ALPHA and s["band_decades_per_1e7_tokens"] == CFG.band
    assert 0 < s["baseline"]["relative_se_max"] < 0.02  # 300 live features, ~65 firings each
    assert set(s["counts"]) == set(OUTCOMES)

    t, _ = planted("exponential 1e-4 -> 1e-7", "1e7 x 50", n=200)
    assert summarize(t)["verdict"].startswith("Mostly dying")
    t, _ = planted("constant 1e-6", "1e7 x 50", n=200)
    assert summarize(t)["verdict"].startswith("Mostly settled")
    assert (t.outcome[t.group == "live"] == NOT_TESTED).all()


def test_slope_fit_and_interval_match_a_direct_poisson_fit():
    from scipy import optimize

    from saekit.diagnostics.trend_fit import bound, fit_slope, loglik, scaled

    rng = np.random.default_rng(11)
    n_w, n_f = 9, 6
    used = np.ones((n_w, n_f), dtype=bool)
    used[:3, 0] = False  # a shorter history
    tokens = rng.integers(1000, 5000, n_w).astype(np.float64)
    t = np.arange(n_w, dtype=np.float64)
    y = rng.poisson(
        np.outer(tokens, 1e-3 * np.exp(-0.2 * np.arange(n_f))) * np.exp(-0.1 * t)[:, None]
    )
    y = np.where(used, y, 0).astype(np.float64)
    logw = np.where(used, np.log(tokens)[:, None], -np.inf)
    x, span = scaled(np.broadcast_to(t[:, None], used.shape), used)
    f = fit_slope(y, logw, x)
    for j in range(n_f):
        u = used[:, j]

        def nll(p, j=j, u=u):  # the full two-parameter Poisson likelihood
            mu = np.exp(np.log(tokens[u]) + p[0] + p[1] * x[u, j])
            return (mu - y[u, j] * np.log(mu)).sum()

        a0 = np.log(y[u, j].sum() / tokens[u].sum())
        direct = optimize.minimize(
            nll,
            [a0, 0.0],
            method="Nelder-Mead",
            options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20000},
        )
        assert f.b[j] == pytest.approx(direct.x[1], abs=1e-4)
    # The interval bound: the profile likelihood ratio equals k there.
    k = np.full(n_f, 2.706)
    for side in (-1, 1):
        b = bound(f, y, logw, x, k, side)
        assert ((b - f.b) * side > 0).all()
        np.testing.assert_allclose(2 * (f.loglik - loglik(b, y, logw, x)), k, rtol=1e-6)


def test_bh_matches_scipy():
    from scipy import stats

    p = np.random.default_rng(0).uniform(size=500) ** 3
    p[::7] = np.nan
    ok = np.isfinite(p)
    q = bh(p)
    assert np.isnan(q[~ok]).all()
    np.testing.assert_allclose(q[ok], stats.false_discovery_control(p[ok]), rtol=1e-12)


def test_bad_inputs_are_refused():
    counts = np.zeros((5, 3), dtype=np.int64)
    with pytest.raises(SaekitError, match="window_tokens"):
        trajectory_test(counts, np.ones(4), ["rare"] * 3)
    with pytest.raises(SaekitError, match="features"):
        trajectory_test(counts, np.ones(5), ["rare"] * 2)
    with pytest.raises(SaekitError, match=">= 0"):
        trajectory_test(counts - 1, np.ones(5), ["rare"] * 3)
    with pytest.raises(SaekitError, match="increase"):
        trajectory_test(counts, np.ones(5), ["rare"] * 3, tokens_seen=np.ones(5))
    with pytest.raises(SaekitError, match="min_windows"):
        trajectory_test(counts, np.ones(5), ["rare"] * 3, config=TrajectoryConfig(min_windows=2))
    with pytest.raises(SaekitError, match="alpha"):
        trajectory_test(counts, np.ones(5), ["rare"] * 3, config=TrajectoryConfig(alpha=0.5))
    with pytest.raises(SaekitError, match="events"):
        segment_starts(np.ones(5), np.arange(1, 6), np.array([2]), np.zeros(3, dtype=bool))
