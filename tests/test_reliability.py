"""Reliability: kill -9 at many random moments, a full disk, corrupt and foreign files, and
pickled payloads. Every case is listed, with its outcome, in docs/reliability.md.

The kill -9 chains run real `saekit cache` / `saekit train` processes: one uninterrupted
reference run per configuration, then one run killed again and again (each kill a seeded random
number of shards / checkpoints after the process shows progress, plus a seeded random fraction of
a shard or checkpoint interval, so the kills land in shard writes, manifest updates, checkpoint
writes and pruning, and in the final save), each kill followed by `--resume`, until a last
`--resume` completes. The result is compared byte for byte with the reference. The two chains
run side by side (each process is mostly single-threaded start-up).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import xxhash
from safetensors.torch import load_file

from saekit.sae.lock import LOCK_FILE
from saekit.scripts.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"}

# The kill chains' configurations: a few seconds of work each, many shards / checkpoints.
CACHE_FLAGS = ["--tokens", "40000", "--context-size", "64", "--batch-size", "8",
               "--shard-mb", "0.25"]  # fmt: skip  # 313 shards of 128 rows
TRAIN_STEPS, CKPT_EVERY = 500, 10
TRAIN_FLAGS = ["--features", "256", "--batch-size", "256", "--steps", str(TRAIN_STEPS),
               "--checkpoint-every", str(CKPT_EVERY), "--keep-checkpoints", "2",
               "--log-every", "10", "--resample", "anthropic", "--resample-holdout", "0.5",
               "--resample-inputs", "4096"]  # fmt: skip
KILLS = 21  # kills per chain aimed at the middle of the run (>= 20 required)
END_KILLS = 3  # then up to this many aimed at the final shard / the final save


def saekit(verb: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "saekit", verb, *args]


def run(cmd: list[str], log: Path, preexec_fn=None) -> subprocess.CompletedProcess:
    with open(log, "w") as err:
        p = subprocess.run(
            cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=err, preexec_fn=preexec_fn
        )
    return subprocess.CompletedProcess(cmd, p.returncode, "", log.read_text())


def error_line(stderr: str) -> str:
    """The one `saekit: error:` line of a refused command; fails on a traceback or several."""
    assert "Traceback" not in stderr, stderr
    lines = [s for s in stderr.replace("\r", "\n").splitlines() if s.strip()]
    errors = [s for s in lines if s.startswith("saekit: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    return errors[0]


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def xxh(p: Path) -> str:
    """The checksum the cache's manifest records for a file."""
    return xxhash.xxh3_128(p.read_bytes()).hexdigest()


