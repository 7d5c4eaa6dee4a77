"""The sparse autoencoder, written as its definition: the readable spec the tests compare against.

One module for every architecture in sae/archs.py, with SAELens' parameter names and shapes
(gated keeps the gate's bias in b_enc; it is saved as b_gate). Two passes:
- `forward` and `loss`: the training definition, plain autograd and dense ([B, d_sae]
  activations). BatchTopK keeps the batch's k x B largest activations here.
- `encode`, `decode` and `reconstruct`: the SAE as it is saved and read (SAELens' inference
  SAE): BatchTopK uses the threshold estimated during training instead of the batch top-k.
Training calls sae/fast_step.py, which gives `forward`'s loss and gradients (by hand where it
pays, else by autograd on `forward`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .archs import Arch, get_arch
from .sparse_step import topk_relu


@dataclass
class SAEConfig:
    arch: str
    """A row of sae/archs.py's ARCHS (relu_l1 | relu_l1_v2 | topk | batchtopk | jumprelu |
    gated | matryoshka)."""
    d_in: int
    """Width of the activations."""
    d_sae: int
    """Number of features."""
    k: int = 32
    """topk: latents kept per input; batchtopk: per input on average over the batch."""
    k_aux: int | None = None
    """AuxK: dead latents used by the auxiliary loss (None: d_in // 2, as Gao et al.)."""
    aux_coef: float = 1 / 32
    """AuxK: weight of the auxiliary loss."""
    widths: list[int] | None = None
    """Matryoshka: the nested dictionary widths, increasing to d_sae (None: the arch's
    fractions of d_sae)."""

    def __post_init__(self) -> None:
        if self.k_aux is None:
            self.k_aux = max(1, self.d_in // 2)


def prefix_widths(prefixes: tuple[float, ...], d_sae: int) -> list[int]:
    """The matryoshka widths of d_sae features: each fraction rounded, at least 1, increasing."""
    widths: list[int] = []
    for f in prefixes:
        w = min(d_sae, max(round(f * d_sae), 1))
        if not widths or w > widths[-1]:
            widths.append(w)
    if not widths or widths[-1] != d_sae:
        widths.append(d_sae)
    return widths


class ForwardOutput(NamedTuple):
    recon: Tensor  # [B, d_in]
    acts: Tensor  # [B, d_sae] feature activations (dense, >= 0)
    mse: Tensor  # mean over the batch of the squared error summed over d_in
    sparsity: Tensor  # mean over the batch of the arch's penalty (0 without one)
    aux: Tensor  # the auxiliary loss (0 without one, or for AuxK without a dead mask)
    recon_loss: Tensor  # the reconstruction term of the loss: mse, or matryoshka's prefix mean


class Reconstruction(NamedTuple):
    recon: Tensor  # [B, d_in] in input units
    acts: Tensor  # [B, d_sae] inference feature activations
    pre: Tensor  # [B, d_sae] pre-activations (of the normalised input)


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


def _rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLUFn(torch.autograd.Function):
    """relu(pre) * H(pre - threshold); the threshold's gradient by the straight-through
    estimator of Rajamanoharan et al. 2024b: -(threshold / eps) K((pre - threshold) / eps),
    K the rectangle kernel; pre's gradient is the mask's (no estimator to the input)."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        mask = (pre > threshold) & (pre > 0)
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * mask

    @staticmethod
    def backward(ctx, g: Tensor):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        g_pre = g * ((pre > threshold) & (pre > 0))
        g_thr = None
        if ctx.needs_input_grad[1]:
            g_thr = (-(threshold / eps) * _rectangle((pre - threshold) / eps) * g).sum(0)
        return g_pre, g_thr, None


class StepFn(torch.autograd.Function):
    """H(pre - threshold), the L0 of a JumpReLU feature; its threshold gradient by the
    straight-through estimator -(1 / eps) K((pre - threshold) / eps); none to pre."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        g_thr = (-(1 / eps) * _rectangle((pre - threshold) / eps) * g).sum(0)
        return None, g_thr, None


Normalize = Literal["none", "layer_norm", "constant_norm_rescale"]


class SAE(nn.Module):
    def __init__(
        self,
        cfg: SAEConfig,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        arch: Arch | None = None,
    ):
        """`arch`: a row to use instead of cfg.arch's (a saved SAE whose b_dec handling no row
        has, sae/archs.py's saved_arch)."""
        super().__init__()
        self.cfg = cfg
        self.arch: Arch = arch or get_arch(cfg.arch)
        self.widths = cfg.widths or prefix_widths(self.arch.prefixes, cfg.d_sae)
        # Per-row input normalisation of SAEs read from SAELens (never trained by saekit).
        self.normalize: Normalize = "none"
        d_in, d_sae = cfg.d_in, cfg.d_sae
        kw = {"device": device, "dtype": dtype}
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae, **kw))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, **kw))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in, **kw))
        self.b_dec = nn.Parameter(torch.zeros(d_in, **kw))
        if self.arch.threshold == "trained":
            self.threshold = nn.Parameter(torch.zeros(d_sae, **kw))
        elif self.arch.threshold == "estimated":
            self.register_buffer("threshold", torch.zeros(d_sae, **kw))
        if self.arch.activation == "gated":
            self.r_mag = nn.Parameter(torch.zeros(d_sae, **kw))
            self.b_mag = nn.Parameter(torch.zeros(d_sae, **kw))
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
        for name in self.extra_tensors():
            getattr(self, name).fill_(self.feature_init().get(name, 0.0))

    def extra_tensors(self) -> list[str]:
        """The per-feature tensors besides W_enc, b_enc, W_dec (saved under these names)."""
        names = ["threshold"] if self.arch.threshold != "none" else []
        return names + (["r_mag", "b_mag"] if self.arch.activation == "gated" else [])

    def feature_init(self) -> dict[str, float]:
        """The per-feature parameters besides W_enc, b_enc, W_dec, and each one's initial value
        (what resampling resets them to); an estimated threshold is a buffer, not here."""
        init = {}
        if self.arch.threshold == "trained":
            init["threshold"] = self.arch.threshold_init
        if self.arch.activation == "gated":
            init.update(r_mag=0.0, b_mag=0.0)
        return init

    # -- the definition: x [B, d_in] -> pre-activations -> features -> reconstruction --
    def pre_acts(self, x: Tensor) -> Tensor:
        """[B, d_sae]: (x - b_dec) @ W_enc + b_enc, or x @ W_enc + b_enc without subtract_b_dec
        (gated: the gate's pre-activation). `x` of any float dtype is cast to the SAE's (a float64
        SAE on float32 activations)."""
        x = x.to(self.W_enc.dtype)
        x_in = x - self.b_dec if self.arch.subtract_b_dec else x
        return torch.addmm(self.b_enc, x_in, self.W_enc)

    def activate(self, pre: Tensor, batch: bool = False) -> Tensor:
        """[B, d_sae] features from pre-activations: the arch's activation. `batch`: training's
        BatchTopK over the whole batch (else its inference threshold)."""
        a = self.arch.activation
        if a == "topk":
            # torch.topk where it is defined (ties aside: the bfloat16 step's top k, which picks
            # among equal values its own way)
            vals, idx = topk_relu(pre, self.cfg.k)
            return torch.zeros_like(pre).scatter(-1, idx, vals.relu())
        if a == "batchtopk" and batch:
            flat = pre.relu().flatten()
            vals, idx = flat.topk(min(self.cfg.k * pre.shape[0], flat.numel()), sorted=False)
            return torch.zeros_like(flat).scatter(0, idx, vals).view_as(pre)
        if a in ("batchtopk", "jumprelu"):
            return JumpReLUFn.apply(pre, self.threshold, self.arch.bandwidth or 1.0)
        if a == "gated":
            # pre - b_enc is x_in @ W_enc: the magnitude path shares the gate's weights
            mag = ((pre - self.b_enc) * self.r_mag.exp() + self.b_mag).relu()
            return (pre > 0).to(pre.dtype) * mag
        return pre.relu()

    def decode(self, f: Tensor) -> Tensor:
        return torch.addmm(self.b_dec, f.to(self.W_dec.dtype), self.W_dec)  # f @ W_dec + b_dec

    def penalty(self, pre: Tensor, f: Tensor) -> Tensor:
        """[B] each row's sparsity penalty: sum_i relu(pre_i) (l1; for relu archs that is
        sum_i f_i, for gated the gate's), sum_i f_i ||W_dec,i|| (l1_dec_norm; the decoder norm
        is free, so the penalty must see it), sum_i H(pre_i - threshold_i) (l0), 0 (none)."""
        if self.arch.penalty == "l1":
            return (f if self.arch.activation == "relu" else pre.relu()).sum(-1)
        if self.arch.penalty == "l1_dec_norm":
            return f @ self.W_dec.norm(dim=1)
        if self.arch.penalty == "l0":
            return StepFn.apply(pre, self.threshold, self.arch.bandwidth).sum(-1)
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

    def gate_recon(self, pre: Tensor, x: Tensor) -> Tensor:
        """Gated SAEs' auxiliary loss: relu of the gate's pre-activation reconstructs x through a
        frozen copy of the decoder (no gradient to W_dec, b_dec), mean over the batch."""
        via_gate = torch.addmm(self.b_dec.detach(), pre.relu(), self.W_dec.detach())
        return F.mse_loss(via_gate, x, reduction="sum") / x.shape[0]

    def prefix_loss(self, f: Tensor, x: Tensor, mse: Tensor) -> Tensor:
        """Matryoshka: the mean over the nested dictionaries of each one's squared error, the
        full one (`mse`) included; `mse` itself for a single dictionary."""
        if len(self.widths) == 1:
            return mse
        total, recon, start = mse, self.b_dec.expand_as(x), 0
        for w in self.widths[:-1]:
            recon = torch.addmm(recon, f[:, start:w], self.W_dec[start:w])
            total = total + F.mse_loss(recon, x, reduction="sum") / x.shape[0]
            start = w
        return total / len(self.widths)

    def forward(self, x: Tensor, dead_mask: Tensor | None = None) -> ForwardOutput:
        """The training definition; `dead_mask` [d_sae] bool turns on AuxK (if the arch has it)."""
        B = x.shape[0]
        x = x.to(self.W_enc.dtype)  # the loss too is in the SAE's dtype
        pre = self.pre_acts(x)
        f = self.activate(pre, batch=True)
        recon = self.decode(f)
        mse = F.mse_loss(recon, x, reduction="sum") / B
        sparsity = self.penalty(pre, f).sum() / B
        aux = x.new_zeros(())
        if self.arch.aux_loss == "auxk" and dead_mask is not None:
            aux = self.auxk(pre, x - recon, dead_mask)
        elif self.arch.aux_loss == "gate_recon":
            aux = self.gate_recon(pre, x)
        return ForwardOutput(recon, f, mse, sparsity, aux, self.prefix_loss(f, x, mse))

    def loss(self, out: ForwardOutput, l1_coef: float) -> Tensor:
        loss = out.recon_loss
        if self.arch.penalty != "none":
            loss = loss + l1_coef * out.sparsity
        if self.arch.aux_loss == "auxk":
            loss = loss + self.cfg.aux_coef * out.aux
        elif self.arch.aux_loss != "none":
            loss = loss + out.aux
        return loss

    def fired(self, out: ForwardOutput) -> Tensor:
        """[d_sae] int64: on how many rows of the batch each feature was > 0."""
        return torch.count_nonzero(out.acts, dim=0)

    # -- the SAE as saved and read: inference --
    def _normalized(self, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """x in the SAE's dtype, normalised per row as its `normalize` says (SAELens' layer_norm,
        constant_norm_rescale), with what undoes it: x = x' * scale + shift."""
        x = x.to(self.W_enc.dtype)
        if self.normalize == "layer_norm":
            mu = x.mean(-1, keepdim=True)
            std = (x - mu).std(-1, keepdim=True)
            return (x - mu) / (std + 1e-5), std, mu
        if self.normalize == "constant_norm_rescale":
            coef = math.sqrt(self.cfg.d_in) / x.norm(dim=-1, keepdim=True)
            return x * coef, 1 / coef, None
        return x, None, None

    def encode(self, x: Tensor) -> Tensor:
        """Dense inference feature activations [B, d_sae] of inputs x [B, d_in]."""
        return self.activate(self.pre_acts(self._normalized(x)[0]))

    def reconstruct(self, x: Tensor, keep: Tensor | None = None) -> Reconstruction:
        """Inference: features and the reconstruction in the input's units (any per-row input
        normalisation undone, which `decode` alone cannot do). `keep` [d_sae]: a factor on the
        features before decoding (0 ablates a feature); `acts` are the features before it."""
        xn, scale, shift = self._normalized(x)
        pre = self.pre_acts(xn)
        f = self.activate(pre)
        recon = self.decode(f if keep is None else f * keep)
        if scale is not None:
            recon = recon * scale
        if shift is not None:
            recon = recon + shift
        return Reconstruction(recon, f, pre)

    # -- constraints applied after each optimizer step --
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

    @torch.no_grad()
    def clamp_threshold(self) -> None:
        """A trained threshold stays >= 0 (projected after each step, as SAELens does; the paper
        trains log(threshold) for the same end)."""
        if self.arch.threshold == "trained":
            self.threshold.clamp_(min=0.0)

    @torch.no_grad()
    def update_threshold(self, min_kept: Tensor) -> None:
        """BatchTopK's inference threshold: an exponential moving average (rate threshold_rate)
        of the smallest activation each batch's top-k kept; `min_kept` is inf when it kept none
        (then nothing moves). No host sync."""
        r = self.arch.threshold_rate
        new = self.threshold * (1 - r) + r * min_kept.to(self.threshold.dtype)
        self.threshold.copy_(torch.where(torch.isfinite(min_kept), new, self.threshold))
