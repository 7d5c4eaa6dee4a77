"""Anthropic's dead-feature resampling (Towards Monosemanticity, 2023), with a held-out control group.

At a resampling step: the features that fired in none of the last `dead_window` steps are
candidates (minus the control group). A random fraction `holdout` of them is left alone and
joins the control group for good. For the rest: compute the loss on random inputs, sample one
input per feature with probability proportional to the squared loss, set the decoder row to the
unit-normalised input and the encoder column to the same direction times 0.2 x the mean encoder
norm of the live features, zero the encoder bias, set the arch's other per-feature parameters
(jumprelu's threshold, gated's r_mag and b_mag) to their initial values, and zero Adam's moments
for exactly those rows and columns.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..sae.model import SAE


def event_seed(seed: int, step: int) -> int:
    """The seed of the resampling event at `step` (its generator and its input sample)."""
    return (seed * 1_000_003 + step) % (2**63)


class ResampleResult(NamedTuple):
    resampled: Tensor  # bool [d_sae]
    held_out: Tensor  # bool [d_sae]


@torch.no_grad()
def per_input_loss(sae: SAE, x: Tensor, l1_coef: float, chunk: int = 4096) -> Tensor:
    """[N] the training loss of each input (squared error + sparsity term), without AuxK."""
    losses = []
    for xc in x.split(chunk):
        pre = sae.pre_acts(xc)
        f = sae.activate(pre)  # inference features (batchtopk: its threshold)
        loss = (sae.decode(f) - xc).pow(2).sum(-1)
        if sae.arch.penalty != "none":
            loss += l1_coef * sae.penalty(pre, f)
        losses.append(loss.float())
    return torch.cat(losses)


def choose(dead: Tensor, control: Tensor, holdout: float, gen: torch.Generator) -> ResampleResult:
    """Split the dead non-control features into resampled and held-out (exactly round(holdout*n))."""
    candidates = (dead & ~control).nonzero().squeeze(1).cpu()
    n_hold = round(holdout * len(candidates))
    perm = candidates[torch.randperm(len(candidates), generator=gen)]
    held_out = torch.zeros_like(dead)
    held_out[perm[:n_hold].to(dead.device)] = True
    resampled = torch.zeros_like(dead)
    resampled[perm[n_hold:].to(dead.device)] = True
    return ResampleResult(resampled, held_out)


@torch.no_grad()
def anthropic_resample(
    sae: SAE,
    optimizer: torch.optim.Optimizer,
    inputs: Tensor,
    dead: Tensor,
    control: Tensor,
    holdout: float,
    l1_coef: float,
    gen: torch.Generator,
) -> ResampleResult:
    """Resample dead features in place (weights and Adam state); `inputs` in training units."""
    res = choose(dead, control, holdout, gen)
    # Held-out features are not reinitialised, but their first moments (stale momentum from
    # before they died) are cleared: a feature that stays dead then stays exactly where it is, as
    # it does in a long run where the momentum has decayed to zero over the dead window.
    hold = res.held_out.nonzero().squeeze(1)
    _zero_state(optimizer, sae, hold, ("exp_avg",))
    idx = res.resampled.nonzero().squeeze(1)
    if len(idx) == 0:
        return res
    loss = per_input_loss(sae, inputs, l1_coef)
    probs = loss.pow(2).cpu().double()
    if not torch.isfinite(probs).all() or probs.sum() <= 0:
        probs = torch.ones_like(probs)
    pick = torch.multinomial(probs, len(idx), replacement=True, generator=gen).to(inputs.device)
    x = inputs[pick]
    unit = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    alive = ~dead
    enc_norm = sae.W_enc[:, alive].norm(dim=0).mean() if alive.any() else sae.W_enc.new_tensor(1.0)
    sae.W_dec[idx] = unit.to(sae.W_dec.dtype)
    sae.W_enc[:, idx] = (unit * (0.2 * enc_norm)).t().to(sae.W_enc.dtype)
    sae.b_enc[idx] = 0
    for name, value in sae.feature_init().items():  # threshold, r_mag, b_mag: as at the start
        getattr(sae, name)[idx] = value
    # Fresh Adam moments for exactly the modified rows/columns (Adam's step count is per tensor).
    _zero_state(optimizer, sae, idx, ("exp_avg", "exp_avg_sq"))
    return res


def _zero_state(optimizer: torch.optim.Optimizer, sae: SAE, idx: Tensor, keys: tuple) -> None:
    per_feature = [(sae.W_dec, (idx,)), (sae.W_enc, (slice(None), idx)), (sae.b_enc, (idx,))]
    per_feature += [(getattr(sae, n), (idx,)) for n in sae.feature_init()]
    for p, sl in per_feature:
        state = optimizer.state.get(p, {})
        for key in keys:
            if key in state:
                state[key][sl] = 0
