"""`saekit train`: check the config and the source, prepare the run dir, run the loop.

`train(cfg)` reads a source (a cache, synthetic activations or a live model: activations/source.py)
and writes a run dir (design.md, docs/architecture.md); the loop
itself is training/loop.py's `Trainer`, its checkpoints training/checkpoint.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
from pathlib import Path

from ..sae.errors import SaekitError, check_device
from ..sae.io import SAEKIT_FILE, WEIGHTS_FILE
from ..sae.lock import DirLock, entries
from ..sae.outdir import check_replace, drop_stash, remove_owned, restore_stash, stash_owned
from . import distributed
from .checkpoint import cfg_dict, latest_checkpoint
from .config import TrainConfig
from .loop import Trainer
from .memory import check_memory


def _prepare_out(cfg: TrainConfig) -> tuple[Path, Path | None, bool]:
    """Check --out against --resume/--overwrite; returns (out, checkpoint to resume, whether
    to clear --out first: --overwrite, or --resume of a run stopped before its first
    checkpoint, which starts it again from step 0). Only saekit's own run files are ever
    cleared (sae/outdir.py); anything else in --out is refused in one line naming it."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise SaekitError(f"--out {out} is a file; pass a directory")
    if cfg.resume and not out.exists():
        raise SaekitError(
            f"--resume: {out} holds no checkpoint (it does not exist); drop --resume to start a new run"
        )
    if not entries(out):
        return out, None, False
    finished = (out / WEIGHTS_FILE).is_file() and (out / SAEKIT_FILE).is_file()
    ckpt = latest_checkpoint(out)
    if cfg.resume and ckpt is not None and not finished:
        return out, ckpt, False
    flag = "--overwrite" if cfg.overwrite else "--resume" if cfg.resume else "--out"
    check_replace(out, "run", flag)  # another kind of dir, a foreign file, a symlink: refused
    if cfg.overwrite:
        return out, None, True
    if finished:
        how = "--resume refused: " if cfg.resume else ""
        raise SaekitError(
            f"{how}{out} holds a finished run; pass --overwrite to train it again, or another --out"
        )
    if cfg.resume:
        return out, None, True  # stopped before its first checkpoint: nothing to continue
    raise SaekitError(
        f"--out {out} holds an unfinished run; pass --resume to continue it, --overwrite to replace it, or another --out"
    )


def open_source(cfg: TrainConfig, kind: str | None = None):
    """The activation source the flags name (activations/source.py), checked."""
    from ..activations.source import CacheSource, SyntheticStream, parse_synthetic

    kind = kind or cfg.source_kind()
    if kind == "cache":
        return CacheSource(cfg.cache)
    if kind == "synthetic":
        return SyntheticStream(parse_synthetic(cfg.synthetic))
    from ..activations.live import LiveSource

    needed = cfg.steps * cfg.batch_size  # tokenise enough of a big corpus for the whole run
    ctx = cfg.context_size or 128
    return LiveSource(
        model=cfg.model, site=cfg.site or "mlp_post", layer=cfg.layer or 0, hook=cfg.hook,
        dataset=cfg.dataset or "default", split=cfg.split or "train",
        text_column=cfg.text_column or "text", context_size=ctx,
        model_batch_size=cfg.model_batch_size, buffer_tokens=cfg.buffer_tokens,
        include_bos=cfg.include_bos, device=cfg.device,
        max_tokens=math.ceil(needed * 1.1 * ctx / (ctx - 1)),
    )  # fmt: skip


def train(cfg: TrainConfig, source=None) -> Path:
    """Train an SAE on the source the flags name (or `source`, an opened activations/source.py
    Source) and write the run dir `cfg.out`; returns its path."""
    kind = cfg.source_kind() if source is None else source.kind
    if kind == "live":  # every check that needs no model first: loading one takes seconds
        cfg.resolve(cfg.d_in or 1, 1.0, None)
        check_device(cfg.device)
        _prepare_out(cfg)
    if source is None:
        source = open_source(cfg, kind)
    res = cfg.resolve(source.d_in, source.mean_norm, source.n_rows)
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
    _prepare_out(cfg)  # bad --out is refused before the lock makes it
    # One writer per run dir: rank 0 writes for every rank, so only rank 0 locks.
    lock = DirLock(cfg.out, "train") if world.main else None
    try:
        with lock or contextlib.nullcontext():
            out, ckpt, empty = _prepare_out(cfg)  # again: another writer may have just finished
            world, device_name = distributed.init(cfg.device)
            try:
                made = lock is not None and lock.created
                return _train(cfg, res, source, out, ckpt, world, device_name, wandb, empty, made)
            finally:
                distributed.close()
    finally:
        source.close()


def _train(cfg, res, source, out, ckpt, world, device_name, wandb, empty, made) -> Path:
    """The run itself. `ckpt`: the checkpoint to resume; `empty`: empty --out first (rank 0);
    `made`: --out was made for this run (removed again on bad input)."""
    if device_name != cfg.device:
        cfg = dataclasses.replace(cfg, device=device_name)
    distributed.barrier(world)  # every rank has checked --out before rank 0 changes it
    stashed = False
    if world.main:
        if empty and not cfg.overwrite:
            print(f"saekit train: {out} holds no checkpoint yet: starting it again from step 0",
                  file=sys.stderr)  # fmt: skip
            remove_owned(out, "run", "--resume")  # the lock stays
        elif empty:  # the old run aside until the new one commits (bad input: it comes back)
            stashed = stash_owned(out, "run")
        out.mkdir(parents=True, exist_ok=True)
        truth = source.ground_truth()
        if truth is not None:  # synthetic: the true features, next to the run that learns them
            truth.save(out)
    distributed.barrier(world)
    trainer = Trainer(cfg, res, source, out, world)
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
            drop_stash(out)
    except SaekitError:
        # Bad input found while reading (e.g. a corrupt shard): leave no half-written run dir,
        # and the run --overwrite was to replace as it was.
        if trainer.last_checkpoint is None and world.main:
            if stashed:
                restore_stash(out)
            elif made or cfg.overwrite:
                remove_owned(out, "run")  # and the lock removes a dir it made
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