def tree(d: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under d."""
    return {str(p.relative_to(d)): sha(p) for p in sorted(d.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# kill -9 chains


def kill_chain(
    fresh: list[str],
    resume: list[str],
    progress,
    last_unit: int,
    finished,
    check,
    rng: random.Random,
    sizes: tuple[int, int],
    unit_s: float,
    logs: Path,
    stops: tuple[signal.Signals, ...] = (signal.SIGKILL,),
    plan: tuple[int, int, int] = (KILLS, 0, END_KILLS),
    out: Path | None = None,
) -> dict:
    """Run `fresh`, kill -9 it, then `resume` and kill again, ..., and finally `resume` to the end.

    `progress()` is the number of units (shards, checkpoints) on disk. A mid-run kill waits for
    rng.randint(*sizes) new units after launch, then a random fraction of `unit_s` seconds; an
    early one a random 2-6 s after launch (start-up, model loading, checks, resuming); an end
    kill waits for unit `last_unit` and then up to 3 * unit_s, landing in the last writes.
    `plan` is how many (mid, early, end) kills to try; they send `stops` in turn: SIGKILL, or
    SIGINT / SIGTERM, after which the process must stop cleanly (exit 130 / 143, one line).
    With `out`, mid and end kills also wait for the process to hold the lock on `out` (a
    relaunch may start with the target already on disk: its kill would land in Python's
    start-up). `check(signal)` runs after every kill and returns the phase the kill left on disk."""
    kills, launches, phases = 0, 0, []
    n_mid, n_early, n_end = plan
    kinds = ["mid"] * n_mid
    for i in range(n_early):  # early kills among the first, while much work is left (but not
        kinds.insert(3 * i + 1, "early")  # the first: `train --resume` needs a run dir)
    kinds += ["end"] * n_end
    for kind in kinds:
        if finished():
            break
        sig = stops[kills % len(stops)]
        before = progress()
        target = before + rng.randint(*sizes) if kind == "mid" else last_unit
        delay = rng.uniform(0, unit_s) if kind == "mid" else rng.uniform(0, 3 * unit_s)
        log = logs / f"launch-{launches}.log"
        with open(log, "w") as err:
            p = subprocess.Popen(
                resume if launches else fresh,
                cwd=REPO,
                env=ENV,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        launches += 1
        deadline = time.time() + 300
        if kind == "early":
            target, delay = 0, rng.uniform(2.0, 6.0)
        while (progress() < target or out and kind != "early" and lock_pid(out) != p.pid) and (
            p.poll() is None
        ):
            assert time.time() < deadline, "no progress in 300 s"
            time.sleep(0.003)
        if p.poll() is None:
            time.sleep(delay)
        if p.poll() is None:
            os.kill(p.pid, sig)
            p.wait()
            if p.returncode == 0 or p.returncode == -sig and sig != signal.SIGKILL:
                # the signal came after the work was done
                assert finished(), (p.returncode, log.read_text())
                continue
            kills += 1
            if sig != signal.SIGKILL:  # a clean stop
                assert p.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143}[sig], (
                    p.returncode,
                    log.read_text(),
                )
                assert f"interrupted ({sig.name})" in error_line(log.read_text())
            phases.append(f"{kind} {sig.name}: {check(sig)}")
        else:  # it finished before the kill
            assert p.returncode == 0, log.read_text()
            assert finished()
    if not finished():
        r = run(resume, logs / "final.log")
        launches += 1
        assert r.returncode == 0, r.stderr
    return {"kills": kills, "launches": launches, "phases": phases}


def lock_pid(d: Path) -> int | None:
    """The pid the lock file of `d` names (None: none)."""
    try:
        return json.loads((d / LOCK_FILE).read_text()).get("pid")
    except (OSError, ValueError):
        return None


def shard_progress(d: Path) -> int:
    """1 + the highest shard index on disk (listed in the manifest or not yet)."""
    try:
        names = [n for n in os.listdir(d) if n.startswith("shard-") and n.endswith(".safetensors")]
    except FileNotFoundError:
        return 0
    return 1 + max((int(n[6:11]) for n in names), default=-1)


def clean_stop(d: Path, sig: signal.Signals) -> None:
    """After SIGINT / SIGTERM: no temporary file and no lock file left (kill -9 leaves both)."""
    if sig != signal.SIGKILL:
        left = [p.name for p in d.rglob("*") if ".tmp-" in p.name or p.name == LOCK_FILE]
        assert not left, left


def check_cache_after_kill(d: Path, sig: signal.Signals = signal.SIGKILL) -> str:
    """What a reader of a killed cache may rely on: the manifest parses, every shard it lists is
    whole (size and checksum), and nothing is marked complete early."""
    clean_stop(d, sig)
    if not (d / "manifest.json").exists():
        return "before the manifest"
    m = json.loads((d / "manifest.json").read_text())
    for s in m["shards"]:
        p = d / s["file"]
        assert p.stat().st_size == s["bytes"] and xxh(p) == s["xxh3_128"], s["file"]
    assert m["n_tokens"] == sum(s["rows"] for s in m["shards"])
    if any(".tmp-" in n for n in os.listdir(d)):
        return "during a write (temporary file left)"
    if shard_progress(d) > len(m["shards"]):
        return "between a shard and its manifest update"
    return "between writes"


def ckpt_progress(run_dir: Path) -> int:
    """The highest checkpoint step on disk, in units of --checkpoint-every."""
    try:
        names = os.listdir(run_dir / "checkpoints")
    except FileNotFoundError:
        return 0
    steps = [int(n[5:13]) for n in names if n.startswith("step-") and n.endswith(".json")]
    return max(steps, default=0) // CKPT_EVERY


def check_run_after_kill(d: Path, sig: signal.Signals = signal.SIGKILL) -> str:
    """Every complete checkpoint (its JSON exists) has its tensors, matching the recorded sha256;
    metrics.jsonl holds whole lines only."""
    clean_stop(d, sig)
    if not (d / "metrics.jsonl").exists():
        return "before the first write"
    for j in (d / "checkpoints").glob("step-*.json"):
        meta = json.loads(j.read_text())
        st = j.with_suffix(".safetensors")
        if st.exists():
            assert sha(st) == meta["sha256"], st
    for line in (d / "metrics.jsonl").read_text().splitlines():
        json.loads(line)
    names = os.listdir(d) + (os.listdir(d / "checkpoints") if (d / "checkpoints").is_dir() else [])
    if any(".tmp-" in n for n in names):
        return "during a write (temporary file left)"
    if (d / "sae_weights.safetensors").exists() or (d / "sparsity.safetensors").exists():
        return "during the final save"
    return "between writes"


@pytest.fixture(scope="module")
def ref_cache(tmp_path_factory) -> Path:
    """The uninterrupted reference cache (a real `saekit cache` process)."""
    d = tmp_path_factory.mktemp("ref") / "cache"
    r = run(saekit("cache", "--out", str(d), *CACHE_FLAGS), d.parent / "cache.log")
    assert r.returncode == 0, r.stderr
    return d


@pytest.fixture(scope="module")
def ref_run(ref_cache) -> Path:
    d = ref_cache.parent / "run"
    r = run(saekit("train", "--cache", str(ref_cache), "--out", str(d), *TRAIN_FLAGS),
            ref_cache.parent / "run.log")  # fmt: skip
    assert r.returncode == 0, r.stderr
    return d


@pytest.fixture(scope="module")
def chains(ref_cache, tmp_path_factory):
    """Both kill chains, started side by side; each test waits for its own."""
    base = tmp_path_factory.mktemp("chains")
    n_shards = len(json.loads((ref_cache / "manifest.json").read_text())["shards"])
    cache_dir, run_dir = base / "cache", base / "run"
    (base / "cache-logs").mkdir()
    (base / "train-logs").mkdir()

    def cache_chain() -> dict:
        cmd = saekit("cache", "--out", str(cache_dir), *CACHE_FLAGS)
        return kill_chain(
            cmd,
            [*cmd, "--resume"],
            lambda: shard_progress(cache_dir),
            n_shards,
            lambda: (
                json.loads((cache_dir / "manifest.json").read_text()).get("complete", False)
                if (cache_dir / "manifest.json").exists()
                else False
            ),
            lambda sig: check_cache_after_kill(cache_dir, sig),
            random.Random(1234),
            (1, 10),
            0.02,  # about one shard's worth of caching here
            base / "cache-logs",
        )

    def train_chain() -> dict:
        cmd = saekit("train", "--cache", str(ref_cache), "--out", str(run_dir), *TRAIN_FLAGS)
        return kill_chain(
            cmd,
            [*cmd, "--resume"],
            lambda: ckpt_progress(run_dir),
            TRAIN_STEPS // CKPT_EVERY - 1,
            lambda: (run_dir / "saekit.json").exists(),
            lambda sig: check_run_after_kill(run_dir, sig),
            random.Random(5678),
            (1, 2),
            0.15,  # about one checkpoint interval
            base / "train-logs",
        )

    pool = ThreadPoolExecutor(2)
    yield {
        "cache": pool.submit(cache_chain),
        "train": pool.submit(train_chain),
        "cache_dir": cache_dir,
        "run_dir": run_dir,
    }
    pool.shutdown(wait=True)


def assert_same_cache(ref: Path, got: Path) -> None:
    """Nothing lost, nothing duplicated: the same files, byte for byte (manifest included)."""
    assert tree(got) == tree(ref)


def _strip(d: dict, *keys: str) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


def assert_same_run(ref: Path, got: Path) -> None:
    """Weights, density history, sparsity and kept checkpoints byte for byte; metrics.jsonl,
    cfg.json, saekit.json and checkpoint records equal but for wall-clock time and --resume."""
    names = {str(p.relative_to(got)) for p in got.rglob("*") if p.is_file()}
    assert names == {str(p.relative_to(ref)) for p in ref.rglob("*") if p.is_file()}
    for name in sorted(names):
        a, b = ref / name, got / name
        if name.startswith("checkpoints/") and name.endswith(".safetensors"):
            # torch seeds its global generator at random in every process (saekit draws from it
            # nowhere: every random choice has its own seeded generator), so the saved global
            # state `rng.torch` is the one tensor that differs from a separate process's.
            ta, tb = load_file(str(a)), load_file(str(b))
            assert ta.keys() == tb.keys(), name
            for k in ta:  # bitwise; NaN (mechanisms' L1 share without a gradient) equals NaN
                if k != "rng.torch":
                    torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=0, equal_nan=True)
        elif name.endswith(".safetensors"):
            assert sha(a) == sha(b), name
        elif name == "metrics.jsonl":
            ma = [_strip(json.loads(s), "elapsed_s") for s in a.read_text().splitlines()]
            mb = [_strip(json.loads(s), "elapsed_s") for s in b.read_text().splitlines()]
            assert ma == mb and [m["step"] for m in ma] == list(range(10, TRAIN_STEPS + 1, 10))
        else:
            ja, jb = json.loads(a.read_text()), json.loads(b.read_text())
            for j in (ja, jb):  # the run dir's own path and the flag that resumed it
                j.pop("elapsed_s", None)
                j.pop("sha256", None)  # of the checkpoint's tensors, rng.torch included
                for holder in (j, j.get("metadata") or {}, j.get("config") or {}):
                    for k in ("resume", "out"):
                        holder.pop(k, None)
                        if isinstance(holder.get("train_config"), dict):
                            holder["train_config"].pop(k, None)
            assert ja == jb, name


@pytest.mark.slow
def test_kill9_cache_at_random_moments_then_resume_is_identical(chains, ref_cache):
    out = chains["cache"].result()
    print(f"cache chain: {out}")
    assert out["kills"] >= 20, out
    assert_same_cache(ref_cache, chains["cache_dir"])


@pytest.mark.slow
def test_kill9_train_at_random_moments_then_resume_is_identical(chains, ref_run):
    out = chains["train"].result()
    print(f"train chain: {out}")
    assert out["kills"] >= 20, out
    assert_same_run(ref_run, chains["run_dir"])


# ---------------------------------------------------------------------------------------------
# SIGINT and SIGTERM at random moments: a clean stop, then --resume

STOPS = (signal.SIGINT, signal.SIGTERM)
STOP_PLAN = (7, 3, 2)  # (mid-run, early, at the end): up to 12 stops a chain, half SIGINT


@pytest.fixture(scope="module")
def signal_chains(ref_cache, tmp_path_factory):
    """Both stop chains, side by side: as the kill chains, but each process gets SIGINT or
    SIGTERM and must stop cleanly: exit 130 / 143, one line, no temporary or lock file."""
    base = tmp_path_factory.mktemp("signals")
    n_shards = len(json.loads((ref_cache / "manifest.json").read_text())["shards"])
    cache_dir, run_dir = base / "cache", base / "run"
    (base / "cache-logs").mkdir()
    (base / "train-logs").mkdir()
    cache_cmd = saekit("cache", "--out", str(cache_dir), *CACHE_FLAGS)
    train_cmd = saekit("train", "--cache", str(ref_cache), "--out", str(run_dir), *TRAIN_FLAGS)

    def cache_done() -> bool:
        m = cache_dir / "manifest.json"
        return m.exists() and json.loads(m.read_text()).get("complete", False)

    pool = ThreadPoolExecutor(2)
    yield {
        "cache": pool.submit(kill_chain, cache_cmd, [*cache_cmd, "--resume"],
                             lambda: shard_progress(cache_dir), n_shards, cache_done,
                             lambda sig: check_cache_after_kill(cache_dir, sig),
                             random.Random(4321), (1, 10), 0.02, base / "cache-logs",
                             STOPS, STOP_PLAN, cache_dir),
        "train": pool.submit(kill_chain, train_cmd, [*train_cmd, "--resume"],
                             lambda: ckpt_progress(run_dir), TRAIN_STEPS // CKPT_EVERY - 1,
                             lambda: (run_dir / "saekit.json").exists(),
                             lambda sig: check_run_after_kill(run_dir, sig),
                             random.Random(8765), (1, 2), 0.15, base / "train-logs",
                             STOPS, STOP_PLAN, run_dir),
        "cache_dir": cache_dir,
        "run_dir": run_dir,
    }  # fmt: skip
    pool.shutdown(wait=True)


@pytest.mark.slow
def test_sigint_sigterm_cache_at_random_moments_then_resume_is_identical(signal_chains, ref_cache):
    out = signal_chains["cache"].result()
    print(f"cache stops: {out}")
    assert out["kills"] >= 10, out
    assert_same_cache(ref_cache, signal_chains["cache_dir"])


@pytest.mark.slow
def test_sigint_sigterm_train_at_random_moments_then_resume_is_identical(signal_chains, ref_run):
    out = signal_chains["train"].result()
    print(f"train stops: {out}")
    assert out["kills"] >= 10, out
    assert_same_run(ref_run, signal_chains["run_dir"])


# ---------------------------------------------------------------------------------------------
# a full disk (RLIMIT_FSIZE: a write past the limit fails with EFBIG, as ENOSPC would)


def file_size_limit(n_bytes: int):
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer
        resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, n_bytes))

    return preexec


@pytest.mark.slow
def test_full_disk_during_shard_write_is_one_line_and_resumable(ref_cache, tmp_path):
    ref = json.loads((ref_cache / "manifest.json").read_text())
    limit = ref["contexts"]["bytes"] + 4096  # contexts and manifest fit; a shard does not
    assert ref["shards"][0]["bytes"] > limit
    d = tmp_path / "cache"
    cmd = saekit("cache", "--out", str(d), *CACHE_FLAGS)
    r = run(cmd, tmp_path / "full.log", preexec_fn=file_size_limit(limit))
    assert r.returncode == 1
    line = error_line(r.stderr)
    assert "shard-00000.safetensors" in line and "File too large" in line and "--resume" in line
    assert not [p.name for p in d.iterdir() if ".tmp-" in p.name]  # nothing half-written
    assert not json.loads((d / "manifest.json").read_text())["complete"]
    r = run([*cmd, "--resume"], tmp_path / "resume.log")
    assert r.returncode == 0, r.stderr
    assert_same_cache(ref_cache, d)


@pytest.mark.slow
def test_full_disk_during_checkpoint_is_one_line_and_resumable(ref_cache, ref_run, tmp_path):
    # Checkpoints grow with the density history: the last one no longer fits.
    last = ref_run / "checkpoints" / f"step-{TRAIN_STEPS - CKPT_EVERY:08d}.safetensors"
    before = ref_run / "checkpoints" / f"step-{TRAIN_STEPS - 2 * CKPT_EVERY:08d}.safetensors"
    limit = last.stat().st_size - 1
    assert before.stat().st_size <= limit
    d = tmp_path / "run"
    cmd = saekit("train", "--cache", str(ref_cache), "--out", str(d), *TRAIN_FLAGS)
    r = run(cmd, tmp_path / "full.log", preexec_fn=file_size_limit(limit))
    assert r.returncode == 1
    line = error_line(r.stderr)
    assert last.name in line and "File too large" in line and "--resume" in line
    assert not [p for p in d.rglob("*") if ".tmp-" in p.name]
    assert not (d / "sae_weights.safetensors").exists()
    r = run([*cmd, "--resume"], tmp_path / "resume.log")
    assert r.returncode == 0, r.stderr
    assert_same_run(ref_run, d)


# ---------------------------------------------------------------------------------------------
# corrupt, edited and foreign files: one line naming the file and the problem, nothing written

SMALL_TRAIN = ["--features", "64", "--batch-size", "128", "--steps", "40", "--checkpoint-every",
               "10", "--keep-checkpoints", "0", "--log-every", "10"]  # fmt: skip


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory) -> Path:
    from saekit.activations.cache import build_cache
    from saekit.activations.cache_config import CacheConfig

    out = tmp_path_factory.mktemp("small") / "cache"
    return build_cache(
        CacheConfig(out=out, tokens=3000, context_size=64, batch_size=8, shard_mb=0.25)
    ).path


def refused(argv: list[str], capsys, code: int = 2) -> str:
    """Run the CLI in-process; it must exit with `code` and print exactly one error line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    err = capsys.readouterr().err
    assert e.value.code == code, err
    return error_line(err)


def edit_manifest(d: Path, fn) -> None:
    m = json.loads((d / "manifest.json").read_text())
    fn(m)
    (d / "manifest.json").write_text(json.dumps(m))


def flip_byte(p: Path, at: int | None = None) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2 if at is None else at] ^= 0x01
    p.write_bytes(bytes(data))


