"""Benchmark the mechanism checks' cost (training/mechanisms.py; target <= 3% of training time).

relu_l1, --features features, batch 4096, d_in 512, float32, on a synthetic on-disk cache (the
training bench's): two Trainers set up as `train()` sets them up, one recording the mechanism
checks (--mechanisms) and one not, each training whole density windows of --window-steps steps
(the default window is 1% of training: 30 steps of a 3,000-step run), interleaved, --reps times
after --warmup (in the order on off, off on, ...). Reported: the median window time of each and
their ratio, in wall time and in this process's CPU time, and, measured alone,
one recording as training makes it (`margin` of the step's pre-activations, then
`mechanism_row` on the batch) against one step, with the overhead that implies for windows of
16, 30 and 100 steps.

    python -m saekit.scripts.bench.mechanisms [--features 4096] [--window-steps 30] [--reps 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from saekit.scripts.bench.train import (
    BATCH,
    interleaved,
    make_trainer,
    step_fn,
    write_synthetic_cache,
)
from saekit.training.mechanisms import margin, mechanism_row


def window_fn(trainer, steps: int):
    """Train one density window (the last step closes it, and records when mechanisms are on)."""
    step, close = step_fn(trainer)

    def run() -> None:
        for _ in range(steps):
            step()

    return run, close


def two_clocks(a, b, reps: int, warmup: int) -> tuple[list[float], ...]:
    """Wall and process CPU times of a() and b(), in the order a b, b a, a b, ... (drift in the
    load then falls on both); CPU time counts only this process's, which a shared machine's
    other work disturbs less than wall time."""
    out: tuple[list[float], ...] = ([], [], [], [])  # wall a, wall b, cpu a, cpu b
    for i in range(warmup + reps):
        for j in (0, 1) if i % 2 == 0 else (1, 0):
            w, c = time.perf_counter(), time.process_time()
            (a, b)[j]()
            if i >= warmup:
                out[j].append(time.perf_counter() - w)
                out[2 + j].append(time.process_time() - c)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", type=int, default=4096)
    ap.add_argument("--window-steps", type=int, default=30)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        cache = write_synthetic_cache(Path(tmp) / "cache")
        kw = dict(features=args.features, density_window=args.window_steps * BATCH)
        on = make_trainer(cache, Path(tmp) / "on", mechanisms=True, **kw)
        off = make_trainer(cache, Path(tmp) / "off", mechanisms=False, **kw)
        (run_on, close_on), (run_off, close_off) = (
            window_fn(on, args.window_steps),
            window_fn(off, args.window_steps),
        )
        times = two_clocks(run_on, run_off, args.reps, args.warmup)
        close_on(), close_off()
        assert len(on.mechanisms) == (args.reps + args.warmup) and off.mechanisms is None
        for clock, (t_on, t_off) in (("wall", times[:2]), ("CPU", times[2:])):
            m_on, m_off = statistics.median(t_on), statistics.median(t_off)
            print(
                f"relu_l1 {args.features} features, batch {BATCH}, windows of "
                f"{args.window_steps} steps, {clock} time: {m_on:.3f}s with mechanisms, "
                f"{m_off:.3f}s without: ratio {m_on / m_off:.4f} ({100 * (m_on / m_off - 1):+.2f}%)"
            )
        # One recording against one step, alone (the ratio above is noisier: +-1% of a window).
        stream = on.source.batches(BATCH, 0)
        x = next(stream)
        stream.close()
        step, close = step_fn(off)
        pre = on.sae.pre_acts(x).detach()  # what the step's forward hands over

        def record() -> None:
            mechanism_row(on.sae, x, 1.0, step_margin=margin(on.sae, pre))

        t_rec, t_step = interleaved([record, step], args.reps * 4, args.warmup)
        close()
        r, s = statistics.median(t_rec), statistics.median(t_step)
        implied = ", ".join(f"{w} steps {100 * r / (w * s):.2f}%" for w in (16, 30, 100))
        print(f"one recording {r * 1e3:.1f} ms, one step {s * 1e3:.1f} ms: per window of {implied}")


if __name__ == "__main__":
    main()
