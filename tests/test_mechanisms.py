"""The mechanism checks (training/mechanisms.py): each check per arch on planted SAEs against
autograd, the step handing over its pre-activations, and mechanisms.safetensors of tiny runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saekit.training.config import TrainConfig
from saekit.training.trainer import train


def _cfg(cache: Path, out: Path, **kw) -> TrainConfig:
    base = dict(cache=str(cache), out=str(out), features=1024, steps=60, batch_size=512,
                log_every=10, checkpoint_every=0, keep_checkpoints=0)  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("arch", ["relu_l1", "relu_l1_v2", "topk"])
def test_mechanism_checks_on_a_planted_sae(arch):
    from saekit.sae.model import SAE, SAEConfig
    from saekit.training.mechanisms import mechanism_row

    g = torch.Generator().manual_seed(0)
    d_in, d_sae, B = 6, 5, 64
    sae = SAE(SAEConfig(arch, d_in, d_sae, k=2), dtype=torch.float64)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=g, dtype=torch.float64))
        sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=g, dtype=torch.float64))
        sae.b_enc.copy_(torch.tensor([0.5, -0.2, 0.0, 0.3, -40.0]))  # feature 4 never fires
        sae.b_dec.copy_(torch.linspace(-1, 1, d_in))
    x = torch.randn(B, d_in, generator=g, dtype=torch.float64).relu()
    l1 = 0.7
    row = mechanism_row(sae, x, l1, grad_rows=48)
    W_enc, b_enc, W_dec, b_dec = (p.detach() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    sub = arch != "relu_l1_v2"  # relu_l1_v2's encoder sees x itself
    thr = b_enc - (b_dec @ W_enc if sub else 0)
    torch.testing.assert_close(row["effective_threshold"], thr.float())
    torch.testing.assert_close(row["encoder_bias"], b_enc.float())
    torch.testing.assert_close(row["encoder_norm"], W_enc.norm(dim=0).float())
    unit = W_dec / W_dec.norm(dim=1, keepdim=True)
    torch.testing.assert_close(row["de_projection"], (unit * W_enc.T).sum(1).float())
    # The margin: the largest pre-activation, x . W_enc + effective threshold.
    torch.testing.assert_close(row["margin"], (x @ W_enc + thr).amax(0).float())
    assert row["margin"][4] < -30
    # The L1 share of the encoder gradient, against autograd on the first 48 rows.
    out = sae(x[:48])
    g_rec = torch.autograd.grad(out.mse, sae.W_enc, retain_graph=True)[0].norm(dim=0)
    if arch == "topk":
        assert (row["l1_grad_share"][:4][torch.isfinite(row["l1_grad_share"][:4])] == 0).all()
    else:
        g_l1 = torch.autograd.grad(l1 * out.sparsity, sae.W_enc)[0].norm(dim=0)
        want = (g_l1 / (g_l1 + g_rec))[:4]
        torch.testing.assert_close(
            row["l1_grad_share"][:4], want.float(), rtol=1e-5, atol=1e-6, equal_nan=True
        )
        assert torch.isfinite(row["l1_grad_share"][:4]).sum() >= 2
    assert torch.isnan(row["l1_grad_share"][4])  # no gradient: it fired on no row


def _planted_sae(arch: str, **arch_fields):
    """A float64 SAE of 6 inputs and 5 features with random weights, feature 4 never firing."""
    from dataclasses import replace

    from saekit.sae.archs import get_arch
    from saekit.sae.model import SAE, SAEConfig

    g = torch.Generator().manual_seed(0)
    a = replace(get_arch(arch), **arch_fields)
    sae = SAE(SAEConfig(arch, 6, 5, k=2), dtype=torch.float64, arch=a)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(6, 5, generator=g, dtype=torch.float64))
        sae.W_dec.copy_(torch.randn(5, 6, generator=g, dtype=torch.float64))
        sae.b_enc.copy_(torch.tensor([0.5, -0.2, 0.0, 0.3, -40.0]))
        sae.b_dec.copy_(torch.linspace(-1, 1, 6))
    return sae, torch.randn(64, 6, generator=g, dtype=torch.float64).relu()


def test_mechanism_checks_jumprelu():
    """theta is the threshold: the effective threshold is b_enc - theta, the margin is > 0 iff
    the feature fired, and the share is the L0 term's share of theta's gradient."""
    from saekit.training.mechanisms import mechanism_row

    sae, x = _planted_sae("jumprelu", bandwidth=0.8)  # a wide kernel: rows near each theta
    with torch.no_grad():
        sae.threshold.copy_(torch.tensor([0.3, 0.05, 1.5, 0.0, 0.2]))
    l1 = 0.7
    row = mechanism_row(sae, x, l1, grad_rows=48)
    theta, b_enc = sae.threshold.detach(), sae.b_enc.detach()
    torch.testing.assert_close(row["effective_threshold"], (b_enc - theta).float())
    pre = sae.pre_acts(x).detach()
    torch.testing.assert_close(row["margin"], (pre.amax(0) - theta).float())
    fired = (sae.activate(pre) > 0).any(0)
    assert torch.equal(row["margin"] > 0, fired) and fired[:4].sum() >= 2 and not fired[4]
    out = sae(x[:48])
    g_rec = torch.autograd.grad(out.mse, sae.threshold, retain_graph=True)[0].abs()
    g_l0 = torch.autograd.grad(l1 * out.sparsity, sae.threshold)[0].abs()
    want = torch.where(g_l0 > 0, g_l0 / (g_l0 + g_rec), torch.nan)  # no row near theta: NaN
    torch.testing.assert_close(row["l1_grad_share"], want.float(), equal_nan=True)
    share = row["l1_grad_share"]
    assert ((share > 0) & (share < 1)).sum() >= 2 and share[3] == 1  # theta 0: L0's alone


def test_mechanism_checks_gated():
    """gated fires where the gate and the magnitude path are both > 0: the effective threshold
    is min(b_gate, b_mag exp(-r_mag)) - b_dec . e, the margin is > 0 iff the feature fired, and
    the share splits the encoder gradient into the L1 term's and the rest (magnitude path's
    reconstruction plus the gate's auxiliary reconstruction)."""
    from saekit.training.mechanisms import mechanism_row

    sae, x = _planted_sae("gated")
    with torch.no_grad():
        sae.r_mag.copy_(torch.tensor([0.5, -0.3, 0.0, 1.0, 0.0]))
        sae.b_mag.copy_(torch.tensor([-2.0, 0.4, 0.1, -20.0, 0.0]))  # 3: the gate alone opens
    l1 = 0.7
    row = mechanism_row(sae, x, l1, grad_rows=48)
    W_enc, b_enc, b_dec = sae.W_enc.detach(), sae.b_enc.detach(), sae.b_dec.detach()
    mag_bias = sae.b_mag.detach() * torch.exp(-sae.r_mag.detach())
    thr = torch.minimum(b_enc, mag_bias) - b_dec @ W_enc
    torch.testing.assert_close(row["effective_threshold"], thr.float())
    torch.testing.assert_close(row["margin"], (x @ W_enc + thr).amax(0).float())
    fired = (sae.encode(x) > 0).any(0)
    assert torch.equal(row["margin"] > 0, fired) and not fired[4]
    gate_only = ((sae.pre_acts(x) > 0).any(0) & ~fired).nonzero()
    assert len(gate_only) >= 1  # the gate opens but the magnitude stays shut: margin <= 0
    out = sae(x[:48])
    g_rec = torch.autograd.grad(out.mse + out.aux, sae.W_enc, retain_graph=True)[0].norm(dim=0)
    g_l1 = torch.autograd.grad(l1 * out.sparsity, sae.W_enc)[0].norm(dim=0)
    want = torch.where(g_l1 > 0, g_l1 / (g_l1 + g_rec), torch.nan)
    torch.testing.assert_close(row["l1_grad_share"], want.float(), equal_nan=True)
    assert torch.isfinite(row["l1_grad_share"]).sum() >= 2


