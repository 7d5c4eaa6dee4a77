"""Hook sites: which activations a cache holds, and how one forward pass reads them.

A site is a named TransformerLens hook (`mlp_post` -> `blocks.L.mlp.hook_post`, ...), any hook
given by name, or the derived `mlp_out_logits`: the MLP update's direct effect on the logits,

    mlp_out_logits = ((m - mean_d(m)) / s) * ln_final.w @ W_U        (no ln_final.b, no b_U)

where m = `blocks.L.hook_mlp_out` at a position, the centring is done only if ln_final is a
LayerNorm (LN / LNPre; RMSNorm does not centre), and s is ln_final's `hook_scale` averaged over
the positions of the same forward batch that are cached (BOS rows left out unless included).
That is ln_final's linear approximation with one typical scale per batch, as in the design's
logit weights. To read ln_final's scale the forward runs through every block and ln_final but
stops before the unembedding (`return_type=None`), which is the cheapest exact way: the
unembedding is the expensive part, and the scale is TransformerLens' own number.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

if TYPE_CHECKING:  # importing TransformerLens takes seconds; bad input should fail before it
    from transformer_lens import HookedTransformer

from ..sae.errors import SaekitError

SITES: dict[str, str] = {
    "mlp_post": "blocks.{layer}.mlp.hook_post",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "resid_post": "blocks.{layer}.hook_resid_post",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_out_logits": "blocks.{layer}.hook_mlp_out",  # derived: see the module docstring
}
DERIVED = {"mlp_out_logits"}
LN_SCALE_HOOK = "ln_final.hook_scale"


class Site(NamedTuple):
    site: str  # a name from SITES, or "hook" for a hook given by name
    layer: int | None  # None for hooks outside the blocks (hook_embed, ln_final.*, ...)
    hook_name: str  # the TransformerLens hook read
    d_in: int  # width of one cached row
    stop_at_layer: int | None  # blocks the forward must run; None = all of them (and ln_final)

    @property
    def name(self) -> str:
        """The site's name in paths and manifests: the site, or the hook name."""
        return self.hook_name if self.site == "hook" else self.site


def site_of_hook(hook_name: str) -> tuple[str | None, int | None]:
    """(site, layer) of a hook name: the SITES entry whose template it fills (mlp_post for
    blocks.3.mlp.hook_post), else (None, the block it is in, or None)."""
    for site, template in SITES.items():
        if site in DERIVED:
            continue
        pattern = re.escape(template).replace(re.escape("{layer}"), r"(\d+)")
        m = re.fullmatch(pattern, hook_name)
        if m:
            return site, int(m.group(1))
    return None, _hook_layer(hook_name)


def _hook_layer(hook_name: str) -> int | None:
    m = re.match(r"blocks\.(\d+)\.", hook_name)
    return int(m.group(1)) if m else None


def _stop_at_layer(hook_name: str) -> int | None:
    layer = _hook_layer(hook_name)
    if layer is not None:
        return layer + 1
    if hook_name in ("hook_embed", "hook_pos_embed", "hook_tokens"):
        return 0
    return None


def _valid_hooks(model: HookedTransformer) -> str:
    """The model's hook names on one line, with the per-block ones written once as blocks.{L}.*."""
    seen: list[str] = []
    for name in model.hook_dict:
        templ = re.sub(r"^blocks\.\d+\.", "blocks.{L}.", name)
        if templ not in seen:
            seen.append(templ)
    return ", ".join(seen) + f" (L in 0..{model.cfg.n_layers - 1})"


def _probe_width(model: HookedTransformer, hook_name: str) -> int:
    """Width of a hook's rows, checking that it is laid out [batch, pos, ...]."""
    shapes = []
    for n_pos in (2, 3):
        tokens = torch.zeros(1, n_pos, dtype=torch.long, device=model.cfg.device)
        with torch.inference_mode():
            _, acts = model.run_with_cache(
                tokens,
                names_filter=[hook_name],
                stop_at_layer=_stop_at_layer(hook_name),
                return_type="logits" if hook_name.startswith("unembed.") else None,
                return_cache_object=False,
            )
        shapes.append(tuple(acts[hook_name].shape))
    (a, b) = shapes
    if len(a) < 2 or a[:1] != (1,) or a[1] != 2 or b[1] != 3 or a[2:] != b[2:]:
        raise SaekitError(
            f"hook {hook_name} has shape {list(a)}, not [batch, pos, ...]: choose a per-position hook"
        )
    return int(torch.Size(a[2:]).numel())


