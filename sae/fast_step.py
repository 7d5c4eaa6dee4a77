"""The training step: sae/model.py's loss and every parameter's gradient, written by hand.

`FastStep(sae)(x, l1_coef, dead_mask)` equals `sae.loss(sae(x, dead_mask), l1_coef).backward()`
(tests/test_sae.py) without autograd, picking the step by the arch's fields:
- relu activation, l1 or l1_dec_norm penalty, dense (while many features fire): exactly the
  five [B, d_sae]-sized matmuls (encode, decode, dW_dec = f^T g, dL/df = g W_dec^T,
  dW_enc = x^T dL/dpre) into work buffers reused across steps (fresh [B, d_sae] blocks would be
  page-faulted back every step), with biases folded into addmm, ReLU in place, and the other
  [B, d_sae] passes cut to: firing counts and sum f as matrix-vector products, and one
  ReLU-mask pass over dL/df.
- the same, sparse (once few fire: `l0_hint` below `SPARSE_BELOW` of d_sae): the dense encoder
  matmul, then only the active entries (sae/sparse_step.py): decoder, dL/df, weight gradients.
- topk activation: the dense encoder matmul and the top-k selection (sparse_step.topk_relu: a
  top k over the best blocks' latents), then only the B*k kept latents (and the AuxK ones), as
  the sparse relu step.
- jumprelu with the L0 penalty: the dense relu step's matmuls, plus one pass for the threshold's
  straight-through estimator (float32 matmuls only; with a lower matmul dtype, autograd).
- any other arch (batchtopk, matryoshka, gated): `autograd_step`, the definition differentiated
  by autograd.
With `matmul_dtype` (bfloat16) the dense matmuls run in that dtype from copies of the weights,
autocast-style; the parameters, their gradients, the loss and the sparse products stay in the
parameters' dtype, the firing counts are integers. Why each trick pays: docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from . import sparse_step as sp
from .archs import Arch
from .model import SAE

# Fraction of a relu SAE's features active per row (L0 / d_sae) below which the sparse step is
# faster than the dense one, by the dtype of the dense matmuls: measured on a 2-core AVX-512
# CPU (`python -m saekit.scripts.bench.train --crossover`, docs/benchmarks.md).
SPARSE_BELOW = {torch.float32: 0.06, torch.float64: 0.06, torch.bfloat16: 0.035}


class StepOutput(NamedTuple):
    """What a training step needs besides the gradients (scalars are 0-dim tensors, no sync)."""

    loss: Tensor  # mse + l1_coef * sparsity + aux_coef * aux (the terms the arch has)
    mse: Tensor
    sparsity: Tensor
    aux: Tensor
    fired: Tensor  # [d_sae] int64: on how many rows of the batch each feature was > 0
    min_kept: Tensor | None = None  # batchtopk: the smallest activation the batch kept (inf: none)


def autograd_step(
    sae: SAE,
    x: Tensor,
    l1_coef: float = 0.0,
    dead_mask: Tensor | None = None,
    matmul_dtype: torch.dtype | None = None,
) -> StepOutput:
    """The definition differentiated by autograd; every .grad overwritten, not added to. With
    a `matmul_dtype` other than the parameters', under torch.autocast (its matmuls in that
    dtype, its losses in float32)."""
    params = list(sae.parameters())
    low = matmul_dtype is not None and matmul_dtype != sae.W_enc.dtype
    autocast = torch.autocast(x.device.type, matmul_dtype) if low else contextlib.nullcontext()
    with torch.enable_grad():
        with autocast:
            out = sae(x, dead_mask)
            loss = sae.loss(out, l1_coef)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    for p, g in zip(params, grads, strict=True):
        p.grad = torch.zeros_like(p) if g is None else g.to(p.dtype)
    d = [t.detach().to(sae.W_enc.dtype) for t in (loss, out.mse, out.sparsity, out.aux)]
    return StepOutput(*d, sae.fired(out), min_kept(sae, out.acts.detach().to(sae.W_enc.dtype)))


def min_kept(sae: SAE, acts: Tensor) -> Tensor | None:
    """The smallest activation > 0 in acts (inf if none) for archs that estimate a threshold
    from it (batchtopk), else None; a device tensor, no host sync."""
    if sae.arch.threshold != "estimated":
        return None
    return torch.where(acts > 0, acts, math.inf).amin()


def has_fast_step(arch: Arch) -> bool:
    """Whether FastStep has a hand-written step for this arch (else it runs autograd_step)."""
    if arch.activation == "relu":
        return arch.penalty in ("l1", "l1_dec_norm") and arch.aux_loss == "none"
    if arch.activation == "topk":
        return arch.penalty == "none" and arch.subtract_b_dec
    if arch.activation == "jumprelu":
        return arch.penalty == "l0" and arch.aux_loss == "none"
    return False


class FastStep:
    """One SAE's training step (see the module docstring), with its work buffers.

    `matmul_dtype`: the dtype of the dense matmuls (None: the parameters'). `sparse`: for relu
    archs, "auto" runs the sparse step when `l0_hint` (the expected active features per row,
    which the trainer sets from its last density window; None: unknown) is below
    SPARSE_BELOW * d_sae, "always" and "never" force one (tests, benchmarks)."""

    def __init__(
        self,
        sae: SAE,
        matmul_dtype: torch.dtype | None = None,
        sparse: Literal["auto", "always", "never"] = "auto",
    ):
        self.sae = sae
        self.mm_dtype = matmul_dtype or sae.W_enc.dtype
        self.cd = sp.compute_dtype(sae.W_enc.dtype)  # the sparse products' dtype
        self.sparse = sparse
        self.l0_hint: float | None = None
        # Called with the step's pre-activations [B, d_sae] before anything overwrites them
        # (the trainer's mechanism checks, on the steps that close a density window).
        self.pre_tap: Callable[[Tensor], None] | None = None
        self.calls = self.sparse_calls = 0  # relu steps run, and how many of them sparse
        self._work: dict[str, Tensor] = {}  # buffers kept across calls (not part of the state)
        self._step: Callable[[Tensor, float, Tensor | None], StepOutput]
        if not has_fast_step(sae.arch):
            self._step = self._autograd
        elif sae.arch.activation == "topk":
            self._step = self._topk_step
        elif sae.arch.activation == "jumprelu" and self.mm_dtype != sae.W_enc.dtype:
            # its hand-written step has no lower-precision matmuls: autocast autograd instead
            self._step = self._autograd
        elif sae.arch.activation == "jumprelu":
            self._step = self._jumprelu_step
        else:
            self._step = self._relu_step

    @torch.no_grad()
    def __call__(
        self, x: Tensor, l1_coef: float = 0.0, dead_mask: Tensor | None = None
    ) -> StepOutput:
        """One training step's loss, with every parameter's .grad set (overwritten, not added
        to). x gets no gradient; `dead_mask` [d_sae] bool turns on AuxK (if the arch has it)."""
        for p in self.sae.parameters():
            if p.grad is None or p.grad.shape != p.shape:
                p.grad = torch.empty_like(p)
        return self._step(x, l1_coef, dead_mask)

    def _autograd(self, x: Tensor, l1_coef: float, dead_mask: Tensor | None) -> StepOutput:
        if self.pre_tap is not None:  # the forward keeps no pre-activations: one more encoder pass
            self.pre_tap(self.sae.pre_acts(x))
        return autograd_step(self.sae, x, l1_coef, dead_mask, self.mm_dtype)

    def uses_sparse(self) -> bool:
        """Whether the next relu step runs sparse."""
        if self.sparse != "auto":
            return self.sparse == "always"
        limit = SPARSE_BELOW.get(self.mm_dtype, 0.0) * self.sae.cfg.d_sae
        return self.l0_hint is not None and self.l0_hint < limit

    def _buf(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype | None = None, fill=None
    ) -> Tensor:
        """A work buffer kept across calls (re-made when the shape, dtype or device changes)."""
        t = self._work.get(name)
        W = self.sae.W_enc
        dtype = dtype or W.dtype
        if t is None or t.shape != shape or t.dtype != dtype or t.device != W.device:
            t = self._work[name] = torch.empty(shape, dtype=dtype, device=W.device)
            if fill is not None:
                t.fill_(fill)
        return t

    def _mm(self, name: str, t: Tensor) -> Tensor:
        """`t` in the matmul dtype (a copy into a work buffer if it is not already)."""
        if t.dtype == self.mm_dtype:
            return t
        return self._buf(f"mm.{name}", tuple(t.shape), self.mm_dtype).copy_(t)

    def _encode(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The encoder's input x_in (x - b_dec, or x), the same in the matmul dtype, and the
        pre-activations x_in @ W_enc + b_enc [B, d_sae] in the matmul dtype, in a work buffer."""
        sae = self.sae
        x_in = x
        if sae.arch.subtract_b_dec:
            x_in = torch.sub(x, sae.b_dec, out=self._buf("x_in", tuple(x.shape)))
        shape = (x.shape[0], sae.cfg.d_sae)
        pre = self._buf("pre", shape, self.mm_dtype)
        if self.mm_dtype == sae.W_enc.dtype:
            x_m = x_in
            torch.addmm(sae.b_enc, x_m, sae.W_enc, out=pre)
        else:
            x_m = self._encode_low(x_in, pre)
        if self.pre_tap is not None:
            self.pre_tap(pre)
        return x_in, x_m, pre

    def _encode_low(self, x_in: Tensor, pre: Tensor) -> Tensor:
        """Lower-precision matmuls: pre = [x_in, 1, 0...] @ [W_enc; b_enc; 0...], the bias folded
        into the matmul (bitwise addmm's result; addmm's bias pass costs more in bfloat16), the
        inner dimension padded to a multiple of 8 for the kernel; the weights are copied into
        the matmul dtype anyway. Returns x_in in the matmul dtype (a view)."""
        sae, md = self.sae, self.mm_dtype
        B, d = x_in.shape
        K = (d + 8) // 8 * 8
        x_aug = self._buf("x_aug", (B, K), md)
        x_aug[:, :d].copy_(x_in)
        x_aug[:, d:].zero_()
        x_aug[:, d].fill_(1.0)
        W_aug = self._buf("W_aug", (K, sae.cfg.d_sae), md)
        W_aug[:d].copy_(sae.W_enc)
        W_aug[d].copy_(sae.b_enc)
        W_aug[d + 1 :].zero_()
        torch.mm(x_aug, W_aug, out=pre)
        return x_aug[:, :d]

    def _relu_step(self, x: Tensor, l1_coef: float, dead_mask: Tensor | None) -> StepOutput:
        x_in, x_m, pre = self._encode(x)
        self.calls += 1
        if self.uses_sparse():
            self.sparse_calls += 1
            return self._relu_sparse(x, x_in, pre, l1_coef)
        return self._relu_dense(x, x_m, pre, l1_coef)

    def _relu_dense(self, x: Tensor, x_m: Tensor, f: Tensor, l1_coef: float) -> StepOutput:
        """The relu step after the encoder, dense: `f` holds the pre-activations, `x_m` the
        encoder's input, both in the matmul dtype."""
        sae = self.sae
        B, m = x.shape[0], sae.cfg.d_sae
        W_enc, b_enc, W_dec, b_dec = sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec
        md, low = self.mm_dtype, self.mm_dtype != W_enc.dtype
        ones = self._buf("ones", (B,), md, fill=1.0)
        f.relu_()
        W_dec_m = self._mm("W_dec", W_dec)
        recon = torch.addmm(self._mm("b_dec", b_dec), f, W_dec_m,
                            out=self._buf("recon", tuple(x.shape), md))  # fmt: skip
        err = (recon.to(x.dtype) if low else recon).sub_(x)  # the loss in the parameters' dtype
        mse = torch.dot(err.view(-1), err.view(-1)) / B
        g = err.mul_(2 / B)  # dL/drecon
        g_m = self._mm("g", g)
        # f >= 0, so sign(f) is the firing mask; g_pre's buffer holds it until dL/df
        s = torch.sign(f, out=self._buf("g_pre", (B, m), md))
        if md not in (torch.float32, torch.float64):
            # bfloat16's 8-bit mantissa would round counts above 256, and sums: count in blocks
            # of 256 rows, sum in float32
            fired = self._block_counts(s)
            f_sum = f.sum(0, dtype=torch.float32).to(W_enc.dtype)
        else:
            fired = torch.mv(s.t(), ones).long()
            f_sum = torch.mv(f.t(), ones)  # per feature, sum over the batch
        g_pre = s
        if low:
            W_dec.grad.copy_(torch.mm(f.t(), g_m, out=self._buf("g_dec", (m, x.shape[1]), md)))
        else:
            torch.mm(f.t(), g_m, out=W_dec.grad)
        if sae.arch.penalty == "l1_dec_norm":
            norms = W_dec.norm(dim=1)
            sparsity = (f_sum @ norms) / B
            # d/dW_dec of sum_i f_i ||W_dec,i||; dL/df = g W_dec^T + l1 ||W_dec,i|| / B
            W_dec.grad.addcmul_((f_sum * (l1_coef / B) / norms.clamp_min(1e-12))[:, None], W_dec)
            torch.addmm(self._mm("norms", norms * (l1_coef / B)), g_m, W_dec_m.t(), out=g_pre)
        else:
            sparsity = f_sum.sum() / B
            # dL/df = g W_dec^T + l1/B. g_pre still holds s = sign(f); the GEMM's beta adds
            # (l1/B) * s in place of a broadcast copy of the bias (a [B, d_sae] pass): where
            # f > 0 that is l1/B, and elsewhere the ReLU mask below zeroes it anyway.
            g_pre.addmm_(g_m, W_dec_m.t(), beta=l1_coef / B)
        torch.ops.aten.threshold_backward.grad_input(g_pre, f, 0, grad_input=g_pre)  # dL/dpre
        if low:
            W_enc.grad.copy_(
                torch.mm(x_m.t(), g_pre, out=self._buf("g_enc", tuple(W_enc.shape), md))
            )
            b_enc.grad.copy_(torch.mv(g_pre.t(), ones))
        else:
            torch.mm(x_m.t(), g_pre, out=W_enc.grad)
            torch.mv(g_pre.t(), ones, out=b_enc.grad)
        torch.sum(g, 0, out=b_dec.grad)
        if sae.arch.subtract_b_dec:  # pre = (x - b_dec) @ W_enc + b_enc
            b_dec.grad.addmv_(W_enc, b_enc.grad, alpha=-1)
        return StepOutput(mse + l1_coef * sparsity, mse, sparsity, x.new_zeros(()), fired)

    def _block_counts(self, s: Tensor) -> Tensor:
        """[m] int64 column sums of a 0/1 matrix [B, m] in bfloat16: each block of 256 rows
        summed by a matmul (exact: at most 256; (s > 0).sum(0) is ~20x slower), then the blocks
        in float32."""
        B, m = s.shape
        n, rest = divmod(B, 256)
        ones = self._buf("ones_block", (max(n, 1), 1, 256), s.dtype, fill=1.0)
        counts = s.new_zeros(m, dtype=torch.float32)
        if n:
            counts += torch.bmm(ones[:n], s[: n * 256].view(n, 256, m)).sum(0, dtype=torch.float32)[
                0
            ]
        if rest:
            counts += torch.mv(s[n * 256 :].t(), ones[0, 0, :rest]).float()
        return counts.long()

    def _relu_sparse(self, x: Tensor, x_in: Tensor, pre: Tensor, l1_coef: float) -> StepOutput:
        """The relu step after the encoder, on the active entries only (f = pre where pre > 0)."""
        sae = self.sae
        B, m, cd = x.shape[0], sae.cfg.d_sae, self.cd
        W_enc, b_enc, W_dec, b_dec = sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec
        a = sp.active_where(pre, cd)
        t = sp.transposed(a, m)
        W_dec_c, x_c, x_in_c = (v.to(cd) for v in (W_dec, x, x_in))
        err = sp.decode(a, W_dec_c).add_(b_dec).sub_(x_c)
        mse = torch.dot(err.view(-1), err.view(-1)) / B
        g = err.mul_(2 / B)  # dL/drecon
        g_act = sp.sampled_dots(a, g, W_dec_c)  # dL/df = g W_dec^T (+ the penalty's below)
        if sae.arch.penalty == "l1_dec_norm":
            norms = W_dec_c.norm(dim=1)
            norms_act = norms.index_select(0, a.col)
            sparsity = torch.dot(a.val, norms_act) / B
            g_act.add_(norms_act, alpha=l1_coef / B)
        else:
            sparsity = a.val.sum() / B
            g_act.add_(l1_coef / B)
        # Every entry has pre > 0: dL/dpre = dL/df there (and 0 elsewhere).
        grads = (W_enc.grad, W_dec.grad, b_enc.grad)
        sp.weight_grads(a, t, g_act, g, x_in_c, grads, self._buf("g_enc_t", (m, x.shape[1]), cd))
        if sae.arch.penalty == "l1_dec_norm":
            f_sum = g_act.new_zeros(m).index_add_(0, a.col, a.val)
            W_dec.grad.addcmul_((f_sum * (l1_coef / B) / norms.clamp_min(1e-12))[:, None], W_dec)
        b_dec.grad.copy_(g.sum(0))
        if sae.arch.subtract_b_dec:
            b_dec.grad.addmv_(W_enc, b_enc.grad, alpha=-1)
        loss = (mse + l1_coef * sparsity).to(W_enc.dtype)
        return StepOutput(loss, mse.to(W_enc.dtype), sparsity.to(W_enc.dtype), x.new_zeros(()),
                          t.per_latent)  # fmt: skip

    def _jumprelu_step(self, x: Tensor, l1_coef: float, dead_mask: Tensor | None) -> StepOutput:
        """JumpReLU with the L0 penalty: the relu step's five matmuls into reused buffers, plus
        one pass for the straight-through estimators' kernel K, which feeds only the threshold:
        dL/dθ_i = -(1/ε) Σ_b K((pre_bi - θ_i)/ε) (θ_i dL/df_bi + λ/B). Assumes θ >= 0, which
        training keeps (SAE.clamp_threshold): then pre > θ is the L0's step and the mask."""
        sae = self.sae
        B, m = x.shape[0], sae.cfg.d_sae
        W_enc, b_enc, W_dec, b_dec = sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec
        theta, eps, sub = sae.threshold, sae.arch.bandwidth, sae.arch.subtract_b_dec
        ones = self._buf("ones", (B,), fill=1.0)
        x_in = torch.sub(x, b_dec, out=self._buf("x_in", tuple(x.shape))) if sub else x
        pre = torch.addmm(b_enc, x_in, W_enc, out=self._buf("pre", (B, m)))
        if self.pre_tap is not None:
            self.pre_tap(pre)
        zero = x.new_zeros(())
        f = torch.where(pre > theta.clamp_min(0), pre, zero, out=self._buf("f", (B, m)))
        mask = torch.sign(f, out=self._buf("mask", (B, m)))  # f >= 0: 1 where it fired
        if f.dtype == torch.bfloat16:  # 8-bit mantissa: counts above 256 would round
            fired = (f > 0).sum(0)
        else:
            fired = torch.mv(mask.t(), ones).long()
        err = torch.addmm(b_dec, f, W_dec, out=self._buf("err", tuple(x.shape))).sub_(x)
        mse = torch.dot(err.view(-1), err.view(-1)) / B
        sparsity = fired.sum().to(mse.dtype) / B
        g = err.mul_(2 / B)  # dL/drecon
        torch.mm(f.t(), g, out=W_dec.grad)
        g_f = torch.mm(g, W_dec.t(), out=f)  # dL/df, in f's buffer (f is no longer needed)
        # K in pre's buffer (pre is no longer needed): 1 where |pre - θ| < ε/2
        near = pre.sub_(theta).div_(eps).abs_().lt_(0.5)
        n_near = torch.mv(near.t(), ones)
        theta.grad.copy_(torch.mv(near.mul_(g_f).t(), ones))  # Σ_b K dL/df
        theta.grad.mul_(theta).add_(n_near, alpha=l1_coef / B).mul_(-1 / eps)
        g_pre = g_f.mul_(mask)  # dL/dpre: the mask's (no estimator to the input)
        torch.mm(x_in.t(), g_pre, out=W_enc.grad)
        torch.mv(g_pre.t(), ones, out=b_enc.grad)
        torch.sum(g, 0, out=b_dec.grad)
        if sub:  # pre = (x - b_dec) @ W_enc + b_enc
            b_dec.grad.addmv_(W_enc, b_enc.grad, alpha=-1)
        return StepOutput(mse + l1_coef * sparsity, mse, sparsity, zero, fired)

    def _aux_select(self, pre: Tensor, dead_mask: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
        """AuxK: the top k_aux pre-activations among dead latents (relu'd values in the sparse
        products' dtype, indices, and a 0/1 factor that zeroes the loss when nothing is dead), or
        None if surely nothing is dead. Overwrites `pre` on non-CPU devices."""
        k_aux = min(self.sae.cfg.k_aux, self.sae.cfg.d_sae)
        if pre.device.type == "cpu":
            # Reading the dead count costs no device sync on the CPU; it lets the top-k run over
            # the dead columns only (usually few).
            dead_idx = dead_mask.nonzero().squeeze(1)
            ka = min(k_aux, len(dead_idx))
            if ka == 0:
                return None
            vals, i = pre.index_select(1, dead_idx).topk(ka, dim=1, sorted=False)
            return vals.to(self.cd).relu_(), dead_idx[i], pre.new_ones((), dtype=self.cd)
        vals, idx = pre.masked_fill_(~dead_mask, -math.inf).topk(k_aux, dim=1, sorted=False)
        return vals.to(self.cd).relu_(), idx, dead_mask.any().to(self.cd)

    def _topk_step(self, x: Tensor, l1_coef: float, dead_mask: Tensor | None) -> StepOutput:
        sae = self.sae
        B, m, k, cd = x.shape[0], sae.cfg.d_sae, sae.cfg.k, self.cd
        W_enc, W_dec, b_dec = sae.W_enc, sae.W_dec, sae.b_dec
        zero = x.new_zeros(())
        x_c, _, pre = self._encode(x)
        vals, idx = sp.topk_relu(pre, k)
        vals = vals.to(cd).relu_()
        fired = torch.zeros(m, dtype=torch.int64, device=x.device)
        fired.index_add_(0, idx.reshape(-1), (vals > 0).reshape(-1).long())
        a = sp.active_topk(idx, vals)
        W_dec_c = W_dec.to(cd)
        err = sp.decode(a, W_dec_c).add_(b_dec).sub_(x)
        mse = torch.dot(err.view(-1), err.view(-1)) / B
        aux = zero
        use_aux = dead_mask is not None and sae.arch.aux_loss == "auxk"
        sel = self._aux_select(pre, dead_mask) if use_aux else None
        # One sparse problem over R rows: the batch's kept latents, then (with AuxK) its dead ones.
        # Row r has latents col with values val; its dL/drecon is g_r and its encoder input x_r.
        if sel is not None:
            a_vals, a_idx, on = sel
            a_aux = sp.active_topk(a_idx, a_vals)
            # aux_recon - (x - recon): Gao et al.'s AuxK reconstructs the detached main residual.
            a_err = sp.decode(a_aux, W_dec_c).add_(err)
            aux = torch.dot(a_err.view(-1), a_err.view(-1)) / B * on
            g_rows = torch.cat([err * (2 / B), a_err.mul_(on * (2 * sae.cfg.aux_coef / B))])
            x_rows = torch.cat([x_c, x_c]).to(cd)
            a = sp.cat_rows(a, a_aux)
        else:
            g_rows, x_rows = err.mul_(2 / B), x_c.to(cd)
        g_act = sp.sampled_dots(a, g_rows, W_dec_c).mul_(a.val > 0)  # dL/dpre: ReLU-masked
        t = sp.transposed(a, m)
        grads = (W_enc.grad, W_dec.grad, sae.b_enc.grad)
        g_enc_t = self._buf("g_enc_t", (m, x.shape[1]), cd)
        sp.weight_grads(a, t, g_act, g_rows, x_rows, grads, g_enc_t)
        b_dec.grad.copy_(g_rows[:B].sum(0))
        b_dec.grad.addmv_(W_enc, sae.b_enc.grad, alpha=-1)
        loss = (mse + sae.cfg.aux_coef * aux).to(W_enc.dtype)
        return StepOutput(loss, mse.to(W_enc.dtype), zero, aux.to(W_enc.dtype), fired)