@pytest.mark.parametrize("arch", ["relu_l1", "jumprelu", "gated"])
def test_diagnose_margin_matches(arch):
    """diagnose's fresh margin (features.csv with --cache) means what the recorded one does."""
    from saekit.diagnostics.features import measure_density
    from saekit.training.mechanisms import mechanism_row

    sae, x = _planted_sae(arch)
    with torch.no_grad():
        if arch == "jumprelu":
            sae.threshold.copy_(torch.tensor([0.3, 0.05, 1.5, 0.0, 0.2]))
        if arch == "gated":
            sae.b_mag.copy_(torch.tensor([-2.0, 0.4, 0.1, -20.0, 0.0]))
    fresh = measure_density(sae, [x[:32], x[32:]], torch.zeros(0, dtype=torch.int64))
    row = mechanism_row(sae, x, 0.1)
    torch.testing.assert_close(fresh.margin.float(), row["margin"])
    assert torch.equal(fresh.margin > 0, fresh.counts > 0)


@pytest.mark.parametrize(
    "arch,sparse",
    [
        ("relu_l1", "never"),
        ("relu_l1", "always"),
        ("topk", "auto"),
        ("jumprelu", "auto"),
        ("gated", "auto"),
    ],
)
def test_pre_tap_sees_the_step_pre_activations(arch, sparse):
    """The step hands the mechanism checks its pre-activations (no second forward); gated
    trains through autograd, whose forward keeps none, so it gets a pass of its own."""
    from saekit.sae.fast_step import FastStep

    sae, x = _planted_sae(arch)
    sae.float()
    x = x.float()
    step, seen = FastStep(sae, sparse=sparse), []
    want = sae.pre_acts(x).detach()
    step.pre_tap = lambda pre: seen.append(pre.clone())
    step(x, 0.1)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], want)


