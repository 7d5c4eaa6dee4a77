"""Experiments: scripts run from a checkout (`python -m saekit.scripts.experiments.NAME`)."""

from __future__ import annotations

import shutil
from pathlib import Path

from saekit.sae.errors import SaekitError


def clear_out(out: Path, overwrite: bool, own: tuple[str, ...]) -> None:
    """Make an experiment's --out ready: empty, or (with --overwrite) an old experiment dir whose
    own entries (`own`: the names the experiment writes) are removed; anything else in it is the
    user's, so the dir is refused, never deleted, and symlinks are unlinked, never followed."""
    if not out.exists() or not any(out.iterdir()):
        return
    if not overwrite:
        raise SaekitError(f"{out} is not empty; pass --overwrite or another --out")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in own)
    if foreign:
        raise SaekitError(
            f"{out} holds {foreign[0]!r}, which this experiment did not write; "
            "refusing to overwrite it: pass an empty or new --out"
        )
    for name in own:
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
