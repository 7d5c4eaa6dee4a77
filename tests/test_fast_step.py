"""The training step's sparse relu path and its bfloat16 matmuls (sae/fast_step.py,
sae/sparse_step.py), against autograd on the definition (sae/model.py), on small random SAEs."""

from __future__ import annotations

import pytest
import torch

from saekit.sae import sparse_step as sp
from saekit.sae.fast_step import SPARSE_BELOW, FastStep, autograd_step
from saekit.sae.model import SAE, SAEConfig


def _sae(arch: str, d_in: int, d_sae: int, density: float, dtype=torch.float64, k=4) -> SAE:
    """A random SAE whose b_enc makes each feature fire on about `density` of random inputs
    (x ~ N(0, 1)); decoder rows of unequal norms where the arch lets them be."""
    sae = SAE(SAEConfig(arch, d_in, d_sae, k=k, k_aux=2 * k), dtype=dtype, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(d_in, generator=g) * 0.1)
        if not sae.arch.unit_decoder:
            sae.W_dec.mul_(torch.rand(d_sae, 1, generator=g, dtype=dtype) + 0.5)
        x = torch.randn(4096, d_in, generator=g, dtype=dtype)
        pre = sae.pre_acts(x)
        sae.b_enc.sub_(pre.quantile(1 - density, dim=0))
    return sae


def _autograd(sae: SAE, x, l1, dead=None):
    out = sae(x, dead)
    loss = sae.loss(out, l1)
    sae.zero_grad()
    loss.backward()
    return out, loss, {n: p.grad.clone() for n, p in sae.named_parameters()}


@pytest.mark.parametrize("mode", ["never", "always"])
@pytest.mark.parametrize("density", [0.5, 0.03])
@pytest.mark.parametrize("arch", ["relu_l1", "relu_l1_v2"])
def test_relu_dense_and_sparse_steps_equal_autograd(arch, density, mode):
    """Both relu steps give autograd's loss, parts, gradients and firing counts, whether many
    features fire (early in training) or few (later); relu_l1 subtracts b_dec before the encoder
    and has the plain L1, relu_l1_v2 does not and weighs L1 by the decoder norms. Again at
    another batch size and on a second call (buffers re-made, .grad overwritten)."""
    sae = _sae(arch, 16, 64, density)
    step = FastStep(sae, sparse=mode)
    g = torch.Generator().manual_seed(4)
    for B in (96, 40, 40):
        x = torch.randn(B, 16, dtype=torch.float64, generator=g)
        out, loss, want = _autograd(sae, x, 0.3)
        got = step(x, 0.3)
        assert 0.5 * density < out.acts.gt(0).double().mean() < 1.5 * density
        assert torch.allclose(got.loss, loss) and torch.allclose(got.mse, out.mse)
        assert torch.allclose(got.sparsity, out.sparsity) and got.aux == 0
        assert torch.equal(got.fired, sae.fired(out))
        for n, p in sae.named_parameters():
            assert torch.allclose(p.grad, want[n], atol=1e-12), (n, B)
    assert step.sparse_calls == (3 if mode == "always" else 0)


@pytest.mark.parametrize("arch", ["relu_l1", "relu_l1_v2"])
def test_sparse_step_in_float32(arch):
    """float32 takes the CPU's bit-pattern search for the active entries (float64 torch's)."""
    sae = _sae(arch, 32, 256, 0.05, dtype=torch.float32)
    x = torch.randn(128, 32, generator=torch.Generator().manual_seed(2))
    out, loss, want = _autograd(sae, x, 0.3)
    got = FastStep(sae, sparse="always")(x, 0.3)
    assert torch.allclose(got.loss, loss, rtol=1e-5) and torch.equal(got.fired, sae.fired(out))
    for n, p in sae.named_parameters():
        assert torch.allclose(p.grad, want[n], rtol=1e-4, atol=1e-6 * want[n].abs().max()), n