@pytest.mark.parametrize("arch", ["relu_l1", "jumprelu"])
def test_trainer_margin_is_the_closing_steps_forward(cache, tmp_path, arch):
    """The recorded margin is that of the pre-activations the window's last step computed (the
    weights before its update), with no second forward; the rest is after the update."""
    import copy

    from saekit.activations.source import CacheSource
    from saekit.training.loop import Trainer
    from saekit.training.mechanisms import margin

    cfg = _cfg(cache, tmp_path / "run", arch=arch, features=256, steps=100,
               density_window=3 * 512)  # fmt: skip
    source = CacheSource(cache)
    res = cfg.resolve(source.d_in, source.mean_norm, source.n_rows)
    (tmp_path / "run").mkdir()
    trainer = Trainer(cfg, res, source, tmp_path / "run")
    trainer.init_fresh()
    batches = source.batches(cfg.batch_size, cfg.seed)
    want = []
    for _ in range(6):
        x = next(batches)
        if trainer.closes_window():
            before = copy.deepcopy(trainer.sae)
            want.append(margin(before, before.pre_acts(x * res.input_scale)))
        trainer.train_step(x)
    batches.close()
    rows = trainer.mechanisms.tensors()
    assert rows["window_end_step"].tolist() == [3, 6] and len(want) == 2
    torch.testing.assert_close(rows["margin"], torch.stack(want))
    torch.testing.assert_close(rows["encoder_bias"][-1], trainer.sae.b_enc.detach())


@pytest.mark.parametrize("arch", ["jumprelu", "gated"])
def test_mechanisms_of_a_tiny_run(cache, tmp_path, arch):
    """Each window's margin comes from its last step's forward: > 0 only where the feature
    fired in that window; the last effective threshold follows the saved weights."""
    run = train(_cfg(cache, tmp_path / "run", arch=arch, features=256, steps=12,
                     density_window=4 * 512))  # fmt: skip
    m = load_file(str(run / "mechanisms.safetensors"))
    h = load_file(str(run / "density_history.safetensors"))
    assert torch.equal(m["window_end_step"], h["window_end_step"])  # 4, 8, 12
    assert m["margin"].shape == (3, 256)
    up = m["margin"] > 0
    assert up.any() and not (up & (h["counts"] == 0)).any()
    w = load_file(str(run / "sae_weights.safetensors"))
    if arch == "jumprelu":
        thr = w["b_enc"] - w["threshold"]
    else:
        mag = w["b_mag"] * torch.exp(-w["r_mag"])
        thr = torch.minimum(w["b_gate"], mag) - w["b_dec"] @ w["W_enc"]
    torch.testing.assert_close(m["effective_threshold"][-1], thr, atol=1e-5, rtol=1e-5)
    share = m["l1_grad_share"]
    assert ((share >= 0) & (share <= 1) | share.isnan()).all()


def test_mechanisms_file_tracks_every_window(cache, tmp_path):
    run = train(_cfg(cache, tmp_path / "run", steps=23, density_window=5 * 512))
    m = load_file(str(run / "mechanisms.safetensors"))
    h = load_file(str(run / "density_history.safetensors"))
    assert torch.equal(m["window_end_step"], h["window_end_step"])  # 5, 10, 15, 20, 23
    assert m["margin"].shape == (5, 1024) and m["margin"].dtype == torch.float32
    final = load_file(str(run / "sae_weights.safetensors"))  # the last row: after the last step
    torch.testing.assert_close(m["encoder_bias"][-1], final["b_enc"])
    torch.testing.assert_close(m["encoder_norm"][-1], final["W_enc"].norm(dim=0))
    thr = final["b_enc"] - final["b_dec"] @ final["W_enc"]
    torch.testing.assert_close(m["effective_threshold"][-1], thr, atol=1e-5, rtol=1e-5)
    # A feature that fired in a window's last batch has a positive margin there.
    share = m["l1_grad_share"]
    assert ((share >= 0) & (share <= 1) | share.isnan()).all()
    assert (m["margin"] > 0).float().mean() > 0.1
    run2 = train(_cfg(cache, tmp_path / "off", steps=5, mechanisms=False))
    assert not (run2 / "mechanisms.safetensors").exists()
