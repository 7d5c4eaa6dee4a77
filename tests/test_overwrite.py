"""`--overwrite` deletes only what saekit wrote (issue 23), temporary files go on any exit, and
the advice after an interrupted start says what works. Real runs at tiny sizes; the cases are
rows of docs/reliability.md."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from saekit.activations.cache_files import write_cache
from saekit.scripts.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
TINY = ["--features", "32", "--steps", "20", "--batch-size", "100", "--checkpoint-every", "10",
        "--resample", "none", "--log-every", "5"]  # fmt: skip


def error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [s for s in stderr.replace("\r", "\n").splitlines() if s.strip()]
    errors = [s for s in lines if s.startswith("saekit: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    return errors[0]


def refused(argv: list[str], capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    return error_line(err)


def tree(d: Path) -> dict[str, str]:
    """Every entry under `d`, symlinks as links (never followed): {path: sha256 or link target}."""
    out = {}
    for root, dirs, files in os.walk(d):
        for name in dirs + files:
            p = Path(root, name)
            rel = str(p.relative_to(d))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = "dir"
    return out


def temps(d: Path) -> list[str]:
    return [str(p) for p in d.rglob("*") if ".tmp-" in p.name or p.name == ".saekit.lock"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small cache, a second cache, a finished run on the first, a report of it."""
    base = tmp_path_factory.mktemp("ow")

    def cache(out: Path, seed: int) -> Path:
        g = torch.Generator().manual_seed(seed)
        shards = [{"activations": torch.randn(500, 16, generator=g).relu(),
                   "tokens": torch.zeros(500), "context": torch.arange(s, s + 500),
                   "position": torch.ones(500)} for s in range(0, 2000, 500)]  # fmt: skip
        return write_cache(out, shards, complete=True)

    c, other = cache(base / "cache", 0), cache(base / "other", 1)
    run = base / "run"
    cli_main(["train", "--cache", str(c), "--out", str(run), *TINY])
    return {"base": base, "cache": c, "other": other, "run": run}


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


@pytest.mark.parametrize("verb", ["train", "cache", "diagnose", "demo"])
def test_overwrite_refuses_a_dir_holding_a_foreign_file(world, tmp_path, capsys, verb):
    src = {"train": world["run"], "cache": world["cache"], "diagnose": None, "demo": None}[verb]
    out = copy(src, tmp_path / "out") if src else tmp_path / "out"
    out.mkdir(exist_ok=True)
    (out / "thesis.tex").write_text("\\section{years of work}")
    before = tree(out)
    argv = {
        "train": ["train", "--cache", str(world["cache"]), "--out", str(out), *TINY],
        "cache": ["cache", "--out", str(out), "--tokens", "100"],
        "diagnose": ["diagnose", "--run", str(world["run"]), "--out", str(out), "--no-logits"],
        "demo": ["demo", "--out", str(out)],
    }[verb]
    line = refused([*argv, "--overwrite"], capsys)
    assert "thesis.tex" in line and "saekit did not write" in line, line
    assert tree(out) == before
    if verb in ("train", "cache"):  # without --overwrite: the same advice, not "pass --overwrite"
        assert "thesis.tex" in refused(argv, capsys)
    if verb == "diagnose":  # without it, a report is not mixed into someone's folder either
        assert f"--out {out} is not empty" in refused(argv, capsys)
        assert tree(out) == before


def test_diagnose_writes_no_report_into_a_run_dir_or_a_cache(world, tmp_path, capsys):
    for d in (copy(world["run"], tmp_path / "run"), copy(world["cache"], tmp_path / "cache")):
        before = tree(d)
        line = refused(["diagnose", "--run", str(world["run"]), "--out", str(d), "--no-logits"],
                       capsys)  # fmt: skip
        assert f"--out {d} is a {'run dir' if d.name == 'run' else 'cache'}" in line, line
        assert tree(d) == before
    rep = tmp_path / "rep"  # an interrupted report's own files: --overwrite is the way on
    rep.mkdir()
    (rep / "report.html.tmp-123").write_text("half")
    line = refused(
        ["diagnose", "--run", str(world["run"]), "--out", str(rep), "--no-logits"], capsys
    )
    assert "holds a report's files; pass --overwrite" in line, line
    cli_main(
        ["diagnose", "--run", str(world["run"]), "--out", str(rep), "--no-logits", "--overwrite"]
    )
    assert (rep / "report.html").is_file() and not (rep / "report.html.tmp-123").exists()


