"""Rare features with ground truth: do an SAE's rare features stay real, or die, on synthetic data?

    python -m saekit.scripts.experiments.synthetic_rare                      # the study (~1 h, 2 cores)
    python -m saekit.scripts.experiments.synthetic_rare --steps 20 --seeds 0 --arms off \\
        --control-arms --out /tmp/smoke                                       # seconds

Trains SAEs (relu_l1, or another --arch) on a synthetic source whose features are known
(activations/synthetic.py), with planted blocks of true features at 1e-4, 1e-5 and 1e-6, in
three arms: `off` (no resampling), `anthropic` (Anthropic's rule: silent over the dead window,
half of each event's picks held out as the control group) and `below` (`--resample-below`:
features below a density over the dead window, so the held-out half holds rare features that
still fire);
each arm on several seeds (the seed sets both the source's dictionary and rows and the SAE's
initialisation and resampling). `--control-arms` also runs the artifact-control variant (no
true feature below 1e-3: any SAE feature below 1e-5 is an artifact by construction).

Each run is trained, evaluated (`saekit evaluate`: FVU, L0 on fresh rows) and diagnosed
(`saekit diagnose` with the last windows pooled: classes, ground-truth scoring, the trajectory
test). A run whose result.json exists is not redone (re-run the same command to finish a
study). Outputs in --out: runs/NAME/{run,report,result.json}, results.json (every run and the
per-arm aggregate: mean and min..max over seeds) and results.md (the tables).

The default spec keeps a rare true feature separable: 128 true features in 64 dimensions with
pairwise |cos| <= 0.15, magnitudes 1 + Exp(mean 0.1) (a floor far above the interference of the
~1.2 co-active features), low noise. Check a spec before training with
`python -m saekit.scripts.experiments.synthetic_rare --check-spec`: the planted-dictionary SAE's
rare features must score as real.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saekit.sae.archs import ArchName
from saekit.sae.errors import SaekitError
from saekit.scripts.experiments import clear_out

ARMS = ("off", "anthropic", "below")
SPEC = [
    "d_in=64", "n_features=128", "max_cos=0.15", "p_max=0.1", "p_min=1e-4",
    "planted=1e-4,1e-5,1e-6", "planted_per_block=16", "magnitude_offset=1.0",
    "magnitude_mean=0.1", "noise_std=0.01", "noise_ratio=4",
]  # fmt: skip


@dataclass
class SyntheticRareConfig:
    """Train, evaluate and diagnose SAEs of one arch on a synthetic source with planted rare
    features, per resampling arm and seed, and tabulate them with intervals across seeds."""

    out: str = "saekit-synthetic-rare"
    """output dir (runs/, results.json, results.md)"""
    synthetic: list[str] = field(default_factory=lambda: list(SPEC))
    """the source: SyntheticConfig FIELD=VALUE items (the seed is set per run)"""
    arch: ArchName = "relu_l1"
    """SAE architecture (sae/archs.py; the arms' resampling replaces its own)"""
    k: int = 2
    """--k of archs that take one (topk, batchtopk, matryoshka); 2 is relu_l1's L0 here"""
    features: int = 256
    """SAE features"""
    steps: int = 2000
    """training steps per run"""
    batch_size: int = 4096
    """activations per step"""
    l1_coef: float | None = None
    """L1 coefficient (None: the trainer's default)"""
    lr: float | None = 3e-3
    """Adam learning rate (None: the trainer's default, 1e-3; 3e-3 gets past the early
    sparsification within the budget)"""
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    """resampling arms to run: off | anthropic | below"""
    control_arms: list[str] = field(default_factory=lambda: ["below"])
    """arms also run on the artifact-control variant (no true feature below 1e-3)"""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """seeds (each sets the source's dictionary and rows and the SAE's init and resampling)"""
    resample_at: list[float] = field(default_factory=lambda: [0.4])
    """fractions of training at which resampling arms resample"""
    holdout: float = 0.5
    """fraction of each resampling's picks held out as the control group"""
    resample_below: float = 1e-4
    """the `below` arm: resample features below this density over the dead window"""
    density_window: int = 131_072
    """tokens per density-history window"""
    pool_tokens: int = 2_000_000
    """diagnose pools the last windows until they hold this many tokens"""
    rare_threshold: float = 1e-4
    """SAE features below this density are `rare`: the trajectory test's rare group and the
    classes of rare SAE features"""
    burn_in_tokens: int = 2_097_152
    """the trajectory test skips this many tokens after each feature's segment start (the start,
    or its hold-out), past the early sparsification that every feature shares"""
    selection_fraction: float = 0.33
    """the rare group is chosen on this share of its windows after burn-in, tested on the rest"""
    check_spec: bool = False
    """only score the planted-dictionary SAE on the spec (no training) and print it"""
    device: str = "cpu"
    """torch device"""
    overwrite: bool = False
    """delete --out first"""


def _arm_flags(cfg: SyntheticRareConfig, arm: str) -> dict[str, Any]:
    if arm == "off":
        return {"resample": "none"}
    steps = sorted({max(1, round(f * cfg.steps)) for f in cfg.resample_at})
    below = cfg.resample_below if arm == "below" else None
    return dict(resample="anthropic", resample_steps=steps, resample_holdout=cfg.holdout,
                resample_below=below)  # fmt: skip


def _one_run(
    cfg: SyntheticRareConfig, variant: str, arm: str, seed: int, where: Path, planted: list[float]
) -> dict:
    """Train, evaluate and diagnose one run; its result.json (the numbers the tables need)."""
    from saekit.diagnostics.diagnose import DiagnoseConfig, diagnose
    from saekit.diagnostics.evaluate import EvaluateConfig, evaluate
    from saekit.sae.io import atomic_write_json
    from saekit.training.config import TrainConfig
    from saekit.training.trainer import train

    t0 = time.perf_counter()
    if where.exists():  # a run interrupted before its result.json: start it again
        shutil.rmtree(where)
    spec = [*cfg.synthetic, f"seed={seed}", f"variant={variant}"]
    run = train(
        TrainConfig(
            out=str(where / "run"),
            synthetic=spec,
            arch=cfg.arch,
            k=cfg.k,
            features=cfg.features,
            steps=cfg.steps,
            batch_size=cfg.batch_size,
            l1_coef=cfg.l1_coef,
            lr=cfg.lr,
            density_window=cfg.density_window,
            checkpoint_every=0,
            seed=seed,
            device=cfg.device,
            **_arm_flags(cfg, arm),
        )  # fmt: skip
    )
    t_train = time.perf_counter() - t0
    ev = evaluate(EvaluateConfig(run=str(run), device=cfg.device)).metrics
    rep = diagnose(
        DiagnoseConfig(
            run=str(run),
            out=str(where / "report"),
            min_window_tokens=cfg.pool_tokens,
            rare_threshold=cfg.rare_threshold,
            burn_in_tokens=cfg.burn_in_tokens,
            selection_fraction=cfg.selection_fraction,
            device=cfg.device,
            logits=False,
        )  # fmt: skip
    ).path
    s = json.loads((rep / "summary.json").read_text())
    gt, traj = s["ground_truth"], s["trajectory_test"]
    res = {
        "variant": variant, "arm": arm, "seed": seed, "arch": cfg.arch, "train_seconds": t_train,
        "seconds": time.perf_counter() - t0, "tokens": cfg.steps * cfg.batch_size,
        "fvu": ev["fvu_pooled"], "l0": ev["l0"], "window_tokens": s["window"]["tokens"],
        "dead": s["counts"]["dead"], "held_out": s["held_out"],
        "n_rare_resolved": gt["rare"]["resolved"],
        "rare_live": gt["rare"]["live"], "rare_dead": gt["rare"]["dead"],
        "below": _rare_classes(rep / "features.csv", cfg.rare_threshold),
        "planted": _planted_matched(rep / "features.csv", planted),
        "trend_median": _median_trends(rep / "features.csv"),
        "n_matched": gt["matching"]["n_matched"], "recovery": gt["recovery_curve"],
        "trajectory": {g: v["counts"] | {"n": v["n"], "n_tested": v["n_tested"]}
                       for g, v in traj.get("by_group", {}).items()},
        "baseline_trend": (traj.get("baseline") or {}).get("trend_decades_per_1e7_tokens"),
        "verdict": traj.get("verdict"),
    }  # fmt: skip
    atomic_write_json(where / "result.json", res)
    return res


def _rare_classes(csv_path: Path, threshold: float) -> dict[str, int]:
    """SAE features firing below `threshold` on the pooled window, by their decoder match:
    to a true feature with p <= 1e-4 (matched_rare), to a more frequent one (matched_frequent),
    to none at cos >= 0.9 (unmatched)."""
    import csv

    out = dict.fromkeys(("n", "matched_rare", "matched_frequent", "unmatched"), 0)
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            if not 0 < float(row["density"]) < threshold:
                continue
            out["n"] += 1
            if int(row["gt_true_feature"]) < 0:
                out["unmatched"] += 1
            else:
                out["matched_rare" if float(row["gt_p_true"]) <= 1e-4 else "matched_frequent"] += 1
    return out


def _planted_matched(csv_path: Path, planted: list[float]) -> dict[str, int]:
    """How many SAE features are matched to each planted block's true features (the matching is
    unique, so this is the block's recall times its size)."""
    import csv

    with open(csv_path, newline="") as f:
        p = [float(r["gt_p_true"]) for r in csv.DictReader(f) if int(r["gt_true_feature"]) >= 0]
    return {f"{d:.0e}": sum(abs(v - d) <= 1e-9 * d for v in p) for d in planted}


def _median_trends(csv_path: Path) -> dict[str, float | None]:
    """Median fitted trend (decades per 1e7 tokens, relative to the live baseline) of the
    trajectory test's tested control and rare features."""
    import csv
    import statistics

    by: dict[str, list[float]] = {"control": [], "rare": []}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            if row["trajectory_group"] in by and row["trend"] not in ("", "nan"):
                by[row["trajectory_group"]].append(float(row["trend"]))
    return {g: statistics.median(v) if v else None for g, v in by.items()}


def _stat(vals: list[float | None]) -> dict | None:
    """Mean and min..max over seeds (None when a seed has no value)."""
    if not vals or any(v is None for v in vals):
        return None
    return {"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def _flatten(r: dict) -> dict[str, float | None]:
    """The per-run numbers aggregated across seeds, by name."""
    keys = ("baseline_trend", "fvu", "l0", "dead", "held_out", "n_matched")
    out: dict[str, float | None] = {k: r[k] for k in keys}
    live = r["rare_live"]
    for k in ("n", "real_rare", "unresolved", "imprecise", "absorbed", "artifact"):
        out[f"rare_{k}"] = live[k] if r["n_rare_resolved"] else None
    for k, v in r.get("trend_median", {}).items():
        out[f"trend_{k}"] = v
    for k, v in r.get("planted", {}).items():
        out[f"planted_{k}"] = v
    for k, v in r["below"].items():
        out[f"below_{k}"] = v
    for b in r["recovery"]:
        out[f"recall_{b['p_lo']:.0e}"] = b["recall"]
    for g, c in r["trajectory"].items():
        for k, v in c.items():
            out[f"traj_{g}_{k}"] = v
    return out


def aggregate(results: list[dict]) -> list[dict]:
    """Per (variant, arm): every flattened number's mean and min..max over seeds."""
    by: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        by.setdefault((r["variant"], r["arm"]), []).append(r)
    out = []
    for (variant, arm), rs in by.items():
        flat = [_flatten(r) for r in rs]
        keys = sorted({k for f in flat for k in f})
        out.append({"variant": variant, "arm": arm, "seeds": [r["seed"] for r in rs],
                    "stats": {k: _stat([f.get(k) for f in flat]) for k in keys}})  # fmt: skip
    return out


def _cell(s: dict | None, fmt: str = "{:.3g}", none: str = "unresolved") -> str:
    if s is None:
        return none
    if s["min"] == s["max"]:
        return fmt.format(s["mean"])
    return f"{fmt.format(s['mean'])} ({fmt.format(s['min'])}..{fmt.format(s['max'])})"


def markdown(agg: list[dict], cfg: SyntheticRareConfig) -> str:
    """The tables: per arm, mean (min..max) over seeds."""
    lines = [f"Per arm: mean (min..max) over seeds; {cfg.arch}, {cfg.features} features, {cfg.steps} steps "
             f"of {cfg.batch_size} ({cfg.steps * cfg.batch_size:,} tokens per run).", "",
             "| variant | arm | seeds | FVU | L0 | dead | held out | SAE feats < 1e-5 | real_rare | "
             "unresolved | imprecise | absorbed | artifact |", "|" + "---|" * 13]  # fmt: skip
    for a in agg:
        s = a["stats"]
        cells = [_cell(s.get(k)) for k in ("fvu", "l0", "dead", "held_out", "rare_n",
                 "rare_real_rare", "rare_unresolved", "rare_imprecise", "rare_absorbed", "rare_artifact")]  # fmt: skip
        lines.append(
            f"| {a['variant']} | {a['arm']} | {len(a['seeds'])} | " + " | ".join(cells) + " |"
        )
    lines += ["", f"SAE features firing below {cfg.rare_threshold:g} on the pooled window, by decoder "
              "match (cos >= 0.9) to a true feature:", "",
              "| variant | arm | n | matched to p <= 1e-4 | matched to p > 1e-4 | unmatched |",
              "|" + "---|" * 6]  # fmt: skip
    for a in agg:
        cells = [_cell(a["stats"].get(f"below_{k}"))
                 for k in ("n", "matched_rare", "matched_frequent", "unmatched")]  # fmt: skip
        lines.append(f"| {a['variant']} | {a['arm']} | " + " | ".join(cells) + " |")
    recall = sorted({k for a in agg for k in a["stats"] if k.startswith("recall_")},
                    key=lambda k: -float(k.split("_")[1]))  # fmt: skip
    lines += ["", "Recall of true features by true frequency (bin's lower edge):", "",
              "| variant | arm | " + " | ".join(k.split("_")[1] for k in recall) + " |",
              "|" + "---|" * (2 + len(recall))]  # fmt: skip
    for a in agg:
        cells = [_cell(a["stats"].get(k), "{:.2f}", "-") for k in recall]  # -: no true feature
        lines.append(f"| {a['variant']} | {a['arm']} | " + " | ".join(cells) + " |")
    blocks = sorted({k for a in agg for k in a["stats"] if k.startswith("planted_")},
                    key=lambda k: -float(k.split("_")[1]))  # fmt: skip
    lines += ["", "SAE features matched to each planted block's true features:", "",
              "| variant | arm | " + " | ".join(k.split("_")[1] for k in blocks) + " |",
              "|" + "---|" * (2 + len(blocks))]  # fmt: skip
    for a in agg:
        if a["variant"] == "standard":
            cells = [_cell(a["stats"].get(k)) for k in blocks]
            lines.append(f"| {a['variant']} | {a['arm']} | " + " | ".join(cells) + " |")
    lines += ["", "Trajectory test (features per outcome; median trend of the tested ones in decades "
              "per 1e7 tokens relative to the live baseline):",
              "", "| variant | arm | group | n | falling | died | settled | unresolved | median trend | "
              "baseline's own trend |", "|" + "---|" * 10]  # fmt: skip
    for a in agg:
        for g in ("control", "rare"):
            n = a["stats"].get(f"traj_{g}_n")
            if n is None or n["max"] == 0:  # no such group in this arm
                continue
            cells = [_cell(a["stats"].get(f"traj_{g}_{k}"), "{:.3g}")
                     for k in ("n", "falling", "died", "settled", "unresolved")]  # fmt: skip
            cells.append(_cell(a["stats"].get(f"trend_{g}"), "{:.2f}"))
            cells.append(_cell(a["stats"].get("baseline_trend"), "{:.2f}"))
            lines.append(f"| {a['variant']} | {a['arm']} | {g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def check_spec(cfg: SyntheticRareConfig) -> list[dict]:
    """Score SAEs whose decoder is the true dictionary (encoder its transpose, b_dec the mean,
    encoder bias -0.5 and -0.8) on the spec: the rare true features' recall and false-positive
    rates on ordinary rows, and the classes of SAE features below 1e-5 with the counts such an
    SAE would make over 1e8 rows (its firing rate p r + (1 - p) fp, Poisson)."""
    import torch

    from saekit.activations.source import parse_synthetic
    from saekit.activations.synthetic import SyntheticSource
    from saekit.diagnostics.ground_truth import ScoreConfig, score
    from saekit.sae.model import SAE, SAEConfig

    src = SyntheticSource(parse_synthetic(cfg.synthetic))
    sae = SAE(SAEConfig("relu_l1", src.d_in, src.n_true))
    sc = ScoreConfig(n_probes=512, n_ordinary=262_144)
    rare, T = src.p < 1e-4, 10**8
    l0 = float(src.sample_batch(65_536, 1).active.row_ptr.diff().float().mean())
    rows = []
    for bias in (-0.5, -0.8):
        with torch.no_grad():
            sae.W_dec.copy_(src.directions)
            sae.W_enc.copy_(src.directions.T)
            sae.b_enc.fill_(bias)
            sae.b_dec.copy_(src.mu)
        first = score(sae, src, torch.poisson(src.p.float() * 1e10).long(), 10**10, sc)
        rate = src.p * first.recall + (1 - src.p) * first.fp
        live = score(sae, src, torch.poisson(rate * T).long(), T, sc).summary()["rare"]["live"]
        fp = first.fp[rare]
        rows.append({"bias": bias, "source_l0": l0, "rare_true": int(rare.sum()),
                     "recall_min": float(first.recall[rare].min()), "fp_mean": float(fp.mean()),
                     "fp_max": float(fp.max()), "fp_zero": int((fp == 0).sum()),
                     "below_1e-5_on_1e8_rows": live})  # fmt: skip
        print(json.dumps(rows[-1]))
    return rows


def synthetic_rare(cfg: SyntheticRareConfig) -> Path:
    from saekit.activations.source import parse_synthetic
    from saekit.sae.io import atomic_write_json

    if cfg.check_spec:
        check_spec(cfg)
        return Path(cfg.out)
    bad = sorted(set(cfg.arms + cfg.control_arms) - set(ARMS))
    if bad or not cfg.seeds:
        raise SaekitError(f"arms must be among {list(ARMS)} (got {bad}) and --seeds non-empty")
    out = Path(cfg.out)
    if cfg.overwrite:  # without it, runs already in --out are kept and skipped
        clear_out(out, True, ("runs", "results.json", "results.md"))
    spec = parse_synthetic(cfg.synthetic)
    planted = lambda v: [] if v == "artifact_control" else spec.planted  # noqa: E731
    plan = [("standard", a, s) for a in cfg.arms for s in cfg.seeds]
    plan += [("artifact_control", a, s) for a in cfg.control_arms for s in cfg.seeds]
    results = []
    for i, (variant, arm, seed) in enumerate(plan):
        where = out / "runs" / f"{variant}-{arm}-s{seed}"
        done = where / "result.json"
        r = (
            json.loads(done.read_text())
            if done.is_file()
            else _one_run(cfg, variant, arm, seed, where, planted(variant))
        )
        if "trend_median" not in r:  # a result.json from before these were kept
            r["planted"] = _planted_matched(where / "report" / "features.csv", planted(variant))
            r["trend_median"] = _median_trends(where / "report" / "features.csv")
        print(f"synthetic_rare: [{i + 1}/{len(plan)}] {variant} {arm} seed {seed}: FVU "
              f"{r['fvu']:.3f}, L0 {r['l0']:.1f}, {r['dead']} dead, {r['seconds']:.0f}s", flush=True)  # fmt: skip
        results.append(r)
    agg = aggregate(results)
    conf = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
    atomic_write_json(out / "results.json", {"config": conf, "runs": results, "arms": agg})
    (out / "results.md").write_text(markdown(agg, cfg))
    print(f"synthetic_rare: {len(results)} runs; tables in {out / 'results.md'}")
    return out


def main(argv: list[str] | None = None) -> None:
    from saekit.scripts.cli import run_script

    run_script("saekit.scripts.experiments.synthetic_rare", __doc__, SyntheticRareConfig,
               synthetic_rare, argv)  # fmt: skip


if __name__ == "__main__":
    main()
