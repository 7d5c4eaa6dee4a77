"""Benchmark the synthetic activation source (issue 17) against the SAE training step it feeds.

The source: `SyntheticSource.batch(i, 4096)` at the default config (d_in 64, 512 true features,
L0 ~3.3), rows and their active sets. The step: relu_l1 and topk (k 32) SAEs with 1,024 features
on d_in 64, batch 4096, as `Trainer.train_step` does it without the data and the density update:
`FastStep` (loss and gradients), the decoder-gradient projection, fused Adam, decoder renormalisation. Target:
a step takes >= 10x as long as the batch it trains on takes to make.

Both run in the same process, interleaved, and the medians of --reps repetitions after --warmup
are compared, so load from other processes affects both. On a shared machine the wall clock of a
2-thread run swings with the load; --cpu-time instead times each call by its thread's CPU clock
with one torch thread: the ratio of the work done, steadier under load, but not the 2-thread
wall-clock ratio (the step's kernels use both cores, the source's noise draw does not).

    python -m saekit.scripts.bench.synthetic [--reps 30] [--warmup 3] [--cpu-time]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from saekit.activations.synthetic import SyntheticConfig, SyntheticSource
from saekit.sae.fast_step import FastStep
from saekit.sae.model import SAE, SAEConfig

D_IN, FEATURES, BATCH = 64, 1024, 4096


def sae_step(arch: str, x: torch.Tensor) -> Callable[[], None]:
    sae = SAE(SAEConfig(arch, D_IN, FEATURES, k=32))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3, fused=True)
    forward_backward = FastStep(sae)

    def step() -> None:
        forward_backward(x, l1_coef=1.0)
        sae.remove_parallel_decoder_grad()
        opt.step()
        sae.normalize_decoder()

    return step


def interleaved(
    fns: list[Callable[[], object]],
    reps: int,
    warmup: int,
    clock: Callable[[], float] = time.perf_counter,
) -> list[float]:
    """Median seconds of each function by `clock`, run in turn reps + warmup times."""
    times: list[list[float]] = [[] for _ in fns]
    for r in range(warmup + reps):
        for fn, ts in zip(fns, times, strict=True):
            t0 = clock()
            fn()
            if r >= warmup:
                ts.append(clock() - t0)
    return [statistics.median(ts) for ts in times]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=30, help="timed repetitions")
    p.add_argument("--warmup", type=int, default=3, help="untimed repetitions first")
    p.add_argument("--cpu-time", action="store_true", help="one thread, timed by its CPU clock")
    a = p.parse_args()
    if a.cpu_time:
        torch.set_num_threads(1)
    clock = time.thread_time if a.cpu_time else time.perf_counter
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {clock.__name__}")
    src = SyntheticSource(SyntheticConfig(d_in=D_IN))
    counter = iter(range(10**9))
    make = lambda: src.batch(next(counter), BATCH)  # noqa: E731
    active = lambda: src.active(next(counter), BATCH)  # noqa: E731
    x = src.batch(0, BATCH).x
    steps = {arch: sae_step(arch, x) for arch in ("relu_l1", "topk")}
    t_make, t_active, *t_steps = interleaved(
        [make, active, *steps.values()], a.reps, a.warmup, clock
    )
    print(
        f"source: {src.n_true} true features, d_in {D_IN}, L0 {src.p.sum():.2f}; batch {BATCH}: "
        f"{t_make * 1e3:.2f} ms ({BATCH / t_make:,.0f} rows/s), active sets alone "
        f"{t_active * 1e3:.2f} ms; 1e8 rows take {1e8 / BATCH * t_make / 60:.1f} min"
    )
    for arch, t in zip(steps, t_steps, strict=True):
        print(
            f"{arch}, {FEATURES} features, batch {BATCH}: step {t * 1e3:.1f} ms; "
            f"step / batch = {t / t_make:.1f}x (target >= 10)"
        )


if __name__ == "__main__":
    main()
