"""The training definitions of batchtopk, jumprelu, gated and matryoshka (sae/model.py) against
SAELens' own training SAEs given the same weights and batch: loss and every gradient, where
the recipes agree, and written out here where they do not (Gated's frozen decoder in the
auxiliary loss, Matryoshka's mean over prefixes instead of SAELens' sum)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from saekit.sae.fast_step import FastStep, autograd_step
from saekit.sae.model import SAE, SAEConfig

sae_lens = pytest.importorskip("sae_lens")
from sae_lens.saes.sae import TrainStepInput  # noqa: E402

D_IN, D_SAE, B = 16, 64, 32


def _ours(arch: str, k: int = 4, **kw) -> SAE:
    sae = SAE(SAEConfig(arch, D_IN, D_SAE, k=k, **kw), seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(D_IN, generator=g) * 0.3)
        sae.b_enc.copy_(torch.randn(D_SAE, generator=g) * 0.3)
        if sae.arch.threshold == "trained":
            sae.threshold.copy_(torch.rand(D_SAE, generator=g) * 0.6)
        if sae.arch.activation == "gated":
            sae.r_mag.copy_(torch.randn(D_SAE, generator=g) * 0.3)
            sae.b_mag.copy_(torch.randn(D_SAE, generator=g) * 0.3)
    return sae


def _theirs(cls, cfg_cls, ours: SAE, **cfg):
    """SAELens' training SAE with our weights (b_enc -> b_gate for gated)."""
    c = cfg_cls(d_in=D_IN, d_sae=D_SAE, decoder_init_norm=None,
                apply_b_dec_to_input=ours.arch.subtract_b_dec, **cfg)  # fmt: skip
    sae = cls(c)
    state = {n: p.detach().clone() for n, p in ours.named_parameters()}
    if ours.arch.activation == "gated":
        state["b_gate"] = state.pop("b_enc")
    with torch.no_grad():
        for n, t in state.items():
            getattr(sae, n).copy_(t)
    return sae


def _their_step(sae, x, coefficients, dead=None):
    sae.zero_grad()
    out = sae.training_forward_pass(TrainStepInput(x, coefficients, dead, 0, False))
    out.loss.backward()
    return out


def _x() -> torch.Tensor:
    return torch.randn(B, D_IN, generator=torch.Generator().manual_seed(2)) + 0.5


def _grads(sae) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in sae.named_parameters()}


def test_jumprelu_matches_saelens_training_sae():
    """GDM's JumpReLU: L0 penalty and straight-through threshold gradients (step mode, no
    estimator to the input), as SAELens' JumpReLUTrainingSAE."""
    from sae_lens import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig

    ours, lam = _ours("jumprelu"), 0.7
    bw = 0.2  # wide enough that many pre-activations fall in the kernel at this scale
    ours.arch = dataclasses.replace(ours.arch, bandwidth=bw)
    theirs = _theirs(JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig, ours,
                     jumprelu_bandwidth=bw, l0_coefficient=lam)  # fmt: skip
    x = _x()
    out = ours(x)
    loss = ours.loss(out, lam)
    loss.backward()
    t = _their_step(theirs, x, {"l0": lam})
    assert torch.allclose(loss, t.loss, atol=1e-5)
    assert torch.allclose(out.sparsity * lam, t.losses["l0_loss"], atol=1e-6)
    assert 0 < (out.acts > 0).float().mean() < 1
    theirs_g = _grads(theirs)
    for n, g in _grads(ours).items():
        assert torch.allclose(g, theirs_g[n], atol=1e-5), n
    assert theirs_g["threshold"].abs().sum() > 0  # the estimator really contributed


def test_batchtopk_matches_saelens_training_sae():
    """Top k x B over the batch, AuxK over dead latents (with enough dead that SAELens' small-
    count scale is 1), and the threshold's moving average of the smallest kept activation.
    (AuxK relus the dead latents' values, as Gao et al.; SAELens does not: the dead latents'
    biases here keep their top pre-activations positive, where the two agree.)"""
    from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

    ours = _ours("batchtopk")
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::3] = True  # 22 dead >= k_aux = 8
    with torch.no_grad():
        ours.b_enc[dead] += 2.0
    theirs = _theirs(BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, ours, k=4,
                     rescale_acts_by_decoder_norm=False, aux_loss_coefficient=1 / 32)  # fmt: skip
    x = _x()
    step = autograd_step(ours, x, 0.0, dead)
    t = _their_step(theirs, x, {}, dead)
    assert torch.allclose(step.loss, t.loss, atol=1e-5) and step.aux > 0
    assert int((t.feature_acts > 0).sum()) == int(step.fired.sum()) == 4 * B
    theirs_g = _grads(theirs)
    for n, g in _grads(ours).items():
        assert torch.allclose(g, theirs_g[n], atol=1e-5), n
    ours.update_threshold(step.min_kept)  # SAELens updated its own in the forward pass
    assert torch.allclose(ours.threshold, theirs.topk_threshold.float().expand(D_SAE))
    assert (ours.threshold > 0).all()