def _set(m: dict, path: tuple, value) -> None:
    for k in path[:-1]:
        m = m[k]
    m[path[-1]] = value


CACHE_CORRUPTIONS = {
    # name: (damage(cache_dir), words the error line must hold)
    "flipped_byte_in_shard_data": (
        lambda d: flip_byte(d / "shard-00003.safetensors"),
        ["shard-00003.safetensors", "xxh3_128"],
    ),
    "flipped_byte_in_shard_header": (
        lambda d: flip_byte(d / "shard-00003.safetensors", at=20),
        ["shard-00003.safetensors", "xxh3_128"],
    ),
    "truncated_shard": (
        lambda d: (d / "shard-00002.safetensors").write_bytes(
            (d / "shard-00002.safetensors").read_bytes()[:1000]
        ),
        ["shard-00002.safetensors", "1000 bytes"],
    ),
    "bytes_appended_to_shard": (
        lambda d: (d / "shard-00002.safetensors").open("ab").write(b"\0" * 8),
        ["shard-00002.safetensors", "bytes"],
    ),
    "shard_missing": (
        lambda d: (d / "shard-00004.safetensors").unlink(),
        ["shard-00004.safetensors", "missing"],
    ),
    "two_shards_swapped": (
        lambda d: [
            (d / "shard-00000.safetensors").rename(d / "x"),
            (d / "shard-00001.safetensors").rename(d / "shard-00000.safetensors"),
            (d / "x").rename(d / "shard-00001.safetensors"),
        ],
        ["shard-0000", "xxh3_128"],
    ),
    "manifest_truncated": (
        lambda d: (d / "manifest.json").write_bytes((d / "manifest.json").read_bytes()[:300]),
        ["manifest.json", "not valid JSON"],
    ),
    "manifest_empty": (
        lambda d: (d / "manifest.json").write_bytes(b""),
        ["manifest.json", "not valid JSON"],
    ),
    "manifest_not_a_mapping": (
        lambda d: (d / "manifest.json").write_text("[1, 2, 3]"),
        ["manifest.json", "not a saekit cache manifest"],
    ),
    "manifest_checksum_edited": (
        lambda d: edit_manifest(d, lambda m: _set(m, ("shards", 1, "xxh3_128"), "0" * 64)),
        ["shard-00001.safetensors", "xxh3_128"],
    ),
    "manifest_rows_edited": (
        lambda d: edit_manifest(d, lambda m: _set(m, ("shards", 1, "rows"), 100)),
        ["manifest.json", "n_tokens"],
    ),
    "manifest_rows_and_n_tokens_edited": (
        lambda d: edit_manifest(
            d,
            lambda m: (
                _set(m, ("n_tokens",), m["n_tokens"] - m["shards"][1]["rows"] + 100),
                _set(m, ("shards", 1, "rows"), 100),
            ),
        ),
        ["shard-00001.safetensors", "does not match the manifest"],
    ),
    "manifest_shard_entry_dropped": (
        lambda d: edit_manifest(d, lambda m: m["shards"].pop(2)),
        ["manifest.json", "n_tokens"],
    ),
    "manifest_shard_listed_twice": (
        lambda d: edit_manifest(
            d,
            lambda m: (
                m["shards"].append(m["shards"][0]),
                _set(m, ("n_tokens",), m["n_tokens"] + m["shards"][0]["rows"]),
            ),
        ),
        ["manifest.json", "shard-00000.safetensors twice"],
    ),
    "manifest_shard_entry_lacks_checksum": (
        lambda d: edit_manifest(d, lambda m: m["shards"][3].pop("xxh3_128")),
        ["manifest.json", "shard entry 3"],
    ),
    "manifest_points_outside_the_cache": (
        lambda d: edit_manifest(d, lambda m: _set(m, ("shards", 0, "file"), "../../etc/passwd")),
        ["manifest.json", "outside the cache"],
    ),
    "manifest_d_in_edited": (
        lambda d: edit_manifest(d, lambda m: _set(m, ("d_in",), 256)),
        ["shard-", "does not match the manifest"],
    ),
    "manifest_dtype_edited": (
        lambda d: edit_manifest(d, lambda m: _set(m, ("dtype",), "float16")),
        ["shard-", "does not match the manifest"],
    ),
    "manifest_marked_incomplete": (
        lambda d: edit_manifest(d, lambda m: _set(m, ("complete",), False)),
        ["incomplete", "--resume"],
    ),
}


