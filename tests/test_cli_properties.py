"""Bad arguments, property-based: for every `saekit` verb, hypothesis generates invalid flag
values and combinations (out-of-range, nan/inf, huge, wrong types, unknown choices, sites, hooks,
models, missing flags, paths that do not exist or are files, conflicting flags, broken --config
files) and checks that each one

  * exits non-zero,
  * prints ONE error line on stderr (`saekit: error: ...` or `saekit VERB: error: ...`) and no
    Python traceback (`saekit: warning:` lines may come before it),
  * is refused before any heavy work starts (the corpus is tokenised, the training loop, the
    density pass, the demo's cache are patched to fail the test if reached), and
  * leaves every output path exactly as it was (missing stays missing, an empty dir stays empty,
    a file or a foreign dir is untouched).

Plus: saved-SAE `cfg.json` files with wrong types, missing fields or nonsense, and checkpoint
records with wrong types, are refused in one line naming the file and the field by every
command that reads a run dir. The CLI runs in-process (`saekit.scripts.cli.main`) for the bulk of the
examples; a few run the real entry points as subprocesses to show they behave the same.
Every case is listed in docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from saekit.sae.archs import ARCHS
from saekit.scripts import cli

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"}
SETTINGS = dict(
    deadline=None,
    derandomize=True,  # the same examples on every run and in CI
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
ERROR_LINE = re.compile(r"^saekit( [a-z-]+)?: error: \S")


class HeavyWork(BaseException):  # noqa: N818 - not an error: a marker that validation passed
    """Raised by the patched heavy steps: reaching one means the bad input was not refused."""


def _heavy(*_a, **_k):
    raise HeavyWork


# Where each verb's real work starts; validation must have refused bad input before these.
HEAVY = [
    "saekit.activations.corpus.tokenize_contexts",  # cache, evaluate: after model, dataset and split checks
    "saekit.training.trainer._train",  # train: after every check, before the run dir is touched
    "saekit.diagnostics.diagnose.classify",  # diagnose: after every check, before the density pass
    "saekit.diagnostics.contexts.measure_density",
    "saekit.scripts.demo._pipeline",  # demo: cache, train, evaluate, diagnose
]


# ---------------------------------------------------------------------------------------------
# helpers


def snapshot(p: Path) -> object:
    """What is at `p`: None, ("file", bytes) or {relative path: bytes or "dir"}."""
    if not p.exists():
        return None
    if p.is_file():
        return ("file", p.read_bytes())
    return {
        str(q.relative_to(p)): (q.read_bytes() if q.is_file() else "dir")
        for q in sorted(p.rglob("*"))
    }


def run_cli(argv: list[str]) -> tuple[object, str]:
    """`saekit ARGV` in-process with the heavy steps patched: (exit code or "heavy", stderr)."""
    err, out = io.StringIO(), io.StringIO()
    code: object = 0
    with contextlib.ExitStack() as stack:
        for target in HEAVY:
            stack.enter_context(mock.patch(target, _heavy))
        stack.enter_context(contextlib.redirect_stderr(err))
        stack.enter_context(contextlib.redirect_stdout(out))
        try:
            cli.main(argv)
        except SystemExit as e:
            code = e.code
        except HeavyWork:
            code = "heavy"
    return code, err.getvalue()


def error_of(stderr: str) -> str:
    """The one error line; fails on a traceback, several error lines, or any other output."""
    assert "Traceback" not in stderr, stderr
    lines = [s for s in stderr.replace("\r", "\n").splitlines() if s.strip()]
    rest = [s for s in lines if not s.startswith("saekit: warning:")]
    assert len(rest) == 1, stderr
    assert ERROR_LINE.match(rest[0]), stderr
    assert lines[-1] == rest[0], stderr
    return rest[0]


def assert_refused(argv: list[str], watch: list[Path]) -> str:
    """The property: non-zero exit, one error line, nothing reached, `watch` paths unchanged."""
    before = [snapshot(p) for p in watch]
    code, stderr = run_cli(argv)
    assert code != "heavy", f"{argv} was not refused before the work started"
    assert isinstance(code, int) and code != 0, (argv, code, stderr)
    line = error_of(stderr)
    for p, b in zip(watch, before, strict=True):
        assert snapshot(p) == b, f"{argv} changed {p}"
    return line


def flag(name: str, value: object) -> str:
    """`--name=value`: the `=` form, so that values like -1e-05 are never taken for flags."""
    return f"--{name}={value}"


def fmt(x: object) -> str:
    return repr(x) if isinstance(x, float) and math.isfinite(x) else str(x)


@contextlib.contextmanager
def scratch():
    d = Path(tempfile.mkdtemp(prefix="saekit-prop-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def out_kind(d: Path, kind: str) -> Path:
    """An --out of the given kind under the scratch dir `d`."""
    p = d / "out"
    if kind == "empty":
        p.mkdir()
    elif kind == "nested":
        p = d / "a" / "b" / "out"
    return p


# strategies
NAN_INF = st.sampled_from([math.nan, math.inf, -math.inf])
NOT_INT = st.one_of(
    st.sampled_from(["abc", "1.5", "", "1e3", "0x10", "nan", "½", "1_000x", "[1]", "None", "--"]),
    st.text(
        alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
        min_size=1,
        max_size=8,
    ).filter(lambda s: not re.fullmatch(r"\s*[-+]?\d[\d_]*\s*", s)),
)
NOT_FLOAT = st.sampled_from(["abc", "", "1,5", "one", "0x1p", "--", "1e", "[0.5]"])
JUNK = st.text(alphabet="abcxyz_-.019", min_size=1, max_size=10)


def nonpos() -> st.SearchStrategy[int]:
    return st.one_of(st.just(0), st.integers(min_value=-(10**12), max_value=-1))


def negative() -> st.SearchStrategy[int]:
    return st.integers(min_value=-(10**12), max_value=-1)


def bad_bool() -> st.SearchStrategy[tuple[str, str]]:
    """A boolean flag given a value, or a --no- form of a non-boolean flag."""
    return st.sampled_from([("--overwrite=yes", ""), ("--no-out", "")])


def table(*pairs: tuple[str, st.SearchStrategy]) -> dict[str, st.SearchStrategy]:
    """flag -> a strategy of invalid values for it."""
    out: dict[str, st.SearchStrategy] = {}
    for k, strat in pairs:
        out[k] = st.one_of(out[k], strat) if k in out else strat
    return out


def some_bad(tab: dict[str, st.SearchStrategy]) -> st.SearchStrategy:
    """(flag, invalid value) for any flag of the table."""
    return st.sampled_from(sorted(tab)).flatmap(lambda k: st.tuples(st.just(k), tab[k]))


# ---------------------------------------------------------------------------------------------
# fixtures: one tiny cache and one tiny run, made once


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    from saekit.activations.cache import build_cache
    from saekit.activations.cache_config import CacheConfig
    from saekit.training.config import TrainConfig
    from saekit.training.trainer import train

    base = tmp_path_factory.mktemp("props")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        cache = build_cache(
            CacheConfig(out=base / "cache", tokens=1024, context_size=32, batch_size=8)
        ).path
        run = train(
            TrainConfig(
                cache=str(cache),
                out=str(base / "run"),
                features=32,
                batch_size=64,
                steps=20,
                checkpoint_every=10,
                keep_checkpoints=0,
                log_every=5,
                resample_inputs=512,
            )
        )
    afile = base / "a-file.txt"
    afile.write_text("not a directory\n")
    empty = base / "empty-dir"
    empty.mkdir()
    foreign = base / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine\n")
    return {"cache": Path(cache), "run": Path(run), "file": afile, "empty": empty,
            "foreign": foreign, "base": base}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# saekit cache

CACHE_BAD = table(
    ("tokens", st.one_of(nonpos(), NOT_INT)),
    ("context-size", st.one_of(st.integers(-(10**6), 1), NOT_INT)),
    ("context-size", st.integers(129, 10**12)),  # > the model's n_ctx 128
    ("batch-size", st.one_of(nonpos(), NOT_INT)),
    ("shard-mb", st.one_of(NAN_INF, st.floats(max_value=0.0), NOT_FLOAT)),
    ("dtype", st.one_of(st.sampled_from(["int8", "float64", "fp16"]), JUNK)),
    ("site", st.one_of(JUNK, st.just("mlp_post,nope"), st.just(""))),
    ("layer", st.one_of(st.integers(1, 10**9), NOT_INT)),
    ("hook", st.one_of(JUNK.map(lambda s: "blocks.0." + s), st.just("blocks.7.mlp.hook_post"))),
    ("model", JUNK.map(lambda s: "no-such-model-" + s)),
    ("device", st.one_of(st.sampled_from(["cuda", "cuda:3", "meta", "gpu", "cpu:x"]), JUNK.map(lambda s: "dev" + s))),
    ("num-workers", nonpos()),
    ("split", JUNK.map(lambda s: "nosplit" + s)),
    ("dataset", JUNK.map(lambda s: f"/nonexistent/{s}.txt")),
    ("seed", NOT_INT),
    ("model", JUNK.map(lambda s: "nomodel" + s)),
    ("hook", JUNK.map(lambda s: "blocks.0.nohook" + s)),
)  # fmt: skip


@pytest.mark.parametrize("name", sorted(CACHE_BAD))
@settings(max_examples=15, **SETTINGS)
@given(
    data=st.data(),
    kind=st.sampled_from(["missing", "empty", "nested"]),
    extra=st.sampled_from([[], ["--include-bos"], ["--seed=3"], ["--site=mlp_out"]]),
)
def test_cache_bad_flag_is_refused(world, name, data, kind, extra):
    """Each flag alone, so that no other bad flag hides a missing check."""
    with scratch() as d:
        out = out_kind(d, kind)
        argv = ["cache", "--out", str(out), "--tokens=256", "--context-size=16", *extra]
        argv += [flag(name, fmt(data.draw(CACHE_BAD[name], label=name)))]
        assert_refused(argv, [out, out.parent])


@settings(max_examples=50, **SETTINGS)
@given(
    bad=st.lists(some_bad(CACHE_BAD), min_size=2, max_size=3),
    kind=st.sampled_from(["missing", "empty", "nested"]),
    extra=st.sampled_from([[], ["--include-bos"], ["--resume", "--overwrite"]]),
)
def test_cache_bad_flags_together_are_refused(world, bad, kind, extra):
    with scratch() as d:
        out = out_kind(d, kind)
        argv = ["cache", "--out", str(out), "--tokens=256", "--context-size=16"]
        argv += [flag(k, fmt(v)) for k, v in bad] + extra
        assert_refused(argv, [out, out.parent])


@pytest.mark.parametrize(
    "case",
    ["resume+overwrite", "out-is-file", "out-foreign", "worker-index", "negative-worker",
     "unknown-flag", "missing-out", "flag-no-value"],
)  # fmt: skip
def test_cache_bad_combinations_are_refused(world, case):
    with scratch() as d:
        out = d / "out"
        watch = [out, world["file"], world["foreign"]]
        argv = {
            "resume+overwrite": ["cache", "--out", str(out), "--resume", "--overwrite"],
            "out-is-file": ["cache", "--out", str(world["file"]), "--tokens=64"],
            "out-foreign": ["cache", "--out", str(world["foreign"]), "--tokens=64"],
            "worker-index": ["cache", "--out", str(out), "--num-workers=2", "--worker-index=2"],
            "negative-worker": ["cache", "--out", str(out), "--worker-index=-1"],
            "unknown-flag": ["cache", "--out", str(out), "--tokenz=5"],
            "missing-out": ["cache", "--tokens=5"],
            "flag-no-value": ["cache", "--out", str(out), "--tokens"],
        }[case]
        assert_refused(argv, watch)


def test_cache_more_tokens_than_the_corpus_is_refused_before_writing(world):
    """Not refusable before tokenising (the corpus must be counted): so unpatched, and slow."""
    from saekit.activations.cache import build_cache
    from saekit.activations.cache_config import CacheConfig
    from saekit.sae.errors import SaekitError

    with scratch() as d:
        with pytest.raises(SaekitError, match="has only") as e:
            build_cache(CacheConfig(out=d / "out", tokens=10**12, context_size=128))
        assert "\n" not in str(e.value) and not (d / "out").exists()


# ---------------------------------------------------------------------------------------------
# saekit train

FLOAT_BAD_POS = st.one_of(NAN_INF, st.floats(max_value=0.0, allow_nan=False), NOT_FLOAT)
FLOAT_BAD_NONNEG = st.one_of(NAN_INF, st.floats(max_value=-1e-12, allow_nan=False), NOT_FLOAT)
TRAIN_BAD = table(
    ("steps", st.one_of(nonpos(), NOT_INT)),
    ("batch-size", st.one_of(nonpos(), NOT_INT, st.integers(10**11, 10**15))),
    ("features", st.one_of(nonpos(), NOT_INT, st.integers(10**11, 10**18))),
    ("expansion", st.one_of(nonpos(), NOT_INT)),
    ("d-in", st.one_of(st.integers(1, 511), st.integers(513, 10**9))),
    ("lr", FLOAT_BAD_POS),
    ("l1-coef", FLOAT_BAD_NONNEG),
    ("aux-coef", FLOAT_BAD_NONNEG),
    ("resample-holdout", st.one_of(NAN_INF, st.floats(1.0, 1e9), st.floats(max_value=-1e-9))),
    ("resample-inputs", nonpos()),
    ("resample-below", st.one_of(NAN_INF, st.floats(max_value=0.0), st.floats(1.0001, 1e9), NOT_FLOAT)),
    ("lr-decay", st.one_of(NAN_INF, st.floats(max_value=-1e-9), st.floats(1.0001, 1e9))),
    ("l1-warmup", st.one_of(NAN_INF, st.floats(max_value=-1e-9), st.floats(1.0001, 1e9))),
    ("log-every", nonpos()),
    ("checkpoint-every", negative()),
    ("keep-checkpoints", negative()),
    ("dead-window", nonpos()),
    ("density-window", nonpos()),
    ("dead-threshold", st.one_of(NAN_INF, st.floats(max_value=-1e-12), st.floats(1e-6, 1.0))),
    ("ultra-rare-threshold", st.one_of(NAN_INF, st.floats(max_value=0.0), st.floats(1.0001, 1e6))),
    ("arch", st.one_of(st.sampled_from(["relu", "TopK", "gatd", "JumpReLU", "batch_topk", "matryoshka_batchtopk"]), JUNK)),
    ("widths", st.one_of(nonpos(), NOT_INT, st.integers(33, 10**6))),
    ("resample", st.one_of(st.sampled_from(["openai", "yes", "Anthropic"]), JUNK)),
    ("dtype", st.sampled_from(["float16", "int8", "fp32", "half"])),
    ("device", st.one_of(st.sampled_from(["cuda", "cuda:1", "meta", "tpu", "cpu:x"]), JUNK.map(lambda s: "dev" + s))),
    ("resample-steps", st.one_of(nonpos(), st.integers(4, 10**9), NOT_INT)),
)  # fmt: skip


TRAIN_ARCHS = [[], ["--arch=relu_l1", "--resample=anthropic"], ["--arch=topk"], ["--arch=batchtopk"],
               ["--arch=jumprelu"], ["--arch=gated"], ["--arch=matryoshka"]]  # fmt: skip


@pytest.mark.parametrize("name", sorted(TRAIN_BAD))
@settings(max_examples=15, **SETTINGS)
@given(
    data=st.data(),
    kind=st.sampled_from(["missing", "empty", "nested"]),
    arch=st.sampled_from(TRAIN_ARCHS),
)
def test_train_bad_flag_is_refused(world, name, data, kind, arch):
    """Each flag alone, so that no other bad flag hides a missing check."""
    with scratch() as d:
        out = out_kind(d, kind)
        argv = ["train", "--cache", str(world["cache"]), "--out", str(out), "--steps=4",
                "--batch-size=64", "--features=32", "--resample-inputs=256", *arch]  # fmt: skip
        argv += [flag(name, fmt(data.draw(TRAIN_BAD[name], label=name)))]
        assert_refused(argv, [out, out.parent, world["cache"]])


@settings(max_examples=60, **SETTINGS)
@given(
    bad=st.lists(some_bad(TRAIN_BAD), min_size=2, max_size=3),
    kind=st.sampled_from(["missing", "empty", "nested"]),
    arch=st.sampled_from(TRAIN_ARCHS),
)
def test_train_bad_flags_together_are_refused(world, bad, kind, arch):
    with scratch() as d:
        out = out_kind(d, kind)
        argv = ["train", "--cache", str(world["cache"]), "--out", str(out), "--steps=4",
                "--batch-size=64", "--features=32", "--resample-inputs=256", *arch]  # fmt: skip
        argv += [flag(k, fmt(v)) for k, v in bad]
        assert_refused(argv, [out, out.parent, world["cache"]])


@pytest.mark.parametrize(
    "case",
    ["topk-k-zero", "topk-k-too-big", "topk-k-aux-too-big", "holdout-without-resampling",
     "below-without-resampling",
     "steps-without-resampling", "resample-at-end", "resume+overwrite", "resume-fresh-out",
     "batchtopk-k-too-big", "widths-not-increasing", "widths-not-ending-at-features",
     "widths-without-matryoshka",
     "resume-finished", "out-is-file", "out-foreign", "cache-missing", "cache-is-file",
     "cache-is-empty-dir", "cache-is-a-run", "thresholds-swapped", "missing-cache",
     "missing-out", "wandb-fails", "unknown-flag"],
)  # fmt: skip
def test_train_bad_combinations_are_refused(world, case):
    with scratch() as d:
        out = d / "out"
        c, r = str(world["cache"]), str(world["run"])
        base = ["train", "--cache", c, "--out", str(out), "--steps=8", "--batch-size=64",
                "--features=32", "--resample-inputs=256"]  # fmt: skip
        argv = {
            "topk-k-zero": [*base, "--arch=topk", "--k=0"],
            "topk-k-too-big": [*base, "--arch=topk", "--k=33"],
            "topk-k-aux-too-big": [*base, "--arch=topk", "--k-aux=1000"],
            "batchtopk-k-too-big": [*base, "--arch=batchtopk", "--k=33"],
            "widths-not-increasing": [*base, "--arch=matryoshka", "--widths", "8", "4", "32"],
            "widths-not-ending-at-features": [*base, "--arch=matryoshka", "--widths", "4", "16"],
            "widths-without-matryoshka": [*base, "--arch=batchtopk", "--widths", "4", "32"],
            "holdout-without-resampling": [*base, "--resample=none", "--resample-holdout=0.5"],
            "below-without-resampling": [*base, "--resample=none", "--resample-below=1e-4"],
            "steps-without-resampling": [*base, "--arch=topk", "--resample-steps", "2", "4"],
            "resample-at-end": [*base, "--resample=anthropic", "--resample-steps", "8"],
            "resume+overwrite": [*base, "--resume", "--overwrite"],
            "resume-fresh-out": [*base, "--resume"],
            "resume-finished": ["train", "--cache", c, "--out", r, "--resume"],
            "out-is-file": ["train", "--cache", c, "--out", str(world["file"])],
            "out-foreign": ["train", "--cache", c, "--out", str(world["foreign"])],
            "cache-missing": ["train", "--cache", str(d / "nope"), "--out", str(out)],
            "cache-is-file": ["train", "--cache", str(world["file"]), "--out", str(out)],
            "cache-is-empty-dir": ["train", "--cache", str(world["empty"]), "--out", str(out)],
            "cache-is-a-run": ["train", "--cache", r, "--out", str(out)],
            "thresholds-swapped": [*base, "--dead-threshold=1e-4", "--ultra-rare-threshold=1e-5"],
            "missing-cache": ["train", "--out", str(out)],
            "missing-out": ["train", "--cache", c],
            "wandb-fails": [*base, "--wandb-project=p"],
            "unknown-flag": [*base, "--learning-rate=1e-3"],
        }[case]
        watch = [out, world["run"], world["file"], world["foreign"], world["empty"]]
        if case == "wandb-fails":
            # wandb's own failure (no login, no network) is one line and leaves no run dir; the
            # training loop runs for real here (a few steps) because wandb starts inside it.
            pytest.importorskip("wandb")
            boom = mock.patch("wandb.init", side_effect=RuntimeError("no API key\nconfigured"))
            with boom:
                before = [snapshot(p) for p in watch]
                code, stderr = _run_unpatched(argv)
                assert code == 2 and "wandb" in error_of(stderr)
                assert [snapshot(p) for p in watch] == before
            return
        assert_refused(argv, watch)


def _run_unpatched(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            cli.main(argv)
        except SystemExit as e:
            return e.code, err.getvalue()
    return 0, err.getvalue()


# ---------------------------------------------------------------------------------------------
# saekit evaluate

EVAL_BAD = table(
    ("tokens", st.one_of(nonpos(), NOT_INT)),
    ("batch-size", st.one_of(nonpos(), NOT_INT)),
    ("device", st.one_of(st.sampled_from(["cuda", "meta", "tpu", "mps"]), JUNK.map(lambda s: "dev" + s))),
    ("dataset", JUNK.map(lambda s: f"/nonexistent/{s}.jsonl")),
    ("split", JUNK.map(lambda s: "nosplit" + s)),
    ("ablate", st.one_of(st.sampled_from(["nope", "dead,,live", ",", "Dead"]), JUNK.map(lambda s: "/nonexistent/" + s))),
    ("model", JUNK.map(lambda s: "nomodel" + s)),
    ("hook", JUNK.map(lambda s: "blocks.0.nohook" + s)),
    ("context-size", st.one_of(st.integers(-(10**6), 1), NOT_INT)),
)  # fmt: skip


@pytest.mark.parametrize("name", sorted(EVAL_BAD))
@settings(max_examples=15, **SETTINGS)
@given(data=st.data())
def test_evaluate_bad_flag_is_refused(world, name, data):
    argv = ["evaluate", "--run", str(world["run"]), "--tokens=64"]
    argv += [flag(name, fmt(data.draw(EVAL_BAD[name], label=name)))]
    assert_refused(argv, [world["run"]])


@settings(max_examples=20, **SETTINGS)
@given(bad=st.lists(some_bad(EVAL_BAD), min_size=2, max_size=3))
def test_evaluate_bad_flags_together_are_refused(world, bad):
    argv = ["evaluate", "--run", str(world["run"]), "--tokens=64"]
    argv += [flag(k, fmt(v)) for k, v in bad]
    assert_refused(argv, [world["run"]])


@pytest.mark.parametrize("run", ["missing", "file", "empty", "cache", "flag-missing"])
def test_evaluate_bad_run_paths_are_refused(world, run):
    argv = {
        "missing": ["evaluate", "--run", str(world["base"] / "nope")],
        "file": ["evaluate", "--run", str(world["file"])],
        "empty": ["evaluate", "--run", str(world["empty"])],
        "cache": ["evaluate", "--run", str(world["cache"])],
        "flag-missing": ["evaluate"],
    }[run]
    assert_refused(argv, [world["empty"], world["cache"], world["file"]])


# ---------------------------------------------------------------------------------------------
# saekit diagnose

DIAG_BAD = table(
    ("alpha", st.one_of(NAN_INF, st.floats(max_value=0.0), st.floats(0.5, 1e9))),
    ("band", st.one_of(NAN_INF, st.floats(max_value=0.0), NOT_FLOAT)),
    ("burn-in-tokens", st.one_of(negative(), NOT_INT)),
    ("min-firings", nonpos()),
    ("selection-fraction", st.one_of(NAN_INF, st.floats(max_value=0.0), st.floats(1.0, 1e9))),
    ("dead-threshold", st.one_of(NAN_INF, st.floats(max_value=-1e-12), st.floats(1e-6, 1.0))),
    ("ultra-rare-threshold", st.one_of(NAN_INF, st.floats(max_value=0.0), st.floats(1.0001, 1e6))),
    ("rare-threshold", st.one_of(NAN_INF, st.floats(max_value=0.0), st.floats(1.0001, 1e6))),
    ("min-window-tokens", negative()),
    ("n-show", negative()),
    ("n-top-contexts", nonpos()),
    ("n-logit-tokens", st.one_of(nonpos(), st.integers(4097, 10**12))),
    ("ln-scale", st.one_of(NAN_INF, st.floats(max_value=0.0))),
    ("tokens", st.one_of(nonpos(), NOT_INT)),
    ("batch-size", st.one_of(nonpos(), NOT_INT)),
    ("features", st.one_of(st.integers(32, 10**9), negative())),
    ("device", st.one_of(st.sampled_from(["cuda", "meta", "tpu"]), JUNK.map(lambda s: "dev" + s))),
    ("seed", NOT_INT),
    ("model", JUNK.map(lambda s: "nomodel" + s)),
    ("hook", JUNK.map(lambda s: "blocks.0.nohook" + s)),
)  # fmt: skip


@pytest.mark.parametrize("name", sorted(DIAG_BAD))
@settings(max_examples=15, **SETTINGS)
@given(
    data=st.data(), kind=st.sampled_from(["missing", "empty", "nested"]), with_cache=st.booleans()
)
def test_diagnose_bad_flag_is_refused(world, name, data, kind, with_cache):
    """Each flag alone, so that no other bad flag hides a missing check."""
    with scratch() as d:
        out = out_kind(d, kind)
        argv = ["diagnose", "--run", str(world["run"]), "--out", str(out)]
        argv += ["--cache", str(world["cache"]), "--tokens=256"] if with_cache else []
        argv += [flag(name, fmt(data.draw(DIAG_BAD[name], label=name)))]
        assert_refused(argv, [out, out.parent, world["run"], world["cache"]])


@settings(max_examples=50, **SETTINGS)
@given(
    bad=st.lists(some_bad(DIAG_BAD), min_size=2, max_size=3),
    kind=st.sampled_from(["missing", "empty", "nested"]),
    with_cache=st.booleans(),
)
def test_diagnose_bad_flags_together_are_refused(world, bad, kind, with_cache):
    with scratch() as d:
        out = out_kind(d, kind)
        argv = ["diagnose", "--run", str(world["run"]), "--out", str(out)]
        argv += ["--cache", str(world["cache"]), "--tokens=256"] if with_cache else []
        argv += [flag(k, fmt(v)) for k, v in bad]
        assert_refused(argv, [out, out.parent, world["run"], world["cache"]])


@pytest.mark.parametrize(
    "case",
    ["run-missing", "run-is-file", "run-is-cache", "cache-missing", "cache-is-file",
     "out-is-file", "out-has-report", "missing-out", "features-not-int"],
)  # fmt: skip
def test_diagnose_bad_paths_are_refused(world, case, tmp_path):
    done = tmp_path / "done"
    done.mkdir()
    (done / "report.html").write_text("an earlier report")
    r, out = str(world["run"]), str(tmp_path / "out")
    argv = {
        "run-missing": ["diagnose", "--run", str(tmp_path / "nope"), "--out", out],
        "run-is-file": ["diagnose", "--run", str(world["file"]), "--out", out],
        "run-is-cache": ["diagnose", "--run", str(world["cache"]), "--out", out],
        "cache-missing": ["diagnose", "--run", r, "--out", out, "--cache", str(tmp_path / "x")],
        "cache-is-file": ["diagnose", "--run", r, "--out", out, "--cache", str(world["file"])],
        "out-is-file": ["diagnose", "--run", r, "--out", str(world["file"])],
        "out-has-report": ["diagnose", "--run", r, "--out", str(done)],
        "missing-out": ["diagnose", "--run", r],
        "features-not-int": ["diagnose", "--run", r, "--out", out, "--features", "1", "x"],
    }[case]
    assert_refused(argv, [tmp_path / "out", done, world["file"], world["run"]])


# ---------------------------------------------------------------------------------------------
# saekit demo

DEMO_BAD = table(
    ("tokens", st.one_of(nonpos(), NOT_INT)),
    ("steps", st.one_of(nonpos(), NOT_INT)),
    ("batch-size", st.one_of(nonpos(), st.integers(10**11, 10**15))),
    ("features", st.one_of(nonpos(), st.integers(10**11, 10**18))),
    ("l1-coef", FLOAT_BAD_NONNEG),
    ("holdout", st.one_of(NAN_INF, st.floats(1.0, 1e9), st.floats(max_value=-1e-9))),
    ("eval-tokens", nonpos()),
    ("device", st.one_of(st.sampled_from(["cuda", "meta", "tpu"]), JUNK.map(lambda s: "dev" + s))),
)  # fmt: skip


@pytest.mark.parametrize("name", sorted(DEMO_BAD))
@settings(max_examples=15, **SETTINGS)
@given(data=st.data(), kind=st.sampled_from(["missing", "empty", "nested"]))
def test_demo_bad_flag_is_refused(world, name, data, kind):
    with scratch() as d:
        out = out_kind(d, kind)
        argv = ["demo", "--out", str(out), flag(name, fmt(data.draw(DEMO_BAD[name], label=name)))]
        assert_refused(argv, [out, out.parent])


@settings(max_examples=30, **SETTINGS)
@given(
    bad=st.lists(some_bad(DEMO_BAD), min_size=2, max_size=3),
    kind=st.sampled_from(["missing", "empty", "nested"]),
)
def test_demo_bad_flags_together_are_refused(world, bad, kind):
    with scratch() as d:
        out = out_kind(d, kind)
        argv = ["demo", "--out", str(out)] + [flag(k, fmt(v)) for k, v in bad]
        assert_refused(argv, [out, out.parent])


@pytest.mark.parametrize("case", ["out-is-file", "foreign", "foreign-overwrite", "unknown-flag"])
def test_demo_bad_out_is_refused(world, case):
    argv = {
        "out-is-file": ["demo", "--out", str(world["file"])],
        "foreign": ["demo", "--out", str(world["foreign"])],
        "foreign-overwrite": ["demo", "--out", str(world["foreign"]), "--overwrite"],
        "unknown-flag": ["demo", "--out", str(world["foreign"]), "--model=gpt2"],
    }[case]
    assert_refused(argv, [world["file"], world["foreign"]])


def test_demo_failing_midway_leaves_out_as_it_was(world, tmp_path):
    """A bad input only found once the demo runs (more tokens than the corpus holds): the out
    dir it made is removed again (a pre-existing empty one is left empty)."""
    from saekit.sae.errors import SaekitError
    from saekit.scripts.demo import DemoConfig, demo

    for out in (tmp_path / "fresh", world["empty"]):
        with mock.patch(
            "saekit.activations.cache_writer.choose_contexts", side_effect=SaekitError("too few")
        ):
            with pytest.raises(SaekitError):
                demo(DemoConfig(out=str(out), model="default", tokens=10**9))
        assert snapshot(out) == (None if out.name == "fresh" else {})


# ---------------------------------------------------------------------------------------------
# saekit cache-merge


@pytest.mark.parametrize(
    "case",
    [
        "missing", "file", "empty", "only-worker-1", "worker-0-unfinished", "a-cache",
        "junk-path", "worker-0-not-a-worker", "worker-rows-short",
    ],
)  # fmt: skip
@settings(max_examples=3, **SETTINGS)
@given(junk=JUNK)
def test_cache_merge_bad_out_is_refused(world, case, junk):
    with scratch() as d:
        out = d / "merge"
        if case == "missing":
            target = d / ("m" + junk)
        elif case == "file":
            target = world["file"]
        elif case == "empty":
            out.mkdir()
            target = out
        elif case == "only-worker-1":
            shutil.copytree(world["cache"], out / "worker-1")
            target = out
        elif case == "worker-0-unfinished":
            shutil.copytree(world["cache"], out / "worker-0")
            m = json.loads((out / "worker-0" / "manifest.json").read_text())
            m.update(complete=False, worker={"index": 0, "count": 2, "total_tokens": 2048})
            (out / "worker-0" / "manifest.json").write_text(json.dumps(m))
            target = out
        elif case == "worker-0-not-a-worker":  # a plain cache's manifest has no worker field
            shutil.copytree(world["cache"], out / "worker-0")
            target = out
        elif case == "worker-rows-short":  # refused before contexts.safetensors is written
            shutil.copytree(world["cache"], out / "worker-0")
            m = json.loads((out / "worker-0" / "manifest.json").read_text())
            rows = sum(s["rows"] for s in m["shards"])
            m.update(complete=True, worker={"index": 0, "count": 1, "total_tokens": rows + 1})
            (out / "worker-0" / "manifest.json").write_text(json.dumps(m))
            target = out
        elif case == "a-cache":
            target = world["cache"]
        else:
            target = Path("/nonexistent") / ("m" + junk)
        assert_refused(["cache-merge", "--out", str(target)], [target, world["file"]])


def test_cache_merge_missing_out_is_refused(world):
    assert_refused(["cache-merge"], [])


# ---------------------------------------------------------------------------------------------
# --config FILE: malformed, unknown keys, wrong types, for every verb

VERB_BASE = {
    "cache": lambda w, o: {"out": str(o), "tokens": 256, "context_size": 16},
    "cache-merge": lambda w, o: {"out": str(o)},
    "train": lambda w, o: {
        "cache": str(w["cache"]),
        "out": str(o),
        "steps": 4,
        "batch_size": 64,
        "features": 32,
    },  # fmt: skip
    "evaluate": lambda w, o: {"run": str(w["run"]), "tokens": 64},
    "diagnose": lambda w, o: {"run": str(w["run"]), "out": str(o)},
    "demo": lambda w, o: {"out": str(o)},
}
# A value of the wrong type for each kind of field.
WRONG = {
    "int": st.one_of(st.just(3.5), st.just(True), st.just([1]), st.just({"a": 1}), st.just("abc")),
    "float": st.one_of(st.just(False), st.just([0.5]), st.just({"x": 1.0}), st.just("abc")),
    "str": st.one_of(st.just(True), st.just([1, 2]), st.just({"a": "b"})),
    "bool": st.one_of(st.just("yes"), st.just(1), st.just(0.0), st.just([True]), st.just("true")),
    "choice": st.one_of(st.just("nope"), st.just(3), st.just(["relu_l1"]), st.just(True)),
    "list": st.one_of(
        st.just(5), st.just("1,2"), st.just([1.5]), st.just(["a"]), st.just({"a": 1})
    ),
}


def _field_kinds(verb: str) -> dict[str, str]:
    import dataclasses
    import typing

    cls = cli._resolve(cli.COMMANDS[verb][1])
    kinds = {}
    for f in dataclasses.fields(cls):
        tp, _ = cli._unwrap_optional(typing.get_type_hints(cls)[f.name])
        origin = typing.get_origin(tp)
        kinds[f.name] = (
            "bool" if tp is bool else "choice" if origin is typing.Literal
            else "list" if origin in (list, tuple) else "int" if tp is int
            else "float" if tp is float else "str"
        )  # fmt: skip
    return kinds


@st.composite
def bad_config(draw, verb: str):
    """(file suffix, file text) of a config file that must be refused."""
    kinds = _field_kinds(verb)
    how = draw(st.sampled_from(["wrong-type", "unknown-key", "null-required", "not-a-mapping",
                                "malformed", "bad-choice", "nan-number"]))  # fmt: skip
    suffix = draw(st.sampled_from([".json", ".yaml", ".yml"]))
    data: object = {}
    if how == "wrong-type":
        name = draw(st.sampled_from(sorted(kinds)))
        data = {name: draw(WRONG[kinds[name]])}
    elif how == "unknown-key":
        data = {draw(JUNK.filter(lambda s: s.replace("-", "_") not in kinds)): 1}
    elif how == "null-required":
        import dataclasses

        cls = cli._resolve(cli.COMMANDS[verb][1])
        req = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]  # fmt: skip
        data = {draw(st.sampled_from(req))} if req else {"zz_unknown": None}
        data = {k: None for k in data}
    elif how == "not-a-mapping":
        data = draw(st.sampled_from([[1, 2], "out", 42, None, [{"out": "x"}], True]))
    elif how == "bad-choice":
        choices = [k for k, v in kinds.items() if v == "choice"]
        data = {draw(st.sampled_from(choices)): "nope"} if choices else {"zz": 1}
    elif how == "nan-number":
        nums = [k for k, v in kinds.items() if v == "float"]
        data = {draw(st.sampled_from(nums)): "nan"} if nums else {"zz": 1}
        if verb in ("evaluate",):  # no float field: a negative count instead
            data = {"tokens": -5}
        elif verb == "cache-merge":
            data = {"out": {"nested": 1}}
    if how == "malformed":
        text = draw(st.sampled_from(['{"out": ', "out: [unclosed\n", "{'out': [}", "\x00\xff",
                                     "key: : value\n  - x", "[1, 2", '{"a" 1}']))  # fmt: skip
        return suffix, text
    if isinstance(data, dict):
        data = {k: v for k, v in data.items()}
    text = yaml.safe_dump(data) if suffix != ".json" else json.dumps(data)
    return suffix, text


@settings(max_examples=200, **SETTINGS)
@given(data=st.data(), verb=st.sampled_from(list(VERB_BASE)), flags_too=st.booleans())
def test_bad_config_files_are_refused(world, data, verb, flags_too):
    suffix, text = data.draw(bad_config(verb))
    with scratch() as d:
        out = d / "out"
        conf = d / f"conf{suffix}"
        base = VERB_BASE[verb](world, out)
        try:
            bad = yaml.safe_load(text) if suffix != ".json" else json.loads(text)
        except Exception:  # noqa: BLE001 - malformed on purpose
            bad = None
        if isinstance(bad, dict):
            # The bad entry on top of a valid config; or all of it on the command line, bad
            # entry only in the file.
            merged = {**({} if flags_too else base), **bad}
            text = yaml.safe_dump(merged) if suffix != ".json" else json.dumps(merged)
        conf.write_bytes(text.encode("utf-8", "surrogatepass"))
        argv = [verb, "--config", str(conf)]
        if flags_too or not isinstance(bad, dict):
            argv += [x for k, v in base.items() if k not in (bad if isinstance(bad, dict) else {}) for x in
                     ("--" + k.replace("_", "-"), str(v))]  # fmt: skip
        line = assert_refused(argv, [out, world["run"], world["cache"]])
        assert "config file" in line or "--" in line or "argument" in line, line


def test_config_file_that_is_a_directory_or_missing_is_refused(world, tmp_path):
    for conf in (tmp_path, tmp_path / "missing.yaml"):
        line = assert_refused(["train", "--config", str(conf)], [tmp_path])
        assert "config file" in line


# ---------------------------------------------------------------------------------------------
# the top level: unknown verbs, no flags at all

VERBS = list(VERB_BASE)


@settings(max_examples=40, **SETTINGS)
@given(
    argv=st.one_of(
        st.lists(JUNK.filter(lambda s: s not in VERBS and not s.startswith("-")), min_size=1, max_size=3),
        st.tuples(st.sampled_from(VERBS), st.sampled_from(["--bogus", "--out", "--config", "-x", "--=", "--help=1"])).map(list),
        st.sampled_from(VERBS).map(lambda v: [v] if v != "demo" else ["demo", "--tokens"]),
        st.tuples(st.sampled_from(["--verbose", "--out", "-v"]), st.sampled_from(VERBS)).map(list),
    )
)  # fmt: skip
def test_unknown_verbs_and_flags_are_refused(world, argv):
    assert_refused(argv, [])


# ---------------------------------------------------------------------------------------------
# cfg.json of a saved SAE: wrong types, missing fields, nonsense


def _cfg(world) -> dict:
    return json.loads((world["run"] / "cfg.json").read_text())


def _without(d: dict, key: str) -> dict:
    d = json.loads(json.dumps(d))
    if key.startswith("metadata."):
        d["metadata"].pop(key.split(".", 1)[1])
    else:
        d.pop(key)
    return d


def _with(d: dict, key: str, value) -> dict:
    d = json.loads(json.dumps(d))
    if key.startswith("metadata."):
        d["metadata"][key.split(".", 1)[1]] = value
    else:
        d[key] = value
    return d


CFG_CASES = {
    # name: (mutation of the real cfg.json, the field the message must name)
    "missing d_in": (lambda c: _without(c, "d_in"), "d_in"),
    "missing d_sae": (lambda c: _without(c, "d_sae"), "d_sae"),
    "d_in a string": (lambda c: _with(c, "d_in", "512"), "d_in"),
    "d_sae a float": (lambda c: _with(c, "d_sae", 32.5), "d_sae"),
    "d_sae zero": (lambda c: _with(c, "d_sae", 0), "d_sae"),
    "d_in from another SAE": (lambda c: _with(c, "d_in", 768), "d_in"),
    "architecture unknown": (lambda c: _with(c, "architecture", "jumprelu"), "architecture"),
    "apply_b_dec_to_input a string": (lambda c: _with(c, "apply_b_dec_to_input", "yes"), "apply_b_dec_to_input"),
    "k negative": (lambda c: _with(c, "k", -3), "k"),
    "metadata a list": (lambda c: _with(c, "metadata", [1, 2]), "metadata"),
    "metadata.arch unknown": (lambda c: _with(c, "metadata.arch", "gated"), "metadata.arch"),
    "metadata.context_size a string": (lambda c: _with(c, "metadata.context_size", "32"), "metadata.context_size"),
    "metadata.model_name a number": (lambda c: _with(c, "metadata.model_name", 7), "metadata.model_name"),
    "metadata.layer a string": (lambda c: _with(c, "metadata.layer", "0"), "metadata.layer"),
    "metadata.k_aux zero": (lambda c: _with(c, "metadata.k_aux", 0), "metadata.k_aux"),
    "metadata.aux_coef nan": (lambda c: _with(c, "metadata.aux_coef", float("nan")), "metadata.aux_coef"),
    "topk k above d_sae": (lambda c: _with(_with(c, "metadata.arch", "topk"), "k", 10**6), "k"),
    "a list, not an object": (lambda c: [c], "cfg.json"),
    "null": (lambda c: None, "cfg.json"),
}  # fmt: skip
CFG_NEEDED_BY_EVALUATE = {  # evaluate also needs these (diagnose and load_sae do not)
    "missing metadata.model_name": (lambda c: _without(c, "metadata.model_name"), "model_name"),
    "missing metadata.context_size": (lambda c: _without(c, "metadata.context_size"), "context_size"),
    "metadata.context_size above n_ctx": (lambda c: _with(c, "metadata.context_size", 4096), "context_size"),
}  # fmt: skip


def _run_copy(world, tmp_path: Path, cfg) -> Path:
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    (run / "cfg.json").write_text(json.dumps(cfg))
    return run


@pytest.mark.parametrize("case", sorted(CFG_CASES))
def test_bad_cfg_json_is_refused_by_the_loader(world, tmp_path, case):
    from saekit.sae.errors import SaekitError
    from saekit.sae.io import load_sae

    mutate, field = CFG_CASES[case]
    run = _run_copy(world, tmp_path, mutate(_cfg(world)))
    with pytest.raises(SaekitError) as e:
        load_sae(run)
    msg = str(e.value)
    assert "\n" not in msg and "cfg.json" in msg and field in msg, msg


@pytest.mark.parametrize(
    "verb, case",
    [(v, c) for c in sorted(CFG_CASES) for v in ("evaluate", "diagnose")]
    + [("evaluate", c) for c in sorted(CFG_NEEDED_BY_EVALUATE)],  # diagnose works without these
)
def test_bad_cfg_json_is_refused_by_evaluate_and_diagnose(world, tmp_path, verb, case):
    mutate, field = {**CFG_CASES, **CFG_NEEDED_BY_EVALUATE}[case]
    run = _run_copy(world, tmp_path, mutate(_cfg(world)))
    out = tmp_path / "report"
    argv = ["evaluate", "--run", str(run), "--tokens=64"]
    if verb == "diagnose":
        argv = ["diagnose", "--run", str(run), "--out", str(out)]
    line = assert_refused(argv, [run, out])
    assert "cfg.json" in line and field in line, line


JSONISH = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(10**6), 10**6),
              st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6)),
    lambda kids: st.one_of(st.lists(kids, max_size=3), st.dictionaries(st.text(max_size=4), kids, max_size=3)),
    max_leaves=6,
)  # fmt: skip


@settings(max_examples=300, **SETTINGS)
@given(
    edits=st.lists(
        st.tuples(
            st.sampled_from(["d_in", "d_sae", "architecture", "apply_b_dec_to_input", "k",
                             "dtype", "metadata", "metadata.arch", "metadata.k", "metadata.k_aux",
                             "metadata.aux_coef", "metadata.model_name", "metadata.hook_name",
                             "metadata.context_size", "metadata.layer", "metadata.dataset",
                             "metadata.cache_dir", "nonsense"]),
            st.one_of(JSONISH, st.just("<delete>")),
        ),
        min_size=1,
        max_size=3,
    )
)  # fmt: skip
def test_any_cfg_json_edit_loads_or_is_refused_in_one_line(world, edits):
    """The loader either loads an SAE that matches the weights or raises SaekitError, one line
    naming cfg.json; never another exception."""
    from saekit.sae.errors import SaekitError
    from saekit.sae.io import load_sae

    cfg = _cfg(world)
    for key, value in edits:
        if key.startswith("metadata.") and not isinstance(cfg.get("metadata"), dict):
            continue
        if value == "<delete>":
            try:
                cfg = _without(cfg, key)
            except KeyError:
                pass
        else:
            cfg = _with(cfg, key, value)
    with scratch() as d:
        run = d / "run"
        run.mkdir()
        shutil.copy(world["run"] / "sae_weights.safetensors", run)
        (run / "cfg.json").write_text(json.dumps(cfg))
        try:
            sae, meta = load_sae(run)
        except SaekitError as e:
            assert "\n" not in str(e) and "cfg.json" in str(e), str(e)
        else:
            assert tuple(sae.W_enc.shape) == (cfg["d_in"], cfg["d_sae"])
            assert sae.cfg.arch in ARCHS


# ---------------------------------------------------------------------------------------------
# train --resume: a checkpoint record with wrong types or missing fields


@pytest.fixture(scope="module")
def unfinished(world, tmp_path_factory) -> Path:
    """The tiny run with its final files removed: it resumes from checkpoints/step-10."""
    d = tmp_path_factory.mktemp("unfinished") / "run"
    shutil.copytree(world["run"], d)
    for name in ("cfg.json", "saekit.json", "sae_weights.safetensors", "sparsity.safetensors",
                 "density_history.safetensors"):  # fmt: skip
        (d / name).unlink()
    (d / "checkpoints" / "step-00000020.json").unlink(missing_ok=True)
    (d / "checkpoints" / "step-00000020.safetensors").unlink(missing_ok=True)
    return d


RECORD_CASES = {
    "missing step": lambda r: {k: v for k, v in r.items() if k != "step"},
    "missing config": lambda r: {k: v for k, v in r.items() if k != "config"},
    "missing elapsed_s": lambda r: {k: v for k, v in r.items() if k != "elapsed_s"},
    "step a word": lambda r: {**r, "step": "ten"},
    "step a list": lambda r: {**r, "step": [10]},
    "step null": lambda r: {**r, "step": None},
    "config a string": lambda r: {**r, "config": "relu_l1"},
    "config.features a string": lambda r: {**r, "config": {**r["config"], "features": "32"}},
    "a list, not an object": lambda r: [r],
}


@pytest.mark.parametrize("case", sorted(RECORD_CASES))
def test_bad_checkpoint_record_is_refused_by_resume(world, unfinished, tmp_path, case):
    run = tmp_path / "run"
    shutil.copytree(unfinished, run)
    rec = run / "checkpoints" / "step-00000010.json"
    rec.write_text(json.dumps(RECORD_CASES[case](json.loads(rec.read_text()))))
    argv = ["train", "--cache", str(world["cache"]), "--out", str(run), "--resume",
            "--features=32", "--batch-size=64", "--steps=20", "--checkpoint-every=10",
            "--keep-checkpoints=0", "--log-every=5", "--resample-inputs=512"]  # fmt: skip
    before = snapshot(run)
    code, stderr = _run_unpatched(argv)
    assert code == 2, stderr
    line = error_of(stderr)
    assert "step-00000010.json" in line, line
    assert snapshot(run) == before


# ---------------------------------------------------------------------------------------------
# the real entry points behave the same as the in-process calls


SUBPROCESS_CASES = [
    ["train", "--cache", "{cache}", "--out", "{tmp}/o", "--lr=nan"],
    ["cache", "--out", "{tmp}/o", "--shard-mb=inf"],
    ["diagnose", "--run", "{run}", "--out", "{tmp}/o", "--alpha=2"],
    ["evaluate", "--run", "{tmp}"],
    ["demo", "--out", "{tmp}/o", "--tokens", "abc"],
    ["cache-merge", "--out", "{tmp}/o"],
    ["bogus-verb"],
]


def test_real_entry_points_refuse_like_in_process(world, tmp_path):
    """`python -m saekit` and the installed `saekit` script print the same one line and
    exit 2 (a subprocess each: a few seconds of imports, so only a handful)."""
    exe = Path(sys.executable).parent / "saekit"
    for i, case in enumerate(SUBPROCESS_CASES):
        argv = [a.format(cache=world["cache"], run=world["run"], tmp=tmp_path) for a in case]
        code, stderr = run_cli(argv)
        want = error_of(stderr)
        cmd = [str(exe), *argv] if exe.exists() and i % 2 else [sys.executable, "-m", "saekit", *argv]  # fmt: skip
        p = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
        assert p.returncode == code == 2, (cmd, p.stderr)
        assert error_of(p.stderr) == want
        assert not (tmp_path / "o").exists()
