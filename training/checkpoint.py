"""Checkpoint files of a run: written atomically, verified before resuming (docs/architecture.md).

`checkpoints/step-NNNNNNNN.safetensors` holds the SAE, Adam's state, the density tracker and the
RNG; `step-NNNNNNNN.json`, written last so that it marks a complete checkpoint, holds the step,
the config and the checksums resuming verifies. What goes in them is the Trainer's business
(training/loop.py); this module owns the files.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch

from ..sae.errors import SaekitError
from ..sae.io import (
    atomic_save_safetensors,
    atomic_write_bytes,
    atomic_write_json,
    load_safetensors,
    sha256_file,
)
from ..sae.model import SAE
from ..sae.outdir import drop_stash
from .config import TrainConfig

# Fields that must not change when resuming (the others only affect logging and I/O).
RESUME_FIELDS = (
    "arch", "features", "expansion", "steps", "batch_size", "lr", "l1_coef", "k", "k_aux",
    "aux_coef", "widths", "resample", "resample_steps", "dead_window", "resample_inputs",
    "resample_holdout", "resample_below", "density_window", "seed", "dtype", "matmul_dtype",
    "include_bos", "model_batch_size", "buffer_tokens",
)  # fmt: skip


def cfg_dict(cfg: TrainConfig) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}


def latest_checkpoint(out: Path) -> Path | None:
    """The newest checkpoint whose JSON (written last, so it marks a complete checkpoint) exists."""
    found = sorted((out / "checkpoints").glob("step-*.json"))
    found = [p for p in found if p.with_suffix(".safetensors").is_file()]
    return found[-1] if found else None


def _metrics_step(line: str) -> float:
    """The step of a metrics.jsonl line; inf for a torn or foreign line (dropped on resume)."""
    try:
        step = json.loads(line)["step"]
        return step if isinstance(step, int) else math.inf
    except (ValueError, KeyError, TypeError):
        return math.inf


def write_checkpoint(
    out: Path, step: int, tensors: dict[str, torch.Tensor], record: dict, source_sha: str, keep: int
) -> None:
    """checkpoints/step-N.safetensors, then its JSON (`record` + the checksums resuming verifies);
    then only the newest `keep` checkpoints are kept (0: all)."""
    ck = out / "checkpoints"
    ck.mkdir(exist_ok=True)
    stem = ck / f"step-{step:08d}"
    sha = atomic_save_safetensors(stem.with_suffix(".safetensors"), tensors)
    # what resuming verifies: the tensors file, and the source the run trains on
    atomic_write_json(
        stem.with_suffix(".json"), {**record, "sha256": sha, "source_sha256": source_sha}
    )
    drop_stash(out)  # the new run has a checkpoint: the run --overwrite replaced goes now
    if keep:
        for old in sorted(ck.glob("step-*.json"))[:-keep]:
            old.with_suffix(".safetensors").unlink(missing_ok=True)
            old.unlink(missing_ok=True)


def _verified_record(json_path: Path, cfg: TrainConfig, source, out: Path) -> dict:
    """The checkpoint's JSON, after checking it belongs to this run, its settings and its source."""
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
    # a field newer than the checkpoint had its default then
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    was = {f: saved.get(f, defaults.get(f)) for f in RESUME_FIELDS}
    diff = [f for f in RESUME_FIELDS if was[f] != getattr(cfg, f)]
    if diff:
        changes = ", ".join(f"{f}: {was[f]!r} -> {getattr(cfg, f)!r}" for f in diff)
        raise SaekitError(
            f"cannot resume {out} from checkpoint {json_path} with different settings ({changes}); use the original flags"
        )
    # cache_sha256: checkpoints written before training read other sources (always a cache)
    saved_sha = meta.get("source_sha256", meta.get("cache_sha256"))
    if saved_sha is not None and saved_sha != source.fingerprint():
        now = {"cache": f"another cache than --cache {cfg.cache}",
               "synthetic": "another source than this synthetic spec",
               "live": f"another source than --model {cfg.model} at this site and dataset"}.get(source.kind, "another source")  # fmt: skip
        raise SaekitError(
            f"checkpoint {json_path} was written while training on {now} (its fingerprint differs); resume with the original source flags"
        )
    if meta.get("sha256") is not None and st_path.is_file():
        if sha256_file(st_path) != meta["sha256"]:
            raise SaekitError(
                f"checkpoint {st_path} fails its sha256 check (corrupt, or from another run); delete it and {json_path.name} to resume from the one before"
            )
    return meta


def read_checkpoint(
    json_path: Path, cfg: TrainConfig, source, out: Path, sae: SAE
) -> tuple[dict, dict[str, torch.Tensor]]:
    """A checkpoint's record and tensors, verified against this run (settings, source, checksum,
    the SAE's parameters and shape); SaekitError in one line naming the file otherwise."""
    meta = _verified_record(json_path, cfg, source, out)
    st_path = json_path.with_suffix(".safetensors")
    t = load_safetensors(st_path)
    names = [n for n, _ in sae.named_parameters()] + [n for n, _ in sae.named_buffers()]
    want = [f"sae.{n}" for n in names] + ["rng.torch", "density.window", "history.counts"]
    lacking = [k for k in want if k not in t]
    if lacking:
        raise SaekitError(
            f"checkpoint {st_path} lacks {lacking[0]}: it is not a saekit checkpoint of this run; delete it and {json_path.name}"
        )
    bad = [k for k in want[: len(names)] if not bool(torch.isfinite(t[k]).all())]
    if bad:
        raise SaekitError(
            f"checkpoint {st_path} holds NaN/inf in {bad[0]}; delete it and {json_path.name} to resume from the one before"
        )
    if t["sae.W_enc"].shape != sae.W_enc.shape:
        raise SaekitError(
            f"checkpoint {json_path.name} has W_enc {tuple(t['sae.W_enc'].shape)} but the source gives {tuple(sae.W_enc.shape)}; resume on the original source"
        )
    return meta, t


def drop_after(out: Path, step: int) -> None:
    """What an interrupted run wrote after its checkpoint at `step`: metrics lines and the
    temporary files of writes it did not finish."""
    metrics = out / "metrics.jsonl"
    if metrics.is_file():
        keep = [
            line
            for line in metrics.read_text(errors="replace").splitlines()
            if _metrics_step(line) <= step
        ]
        # atomically: a kill during this rewrite must not lose the lines before the checkpoint
        atomic_write_bytes(metrics, "".join(line + "\n" for line in keep).encode())
    for tmp in [*out.glob("*.tmp-*"), *(out / "checkpoints").glob("*.tmp-*")]:
        tmp.unlink(missing_ok=True)
    drop_stash(out)  # a kill came between the first checkpoint and this removal
