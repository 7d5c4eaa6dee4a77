"""The sparse half of a training step: after the dense encoder, only the active latents.

Once the encoder has given the pre-activations, an SAE's decoder, the decoder's gradient and
the encoder's gradient touch only the (row, latent) entries that are active: B * L0 of them
against B * d_sae for a dense step. `Active` holds those entries as a CSR pattern (row-major,
with its values); the functions here decode them (`decode`: an embedding bag), give dL/df at
each of them (`sampled_dots`: a sampled product, SDDMM) and the weight gradients from the
transposed, latent-major pattern (`weight_grads`: CSR x dense products).

FastStep (sae/fast_step.py) uses them for topk (k entries a row, plus AuxK's) and for relu
archs once the density is low. An arch whose features are zero outside a mask (JumpReLU's
threshold, Gated's gate) can use them the same way: build its `Active` from its own mask
(`active_where`), turn dL/df into dL/dpre at the active entries, and call `weight_grads`.
torch's sparse kernels take float32/float64 only: every value here is in `compute_dtype`.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


class Active(NamedTuple):
    """The active entries of an [R, m] feature matrix, row-major (CSR)."""

    crow: Tensor  # [R + 1] int64: row r's entries are crow[r] : crow[r + 1]
    row: Tensor  # [nnz] int64
    col: Tensor  # [nnz] int64: the latent of each entry, ascending within a row
    val: Tensor  # [nnz] the feature's value there


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the sparse products for parameters of `dtype`."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # "CSR support is in beta": the ops used here are not
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def _positive_flat(pre: Tensor) -> Tensor:
    """Flat indices (ascending) of the entries of `pre` that are > 0."""
    if pre.device.type == "cpu" and pre.dtype in (torch.float32, torch.bfloat16):
        # A float is > 0 exactly when its bits, read as a signed integer, are > 0 (-0.0 and
        # negatives have the sign bit set); numpy's compare + flatnonzero is ~2x torch's
        # gt + nonzero on the CPU (docs/benchmarks.md).
        ints = pre.view(torch.int32 if pre.dtype == torch.float32 else torch.int16)
        return torch.from_numpy(np.flatnonzero(ints.numpy() > 0))
    return torch.nonzero(pre.reshape(-1) > 0).squeeze(1)


def active_where(pre: Tensor, dtype: torch.dtype) -> Active:
    """The entries of `pre` [R, m] that are > 0, with their values in `dtype` (for a ReLU: the
    features relu(pre), at exactly the entries where they are nonzero). On CUDA, nonzero waits
    for the device (the number of entries sizes the result)."""
    R, m = pre.shape
    flat = _positive_flat(pre).to(pre.device)
    row = flat.div(m, rounding_mode="floor")
    col = flat - row * m
    val = pre.reshape(-1)[flat].to(dtype)
    starts = torch.arange(0, R + 1, device=pre.device, dtype=torch.int64) * m
    return Active(torch.searchsorted(flat, starts), row, col, val)


# Latents per block of topk_relu's pre-selection (~sqrt(d_sae / k) balances its two top-ks).
TOPK_BLOCK = 32


def topk_relu(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Values and indices [R, k] of a top k of each row of `pre` [R, m] (the values
    differentiable), as `pre.topk(k, dim=-1, sorted=False)` wherever a ReLU after it can tell: every entry > 0
    among the k largest is kept; ties, and which entries <= 0 fill a row with fewer than k
    positive ones, are arbitrary (as torch.topk's ties). On the CPU, in float32 or bfloat16:
    a row's k latents lie in the k (strided) blocks of TOPK_BLOCK latents with the largest
    maxima, so the top k is taken among those k * TOPK_BLOCK entries (docs/benchmarks.md). The entries are compared by their bits as signed integers:
    in the same order as the floats where > 0, below every float >= 0 where < 0."""
    R, m = pre.shape[0], pre.shape[-1]
    nb = m // TOPK_BLOCK
    ints = {torch.float32: torch.int32, torch.bfloat16: torch.int16}.get(pre.dtype)
    if pre.device.type != "cpu" or ints is None or m % TOPK_BLOCK or nb < 4 * k or pre.dim() != 2:
        return pre.topk(k, dim=-1, sorted=False)
    # Block j is latents j, j + nb, j + 2 nb, ...: its maximum is an elementwise max over the
    # TOPK_BLOCK rows of this view (vectorised), not a reduction over a short last dim.
    blocks = pre.detach().view(ints).view(R, TOPK_BLOCK, nb)
    blk = blocks.amax(1).topk(k, dim=1, sorted=False).indices  # [R, k]
    cand = blocks.gather(2, blk.unsqueeze(1).expand(R, TOPK_BLOCK, k)).view(R, -1)
    j = cand.topk(k, dim=1, sorted=False).indices  # j = b * k + c: entry b of block blk[c]
    idx = blk.gather(1, j % k).add_(j.div(k, rounding_mode="floor"), alpha=nb)
    return pre.gather(1, idx), idx


