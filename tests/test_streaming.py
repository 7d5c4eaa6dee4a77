"""Training from a source (issue 17): the source interface, synthetic and live-model training,
kill -9 + --resume bitwise exact, checkpoints refusing another source, the CLI's one-line
errors for bad source combinations, and a synthetic cache."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saekit.activations.cache_reader import CacheReader
from saekit.activations.source import CacheSource, SyntheticStream, parse_synthetic
from saekit.activations.synthetic import SyntheticConfig, SyntheticSource
from saekit.sae.errors import SaekitError
from saekit.scripts import cli

REPO = Path(__file__).resolve().parents[1]
SMALL = ["d_in=16", "n_features=64", "planted_per_block=2"]


def test_cache_source_is_the_cache_reader(synthetic_cache, tmp_path):
    c = synthetic_cache(tmp_path / "c", n_rows=3000, d_in=8, shard_rows=700)
    a = CacheSource(c).batches(256, 3, start_batch=5)
    b = CacheReader(c, 256, seed=3).batches(5)
    for _ in range(20):  # across epochs
        assert torch.equal(next(a), next(b))
    a.close()
    b.close()
    assert torch.equal(CacheSource(c).sample(500, 7), CacheReader(c, 1).sample(500, 7))


def test_synthetic_stream_is_deterministic_by_seed_and_index():
    gen = SyntheticSource(SyntheticConfig(d_in=16, n_features=64, planted_per_block=2))
    s = SyntheticStream(gen)
    it = s.batches(128, seed=0, start_batch=4)
    assert torch.equal(next(it), gen.batch(4, 128).x)  # stream 0 is the generator's own
    assert torch.equal(next(it), gen.batch(5, 128).x)
    it.close()
    other = s.batches(128, seed=9, start_batch=4)
    x9 = next(other)
    other.close()
    assert torch.equal(x9, gen.batch(4, 128, stream=9).x) and not torch.equal(
        x9, gen.batch(4, 128).x
    )
    assert s.n_rows is None and s.fingerprint() == SyntheticStream(gen).fingerprint()


def test_parse_synthetic_items_and_files(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("d_in: 32\np_min: 1e-7\nplanted: [1e-4, 1e-6]\nmax_cos: null\n")
    cfg = parse_synthetic([str(f), "n_features=256", "planted=1e-5,1e-7", "max_cos=0.4"])
    assert (cfg.d_in, cfg.n_features, cfg.p_min, cfg.planted, cfg.max_cos) == (
        32, 256, 1e-7, [1e-5, 1e-7], 0.4)  # fmt: skip
    assert parse_synthetic([]) == SyntheticConfig() == parse_synthetic(None)
    for bad, msg in [(["bogus=1"], "unknown field"), (["d_in=abc"], "not a valid value"),
                     (["nope.yaml"], "neither a JSON/YAML file"), (["p_min=2"], "p_min must be")]:  # fmt: skip
        with pytest.raises(SaekitError, match=msg):
            parse_synthetic(bad)


def _cli(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("saekit: error: "), err
    return err[0]


def test_bad_source_combinations_are_one_line(tmp_path, synthetic_cache, capsys):
    c = str(synthetic_cache(tmp_path / "c", n_rows=2000, d_in=8))
    out = tmp_path / "run"
    cases = [
        ([], "exactly one activation source"),
        (["--cache", c, "--model", "default"], "exactly one activation source"),
        (["--cache", c, "--synthetic", "d_in=8"], "exactly one activation source"),
        (["--model", "default", "--synthetic", "d_in=8"], "exactly one activation source"),
        (["--model", "synthetic", "--site", "mlp_post"], "--site applies to a live --model only"),
        (["--cache", c, "--dataset", "default"], "--dataset applies to a live --model only"),
        (["--model", "synthetic", "--include-bos"], "--include-bos applies to a live"),
        (["--model", "default", "--hook", "blocks.0.hook_mlp_out", "--layer", "0"], "--hook names"),
        (["--model", "default", "--context-size", "1"], "--context-size must be >= 2"),
        (["--synthetic", "bogus=3"], "unknown field 'bogus'"),
        (["--synthetic", str(tmp_path / "missing.json")], "neither a JSON/YAML file"),
        (["--model", "synthetic", "--d-in", "8"], "does not match the synthetic's width 64"),
    ]
    for args, msg in cases:
        line = _cli(["train", "--out", str(out), "--steps", "4", *args], capsys)
        assert msg in line, (args, line)
        assert not out.exists()


def _train(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "saekit", "train", *args], cwd=REPO, env=dict(os.environ),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _kill_resume_compare(args: list[str], tmp_path: Path, kill_at: int, steps: int, every: int):
    full = _train([*args, "--out", str(tmp_path / "full")])
    killed = tmp_path / "killed"
    victim = _train([*args, "--out", str(killed)])
    deadline = time.time() + 240
    while not (killed / "checkpoints" / f"step-{kill_at:08d}.json").exists():
        assert victim.poll() is None, victim.communicate()[1]
        assert time.time() < deadline
        time.sleep(0.02)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert not (killed / "sae_weights.safetensors").exists()  # it really died mid-run
    resumed = _train([*args, "--out", str(killed), "--resume"])
    for p in (full, resumed):
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    for name in ("sae_weights.safetensors", "density_history.safetensors", "sparsity.safetensors"):
        a, b = load_file(str(tmp_path / "full" / name)), load_file(str(killed / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    metrics = (killed / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(s)["step"] for s in metrics] == list(range(every, steps + 1, every))
    drop = ("elapsed_s",)
    same = lambda p: [{k: v for k, v in json.loads(s).items() if k not in drop}  # noqa: E731
                      for s in p.read_text().splitlines()]  # fmt: skip
    assert same(killed / "metrics.jsonl") == same(tmp_path / "full" / "metrics.jsonl")
    return killed


@pytest.mark.slow
def test_synthetic_kill_and_resume_is_bitwise_identical(tmp_path):
    args = ["--synthetic", *SMALL, "--features", "256", "--steps", "400", "--batch-size", "512",
            "--checkpoint-every", "20", "--log-every", "20", "--resample", "anthropic",
            "--resample-steps", "100", "300", "--dead-window", "40", "--resample-inputs", "4096",
            "--seed", "3"]  # fmt: skip
    run = _kill_resume_compare(args, tmp_path, 60, 400, 20)
    truth = SyntheticSource.load(run)  # the ground truth is saved next to the run
    assert truth.cfg == parse_synthetic(SMALL)
    meta = json.loads((run / "cfg.json").read_text())["metadata"]
    assert meta["source"]["kind"] == "synthetic" and meta["model_name"] == "synthetic"
    assert meta["source"]["fingerprint"] == SyntheticStream(truth).fingerprint()


@pytest.mark.slow
def test_live_model_kill_and_resume_is_bitwise_identical(tmp_path):
    args = ["--model", "default", "--site", "mlp_post", "--features", "128", "--steps", "160",
            "--batch-size", "256", "--buffer-tokens", "2048", "--model-batch-size", "16",
            "--checkpoint-every", "20", "--log-every", "20", "--resample", "anthropic",
            "--resample-steps", "50", "--dead-window", "20", "--resample-inputs", "2048"]  # fmt: skip
    run = _kill_resume_compare(args, tmp_path, 40, 160, 20)
    meta = json.loads((run / "cfg.json").read_text())["metadata"]
    assert meta["source"]["kind"] == "live" and meta["hook_name"] == "blocks.0.mlp.hook_post"
    assert meta["dataset"]["name"] == "default" and "/" not in json.dumps(meta["train_config"])


def test_resume_refuses_another_source(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--out", str(out), "--features", "32", "--steps", "40", "--batch-size", "64",
            "--checkpoint-every", "10"]  # fmt: skip
    cli.main([*base, "--synthetic", *SMALL, "--steps", "20"])  # finishes; keep its checkpoints
    (out / "sae_weights.safetensors").unlink()
    capsys.readouterr()
    line = _cli([*base, "--steps", "20", "--synthetic", *SMALL[:2], "planted_per_block=3",
                 "--resume"], capsys)  # fmt: skip
    assert "another source than this synthetic spec" in line


def test_synthetic_cache_holds_the_generators_rows(tmp_path, capsys):
    out = tmp_path / "cache"
    cli.main(["cache", "--out", str(out), "--model", "synthetic", "--synthetic", *SMALL,
              "--tokens", "5000", "--shard-mb", "0.1", "--seed", "2"])  # fmt: skip
    src = CacheSource(out)
    gen = src.ground_truth()
    assert gen is not None and gen.cfg == parse_synthetic(SMALL)
    reader = CacheReader(out, 1)
    rows = torch.cat([reader.load_shard(i)["activations"] for i in range(len(reader.shards))])
    ctx = torch.cat([reader.load_shard(i)["context"] for i in range(len(reader.shards))])
    want = torch.cat([gen.batch(0, 4096, stream=2).x, gen.batch(1, 4096, stream=2).x])[:5000]
    assert len(reader.shards) > 1 and torch.equal(rows, want)
    assert torch.equal(ctx, torch.arange(5000) // 4096)
    # a run on it keeps the ground truth
    run = tmp_path / "run"
    cli.main(["train", "--cache", str(out), "--out", str(run), "--features", "32", "--steps", "5",
              "--batch-size", "256"])  # fmt: skip
    assert SyntheticSource.load(run).cfg == gen.cfg


def test_synthetic_run_is_diagnosed_and_evaluated_against_its_truth(tmp_path, capsys):
    """A trained synthetic run whose weights are then replaced by the true dictionary: every
    true feature is matched, to the SAE feature of the same index, in diagnose and evaluate."""
    from saekit.diagnostics.report import Report
    from saekit.sae.io import load_sae, save_sae

    run = tmp_path / "run"
    cli.main(["train", "--synthetic", *SMALL, "--out", str(run), "--features", "64", "--steps",
              "20", "--batch-size", "256", "--log-every", "5"])  # fmt: skip
    truth = SyntheticSource.load(run)
    sae, meta = load_sae(run)
    with torch.no_grad():
        sae.W_dec.copy_(truth.directions)
        sae.W_enc.copy_(truth.directions.T)
        sae.b_enc.fill_(-0.4)
        sae.b_dec.copy_(truth.mu)
    save_sae(sae, run, {k: meta[k] for k in ("model_name", "hook_name", "source", "train_config")})
    rep = Report.open(cli_diagnose(run, tmp_path / "rep", ["--synthetic", "--tokens", "50000"]))
    gt = rep.summary["ground_truth"]
    assert gt["matching"]["n_matched"] == gt["matching"]["n_true"] == 64
    assert all(b["recall"] == 1.0 for b in gt["recovery_curve"])
    assert rep.features["gt_true_feature"].tolist() == list(range(64))
    assert rep.summary["logit_weights"]["computed"] is False
    assert "fresh rows of the run's synthetic source" in rep.summary["density_source"]
    cli.main(["evaluate", "--run", str(run), "--tokens", "8192"])
    ev = json.loads((run / "eval.json").read_text())
    assert ev["spliced"] is False and ev["ground_truth"]["matching"]["n_matched"] == 64
    assert ev["fvu_pooled"] > 0 and ev["l0"] > 0
    # --ablate on a synthetic run: delta-MSE only (no model to take CE from).
    (tmp_path / "some.txt").write_text("0 1 2")
    cli.main(
        ["evaluate", "--run", str(run), "--tokens", "8192", "--ablate", str(tmp_path / "some.txt")]
    )
    r = json.loads((run / "eval.json").read_text())["ablations"][str(tmp_path / "some.txt")]
    assert r["n_features"] == 3 and r["delta_mse"] != 0 and "delta_ce" not in r
    assert r["mse"] - r["delta_mse"] == pytest.approx(ev["mse"])  # the same fresh rows
    sae_lens = pytest.importorskip("sae_lens")
    theirs = sae_lens.SAE.load_from_disk(str(run))
    x = truth.sample(256, seed=1)
    with torch.no_grad():
        assert torch.allclose(theirs.encode(x), sae.encode(x), atol=1e-5)


def cli_diagnose(run: Path, out: Path, extra: list[str]) -> Path:
    cli.main(["diagnose", "--run", str(run), "--out", str(out), *extra])
    return out


def test_python_api_trains_on_a_synthetic_config(tmp_path):
    import saekit

    cfg = parse_synthetic(SMALL)
    run = saekit.train(cfg, out=str(tmp_path / "run"), features=32, steps=6, batch_size=128)
    assert run.metadata["source"]["kind"] == "synthetic"
    assert SyntheticSource.load(run.path).cfg == cfg
    with pytest.raises(SaekitError, match="exactly one activation source"):
        saekit.train(cfg, out=str(tmp_path / "r2"), cache=str(tmp_path))


def test_sparse_step_and_bfloat16_matmuls_train_from_a_synthetic_source(tmp_path):
    """The step's choices (dense, then sparse once the window L0 falls) and --matmul-dtype do not
    depend on the source: a synthetic stream trains through both regimes, and bfloat16 matmuls
    end within 2% of float32's FVU and L0 (same seed and rows)."""
    from saekit.training.config import TrainConfig
    from saekit.training.loop import Trainer

    spec = ["d_in=32", "n_features=256"]
    ends = {}
    for mm in (None, "bfloat16"):
        source = SyntheticStream(parse_synthetic(spec))
        out = tmp_path / str(mm)
        out.mkdir()
        cfg = TrainConfig(synthetic=spec, out=str(out), arch="relu_l1", features=512, steps=80,
                          batch_size=256, density_window=5 * 256, lr=3e-3, resample="none",
                          l1_coef=3 * source.mean_norm / 32**0.5, log_every=10,
                          checkpoint_every=0, matmul_dtype=mm)  # fmt: skip
        res = cfg.resolve(source.d_in, source.mean_norm, source.n_rows)
        trainer = Trainer(cfg, res, source, out)
        trainer.init_fresh()
        ends[mm] = trainer.fit()
        fs = trainer.fast_step
        assert fs.calls == 80 and 0 < fs.sparse_calls < 80, (mm, fs.sparse_calls)
    a, b = ends[None], ends["bfloat16"]
    assert 0 < a["l0"] < 0.035 * 512 and 0 < a["fvu"] < 1
    assert abs(b["l0"] / a["l0"] - 1) < 0.02 and abs(b["fvu"] / a["fvu"] - 1) < 0.02
