"""Mechanism checks recorded over training: one row per density window, [windows x features]
each, in the run dir's `mechanisms.safetensors` (and in checkpoints, so resuming reproduces
them). They ask *why* a feature goes quiet: is its encoder shrinking, its threshold rising, its
decoder turning away from its encoder, the data leaving its side of the hyperplane, or the L1
term outpulling the reconstruction?

Taken when a window closes, on that step's batch (after the step's update), in training units
(relu_l1_v2 trains on inputs rescaled to norm sqrt(d_in): its encoder norm and D/E projection
are that scale times the saved SAE's; pre-activations, margins and thresholds are the same):

- `encoder_norm`: ||W_enc[:, i]||.
- `encoder_bias`: b_enc[i].
- `effective_threshold`: the bias the raw input meets, b_enc[i] - b_dec . W_enc[:, i] for archs
  whose encoder sees x - b_dec, b_enc[i] otherwise (pre-activation = x . W_enc[:, i] + it).
- `de_projection`: the unit decoder row . the encoder column.
- `margin`: the largest pre-activation over the batch's rows (its 1 - 1/batch_size quantile;
  distributed: over every rank's slice):
  > 0 when the feature fired on the batch; for a feature rarer than 1/batch_size it is mostly
  <= 0 and says how far it is from firing (it sinks below 0 as a feature dies).
- `l1_grad_share`: on the batch's first `grad_rows` rows, ||G_l1|| / (||G_l1|| + ||G_rec||),
  the split of the feature's encoder gradient (of the step's loss on those rows) into the
  sparsity term's and the reconstruction's parts; NaN where the feature fired on none of those
  rows (no gradient), 0 for archs without a sparsity term.

Cost: one encoder matmul on the batch plus four on `grad_rows` rows, once per window (see
docs/benchmarks.md; scripts/bench/mechanisms.py).
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
GRAD_ROWS = 512


@torch.no_grad()
def mechanism_row(
    sae, x: Tensor, l1_coef: float, grad_rows: int = GRAD_ROWS, rank: int = 0, size: int = 1
) -> dict[str, Tensor]:
    """The checks of an SAE on a batch x [B, d_in] (in training units): {key: [d_sae] float32}.
    Distributed (`size` ranks, x this rank's contiguous slice of the global batch), the ranks
    reduce their parts so every rank gets what one process would on the global batch."""
    W_enc, b_enc, W_dec, b_dec = sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec
    sub = sae.arch.subtract_b_dec  # the arch table (sae/archs.py)
    x = x.to(W_enc.dtype)
    dec_norm = W_dec.norm(dim=1)
    threshold = b_enc - b_dec @ W_enc if sub else b_enc
    x_in = x - b_dec if sub else x
    pre = sae.pre_acts(x)  # [B, d_sae]
    margin = pre.amax(0)
    # The encoder gradient of the loss on the global batch's first n rows: dL/dpre =
    # (g_rec + c) * [active], g_rec = 2/n (recon - x) W_dec^T, c the penalty's derivative;
    # G = x_in^T dL/dpre. This rank holds rows rank*B.. of the global batch.
    B = x.shape[0]
    n = min(grad_rows, B * size)
    mine = slice(0, max(0, min(B, n - rank * B)))
    p, xs, xi = pre[mine], x[mine], x_in[mine]
    f = sae.activate(p)
    active = (f > 0).to(p.dtype)
    g_rec = (2.0 / n) * (torch.addmm(b_dec, f, W_dec) - xs) @ W_dec.T
    parts = torch.stack([xi.T @ (g_rec * active), xi.T @ active])  # [2, d_in, d_sae]
    fired = active.sum(0)
    if size > 1:
        import torch.distributed as dist

        dist.all_reduce(margin, op=dist.ReduceOp.MAX)
        dist.all_reduce(parts)
        dist.all_reduce(fired)
    # The penalty's derivative in f_i (sae.penalty: sum_i f_i, or sum_i f_i ||W_dec,i||).
    scale = {"l1": torch.full_like(dec_norm, l1_coef), "l1_dec_norm": l1_coef * dec_norm}
    c = scale.get(sae.arch.penalty, torch.zeros_like(dec_norm)) / n
    rec, l1 = parts[0].norm(dim=0), parts[1].norm(dim=0) * c.abs()
    row = {
        "encoder_norm": W_enc.norm(dim=0),
        "encoder_bias": b_enc,
        "effective_threshold": threshold,
        "de_projection": torch.einsum("fd,df->f", W_dec, W_enc) / dec_norm.clamp_min(1e-12),
        "margin": margin,
        "l1_grad_share": torch.where(fired > 0, l1 / (l1 + rec).clamp_min(1e-30), torch.nan),
    }
    # Copies: the bias and threshold may be the live parameter itself.
    return {k: v.detach().to(torch.float32, copy=True) for k, v in row.items()}


class MechanismTracker:
    """The rows recorded so far (device tensors, no host sync when recording)."""

    def __init__(self, d_sae: int, grad_rows: int = GRAD_ROWS, rank: int = 0, size: int = 1):
        self.d_sae, self.grad_rows, self.rank, self.size = d_sae, grad_rows, rank, size
        self.rows: dict[str, list[Tensor]] = {k: [] for k in KEYS}
        self.window_end_step: list[int] = []

    def __len__(self) -> int:
        return len(self.window_end_step)

    def record(self, sae, x: Tensor, l1_coef: float, step: int) -> None:
        row = mechanism_row(sae, x, l1_coef, self.grad_rows, self.rank, self.size)
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
