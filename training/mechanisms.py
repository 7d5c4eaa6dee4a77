"""Mechanism checks recorded over training: one row per density window, [windows x features]
each, in the run dir's `mechanisms.safetensors` (and in checkpoints, so resuming reproduces
them). They ask *why* a feature goes quiet: is its encoder shrinking, its threshold rising, its
decoder turning away from its encoder, the data leaving its side of the hyperplane, or the
sparsity term outpulling the reconstruction?

Taken on the step that closes a window, on that step's batch, in training units (relu_l1_v2
trains on inputs rescaled to norm sqrt(d_in): its encoder norm and D/E projection are that
scale times the saved SAE's; pre-activations, margins and thresholds are the same). Every
feature fires iff its pre-activation x_in . e + b_enc exceeds an `offset` (0 for relu, topk,
batchtopk; theta for jumprelu; max(0, b_gate - b_mag exp(-r_mag)) for gated, whose magnitude
path must be > 0 too), so with e = W_enc[:, i]:

- `encoder_norm`: ||e|| (gated: the gate's, W_enc; the magnitude path is exp(r_mag) times it).
- `encoder_bias`: b_enc[i] (gated: b_gate).
- `effective_threshold`: the bias the raw input meets: the feature fires iff x . e + it > 0,
  i.e. b_enc[i] - b_dec . e - offset (without the b_dec term for archs whose encoder sees x).
- `de_projection`: the unit decoder row . e.
- `margin`: the largest pre-activation over the batch's rows minus the offset (distributed:
  over every rank's slice), taken from the step's own forward (the weights before that step's
  update; no second pass over the batch): > 0 iff the feature fired on the batch (topk and
  batchtopk choose by rank, so for them it is only the largest pre-activation); for a feature
  rarer than 1/batch_size it is mostly <= 0 and says how far it is from firing.
- `l1_grad_share`: on the batch's first `grad_rows` rows (after the update), ||G_s|| /
  (||G_s|| + ||G_r||), G_s the sparsity term's part of the feature's encoder gradient and G_r
  the rest (the reconstruction; gated: through the magnitude path plus its auxiliary gate
  reconstruction). NaN where there is no such gradient (the feature fired on none of those
  rows; gated: its gate opened on none), 0 for archs without a sparsity term. jumprelu's L0
  term gives the encoder no gradient (it acts on theta), so for jumprelu it is the L0 term's
  share of theta's gradient, |g_s| / (|g_s| + |g_r|) through the straight-through estimator,
  NaN where no row is within bandwidth/2 of theta.

Cost per window: an amax over the step's pre-activations and four matmuls on `grad_rows` rows
(gated: six), under 3% of training at the default window (docs/benchmarks.md;
scripts/bench/mechanisms.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..sae.io import atomic_save_safetensors

KEYS = (
    "encoder_norm",
    "encoder_bias",
    "effective_threshold",
    "de_projection",
    "margin",
    "l1_grad_share",
)
FILE = "mechanisms.safetensors"
GRAD_ROWS = 256


def firing_offset(sae) -> Tensor:
    """[d_sae]: what a feature's pre-activation must exceed for it to fire (module docstring)."""
    a = sae.arch.activation
    if a == "jumprelu":
        return sae.threshold.clamp_min(0)
    if a == "gated":  # gate > 0 and (pre - b_gate) exp(r_mag) + b_mag > 0
        return (sae.b_enc - sae.b_mag * torch.exp(-sae.r_mag)).clamp_min(0)
    return torch.zeros_like(sae.b_enc)


@torch.no_grad()
def margin(sae, pre: Tensor) -> Tensor:
    """[d_sae] float32: the largest of a batch's pre-activations [B, d_sae] minus the offset."""
    return (pre.amax(0).to(sae.b_enc.dtype) - firing_offset(sae)).float()


@torch.no_grad()
def mechanism_row(
    sae,
    x: Tensor,
    l1_coef: float,
    grad_rows: int = GRAD_ROWS,
    rank: int = 0,
    size: int = 1,
    step_margin: Tensor | None = None,
) -> dict[str, Tensor]:
    """The checks of an SAE on a batch x [B, d_in] (in training units): {key: [d_sae] float32}.
    `step_margin`: `margin` of the step's own pre-activations on x (None: a forward on x now).
    Distributed (`size` ranks, x this rank's contiguous slice of the global batch), the ranks
    reduce their parts so every rank gets what one process would on the global batch."""
    W_enc, b_enc, W_dec, b_dec = sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec
    x = x.to(W_enc.dtype)
    m = margin(sae, sae.pre_acts(x)) if step_margin is None else step_margin.clone()
    if size > 1:
        import torch.distributed as dist

        dist.all_reduce(m, op=dist.ReduceOp.MAX)
    threshold = b_enc - firing_offset(sae)
    if sae.arch.subtract_b_dec:
        threshold = threshold - b_dec @ W_enc
    row = {
        "encoder_norm": W_enc.norm(dim=0),
        "encoder_bias": b_enc,
        "effective_threshold": threshold,
        "de_projection": (W_dec * W_enc.T).sum(1) / W_dec.norm(dim=1).clamp_min(1e-12),
        "margin": m,
        "l1_grad_share": grad_share(sae, x, l1_coef, grad_rows, rank, size),
    }
    # Copies: the bias may be the live parameter itself.
    return {k: v.detach().to(torch.float32, copy=True) for k, v in row.items()}