def test_train_overwrite_of_a_cache_or_a_folder_of_outputs_is_refused(world, tmp_path, capsys):
    cache, before = world["cache"], tree(world["cache"])
    line = refused(["train", "--cache", str(cache), "--out", str(cache), "--overwrite", *TINY],
                   capsys)  # fmt: skip
    assert f"{cache} is a cache, not a run dir" in line, line
    assert tree(cache) == before
    parent = tmp_path / "experiments"  # (subdirs named cache/ and run/ would make a demo dir)
    copy(world["cache"], parent / "c1")
    copy(world["run"], parent / "r1")
    (parent / "notes.md").write_text("mine")
    before = tree(parent)
    for argv in (
        ["train", "--cache", str(cache), "--out", str(parent), "--overwrite", *TINY],
        ["cache", "--out", str(parent), "--tokens", "100", "--overwrite"],
        ["demo", "--out", str(parent), "--overwrite"],
    ):
        line = refused(argv, capsys)
        assert "holds saekit outputs" in line and "not a folder of them" in line, line
        assert tree(parent) == before
    line = refused(["cache", "--out", str(world["run"]), "--tokens", "100", "--overwrite"], capsys)
    assert "is a run dir, not a cache" in line


def test_overwrite_never_follows_a_symlink(world, tmp_path, capsys):
    other, before_other = world["other"], tree(world["other"])
    out = copy(world["cache"], tmp_path / "cache")
    (out / "mlp_post").symlink_to(other, target_is_directory=True)  # a site dir's name
    before = tree(out)
    line = refused(["cache", "--out", str(out), "--tokens", "100", "--overwrite"], capsys)
    assert "is a symlink" in line and "mlp_post" in line, line
    assert tree(out) == before and tree(other) == before_other
    run = copy(world["run"], tmp_path / "run")
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").symlink_to(other, target_is_directory=True)
    line = refused(["train", "--cache", str(world["cache"]), "--out", str(run), "--overwrite",
                    *TINY], capsys)  # fmt: skip
    assert "checkpoints is a symlink" in line, line
    assert tree(other) == before_other


def test_refused_overwrite_keeps_the_old_run(world, tmp_path, capsys):
    """--overwrite of a finished run with a cache whose third shard is corrupt (found only once
    training reads it, before the new run's first checkpoint): refused in one line, and the old
    run is back, byte for byte."""
    bad = copy(world["cache"], tmp_path / "bad")
    shard = bad / "shard-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    run = copy(world["run"], tmp_path / "run")
    before = tree(run)
    argv = ["train", "--cache", str(bad), "--out", str(run), "--overwrite", *TINY]
    line = refused([*argv, "--checkpoint-every", "0"], capsys)
    assert "shard-00002.safetensors" in line
    assert tree(run) == before
    missing = ["train", "--cache", str(tmp_path / "nope"), "--out", str(run), "--overwrite", *TINY]
    refused(missing, capsys)
    assert tree(run) == before
    # and a good --overwrite replaces it, leaving nothing of the old run aside
    cli_main(["train", "--cache", str(world["other"]), "--out", str(run), "--overwrite", *TINY])
    assert not (run / ".saekit-replaced").exists() and tree(run) != before
    assert not temps(run)


def test_resume_and_overwrite_clear_temporary_files_of_a_killed_run(world, tmp_path, capsys):
    """Temporary files a kill -9 left (stand-ins with a dead pid's suffix), before and after the
    first checkpoint: --resume removes them (restarting a run with no checkpoint, in one line
    saying so), and so does a fresh start with --overwrite."""
    run = copy(world["run"], tmp_path / "run")
    for name in ("cfg.json", "saekit.json", "sae_weights.safetensors", "sparsity.safetensors"):
        (run / name).unlink()  # killed during the final save
    (run / "checkpoints" / "step-00000030.safetensors.tmp-999999").write_bytes(b"x" * 1000)
    (run / "metrics.jsonl.tmp-999999").write_text("{")
    cli_main(["train", "--cache", str(world["cache"]), "--out", str(run), "--resume", *TINY])
    assert not temps(run) and (run / "saekit.json").is_file()

    early = tmp_path / "early"  # killed while writing its first file: no checkpoint yet (the
    early.mkdir()  # circular advice: "--resume ... drop --resume", "... pass --resume")
    (early / "synthetic.json.tmp-999999").write_text("{")
    line = refused(["train", "--cache", str(world["cache"]), "--out", str(early), *TINY], capsys)
    assert "pass --resume to continue it" in line  # and --resume does:
    cli_main(["train", "--cache", str(world["cache"]), "--out", str(early), "--resume", *TINY])
    assert "starting it again from step 0" in capsys.readouterr().err
    assert not temps(early) and (early / "saekit.json").is_file()

    (early / "metrics.jsonl.tmp-999999").write_text("{")
    (early / ".saekit-replaced").mkdir()  # a killed --overwrite's stash of the run before
    cli_main(["train", "--cache", str(world["cache"]), "--out", str(early), "--overwrite", *TINY])
    assert not temps(early) and not (early / ".saekit-replaced").exists()
    finished = refused(["train", "--cache", str(world["cache"]), "--out", str(early), "--resume",
                        *TINY], capsys)  # fmt: skip
    assert "holds a finished run; pass --overwrite" in finished


