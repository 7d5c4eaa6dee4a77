"""Benchmark the training step of each architecture against the autograd step of the same arch
(issue 20), on scripts/bench/train.py's synthetic cache (d_in 512, float32, batch 4096).

For each arch: `Trainer.train_step` (data, loss and gradients, decoder projection, Adam,
constraints, threshold update, density tracking) with the step training uses (FastStep: the
hand-written step where the arch has one, else autograd on sae/model.py's forward) and with
`autograd_step` forced, interleaved in one process, medians of --reps after --warmup compared.
For archs without a hand-written step the two are the same code: their ratio shows the noise.
BatchTopK archs run with AuxK on (dead window 1 step; k_aux 256) and 5% of latents unable to
fire, as scripts/bench/train.py's topk case. Also the relu_l1 hand-written step at the same
width, as the yardstick the autograd-only archs can be read against.

    python -m saekit.scripts.bench.archs [--features 16384] [--reps 5] [--warmup 1] [--archs ...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from saekit.sae.archs import ARCHS
from saekit.sae.fast_step import autograd_step, has_fast_step
from saekit.scripts.bench.train import (
    BATCH,
    D_IN,
    interleaved,
    make_trainer,
    step_fn,
    write_synthetic_cache,
)

NEW = ("batchtopk", "matryoshka", "jumprelu", "gated")


def pair(cache: Path, tmp: Path, arch: str, features: int, reps: int, warmup: int):
    kw: dict = dict(arch=arch, features=features)
    if ARCHS[arch].uses_k:
        kw.update(k=32, k_aux=256, dead_window=1)
    ours = make_trainer(cache, tmp / f"{arch}-ours", **kw)
    ref = make_trainer(cache, tmp / f"{arch}-autograd", **kw)
    ref.sae.load_state_dict(ours.sae.state_dict())
    ref.forward_backward = lambda x, l1, dead: autograd_step(ref.sae, x, l1, dead)
    if ARCHS[arch].aux_loss == "auxk":
        g = torch.Generator().manual_seed(1)
        dead = torch.rand(features, generator=g) < 0.05
        for t in (ours, ref):
            with torch.no_grad():
                t.sae.b_enc[dead] = -1000.0  # never fire: AuxK at its full cost
    (f_ours, c_ours), (f_ref, c_ref) = step_fn(ours), step_fn(ref)
    t_ours, t_ref = interleaved([f_ours, f_ref], reps, warmup)
    c_ours(), c_ref()
    return statistics.median(t_ours), statistics.median(t_ref)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--features", type=int, default=16384)
    p.add_argument("--reps", type=int, default=5, help="timed repetitions")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
    p.add_argument("--archs", nargs="*", default=list(NEW), help="archs to time")
    a = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; d_in {D_IN}, "
          f"{a.features} features, batch {BATCH}, float32")  # fmt: skip
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        cache = write_synthetic_cache(tmp / "cache")
        base, _ = pair(cache, tmp, "relu_l1", a.features, a.reps, a.warmup)
        print(f"relu_l1 (hand-written step, yardstick): {base:.3f} s/step")
        for arch in a.archs:
            ours, ref = pair(cache, tmp, arch, a.features, a.reps, a.warmup)
            kind = (
                "hand-written" if has_fast_step(ARCHS[arch]) else "autograd (no hand-written step)"
            )
            print(f"{arch}: training step [{kind}] {ours:.3f} s, autograd step {ref:.3f} s; "
                  f"speed-up {ref / ours:.2f}x; {ours / base:.2f}x relu_l1's step")  # fmt: skip


if __name__ == "__main__":
    main()