@torch.no_grad()
def grad_share(sae, x: Tensor, l1_coef: float, grad_rows: int, rank: int, size: int) -> Tensor:
    """[d_sae]: the sparsity term's share of each feature's encoder gradient (jumprelu: of its
    threshold's) on the global batch's first n rows (module docstring). The loss on those rows:
    recon_i = f W_dec + b_dec, dL/df = g_rec = 2/n (recon - x) W_dec^T; this rank holds rows
    rank*B.. of the global batch."""
    W_enc, W_dec, b_dec, arch = sae.W_enc, sae.W_dec, sae.b_dec, sae.arch
    B = x.shape[0]
    n = min(grad_rows, B * size)
    xs = x[: max(0, min(B, n - rank * B))]
    xi = xs - b_dec if arch.subtract_b_dec else xs
    pre = sae.pre_acts(xs)
    f = sae.activate(pre)
    g_rec = (2.0 / n) * (torch.addmm(b_dec, f, W_dec) - xs) @ W_dec.T
    if arch.activation == "jumprelu":  # theta's gradient: -(1/eps) sum_b K (theta g_rec + l1/n)
        eps = arch.bandwidth
        near = ((pre - sae.threshold) / eps).abs() < 0.5
        k = near.to(pre.dtype)
        parts = torch.stack([(k * g_rec).sum(0) * sae.threshold / eps, k.sum(0) / eps])
        has = k.sum(0)
        c = torch.full_like(has, l1_coef / n)
    else:
        on = (f > 0).to(pre.dtype)
        gate = (pre > 0).to(pre.dtype) if arch.activation == "gated" else on
        if arch.activation == "gated":  # magnitude path (scaled by exp(r_mag)) + gate_recon
            g_aux = (2.0 / n) * (torch.addmm(b_dec, pre.relu(), W_dec) - xs) @ W_dec.T
            g = g_rec * on * torch.exp(sae.r_mag) + g_aux * gate
        else:
            g = g_rec * on
        # [2 d_sae, d_in]: G_r^T and G_s^T / c, each feature's gradient a contiguous row
        parts = torch.cat([g, gate], dim=1).T @ xi
        has = gate.sum(0)
        # The penalty's derivative in f_i (sae.penalty: sum_i f_i, or sum_i f_i ||W_dec,i||).
        dec_norm = W_dec.norm(dim=1)
        scale = {"l1": torch.full_like(dec_norm, l1_coef), "l1_dec_norm": l1_coef * dec_norm}
        c = scale.get(arch.penalty, torch.zeros_like(dec_norm)) / n
    if size > 1:
        import torch.distributed as dist

        dist.all_reduce(parts)
        dist.all_reduce(has)
    if arch.activation == "jumprelu":
        rec, pen = parts[0].abs(), parts[1] * c
    else:
        d = W_enc.shape[1]
        rec, pen = parts[:d].norm(dim=1), parts[d:].norm(dim=1) * c.abs()
    return torch.where(has > 0, pen / (pen + rec).clamp_min(1e-30), torch.nan)


class MechanismTracker:
    """The rows recorded so far (device tensors, no host sync when recording)."""

    def __init__(self, d_sae: int, grad_rows: int = GRAD_ROWS, rank: int = 0, size: int = 1):
        self.d_sae, self.grad_rows, self.rank, self.size = d_sae, grad_rows, rank, size
        self.rows: dict[str, list[Tensor]] = {k: [] for k in KEYS}
        self.window_end_step: list[int] = []

    def __len__(self) -> int:
        return len(self.window_end_step)

    def record(
        self, sae, x: Tensor, l1_coef: float, step: int, step_margin: Tensor | None = None
    ) -> None:
        row = mechanism_row(sae, x, l1_coef, self.grad_rows, self.rank, self.size, step_margin)
        for k, v in row.items():
            self.rows[k].append(v)
        self.window_end_step.append(step)

    def tensors(self) -> dict[str, Tensor]:
        """mechanisms.safetensors' tensors: each key [n_windows, d_sae], and window_end_step."""
        out = {
            k: torch.stack(v).cpu() if v else torch.zeros(0, self.d_sae)
            for k, v in self.rows.items()
        }
        out["window_end_step"] = torch.tensor(self.window_end_step, dtype=torch.int64)
        return out

    def state(self) -> dict[str, Tensor]:
        return {f"mechanisms.{k}": v for k, v in self.tensors().items()}

    def load_state(self, t: dict[str, Tensor], device) -> None:
        """From a checkpoint (one written before mechanisms were recorded leaves them empty)."""
        if "mechanisms.window_end_step" not in t:
            return
        self.window_end_step = t["mechanisms.window_end_step"].tolist()
        self.rows = {k: [r.to(device) for r in t[f"mechanisms.{k}"]] for k in KEYS}

    def save(self, path: str | Path) -> None:
        meta = {
            "grad_rows": str(self.grad_rows),
            "units": "training units (see training/mechanisms.py)",
        }
        atomic_save_safetensors(path, self.tensors(), meta)
