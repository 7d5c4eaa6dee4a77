"""One writer per output dir, every dtype through every verb, and runs with NaN/inf weights
(issue 22; docs/reliability.md rows 86-99).

Writers race as real `saekit` processes started together on one --out; readers (diagnose,
evaluate, train) meet a real writer in the middle of its work; a lock left by `kill -9` is taken
over by `--resume`. The dtype matrix trains from a cache of every cache dtype into every run
dtype, and evaluates and diagnoses every run dtype, in-process through the CLI.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from saekit.activations.cache_files import write_cache
from saekit.activations.cache_format import DTYPES as CACHE_DTYPES
from saekit.sae import lock as lockmod
from saekit.sae.lock import LOCK_FILE, DirLock, holder
from saekit.scripts.cli import main as cli_main
from saekit.training.loop import DTYPES as RUN_DTYPES

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"}
CACHE_FLAGS = ["--tokens", "3000", "--context-size", "64", "--batch-size", "8",
               "--shard-mb", "0.25"]  # fmt: skip  # 24 shards of 128 rows
TRAIN_FLAGS = ["--features", "64", "--batch-size", "128", "--steps", "400",
               "--checkpoint-every", "50", "--keep-checkpoints", "2", "--log-every", "10",
               "--resample-inputs", "2048"]  # fmt: skip


def saekit(verb: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "saekit", verb, *args]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as err:
        return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=err)


def error_line(stderr: str) -> str:
    """The one `saekit: error:` line (warnings may come before it); fails on a traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [s for s in stderr.replace("\r", "\n").splitlines() if s.strip()]
    rest = [s for s in lines if not s.startswith(("saekit: warning:", "saekit train: "))]
    assert len(rest) == 1 and rest[0].startswith("saekit: error:"), stderr
    assert lines[-1] == rest[0], stderr
    return rest[0]


def refused(argv: list[str], capsys, code: int = 2) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    err = capsys.readouterr().err
    assert e.value.code == code, err
    return error_line(err)


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def tree(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): sha(p) for p in sorted(d.rglob("*")) if p.is_file()}