def _launch(argv: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"}
    return subprocess.Popen([sys.executable, "-m", "saekit", *argv], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"))  # fmt: skip


def _stop_in_checkpoint_write(d: Path, p: subprocess.Popen, timeout: float = 180.0) -> None:
    """Wait until `p` writes a checkpoint's temporary file, and stop it (SIGSTOP) there."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout and p.poll() is None:
        if list(d.glob("checkpoints/*.tmp-*")):
            p.send_signal(signal.SIGSTOP)
            if list(d.glob("checkpoints/*.tmp-*")):
                return  # stopped inside the write
            p.send_signal(signal.SIGCONT)  # it had just finished: the next checkpoint
        time.sleep(0.002)
    raise AssertionError(f"no checkpoint write was caught (exit {p.poll()})")


@pytest.mark.slow
def test_sigint_chain_during_the_first_checkpoint_leaves_no_temp_file(world, tmp_path):
    """Ctrl-C while the first checkpoint is being written, then Ctrl-C again while saekit cleans
    up: no temporary file, no lock file, one line, exit 130; --resume then starts the run again.
    Then kill -9 while writing a checkpoint: the next --resume removes the temp file it left."""
    # checkpoints of ~12 MB (32768 features x d_in 16, with Adam's state): writes take a while
    flags = ["--features", "32768", "--steps", "60", "--batch-size", "100",
             "--checkpoint-every", "20", "--resample", "none", "--no-mechanisms"]  # fmt: skip
    run, log = tmp_path / "run", tmp_path / "err"
    argv = ["train", "--cache", str(world["cache"]), "--out", str(run), *flags]
    p = _launch(argv, log)
    _stop_in_checkpoint_write(run, p)
    p.send_signal(signal.SIGINT)  # pending: handled inside the write once it runs again
    p.send_signal(signal.SIGCONT)
    time.sleep(0.02)
    p.send_signal(signal.SIGINT)  # during the cleanup the first one started
    # 130; or killed by the second SIGINT (-2) when this process, starved on a loaded machine,
    # sends it only after saekit has cleaned up and Python has put the default handler back
    assert p.wait(timeout=60) in (130, -signal.SIGINT), log.read_text()
    assert "interrupted (SIGINT)" in error_line(log.read_text())
    assert not temps(run), temps(run)

    p = _launch([*argv, "--resume"], log)
    _stop_in_checkpoint_write(run, p)
    p.kill()
    p.wait()
    assert list(run.glob("checkpoints/*.tmp-*"))  # kill -9 leaves the temp file
    p = _launch([*argv, "--resume"], log)
    assert p.wait(timeout=300) == 0, log.read_text()
    assert not temps(run) and (run / "saekit.json").is_file()


def test_demo_overwrite_failing_midway_keeps_the_old_demo(world, tmp_path):
    """A demo --overwrite that meets bad input once running (its cache step refuses) puts the
    old demo back, byte for byte."""
    from unittest import mock

    from saekit.sae.errors import SaekitError
    from saekit.scripts.demo import DemoConfig, demo

    out = tmp_path / "demo"
    copy(world["cache"], out / "cache")
    copy(world["run"], out / "run")
    (out / "demo.json").write_text("{}")
    before = tree(out)
    with mock.patch(
        "saekit.activations.cache_writer.choose_contexts", side_effect=SaekitError("too few")
    ):
        with pytest.raises(SaekitError, match="too few"):
            demo(DemoConfig(out=str(out), model="default", tokens=10**9, overwrite=True))
    assert tree(out) == before
