"""Measuring an SAE spliced into its model: reconstruction metrics (L0, MSE, both FVUs) and the
next-token CE and KL with the site clean, spliced, zero- and mean-ablated, and with any number
of ablated SAEs (`saekit evaluate --ablate`, diagnostics/ablate.py). The conventions are in
diagnostics/evaluate.py's docstring (and eval.json).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ..sae.errors import SaekitError

# x [N, d_in] -> (reconstruction [N, d_in], dense feature activations [N, d_sae])
SAEFn = Callable[[Tensor], tuple[Tensor, Tensor]]


def _layer_of(hook_name: str) -> int | None:
    m = re.match(r"blocks\.(\d+)\.", hook_name)
    return int(m.group(1)) if m else None


class Recon:
    """Running sums for L0, MSE and both FVUs, in float64 so that 1e5+ tokens add up exactly."""

    def __init__(self) -> None:
        self.n = 0
        self.sq_err = 0.0
        self.sq_norm = 0.0
        self.sum_x: Tensor | None = None
        self.l0 = 0.0
        self.fvu_tok = 0.0
        self.fired: Tensor | None = None  # [d_sae] firings per feature (a fresh density)

    def add(self, x: Tensor, recon: Tensor, feats: Tensor) -> None:
        x, recon = x.double(), recon.double()
        err = (x - recon).pow(2).sum(-1)
        var_b = (x - x.mean(0)).pow(2).sum(-1)
        self.n += x.shape[0]
        self.sq_err += err.sum().item()
        self.sq_norm += x.pow(2).sum().item()
        s = x.sum(0).cpu()
        self.sum_x = s if self.sum_x is None else self.sum_x + s
        fired = (feats > 0).sum(0).cpu()
        self.fired = fired if self.fired is None else self.fired + fired
        self.l0 += fired.sum().item()
        # A token exactly at the batch mean has no variance to explain; count it as fully explained
        # when the reconstruction is exact too, else drop it (as SAELens' ratio would be inf).
        self.fvu_tok += torch.where(var_b > 0, err / var_b.clamp_min(1e-30), 0.0).sum().item()

    def result(self) -> dict:
        if self.n == 0:
            raise SaekitError("no non-BOS tokens to evaluate; pass more --tokens")
        total_var = self.sq_norm - self.sum_x.pow(2).sum().item() / self.n
        return {
            "fired": self.fired,  # a tensor: evaluate() takes it out before writing eval.json
            "l0": self.l0 / self.n,
            "mse": self.sq_err / self.n,
            "fvu_pooled": self.sq_err / total_var if total_var > 0 else float("nan"),
            "fvu_per_token_mean": self.fvu_tok / self.n,
        }


def _ce_and_logp(logits: Tensor, toks: Tensor) -> tuple[Tensor, Tensor]:
    """Per-position CE of predicting toks[:, 1:] and the log-probs it came from (positions :-1)."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    ce = -logp.gather(-1, toks[:, 1:, None]).squeeze(-1)
    return ce, logp


@torch.no_grad()
def site_mean(
    model, tokens: Tensor, hook_name: str, batch_size: int, bos_id: int | None, device="cpu"
) -> Tensor:
    """Mean activation at the hook over the non-BOS positions of `tokens` (for mean ablation)."""
    layer = _layer_of(hook_name)
    total, n = None, 0
    store: dict[str, Tensor] = {}

    def grab(act, hook):
        store["x"] = act

    for i in range(0, len(tokens), batch_size):
        toks = tokens[i : i + batch_size].to(device)
        # Only the blocks up to the hook's are needed (stop_at_layer skips ln_final and W_U).
        if layer is not None:
            model.run_with_hooks(toks, fwd_hooks=[(hook_name, grab)], stop_at_layer=layer + 1)
        else:
            model.run_with_hooks(toks, fwd_hooks=[(hook_name, grab)])
        x = store["x"].flatten(2)  # [batch, pos, d_in]: a per-head hook's heads side by side
        mask = toks != bos_id if bos_id is not None else torch.ones_like(toks, dtype=torch.bool)
        s = x[mask].double().sum(0)
        total = s if total is None else total + s
        n += int(mask.sum())
    return (total / max(n, 1)).to(x.dtype)


def _splice(model, toks, hook_name: str, store: dict, x: Tensor):
    """Logits with the hook's activations replaced by x ([batch, pos, d_in]; a per-head hook's
    [batch, pos, head, d_head] is its view)."""
    store["replace"] = x
    return model.run_with_hooks(
        toks, fwd_hooks=[(hook_name, lambda act, hook: store["replace"].reshape(act.shape))]
    )


