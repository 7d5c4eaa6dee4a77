"""Benchmark a training step (issues 4 and 21) on a synthetic on-disk cache (d_in 512, float32).

1. relu_l1, 4096 features, batch 4096, dense: the time of the step's five bare matmuls
   (x @ W_enc, f @ W_dec, f^T @ g, g @ W_dec^T, x^T @ g_pre; same shapes and layouts,
   preallocated outputs) divided by the time of the trainer's full step (`Trainer.train_step` on
   the next batch of a `CacheReader`: data reading, loss and gradients, decoder-gradient
   projection, Adam, renormalisation, density tracking). Target >= 0.9.
2. relu_l1, 16384 features, batch 4096, at a planted L0 (--l0, default 60: b_enc set so that
   each feature fires on L0/16384 of a cache sample; lr 1e-6 keeps it there while timing; the
   measured L0 comes out a little higher, so the default plants 60): five
   bare float32 matmuls of these shapes / the full step, which runs sparse (the trainer's
   L0 hint, from one-step density windows), with float32 and with bfloat16 matmuls (--matmul-dtype).
   Targets >= 3 and >= 5.
3. topk, k 32, 16384 features, batch 4096: our step against the same step with a dense decoder
   (dense [B, d_sae] activations decoded by a matmul, gradients by autograd), both through
   `Trainer.train_step` with the same optimizer and data; without AuxK, and with AuxK
   (k_aux 256) at full load (5% of latents dead). Target >= 2x. And our full step with bfloat16
   matmuls / one bare float32 encoder matmul (x @ W_enc). Target <= 0.75.
--crossover: FastStep alone (loss and gradients), dense against sparse, at several L0 of 16384
features, float32 and bfloat16 matmuls: where sae/fast_step.py's SPARSE_BELOW comes from.
--profile: the topk bfloat16 step of 3. by op (torch.profiler), against one float32 encoder matmul.

Both sides of each comparison run in the same process, interleaved, and the medians of --reps
repetitions after --warmup are compared, so load from other processes affects both.

    python -m saekit.scripts.bench.train [--reps 9] [--warmup 2] [--topk-reps 5] [--l0 60]
    python -m saekit.scripts.bench.train --only sparse     # 2. and topk's bfloat16 ratio only
    python -m saekit.scripts.bench.train --crossover
    python -m saekit.scripts.bench.train --profile         # the topk bfloat16 step's parts
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from saekit.activations.cache_files import write_cache
from saekit.activations.source import CacheSource
from saekit.sae.fast_step import FastStep, StepOutput
from saekit.sae.model import SAE
from saekit.training.config import TrainConfig
from saekit.training.loop import Trainer

D_IN, BATCH, WIDE = 512, 4096, 16384


def write_synthetic_cache(
    out: Path, n_rows: int = 65_536, shard_rows: int = 8192, seed: int = 0
) -> Path:
    """A cache in activations/cache_format.py's format: sparse non-negative sums of random directions."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(2048, D_IN, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    shards = []
    for s in range(0, n_rows, shard_rows):
        n = min(shard_rows, n_rows - s)
        codes = (torch.rand(n, len(D), generator=g) < 0.01) * torch.rand(n, len(D), generator=g)
        a = (codes @ D + 0.05 * torch.randn(n, D_IN, generator=g)).relu()
        shards.append({"activations": a, "tokens": torch.zeros(n), "context": torch.arange(s, s + n),
                       "position": torch.ones(n)})  # fmt: skip
    return write_cache(out, shards)


def make_trainer(cache: Path, out: Path, **kw) -> Trainer:
    """A Trainer set up as `train()` sets it up (fresh start), without running the loop."""
    cfg = TrainConfig(cache=str(cache), out=str(out), batch_size=BATCH, steps=10**6,
                      resample="none", checkpoint_every=0, dtype="float32", **kw)  # fmt: skip
    source = CacheSource(cache)
    res = cfg.resolve(source.d_in, source.mean_norm, source.n_rows)
    out.mkdir(parents=True)
    trainer = Trainer(cfg, res, source, out)
    trainer.init_fresh()
    return trainer


