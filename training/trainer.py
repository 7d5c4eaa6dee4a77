"""The training loop: `train(cfg)` reads a cache and writes a run dir (design.md, docs/architecture.md).

A step (`Trainer.train_step`) is: read a batch (prefetched by the reader), loss and gradients
(`SAE.forward_backward`), decoder-gradient projection, Adam, decoder renormalisation, firing
counts added on the device. Nothing in a step waits for the device except at log, window and
checkpoint steps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..activations.cache_format import entry_checksum
from ..sae.errors import SaekitError, check_device
from ..sae.fast_step import FastStep, StepOutput
from ..sae.io import (
    SAEKIT_FILE,
    atomic_save_safetensors,
    atomic_write_bytes,
    atomic_write_json,
    load_safetensors,
    save_sae,
    sha256_file,
)
from ..sae.model import SAE, SAEConfig, geometric_median
from . import distributed
from .config import GEOMEDIAN_ROWS, ResolvedConfig, TrainConfig, check_memory
from .density import DensityTracker
from .distributed import ReducedDensityTracker, World, average_grads, local_slices
from .resample import anthropic_resample

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
# Fields that must not change when resuming (the others only affect logging and I/O).
RESUME_FIELDS = (
    "arch", "features", "expansion", "steps", "batch_size", "lr", "l1_coef", "k", "k_aux",
    "aux_coef", "resample", "resample_steps", "dead_window", "resample_inputs",
    "resample_holdout", "density_window", "seed", "dtype",
)  # fmt: skip


def _event_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2**63)


def _manifest_info(manifest: dict) -> tuple[int, float, int]:
    try:
        d_in = int(manifest["d_in"])
        mean_norm = float(manifest["stats"]["mean_norm"])
    except (KeyError, TypeError, ValueError):
        raise SaekitError(
            "the cache manifest lacks d_in or stats.mean_norm; rebuild the cache with `saekit cache`"
        ) from None
    n_rows = manifest.get("n_tokens") or sum(int(s["rows"]) for s in manifest.get("shards", []))
    return d_in, mean_norm, int(n_rows)


def sae_metadata(manifest: dict, cfg: TrainConfig, arch: str, d_in: int, d_sae: int) -> dict:
    """cfg.json's metadata: where the activations came from (docs/architecture.md, sae/io.py)."""
    return {
        "model_name": manifest.get("model"),
        "hook_name": manifest.get("hook_name") or manifest.get("hook"),
        "site": manifest.get("site"),
        "layer": manifest.get("layer"),
        # The cache by name and content, never by a path of the machine that trained.
        "cache": Path(cfg.cache).name,
        "cache_fingerprint": _cache_fingerprint(manifest),
        "include_bos": bool(manifest.get("include_bos", False)),
        "context_size": manifest.get("context_size"),
        "dataset": manifest.get("dataset"),
        "prepend_bos": True,
        "arch": arch,
        "d_in": d_in,
        "d_sae": d_sae,
        "train_config": {**_cfg_dict(cfg), "cache": Path(cfg.cache).name, "out": None},
    }


def _cfg_dict(cfg: TrainConfig) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}


def _cache_fingerprint(manifest: dict) -> str:
    """The identity of a cache's contents (its shards' hashes, in order), not of its path."""
    shards = manifest.get("shards") or []
    return hashlib.sha256("\n".join(entry_checksum(s) for s in shards).encode()).hexdigest()


def _metrics_step(line: str) -> float:
    """The step of a metrics.jsonl line; inf for a torn or foreign line (dropped on resume)."""
    try:
        step = json.loads(line)["step"]
        return step if isinstance(step, int) else math.inf
    except (ValueError, KeyError, TypeError):
        return math.inf


