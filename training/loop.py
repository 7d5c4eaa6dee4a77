"""The training loop: `Trainer` steps an SAE over an activation source and writes the run dir's files.

A step (`Trainer.train_step`) is: read a batch (prefetched by the reader), loss and gradients
(sae/fast_step.py), decoder-gradient projection, Adam, decoder renormalisation, firing counts
added on the device. Nothing in a step waits for the device except at log, window and
checkpoint steps. What differs between architectures is read from sae/archs.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..sae.errors import SaekitError, check_interrupt
from ..sae.fast_step import FastStep, StepOutput
from ..sae.io import atomic_save_safetensors, save_sae
from ..sae.model import SAE, SAEConfig, geometric_median
from .checkpoint import cfg_dict, drop_after, read_checkpoint, write_checkpoint
from .config import GEOMEDIAN_ROWS, ResolvedConfig, TrainConfig
from .density import FINGERPRINT, DensityTracker, resolves, run_fingerprint, window_summary
from .distributed import ReducedDensityTracker, World, average_grads, local_slices
from .mechanisms import FILE as MECHANISMS_FILE
from .mechanisms import MechanismTracker
from .mechanisms import margin as mechanism_margin
from .resample import anthropic_resample, event_seed

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def sae_metadata(source, cfg: TrainConfig, arch: str, d_in: int, d_sae: int) -> dict:
    """cfg.json's metadata: where the activations came from (docs/architecture.md, sae/io.py),
    never by a path of the machine that trained."""
    meta = source.metadata()
    train_config = {**cfg_dict(cfg), "out": None}
    train_config["cache"] = Path(cfg.cache).name if cfg.cache is not None else None
    if cfg.synthetic:  # files by name; the full spec is in metadata.source.spec
        train_config["synthetic"] = [s if "=" in s else Path(s).name for s in cfg.synthetic]
    meta = {**meta, "prepend_bos": True, "arch": arch, "d_in": d_in, "d_sae": d_sae,
            "train_config": train_config}  # fmt: skip
    return {**meta, FINGERPRINT: run_fingerprint(meta)}


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        res: ResolvedConfig,
        source,
        out: Path,
        world: World | None = None,
    ):
        # source: activations/source.py's Source (a cache, synthetic activations, a live model)
        self.cfg, self.res, self.source, self.out = cfg, res, source, out
        # Data-parallel ranks (training/distributed.py); only rank 0 writes.
        self.world = world or World()
        self.device = torch.device(cfg.device)
        self.dtype = DTYPES[cfg.dtype]
        sae_cfg = SAEConfig(
            cfg.arch, res.d_in, res.d_sae, cfg.k, res.k_aux, cfg.aux_coef, widths=cfg.widths
        )
        self.sae = SAE(sae_cfg, device=self.device, dtype=self.dtype, seed=cfg.seed)
        self.arch = self.sae.arch
        # loss and gradients of one batch: (x, l1_coef, dead_mask) -> StepOutput
        mm = DTYPES[cfg.matmul_dtype] if cfg.matmul_dtype else None
        self.fast_step = FastStep(self.sae, matmul_dtype=mm)
        self.forward_backward = self.fast_step
        self._hint_windows = 0  # density windows seen when fast_step.l0_hint was last set
        params = list(self.sae.parameters())
        betas = self.arch.adam_betas
        try:
            self.opt = torch.optim.Adam(params, lr=res.lr, betas=betas, fused=True)
        except (RuntimeError, TypeError):  # fused Adam is not built for every device/dtype
            self.opt = torch.optim.Adam(params, lr=res.lr, betas=betas, foreach=True)
        tracker = ReducedDensityTracker if self.world.size > 1 else DensityTracker
        self.density = tracker(res.d_sae, cfg.batch_size, res.steps_per_window, self.device)
        self.mechanisms = (
            MechanismTracker(res.d_sae, rank=self.world.rank, size=self.world.size)
            if cfg.mechanisms
            else None
        )
        self.step = 0
        self.elapsed = 0.0
        self.last_checkpoint: int | None = None
        self._step_margin: torch.Tensor | None = None  # the mechanism margin of the last step
        self.wandb = None

    # -- schedules: lambda warm-up at the start, lr decay to 0 at the end (linear) --
    def lr_at(self, step: int) -> float:
        S, frac = self.cfg.steps, self.res.lr_decay
        if frac <= 0:
            return self.res.lr
        return self.res.lr * min(1.0, (S - step) / max(1.0, frac * S))

    def l1_at(self, step: int) -> float:
        frac = self.res.l1_warmup
        if frac <= 0:
            return self.res.l1_coef
        return self.res.l1_coef * min(1.0, (step + 1) / max(1.0, frac * self.cfg.steps))

    @torch.no_grad()
    def init_fresh(self) -> None:
        if self.arch.b_dec_init == "geometric_median":
            n = min(GEOMEDIAN_ROWS, self.res.n_rows or GEOMEDIAN_ROWS)
            x = self.source.sample(n, self.cfg.seed, self.dtype).to(self.device, torch.float32)
            self.sae.b_dec.copy_(geometric_median(x).to(self.dtype))

    # -- checkpoints (training/checkpoint.py owns the files) --
    def save_checkpoint(self) -> None:
        density_state = self.density.state()  # a collective when distributed: every rank calls it
        self.last_checkpoint = self.step
        if not self.world.main:
            return
        names = dict(self.sae.named_parameters())
        tensors = {f"sae.{n}": p.detach() for n, p in names.items()}
        tensors.update({f"sae.{n}": b for n, b in self.sae.named_buffers()})
        for n, p in names.items():
            for key, v in self.opt.state.get(p, {}).items():
                tensors[f"adam.{n}.{key}"] = v
        tensors.update(density_state)
        if self.mechanisms is not None:
            tensors.update(self.mechanisms.state())
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        record = {
            "step": self.step,
            "elapsed_s": self.elapsed,
            "config": cfg_dict(self.cfg),
            "resolved": dataclasses.asdict(self.res),
        }
        fingerprint = self.source.fingerprint()
        write_checkpoint(
            self.out, self.step, tensors, record, fingerprint, self.cfg.keep_checkpoints
        )

    def load_checkpoint(self, json_path: Path) -> None:
        """Resume from a verified checkpoint, dropping what the interrupted run wrote after it."""
        meta, t = read_checkpoint(json_path, self.cfg, self.source, self.out, self.sae)
        with torch.no_grad():
            for n, p in self.sae.named_parameters():
                p.copy_(t[f"sae.{n}"])
                pre = f"adam.{n}."
                state = {
                    k.split(".")[-1]: v.to(self.device) for k, v in t.items() if k.startswith(pre)
                }
                if state:
                    self.opt.state[p] = state
            for n, b in self.sae.named_buffers():
                b.copy_(t[f"sae.{n}"])
        self.density.load_state(t)
        if self.mechanisms is not None:
            self.mechanisms.load_state(t, self.device)
        torch.set_rng_state(t["rng.torch"])
        if "rng.cuda" in t and torch.cuda.is_available():
            torch.cuda.set_rng_state(t["rng.cuda"])
        self.step = meta["step"]
        self.elapsed = meta["elapsed_s"]
        self.last_checkpoint = self.step
        if self.world.main:
            drop_after(self.out, self.step)

    # -- the loop --
    def nan_error(self, what: str) -> SaekitError:
        kept = (
            f"the last good checkpoint (step {self.last_checkpoint}) is kept in {self.out / 'checkpoints'}"
            if self.last_checkpoint is not None
            else "no checkpoint was written yet"
        )
        return SaekitError(
            f"{what} by step {self.step}; training stopped and {kept}; lower --lr (now {self.res.lr})"
        )

    def log(self, x, out, loss, fired, metrics_file, pbar) -> dict:
        """Metrics at a log step: the only place (besides windows/checkpoints) that syncs."""
        B = x.shape[0]
        if self.world.size > 1:
            loss, out, fired, var, B = self._reduce_log_values(x, out, loss, fired)
        else:
            var = (x - x.mean(0)).pow(2).sum(-1).mean()
        loss_v = loss.item()
        if not math.isfinite(loss_v):
            raise self.nan_error(f"the loss became {loss_v}")
        dens, tokens = self.density.recent_density(self.res.steps_per_window * self.cfg.batch_size)
        dead = dens <= self.cfg.dead_threshold
        rare = ~dead & (dens < self.cfg.ultra_rare_threshold)
        m = {
            "step": self.step,
            "tokens": self.step * self.cfg.batch_size,
            "elapsed_s": round(self.elapsed, 3),
            "loss": loss_v,
            "mse": out.mse.item(),
            "sparsity": out.sparsity.item(),
            "l0": fired.sum().item() / B,
            "fvu": (out.mse / var).item(),
            "dead": int(dead.sum()),
            # None where the window is too short to resolve the threshold (RESOLVE_FIRINGS)
            "ultra_rare": int(rare.sum())
            if resolves(tokens, self.cfg.ultra_rare_threshold)
            else None,
            "lr": self.lr_at(self.step - 1),
            "l1_coef": self.l1_at(self.step - 1),
        }
        if self.arch.aux_loss != "none":
            m["aux"] = out.aux.item()
        if metrics_file is None:  # not rank 0
            return m
        metrics_file.write(json.dumps(m) + "\n")
        metrics_file.flush()
        if self.wandb is not None:
            self.wandb.log(m, step=self.step)
        pbar.set_postfix(loss=f"{loss_v:.4g}", l0=f"{m['l0']:.1f}", dead=m["dead"], refresh=False)
        return m

    def log_window(self) -> None:
        """The window that just closed to wandb: features per density band and the histogram
        of log10 density (training/density.py's window_summary), at its end step."""
        import wandb

        d = self.density
        w = window_summary(d.counts[-1], d.window_tokens[-1])
        values, edges = w.pop("hist")
        row = {f"density/{k}": v for k, v in w.items()}
        row["density/log10_histogram"] = wandb.Histogram(np_histogram=(values, edges))
        row["density/window_tokens"] = d.window_tokens[-1]
        self.wandb.log(row, step=d.window_end_step[-1])

    def _reduce_log_values(self, x, out, loss, fired):
        """The log step's loss terms, firing counts and input variance over all ranks' slices."""
        B = x.shape[0]
        xd = x.double()
        terms = torch.stack([loss, out.mse, out.sparsity, out.aux]).double() * B
        sums = torch.cat([terms, xd.pow(2).sum().view(1), xd.sum(0)])
        torch.distributed.all_reduce(sums)
        fired = fired.clone()
        torch.distributed.all_reduce(fired)
        B *= self.world.size
        sums /= B
        loss, mse, sparsity, aux = sums[:4]
        var = sums[4] - sums[5:].pow(2).sum()
        return loss, out._replace(mse=mse, sparsity=sparsity, aux=aux), fired, var, B

    def train_step(self, x: torch.Tensor) -> StepOutput:
        """One step on batch x (in cache units): loss and gradients, decoder-gradient projection,
        Adam, decoder renormalisation, firing counts added to the history. No host sync."""
        cfg, res, sae, arch = self.cfg, self.res, self.sae, self.arch
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(self.step)
        if res.input_scale != 1.0:
            x = x * res.input_scale
        if len(self.density.counts) != self._hint_windows:
            self.set_l0_hint()
        use_aux = arch.aux_loss != "none" and cfg.aux_coef > 0
        dead_mask = self.density.dead_mask(self.step, res.dead_window) if use_aux else None
        self._step_margin = None
        self.fast_step.pre_tap = self._keep_margin if self.closes_window() else None
        out = self.forward_backward(x, self.l1_at(self.step), dead_mask)
        self.fast_step.pre_tap = None
        if self.world.size > 1:
            average_grads(list(sae.parameters()), self.world)
        if arch.unit_decoder:
            sae.remove_parallel_decoder_grad()
        if arch.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(list(sae.parameters()), arch.clip_grad)
        self.opt.step()
        if arch.unit_decoder:
            sae.normalize_decoder()
        sae.clamp_threshold()
        if arch.threshold == "estimated":
            min_kept = out.min_kept
            if self.world.size > 1:  # every rank moves the threshold the same way
                min_kept = min_kept.clone()
                torch.distributed.all_reduce(min_kept, op=torch.distributed.ReduceOp.MIN)
            sae.update_threshold(min_kept)
        self.step += 1
        self.density.update(out.fired, self.step)
        self.record_mechanisms(x)
        return out

    def closes_window(self) -> bool:
        """Whether the next step closes a density window (or ends training) while mechanism
        checks are recorded: its forward then hands its pre-activations to `_keep_margin`."""
        d = self.density
        last = d.window_steps + 1 >= d.steps_per_window or self.step + 1 >= self.cfg.steps
        return self.mechanisms is not None and last

    def _keep_margin(self, pre: torch.Tensor) -> None:
        self._step_margin = mechanism_margin(self.sae, pre)

    def record_mechanisms(self, x: torch.Tensor) -> None:
        """A row of mechanism checks when a density window closed at this step, on its batch x
        (in training units), with the margin of the step's own forward when it was kept."""
        m, ends = self.mechanisms, self.density.window_end_step
        if m is None or not ends or ends[-1] != self.step:
            return
        if not (len(m) and m.window_end_step[-1] == self.step):
            l1 = self.l1_at(self.step - 1)
            m.record(self.sae, x, l1, self.step, self._step_margin)

    def set_l0_hint(self) -> None:
        """Tell the step the L0 of the last closed density window (it runs sparse when that is
        low): one host sync per window, and a function of the history, so a resumed run makes
        the same choices as an uninterrupted one."""
        counts, tokens = self.density.counts, self.density.window_tokens
        self._hint_windows = len(counts)
        self.fast_step.l0_hint = int(counts[-1].sum()) / tokens[-1] if counts else None

    def fit(self) -> dict:
        cfg, res, sae, dens = self.cfg, self.res, self.sae, self.density
        S = cfg.steps
        resample_at = set(res.resample_steps)
        params = list(sae.parameters())
        last: dict = {}
        main = self.world.main
        pbar = tqdm(
            total=S, initial=self.step, desc="train", unit="step", file=sys.stderr,
            **({} if main else {"disable": True}),  # (else TQDM_DISABLE decides)
        )  # fmt: skip
        metrics_file = open(self.out / "metrics.jsonl", "a") if main else None
        t0 = time.perf_counter() - self.elapsed
        # Distributed ranks slice each global batch on the host, then move their slice.
        device = cfg.device if self.world.size == 1 else "cpu"
        stream = batches = self.source.batches(
            cfg.batch_size, cfg.seed, start_batch=self.step, device=device, dtype=self.dtype
        )
        if self.world.size > 1:
            batches = local_slices(stream, self.world, self.device)
        try:
            for x in batches:
                if self.step >= S:
                    break
                check_interrupt()  # a SIGINT/SIGTERM whose exception Python swallowed
                windows = len(dens.counts)
                out = self.train_step(x)
                loss, fired = out.loss, out.fired
                pbar.update(1)
                if self.wandb is not None and len(dens.counts) > windows:
                    self.log_window()

                if self.step in resample_at:
                    self.resample()
                if self.step == S:
                    windows = len(dens.counts)
                    dens.flush(self.step)
                    self.record_mechanisms(x * res.input_scale if res.input_scale != 1.0 else x)
                    if self.wandb is not None and len(dens.counts) > windows:
                        self.log_window()
                if self.step % cfg.log_every == 0 or self.step == S:
                    self.elapsed = time.perf_counter() - t0
                    x_in = x * res.input_scale if res.input_scale != 1.0 else x
                    last = self.log(x_in, out, loss, fired, metrics_file, pbar)
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < S:
                    if not (torch.isfinite(loss) and all(torch.isfinite(p).all() for p in params)):
                        raise self.nan_error("the loss or weights became NaN/inf")
                    self.elapsed = time.perf_counter() - t0
                    self.save_checkpoint()
        finally:
            stream.close()  # stops and joins the reader's thread
            if metrics_file is not None:
                metrics_file.close()
            pbar.close()
        self.elapsed = time.perf_counter() - t0
        if not all(torch.isfinite(p).all() for p in params):
            raise self.nan_error("the weights became NaN/inf")
        return last

    def resample(self) -> None:
        cfg, res = self.cfg, self.res
        self._step_margin = None  # it predates the resampled weights
        if cfg.resample_below is None:
            dead = self.density.dead_mask(self.step, res.dead_window)
        else:  # rare as well as dead: the control group then holds still-firing features
            dead = self.density.below_mask(self.step, res.dead_window, cfg.resample_below)
        gen = torch.Generator().manual_seed(event_seed(cfg.seed, self.step))
        inputs = self.source.sample(
            res.resample_inputs, event_seed(cfg.seed, self.step), self.dtype
        )
        inputs = inputs.to(self.device, self.dtype) * res.input_scale
        r = anthropic_resample(
            self.sae,
            self.opt,
            inputs,
            dead,
            self.density.control_mask,
            cfg.resample_holdout,
            self.l1_at(self.step),
            gen,
        )
        self.density.record_event(self.step, r.resampled, r.held_out)
        what = "dead" if cfg.resample_below is None else f"dead or rare (< {cfg.resample_below:g})"
        if self.world.main:
            tqdm.write(
                f"step {self.step}: resampled {int(r.resampled.sum())} {what} features, held out {int(r.held_out.sum())}",
                file=sys.stderr,
            )

    def finish(self, last: dict) -> None:
        cfg, res = self.cfg, self.res
        meta = sae_metadata(self.source, cfg, cfg.arch, res.d_in, res.d_sae)
        dens, tokens = self.density.recent_density(res.steps_per_window * cfg.batch_size)
        atomic_save_safetensors(
            self.out / "sparsity.safetensors",
            {"sparsity": torch.log10(dens + 1e-10).float()},
            {"tokens": str(tokens)},
        )
        self.density.save(
            self.out / "density_history.safetensors",
            {
                "density_window": str(res.steps_per_window * cfg.batch_size),
                "batch_size": str(cfg.batch_size),
                "d_sae": str(res.d_sae),
                "dead_window_steps": str(res.dead_window),
                FINGERPRINT: meta[FINGERPRINT],
            },
        )
        if self.mechanisms is not None:
            self.mechanisms.save(self.out / MECHANISMS_FILE)
        # Last, ending with saekit.json: its presence marks a finished run (a run killed while
        # finishing resumes from its last checkpoint and writes every file again).
        save_sae(self.sae, self.out, meta, input_scale=res.input_scale)