@pytest.mark.parametrize("case", sorted(CACHE_CORRUPTIONS))
def test_corrupt_cache_is_refused_by_train(case, small_cache, tmp_path, capsys):
    damage, words = CACHE_CORRUPTIONS[case]
    d = tmp_path / "cache"
    shutil.copytree(small_cache, d)
    damage(d)
    out = tmp_path / "run"
    line = refused(["train", "--cache", str(d), "--out", str(out), *SMALL_TRAIN], capsys)
    for w in words:
        assert w in line, line
    assert not out.exists()  # nothing half-written


def test_resume_remakes_listed_shards_that_never_reached_the_disk(small_cache, tmp_path, capsys):
    """Shards and manifests are renamed into place without an fsync, so after a power loss the
    manifest may list a shard whose bytes never reached the disk (zeros, or a short file).
    `--resume` checks every listed shard and makes the damaged one and those after it again:
    the cache ends byte-identical to one never interrupted."""
    d = tmp_path / "cache"
    shutil.copytree(small_cache, d)
    before = tree(d)
    edit_manifest(d, lambda m: _set(m, ("complete",), False))
    p = d / "shard-00002.safetensors"
    p.write_bytes(bytes(p.stat().st_size))  # right size, all zeros
    (d / "shard-00004.safetensors").write_bytes(b"")
    capsys.readouterr()
    cli_main(["cache", "--out", str(d), "--tokens", "3000", "--context-size", "64",
              "--batch-size", "8", "--shard-mb", "0.25", "--resume"])  # fmt: skip
    err = capsys.readouterr().err
    assert "shard-00002.safetensors fails its xxh3_128 check" in err, err
    assert tree(d) == before


