"""Calibration of the trajectory test (diagnostics/trajectory.py) on planted Poisson histories.

    python -m saekit.scripts.experiments.calibrate_trajectory                   # ~30 s on 2 cores
    python -m saekit.scripts.experiments.calibrate_trajectory --features 1000   # quicker, coarser
    python -m saekit.scripts.experiments.calibrate_trajectory --regimes 131072x32   # your windows

Each scenario plants `--features` member features with a known rate over training, beside 300
live features at 1e-3 (the baseline; in one scenario everyone, live features included, declines
by the same 1.5 decades over the run), simulates their firing counts per window
(Poisson with the window's mean rate times its tokens; the overdispersed scenario draws
gamma-Poisson counts with variance 4x the mean), runs the test with its defaults and prints, per
scenario and window regime, the share of members called falling / settled / died / unresolved,
and the share of the tested ones whose raw p-value (before Benjamini-Hochberg) of falling or of
died is at most alpha: the test's size for constant features, its power for decaying ones
(BH's own error rate is only checked when most features are null). Time t is in tokens from the
start of training; the hyperbolic scenario's tau is 50 windows of the rare-feature experiment
(50 x 65,536 tokens), so it decays the same way in every regime.
tests/test_trajectory.py asserts on the same scenarios.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from saekit.sae.errors import SaekitError

# (tokens per window, windows): the rare-feature experiment's windows, a short segment after a
# late resampling, fewer larger windows, and long runs.
REGIMES: dict[str, tuple[int, int]] = {
    "65k x 38": (65_536, 38),
    "65k x 12": (65_536, 12),
    "360k x 24": (360_448, 24),
    "1e7 x 50": (10_000_000, 50),
    "1e8 x 50": (100_000_000, 50),
}
TAU_HYPERBOLIC = 50 * 65_536  # tokens


def _hyperbolic(t: np.ndarray, run: float) -> np.ndarray:
    return 1e-4 / (1 + t / TAU_HYPERBOLIC)


def _exponential(t: np.ndarray, run: float) -> np.ndarray:
    return 1e-4 * 10 ** (-3 * t / run)


class Scenario(NamedTuple):
    rate: Callable[[np.ndarray, float], np.ndarray]  # (t tokens, run tokens) -> member density
    dispersion: float = 1.0  # variance / mean of the members' counts
    common: Callable[[np.ndarray, float], np.ndarray] | None = None  # shared by live and members


SCENARIOS: dict[str, Scenario] = {
    "constant 1e-5": Scenario(lambda t, run: np.full_like(t, 1e-5)),
    "constant 1e-6": Scenario(lambda t, run: np.full_like(t, 1e-6)),
    "constant 3e-7": Scenario(lambda t, run: np.full_like(t, 3e-7)),
    "constant 1e-5, overdispersed x4": Scenario(lambda t, run: np.full_like(t, 1e-5), 4.0),
    "1e-5 x everyone's decline (1.5 decades)": Scenario(
        lambda t, run: np.full_like(t, 1e-5), common=lambda t, run: 10 ** (-1.5 * t / run)
    ),
    "exponential 1e-4 -> 1e-7": Scenario(_exponential),
    "hyperbolic 1e-4/(1+t/tau)": Scenario(_hyperbolic),
}


def window_rates(
    rate: Callable[[np.ndarray, float], np.ndarray], window_tokens: int, n_windows: int
) -> np.ndarray:
    """[W] each window's mean density (midpoint rule on 32 sub-intervals per window)."""
    run = float(window_tokens * n_windows)
    sub = (np.arange(n_windows)[:, None] + (np.arange(32)[None, :] + 0.5) / 32) * window_tokens
    return rate(sub, run).mean(1)