def active_topk(idx: Tensor, vals: Tensor) -> Active:
    """The entries of a top-k selection: `idx`, `vals` [R, k] (a row's latents in any order)."""
    R, k = idx.shape
    dev = idx.device
    crow = torch.arange(0, R * k + 1, k, device=dev)
    row = torch.arange(R, device=dev).repeat_interleave(k)
    return Active(crow, row, idx.reshape(-1), vals.reshape(-1))


def cat_rows(a: Active, b: Active) -> Active:
    """The rows of `a`, then those of `b`."""
    R = len(a.crow) - 1
    crow = torch.cat([a.crow, b.crow[1:] + a.crow[-1]])
    return Active(crow, torch.cat([a.row, b.row + R]), torch.cat([a.col, b.col]),
                  torch.cat([a.val, b.val]))  # fmt: skip


def decode(a: Active, W_dec: Tensor) -> Tensor:
    """[R, d_in]: each row's sum of val * W_dec[col] over its entries (rows without any: 0)."""
    return F.embedding_bag(
        a.col, W_dec, a.crow, per_sample_weights=a.val, mode="sum", include_last_offset=True
    )


def sampled_dots(a: Active, g_rows: Tensor, W_dec: Tensor) -> Tensor:
    """[nnz]: g_rows[row] . W_dec[col] at each entry, i.e. (g_rows @ W_decᵀ) sampled there."""
    m = W_dec.shape[0]
    S = _csr(a.crow, a.col, a.val, (len(a.crow) - 1, m))
    return torch.sparse.sampled_addmm(S, g_rows, W_dec.t(), beta=0).values()


class Transposed(NamedTuple):
    """The latent-major (CSR of the [m, R] transpose) order of an `Active`'s entries."""

    order: Tensor  # [nnz]: entry order[j] is the j-th in latent-major order
    crow: Tensor  # [m + 1]
    row: Tensor  # [nnz]: the row of each entry, in that order
    per_latent: Tensor  # [m] int64: entries of each latent


def _sort_order(keys: Tensor, m: int) -> Tensor:
    """Stable argsort of int keys in [0, m): on the CPU numpy's, much faster than torch.sort
    for the latent indices of a step, and a radix sort when they fit 16 bits."""
    if keys.device.type == "cpu":
        k = keys.numpy()
        return torch.from_numpy(
            np.argsort(k.astype(np.uint16) if m <= 1 << 16 else k, kind="stable")
        )
    return torch.argsort(keys, stable=True)


def transposed(a: Active, m: int) -> Transposed:
    per_latent = torch.bincount(a.col, minlength=m)
    order = _sort_order(a.col, m).to(a.col.device)
    crow = F.pad(torch.cumsum(per_latent, 0), (1, 0))
    return Transposed(order, crow, a.row.index_select(0, order), per_latent)


def weight_grads(
    a: Active,
    t: Transposed,
    g_pre: Tensor,
    g_rows: Tensor,
    x_rows: Tensor,
    grads: tuple[Tensor, Tensor, Tensor],
    g_enc_t: Tensor,
) -> None:
    """dW_dec = Aᵀ g_rows (A: the entries' values), dW_encᵀ = Gᵀ x_rows (G: `g_pre`, dL/dpre at
    the entries) and db_enc, written into `grads` = (W_enc.grad, W_dec.grad, b_enc.grad), each
    overwritten; `g_enc_t` is an [m, d_in] work buffer of the products' dtype."""
    g_W_enc, g_W_dec, g_b_enc = grads
    m = g_W_dec.shape[0]
    R = len(a.crow) - 1
    A_t = _csr(t.crow, t.row, a.val.index_select(0, t.order), (m, R))
    if g_W_dec.dtype == g_rows.dtype:
        torch.addmm(g_W_dec, A_t, g_rows, beta=0, out=g_W_dec)
    else:
        g_W_dec.copy_(torch.addmm(g_enc_t, A_t, g_rows, beta=0, out=g_enc_t))
    G_t = _csr(t.crow, t.row, g_pre.index_select(0, t.order), (m, R))
    torch.addmm(g_enc_t, G_t, x_rows, beta=0, out=g_enc_t)
    g_W_enc.copy_(g_enc_t.t())
    g_b_enc.copy_(g_pre.new_zeros(m).index_add_(0, a.col, g_pre))