def test_corrupt_contexts_is_refused_by_cache_resume(small_cache, tmp_path, capsys):
    d = tmp_path / "cache"
    shutil.copytree(small_cache, d)
    edit_manifest(d, lambda m: _set(m, ("complete",), False))
    flip_byte(d / "contexts.safetensors")
    before = tree(d)
    line = refused(["cache", "--out", str(d), "--tokens", "3000", "--context-size", "64",
                    "--batch-size", "8", "--shard-mb", "0.25", "--resume"], capsys)  # fmt: skip
    assert "contexts.safetensors" in line and "xxh3_128" in line
    assert tree(d) == before


@pytest.fixture(scope="module")
def interrupted_run(small_cache, tmp_path_factory) -> Path:
    """A run that stopped after its step-30 checkpoint (the final files taken away)."""
    from saekit.training.config import TrainConfig
    from saekit.training.trainer import train

    d = tmp_path_factory.mktemp("interrupted") / "run"
    train(TrainConfig(cache=str(small_cache), out=str(d), features=64, batch_size=128, steps=40,
                      checkpoint_every=10, keep_checkpoints=0, log_every=10))  # fmt: skip
    for name in ("cfg.json", "saekit.json", "sae_weights.safetensors", "sparsity.safetensors",
                 "density_history.safetensors"):  # fmt: skip
        (d / name).unlink()
    return d