def step_fn(trainer: Trainer) -> tuple[Callable[[], StepOutput], Callable[[], None]]:
    """The trainer's full step on the source's next batch (as `Trainer.fit` reads it), and a
    function closing the stream."""
    cfg = trainer.cfg
    batches = trainer.source.batches(
        cfg.batch_size, cfg.seed, start_batch=trainer.step, device=cfg.device, dtype=trainer.dtype
    )
    return (lambda: trainer.train_step(next(batches))), batches.close


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(fns: list[Callable[[], object]], reps: int, warmup: int) -> list[list[float]]:
    times: list[list[float]] = [[] for _ in fns]
    for i in range(warmup + reps):
        for fn, ts in zip(fns, times, strict=True):
            t = timed(fn)
            if i >= warmup:
                ts.append(t)
    return times


def bare_matmuls(sae: SAE, only_encoder: bool = False) -> Callable[[], None]:
    """The relu step's five float32 matmuls as FastStep's dense step calls them, into
    preallocated outputs (or the encoder's alone)."""
    W_enc, W_dec = sae.W_enc.detach(), sae.W_dec.detach()
    d_sae = W_enc.shape[1]
    x, g = torch.randn(BATCH, D_IN), torch.randn(BATCH, D_IN)
    f, g_pre = torch.rand(BATCH, d_sae), torch.randn(BATCH, d_sae)
    recon, dW_dec, dW_enc = (
        torch.empty(BATCH, D_IN),
        torch.empty_like(W_dec),
        torch.empty_like(W_enc),
    )

    def run() -> None:
        torch.mm(x, W_enc, out=f)
        if only_encoder:
            return
        torch.mm(f, W_dec, out=recon)
        torch.mm(f.t(), g, out=dW_dec)
        torch.mm(g, W_dec.t(), out=g_pre)
        torch.mm(x.t(), g_pre, out=dW_enc)

    return run


def dense_topk_step(sae: SAE, x, l1_coef=0.0, dead_mask=None) -> StepOutput:
    """The same TopK step written densely: [B, d_sae] activations, matmul decoder, autograd."""
    k, B = sae.cfg.k, x.shape[0]
    with torch.enable_grad():
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        vals, idx = pre.topk(k, dim=-1, sorted=False)
        f = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
        recon = f @ sae.W_dec + sae.b_dec
        mse = (recon - x).pow(2).sum() / B
        aux = x.new_zeros(())
        if dead_mask is not None:
            k_aux = min(sae.cfg.k_aux, sae.cfg.d_sae)
            a_vals, a_idx = pre.masked_fill(~dead_mask, -math.inf).topk(k_aux, sorted=False)
            f_aux = torch.zeros_like(pre).scatter(-1, a_idx, a_vals.relu())
            resid = (x - recon).detach()
            aux = (f_aux @ sae.W_dec - resid).pow(2).sum() / B * dead_mask.any()
        loss = mse + sae.cfg.aux_coef * aux
        sae.zero_grad(set_to_none=True)
        loss.backward()
    # Counted from the kept latents, as ours: no dense pass charged to the baseline here.
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.int64)
    fired.index_add_(0, idx.reshape(-1), (vals > 0).reshape(-1).long())
    return StepOutput(loss.detach(), mse.detach(), x.new_zeros(()), aux.detach(), fired)


def topk_pair(cache: Path, tmp: Path, name: str, dead_frac: float, reps: int, warmup: int):
    kw = dict(arch="topk", features=WIDE, k=32, dead_window=1)
    if dead_frac == 0:
        kw["aux_coef"] = 0.0
    ours = make_trainer(cache, tmp / f"{name}-ours", **kw)
    dense = make_trainer(cache, tmp / f"{name}-dense", **kw)
    dense.sae.load_state_dict(ours.sae.state_dict())
    dense.forward_backward = lambda x, l1, dead: dense_topk_step(dense.sae, x, l1, dead)
    if dead_frac:
        # Latents that can never fire (b_enc -1000): dead after the first step, so AuxK runs
        # with k_aux = 256 of them per row, its full cost.
        g = torch.Generator().manual_seed(1)
        dead = torch.rand(ours.res.d_sae, generator=g) < dead_frac
        for t in (ours, dense):
            with torch.no_grad():
                t.sae.b_enc[dead] = -1000.0
    (ours_step, ours_close), (dense_step, dense_close) = step_fn(ours), step_fn(dense)
    t_ours, t_dense = interleaved([ours_step, dense_step], reps, warmup)
    ours_close(), dense_close()
    return statistics.median(t_ours), statistics.median(t_dense)


