"""The SAE (sae/model.py), its hand-written step (sae/fast_step.py) and its file format
(sae/io.py), on small random tensors."""

from __future__ import annotations

import math

import pytest
import torch

from saekit.sae.archs import ARCHS
from saekit.sae.fast_step import FastStep, autograd_step, has_fast_step
from saekit.sae.io import atomic_write_json, load_sae, save_sae
from saekit.sae.model import SAE, SAEConfig, geometric_median


def _random_sae(arch: str, d_in=16, d_sae=64, k=4, seed=0, dtype=torch.float64, k_aux=8) -> SAE:
    sae = SAE(SAEConfig(arch, d_in, d_sae, k=k, k_aux=k_aux), dtype=dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(d_in, generator=g))
        sae.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.1)
        if sae.arch.threshold != "none":  # thresholds around the pre-activations' scale
            sae.threshold.copy_(torch.rand(d_sae, generator=g) * 0.5)
        if sae.arch.activation == "gated":
            sae.r_mag.copy_(torch.randn(d_sae, generator=g) * 0.3)
            sae.b_mag.copy_(torch.randn(d_sae, generator=g) * 0.1)
    return sae


def test_topk_forward_matches_definition():
    """sae(x, dead) and its autograd gradients equal TopK + AuxK written out here (Gao et al.)."""
    sae = _random_sae("topk")
    x = torch.randn(32, 16, dtype=torch.float64)
    dead = torch.rand(64, generator=torch.Generator().manual_seed(3)) < 0.5
    out = sae(x, dead)
    sae.loss(out, 0.0).backward()
    ours = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()

    # The same loss written densely, differentiated by autograd.
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    v, i = pre.topk(4, dim=-1)
    f = torch.zeros_like(pre).scatter(-1, i, v.relu())
    recon = f @ sae.W_dec + sae.b_dec
    mse = ((recon - x) ** 2).sum(-1).mean()
    av, ai = pre.masked_fill(~dead, -math.inf).topk(8, dim=-1)
    fa = torch.zeros_like(pre).scatter(-1, ai, av.relu())
    aux = (((x - recon).detach() - fa @ sae.W_dec) ** 2).sum(-1).mean()
    (mse + aux / 32).backward()
    assert torch.allclose(out.recon, recon)
    assert torch.allclose(out.mse, mse) and torch.allclose(out.aux, aux)
    for n, p in sae.named_parameters():
        assert torch.allclose(p.grad, ours[n], atol=1e-12), n
    assert torch.equal(sae.fired(out), (f > 0).sum(0))
    assert torch.allclose(sae.encode(x), f, atol=1e-12)


@pytest.mark.parametrize("arch", ["relu_l1", "relu_l1_v2"])
def test_relu_forward_matches_definition(arch):
    sae = _random_sae(arch)
    x = torch.randn(32, 16, dtype=torch.float64)
    out = sae(x)
    x_in = x - sae.b_dec if arch == "relu_l1" else x
    f = torch.relu(x_in @ sae.W_enc + sae.b_enc)
    recon = f @ sae.W_dec + sae.b_dec
    assert torch.allclose(out.acts, f) and torch.allclose(out.recon, recon)
    assert torch.allclose(out.mse, ((recon - x) ** 2).sum(-1).mean())
    want = f.sum(-1) if arch == "relu_l1" else (f * sae.W_dec.norm(dim=1)).sum(-1)
    assert torch.allclose(out.sparsity, want.mean())
    assert torch.equal(sae.fired(out), (f > 0).sum(0))
    assert out.aux == 0


def test_init_per_arch():
    d = _random_sae("relu_l1").W_dec.norm(dim=1)
    assert torch.allclose(d, torch.ones_like(d))
    v2 = SAE(SAEConfig("relu_l1_v2", 16, 64), dtype=torch.float64)
    assert torch.allclose(v2.W_dec.norm(dim=1), torch.full((64,), 0.1, dtype=torch.float64))
    assert torch.equal(v2.W_enc, v2.W_dec.t())
    tk = SAE(SAEConfig("topk", 16, 64))
    assert torch.equal(tk.W_enc, tk.W_dec.t())
    assert tk.cfg.k_aux == 8  # d_in // 2


def test_decoder_projection_and_renorm_keep_unit_rows_and_spare_untouched_ones():
    sae = _random_sae("relu_l1", dtype=torch.float32)
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    sae.W_dec.grad[:5] = 0
    sae.remove_parallel_decoder_grad()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-5
    before = sae.W_dec.detach().clone()
    with torch.no_grad():
        sae.W_dec -= 0.1 * sae.W_dec.grad
    sae.normalize_decoder()
    norms = sae.W_dec.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-6)
    assert torch.equal(sae.W_dec[:5], before[:5])  # no update: bitwise unchanged


def test_geometric_median_is_robust():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 8, generator=g) * 0.1 + 3.0
    x[:200] += 1000.0  # 10% far outliers drag the mean, not the median
    med = geometric_median(x)
    assert (med - 3.0).abs().max() < 0.05
    assert (x.mean(0) - 3.0).abs().max() > 50


