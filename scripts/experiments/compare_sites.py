"""Which activations give features that are easier to read in logit space, and which make more
ultra-rare features? Cache the same tokens at several sites of one model in one forward pass,
train one SAE per site with the same budget, and compare them in one report.

    python -m saekit.scripts.experiments.compare_sites                       # default model, ~15-20 min on 2 cores
    python -m saekit.scripts.experiments.compare_sites --out /tmp/cmp --steps 200 --tokens 100000

Same budget: every site gets the same tokens, steps, batch size and number of features.
Comparable sparsity: relu_l1 with the trainer's L1 convention, λ = c · mean_norm / sqrt(d_in),
i.e. the same c for inputs normalised to mean norm sqrt(d_in) (Anthropic / SAELens); c = 1.5
(half the trainer's default, which killed half the features of a short mlp_post run). We keep
relu_l1 rather than topk with a shared k because topk fixes L0 but removes the mechanism the
question is about: ultra-rare features come from the L1 penalty shrinking features plus
resampling; under topk + AuxK they do not arise the same way. L0 is reported per site so the
reader can see how comparable the sparsity turned out.

Logit-weight concentration of a feature: with w its logit weights (diagnostics.features.
logit_weights: decoder row → (W_out) → ln_final's linear approximation → W_U, shifted to median 0),
conc = Σ_{top 10 by |w|} |w_t| / Σ_t |w_t|: the share of the feature's absolute logit effect in its
10 strongest tokens. Scale-free, so comparable across sites; a flat row gives 10 / d_vocab,
a feature that boosts one token only gives ~1.

Outputs in --out: cache/<site>/, runs/<site>/ (with eval.json), reports/<site>/ (the full
diagnose report of each site), compare.json and compare.html.
"""

from __future__ import annotations

import csv
import html
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from saekit.sae.errors import SaekitError
from saekit.scripts.experiments import clear_out

DEFAULT_SITES = ["mlp_post", "mlp_out", "resid_post", "mlp_out_logits"]
TOP_TOKENS = 10


@dataclass
class CompareSitesConfig:
    """Train one SAE per site on the same tokens and budget and write one comparison report."""

    out: str = "saekit-compare-sites"
    """output dir (cache/, runs/, reports/, compare.html, compare.json)"""
    model: str = "default"
    """model to cache (default: the bundled default model)"""
    layer: int = 0
    """block of the sites"""
    sites: list[str] = field(default_factory=lambda: list(DEFAULT_SITES))
    """sites to compare (mlp_post, mlp_out, resid_post, mlp_out_logits, ...)"""
    tokens: int = 400_000
    """tokens cached per site (the same tokens for every site)"""
    context_size: int = 128
    """tokens per context"""
    cache_dtype: str = "float16"
    """storage dtype of the cache (mlp_out_logits is d_vocab wide: float16 halves the disk)"""
    features: int = 1024
    """SAE features, the same for every site"""
    steps: int = 600
    """training steps, the same for every site"""
    batch_size: int = 1024
    """activations per step"""
    l1_coef: float = 1.5
    """L1 coefficient for inputs of mean norm sqrt(d_in); each site's λ is this times its cache's mean_norm / sqrt(d_in)"""
    holdout: float = 0.0
    """fraction of each resampling's picks held out as a control group"""
    eval_tokens: int = 32_768
    """held-out tokens for splicing (loss recovered)"""
    seed: int = 0
    """seed of the cache order, initialisation and resampling"""
    device: str = "cpu"
    """torch device"""
    overwrite: bool = False
    """replace an existing comparison in --out"""


def logit_concentration(lw: torch.Tensor, k: int = TOP_TOKENS) -> torch.Tensor:
    """[F, d_vocab] logit weights -> [F] share of Σ|w| in the k largest |w| (see module doc)."""
    a = lw.abs()
    return a.topk(k, dim=1).values.sum(1) / a.sum(1).clamp_min(1e-30)