@torch.no_grad()
def plant_l0(trainer: Trainer, l0: float) -> None:
    """Set b_enc so that each feature fires on l0 / d_sae of a 4096-row cache sample."""
    sae = trainer.sae
    x = trainer.source.sample(BATCH, 1).to(sae.W_enc.dtype)
    pre = sae.pre_acts(x)
    k = max(1, round(BATCH * (1 - l0 / sae.cfg.d_sae)))
    sae.b_enc.sub_(pre.kthvalue(k, dim=0).values)


def mean_l0(fn: Callable[[], StepOutput], l0s: list[float]) -> Callable[[], None]:
    """`fn`, recording each step's L0 (a host read: free on the CPU)."""

    def run() -> None:
        out = fn()
        l0s.append(out.fired.sum().item() / BATCH)

    return run


def sparse_relu(cache: Path, tmp: Path, l0: float, reps: int, warmup: int) -> None:
    """2.: the relu_l1 full step at a planted L0, float32 and bfloat16 matmuls, against five bare
    float32 matmuls of its shapes."""
    # one-step density windows give the L0 hint every step; no mechanism checks at each window
    kw = dict(arch="relu_l1", features=WIDE, lr=1e-6, density_window=BATCH, mechanisms=False)
    f32 = make_trainer(cache, tmp / "sparse-f32", **kw)
    plant_l0(f32, l0)
    bf16 = make_trainer(cache, tmp / "sparse-bf16", matmul_dtype="bfloat16", **kw)
    bf16.sae.load_state_dict(f32.sae.state_dict())
    (s32, c32), (s16, c16) = step_fn(f32), step_fn(bf16)
    l0_32: list[float] = []
    l0_16: list[float] = []
    fns = [mean_l0(s32, l0_32), mean_l0(s16, l0_16), bare_matmuls(f32.sae)]
    t32, t16, tmm = (statistics.median(t) for t in interleaved(fns, reps, warmup))
    c32(), c16()
    for name, t, tr, l0s in (("float32", t32, f32, l0_32), ("bfloat16", t16, bf16, l0_16)):
        fs = tr.fast_step
        target = 3 if name == "float32" else 5
        print(
            f"relu_l1 d_in {D_IN}, {WIDE} features, batch {BATCH}, L0 {statistics.mean(l0s[warmup:]):.1f} "
            f"({fs.sparse_calls}/{fs.calls} steps sparse), {name} matmuls: full step {t:.3f} s, "
            f"five bare float32 matmuls {tmm:.3f} s; matmuls / step = {tmm / t:.2f} (target >= {target})"
        )


def topk_bf16(cache: Path, tmp: Path, reps: int, warmup: int) -> None:
    """3., second part: the topk full step with bfloat16 matmuls / one float32 encoder matmul."""
    tr = make_trainer(cache, tmp / "topk-bf16", arch="topk", features=WIDE, k=32,
                      matmul_dtype="bfloat16")  # fmt: skip
    step, close = step_fn(tr)
    t_step, t_enc = interleaved([step, bare_matmuls(tr.sae, only_encoder=True)], reps, warmup)
    close()
    st, enc = statistics.median(t_step), statistics.median(t_enc)
    print(
        f"topk k 32, {WIDE} features, batch {BATCH}, bfloat16 matmuls, no AuxK: full step "
        f"{st:.3f} s, one float32 encoder matmul {enc:.3f} s; step / matmul = {st / enc:.2f} (target <= 0.75)"
    )


