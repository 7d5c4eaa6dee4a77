"""The sparse autoencoders: `relu_l1` (Anthropic 2023), `relu_l1_v2` (Anthropic, April 2024) and
`topk` (Gao et al. 2024), with SAELens' parameter names and shapes.

`forward` is the plain autograd definition (evaluation, resampling, tests). Training calls
`forward_backward`, which computes the same loss and writes the gradients by hand:
- relu archs: exactly the five [B, d_sae]-sized matmuls (encode, decode, dW_dec = f^T g,
  dL/df = g W_dec^T, dW_enc = x^T dL/dpre) into work buffers reused across steps (fresh 64 MB
  blocks would be page-faulted back every step), with biases folded into addmm, ReLU in place, and
  the other [B, d_sae] passes cut to: firing counts and sum f as matrix-vector products, and one
  ReLU-mask pass over dL/df.
- topk: the dense encoder matmul and the top-k selection; everything after touches only the B*k
  kept latents (and the AuxK ones): embedding_bag decoding, sampled products for dL/dvals and
  sparse (CSR) products for the weight gradients.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

Arch = Literal["relu_l1", "relu_l1_v2", "topk"]
ARCHS: tuple[str, ...] = ("relu_l1", "relu_l1_v2", "topk")


@dataclass
class SAEConfig:
    arch: str
    """relu_l1 | relu_l1_v2 | topk"""
    d_in: int
    """width of the activations"""
    d_sae: int
    """number of features"""
    k: int = 32
    """topk: latents kept per input"""
    k_aux: int | None = None
    """topk: dead latents used by the AuxK loss (None: d_in // 2, as Gao et al.)"""
    aux_coef: float = 1 / 32
    """topk: weight of the AuxK loss"""

    def __post_init__(self) -> None:
        if self.k_aux is None:
            self.k_aux = max(1, self.d_in // 2)


class ForwardOutput(NamedTuple):
    recon: Tensor  # [B, d_in]
    acts: Tensor  # relu archs: dense [B, d_sae]; topk: the k kept values [B, k]
    indices: Tensor | None  # topk: [B, k] feature indices; None for relu archs
    mse: Tensor  # mean over batch of squared error summed over d_in
    sparsity: Tensor  # relu_l1: mean_b sum|f|; relu_l1_v2: mean_b sum f_i ||W_dec,i||; topk: 0
    aux: Tensor  # topk AuxK loss (0 when no dead mask given); 0 otherwise


class StepOutput(NamedTuple):
    """What a training step needs besides the gradients (scalars are 0-dim tensors, no sync)."""

    loss: Tensor  # mse + l1_coef * sparsity (+ aux_coef * aux for topk)
    mse: Tensor
    sparsity: Tensor
    aux: Tensor
    fired: Tensor  # [d_sae] int64: on how many rows of the batch each feature was > 0


def _sort_order(keys: Tensor) -> Tensor:
    """Stable argsort of small non-negative int keys. numpy's radix sort is ~20x faster than
    torch.sort on the CPU for the B*k latent indices of a step."""
    if keys.device.type == "cpu":
        return torch.from_numpy(np.argsort(keys.numpy(), kind="stable"))
    return torch.argsort(keys, stable=True)


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # "CSR support is in beta": the ops used here are not
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


class _TopKEncode(torch.autograd.Function):
    """relu(topk((x - b_dec) @ W_enc + b_enc)) with a backward that only touches the kept latents.

    Also returns the AuxK selection (top k_aux pre-activations among dead latents) so that both
    share one encoder matmul and one sparse backward. x itself gets no gradient.
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, k: int, dead_mask, k_aux: int):
        x_c = x - b_dec
        pre = torch.addmm(b_enc, x_c, W_enc)
        vals, idx = pre.topk(k, dim=-1, sorted=False)
        vals = vals.relu()
        if dead_mask is not None:
            # pre is not needed any more: reuse its memory for the masked copy.
            aux_vals, aux_idx = pre.masked_fill_(~dead_mask, -math.inf).topk(
                k_aux, dim=-1, sorted=False
            )
            aux_vals = aux_vals.relu()
        else:
            aux_vals = aux_idx = None
        ctx.save_for_backward(x_c, W_enc, idx, vals, aux_idx, aux_vals)
        ctx.mark_non_differentiable(idx)
        if aux_idx is not None:
            ctx.mark_non_differentiable(aux_idx)
        return vals, idx, aux_vals, aux_idx

    @staticmethod
    def backward(ctx, g_vals, _g_idx, g_aux, _g_aux_idx):
        x_c, W_enc, idx, vals, aux_idx, aux_vals = ctx.saved_tensors
        if ctx.needs_input_grad[0]:
            raise RuntimeError("_TopKEncode does not propagate gradients to x")
        g = g_vals * (vals > 0)
        if aux_idx is not None and g_aux is not None:
            g = torch.cat([g, g_aux * (aux_vals > 0)], dim=1)
            idx = torch.cat([idx, aux_idx], dim=1)
        B, kk = idx.shape
        d_sae = W_enc.shape[1]
        flat_idx, flat_g = idx.reshape(-1), g.reshape(-1)
        g_b_enc = torch.zeros(d_sae, dtype=g.dtype, device=g.device).index_add_(0, flat_idx, flat_g)
        rows = torch.arange(B, device=g.device).repeat_interleave(kk)
        G = torch.sparse_coo_tensor(
            torch.stack([flat_idx, rows]), flat_g, (d_sae, B), check_invariants=False
        )
        g_W_enc = torch.sparse.mm(G, x_c).t().contiguous()  # [d_in, d_sae]
        g_b_dec = -(W_enc @ g_b_enc)
        return None, g_W_enc, g_b_enc, g_b_dec, None, None, None


def geometric_median(x: Tensor, iters: int = 100, eps: float = 1e-8, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the summed Euclidean distance to rows of x."""
    x = x.double()
    y = x.mean(0)
    for _ in range(iters):
        w = 1 / (x - y).norm(dim=1).clamp_min(eps)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        moved = (y_new - y).norm() / y.norm().clamp_min(eps)
        y = y_new
        if moved < tol:
            break
    return y.float()


class SAE(nn.Module):
    def __init__(
        self,
        cfg: SAEConfig,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ):
        super().__init__()
        if cfg.arch not in ARCHS:
            raise ValueError(f"unknown arch {cfg.arch!r}; choose one of {ARCHS}")
        self.cfg = cfg
        d_in, d_sae = cfg.d_in, cfg.d_sae
        kw = {"device": device, "dtype": dtype}
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae, **kw))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, **kw))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in, **kw))
        self.b_dec = nn.Parameter(torch.zeros(d_in, **kw))
        self._work: dict[str, Tensor] = {}  # forward_backward's buffers (not part of the state)
        self.reset_parameters(seed)

    @property
    def unit_decoder(self) -> bool:
        """relu_l1 and topk keep decoder rows at unit norm; relu_l1_v2 penalises their norm instead."""
        return self.cfg.arch != "relu_l1_v2"

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        d_in, d_sae = self.cfg.d_in, self.cfg.d_sae
        if self.cfg.arch == "relu_l1":
            # Untied, kaiming-uniform for both (as SAELens' standard SAE), decoder rows then
            # normalised to unit norm.
            bound_enc, bound_dec = 1 / math.sqrt(d_in), 1 / math.sqrt(d_sae)
            W_enc = (torch.rand(d_in, d_sae, generator=gen) * 2 - 1) * bound_enc
            W_dec = (torch.rand(d_sae, d_in, generator=gen) * 2 - 1) * bound_dec
            W_dec /= W_dec.norm(dim=1, keepdim=True)
        else:
            # Random directions; v2: norm 0.1 (Anthropic April 2024); topk: unit norm. W_enc = W_dec^T.
            W_dec = torch.randn(d_sae, d_in, generator=gen)
            W_dec /= W_dec.norm(dim=1, keepdim=True)
            if self.cfg.arch == "relu_l1_v2":
                W_dec *= 0.1
            W_enc = W_dec.t()
        self.W_enc.copy_(W_enc)
        self.W_dec.copy_(W_dec)
        self.b_enc.zero_()
        self.b_dec.zero_()

    def _pre(self, x: Tensor) -> Tensor:
        if self.cfg.arch == "relu_l1_v2":
            return torch.addmm(self.b_enc, x, self.W_enc)
        # == (x - b_dec) @ W_enc + b_enc; see the module docstring.
        return torch.addmm(self.b_enc - self.b_dec @ self.W_enc, x, self.W_enc)

    def encode(self, x: Tensor) -> Tensor:
        """Dense feature activations [B, d_sae]."""
        if self.cfg.arch != "topk":
            return F.relu(self._pre(x))
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())

    def decode(self, f: Tensor) -> Tensor:
        return f @ self.W_dec + self.b_dec

    def forward(self, x: Tensor, dead_mask: Tensor | None = None) -> ForwardOutput:
        B = x.shape[0]
        zero = x.new_zeros(())
        if self.cfg.arch == "topk":
            k_aux = min(self.cfg.k_aux, self.cfg.d_sae)
            vals, idx, aux_vals, aux_idx = _TopKEncode.apply(
                x, self.W_enc, self.b_enc, self.b_dec, self.cfg.k, dead_mask, k_aux
            )
            recon = F.embedding_bag(idx, self.W_dec, per_sample_weights=vals, mode="sum")
            recon = recon + self.b_dec
            mse = F.mse_loss(recon, x, reduction="sum") / B
            aux = zero
            if dead_mask is not None:
                # Gao et al.: reconstruct the main residual from the top dead latents; multiplying
                # by any() zeroes it (no host sync) when nothing is dead.
                resid = (x - recon).detach()
                aux_recon = F.embedding_bag(
                    aux_idx, self.W_dec, per_sample_weights=aux_vals, mode="sum"
                )
                aux = F.mse_loss(aux_recon, resid, reduction="sum") / B * dead_mask.any()
            return ForwardOutput(recon, vals, idx, mse, zero, aux)
        f = F.relu(self._pre(x), inplace=True)  # saves a [B, d_sae] allocation
        recon = torch.addmm(self.b_dec, f, self.W_dec)
        mse = F.mse_loss(recon, x, reduction="sum") / B
        if self.cfg.arch == "relu_l1":
            sparsity = f.sum() / B  # f >= 0, so this is sum |f|
        else:
            sparsity = (f @ self.W_dec.norm(dim=1)).sum() / B
        return ForwardOutput(recon, f, None, mse, sparsity, zero)

    # -- training: loss and gradients without autograd --
    def _buf(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype | None = None, fill=None
    ) -> Tensor:
        """A work buffer kept across calls (re-made when the shape, dtype or device changes)."""
        t = self._work.get(name)
        W = self.W_enc
        dtype = dtype or W.dtype
        if t is None or t.shape != shape or t.dtype != dtype or t.device != W.device:
            t = self._work[name] = torch.empty(shape, dtype=dtype, device=W.device)
            if fill is not None:
                t.fill_(fill)
        return t

    @torch.no_grad()
    def forward_backward(
        self, x: Tensor, l1_coef: float = 0.0, dead_mask: Tensor | None = None
    ) -> StepOutput:
        """One training step's loss, with every parameter's .grad set (overwritten, not added to).

        Equal to `self.loss(self(x, dead_mask), l1_coef).backward()` (tests/test_sae.py) but
        without autograd; see the module docstring. x gets no gradient.
        """
        for p in self.parameters():
            if p.grad is None or p.grad.shape != p.shape:
                p.grad = torch.empty_like(p)
        if self.cfg.arch == "topk":
            return self._topk_step(x, dead_mask)
        return self._relu_step(x, l1_coef)

    def _relu_step(self, x: Tensor, l1_coef: float) -> StepOutput:
        B, m = x.shape[0], self.cfg.d_sae
        W_enc, b_enc, W_dec, b_dec = self.W_enc, self.b_enc, self.W_dec, self.b_dec
        v2 = self.cfg.arch == "relu_l1_v2"
        ones = self._buf("ones", (B,), fill=1.0)
        x_in = x if v2 else torch.sub(x, b_dec, out=self._buf("x_in", tuple(x.shape)))
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
        if v2:
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
        if not v2:  # pre = (x - b_dec) @ W_enc + b_enc
            b_dec.grad.addmv_(W_enc, b_enc.grad, alpha=-1)
        return StepOutput(mse + l1_coef * sparsity, mse, sparsity, x.new_zeros(()), fired)

    def _aux_select(self, pre: Tensor, dead_mask: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
        """AuxK: the top k_aux pre-activations among dead latents (relu'd values, indices, and a
        0/1 factor that zeroes the loss when nothing is dead), or None if surely nothing is dead.
        Overwrites `pre` on non-CPU devices."""
        k_aux = min(self.cfg.k_aux, self.cfg.d_sae)
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

    def _topk_step(self, x: Tensor, dead_mask: Tensor | None) -> StepOutput:
        B, m, k = x.shape[0], self.cfg.d_sae, self.cfg.k
        W_enc, b_enc, W_dec, b_dec = self.W_enc, self.b_enc, self.W_dec, self.b_dec
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
        sel = self._aux_select(pre, dead_mask) if dead_mask is not None else None
        # One sparse problem over R rows: the batch's kept latents, then (with AuxK) its dead ones.
        # Row r has latents idx_r with values a_r; its dL/drecon is g_r and its encoder input x_r.
        counts = [torch.full((B,), k, device=x.device)]
        cols, acts = [idx.reshape(-1)], [vals.reshape(-1)]
        if sel is not None:
            a_vals, a_idx, on = sel
            # aux_recon - (x - recon): Gao et al.'s AuxK reconstructs the detached main residual.
            a_err = F.embedding_bag(a_idx, W_dec, per_sample_weights=a_vals, mode="sum").add_(err)
            aux = torch.dot(a_err.view(-1), a_err.view(-1)) / B * on
            g_rows = torch.cat([err * (2 / B), a_err.mul_(on * (2 * self.cfg.aux_coef / B))])
            x_rows = torch.cat([x_c, x_c])
            counts.append(torch.full((B,), a_idx.shape[1], device=x.device))
            cols.append(a_idx.reshape(-1))
            acts.append(a_vals.reshape(-1))
        else:
            g_rows, x_rows = err.mul_(2 / B), x_c
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
        g_dec = W_dec.grad if cd == W_dec.dtype else self._buf("g_dec", (m, x.shape[1]), cd)
        torch.addmm(g_dec, S_act, g_rows, beta=0, out=g_dec)
        if g_dec is not W_dec.grad:
            W_dec.grad.copy_(g_dec)
        S_g = _csr(crow_t, row_t, g_act[order], (m, R))
        g_enc_t = self._buf("g_enc_t", (m, x.shape[1]), cd)
        torch.addmm(g_enc_t, S_g, x_rows, beta=0, out=g_enc_t)
        W_enc.grad.copy_(g_enc_t.t())
        b_enc.grad.copy_(g_act.new_zeros(m).index_add_(0, col, g_act))
        b_dec.grad.copy_(g_rows[:B].sum(0))
        b_dec.grad.addmv_(W_enc, b_enc.grad, alpha=-1)
        return StepOutput(mse + self.cfg.aux_coef * aux, mse, zero, aux, fired)

    def loss(self, out: ForwardOutput, l1_coef: float) -> Tensor:
        if self.cfg.arch == "topk":
            return out.mse + self.cfg.aux_coef * out.aux
        return out.mse + l1_coef * out.sparsity

    def fired(self, out: ForwardOutput) -> Tensor:
        """[d_sae] int64: on how many rows of the batch each feature was > 0."""
        if out.indices is None:
            return torch.count_nonzero(out.acts, dim=0)
        counts = torch.zeros(self.cfg.d_sae, dtype=torch.int64, device=out.acts.device)
        return counts.index_add_(0, out.indices.reshape(-1), (out.acts > 0).reshape(-1).long())

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project out the gradient component along each (unit) decoder row before the step."""
        g, w = self.W_dec.grad, self.W_dec
        if g is not None:
            # Row-wise dots as a batched matmul: no [d_sae, d_in] temporaries.
            dots = torch.bmm(g.unsqueeze(1), w.unsqueeze(2)).view(-1, 1)
            g.addcmul_(dots, w, value=-1)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        # Rows already unit norm to within 1e-6 are left untouched, so a row that got no update
        # (a dead feature) stays bitwise equal instead of drifting by float rounding.
        norm = self.W_dec.norm(dim=1, keepdim=True)
        self.W_dec.div_(torch.where((norm - 1).abs() < 1e-6, 1.0, norm.clamp_min(1e-12)))