@pytest.fixture(scope="module")
def other_seed_run(small_cache, tmp_path_factory) -> Path:
    from saekit.training.config import TrainConfig
    from saekit.training.trainer import train

    d = tmp_path_factory.mktemp("other") / "run"
    return train(TrainConfig(cache=str(small_cache), out=str(d), features=64, batch_size=128,
                             steps=40, checkpoint_every=10, keep_checkpoints=0, log_every=10,
                             seed=1))  # fmt: skip


def _ckpt(d: Path, step: int, ext: str) -> Path:
    return d / "checkpoints" / f"step-{step:08d}.{ext}"


CKPT_CORRUPTIONS = {
    "checkpoint_flipped_byte": (
        lambda d, other: flip_byte(_ckpt(d, 30, "safetensors")),
        ["step-00000030.safetensors", "sha256"],
    ),
    "checkpoint_truncated": (
        lambda d, other: _ckpt(d, 30, "safetensors").write_bytes(
            _ckpt(d, 30, "safetensors").read_bytes()[:5000]
        ),
        ["step-00000030.safetensors", "sha256"],
    ),
    "checkpoint_record_truncated": (
        lambda d, other: _ckpt(d, 30, "json").write_text(_ckpt(d, 30, "json").read_text()[:50]),
        ["step-00000030.json", "not a saekit checkpoint record"],
    ),
    "checkpoint_from_another_run": (  # both files, from a run with another seed
        lambda d, other: [
            shutil.copy(_ckpt(other, 30, e), _ckpt(d, 30, e)) for e in ("json", "safetensors")
        ],
        ["step-00000030.json", "different settings", "seed: 1 -> 0"],
    ),
    "checkpoint_tensors_from_another_run": (  # the tensors only: the record's sha256 catches it
        lambda d, other: shutil.copy(_ckpt(other, 30, "safetensors"), _ckpt(d, 30, "safetensors")),
        ["step-00000030.safetensors", "sha256"],
    ),
}


@pytest.mark.parametrize("case", sorted(CKPT_CORRUPTIONS))
def test_bad_checkpoint_is_refused_by_resume(
    case, small_cache, interrupted_run, other_seed_run, tmp_path, capsys
):
    damage, words = CKPT_CORRUPTIONS[case]
    d = tmp_path / "run"
    shutil.copytree(interrupted_run, d)
    damage(d, other_seed_run)
    before = tree(d)
    line = refused(
        ["train", "--cache", str(small_cache), "--out", str(d), *SMALL_TRAIN, "--resume"], capsys
    )
    for w in words:
        assert w in line, line
    assert tree(d) == before  # the run is left as it was, for a fix and another --resume


def test_resume_on_another_cache_is_refused(small_cache, interrupted_run, tmp_path, capsys):
    from saekit.activations.cache import build_cache
    from saekit.activations.cache_config import CacheConfig

    other = build_cache(CacheConfig(out=tmp_path / "other", tokens=3000, context_size=64,
                                    batch_size=8, shard_mb=0.25, seed=1)).path  # fmt: skip
    d = tmp_path / "run"
    shutil.copytree(interrupted_run, d)
    before = tree(d)
    line = refused(["train", "--cache", str(other), "--out", str(d), *SMALL_TRAIN, "--resume"],
                   capsys)  # fmt: skip
    assert "step-00000030.json" in line and "another cache" in line
    assert tree(d) == before
    # the same cache moved elsewhere is the same cache: resuming from it works
    moved = tmp_path / "moved"
    shutil.copytree(small_cache, moved)
    cli_main(["train", "--cache", str(moved), "--out", str(d), *SMALL_TRAIN, "--resume"])
    assert (d / "saekit.json").exists()


def test_torn_metrics_line_does_not_break_resume(small_cache, interrupted_run, tmp_path):
    """A line cut short by a full disk (a partial write before EFBIG) is dropped on resume."""
    d = tmp_path / "run"
    shutil.copytree(interrupted_run, d)
    with open(d / "metrics.jsonl", "a") as f:
        f.write('{"step": 40, "tokens": 51')
    cli_main(["train", "--cache", str(small_cache), "--out", str(d), *SMALL_TRAIN, "--resume"])
    steps = [json.loads(s)["step"] for s in (d / "metrics.jsonl").read_text().splitlines()]
    assert steps == [10, 20, 30, 40]


def test_kill_during_final_save_resumes(small_cache, interrupted_run, tmp_path):
    """A run killed after writing sae_weights.safetensors but before finishing is not taken for
    finished: --resume completes it (saekit.json, written last, marks a finished run)."""
    d = tmp_path / "run"
    shutil.copytree(interrupted_run, d)
    (d / "sae_weights.safetensors").write_bytes(b"partial")  # as a killed final save leaves it
    cli_main(["train", "--cache", str(small_cache), "--out", str(d), *SMALL_TRAIN, "--resume"])
    assert load_file(str(d / "sae_weights.safetensors"))["W_enc"].shape == (512, 64)
    assert (d / "saekit.json").exists() and (d / "density_history.safetensors").exists()