def test_gated_matches_saelens_except_the_frozen_decoder():
    """Gated: the same loss value as SAELens' GatedTrainingSAE (unit decoder rows), the same
    encoder-side gradients; the decoder's gradients leave out the auxiliary reconstruction, whose
    decoder is a frozen copy in the paper (SAELens lets it train)."""
    from sae_lens import GatedTrainingSAE, GatedTrainingSAEConfig

    ours, lam = _ours("gated"), 0.4
    theirs = _theirs(GatedTrainingSAE, GatedTrainingSAEConfig, ours, l1_coefficient=lam)
    x = _x()
    step = autograd_step(ours, x, lam)
    t = _their_step(theirs, x, {"l1": lam})
    assert torch.allclose(step.loss, t.loss, atol=1e-4)
    assert torch.allclose(step.aux, t.losses["auxiliary_reconstruction_loss"], atol=1e-4)
    theirs_g = _grads(theirs)
    theirs_g["b_enc"] = theirs_g.pop("b_gate")
    ours_g = _grads(ours)
    for n in ("W_enc", "b_enc", "r_mag", "b_mag"):
        assert torch.allclose(ours_g[n], theirs_g[n], atol=1e-4), n
    # The decoder's gradients are SAELens' less the auxiliary loss' path through the decoder
    # and the decoder norms in SAELens' L1 term (ours penalises the gate alone: with unit rows
    # that is the same value, and that gradient is along the rows, which training projects out).
    W, b = ours.W_dec.detach().requires_grad_(), ours.b_dec.detach().requires_grad_()
    pre = ours.pre_acts(x).detach()
    aux_through_decoder = ((pre.relu() @ W + b - x) ** 2).sum(-1).mean()
    (aux_through_decoder + lam * (pre.relu() * W.norm(dim=1)).sum(-1).mean()).backward()
    assert W.grad.abs().sum() > 0
    assert torch.allclose(ours_g["W_dec"], theirs_g["W_dec"] - W.grad, atol=1e-4)
    assert torch.allclose(ours_g["b_dec"], theirs_g["b_dec"] - b.grad, atol=1e-4)


def test_matryoshka_is_the_mean_of_saelens_prefix_losses():
    """SAELens' Matryoshka loss is the sum of the prefixes' squared errors; ours their mean (as
    dictionary_learning's equal group weights), so ours x the number of prefixes is theirs, loss
    and gradients."""
    from sae_lens.saes.matryoshka_batchtopk_sae import (
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
    )

    ours = _ours("matryoshka")
    assert ours.widths == [4, 8, 16, 32, 64]
    theirs = _theirs(MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig, ours,
                     k=4, rescale_acts_by_decoder_norm=False, matryoshka_widths=ours.widths)  # fmt: skip
    x = _x()
    out = ours(x)
    ours.loss(out, 0.0).backward()
    t = _their_step(theirs, x, {})
    n = len(ours.widths)
    assert torch.allclose(out.recon_loss * n, t.loss, atol=1e-4)
    assert torch.allclose(out.mse, t.losses["mse_loss"], atol=1e-5)
    assert abs(float((out.recon_loss - out.mse).detach())) > 0.1  # the inner prefixes count
    theirs_g = _grads(theirs)
    for name, g in _grads(ours).items():
        assert torch.allclose(g * n, theirs_g[name], atol=1e-4), name


@pytest.mark.parametrize("arch", ["batchtopk", "jumprelu", "gated", "matryoshka"])
def test_step_of_new_archs_equals_autograd(arch):
    """FastStep (hand-written where the arch has one, else autograd_step) gives the definition's
    loss, gradients, firing counts and smallest kept activation."""
    sae = _ours(arch, k_aux=8).double()
    if sae.arch.threshold == "trained":  # a kernel wide enough that many pre-activations fall in
        sae.arch = dataclasses.replace(sae.arch, bandwidth=0.3)
    x = _x().double()
    dead = torch.rand(D_SAE, generator=torch.Generator().manual_seed(3)) < 0.4
    out = sae(x, dead)
    loss = sae.loss(out, 0.3)
    loss.backward()
    want = _grads(sae)
    got = FastStep(sae)(x, 0.3, dead)
    assert torch.allclose(got.loss, loss)
    assert torch.equal(got.fired, sae.fired(out))
    for n, p in sae.named_parameters():
        assert torch.allclose(p.grad, want[n], atol=1e-10), n
    if sae.arch.threshold == "trained":
        assert (sae.threshold.grad != 0).sum() > D_SAE // 4  # the estimators really ran
    if sae.arch.threshold == "estimated":
        acts = out.acts.detach()
        assert got.min_kept == acts[acts > 0].min()
    else:
        assert got.min_kept is None
    assert math.isfinite(float(got.loss))
