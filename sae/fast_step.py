"""The training step: sae/model.py's loss and every parameter's gradient, written by hand.

`FastStep(sae)(x, l1_coef, dead_mask)` equals `sae.loss(sae(x, dead_mask), l1_coef).backward()`
(tests/test_sae.py) without autograd, picking the step by the arch's fields:
- relu activation, l1 or l1_dec_norm penalty: exactly the five [B, d_sae]-sized matmuls (encode,
  decode, dW_dec = f^T g, dL/df = g W_dec^T, dW_enc = x^T dL/dpre) into work buffers reused across
  steps (fresh [B, d_sae] blocks would be page-faulted back every step), with biases folded into
  addmm, ReLU in place, and the other [B, d_sae] passes cut to: firing counts and sum f as
  matrix-vector products, and one ReLU-mask pass over dL/df.
- topk activation: the dense encoder matmul and the top-k selection; everything after touches
  only the B*k kept latents (and the AuxK ones): embedding_bag decoding, sampled products for
  dL/dvals and sparse (CSR) products for the weight gradients.
- any other arch: `autograd_step`, the definition differentiated by autograd.
Why each trick pays is measured in docs/benchmarks.md.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .archs import Arch
from .model import SAE


class StepOutput(NamedTuple):
    """What a training step needs besides the gradients (scalars are 0-dim tensors, no sync)."""

    loss: Tensor  # mse + l1_coef * sparsity + aux_coef * aux (the terms the arch has)
    mse: Tensor
    sparsity: Tensor
    aux: Tensor
    fired: Tensor  # [d_sae] int64: on how many rows of the batch each feature was > 0


def autograd_step(
    sae: SAE, x: Tensor, l1_coef: float = 0.0, dead_mask: Tensor | None = None
) -> StepOutput:
    """The definition differentiated by autograd; every .grad overwritten, not added to."""
    params = list(sae.parameters())
    with torch.enable_grad():
        out = sae(x, dead_mask)
        loss = sae.loss(out, l1_coef)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    for p, g in zip(params, grads, strict=True):
        p.grad = torch.zeros_like(p) if g is None else g
    d = [t.detach() for t in (loss, out.mse, out.sparsity, out.aux)]
    return StepOutput(*d, sae.fired(out))


def _sort_order(keys: Tensor) -> Tensor:
    """Stable argsort of small non-negative int keys: on the CPU numpy's (a radix sort), much
    faster than torch.sort for the B*k latent indices of a step."""
    if keys.device.type == "cpu":
        return torch.from_numpy(np.argsort(keys.numpy(), kind="stable"))
    return torch.argsort(keys, stable=True)


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # "CSR support is in beta": the ops used here are not
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def has_fast_step(arch: Arch) -> bool:
    """Whether FastStep has a hand-written step for this arch (else it runs autograd_step)."""
    if arch.activation == "relu":
        return arch.penalty in ("l1", "l1_dec_norm") and arch.aux_loss == "none"
    if arch.activation == "topk":
        return arch.penalty == "none" and arch.subtract_b_dec
    return False


class FastStep:
    """One SAE's training step (see the module docstring), with its work buffers."""

    def __init__(self, sae: SAE):
        self.sae = sae
        self._work: dict[str, Tensor] = {}  # buffers kept across calls (not part of the state)
        self._step: Callable[[Tensor, float, Tensor | None], StepOutput]
        if not has_fast_step(sae.arch):
            self._step = lambda x, l1, dead: autograd_step(sae, x, l1, dead)
        elif sae.arch.activation == "topk":
            self._step = self._topk_step
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

    def _relu_step(self, x: Tensor, l1_coef: float, dead_mask: Tensor | None) -> StepOutput:
        sae = self.sae
        B, m = x.shape[0], sae.cfg.d_sae
        W_enc, b_enc, W_dec, b_dec = sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec
        sub = sae.arch.subtract_b_dec
        ones = self._buf("ones", (B,), fill=1.0)
        x_in = torch.sub(x, b_dec, out=self._buf("x_in", tuple(x.shape))) if sub else x
        f = torch.addmm(b_enc, x_in, W_enc, out=self._buf("f", (B, m))).relu_()
        err = torch.addmm(b_dec, f, W_dec, out=self._buf("err", tuple(x.shape))).sub_(x)
        mse = torch.dot(err.view(-1), err.view(-1)) / B
        g = err.mul_(2 / B)  # dL/drecon
        f_sum = torch.mv(f.t(), ones)  # per feature, sum over the batch
        # f >= 0, so sign(f) is the firing mask; g_pre's buffer holds it until dL/df
        s = torch.sign(f, out=self._buf("g_pre", (B, m)))
        if f.dtype == torch.bfloat16:  # 8-bit mantissa: counts above 256 would round
            fired = (f > 0).sum(0)
        else:
            fired = torch.mv(s.t(), ones).long()
        g_pre = s
        torch.mm(f.t(), g, out=W_dec.grad)
        if sae.arch.penalty == "l1_dec_norm":
            norms = W_dec.norm(dim=1)
            sparsity = (f_sum @ norms) / B
            # d/dW_dec of sum_i f_i ||W_dec,i||; dL/df = g W_dec^T + l1 ||W_dec,i|| / B
            W_dec.grad.addcmul_((f_sum * (l1_coef / B) / norms.clamp_min(1e-12))[:, None], W_dec)
            torch.addmm(norms * (l1_coef / B), g, W_dec.t(), out=g_pre)
        else:
            sparsity = f_sum.sum() / B
            # dL/df = g W_dec^T + l1/B. g_pre still holds s = sign(f); the GEMM's beta adds
            # (l1/B) * s in place of a broadcast copy of the bias (a [B, d_sae] pass): where
            # f > 0 that is l1/B, and elsewhere the ReLU mask below zeroes it anyway.
            g_pre.addmm_(g, W_dec.t(), beta=l1_coef / B)
        torch.ops.aten.threshold_backward.grad_input(g_pre, f, 0, grad_input=g_pre)  # dL/dpre
        torch.mm(x_in.t(), g_pre, out=W_enc.grad)
        torch.mv(g_pre.t(), ones, out=b_enc.grad)
        torch.sum(g, 0, out=b_dec.grad)
        if sub:  # pre = (x - b_dec) @ W_enc + b_enc
            b_dec.grad.addmv_(W_enc, b_enc.grad, alpha=-1)
        return StepOutput(mse + l1_coef * sparsity, mse, sparsity, x.new_zeros(()), fired)

    def _aux_select(self, pre: Tensor, dead_mask: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
        """AuxK: the top k_aux pre-activations among dead latents (relu'd values, indices, and a
        0/1 factor that zeroes the loss when nothing is dead), or None if surely nothing is dead.
        Overwrites `pre` on non-CPU devices."""
        k_aux = min(self.sae.cfg.k_aux, self.sae.cfg.d_sae)
        if pre.device.type == "cpu":
            # Reading the dead count costs no device sync on the CPU; it lets the top-k run over
            # the dead columns only (usually few).
            dead_idx = dead_mask.nonzero().squeeze(1)
            ka = min(k_aux, len(dead_idx))
            if ka == 0:
                return None
            vals, i = pre.index_select(1, dead_idx).topk(ka, dim=1, sorted=False)
            return vals.relu_(), dead_idx[i], pre.new_ones(())
        vals, idx = pre.masked_fill_(~dead_mask, -math.inf).topk(k_aux, dim=1, sorted=False)
        return vals.relu_(), idx, dead_mask.any().to(pre.dtype)

    def _topk_step(self, x: Tensor, l1_coef: float, dead_mask: Tensor | None) -> StepOutput:
        sae = self.sae
        B, m, k = x.shape[0], sae.cfg.d_sae, sae.cfg.k
        W_enc, b_enc, W_dec, b_dec = sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec
        zero = x.new_zeros(())
        x_c = torch.sub(x, b_dec, out=self._buf("x_in", tuple(x.shape)))
        pre = torch.addmm(b_enc, x_c, W_enc, out=self._buf("pre", (B, m)))
        vals, idx = pre.topk(k, dim=1, sorted=False)
        vals.relu_()
        fired = torch.zeros(m, dtype=torch.int64, device=x.device)
        fired.index_add_(0, idx.reshape(-1), (vals > 0).reshape(-1).long())
        err = F.embedding_bag(idx, W_dec, per_sample_weights=vals, mode="sum").add_(b_dec).sub_(x)
        mse = torch.dot(err.view(-1), err.view(-1)) / B
        aux = zero
        use_aux = dead_mask is not None and sae.arch.aux_loss == "auxk"
        sel = self._aux_select(pre, dead_mask) if use_aux else None
        # One sparse problem over R rows: the batch's kept latents, then (with AuxK) its dead ones.
        # Row r has latents idx_r with values a_r; its dL/drecon is g_r and its encoder input x_r.
        counts = [torch.full((B,), k, device=x.device)]
        cols, acts = [idx.reshape(-1)], [vals.reshape(-1)]
        if sel is not None:
            a_vals, a_idx, on = sel
            # aux_recon - (x - recon): Gao et al.'s AuxK reconstructs the detached main residual.
            a_err = F.embedding_bag(a_idx, W_dec, per_sample_weights=a_vals, mode="sum").add_(err)
            aux = torch.dot(a_err.view(-1), a_err.view(-1)) / B * on
            g_rows = torch.cat([err * (2 / B), a_err.mul_(on * (2 * sae.cfg.aux_coef / B))])
            x_rows = torch.cat([x_c, x_c])
            counts.append(torch.full((B,), a_idx.shape[1], device=x.device))
            cols.append(a_idx.reshape(-1))
            acts.append(a_vals.reshape(-1))
        else:
            g_rows, x_rows = err.mul_(2 / B), x_c
        self._topk_grads(B, m, counts, cols, acts, g_rows, x_rows)
        return StepOutput(mse + sae.cfg.aux_coef * aux, mse, zero, aux, fired)

    def _topk_grads(
        self,
        B: int,
        m: int,
        counts: list[Tensor],
        cols: list[Tensor],
        acts: list[Tensor],
        g_rows: Tensor,
        x_rows: Tensor,
    ) -> None:
        """The weight gradients of the topk step's sparse problem (R rows, latents `cols` with
        values `acts`, dL/drecon `g_rows`, encoder inputs `x_rows`)."""
        sae = self.sae
        W_enc, b_enc, W_dec, b_dec = sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec
        d_in = W_dec.shape[1]
        R = g_rows.shape[0]
        # torch's sparse kernels take float32/64 only: other dtypes (bfloat16) go via float32.
        cd = W_dec.dtype if W_dec.dtype in (torch.float32, torch.float64) else torch.float32
        col, act = torch.cat(cols), torch.cat(acts).to(cd)
        g_rows, x_rows = g_rows.to(cd), x_rows.to(cd)
        row = torch.repeat_interleave(torch.cat(counts))
        crow = F.pad(torch.cumsum(torch.cat(counts), 0), (1, 0))
        S = _csr(crow, col, act, (R, m))
        # dL/da for each kept latent: g_r . W_dec[i], only at the sampled (r, i); ReLU-masked.
        g_act = torch.sparse.sampled_addmm(S, g_rows, W_dec.to(cd).t(), beta=0).values()
        g_act.mul_(act > 0)
        # The transposed pattern (latent-major) for the weight gradients.
        order = _sort_order(col)
        crow_t = F.pad(torch.cumsum(torch.bincount(col, minlength=m), 0), (1, 0))
        row_t = row[order]
        S_act = _csr(crow_t, row_t, act[order], (m, R))
        g_dec = W_dec.grad if cd == W_dec.dtype else self._buf("g_dec", (m, d_in), cd)
        torch.addmm(g_dec, S_act, g_rows, beta=0, out=g_dec)
        if g_dec is not W_dec.grad:
            W_dec.grad.copy_(g_dec)
        S_g = _csr(crow_t, row_t, g_act[order], (m, R))
        g_enc_t = self._buf("g_enc_t", (m, d_in), cd)
        torch.addmm(g_enc_t, S_g, x_rows, beta=0, out=g_enc_t)
        W_enc.grad.copy_(g_enc_t.t())
        b_enc.grad.copy_(g_act.new_zeros(m).index_add_(0, col, g_act))
        b_dec.grad.copy_(g_rows[:B].sum(0))
        b_dec.grad.addmv_(W_enc, b_enc.grad, alpha=-1)
