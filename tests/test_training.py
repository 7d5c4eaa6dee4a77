"""Training (training/): resampling with a held-out control group, density history, exact resume
after kill -9, run-dir files, and the one-line errors.

The end-to-end tests run on a real cache of the default model's mlp_post (100k tokens, built once
per session: tests/conftest.py's `cache` fixture).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saekit.sae.errors import SaekitError
from saekit.sae.fast_step import SPARSE_BELOW
from saekit.training.config import TrainConfig
from saekit.training.resample import event_seed
from saekit.training.trainer import train

REPO = Path(__file__).resolve().parents[1]


def _cfg(cache: Path, out: Path, **kw) -> TrainConfig:
    base = dict(cache=str(cache), out=str(out), features=1024, steps=60, batch_size=512,
                log_every=10, checkpoint_every=10, keep_checkpoints=0)  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def _ckpt(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step-{step:08d}.safetensors"))


# Resampling: dead_window 10 steps = 2 history windows of 5 steps; events at 20 and 40.
RESAMPLE = dict(resample="anthropic", resample_steps=[20, 40], dead_window=10,
                resample_holdout=0.5, resample_inputs=20_000, density_window=5 * 512)  # fmt: skip


def test_resampling_with_holdout(cache, tmp_path):
    from saekit.activations.cache_reader import CacheReader

    # An aggressive learning rate kills many features early, so resampling has work to do.
    manifest = json.loads((cache / "manifest.json").read_text())
    l1 = manifest["stats"]["mean_norm"] / manifest["d_in"] ** 0.5
    run = train(_cfg(cache, tmp_path / "run", lr=1e-2, l1_coef=l1, **RESAMPLE))
    h = load_file(str(run / "density_history.safetensors"))
    assert h["resample_steps"].tolist() == [20, 40]
    assert torch.equal(h["window_end_step"], torch.arange(5, 61, 5))
    assert (h["window_tokens"] == 5 * 512).all() and h["counts"].shape == (12, 1024)
    assert torch.equal(h["control_mask"], h["held_out"].any(0))
    reader = CacheReader(cache, 512)
    total_resampled = 0
    for e, step in enumerate([20, 40]):
        res, held = h["resampled"][e], h["held_out"][e]
        chosen = res | held
        total_resampled += int(res.sum())
        assert not (res & held).any()
        assert abs(int(held.sum()) - int(chosen.sum()) / 2) <= 0.5  # exactly round(50%)
        # Chosen = exactly the non-control features with no firing in the last 10 steps.
        recent = h["counts"][(h["window_end_step"] > step - 10) & (h["window_end_step"] <= step)]
        silent = recent.sum(0) == 0
        earlier_control = h["held_out"][:e].any(0)
        assert torch.equal(chosen, silent & ~earlier_control)
        assert not (res & earlier_control).any()  # the control group is never resampled

        # The checkpoint taken right after the event: decoder rows are unit inputs from the
        # resampling sample, encoder rows parallel to them, b_enc 0, Adam moments zero.
        ck = _ckpt(run, step)
        idx = res.nonzero().squeeze(1)
        if len(idx):
            W_dec = ck["sae.W_dec"][idx]
            x = reader.sample(20_000, seed=event_seed(0, step))
            unit = x / x.norm(dim=1, keepdim=True)
            best = (W_dec @ unit.t()).max(dim=1)
            assert torch.allclose(W_dec, unit[best.indices], atol=1e-6)
            W_enc = ck["sae.W_enc"][:, idx].t()
            enc_norm = W_enc.norm(dim=1)
            assert torch.allclose(W_enc / enc_norm[:, None], W_dec, atol=1e-5)
            assert torch.allclose(enc_norm, enc_norm[0].expand_as(enc_norm))
            assert (ck["sae.b_enc"][idx] == 0).all()
            for name, sl in (("W_dec", (idx,)), ("W_enc", (slice(None), idx)), ("b_enc", (idx,))):
                for key in ("exp_avg", "exp_avg_sq"):
                    assert (ck[f"adam.{name}.{key}"][sl] == 0).all(), (name, key)
            # ...while the other features' moments were kept.
            assert (ck["adam.W_dec.exp_avg_sq"][~res] != 0).any()
    assert total_resampled > 0, "no feature was dead: the test needs a stronger l1_coef"

    # Held-out features that stayed silent after their event are bitwise unchanged.
    final = load_file(str(run / "sae_weights.safetensors"))
    e = int(h["held_out"].any(1).nonzero()[0])
    step = int(h["resample_steps"][e])
    held = h["held_out"][e].nonzero().squeeze(1)
    later = h["counts"][h["window_end_step"] > step].sum(0)
    quiet = held[later[held] == 0]
    assert len(quiet) > 0
    at_event = _ckpt(run, step)
    for s in range(step + 10, 60, 10):
        ck = _ckpt(run, s)
        assert torch.equal(ck["sae.W_dec"][quiet], at_event["sae.W_dec"][quiet])
        assert torch.equal(ck["sae.W_enc"][:, quiet], at_event["sae.W_enc"][:, quiet])
        assert torch.equal(ck["sae.b_enc"][quiet], at_event["sae.b_enc"][quiet])
    assert torch.equal(final["W_dec"][quiet], at_event["sae.W_dec"][quiet])
    assert torch.equal(final["W_enc"][:, quiet], at_event["sae.W_enc"][:, quiet])

    # metrics.jsonl: one line per log step with the documented keys.
    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(10, 61, 10))
    keys = {"step", "tokens", "elapsed_s", "loss", "mse", "sparsity", "l0", "fvu", "dead",
            "ultra_rare", "lr", "l1_coef"}  # fmt: skip
    assert keys <= set(lines[-1])
    sp = load_file(str(run / "sparsity.safetensors"))["sparsity"]
    assert sp.shape == (1024,) and (sp <= 0).all()


def _run_cli(args: list[str], **kw) -> subprocess.Popen:
    env = dict(os.environ)
    return subprocess.Popen(
        [sys.executable, "-m", "saekit", "train", *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw,
    )  # fmt: skip


# relu_l1 (resampling, control group), and one arch per new kind of training state: jumprelu
# (trained thresholds, Adam with beta1 = 0, input scaling) and matryoshka (BatchTopK's estimated
# threshold, a buffer outside Adam; nested losses; AuxK).
@pytest.mark.slow
@pytest.mark.parametrize(
    "arch, matmul_dtype",
    [("relu_l1", None), ("relu_l1", "bfloat16"), ("jumprelu", None), ("matryoshka", None)],
)
def test_kill_and_resume_is_bitwise_identical(cache, tmp_path, arch, matmul_dtype):
    """Also with bfloat16 matmuls, where the step turns sparse once L0 falls (the choice made
    from the density history, so the resumed run makes the same one)."""
    args = ["--cache", str(cache), "--arch", arch, "--features", "1024", "--steps", "160",
            "--batch-size", "512", "--checkpoint-every", "20", "--log-every", "20", "--resample", "anthropic",
            "--resample-steps", "40", "100", "--dead-window", "20", "--resample-holdout", "0.5",
            "--resample-inputs", "20000", "--density-window", "5120"]  # fmt: skip
    if matmul_dtype:  # and a stronger L1 than the default 3 (x mean norm / sqrt(d_in)): L0 < 41
        l1 = 5 * json.loads((cache / "manifest.json").read_text())["stats"]["mean_norm"] / 512**0.5
        args += ["--matmul-dtype", matmul_dtype, "--l1-coef", str(l1)]
    full = _run_cli([*args, "--out", str(tmp_path / "full")])
    killed_dir = tmp_path / "killed"
    victim = _run_cli([*args, "--out", str(killed_dir)])
    deadline = time.time() + 120
    while not (killed_dir / "checkpoints" / "step-00000060.json").exists():
        assert victim.poll() is None, victim.communicate()[1]
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert not (killed_dir / "sae_weights.safetensors").exists()  # it really died mid-run
    resumed = _run_cli([*args, "--out", str(killed_dir), "--resume"])
    for p in (full, resumed):
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    for name in (
        "sae_weights.safetensors",
        "density_history.safetensors",
        "sparsity.safetensors",
        "mechanisms.safetensors",
    ):
        a, b = load_file(str(tmp_path / "full" / name)), load_file(str(killed_dir / name))
        assert a.keys() == b.keys()
        for k in a:
            # bitwise, NaN (an L1 share with no gradient) matching NaN
            torch.testing.assert_close(
                a[k], b[k], rtol=0, atol=0, equal_nan=True, msg=f"{name}: {k}"
            )
    lines = [json.loads(s) for s in (killed_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(20, 161, 20))
    if matmul_dtype:  # dense at first, sparse from some window on: both sides of the switch
        limit = SPARSE_BELOW[torch.bfloat16] * 1024
        assert lines[0]["l0"] > limit and min(m["l0"] for m in lines[2:]) < limit


@pytest.mark.parametrize("arch", ["relu_l1_v2", "topk"])
def test_other_archs_train_and_load_in_saelens(cache, tmp_path, arch):
    sae_lens = pytest.importorskip("sae_lens")
    from saekit.activations.cache_reader import CacheReader

    run = train(_cfg(cache, tmp_path / "run", arch=arch, steps=30, k=16))
    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(m["loss"]) for m in lines)
    if arch == "topk":
        assert lines[-1]["fvu"] < lines[0]["fvu"]
        assert all(m["l0"] <= 16 for m in lines)
    else:  # lambda warm-up over the first 5% of steps, lr decay to 0 over the last 20%
        assert lines[-1]["lr"] < lines[0]["lr"] / 4
    theirs = sae_lens.SAE.load_from_disk(str(run))
    from saekit.sae.io import load_sae

    ours, meta = load_sae(run)
    assert meta["arch"] == arch and meta["hook_name"] == "blocks.0.mlp.hook_post"
    x = CacheReader(cache, 256).sample(256, seed=1)
    with torch.no_grad():
        assert torch.allclose(theirs.encode(x), ours.encode(x), atol=1e-5)
        assert torch.allclose(theirs(x), ours.decode(ours.encode(x)), atol=1e-4)


def test_errors_are_one_line_and_leave_no_run_dir(cache, synthetic_cache, tmp_path):
    out = tmp_path / "run"
    bad = [
        (dict(d_in=100), "does not match the cache's width"),
        (dict(lr=-1.0), "--lr must be > 0"),
        (dict(arch="topk", k=5000), "--k must be between 1"),
        (dict(resample="anthropic", resample_holdout=1.0), "--resample-holdout must be in"),
        (dict(resample="anthropic", resample_steps=[60]), "resample step 60 is outside"),
        (dict(resample="none", resample_holdout=0.5), "needs --resample anthropic"),
        (dict(resume=True), "holds no checkpoint"),
        (dict(expansion=4), "--features 1024 and --expansion 4 both set the width"),
    ]
    for kw, msg in bad:
        with pytest.raises(SaekitError, match=msg) as e:
            train(_cfg(cache, out, **kw))
        assert "\n" not in str(e.value)
        assert not out.exists()

    incomplete = synthetic_cache(tmp_path / "inc", n_rows=2000, d_in=8, complete=False)
    with pytest.raises(SaekitError, match="incomplete"):
        train(_cfg(incomplete, out))
    nan = synthetic_cache(tmp_path / "nan", n_rows=4000, d_in=8, shard_rows=1000, nan_shard=2)
    with pytest.raises(SaekitError, match="shard-00002.safetensors"):
        train(_cfg(nan, out, features=16, batch_size=100, steps=100))
    assert not out.exists()

    out.mkdir()
    (out / "something").write_text("x")
    with pytest.raises(SaekitError, match="holds something, which saekit did not write"):
        train(_cfg(cache, out))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(cache, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SaekitError, match="last good checkpoint") as e:
        train(_cfg(cache, out, lr=1e30, steps=40, checkpoint_every=1, log_every=5, features=64))
    msg = str(e.value)
    assert "NaN" in msg or "nan" in msg or "inf" in msg
    kept = sorted((out / "checkpoints").glob("*.safetensors"))
    assert kept
    for p in kept:
        t = load_file(str(p))
        assert all(torch.isfinite(v).all() for k, v in t.items() if k.startswith("sae."))


@pytest.mark.slow  # the CLI's start-up imports TransformerLens (~15 s)
def test_cli_error_exit_code(cache, tmp_path):
    p = _run_cli(["--cache", str(cache), "--out", str(tmp_path / "r"), "--lr", "-1"])
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2
    assert err.strip().splitlines()[-1].startswith("saekit: error: --lr must be > 0")


def test_resample_below_holds_out_rare_features_that_still_fire(cache, tmp_path):
    # Dead window 10 steps = 2 whole windows, events at 20 and 40 end a window: the density
    # over the dead window is exact, so the chosen features can be recomputed from the history.
    manifest = json.loads((cache / "manifest.json").read_text())
    l1 = manifest["stats"]["mean_norm"] / manifest["d_in"] ** 0.5
    below = 2e-3  # about 10 firings in the dead window's 5,120 tokens
    cfg = _cfg(cache, tmp_path / "run", lr=1e-2, l1_coef=l1, checkpoint_every=0, **RESAMPLE)
    run = train(dataclasses.replace(cfg, resample_below=below))
    h = load_file(str(run / "density_history.safetensors"))
    fired_in_dead_window = torch.zeros(1024, dtype=torch.bool)
    for e, step in enumerate([20, 40]):
        res, held = h["resampled"][e], h["held_out"][e]
        recent = h["counts"][(h["window_end_step"] > step - 10) & (h["window_end_step"] <= step)]
        rare = recent.sum(0) < below * 10 * 512
        just_resampled = h["resampled"][:e][h["resample_steps"][:e] > step - 10].any(0)
        assert torch.equal(res | held, rare & ~h["held_out"][:e].any(0) & ~just_resampled)
        fired_in_dead_window |= held & (recent.sum(0) > 0)
    control = h["control_mask"]
    assert control.sum() > 0 and fired_in_dead_window.sum() > 0
    # The point of it: the control group holds features that still fired in the dead window
    # (Anthropic's rule would hold out only silent ones).
    assert (fired_in_dead_window & control).sum() >= 0.5 * control.sum()  # 138 of 186 here


def test_dead_window_counts_span_whole_windows():
    from saekit.training.density import DensityTracker

    t = DensityTracker(3, batch_size=10, steps_per_window=4, device="cpu")
    for step in range(1, 15):  # feature 0 fires every step, 1 at steps 1-8, 2 never
        t.update(torch.tensor([1, int(step <= 8), 0]), step)
    # Step 14: windows end at 4, 8, 12; the open window holds steps 13-14.
    counts, tokens = t.dead_window_counts(14, 6)  # 2 open + window 9-12 = 6 steps: exact
    assert counts.tolist() == [6, 0, 0] and tokens == 60
    counts, tokens = t.dead_window_counts(14, 7)  # reaches back to window 5-8: 10 steps
    assert counts.tolist() == [10, 4, 0] and tokens == 100
    assert t.below_mask(14, 7, 0.05).tolist() == [False, True, True]  # 0.1, 0.04, 0
    t.record_event(14, torch.tensor([False, True, False]), torch.zeros(3, dtype=torch.bool))
    assert t.below_mask(14, 7, 0.05).tolist() == [False, False, True]  # 1 just resampled


def _wandb_history(run_dir: Path) -> list[dict]:
    """The history rows of an offline wandb run, read from its .wandb file (a leveldb-style log
    of protobuf records: 7-byte file header, then records with a 7-byte header in 32 KiB
    blocks)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, pos, block = path.read_bytes(), 7, 32768
    payloads, buf = [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # a full record, or the last piece of one
            payloads.append(buf)
            buf = b""
    rows = []
    for p in payloads:
        rec = pb.Record()
        rec.ParseFromString(p)
        if rec.HasField("history"):
            rows.append(
                {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in rec.history.item
                }
            )
    return rows


def test_density_windows_go_to_wandb(cache, tmp_path, monkeypatch):
    """With --wandb-project (offline), every density window logs the features per band and the
    log10-density histogram at its end step; the bands add up to d_sae and match the history."""
    pytest.importorskip("wandb")
    from saekit.training.density import BANDS, LOG10_EDGES

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = train(_cfg(cache, tmp_path / "run", steps=20, log_every=5, checkpoint_every=0,
                     density_window=4 * 512, wandb_project="saekit-test", features=256))  # fmt: skip
    import wandb

    wandb.teardown()  # the wandb service writes the run file in the background: let it finish
    rows = [r for r in _wandb_history(run) if "density/dead" in r]
    h = load_file(str(run / "density_history.safetensors"))
    assert [r["_step"] for r in rows] == h["window_end_step"].tolist() == [4, 8, 12, 16, 20]
    for r, counts, tokens in zip(rows, h["counts"], h["window_tokens"], strict=True):
        bands = [r[f"density/{b}"] for b in BANDS]
        assert sum(bands) == 256 and r["density/window_tokens"] == int(tokens)
        assert r["density/dead"] == int((counts == 0).sum())
        dens = counts.double() / int(tokens)
        assert r["density/1e-4_to_1e-2"] == int(((dens >= 1e-4) & (dens < 1e-2)).sum())
        assert r["density/log10_histogram/_type"] == "histogram"
        assert r["density/log10_histogram/bins"] == pytest.approx(LOG10_EDGES.tolist())
        assert sum(r["density/log10_histogram/values"]) == 256 - r["density/dead"]
    metrics = [r for r in _wandb_history(run) if "loss" in r]
    assert [r["_step"] for r in metrics] == [5, 10, 15, 20]


def test_step_turns_sparse_from_the_window_after_l0_falls(cache, tmp_path):
    """Each step runs sparse exactly when the L0 of the last closed density window is below
    SPARSE_BELOW of the features (dense before any window closed)."""
    from saekit.activations.source import CacheSource
    from saekit.training.loop import Trainer

    source = CacheSource(cache)
    l1 = 5 * source.mean_norm / 512**0.5
    cfg = _cfg(cache, tmp_path, steps=60, density_window=5 * 512, l1_coef=l1, checkpoint_every=0)
    res = cfg.resolve(source.d_in, source.mean_norm, source.n_rows)
    trainer = Trainer(cfg, res, source, tmp_path)
    trainer.init_fresh()
    trainer.fit()
    d = trainer.density
    l0 = [int(c.sum()) / t for c, t in zip(d.counts, d.window_tokens, strict=True)]
    limit = SPARSE_BELOW[torch.float32] * 1024
    # Step s (1..60) knows the windows closed by step s - 1: (s - 1) // 5 of them.
    want = sum(l0[(s - 1) // 5 - 1] < limit for s in range(6, 61))
    assert 0 < want < 55 and trainer.fast_step.sparse_calls == want
    assert trainer.fast_step.calls == 60 and trainer.fast_step.l0_hint == l0[-2]