def simulate(
    rates: np.ndarray,
    window_tokens: int,
    n_features: int,
    seed: int,
    dispersion: float = 1.0,
    n_live: int = 300,
    live_rate: float = 1e-3,
    common: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Planted counts: (counts [W, n_features + n_live], window_tokens [W], group [F]) with
    members ("rare") at density rates[w] and live features ("live") at live_rate, all multiplied
    by common[w] (a shared trend, e.g. global sparsification) when given."""
    rng = np.random.default_rng(seed)
    n_w = len(rates)
    c = np.ones(n_w) if common is None else np.asarray(common, np.float64)
    mu_rare = np.broadcast_to((rates * c * window_tokens)[:, None], (n_w, n_features))
    if dispersion > 1:  # gamma-Poisson: mean mu, variance dispersion * mu
        mu_rare = rng.gamma(mu_rare / (dispersion - 1), dispersion - 1)
    rare = rng.poisson(mu_rare)
    live = rng.poisson(np.broadcast_to((live_rate * c * window_tokens)[:, None], (n_w, n_live)))
    group = np.array(["rare"] * n_features + ["live"] * n_live, dtype=object)
    return np.concatenate([rare, live], 1), np.full(n_w, window_tokens), group


def parse_regime(text: str) -> tuple[int, int]:
    """(tokens per window, windows) from TOKENSxWINDOWS, e.g. 131072x31."""
    tok, sep, n_w = text.partition("x")
    if not (sep and tok.isdigit() and n_w.isdigit() and int(tok) > 0 and int(n_w) > 1):
        raise SaekitError(f"regime {text!r}: give TOKENSxWINDOWS, e.g. 131072x31")
    return int(tok), int(n_w)


def run_scenario(scenario: str, regime: str, n_features: int, seed: int, config=None) -> dict:
    """Simulate one scenario on one window regime (a REGIMES name or TOKENSxWINDOWS) and test it:
    outcome shares among members."""
    from saekit.diagnostics.trajectory import OUTCOMES, trajectory_test

    sc = SCENARIOS[scenario]
    tok, n_w = REGIMES[regime] if regime in REGIMES else parse_regime(regime)
    common = None if sc.common is None else window_rates(sc.common, tok, n_w)
    rates = window_rates(sc.rate, tok, n_w)
    counts, wt, group = simulate(rates, tok, n_features, seed, sc.dispersion, common=common)
    t = trajectory_test(counts, wt, group, config=config)
    m = group == "rare"
    alpha = t.config.alpha
    tested = m & np.isfinite(t.p_falling)
    row = {o: float(np.mean(t.outcome[m] == o)) for o in OUTCOMES}
    row["n"] = int(m.sum())
    row["tested"] = int(tested.sum())
    row["raw_falling"] = float(np.mean(t.p_falling[tested] <= alpha)) if tested.any() else None
    row["raw_died"] = float(np.mean(t.p_died[tested] <= alpha)) if tested.any() else None
    row["firings"] = float(np.median(t.firings[m]))
    row["dispersion"] = float(np.nanmedian(t.dispersion[m])) if tested.any() else None
    return row


@dataclass
class CalibrateConfig:
    """Print the trajectory test's calibration table: planted scenarios x window regimes."""

    features: int = 10_000
    """planted member features per scenario and regime"""
    seed: int = 0
    """seed of the simulation"""
    regimes: list[str] = field(default_factory=list)
    """window regimes as TOKENSxWINDOWS, e.g. 131072x31 (empty: the built-in ones)"""


def calibrate(cfg: CalibrateConfig) -> list[dict]:
    from saekit.diagnostics.trajectory import TrajectoryConfig

    tc = TrajectoryConfig()
    print(
        f"trajectory test calibration: {cfg.features} planted features per cell, 300 live at "
        f"1e-3 as the baseline, alpha {tc.alpha:g} (BH), band +-{tc.band:g} decades per 1e7 "
        f"tokens, burn-in {tc.burn_in_tokens:,} tokens, min firings {tc.min_firings}, seed {cfg.seed}"
    )
    head = (
        "| scenario | windows | median firings | tested | falling | settled | died | unresolved "
        "| raw p_falling <= alpha | raw p_died <= alpha |"
    )
    print(head)
    print("|" + "---|" * 10)
    rows = []
    for r in cfg.regimes:
        parse_regime(r)
    for i, scenario in enumerate(SCENARIOS):
        for j, regime in enumerate(cfg.regimes or REGIMES):
            r = run_scenario(scenario, regime, cfg.features, cfg.seed + 100 * i + j)
            rows.append({"scenario": scenario, "regime": regime, **r})
            # A share of fewer than 100 tested features says little: not printed.
            raw = "- | -" if r["tested"] < 100 else f"{r['raw_falling']:.3f} | {r['raw_died']:.3f}"
            print(
                f"| {scenario} | {regime} | {r['firings']:.0f} | {r['tested']}/{r['n']} | "
                f"{r['falling']:.3f} | {r['settled']:.3f} | {r['died']:.3f} | "
                f"{r['unresolved']:.3f} | {raw} |",
                flush=True,
            )
    print(f"calibrate_trajectory: {len(rows)} cells of {cfg.features} features each")
    return rows


def main(argv: list[str] | None = None) -> None:
    from saekit.scripts.cli import run_script

    run_script(
        "saekit.scripts.experiments.calibrate_trajectory",
        __doc__,
        CalibrateConfig,
        calibrate,
        argv,
    )


if __name__ == "__main__":
    main()