@torch.no_grad()
def site_concentration(run_dir: Path, model, scale: float) -> np.ndarray:
    from saekit.diagnostics.features import logit_site, logit_weights
    from saekit.sae.io import load_sae

    sae, meta = load_sae(run_dir)
    recipe = logit_site(meta.get("site"), meta["hook_name"], sae.W_dec.shape[1], model)
    if recipe is None:
        return np.full(sae.W_dec.shape[0], np.nan)
    out = [
        logit_concentration(
            logit_weights(sae.W_dec[i : i + 512], model, recipe, meta.get("layer"), scale)
        )
        for i in range(0, sae.W_dec.shape[0], 512)
    ]
    return torch.cat(out).cpu().numpy()


def _read_features(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    log10 = np.array([float(r["log10_density"]) for r in rows])
    cls = np.array([r["class"] for r in rows])
    return log10, cls


def _fresh_out(cfg: CompareSitesConfig) -> Path:
    """The output dir, emptied only if it is an earlier comparison and --overwrite says so."""
    out = Path(cfg.out)
    if len(set(cfg.sites)) != len(cfg.sites) or len(cfg.sites) < 1:
        raise SaekitError(f"--sites must list distinct sites, got {cfg.sites}")
    clear_out(out, cfg.overwrite, ("cache", "runs", "reports", "compare.json", "compare.html"))
    return out


def _site_result(cfg: CompareSitesConfig, site: str, cache: Path, out: Path, model, scale) -> dict:
    """Train, evaluate and diagnose one site; its row of the comparison (plus arrays for plots)."""
    from saekit.diagnostics.diagnose import DiagnoseConfig, diagnose
    from saekit.diagnostics.evaluate import EvaluateConfig, evaluate
    from saekit.training.config import TrainConfig
    from saekit.training.trainer import train

    print(f"compare_sites: {site}")
    manifest = json.loads((cache / "manifest.json").read_text())
    l1 = cfg.l1_coef * manifest["stats"]["mean_norm"] / math.sqrt(manifest["d_in"])
    run = train(
        TrainConfig(
            cache=str(cache),
            out=str(out / "runs" / site),
            arch="relu_l1",
            features=cfg.features,
            steps=cfg.steps,
            batch_size=cfg.batch_size,
            l1_coef=l1,
            resample="anthropic",
            resample_holdout=cfg.holdout,
            seed=cfg.seed,
            checkpoint_every=0,
            device=cfg.device,
        )
    )
    ev = evaluate(EvaluateConfig(run=str(run), tokens=cfg.eval_tokens, device=cfg.device))
    rep = diagnose(
        DiagnoseConfig(
            run=str(run),
            out=str(out / "reports" / site),
            cache=str(cache),
            tokens=cfg.tokens,
            device=cfg.device,
        )
    ).path
    summary = json.loads((rep / "summary.json").read_text())
    log10, cls = _read_features(rep / "features.csv")
    conc = site_concentration(Path(run), model, scale)
    live = cls == "live"
    m = ev.metrics
    return {
        "d_in": manifest["d_in"],
        "l1_coef": l1,
        "l0": m["l0"],
        "fvu_pooled": m["fvu_pooled"],
        "loss_recovered_zero": m.get("loss_recovered_zero"),
        "loss_recovered_mean": m.get("loss_recovered_mean"),
        "kl_clean_spliced": m.get("kl_clean_spliced"),
        "spliced": m["spliced"],
        "counts": summary["counts"],
        "fractions": summary["fractions"],
        "density_tokens": summary.get("window", {}).get("tokens"),
        "resolvable_threshold": summary.get("resolvable_threshold"),
        "rare_1e-4_fraction": float(((log10 < -4) & np.isfinite(log10)).mean()),
        "logit_concentration_median_live": float(np.nanmedian(conc[live])) if live.any() else None,
        "logit_concentration_mean_live": float(np.nanmean(conc[live])) if live.any() else None,
        "logit_concentration_flat_baseline": TOP_TOKENS / model.cfg.d_vocab,
        "report": str(rep / "report.html"),
        "_log10": log10,
        "_conc": conc,
        "_cls": cls,
    }


def compare_sites(cfg: CompareSitesConfig) -> Path:
    from saekit.activations.cache import build_cache
    from saekit.activations.cache_config import CacheConfig
    from saekit.activations.corpus import load_texts, tokenize_contexts
    from saekit.activations.models import load_model
    from saekit.diagnostics.features import ln_final_scale
    from saekit.sae.io import atomic_write_bytes, atomic_write_json

    out = _fresh_out(cfg)
    t0 = time.perf_counter()
    build_cache(
        CacheConfig(
            out=out / "cache",
            model=cfg.model,
            site=",".join(cfg.sites),
            layer=cfg.layer,
            tokens=cfg.tokens,
            context_size=cfg.context_size,
            dtype=cfg.cache_dtype,
            seed=cfg.seed,
            device=cfg.device,
        )
    )
    cache_of = {s: out / "cache" / s if len(cfg.sites) > 1 else out / "cache" for s in cfg.sites}
    model = load_model(cfg.model, device=cfg.device)
    scale_tokens = tokenize_contexts(
        load_texts("default", "test"), model.tokenizer, cfg.context_size, 16 * cfg.context_size
    )
    scale = ln_final_scale(model, scale_tokens)

    results = {s: _site_result(cfg, s, cache_of[s], out, model, scale) for s in cfg.sites}

    public = {s: {k: v for k, v in r.items() if not k.startswith("_")} for s, r in results.items()}
    doc = {
        "model": cfg.model,
        "layer": cfg.layer,
        "budget": {
            "tokens_cached": cfg.tokens,
            "features": cfg.features,
            "steps": cfg.steps,
            "batch_size": cfg.batch_size,
            "l1_coef_normalised": cfg.l1_coef,
        },
        "logit_concentration_definition": (
            f"share of sum |w| in the {TOP_TOKENS} largest |w| of a feature's logit weights "
            "(median-shifted, through ln_final's linear approximation)"
        ),
        "sites": public,
        "seconds": time.perf_counter() - t0,
    }
    atomic_write_json(out / "compare.json", doc)
    atomic_write_bytes(out / "compare.html", render_compare(doc, results).encode())
    _print_summary(doc, out)
    return out


def _print_summary(doc: dict, out: Path) -> None:
    public = doc["sites"]
    print(f"compare_sites: {len(public)} sites in {doc['seconds']:.0f}s")
    for s, r in public.items():
        lr = r["loss_recovered_zero"]
        print(
            f"  {s:<15} L0 {r['l0']:7.1f}  FVU {r['fvu_pooled']:.3f}  "
            f"loss rec {'  n/a' if lr is None else f'{lr:.3f}'}  "
            f"dead {r['fractions']['dead']:.3f}  ultra-rare {_f(r['fractions']['ultra_rare'])}  "
            f"logit conc (median, live) {_f(r['logit_concentration_median_live'])}"
        )
    print(f"report: {out / 'compare.html'}")


def _compare_figures(results: dict[str, dict]) -> list[tuple[str, object]]:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from saekit.diagnostics.figures import CLASS_COLOURS

    sites = list(results)
    figs = []
    f = make_subplots(rows=1, cols=len(sites), subplot_titles=sites, shared_yaxes=True)
    for j, s in enumerate(sites, 1):
        r = results[s]
        for name in ("ultra_rare", "live"):
            v = r["_log10"][(r["_cls"] == name) & np.isfinite(r["_log10"])]
            f.add_histogram(
                x=v,
                name=name,
                marker_color=CLASS_COLOURS[name],
                nbinsx=40,
                showlegend=j == 1,
                legendgroup=name,
                row=1,
                col=j,
            )
        f.update_xaxes(title_text="log10 density", row=1, col=j)
    f.update_layout(barmode="stack", height=380, margin=dict(t=40, b=40))
    figs.append(("log10 feature density per site (dead features, density 0, not shown)", f))

    f = go.Figure()
    for name in ("dead", "ultra_rare", "live"):
        f.add_bar(
            x=sites,
            y=[results[s]["fractions"][name] for s in sites],
            name=name,
            marker_color=CLASS_COLOURS[name],
        )
    f.update_layout(barmode="stack", yaxis_title="fraction of features", height=360)
    figs.append(("Class fractions", f))

    f = go.Figure()
    for b in ("zero", "mean"):
        f.add_bar(
            x=sites, y=[results[s][f"loss_recovered_{b}"] for s in sites], name=f"vs {b} ablation"
        )
    f.update_layout(yaxis_title="loss recovered", height=340)
    figs.append(("Loss recovered (derived sites cannot be spliced: no bar)", f))

    f = go.Figure()
    for s in sites:
        c = results[s]["_conc"][results[s]["_cls"] == "live"]
        f.add_box(y=c[np.isfinite(c)], name=s, boxpoints=False)
    f.update_layout(
        yaxis_title=f"logit mass in top {TOP_TOKENS} tokens (live features)", height=380
    )
    figs.append(("Logit-weight concentration", f))
    return figs


def render_compare(doc: dict, results: dict[str, dict]) -> str:
    from plotly.offline import get_plotlyjs

    from saekit.diagnostics.page import CSS

    sites = list(results)
    figs = _compare_figures(results)
    rows = "".join(
        f"<tr><td>{html.escape(s)}</td><td>{r['d_in']}</td><td>{r['l0']:.1f}</td>"
        f"<td>{r['fvu_pooled']:.3f}</td><td>{_f(r['loss_recovered_zero'])}</td>"
        f"<td>{_f(r['loss_recovered_mean'])}</td><td>{r['counts']['dead']}</td>"
        f"<td>{'not resolvable' if r['counts']['ultra_rare'] is None else r['counts']['ultra_rare']}</td><td>{r['counts']['live']}</td>"
        f"<td>{_f(r['logit_concentration_median_live'])}</td></tr>"
        for s, r in doc["sites"].items()
    )
    b = doc["budget"]
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>saekit: site comparison</title>",
        f"<style>{CSS}</style>",
        f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>",
        f"<h1>Site comparison: {html.escape(doc['model'])}, layer {doc['layer']}</h1>",
        f"<p>Same budget per site: {b['tokens_cached']:,} cached tokens, {b['features']} features, "
        f"{b['steps']} steps of {b['batch_size']}; relu_l1 with λ = {b['l1_coef_normalised']} · "
        "mean_norm / sqrt(d_in). Logit concentration: "
        f"{html.escape(doc['logit_concentration_definition'])}; a flat row scores "
        f"{next(iter(doc['sites'].values()))['logit_concentration_flat_baseline']:.4f}.</p>",
        "<table><tr><th>site</th><th>d_in</th><th>L0</th><th>FVU</th><th>loss rec. (zero)</th>"
        "<th>loss rec. (mean)</th><th>dead</th><th>ultra-rare</th><th>live</th>"
        "<th>logit conc. (median, live)</th></tr>",
        rows,
        "</table>",
    ]
    for k, (title, fig) in enumerate(figs):
        parts.append(f"<h2>{html.escape(title)}</h2>")
        parts.append(fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"plot-{k}"))
    parts.append(
        "<p>Per-site reports: "
        + " ".join(
            f"<a href='reports/{html.escape(s)}/report.html'>{html.escape(s)}</a>" for s in sites
        )
        + "</p></body></html>"
    )
    return "\n".join(parts)


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def main(argv: list[str] | None = None) -> None:
    from saekit.scripts.cli import run_script

    run_script(
        "saekit.scripts.experiments.compare_sites", __doc__, CompareSitesConfig, compare_sites, argv
    )


if __name__ == "__main__":
    main()
