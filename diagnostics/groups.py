"""Who the trajectory test tests, on which windows, against which baseline: the run-dir side of
diagnostics/trajectory.py for `saekit diagnose`.

- `control`: the held-out control group (density_history's `control_mask`), each tested from
  its hold-out on (it was chosen for silence over the dead window before it).
- `rare`: every other feature whose density over its *selection windows* (the first
  `selection_fraction` of its windows after burn-in, since its last resampling) is above 0 and
  below `rare_threshold`. It is tested on the windows after those only: a feature chosen for
  being rare in some windows is biased toward falling over those same windows, never over
  later ones (the counts of disjoint windows are independent given the rate).
- `live`: the baseline: never resampled, not a member, and at or above `rare_threshold` over
  its windows after burn-in. Its common trend is divided out, so global sparsification is not
  read as dying.
- `""`: everything else (dead in its selection windows, or resampled but not rare): not tested.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from ..training.run import History
    from .config import DiagnoseConfig
    from .trajectory import Trajectory, TrajectoryConfig

GROUPS = ("control", "rare", "live")


class Groups(NamedTuple):
    group: np.ndarray  # [F] str: "control", "rare", "live" or ""
    segment_start: np.ndarray  # [F] tokens: what the test's burn-in counts from
    tokens_seen: np.ndarray  # [W] tokens seen at each window's end
    selection_density: np.ndarray  # [F] density over the selection windows (NaN: none)


def trajectory_config(cfg: DiagnoseConfig) -> TrajectoryConfig:
    from .trajectory import TrajectoryConfig

    return TrajectoryConfig(
        alpha=cfg.alpha,
        band=cfg.band,
        burn_in_tokens=cfg.burn_in_tokens,
        min_firings=cfg.min_firings,
    )


def choose_groups(
    hist: History, rare_threshold: float, selection_fraction: float, burn_in_tokens: int
) -> Groups:
    """The groups and each member's segment start (see the module docstring)."""
    from .trajectory import segment_starts

    counts = hist.counts.numpy()
    wt = hist.window_tokens.numpy().astype(np.int64)
    seen, start = segment_starts(
        wt, hist.window_end_step.numpy(), hist.resample_steps.numpy(),
        hist.resampled.numpy(), held_out=hist.held_out.numpy(),
    )  # fmt: skip
    control = hist.control_mask.numpy().astype(bool)
    avail = (seen - wt)[:, None] >= start[None, :] + burn_in_tokens  # [W, F] after burn-in
    n_avail = avail.sum(0)
    n_sel = np.ceil(selection_fraction * n_avail).astype(np.int64)
    sel = avail & (np.cumsum(avail, 0) <= n_sel[None, :])
    sel_tokens = (sel * wt[:, None]).sum(0)
    sel_counts = np.where(sel, counts, 0).sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        sel_density = np.where(sel_tokens > 0, sel_counts / sel_tokens, np.nan)
    rare = ~control & (sel_counts > 0) & (sel_density < rare_threshold)
    # A rare member's windows start where its selection windows end: its segment start moves
    # so that start + burn-in falls there.
    sel_end = np.where(sel, seen[:, None], 0).max(0)
    segment_start = np.where(rare, sel_end - burn_in_tokens, start).astype(np.float64)
    av_tokens = (avail * wt[:, None]).sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        density = np.where(avail, counts, 0).sum(0) / av_tokens
    live = ~control & ~rare & (start <= 0) & (av_tokens > 0) & (density >= rare_threshold)
    group = np.where(control, "control", np.where(rare, "rare", np.where(live, "live", "")))
    return Groups(group.astype(object), segment_start, seen.astype(np.float64), sel_density)


def run_trajectory(cfg: DiagnoseConfig, hist: History | None) -> tuple[Trajectory | None, dict]:
    """The trajectory test on a run's density history, and its summary.json entry."""
    if hist is None or not len(hist.counts):
        return None, {"verdict": "No density history in the run dir: no trajectory test."}
    from .trajectory import summarize, trajectory_test

    g = choose_groups(hist, cfg.rare_threshold, cfg.selection_fraction, cfg.burn_in_tokens)
    t = trajectory_test(
        hist.counts.numpy(),
        hist.window_tokens.numpy(),
        g.group,
        tokens_seen=g.tokens_seen,
        segment_start=g.segment_start,
        config=trajectory_config(cfg),
    )
    summary = summarize(t)
    for name in ("control", "rare"):  # both always listed, so readers need not check
        summary["by_group"].setdefault(name, _empty_group())
    live = (g.group == "live") & (g.segment_start <= 0)
    first = t.tokens_seen - t.window_tokens >= cfg.burn_in_tokens
    tok = float(t.window_tokens[first].sum())
    summary["baseline"]["mean_density"] = (
        float(hist.counts.numpy()[first][:, live].sum() / tok / live.sum())
        if live.any() and tok
        else None
    )
    summary["selection"] = (
        f"control: the held-out control group, tested from its hold-out on; rare: firing but "
        f"below density {cfg.rare_threshold:g} over the first {cfg.selection_fraction:g} of "
        "its windows after burn-in (since its last resampling), tested on the windows after "
        f"those; live baseline: never resampled, at or above {cfg.rare_threshold:g}"
    )
    summary["trend_units"] = "decades per 1e7 tokens, relative to the live baseline"
    return t, summary


def _empty_group() -> dict:
    from .trajectory import OUTCOMES

    zero = dict.fromkeys(OUTCOMES, 0)
    return {"n": 0, "n_tested": 0, "counts": zero, "fractions": dict.fromkeys(OUTCOMES)}