def _latest_checkpoint(out: Path) -> Path | None:
    """The newest checkpoint whose JSON (written last, so it marks a complete checkpoint) exists."""
    found = sorted((out / "checkpoints").glob("step-*.json"))
    found = [p for p in found if p.with_suffix(".safetensors").is_file()]
    return found[-1] if found else None


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        res: ResolvedConfig,
        reader,
        manifest: dict,
        out: Path,
        world: World | None = None,
    ):
        self.cfg, self.res, self.reader, self.manifest, self.out = cfg, res, reader, manifest, out
        # Data-parallel ranks (training/distributed.py); only rank 0 writes.
        self.world = world or World()
        self.device = torch.device(cfg.device)
        self.dtype = DTYPES[cfg.dtype]
        sae_cfg = SAEConfig(cfg.arch, res.d_in, res.d_sae, cfg.k, res.k_aux, cfg.aux_coef)
        self.sae = SAE(sae_cfg, device=self.device, dtype=self.dtype, seed=cfg.seed)
        self.arch = self.sae.arch
        # loss and gradients of one batch: (x, l1_coef, dead_mask) -> StepOutput
        self.forward_backward = FastStep(self.sae)
        params = list(self.sae.parameters())
        try:
            self.opt = torch.optim.Adam(params, lr=res.lr, fused=True)
        except (RuntimeError, TypeError):  # fused Adam is not built for every device/dtype
            self.opt = torch.optim.Adam(params, lr=res.lr, foreach=True)
        tracker = ReducedDensityTracker if self.world.size > 1 else DensityTracker
        self.density = tracker(res.d_sae, cfg.batch_size, res.steps_per_window, self.device)
        self.step = 0
        self.elapsed = 0.0
        self.last_checkpoint: int | None = None
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
            n = min(GEOMEDIAN_ROWS, self.res.n_rows)
            x = self.reader.sample(n, seed=self.cfg.seed).to(self.device, torch.float32)
            self.sae.b_dec.copy_(geometric_median(x).to(self.dtype))

    # -- checkpoints --
    def save_checkpoint(self) -> None:
        density_state = self.density.state()  # a collective when distributed: every rank calls it
        self.last_checkpoint = self.step
        if not self.world.main:
            return
        ck = self.out / "checkpoints"
        ck.mkdir(exist_ok=True)
        names = dict(self.sae.named_parameters())
        tensors = {f"sae.{n}": p.detach() for n, p in names.items()}
        for n, p in names.items():
            for key, v in self.opt.state.get(p, {}).items():
                tensors[f"adam.{n}.{key}"] = v
        tensors.update(density_state)
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        stem = ck / f"step-{self.step:08d}"
        sha = atomic_save_safetensors(stem.with_suffix(".safetensors"), tensors)
        atomic_write_json(
            stem.with_suffix(".json"),
            {
                "step": self.step,
                "elapsed_s": self.elapsed,
                "config": _cfg_dict(self.cfg),
                "resolved": dataclasses.asdict(self.res),
                # what resuming verifies: the tensors file, and the cache the run trains on
                "sha256": sha,
                "cache_sha256": _cache_fingerprint(self.manifest),
            },
        )
        self.last_checkpoint = self.step
        if self.cfg.keep_checkpoints:
            for old in sorted(ck.glob("step-*.json"))[: -self.cfg.keep_checkpoints]:
                old.with_suffix(".safetensors").unlink(missing_ok=True)
                old.unlink(missing_ok=True)

    def load_checkpoint(self, json_path: Path) -> None:
        st_path = json_path.with_suffix(".safetensors")
        try:
            meta = json.loads(json_path.read_text())
            saved = meta["config"]
            int(meta["step"]), float(meta["elapsed_s"])
            assert isinstance(saved, dict)
        except (ValueError, KeyError, TypeError, AssertionError, UnicodeDecodeError):
            raise SaekitError(
                f"checkpoint {json_path} is not a saekit checkpoint record (corrupt or edited); delete it (and {st_path.name}) to resume from the one before"
            ) from None
        diff = [f for f in RESUME_FIELDS if saved.get(f) != getattr(self.cfg, f)]
        if diff:
            changes = ", ".join(f"{f}: {saved.get(f)!r} -> {getattr(self.cfg, f)!r}" for f in diff)
            raise SaekitError(
                f"cannot resume {self.out} from checkpoint {json_path} with different settings ({changes}); use the original flags"
            )
        cache_sha = meta.get("cache_sha256")
        if cache_sha is not None and cache_sha != _cache_fingerprint(self.manifest):
            raise SaekitError(
                f"checkpoint {json_path} was written while training on another cache than --cache {self.cfg.cache} (its shards differ); resume with the original --cache"
            )
        if meta.get("sha256") is not None and st_path.is_file():
            if sha256_file(st_path) != meta["sha256"]:
                raise SaekitError(
                    f"checkpoint {st_path} fails its sha256 check (corrupt, or from another run); delete it and {json_path.name} to resume from the one before"
                )
        t = load_safetensors(st_path)
        names = dict(self.sae.named_parameters())
        want = [f"sae.{n}" for n in names] + ["rng.torch", "density.window", "history.counts"]
        lacking = [k for k in want if k not in t]
        if lacking:
            raise SaekitError(
                f"checkpoint {st_path} lacks {lacking[0]}: it is not a saekit checkpoint of this run; delete it and {json_path.name}"
            )
        if t["sae.W_enc"].shape != self.sae.W_enc.shape:
            raise SaekitError(
                f"checkpoint {json_path.name} has W_enc {tuple(t['sae.W_enc'].shape)} but the cache gives {tuple(self.sae.W_enc.shape)}; resume on the original cache"
            )
        with torch.no_grad():
            for n, p in names.items():
                p.copy_(t[f"sae.{n}"])
                state = {
                    k.split(".")[-1]: v.to(self.device)
                    for k, v in t.items()
                    if k.startswith(f"adam.{n}.")
                }
                if state:
                    self.opt.state[p] = state
        self.density.load_state(t)
        torch.set_rng_state(t["rng.torch"])
        if "rng.cuda" in t and torch.cuda.is_available():
            torch.cuda.set_rng_state(t["rng.cuda"])
        self.step = meta["step"]
        self.elapsed = meta["elapsed_s"]
        self.last_checkpoint = self.step
        # Drop metrics logged after the checkpoint by the interrupted run.
        metrics = self.out / "metrics.jsonl"
        if metrics.is_file() and self.world.main:
            keep = [
                line
                for line in metrics.read_text(errors="replace").splitlines()
                if _metrics_step(line) <= self.step
            ]
            # atomically: a kill during this rewrite must not lose the lines before the checkpoint
            atomic_write_bytes(metrics, "".join(line + "\n" for line in keep).encode())
        if self.world.main:  # temporary files of writes the interrupted run did not finish
            for tmp in [*self.out.glob("*.tmp-*"), *(self.out / "checkpoints").glob("*.tmp-*")]:
                tmp.unlink(missing_ok=True)

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
        dens, _ = self.density.recent_density(self.res.steps_per_window * self.cfg.batch_size)
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
            "ultra_rare": int(rare.sum()),
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
        use_aux = arch.aux_loss != "none" and cfg.aux_coef > 0
        dead_mask = self.density.dead_mask(self.step, res.dead_window) if use_aux else None
        out = self.forward_backward(x, self.l1_at(self.step), dead_mask)
        if self.world.size > 1:
            average_grads(list(sae.parameters()), self.world)
        if arch.unit_decoder:
            sae.remove_parallel_decoder_grad()
        if arch.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(list(sae.parameters()), arch.clip_grad)
        self.opt.step()
        if arch.unit_decoder:
            sae.normalize_decoder()
        self.step += 1
        self.density.update(out.fired, self.step)
        return out

    def fit(self) -> dict:
        cfg, res, sae, dens = self.cfg, self.res, self.sae, self.density
        S = cfg.steps
        resample_at = set(res.resample_steps)
        params = list(sae.parameters())
        last: dict = {}
        main = self.world.main
        pbar = tqdm(
            total=S, initial=self.step, desc="train", unit="step", file=sys.stderr, disable=not main
        )
        metrics_file = open(self.out / "metrics.jsonl", "a") if main else None
        t0 = time.perf_counter() - self.elapsed
        stream = batches = self.reader.batches(start_batch=self.step)
        if self.world.size > 1:
            batches = local_slices(stream, self.world, self.device)
        try:
            for x in batches:
                if self.step >= S:
                    break
                out = self.train_step(x)
                loss, fired = out.loss, out.fired
                pbar.update(1)

                if self.step in resample_at:
                    self.resample()
                if self.step == S:
                    dens.flush(self.step)
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
        dead = self.density.dead_mask(self.step, res.dead_window)
        gen = torch.Generator().manual_seed(_event_seed(cfg.seed, self.step))
        inputs = self.reader.sample(res.resample_inputs, seed=_event_seed(cfg.seed, self.step))
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
        if self.world.main:
            tqdm.write(
                f"step {self.step}: resampled {int(r.resampled.sum())} dead features, held out {int(r.held_out.sum())}",
                file=sys.stderr,
            )

    def finish(self, last: dict) -> None:
        cfg, res = self.cfg, self.res
        meta = sae_metadata(self.manifest, cfg, cfg.arch, res.d_in, res.d_sae)
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
            },
        )
        # Last, ending with saekit.json: its presence marks a finished run (a run killed while
        # finishing resumes from its last checkpoint and writes every file again).
        save_sae(self.sae, self.out, meta, input_scale=res.input_scale)


