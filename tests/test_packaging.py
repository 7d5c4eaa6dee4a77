"""The install: one import name (`saekit`), nothing generic at the top of site-packages."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def build_wheel(tmp_path: Path) -> Path:
    """The wheel of the checkout's tracked files (a copy: building writes build/ and egg-info)."""
    src = tmp_path / "src"
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.split(b"\0")
    for f in filter(None, files):
        p = REPO / f.decode()
        if p.is_file():
            (src / f.decode()).parent.mkdir(parents=True, exist_ok=True)
            (src / f.decode()).write_bytes(p.read_bytes())
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(dist), str(src)],
        check=True, capture_output=True,
    )  # fmt: skip
    (wheel,) = dist.glob("saekit-*.whl")
    return wheel


@pytest.mark.slow
def test_wheel_holds_only_saekit_and_survives_pypi_scripts(tmp_path):
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if ".dist-info/" not in n}
    assert top == {"saekit"}, top
    assert "saekit/activations/default_model/model.safetensors" in names
    shipped = {n for n in names if n.endswith(".py")}
    assert "saekit/scripts/cli.py" in shipped
    assert not [n for n in shipped if n.startswith(("saekit/tests/", "saekit/scripts/bench/",
                                                    "saekit/scripts/experiments/"))]  # fmt: skip

    # A fresh environment: the wheel, then PyPI's `scripts` (which also installs a top-level
    # `scripts/`). Neither may break the other.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py, exe = venv / "bin" / "python", venv / "bin" / "saekit"
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "--no-deps", str(wheel)], check=True, capture_output=True)
    r = subprocess.run([*pip, "scripts"], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"PyPI's `scripts` could not be installed here: {r.stderr.strip()[-200:]}")
    cwd = tmp_path  # not the checkout: nothing of the repo on sys.path
    assert subprocess.run([str(exe), "--help"], cwd=cwd, capture_output=True).returncode == 0
    v = subprocess.run([str(exe), "--version"], cwd=cwd, capture_output=True, text=True)
    assert v.stdout.startswith("saekit ")
    ok = subprocess.run([str(py), "-c", "import saekit"], cwd=cwd, capture_output=True)
    assert ok.returncode == 0, ok.stderr
    for name in ("sae", "activations", "training", "diagnostics"):
        r = subprocess.run([str(py), "-c", f"import {name}"], cwd=cwd, capture_output=True)
        assert r.returncode != 0, f"`import {name}` works: a generic name leaked into site-packages"
    # `scripts` is PyPI's, untouched by saekit.
    r = subprocess.run([str(py), "-c", "import scripts, os; print(os.listdir(scripts.__path__[0]))"],
                       cwd=cwd, capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0 and "cli.py" not in r.stdout
