"""`saekit train`: check the config and the cache, prepare the run dir, run the loop.

`train(cfg)` reads a cache and writes a run dir (design.md, docs/architecture.md); the loop
itself is training/loop.py's `Trainer`, its checkpoints training/checkpoint.py.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path

from ..sae.errors import SaekitError, check_device
from ..sae.io import SAEKIT_FILE
from . import distributed
from .checkpoint import cfg_dict, latest_checkpoint
from .config import TrainConfig, check_memory
from .loop import DTYPES, Trainer


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


def _prepare_out(cfg: TrainConfig) -> tuple[Path, Path | None, bool]:
    """Check --out against --resume/--overwrite; returns (out, checkpoint to resume, created)."""
    out = Path(cfg.out)
    nonempty = out.is_dir() and any(out.iterdir())
    if out.exists() and not out.is_dir():
        raise SaekitError(f"--out {out} is a file; pass a directory")
    if cfg.resume:
        ckpt = latest_checkpoint(out) if out.is_dir() else None
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
                    project=cfg.wandb_project, config=cfg_dict(cfg), dir=str(out), resume="allow"
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
