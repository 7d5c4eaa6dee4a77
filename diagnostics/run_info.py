"""What an SAE dir's SAE reads, for `evaluate` and `diagnose`: cfg.json's metadata completed
from --model, --hook and --context-size (SAEs not trained by saekit may lack them), with the site
and layer read from the hook's name when the metadata has none, and checked against the model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..activations.sites import site_of_hook
from ..sae.errors import SaekitError
from ..training.density import resolves
from .features import DEAD, ULTRA_RARE, classify

DEAD_DENSITY = 0.0
ULTRA_RARE_DENSITY = 1e-6


def complete_metadata(
    meta: dict, model: str | None, hook: str | None, context_size: int | None = None
) -> dict:
    """cfg.json's metadata with the flags given filled in (they win over what it says), and
    `site` and `layer` from the hook's name where missing (blocks.3.mlp.hook_post: mlp_post, 3;
    a hook no site names: site None, the block's layer)."""
    m = dict(meta)
    if model is not None:
        m["model_name"] = model
    if hook is not None and hook != m.get("hook_name"):
        m.update(hook_name=hook, site=None, layer=None)
    if context_size is not None:
        m["context_size"] = context_size
    if isinstance(m.get("hook_name"), str):
        site, layer = site_of_hook(m["hook_name"])
        if m.get("site") is None:
            m["site"] = site
        if m.get("layer") is None:
            m["layer"] = layer
    return m


def check_hook(model, meta: dict, d_in: int) -> None:
    """SaekitError unless the model has the SAE's hook and its rows are d_in wide (a derived
    site's width is not the hook's and is checked by the cache that made it)."""
    from ..activations.sites import DERIVED, resolve_hook

    hook = meta["hook_name"]
    width = resolve_hook(model, None, None, hook).d_in  # SaekitError for an unknown hook
    if meta.get("site") not in DERIVED and width != d_in:
        raise SaekitError(
            f"hook {hook} of model {meta.get('model_name')} has width {width} but the SAE reads {d_in}; pass the SAE's --model and --hook"
        )


def feature_classes(run_dir: Path, fired: Tensor | None = None, n_tokens: int = 0) -> dict:
    """Dead / ultra-rare counts from the last window of the density history (or the sparsity
    file); without either (an SAE saekit did not train), from `fired` [d_sae], the firings over
    the `n_tokens` just evaluated: a fresh measurement."""
    from safetensors.torch import load_file

    hist = run_dir / "density_history.safetensors"
    sparsity = run_dir / "sparsity.safetensors"
    if hist.exists():
        from ..training.run import load_history

        h = load_history(hist, None if fired is None else len(fired))  # checked to be the run's
        if len(h.window_tokens) == 0:
            return {"density_source": None}
        counts, n = h.counts[-1], int(h.window_tokens[-1])
        density = counts.double() / n
        source = f"density_history.safetensors, last window ({n} tokens)"
    elif sparsity.exists():
        log10 = next(iter(load_file(str(sparsity)).values())).double()
        density = torch.where(log10 < -9.5, 0.0, 10**log10)  # SAELens adds 1e-10 before log10
        n = None
        source = "sparsity.safetensors"
    elif fired is not None and n_tokens > 0:
        density, n = fired.double() / n_tokens, n_tokens
        source = f"fresh measurement on the {n_tokens} evaluated tokens (no density history)"
    else:
        return {"density_source": None}
    # classify() wants counts; a density is the same with tokens=1.
    cls = classify(density, 1, DEAD_DENSITY, ULTRA_RARE_DENSITY)
    d_sae = len(density)
    dead, ultra = int((cls == DEAD).sum()), int((cls == ULTRA_RARE).sum())
    # With fewer than 1e7 tokens in the window, "below 1e-6" means a few firings or none: the
    # count would not be a density's, so it is None (training/density.py's RESOLVE_FIRINGS).
    resolvable = n is None or resolves(n, ULTRA_RARE_DENSITY)
    return {
        "d_sae": d_sae,
        "dead": dead,
        "ultra_rare": ultra if resolvable else None,
        "dead_fraction": dead / d_sae,
        "ultra_rare_fraction": ultra / d_sae if resolvable else None,
        "ultra_rare_threshold": ULTRA_RARE_DENSITY,
        "ultra_rare_resolvable": resolvable,
        "density_source": source,
    }