@pytest.fixture(scope="module")
def other_model_cache(tmp_path_factory) -> Path:
    """A real cache of another model with the same hook and width (a random 1-layer GPT-2 with
    d_mlp 512, the default model's tokenizer): only the model tells them apart."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from saekit.activations.cache import build_cache
    from saekit.activations.cache_config import CacheConfig
    from saekit.activations.models import default_tokenizer

    base = tmp_path_factory.mktemp("othermodel")
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=128, n_head=2, n_positions=64, n_ctx=64, vocab_size=4096)
    ).eval()
    hf.save_pretrained(base / "model")
    default_tokenizer().save_pretrained(base / "model")
    return build_cache(CacheConfig(out=base / "cache", model=str(base / "model"), tokens=1000,
                                   context_size=64, batch_size=8, shard_mb=0.25)).path  # fmt: skip


@pytest.fixture(scope="module")
def finished_run(small_cache, tmp_path_factory) -> Path:
    from saekit.training.config import TrainConfig
    from saekit.training.trainer import train

    d = tmp_path_factory.mktemp("finished") / "run"
    return train(TrainConfig(cache=str(small_cache), out=str(d), features=64, batch_size=128,
                             steps=40, checkpoint_every=0, log_every=10))  # fmt: skip


def test_other_models_cache_is_refused_by_diagnose(
    finished_run, other_model_cache, tmp_path, capsys
):
    m = json.loads((other_model_cache / "manifest.json").read_text())
    assert m["hook_name"] == "blocks.0.mlp.hook_post" and m["d_in"] == 512
    out = tmp_path / "report"
    line = refused(["diagnose", "--run", str(finished_run), "--cache", str(other_model_cache),
                    "--out", str(out)], capsys)  # fmt: skip
    assert str(other_model_cache / "manifest.json") in line and "trained on model default" in line
    assert not out.exists()


def test_other_models_cache_is_refused_by_evaluate(
    small_cache, finished_run, other_model_cache, tmp_path, capsys
):
    """evaluate takes the cache the run records (cfg.json's cache_dir); here that dir now holds
    another model's cache."""
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    shutil.copytree(finished_run, run_dir)
    shutil.copytree(other_model_cache, cache)
    cfg = json.loads((run_dir / "cfg.json").read_text())
    cfg["metadata"]["cache_dir"] = str(cache)
    (run_dir / "cfg.json").write_text(json.dumps(cfg))
    line = refused(["evaluate", "--run", str(run_dir), "--tokens", "256"], capsys)
    assert str(cache / "manifest.json") in line and "trained on model default" in line
    assert not (run_dir / "eval.json").exists()


# ---------------------------------------------------------------------------------------------
# untrusted input: pickled payloads are never executed


class Payload:
    """Unpickling this creates the marker file (as any code a payload could run)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def payload_pickle(marker: Path) -> bytes:
    return pickle.dumps({"W_enc": Payload(marker)})


def payload_pt(path: Path, marker: Path) -> Path:
    torch.save({"W_enc": Payload(marker), "b_enc": torch.zeros(3)}, path)
    return path


def test_payloads_are_live(tmp_path):
    """The control: unpickled the unsafe way, both payloads run (so their absence elsewhere means
    they were refused, not that they are duds)."""
    m1, m2 = tmp_path / "m1", tmp_path / "m2"
    pickle.loads(payload_pickle(m1))
    torch.load(payload_pt(tmp_path / "x.pt", m2), weights_only=False)
    assert m1.exists() and m2.exists()


def test_pickled_sae_weights_are_refused(finished_run, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    for kind in ("pt", "pkl"):
        d = tmp_path / kind
        shutil.copytree(finished_run, d)
        w = d / "sae_weights.safetensors"
        if kind == "pt":
            payload_pt(w, marker)
        else:
            w.write_bytes(payload_pickle(marker))
        line = refused(["evaluate", "--run", str(d), "--tokens", "256"], capsys)
        assert str(w) in line and "not a readable safetensors file" in line
        line = refused(["diagnose", "--run", str(d), "--out", str(tmp_path / "rep")], capsys)
        assert str(w) in line and "not a readable safetensors file" in line
    assert not marker.exists()


def test_pickled_density_history_is_refused(finished_run, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    d = tmp_path / "run"
    shutil.copytree(finished_run, d)
    payload_pt(d / "density_history.safetensors", marker)
    line = refused(["diagnose", "--run", str(d), "--out", str(tmp_path / "rep"), "--no-logits"],
                   capsys)  # fmt: skip
    assert "density_history.safetensors" in line
    assert not marker.exists()


def test_pickled_checkpoint_is_refused(small_cache, interrupted_run, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    d = tmp_path / "run"
    shutil.copytree(interrupted_run, d)
    ck = _ckpt(d, 30, "safetensors")
    payload_pt(ck, marker)
    line = refused(
        ["train", "--cache", str(small_cache), "--out", str(d), *SMALL_TRAIN, "--resume"], capsys
    )
    assert ck.name in line and "sha256" in line
    # and with the record's hash edited to match, safetensors parsing refuses it
    rec = json.loads(_ckpt(d, 30, "json").read_text())
    rec["sha256"] = sha(ck)
    _ckpt(d, 30, "json").write_text(json.dumps(rec))
    line = refused(
        ["train", "--cache", str(small_cache), "--out", str(d), *SMALL_TRAIN, "--resume"], capsys
    )
    assert ck.name in line and "not a readable safetensors file" in line
    assert not marker.exists()


def test_pickled_shard_with_matching_manifest_is_refused(small_cache, tmp_path, capsys):
    """Even a payload the manifest vouches for (size and checksum edited to match) is only ever
    parsed as safetensors."""
    marker = tmp_path / "PWNED"
    d = tmp_path / "cache"
    shutil.copytree(small_cache, d)
    p = payload_pt(d / "shard-00001.safetensors", marker)
    edit_manifest(d, lambda m: m["shards"][1].update(bytes=p.stat().st_size, xxh3_128=xxh(p)))
    out = tmp_path / "run"
    line = refused(["train", "--cache", str(d), "--out", str(out), *SMALL_TRAIN], capsys)
    assert "shard-00001.safetensors" in line and "not valid safetensors" in line
    assert not marker.exists() and not out.exists()


def test_pickled_contexts_with_matching_manifest_is_refused(small_cache, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    d = tmp_path / "cache"
    shutil.copytree(small_cache, d)
    p = payload_pt(d / "contexts.safetensors", marker)
    edit_manifest(d, lambda m: (m["contexts"].update(bytes=p.stat().st_size, xxh3_128=xxh(p)),
                                _set(m, ("complete",), False)))  # fmt: skip
    line = refused(["cache", "--out", str(d), "--tokens", "3000", "--context-size", "64",
                    "--batch-size", "8", "--shard-mb", "0.25", "--resume"], capsys)  # fmt: skip
    assert "contexts.safetensors" in line and "not valid safetensors" in line
    assert not marker.exists()


def test_pickled_model_weights_are_refused(tmp_path, capsys):
    """A local Hugging Face model dir whose pytorch_model.bin carries a payload: transformers'
    torch.load runs with weights_only (forced by saekit), so it is refused, not executed."""
    from transformers import GPT2Config

    from saekit.activations.models import default_tokenizer

    marker = tmp_path / "PWNED"
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    GPT2Config(n_layer=1, n_embd=64, n_head=2, n_positions=64, vocab_size=4096).save_pretrained(
        model_dir
    )
    default_tokenizer().save_pretrained(model_dir)
    payload_pt(model_dir / "pytorch_model.bin", marker)
    out = tmp_path / "cache"
    line = refused(["cache", "--model", str(model_dir), "--out", str(out), "--tokens", "100"],
                   capsys)  # fmt: skip
    assert str(model_dir) in line and "cannot load the model" in line
    assert not marker.exists() and not out.exists()


def test_torch_load_inside_model_loading_is_weights_only(tmp_path):
    """TransformerLens loads its hub .pth checkpoints with torch.load(weights_only=False); inside
    saekit's model loading that is forced to weights_only=True."""
    from saekit.activations.models import weights_only

    marker = tmp_path / "PWNED"
    p = payload_pt(tmp_path / "final.pth", marker)
    with weights_only(), pytest.raises(pickle.UnpicklingError):
        torch.load(p, map_location="cpu", weights_only=False)
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # restored afterwards


@pytest.mark.parametrize("suffix", [".pkl", ".json", ".yaml"])
def test_pickled_config_file_is_refused(suffix, small_cache, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    cfg = tmp_path / f"config{suffix}"
    if suffix == ".yaml":  # PyYAML's unsafe tags would call open(); safe_load refuses them
        cfg.write_text(f"steps: !!python/object/apply:builtins.open ['{marker}', 'w']\n")
    else:
        cfg.write_bytes(payload_pickle(marker))
    out = tmp_path / "run"
    line = refused(["train", "--cache", str(small_cache), "--out", str(out), "--config", str(cfg)],
                   capsys)  # fmt: skip
    assert str(cfg) in line and ("not valid JSON" in line or "not valid YAML" in line)
    assert not marker.exists() and not out.exists()


def test_pickled_dataset_is_refused(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    data = tmp_path / "corpus.pkl"
    data.write_bytes(payload_pickle(marker))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "part.pkl").write_bytes(payload_pickle(marker))
    for ds in (data, folder):
        line = refused(["cache", "--dataset", str(ds), "--out", str(tmp_path / "c"),
                        "--tokens", "100"], capsys)  # fmt: skip
        assert str(ds) in line and "no readable files" in line
    assert not marker.exists() and not (tmp_path / "c").exists()


def test_pickle_paths_given_as_run_or_cache_are_refused(finished_run, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    pt = payload_pt(tmp_path / "sae.pt", marker)
    line = refused(["evaluate", "--run", str(pt)], capsys)
    assert str(pt) in line and "not a run dir" in line
    line = refused(["diagnose", "--run", str(pt), "--out", str(tmp_path / "r")], capsys)
    assert str(pt) in line
    line = refused(["train", "--cache", str(pt), "--out", str(tmp_path / "t")], capsys)
    assert str(pt) in line
    line = refused(["diagnose", "--run", str(finished_run), "--cache", str(pt), "--out",
                    str(tmp_path / "r2")], capsys)  # fmt: skip
    assert str(pt) in line
    assert not marker.exists()


def test_no_unsafe_deserialisation_in_saekit():
    """saekit reads safetensors and JSON only: no pickle, no torch.load without weights_only,
    no numpy allow_pickle, no yaml.load, in any of its packages."""
    bad = []
    for pkg in ("sae", "activations", "training", "diagnostics", "scripts"):
        for p in (REPO / pkg).rglob("*.py"):
            for i, line in enumerate(p.read_text().splitlines(), 1):
                code = line.split("#")[0]
                if (
                    "pickle.load" in code
                    or "import pickle" in code
                    and p.name != "models.py"  # models.py: only pickle.UnpicklingError
                    or ("torch.load(" in code and "weights_only=True" not in code)
                    or "allow_pickle=True" in code
                    or "yaml.load(" in code
                    or "yaml.unsafe_load" in code
                    or "dill" in code.split()
                ):
                    bad.append(f"{p.relative_to(REPO)}:{i}: {line.strip()}")
    assert not bad, bad