def _prepare_out(cfg: TrainConfig) -> tuple[Path, Path | None, bool]:
    """Check --out against --resume/--overwrite; returns (out, checkpoint to resume, created)."""
    out = Path(cfg.out)
    nonempty = out.is_dir() and any(out.iterdir())
    if out.exists() and not out.is_dir():
        raise SaekitError(f"--out {out} is a file; pass a directory")
    if cfg.resume:
        ckpt = _latest_checkpoint(out) if out.is_dir() else None
        if (out / "sae_weights.safetensors").is_file() and (out / SAEKIT_FILE).is_file():
            raise SaekitError(
                f"the run in {out} already finished; drop --resume or use a new --out"
            )
        if ckpt is None:
            raise SaekitError(f"--resume: {out} holds no checkpoint; drop --resume to start anew")
        return out, ckpt, False
    if nonempty and not cfg.overwrite:
        raise SaekitError(
            f"--out {out} is not empty; pass --resume to continue it, --overwrite to replace it, or another --out"
        )
    return out, None, not nonempty and not out.exists()


def train(cfg: TrainConfig) -> Path:
    """Train an SAE on `cfg.cache` and write the run dir `cfg.out`; returns its path."""
    from ..activations.cache_format import read_manifest

    if not Path(cfg.cache).is_dir():
        raise SaekitError(f"--cache {cfg.cache} is not a directory; build one with `saekit cache`")
    manifest = read_manifest(cfg.cache)
    if manifest.get("complete") is False:
        raise SaekitError(
            f"cache {cfg.cache} is incomplete; finish it by re-running `saekit cache`"
        )
    d_in, mean_norm, n_rows = _manifest_info(manifest)
    res = cfg.resolve(d_in, mean_norm, n_rows)
    check_device(cfg.device)
    wandb = None
    if cfg.wandb_project:
        try:
            import wandb
        except ImportError:
            raise SaekitError(
                "--wandb-project needs wandb: `pip install wandb` (or drop the flag)"
            ) from None
    world = distributed.world_from_env()
    if cfg.batch_size % world.size:
        raise SaekitError(
            f"--batch-size {cfg.batch_size} does not split into {world.size} equal per-rank slices; use a multiple of {world.size}"
        )
    check_memory(cfg, res, world.size)
    out, ckpt, _ = _prepare_out(cfg)
    world, device_name = distributed.init(cfg.device)
    try:
        return _train(cfg, res, manifest, out, ckpt, world, device_name, wandb)
    finally:
        distributed.close()