def topk_profile(cache: Path, tmp: Path, reps: int) -> None:
    """--profile: where the topk bfloat16 step's time goes (torch.profiler, self time per op over
    `reps` steps after one warm-up), each as a fraction of one float32 encoder matmul timed in the
    same run."""
    from torch.profiler import ProfilerActivity, profile

    tr = make_trainer(cache, tmp / "topk-prof", arch="topk", features=WIDE, k=32,
                      matmul_dtype="bfloat16")  # fmt: skip
    step, close = step_fn(tr)
    enc = bare_matmuls(tr.sae, only_encoder=True)
    step(), enc()
    t_enc = statistics.median(timed(enc) for _ in range(reps))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            step()
    close()
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops) / reps / 1e6
    print(
        f"topk bfloat16 step, profiled over {reps} steps: {total:.3f} s a step (profiler "
        f"overhead included), one float32 encoder matmul {t_enc:.3f} s; self time a step:"
    )
    for e in ops[:16]:
        t = e.self_cpu_time_total / reps / 1e6
        print(
            f"  {e.key:32s} {e.count // reps:4d} calls {t:7.3f} s  {t / t_enc:5.3f} of the matmul"
        )


def crossover(cache: Path, tmp: Path, reps: int, warmup: int) -> None:
    """FastStep alone, dense vs sparse, over L0: where sparse starts to pay."""
    tr = make_trainer(cache, tmp / "crossover", arch="relu_l1", features=WIDE)
    x = tr.source.sample(BATCH, 2)
    for mm in (torch.float32, torch.bfloat16):
        for l0 in (64, 256, 512, 1024, 2048):
            plant_l0(tr, l0)
            steps = [FastStep(tr.sae, mm, sparse=mode) for mode in ("never", "always")]
            td, ts = (statistics.median(t) for t in interleaved(
                [lambda s=s: s(x, 1.0) for s in steps], reps, warmup))  # fmt: skip
            print(f"crossover: {str(mm)[6:]} matmuls, L0 {l0} ({l0 / WIDE:.2%} of {WIDE}): "
                  f"dense {td:.3f} s, sparse {ts:.3f} s, dense / sparse {td / ts:.2f}")  # fmt: skip
            del steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=9, help="timed repetitions (relu_l1)")
    p.add_argument("--warmup", type=int, default=2, help="untimed repetitions first")
    p.add_argument("--topk-reps", type=int, default=5, help="timed repetitions (topk)")
    p.add_argument("--l0", type=float, default=60, help="planted L0 of the sparse relu_l1 step")
    p.add_argument("--only", choices=["all", "sparse"], default="all", help="which parts to run")
    p.add_argument("--crossover", action="store_true", help="dense vs sparse over L0 instead")
    p.add_argument("--profile", action="store_true", help="the topk bfloat16 step's parts instead")
    a = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        cache = write_synthetic_cache(tmp / "cache")
        if a.crossover:
            crossover(cache, tmp, a.topk_reps, 1)
            return
        if a.profile:
            topk_profile(cache, tmp, a.topk_reps)
            return
        sparse_relu(cache, tmp, a.l0, a.reps, a.warmup)
        topk_bf16(cache, tmp, a.topk_reps, a.warmup)
        if a.only == "sparse":
            return

        trainer = make_trainer(cache, tmp / "relu", arch="relu_l1", features=4096)
        full_step, close = step_fn(trainer)
        t_step, t_mm = interleaved([full_step, bare_matmuls(trainer.sae)], a.reps, a.warmup)
        step, mm = statistics.median(t_step), statistics.median(t_mm)
        print(
            f"relu_l1 d_in {D_IN}, 4096 features, batch {BATCH}: full step {step:.3f} s "
            f"(mean {statistics.mean(t_step):.3f}), five bare matmuls {mm:.3f} s; "
            f"matmuls / step = {mm / step:.3f} (target >= 0.9)"
        )
        close()
        del trainer

        for name, frac in (("topk", 0.0), ("topk-auxk", 0.05)):
            ours, dense = topk_pair(cache, tmp, name, frac, a.topk_reps, 1)
            what = "no AuxK" if frac == 0 else "AuxK k_aux 256, 5% of latents dead"
            print(
                f"topk k 32, {WIDE} features, batch {BATCH}, {what}: ours {ours:.3f} s, "
                f"dense decoder {dense:.3f} s; speed-up {dense / ours:.2f}x (target >= 2)"
            )


if __name__ == "__main__":
    main()
