"""The sparse autoencoder, written as its definition: the readable spec the tests compare against.

One module for every architecture in sae/archs.py (`relu_l1`, `relu_l1_v2`, `topk`), with
SAELens' parameter names and shapes. `forward` and `loss` are plain autograd and dense
([B, d_sae] activations); they serve evaluation, resampling and the tests. Training calls the
hand-written step in sae/fast_step.py, which gives the same loss and gradients without autograd.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .archs import Arch, get_arch


@dataclass
class SAEConfig:
    arch: str
    """A row of sae/archs.py's ARCHS: relu_l1 | relu_l1_v2 | topk."""
    d_in: int
    """Width of the activations."""
    d_sae: int
    """Number of features."""
    k: int = 32
    """topk: latents kept per input."""
    k_aux: int | None = None
    """AuxK: dead latents used by the auxiliary loss (None: d_in // 2, as Gao et al.)."""
    aux_coef: float = 1 / 32
    """AuxK: weight of the auxiliary loss."""

    def __post_init__(self) -> None:
        if self.k_aux is None:
            self.k_aux = max(1, self.d_in // 2)


class ForwardOutput(NamedTuple):
    recon: Tensor  # [B, d_in]
    acts: Tensor  # [B, d_sae] feature activations (dense, >= 0)
    mse: Tensor  # mean over the batch of the squared error summed over d_in
    sparsity: Tensor  # mean over the batch of the arch's penalty (0 without one)
    aux: Tensor  # the AuxK loss (0 without AuxK or without a dead mask)


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
        self.cfg = cfg
        self.arch: Arch = get_arch(cfg.arch)
        d_in, d_sae = cfg.d_in, cfg.d_sae
        kw = {"device": device, "dtype": dtype}
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae, **kw))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, **kw))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in, **kw))
        self.b_dec = nn.Parameter(torch.zeros(d_in, **kw))
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        d_in, d_sae = self.cfg.d_in, self.cfg.d_sae
        if self.arch.init == "kaiming_untied":
            # Kaiming-uniform for both, drawn independently (as SAELens' standard SAE).
            bound_enc, bound_dec = 1 / math.sqrt(d_in), 1 / math.sqrt(d_sae)
            W_enc = (torch.rand(d_in, d_sae, generator=gen) * 2 - 1) * bound_enc
            W_dec = (torch.rand(d_sae, d_in, generator=gen) * 2 - 1) * bound_dec
            W_dec /= W_dec.norm(dim=1, keepdim=True)
        else:  # tied: random directions, W_enc = W_dec^T
            W_dec = torch.randn(d_sae, d_in, generator=gen)
            W_dec /= W_dec.norm(dim=1, keepdim=True)
            W_enc = W_dec.t()
        if self.arch.init_decoder_norm != 1.0:
            W_dec *= self.arch.init_decoder_norm  # W_enc of a tied init is a view: scaled too
        self.W_enc.copy_(W_enc)
        self.W_dec.copy_(W_dec)
        self.b_enc.zero_()
        self.b_dec.zero_()

    # -- the definition: x [B, d_in] -> pre-activations -> features -> reconstruction --
    def pre_acts(self, x: Tensor) -> Tensor:
        """[B, d_sae]: (x - b_dec) @ W_enc + b_enc, or x @ W_enc + b_enc without subtract_b_dec."""
        x_in = x - self.b_dec if self.arch.subtract_b_dec else x
        return torch.addmm(self.b_enc, x_in, self.W_enc)

    def activate(self, pre: Tensor) -> Tensor:
        """[B, d_sae] features from pre-activations: the arch's activation."""
        if self.arch.activation == "topk":
            vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter(-1, idx, vals.relu())
        return pre.relu()

    def encode(self, x: Tensor) -> Tensor:
        """Dense feature activations [B, d_sae]."""
        return self.activate(self.pre_acts(x))

    def decode(self, f: Tensor) -> Tensor:
        return torch.addmm(self.b_dec, f, self.W_dec)  # f @ W_dec + b_dec

    def penalty(self, f: Tensor) -> Tensor:
        """[B] each row's sparsity penalty: sum_i f_i (l1), sum_i f_i ||W_dec,i|| (l1_dec_norm;
        the decoder norm is free, so the penalty must see it), 0 (none)."""
        if self.arch.penalty == "l1":
            return f.sum(-1)  # f >= 0, so this is sum |f|
        if self.arch.penalty == "l1_dec_norm":
            return f @ self.W_dec.norm(dim=1)
        return f.new_zeros(f.shape[0])

    def auxk(self, pre: Tensor, resid: Tensor, dead_mask: Tensor) -> Tensor:
        """Gao et al.'s AuxK loss: the top k_aux dead latents reconstruct the main residual
        (detached), mean over the batch of the squared error; multiplying by any() makes it 0
        without a host sync when nothing is dead."""
        k_aux = min(self.cfg.k_aux, self.cfg.d_sae)
        vals, idx = pre.masked_fill(~dead_mask, -math.inf).topk(k_aux, dim=-1, sorted=False)
        f_aux = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
        err = F.mse_loss(f_aux @ self.W_dec, resid.detach(), reduction="sum")
        return err / pre.shape[0] * dead_mask.any()

    def forward(self, x: Tensor, dead_mask: Tensor | None = None) -> ForwardOutput:
        """Everything the loss needs; `dead_mask` [d_sae] bool turns on AuxK (if the arch has it)."""
        B = x.shape[0]
        pre = self.pre_acts(x)
        f = self.activate(pre)
        recon = self.decode(f)
        mse = F.mse_loss(recon, x, reduction="sum") / B
        sparsity = self.penalty(f).sum() / B
        aux = x.new_zeros(())
        if self.arch.aux_loss == "auxk" and dead_mask is not None:
            aux = self.auxk(pre, x - recon, dead_mask)
        return ForwardOutput(recon, f, mse, sparsity, aux)

    def loss(self, out: ForwardOutput, l1_coef: float) -> Tensor:
        loss = out.mse
        if self.arch.penalty != "none":
            loss = loss + l1_coef * out.sparsity
        if self.arch.aux_loss != "none":
            loss = loss + self.cfg.aux_coef * out.aux
        return loss

    def fired(self, out: ForwardOutput) -> Tensor:
        """[d_sae] int64: on how many rows of the batch each feature was > 0."""
        return torch.count_nonzero(out.acts, dim=0)

    # -- the unit-norm decoder constraint (archs with unit_decoder) --
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