def resolve_hook(
    model: HookedTransformer, site: str | None, layer: int | None, hook: str | None
) -> Site:
    """One validated site: `hook` (any TransformerLens hook name) if given, else `site` at `layer`."""
    if hook:
        if hook not in model.hook_dict:
            raise SaekitError(f"unknown hook {hook!r}; valid hooks: {_valid_hooks(model)}")
        return Site(
            "hook", _hook_layer(hook), hook, _probe_width(model, hook), _stop_at_layer(hook)
        )
    if site not in SITES:
        raise SaekitError(
            f"unknown site {site!r}; valid sites: {', '.join(SITES)} (or --hook NAME for any hook)"
        )
    n_layers = model.cfg.n_layers
    if layer is None or not 0 <= layer < n_layers:
        raise SaekitError(f"layer {layer} is out of range: this model has layers 0..{n_layers - 1}")
    hook_name = SITES[site].format(layer=layer)
    if site == "mlp_out_logits":
        return Site(site, layer, hook_name, model.cfg.d_vocab, None)
    if hook_name not in model.hook_dict:
        raise SaekitError(f"this model has no {hook_name} for site {site}; try --hook NAME")
    d_in = model.cfg.d_mlp if site == "mlp_post" else model.cfg.d_model
    return Site(site, layer, hook_name, int(d_in), layer + 1)


def resolve_sites(
    model: HookedTransformer, site: str | None, layer: int | None, hook: str | None
) -> list[Site]:
    """Comma-separated `site` (or `hook`) lists -> validated sites; `hook` wins over `site`."""
    if hook:
        names = [h.strip() for h in hook.split(",") if h.strip()]
        sites = [resolve_hook(model, None, None, h) for h in names]
    else:
        names = [s.strip() for s in (site or "").split(",") if s.strip()]
        if not names:
            raise SaekitError(f"no site given; valid sites: {', '.join(SITES)}")
        sites = [resolve_hook(model, s, layer, None) for s in names]
    if len({s.name for s in sites}) != len(sites):
        raise SaekitError(f"a site is listed twice in {hook or site!r}; list each once")
    return sites


def forward_plan(
    model: HookedTransformer, sites: list[Site]
) -> tuple[list[str], int | None, str | None]:
    """(hook names to read, stop_at_layer, return_type) for one forward pass serving all sites."""
    names: list[str] = []
    for s in sites:
        names.append(s.hook_name)
        if s.site in DERIVED and LN_SCALE_HOOK in model.hook_dict:
            names.append(LN_SCALE_HOOK)
    names = list(dict.fromkeys(names))
    stops = [s.stop_at_layer for s in sites]
    stop = None if None in stops else max(stops)  # type: ignore[type-var]
    return_type = "logits" if any(n.startswith("unembed.") for n in names) else None
    return names, stop, return_type


def mlp_out_logits(model: HookedTransformer, mlp_out: Tensor, ln_scale: Tensor | None) -> Tensor:
    """[rows, d_model] MLP updates -> [rows, d_vocab] direct logit effects (module docstring).

    `ln_scale`: ln_final's hook_scale at the same rows (None if the model has no ln_final).
    """
    norm = model.cfg.normalization_type
    x = mlp_out
    if norm in ("LN", "LNPre"):
        x = x - x.mean(-1, keepdim=True)
    if ln_scale is not None and norm is not None:
        x = x / ln_scale.mean()
    w = getattr(model.ln_final, "w", None)
    if w is not None:
        x = x * w
    return x @ model.W_U


class _Harvested(Exception):
    """Raised by the hook that delivers the last activation a forward pass needs."""


def harvest_flat(
    model: HookedTransformer, tokens: Tensor, index: Tensor, sites: list[Site]
) -> list[tuple[Tensor, Tensor | None]]:
    """One forward pass over `tokens` [batch, pos]; for each site, (acts, rows): the rows wanted
    are `acts[rows]`, or `acts` itself when `rows` is None. `index` holds the int64 indices into
    the flattened batch*pos positions whose rows are wanted (an index rather than a bool mask
    avoids a host sync on GPUs). The gather is left to the caller so that the cache can gather
    straight into a shard's memory; `harvest` does it here.

    The pass stops as soon as the last hook it needs has fired: `stop_at_layer` alone would
    still run the rest of that block (for `mlp_post`, the MLP's W_out: a quarter of a small
    model's block)."""
    names, stop, return_type = forward_plan(model, sites)
    acts: dict[str, Tensor] = {}

    def take(a: Tensor, hook) -> None:
        acts[hook.name] = a.reshape(a.shape[0] * a.shape[1], -1)
        if len(acts) == len(names):
            raise _Harvested

    with torch.inference_mode(), model.hooks(fwd_hooks=[(n, take) for n in names]):
        try:
            model(tokens, stop_at_layer=stop, return_type=return_type)
        except _Harvested:
            pass
        out: list[tuple[Tensor, Tensor | None]] = []
        for s in sites:
            if s.site in DERIVED:
                scale = acts.get(LN_SCALE_HOOK)
                rows = acts[s.hook_name].index_select(0, index)
                scale = None if scale is None else scale.index_select(0, index)
                out.append((mlp_out_logits(model, rows, scale), None))
            else:
                out.append((acts[s.hook_name], index))
    return out


def harvest(
    model: HookedTransformer, tokens: Tensor, index: Tensor, sites: list[Site]
) -> list[Tensor]:
    """`harvest_flat` with the rows gathered: for each site [len(index), d_in], in the model's
    dtype and on its device."""
    with torch.inference_mode():
        return [
            a if rows is None else a.index_select(0, rows)
            for a, rows in harvest_flat(model, tokens, index, sites)
        ]