def test_auto_runs_sparse_below_the_threshold():
    """ "auto" runs dense until told the L0, then sparse exactly when L0 < SPARSE_BELOW * d_sae."""
    sae = _sae("relu_l1", 16, 200, 0.05)
    step = FastStep(sae)
    limit = SPARSE_BELOW[torch.float64] * 200
    x = torch.randn(32, 16, dtype=torch.float64)
    for hint, sparse in ((None, False), (limit * 1.01, False), (limit * 0.99, True)):
        step.l0_hint = hint
        before = step.sparse_calls
        step(x, 0.3)
        assert step.uses_sparse() == sparse and step.sparse_calls - before == sparse
    bf16 = FastStep(sae, matmul_dtype=torch.bfloat16)
    bf16.l0_hint = SPARSE_BELOW[torch.bfloat16] * 200 * 1.01
    assert not bf16.uses_sparse()


def test_active_entries_exact():
    """The active set is every entry > 0 (not -0.0, 0 or negatives), row-major, in float32,
    bfloat16 (the CPU's bit-pattern search) and float64 (torch's), rows without any included."""
    pre = torch.tensor([[0.0, -0.0, 2.0, -1e-30], [-1.0, -2.0, -3.0, -4.0], [1e-30, 0.5, 0.0, 3.0]])
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        a = sp.active_where(pre.to(dtype), torch.float64)
        assert a.crow.tolist() == [0, 1, 1, 4]
        assert a.row.tolist() == [0, 2, 2, 2] and a.col.tolist() == [2, 0, 1, 3]
        assert torch.equal(a.val, pre.to(dtype).double()[pre > 0])
        W = torch.randn(4, 3, dtype=torch.float64)
        want = pre.to(dtype).double().relu() @ W
        assert torch.allclose(sp.decode(a, W), want)