def same_run(ref: Path, got: Path) -> None:
    """The same files; weights, history and sparsity byte for byte; metrics but for wall time."""
    names = {str(p.relative_to(got)) for p in got.rglob("*") if p.is_file()}
    assert names == {str(p.relative_to(ref)) for p in ref.rglob("*") if p.is_file()}
    for name in ("sae_weights.safetensors", "density_history.safetensors", "sparsity.safetensors"):
        assert sha(ref / name) == sha(got / name), name

    def metrics(d: Path) -> list[dict]:
        rows = [json.loads(s) for s in (d / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]

    assert metrics(ref) == metrics(got)


def wait_for(cond, p: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert p.poll() is None, f"the process ended before {what}"
        assert time.time() < deadline, f"no {what} in {timeout} s"
        time.sleep(0.01)


def lock_pid(d: Path) -> int | None:
    try:
        return json.loads((d / LOCK_FILE).read_text()).get("pid")
    except (OSError, ValueError):
        return None


def hold_lock(d: Path, verb: str) -> subprocess.Popen:
    """A process that takes the lock on `d` as `verb` would, and sleeps holding it."""
    code = (
        "import sys, time; from saekit.sae.lock import DirLock\n"
        "with DirLock(sys.argv[1], sys.argv[2]):\n"
        "    print('locked', flush=True); time.sleep(600)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code, str(d), verb], cwd=REPO, env=ENV,
                         stdout=subprocess.PIPE)  # fmt: skip
    assert p.stdout.readline().strip() == b"locked"
    return p


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("conc")


@pytest.fixture(scope="module")
def ref_cache(base) -> Path:
    """The uninterrupted reference cache, from a real process."""
    d = base / "ref-cache"
    p = start(saekit("cache", "--out", str(d), *CACHE_FLAGS), base / "ref-cache.log")
    assert p.wait() == 0, (base / "ref-cache.log").read_text()
    return d


@pytest.fixture(scope="module")
def ref_run(base, ref_cache) -> Path:
    d = base / "ref-run"
    cmd = saekit("train", "--cache", str(ref_cache), "--out", str(d), *TRAIN_FLAGS)
    p = start(cmd, base / "ref-run.log")
    assert p.wait() == 0, (base / "ref-run.log").read_text()
    return d


# ---------------------------------------------------------------------------------------------
# two writers on one --out


def race(cmd: list[str], logs: Path) -> tuple[int, str]:
    """Start `cmd` twice at once; exactly one must succeed. Returns the index of the one
    refused and its error line."""
    procs = [start(cmd, logs / f"writer-{i}.log") for i in range(2)]
    codes = [p.wait() for p in procs]
    assert sorted(codes) == [0, 2], codes
    loser = codes.index(2)
    line = error_line((logs / f"writer-{loser}.log").read_text())
    winner = procs[1 - loser].pid
    # Refused by the lock (naming the winner), or, had the winner finished first, by what it
    # left: either way before writing anything.
    assert f"pid {winner} " in line or "not empty" in line, line
    return loser, line


def test_two_trains_on_one_out_one_proceeds(ref_cache, ref_run, tmp_path):
    out = tmp_path / "run"
    cmd = saekit("train", "--cache", str(ref_cache), "--out", str(out), *TRAIN_FLAGS)
    _, line = race(cmd, tmp_path)
    print(line)
    same_run(ref_run, out)
    assert not (out / LOCK_FILE).exists()


def test_two_caches_on_one_out_one_proceeds(ref_cache, tmp_path):
    out = tmp_path / "cache"
    _, line = race(saekit("cache", "--out", str(out), *CACHE_FLAGS), tmp_path)
    print(line)
    assert tree(out) == tree(ref_cache)  # no lock file, no temporary file: the same files


def test_a_second_writer_is_refused_naming_the_holder_and_writes_nothing(
    ref_cache, ref_run, tmp_path, capsys
):
    """A writer holding --out (a stand-in process that took the lock) refuses every verb that
    would write there, in one line naming its pid, host, verb and start time."""
    run = tmp_path / "run"
    shutil.copytree(ref_run, run)
    p = hold_lock(run, "train")
    try:
        before = tree(run)
        for argv in (
            ["train", "--cache", str(ref_cache), "--out", str(run), "--overwrite"],
            ["evaluate", "--run", str(run), "--tokens", "128"],
            ["diagnose", "--run", str(run), "--out", str(tmp_path / "rep"), "--no-logits"],
        ):
            line = refused(argv, capsys)
            assert f"pid {p.pid} on " in line and "saekit train" in line and "started" in line
            assert tree(run) == before and not (tmp_path / "rep").exists()
        # A report is never written into a run dir, held or not: refused before the lock.
        line = refused(
            ["diagnose", "--run", str(ref_run), "--out", str(run), "--no-logits"], capsys
        )
        assert f"--out {run} is a run dir" in line and tree(run) == before
    finally:
        p.kill()
        p.wait()
    rep = tmp_path / "held-rep"  # a report dir another diagnose holds: refused naming it
    rep.mkdir()
    p = hold_lock(rep, "diagnose")
    try:
        line = refused(
            ["diagnose", "--run", str(ref_run), "--out", str(rep), "--no-logits"], capsys
        )
        assert f"pid {p.pid} on " in line and "saekit diagnose" in line, line
        assert [q.name for q in rep.iterdir()] == [LOCK_FILE]
    finally:
        p.kill()
        p.wait()


# ---------------------------------------------------------------------------------------------
# a lock left by kill -9 is stale: --resume takes it over


def test_kill9_leaves_a_stale_lock_that_resume_takes_over(ref_cache, ref_run, tmp_path, capsys):
    """A real `saekit train` killed mid-run, and a process holding a half-made cache's lock,
    killed: each leaves its lock file, which no longer locks: --resume takes it over and ends
    equal to the uninterrupted run (without the lock file)."""
    run = tmp_path / "run"
    t = start(saekit("train", "--cache", str(ref_cache), "--out", str(run), *TRAIN_FLAGS),
              tmp_path / "train.log")  # fmt: skip
    wait_for(lambda: (run / "checkpoints" / "step-00000050.json").exists(), t, "a checkpoint")
    t.send_signal(signal.SIGKILL)
    t.wait()
    assert lock_pid(run) == t.pid and holder(run) is None  # left behind, and stale
    cli_main(["train", "--cache", str(ref_cache), "--out", str(run), *TRAIN_FLAGS, "--resume"])
    same_run(ref_run, run)

    cache = tmp_path / "cache"
    shutil.copytree(ref_cache, cache)
    m = json.loads((cache / "manifest.json").read_text())
    for s in m["shards"][10:]:
        (cache / s["file"]).unlink()
    m["shards"], m["complete"] = m["shards"][:10], False
    m["n_tokens"] = m["stats"]["rows"] = sum(s["rows"] for s in m["shards"])
    m["stats"]["norm_sum"] = sum(s["norm_sum"] for s in m["shards"])
    m["stats"]["mean_norm"] = m["stats"]["norm_sum"] / m["n_tokens"]
    (cache / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")
    h = hold_lock(cache, "cache")
    line = refused(["cache", "--out", str(cache), *CACHE_FLAGS, "--resume"], capsys)
    assert f"`saekit cache` (pid {h.pid} " in line
    h.send_signal(signal.SIGKILL)
    h.wait()
    assert lock_pid(cache) == h.pid and holder(cache) is None
    cli_main(["cache", "--out", str(cache), *CACHE_FLAGS, "--resume"])
    assert tree(cache) == tree(ref_cache)


# ---------------------------------------------------------------------------------------------
# every source: synthetic activations take the lock and stop cleanly too

SYNTHETIC = ["--model", "synthetic", "--synthetic", "d_in=16", "n_features=64",
             "planted_per_block=2"]  # fmt: skip
SYN_TRAIN = ["--features", "32", "--steps", "600", "--batch-size", "256", "--checkpoint-every",
             "50", "--keep-checkpoints", "2", "--log-every", "50"]  # fmt: skip


def test_synthetic_sources_lock_and_stop_cleanly(tmp_path, capsys):
    """`train --model synthetic` and `cache --model synthetic` are refused while another process
    holds their --out, take over the lock a kill -9 left, and a SIGTERM'd synthetic `train` stops
    in one line with no lock or temporary file; --resume ends equal to an uninterrupted run."""
    run, cache = tmp_path / "run", tmp_path / "cache"
    train = ["train", "--out", str(run), *SYNTHETIC, *SYN_TRAIN]
    make = ["cache", "--out", str(cache), *SYNTHETIC, "--tokens", "5000", "--shard-mb", "0.02"]
    for argv, d, verb in ((train, run, "train"), (make, cache, "cache")):
        h = hold_lock(d, verb)
        line = refused(argv, capsys)
        assert f"`saekit {verb}` (pid {h.pid} " in line
        assert [p.name for p in d.iterdir()] == [LOCK_FILE]  # nothing written
        h.send_signal(signal.SIGKILL)
        h.wait()
        assert lock_pid(d) == h.pid and holder(d) is None  # stale: taken over below
    cli_main(make)
    assert json.loads((cache / "manifest.json").read_text())["complete"]
    assert not (cache / LOCK_FILE).exists()
    ref = tmp_path / "ref"
    cli_main(["train", "--out", str(ref), *SYNTHETIC, *SYN_TRAIN])
    shutil.rmtree(run)
    t = start(saekit(*train), tmp_path / "train.log")
    wait_for(lambda: (run / "checkpoints" / "step-00000050.json").exists(), t, "a checkpoint")
    t.send_signal(signal.SIGTERM)
    assert t.wait() == 143, (tmp_path / "train.log").read_text()
    assert "interrupted (SIGTERM)" in error_line((tmp_path / "train.log").read_text())
    assert not [p for p in run.rglob("*") if ".tmp-" in p.name or p.name == LOCK_FILE]
    assert not (run / "sae_weights.safetensors").exists()  # stopped mid-run
    cli_main([*train, "--resume"])
    same_run(ref, run)


def test_an_error_after_a_signal_is_reported_as_the_stop(tmp_path):
    """A SIGINT landing inside a library's import can leave it half-made and the verb then fails
    with that library's error (seen: a RecursionError in numpy under transformers): reported as
    the stop, one line and 128 + the signal, and the lock lets go as on a stop (keeping the dir
    it made, for --resume). Without a signal such an error is a bug: its traceback shows."""
    from saekit.sae import errors
    from saekit.scripts.cli import failure

    assert failure("cache", RuntimeError("boom")) is None
    d = tmp_path / "new"
    with pytest.raises(RuntimeError), DirLock(d, "train"):
        raise RuntimeError("bad input")
    assert not d.exists()  # a failure: the dir the lock made goes
    errors._pending.append(signal.SIGTERM)
    try:
        code, line = failure("cache", RuntimeError("numpy import broke"))
        assert code == 143 and line.startswith("interrupted (SIGTERM); ") and "--resume" in line
        with pytest.raises(RuntimeError), DirLock(d, "train"):
            raise RuntimeError("numpy import broke")
        assert d.is_dir() and not any(d.iterdir())  # a stop: kept, without its lock file
    finally:
        errors.clear_interrupts()


# ---------------------------------------------------------------------------------------------
# a reader of a dir that is being written


def test_readers_of_a_run_being_trained_are_refused(ref_cache, tmp_path, capsys):
    run = tmp_path / "run"
    flags = [*TRAIN_FLAGS[:4], "--steps", "100000", "--checkpoint-every", "20"]
    t = start(saekit("train", "--cache", str(ref_cache), "--out", str(run), *flags),
              tmp_path / "train.log")  # fmt: skip
    try:
        wait_for(lambda: (run / "checkpoints" / "step-00000020.json").exists(), t, "a checkpoint")
        assert lock_pid(run) == t.pid
        rep = tmp_path / "rep"
        for argv in (
            ["diagnose", "--run", str(run), "--out", str(rep), "--no-logits"],
            ["diagnose", "--run", str(run), "--out", str(rep), "--cache", str(ref_cache)],
            ["evaluate", "--run", str(run), "--tokens", "128"],
        ):
            line = refused(argv, capsys)
            assert f"run {run} is still being written by `saekit train` (pid {t.pid} " in line
        assert not rep.exists() and not (run / "eval.json").exists()
    finally:
        t.send_signal(signal.SIGTERM)
        assert t.wait() == 143
    assert "interrupted (SIGTERM)" in error_line((tmp_path / "train.log").read_text())
    assert not [p for p in run.rglob("*") if ".tmp-" in p.name or p.name == LOCK_FILE]


def test_readers_of_a_cache_being_written_are_refused(ref_run, tmp_path, capsys):
    cache = tmp_path / "cache"
    flags = ["--tokens", "400000", *CACHE_FLAGS[2:]]
    c = start(saekit("cache", "--out", str(cache), *flags), tmp_path / "cache.log")
    try:
        wait_for(lambda: (cache / "shard-00001.safetensors").exists(), c, "a shard")
        out = tmp_path / "run"
        for argv in (
            ["train", "--cache", str(cache), "--out", str(out), *TRAIN_FLAGS],
            ["diagnose", "--run", str(ref_run), "--cache", str(cache), "--out", str(out)],
        ):
            line = refused(argv, capsys)
            assert f"cache {cache} is still being written by `saekit cache` (pid {c.pid} " in line
            assert not out.exists()
    finally:
        c.send_signal(signal.SIGINT)
        assert c.wait() == 130
    assert "interrupted (SIGINT)" in error_line((tmp_path / "cache.log").read_text())
    # once it has stopped, the cache is merely incomplete
    line = refused(["train", "--cache", str(cache), "--out", str(tmp_path / "r")], capsys)
    assert "incomplete" in line and "--resume" in line


# ---------------------------------------------------------------------------------------------
# the lock file itself


def test_a_stale_lock_file_breaks_no_listing(ref_cache, ref_run, tmp_path, capsys):
    """A dir holding only a stale lock counts as empty; a finished run or cache holding one
    still loads (saekit, SAELens), and --overwrite / --resume checks accept it."""
    stale = json.dumps({"pid": 999_999_999, "host": "elsewhere", "verb": "train"})
    for d in ("cache", "run", "rep"):
        (tmp_path / d).mkdir()
        (tmp_path / d / LOCK_FILE).write_text(stale)
    cli_main(["cache", "--out", str(tmp_path / "cache"), *CACHE_FLAGS])
    assert tree(tmp_path / "cache") == tree(ref_cache)  # its lock file went with it
    (tmp_path / "cache" / LOCK_FILE).write_text(stale)  # --resume (and --overwrite) accept it
    cli_main(["cache", "--out", str(tmp_path / "cache"), *CACHE_FLAGS, "--resume"])
    assert tree(tmp_path / "cache") == tree(ref_cache)
    fast = [*TRAIN_FLAGS[:4], "--steps", "20", "--checkpoint-every", "0", "--resample", "none"]
    cli_main(["train", "--cache", str(ref_cache), "--out", str(tmp_path / "run"), *fast])
    run = tmp_path / "run2"
    shutil.copytree(ref_run, run)
    (run / LOCK_FILE).write_text(stale)
    sae_lens = pytest.importorskip("sae_lens")
    assert sae_lens.SAE.load_from_disk(str(run)).cfg.d_sae == 64
    cli_main(["diagnose", "--run", str(run), "--out", str(tmp_path / "rep"), "--no-logits"])
    assert not (tmp_path / "rep" / LOCK_FILE).exists()


def test_without_flock_the_lock_is_a_pid_file(tmp_path, monkeypatch, capsys):
    """On a filesystem without flock (simulated: flock fails with ENOLCK) a lock file naming a
    live process refuses a writer; one naming a dead process is taken over, with a warning."""

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lockmod.fcntl, "flock", no_flock)
    d = tmp_path / "out"
    d.mkdir()
    host = lockmod.socket.gethostname()
    (d / LOCK_FILE).write_text(json.dumps({"pid": os.getppid(), "host": host, "verb": "cache"}))
    with pytest.raises(lockmod.SaekitError, match=f"pid {os.getppid()} on {host}"):
        DirLock(d, "train").__enter__()
    assert holder(d)["pid"] == os.getppid()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (d / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": host, "verb": "cache"}))
    assert holder(d) is None
    with DirLock(d, "train"):
        assert json.loads((d / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert "has no flock" in capsys.readouterr().err
    assert not (d / LOCK_FILE).exists()


# ---------------------------------------------------------------------------------------------
# every dtype through every verb

D_IN = 512  # the default model's mlp_post: evaluate splices the SAE into it
ROWS = 2048


def _data() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(ROWS, D_IN, generator=g) - 0.5).relu()


def _cache(d: Path, acts: torch.Tensor) -> Path:
    half = ROWS // 2
    shards = [
        {"activations": acts[s : s + half], "tokens": torch.full((half,), 5),
         "context": torch.arange(s, s + half) // 63, "position": torch.arange(s, s + half) % 63 + 1}
        for s in (0, half)
    ]  # fmt: skip
    return write_cache(d, shards, model="default", site="mlp_post", layer=0, context_size=64,
                       hook_name="blocks.0.mlp.hook_post",
                       dataset={"name": "default", "split": "train", "text_column": "text"})  # fmt: skip


@pytest.fixture(scope="module")
def dtype_caches(tmp_path_factory) -> dict[str, Path]:
    """A cache of every cache dtype holding the same values (rounded to the narrowest dtype),
    and for each half dtype a float32 cache of its values."""
    base = tmp_path_factory.mktemp("dtypes")
    acts = _data()
    made = {}
    for name, dt in CACHE_DTYPES.items():
        made[name] = _cache(base / name, acts.to(dt))
        made[f"{name}-as-float32"] = _cache(base / f"{name}-f32", acts.to(dt).float())
    return made


def _train(cache: Path, out: Path, run_dtype: str) -> Path:
    cli_main(["train", "--cache", str(cache), "--out", str(out), "--features", "32",
              "--batch-size", "64", "--steps", "24", "--log-every", "8", "--checkpoint-every",
              "8", "--resample", "none", "--dtype", run_dtype])  # fmt: skip
    return out


@pytest.fixture(scope="module")
def dtype_runs(dtype_caches, tmp_path_factory) -> dict[str, Path]:
    """A run of every run dtype, trained on the float32 cache."""
    base = tmp_path_factory.mktemp("runs")
    return {rd: _train(dtype_caches["float32"], base / rd, rd) for rd in RUN_DTYPES}


@pytest.mark.parametrize("cache_dtype", sorted(CACHE_DTYPES))
@pytest.mark.parametrize("run_dtype", sorted(RUN_DTYPES))
def test_train_from_every_cache_dtype(cache_dtype, run_dtype, dtype_caches, tmp_path):
    """Training reads any cache dtype, converting rows exactly to the run's dtype: the run is
    bitwise the run on a float32 cache of the same values."""
    got = _train(dtype_caches[cache_dtype], tmp_path / "a", run_dtype)
    ref = _train(dtype_caches[f"{cache_dtype}-as-float32"], tmp_path / "b", run_dtype)
    w = load_file(str(got / "sae_weights.safetensors"))
    assert w["W_enc"].dtype == RUN_DTYPES[run_dtype]
    assert all(torch.isfinite(v).all() for v in w.values())
    assert sha(got / "sae_weights.safetensors") == sha(ref / "sae_weights.safetensors")
    # the histories' run fingerprints differ (they name their caches); their tensors do not
    a, b = (load_file(str(d / "density_history.safetensors")) for d in (got, ref))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("run_dtype", sorted(RUN_DTYPES))
def test_evaluate_and_diagnose_every_run_dtype(run_dtype, dtype_runs, dtype_caches, tmp_path):
    """evaluate and diagnose (with a cache of every dtype) read a run of any dtype and compute
    in float32, as eval.json and summary.json say: a float64 run gives exactly the numbers of
    the same run saved in float32. SAELens loads it too."""
    run = dtype_runs[run_dtype]
    cli_main(["evaluate", "--run", str(run), "--tokens", "128"])
    ev = json.loads((run / "eval.json").read_text())
    assert ev["weights_dtype"] == run_dtype and ev["compute_dtype"] == "float32"
    assert ev["n_tokens"] > 0 and all(
        ev[k] is not None for k in ("mse", "fvu_pooled", "ce_spliced", "kl_clean_spliced")
    )
    cast = tmp_path / "as-float32"
    shutil.copytree(run, cast)
    w = load_file(str(cast / "sae_weights.safetensors"))
    save_file({k: v.float() for k, v in w.items()}, str(cast / "sae_weights.safetensors"))
    cli_main(["evaluate", "--run", str(cast), "--tokens", "128"])
    ev32 = json.loads((cast / "eval.json").read_text())
    assert {k: v for k, v in ev32.items() if k != "weights_dtype"} == {
        k: v for k, v in ev.items() if k != "weights_dtype"
    }
    for cache_dtype in CACHE_DTYPES:
        rep = tmp_path / f"rep-{cache_dtype}"
        cli_main(["diagnose", "--run", str(run), "--out", str(rep), "--cache",
                  str(dtype_caches[cache_dtype]), "--tokens", "1024"])  # fmt: skip
        s = json.loads((rep / "summary.json").read_text())
        assert s["weights_dtype"] == run_dtype and s["compute_dtype"] == "float32"
        # (a class the 1024 rows cannot resolve is counted as None)
        assert s["n_features"] == 32 and sum(v or 0 for v in s["counts"].values()) <= 32
    rep = tmp_path / "rep-history"
    cli_main(["diagnose", "--run", str(run), "--out", str(rep), "--no-logits"])
    sae_lens = pytest.importorskip("sae_lens")
    theirs = sae_lens.SAE.load_from_disk(str(run))
    ours = load_file(str(run / "sae_weights.safetensors"))["W_enc"]
    assert torch.equal(theirs.W_enc.detach().to(ours.dtype), ours)


def test_the_sae_casts_its_input(dtype_runs):
    """The API's SAE keeps the saved dtype and takes float32 activations (issue 22: a float64
    SAE on float32 input was 'mat1 and mat2 must have the same dtype')."""
    from saekit import load_run

    x = _data()[:16]
    for run_dtype, run in dtype_runs.items():
        sae = load_run(str(run)).sae
        assert sae.W_enc.dtype == RUN_DTYPES[run_dtype]
        out = sae(x)
        assert out.recon.dtype == RUN_DTYPES[run_dtype] and torch.isfinite(out.mse)


# ---------------------------------------------------------------------------------------------
# NaN / inf weights


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_run_with_nan_or_inf_weights_is_refused(bad, dtype_runs, dtype_caches, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(dtype_runs["float32"], run)
    w = load_file(str(run / "sae_weights.safetensors"))
    w["W_dec"][3, 7] = bad
    save_file(w, str(run / "sae_weights.safetensors"))
    before = tree(run)
    rep = tmp_path / "rep"
    for argv in (
        ["evaluate", "--run", str(run), "--tokens", "128"],
        ["diagnose", "--run", str(run), "--out", str(rep)],
        ["diagnose", "--run", str(run), "--out", str(rep), "--cache", str(dtype_caches["float32"])],
    ):
        line = refused(argv, capsys)
        assert "sae_weights.safetensors: W_dec holds 1 NaN/inf values" in line, line
    assert tree(run) == before and not rep.exists()
    from saekit import load_run
    from saekit.sae.errors import SaekitError

    with pytest.raises(SaekitError, match="NaN/inf"):
        _ = load_run(str(run)).sae
    # a checkpoint with NaN weights (its checksum made to match) is refused by --resume
    for name in ("cfg.json", "saekit.json", "sae_weights.safetensors"):
        (run / name).unlink()
    ck = run / "checkpoints" / "step-00000016.safetensors"
    t = load_file(str(ck))
    t["sae.b_enc"][0] = bad
    save_file(t, str(ck))
    rec = json.loads(ck.with_suffix(".json").read_text())
    rec["sha256"] = sha(ck)
    ck.with_suffix(".json").write_text(json.dumps(rec))
    line = refused(["train", "--cache", str(dtype_caches["float32"]), "--out", str(run),
                    "--features", "32", "--batch-size", "64", "--steps", "24", "--log-every", "8",
                    "--checkpoint-every", "8", "--resample", "none", "--resume"], capsys)  # fmt: skip
    assert "step-00000016.safetensors holds NaN/inf in sae.b_enc" in line
