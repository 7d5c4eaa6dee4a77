"""What each verb writes in its output dir, and `--overwrite` for every verb: it deletes only
saekit's own files, never through a symlink, and refuses a dir holding anything else.

Kinds of output dir: "cache" (`saekit cache`), "run" (`saekit train`), "report" (`saekit
diagnose`), "demo" (`saekit demo`: its cache/, run/ and report/ inside). An entry of a dir is
saekit's when its name is one of the fixed names that kind of dir holds (or the `NAME.tmp-PID`
temporary file of one) and it is a plain file, or a plain dir whose entries are saekit's in turn.
A symlink never is (saekit writes none), except inside wandb's own dir, where only the link goes.

`check_replace` refuses, in one line: a dir of another kind ("X is a cache, not a run dir"), a
folder of saekit outputs, a foreign file or a symlink (naming it). `remove_owned` deletes after
that check; `stash_owned` moves the old files aside instead (`train --overwrite`: a run refused
on bad input met while training, before its first checkpoint, gets the old run back; so does
a demo that fails midway).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .errors import SaekitError, signals_deferred
from .lock import LOCK_FILE, describe, holder

STASH = ".saekit-replaced"  # the replaced run's files until the new run commits
_TMP = re.compile(r"\.tmp-\d+$")
_RUN_FILES = (
    r"cfg\.json|sae_weights\.safetensors|saekit\.json|metrics\.jsonl|sparsity\.safetensors|"
    r"density_history\.safetensors|mechanisms\.safetensors|synthetic\.(json|safetensors)|eval\.json"
)
_CACHE_FILES = (
    r"manifest\.json|contexts\.safetensors|shard-\d+\.safetensors|synthetic\.(json|safetensors)"
)
# kind -> (file names, {subdir name: its kind}); "any": whatever a tool saekit runs writes there
_LAYOUT: dict[str, tuple[str, dict[str, str]]] = {
    "run": (_RUN_FILES, {"checkpoints": "checkpoints", "wandb": "any", STASH: "any"}),
    "checkpoints": (r"step-\d+\.(json|safetensors)", {}),
    "cache": (_CACHE_FILES, {}),  # + its sites' and workers' caches: _sub_cache
    "report": (
        r"report\.html|features\.csv|summary\.json|features\.html",
        {"features": "features"},
    ),
    "features": (r"index\.js|f-\d+\.js", {}),
    "demo": (r"demo\.json", {"cache": "cache", "run": "run", "report": "report", STASH: "any"}),
}
NAMES = {"cache": "cache", "run": "run dir", "report": "report dir", "demo": "demo dir"}
_MARKS = {  # files (or dirs) only that kind of dir holds
    "cache": ("manifest.json",),
    "demo": ("demo.json",),
    "run": ("saekit.json", "metrics.jsonl", "checkpoints"),
    "report": ("report.html", "summary.json", "features.csv", "features.html"),
}


def _site_of(d: Path) -> str | None:
    """The name a multi-site cache gives the dir of this cache's site (None: no manifest)."""
    try:
        m = json.loads((d / "manifest.json").read_text())
        return m["hook_name"] if m["site"] == "hook" else m["site"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _sub_cache(p: Path) -> bool:
    """Whether dir `p`, inside a cache dir, is one of its caches: a worker's (`worker-N`), or a
    site's of a multi-site cache (named after its site; without a manifest yet: being begun)."""
    if re.fullmatch(r"worker-\d+", p.name):
        return True
    site = _site_of(p)
    return site == p.name or (site is None and not (p / "manifest.json").exists())


def kind_of(d: Path) -> str | None:
    """The kind of saekit output dir `d` is, from the files only that kind holds (None: none)."""
    if not d.is_dir() or d.is_symlink():
        return None
    for kind, marks in _MARKS.items():
        if any((d / m).exists() for m in marks):
            return kind
    subs = [p for p in d.iterdir() if p.is_dir() and not p.is_symlink()]
    if subs and all((p / "manifest.json").is_file() and _sub_cache(p) for p in subs):
        return "cache"  # a multi-site cache, or one split over workers
    return None


def first_problem(d: Path, kind: str) -> tuple[str, Path] | None:
    """("symlink" | "foreign", path) of the first entry of `d` not `kind`'s own, or None."""
    if kind == "any":
        return None
    files, dirs = _LAYOUT[kind]
    for p in sorted(d.iterdir()):
        base = _TMP.sub("", p.name)
        if p.name == LOCK_FILE:
            continue
        if p.is_symlink():
            return "symlink", p
        if p.is_dir():
            sub = dirs.get(p.name)
            if sub is None and kind == "cache" and _sub_cache(p):
                sub = "cache"
            if sub is None:
                return "foreign", p
            found = first_problem(p, sub)
            if found:
                return found
        elif not (p.is_file() and re.fullmatch(files, base)):
            return "foreign", p
    return None


def check_replace(out: Path, kind: str, flag: str = "--overwrite") -> None:
    """SaekitError, in one line, unless every entry of `out` is saekit's own for a `kind` dir
    (see the module's docstring): `flag` may then delete them. An empty or missing dir passes."""
    if not out.is_dir() or not any(p.name != LOCK_FILE for p in out.iterdir()):
        return
    want, found = NAMES[kind], kind_of(out)
    if found is not None and found != kind:
        raise SaekitError(
            f"{flag} refused: {out} is a {NAMES[found]}, not a {want}; pass a {want} or a new --out"
        )
    problem = first_problem(out, kind)
    if problem is None:
        if kind == "run" and found is None and (out / "cfg.json").exists():
            raise SaekitError(
                f"{flag} refused: {out} holds an SAE saekit did not train (no saekit.json or metrics.jsonl); move it or choose another --out"
            )
        return
    what, p = problem
    inner = kind_of(p) if what == "foreign" else None
    if inner is not None:
        raise SaekitError(
            f"{flag} refused: {out} holds saekit outputs ({p} is a {NAMES[inner]}); {flag} replaces one {want}, not a folder of them: pass a {want} itself or a new --out"
        )
    if what == "symlink":
        raise SaekitError(
            f"{flag} refused: {p} is a symlink, which saekit never writes nor deletes through; remove the link or choose another --out"
        )
    raise SaekitError(
        f"{flag} refused: {out} holds {p.relative_to(out)}, which saekit did not write; move it out of {out} or choose another --out"
    )


def _check_unheld(out: Path) -> None:
    """SaekitError if another process writes a dir inside `out` (a cache worker's dir)."""
    for lock in out.glob(f"*/**/{LOCK_FILE}"):
        info = holder(lock.parent)
        if info:
            raise SaekitError(
                f"{lock.parent} is being written by {describe(info)}; wait for it to finish before replacing {out}"
            )


def _remove(p: Path) -> None:
    """Delete file or dir `p`; a symlink is unlinked, never followed."""
    if p.is_dir() and not p.is_symlink():
        for q in p.iterdir():
            _remove(q)
        p.rmdir()
    else:
        p.unlink(missing_ok=True)


def remove_owned(out: Path, kind: str, flag: str = "--overwrite") -> None:
    """Delete every entry of `out` (but its lock file, held by the caller) after `check_replace`."""
    check_replace(out, kind, flag)
    if not out.is_dir():
        return
    _check_unheld(out)
    for p in out.iterdir():
        if p.name != LOCK_FILE:
            _remove(p)


def stash_owned(out: Path, kind: str, flag: str = "--overwrite") -> bool:
    """As remove_owned, but the entries move into `out/.saekit-replaced` (a rename: no copy)
    until `drop_stash` (the new output is committed) or `restore_stash` (it was refused).
    Returns whether anything was moved."""
    check_replace(out, kind, flag)
    old = [p for p in out.iterdir() if p.name not in (LOCK_FILE, STASH)] if out.is_dir() else []
    drop_stash(out)  # one left by a killed earlier replacement: its run was replaced already
    if not old:
        return False
    _check_unheld(out)
    stash = out / STASH
    stash.mkdir()
    with signals_deferred():
        for p in old:
            p.rename(stash / p.name)
    return True


def restore_stash(out: Path) -> None:
    """Put back the stashed old output, deleting what the new one wrote (all saekit's own)."""
    stash = out / STASH
    if not stash.is_dir():
        return
    with signals_deferred():
        for p in out.iterdir():
            if p.name not in (LOCK_FILE, STASH):
                _remove(p)
        for p in stash.iterdir():
            p.rename(out / p.name)
        stash.rmdir()


def drop_stash(out: Path) -> None:
    """Delete the replaced output's files (the new output is committed)."""
    stash = out / STASH
    if stash.is_dir() and not stash.is_symlink():
        _remove(stash)