@pytest.mark.parametrize("arch", list(ARCHS))
def test_saelens_loads_saved_sae_and_agrees(tmp_path, arch):
    sae_lens = pytest.importorskip("sae_lens")
    sae = _random_sae(arch, dtype=torch.float32)
    scale = 2.5 if sae.arch.input_norm != "none" else 1.0  # scaled inputs: folded on save
    meta = {"model_name": "default", "hook_name": "blocks.0.mlp.hook_post"}
    save_sae(sae, tmp_path, meta, input_scale=scale)
    x = torch.randn(64, 16) * 3

    with torch.no_grad():
        f_ours = sae.encode(x * scale)
        recon_ours = sae.decode(f_ours) / scale
        theirs = sae_lens.SAE.load_from_disk(str(tmp_path))
        f_theirs = theirs.encode(x)
        recon_theirs = theirs.decode(f_theirs)
        loaded, loaded_meta = load_sae(tmp_path)
        f_loaded = loaded.encode(x)
    assert theirs.cfg.metadata.hook_name == "blocks.0.mlp.hook_post"
    assert theirs.cfg.apply_b_dec_to_input == sae.arch.subtract_b_dec
    assert theirs.cfg.architecture() == sae.arch.saelens_architecture
    assert (f_ours > 0).any() and (f_ours == 0).any()  # features both fire and stay silent
    assert torch.allclose(f_theirs, f_ours, atol=1e-5)
    assert torch.allclose(recon_theirs, recon_ours, atol=1e-4)
    assert torch.allclose(f_loaded, f_ours, atol=1e-5)
    assert loaded_meta["arch"] == arch and loaded.cfg.arch == arch


def test_load_sae_errors(tmp_path):
    from saekit.sae.errors import SaekitError

    with pytest.raises(SaekitError, match="cfg.json"):
        load_sae(tmp_path)
    atomic_write_json(tmp_path / "cfg.json", {"architecture": "standard"})
    with pytest.raises(SaekitError, match="sae_weights"):
        load_sae(tmp_path)


# Every arch, without a dead mask and with no, a few (< k_aux) and many dead latents (archs
# without AuxK must ignore the mask), at two shapes.
SHAPES = [dict(d_in=16, d_sae=64, k=4, k_aux=8), dict(d_in=24, d_sae=40, k=7, k_aux=30)]


@pytest.mark.parametrize("shape", range(len(SHAPES)))
@pytest.mark.parametrize("dead_frac", [None, 0.0, 0.05, 0.6])
@pytest.mark.parametrize("arch", [a for a in ARCHS if has_fast_step(ARCHS[a])])
def test_fast_step_equals_autograd(arch, dead_frac, shape):
    """The hand-written training step gives autograd's loss, parts, gradients and firing counts;
    again at another batch size (work buffers re-made) and on a second call (buffers and .grad
    overwritten, not added to)."""
    dims = SHAPES[shape]
    sae = _random_sae(arch, **dims)
    d_sae, d_in = dims["d_sae"], dims["d_in"]
    if not sae.arch.unit_decoder:  # non-uniform decoder norms exercise the l1_dec_norm term
        with torch.no_grad():
            sae.W_dec.mul_(torch.rand(d_sae, 1, generator=torch.Generator().manual_seed(5)) + 0.5)
    g = torch.Generator().manual_seed(4)
    dead = None if dead_frac is None else torch.rand(d_sae, generator=g) < dead_frac
    step = FastStep(sae)
    for B in (32, 20, 20):
        x = torch.randn(B, d_in, dtype=torch.float64, generator=g)
        out = sae(x, dead)
        loss = sae.loss(out, 0.3)
        sae.zero_grad()
        loss.backward()
        want = {n: p.grad.clone() for n, p in sae.named_parameters()}
        got = step(x, 0.3, dead)
        assert torch.allclose(got.loss, loss) and torch.allclose(got.mse, out.mse)
        assert torch.allclose(got.sparsity, out.sparsity) and torch.allclose(got.aux, out.aux)
        assert torch.equal(got.fired, sae.fired(out))
        for n, p in sae.named_parameters():
            assert torch.allclose(p.grad, want[n], atol=1e-12), (n, B)
        if sae.arch.aux_loss == "auxk" and dead is not None and dead.any():
            assert got.aux > 0  # the AuxK path really ran


def test_autograd_step_overwrites_grads():
    """The fallback step of archs without a hand-written one: autograd's gradients, not added
    to what .grad held."""
    sae = _random_sae("relu_l1")
    x = torch.randn(8, 16, dtype=torch.float64)
    for p in sae.parameters():
        p.grad = torch.full_like(p, 7.0)
    got = autograd_step(sae, x, 0.3)
    fast = {n: p.grad.clone() for n, p in sae.named_parameters()}
    want = FastStep(sae)(x, 0.3)
    for n, p in sae.named_parameters():
        assert torch.allclose(fast[n], p.grad, atol=1e-12), n
    assert torch.allclose(got.loss, want.loss) and torch.equal(got.fired, want.fired)