def _train(cfg, res, manifest, out, ckpt, world, device_name, wandb) -> Path:
    from ..activations.cache_reader import CacheReader

    if device_name != cfg.device:
        cfg = dataclasses.replace(cfg, device=device_name)
    # Distributed ranks slice each global batch on the host, then move their slice.
    reader_device = cfg.device if world.size == 1 else "cpu"
    reader = CacheReader(
        cfg.cache, cfg.batch_size, seed=cfg.seed, device=reader_device, dtype=DTYPES[cfg.dtype]
    )
    created = not out.exists()
    distributed.barrier(world)  # every rank has checked --out before rank 0 changes it
    if world.main:
        if cfg.overwrite and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
    distributed.barrier(world)
    trainer = Trainer(cfg, res, reader, manifest, out, world)
    try:
        if ckpt is not None:
            trainer.load_checkpoint(ckpt)
        else:
            trainer.init_fresh()
        if wandb is not None and world.main:
            try:
                trainer.wandb = wandb.init(
                    project=cfg.wandb_project, config=_cfg_dict(cfg), dir=str(out), resume="allow"
                )
            except Exception as e:  # noqa: BLE001 - wandb raises its own types (no login, ...)
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise SaekitError(
                    f"--wandb-project {cfg.wandb_project}: wandb did not start ({first}); run `wandb login`, set WANDB_MODE=offline, or drop the flag"
                ) from None
        last = trainer.fit()
        if world.main:
            trainer.finish(last)
    except SaekitError:
        # Bad input found while reading (e.g. a corrupt shard): leave no half-written run dir.
        if (created or cfg.overwrite) and trainer.last_checkpoint is None and world.main:
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        if trainer.wandb is not None:
            trainer.wandb.finish()
    if not world.main:
        return out
    ranks = f" on {world.size} ranks" if world.size > 1 else ""
    print(
        f"saekit train: {cfg.arch} d_sae={res.d_sae} {trainer.step} steps{ranks} "
        f"({trainer.step * cfg.batch_size:,} tokens) in {trainer.elapsed:.1f}s; "
        f"fvu={last.get('fvu', float('nan')):.4f} l0={last.get('l0', float('nan')):.1f} "
        f"dead={last.get('dead')}/{res.d_sae}; wrote {out}",
        file=sys.stderr,
    )
    return out