def _bf16_pair(arch: str, x, dead, density: float, mode: str):
    """FastStep with bfloat16 matmuls, and autograd under torch.autocast(bfloat16), on one SAE."""
    sae = _sae(arch, 64, 512, density, dtype=torch.float32, k=16)
    got = FastStep(sae, torch.bfloat16, sparse=mode)(x, 0.3, dead)
    fast = {n: p.grad.clone() for n, p in sae.named_parameters()}
    ref = autograd_step(sae, x, 0.3, dead, torch.bfloat16)
    auto = {n: p.grad.clone() for n, p in sae.named_parameters()}
    exact = FastStep(sae)(x, 0.3, dead)
    fp32 = {n: p.grad.clone() for n, p in sae.named_parameters()}
    return got, fast, ref, auto, exact, fp32


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize(
    "arch,density,mode",
    [("relu_l1", 0.5, "never"), ("relu_l1", 0.03, "always"), ("relu_l1_v2", 0.5, "never"),
     ("relu_l1_v2", 0.03, "always"), ("topk", 0.5, "auto")],
)  # fmt: skip
def test_bf16_matmuls_close_to_float32_counts_exact(arch, density, mode):
    """bfloat16 matmuls: the loss is float32 and within 1e-3 of the float32 step's (measured
    <= 2e-5); the gradients within 10% of float32's (measured <= 5.5%: features whose
    pre-activation bfloat16 moves across 0, or out of the top k, change the active set) and
    within 1% of autograd under torch.autocast(bfloat16), the same arithmetic (measured <= 0.42%);
    the firing counts are integers equal to autocast's, also beyond bfloat16's 256 (dense relu,
    1100 rows)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1100, 64, generator=g)  # 4 blocks of 256 rows and 76 more
    dead = torch.rand(512, generator=g) < 0.2
    got, fast, ref, auto, exact, fp32 = _bf16_pair(arch, x, dead, density, mode)
    assert got.loss.dtype == got.mse.dtype == torch.float32
    assert abs(got.loss.item() - exact.loss.item()) < 1e-3 * exact.loss.item()
    assert abs(got.loss.item() - ref.loss.item()) < 1e-3 * ref.loss.item()
    assert got.fired.dtype == torch.int64 and torch.equal(got.fired, ref.fired)
    if arch != "topk" and density > 0.25:
        assert got.fired.max() > 256
    for n in fast:
        assert fast[n].dtype == torch.float32
        assert _rel(fast[n], fp32[n]) < 0.1, (n, _rel(fast[n], fp32[n]))
        assert _rel(fast[n], auto[n]) < 0.01, (n, _rel(fast[n], auto[n]))


def test_topk_relu_is_a_top_k_where_relu_can_tell():
    """The block pre-selection keeps what torch.topk keeps where a ReLU after it can tell: the
    same latents on distinct float32 values; on bfloat16 values with many ties, k distinct
    latents holding the same values; in rows with fewer than k positive entries, every positive
    one (the rest <= 0, zeroed by the ReLU). Also a shape the block path does not take."""
    g = torch.Generator().manual_seed(3)
    k = 8
    pre = torch.randn(64, 2048, generator=g)
    pre[:8] -= 3.5  # rows with fewer than k entries > 0
    pre[8] = -1.0
    pre[9, :100] = -0.0
    assert sp.TOPK_BLOCK * 4 * k <= pre.shape[1]  # the block path runs
    for p in (pre, (pre * 4).round().bfloat16(), pre[:, :100]):
        v, i = sp.topk_relu(p, k)
        want_v, want_i = p.topk(k, dim=1, sorted=False)
        assert torch.equal(p.gather(1, i), v)
        assert (i.sort(1).values.diff(dim=1) > 0).all()  # k distinct latents a row
        assert torch.equal(v.relu().sort(1).values, want_v.relu().sort(1).values)
        kept = torch.zeros_like(p, dtype=torch.bool).scatter_(1, i, v > 0)
        assert torch.equal(kept.sum(1), (want_v > 0).sum(1))
        assert (kept | (p <= 0) | (p <= want_v.min(1, keepdim=True).values)).all()  # ties
        if p.dtype == torch.float32:
            assert torch.equal(kept, torch.zeros_like(kept).scatter_(1, want_i, want_v > 0))
    assert (pre[:8] > 0).sum(1).max() < k and (pre[:8] > 0).sum() > 0


def test_topk_step_on_the_block_path_equals_autograd():
    """The topk step where the block pre-selection runs (float32, d_sae >= 4 k TOPK_BLOCK),
    with AuxK: autograd's loss, gradients and firing counts; and with bfloat16 matmuls, where
    ties are common, within 1% of autograd under torch.autocast and the same firing counts
    (the definition takes the same top k: sae/model.py)."""
    sae = _sae("topk", 32, 2048, 0.05, dtype=torch.float32, k=8)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(256, 32, generator=g)
    dead = torch.rand(2048, generator=g) < 0.1
    out, loss, want = _autograd(sae, x, 0.0, dead)
    got = FastStep(sae)(x, 0.0, dead)
    assert got.aux > 0 and torch.allclose(got.loss, loss, rtol=1e-5)
    assert torch.equal(got.fired, sae.fired(out))
    for n, p in sae.named_parameters():
        assert torch.allclose(p.grad, want[n], rtol=1e-4, atol=1e-6 * want[n].abs().max()), n
    got = FastStep(sae, torch.bfloat16)(x, 0.0, dead)
    fast = {n: p.grad.clone() for n, p in sae.named_parameters()}
    ref = autograd_step(sae, x, 0.0, dead, torch.bfloat16)
    assert abs(got.loss.item() - ref.loss.item()) < 1e-3 * ref.loss.item()
    assert torch.equal(got.fired, ref.fired)
    for n, p in sae.named_parameters():
        assert _rel(fast[n], p.grad) < 0.01, (n, _rel(fast[n], p.grad))