@torch.no_grad()
def splice_metrics(
    model,
    tokens: Tensor,
    hook_name: str,
    sae_fn: SAEFn,
    batch_size: int = 32,
    bos_id: int | None = None,
    device: str = "cpu",
    progress: bool = True,
    ablations: dict[str, SAEFn] | None = None,
) -> dict:
    """Reconstruction metrics and CE / KL with the site clean, spliced, zero- and mean-ablated.

    `sae_fn` maps activations [N, d_in] at non-BOS positions to (reconstruction, features);
    each of `ablations` is another such map (the SAE with some features zeroed), spliced in the
    same way: its MSE, CE and KL go to out["ablations"] (diagnostics/ablate.py)."""
    if hook_name not in model.hook_dict:
        raise SaekitError(f"hook {hook_name} is not in the model; pick one of model.hook_dict")
    mean = site_mean(model, tokens, hook_name, batch_size, bos_id, device)
    rec = Recon()
    ce = {"clean": 0.0, "zero_ablated": 0.0, "mean_ablated": 0.0}
    fns = {"spliced": sae_fn, **(ablations or {})}
    sums = {k: {"sq_err": 0.0, "ce": 0.0, "kl": 0.0} for k in fns}  # per spliced variant
    n_loss = 0
    store: dict[str, Tensor] = {}

    def grab(act, hook):
        store["x"] = act

    batches = range(0, len(tokens), batch_size)
    for i in tqdm(batches, desc="evaluate", disable=not progress, leave=False):
        toks = tokens[i : i + batch_size].to(device)
        mask = toks != bos_id if bos_id is not None else torch.ones_like(toks, dtype=torch.bool)
        loss_mask = mask[:, :-1]
        logits = model.run_with_hooks(toks, fwd_hooks=[(hook_name, grab)])
        ce_clean, logp_clean = _ce_and_logp(logits, toks)
        x = store["x"].flatten(2)  # as the cache flattens it (activations/sites.py)
        ce["clean"] += ce_clean[loss_mask].double().sum().item()
        keep = ~mask.view(*mask.shape, *([1] * (x.dim() - 2)))
        for name, fn in fns.items():
            recon, feats = fn(x[mask])
            if name == "spliced":
                rec.add(x[mask], recon, feats)
            spliced = x.clone()
            spliced[mask] = recon.to(x.dtype)
            ce_v, logp_v = _ce_and_logp(_splice(model, toks, hook_name, store, spliced), toks)
            kl_tok = (logp_clean.exp() * (logp_clean - logp_v)).sum(-1)
            s = sums[name]
            s["sq_err"] += (x[mask] - recon).double().pow(2).sum().item()
            s["ce"] += ce_v[loss_mask].double().sum().item()
            s["kl"] += kl_tok[loss_mask].double().sum().item()
        for name, xr in (
            ("zero_ablated", torch.where(keep, x, torch.zeros_like(x))),
            ("mean_ablated", torch.where(keep, x, mean.expand_as(x))),
        ):  # fused and cheaper: the full log-probs are only needed for the KL
            logits = _splice(model, toks, hook_name, store, xr)
            ce_v = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), toks[:, 1:].flatten(), reduction="none"
            ).view_as(loss_mask)
            ce[name] += ce_v[loss_mask].double().sum().item()
        n_loss += int(loss_mask.sum())
    return _results(rec, ce, sums, n_loss)


def _results(rec: Recon, ce: dict, sums: dict, n_loss: int) -> dict:
    """splice_metrics' dict from its sums: means per token, loss recovered, the ablations."""
    out = rec.result()
    full = sums.pop("spliced")
    ce["spliced"] = full["ce"]
    out.update({f"ce_{k}": v / max(n_loss, 1) for k, v in ce.items()})
    for base in ("zero_ablated", "mean_ablated"):
        gap = out[f"ce_{base}"] - out["ce_clean"]
        rec_ = (out[f"ce_{base}"] - out["ce_spliced"]) / gap if gap != 0 else float("nan")
        out[f"loss_recovered_{base.split('_')[0]}"] = rec_
    out["kl_clean_spliced"] = full["kl"] / max(n_loss, 1)
    out["n_tokens"] = rec.n
    if sums:
        from .ablate import ablation_results

        out["ablations"] = ablation_results(out, sums, rec.n, n_loss)
    return out


@torch.no_grad()
def derived_site_metrics(
    model,
    tokens: Tensor,
    meta: dict,
    sae_fn: SAEFn,
    batch_size: int,
    bos_id: int | None,
    device: str,
    ablations: dict[str, SAEFn] | None = None,
) -> dict:
    """Reconstruction metrics only, for a derived site (no hook to splice into): its activations
    are derived from the model's as the cache derives them. Ablations: MSE only."""
    from ..activations.sites import harvest, resolve_hook

    site = meta.get("site")
    s_ = resolve_hook(model, site, meta.get("layer"), None)
    rec = Recon()
    sums = {k: {"sq_err": 0.0} for k in ablations or {}}
    for i in range(0, len(tokens), batch_size):
        toks = tokens[i : i + batch_size].to(device)
        keep = (toks != bos_id) if bos_id is not None else torch.ones_like(toks, dtype=torch.bool)
        (x,) = harvest(model, toks, keep.reshape(-1).nonzero().squeeze(1), [s_])
        rec.add(x, *sae_fn(x))
        for k, fn in (ablations or {}).items():
            sums[k]["sq_err"] += (x - fn(x)[0]).double().pow(2).sum().item()
    out = rec.result()
    if sums:
        from .ablate import ablation_results

        out["ablations"] = ablation_results(out, sums, rec.n, 0)
    return {
        **out,
        "n_tokens": rec.n,
        "not_spliced_reason": (
            f"site {site} is derived: the forward pass never computes it (it is mlp_out through "
            "ln_final's linear approximation and W_U), so a reconstruction of it has no hook to go "
            "into; CE, loss recovered and KL are not measured, only L0, MSE and FVU."
        ),
    }
