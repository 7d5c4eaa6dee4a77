"""The trajectory test end to end on the default model: do rare features keep dying, or settle?

    python -m saekit.scripts.experiments.rare_features                 # ~25-30 min on 2 CPU cores
    python -m saekit.scripts.experiments.rare_features --steps 300     # a quick smoke run

Anthropic's A/1 recipe in small: relu_l1 on the default model's MLP neurons (`mlp_post`, 512
wide) with 4,096 features, Anthropic resampling at several points, and half of each resampling's
picks held out (never resampled) as the control group. The density history's windows are large
enough to resolve densities of ~1e-5 each; the report pools the last windows so that the class
thresholds (ultra-rare < 1e-6) are resolvable. The verdict is the report's trajectory test.
Outputs in --out: cache/, run/ (with eval.json), report/, experiment.json.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from saekit.sae.errors import SaekitError
from saekit.scripts.experiments import clear_out


@dataclass
class RareFeatureConfig:
    """Train a 4,096-feature relu_l1 SAE on the default model with resampling and a held-out
    control group, then run the trajectory test and write the report."""

    out: str = "saekit-rare-features"
    """output dir (cache/, run/, report/, experiment.json)"""
    tokens: int = 900_000
    """tokens to cache (training cycles over them)"""
    features: int = 4096
    """SAE features (Anthropic's A/1: 4,096)"""
    steps: int = 2400
    """training steps"""
    batch_size: int = 1024
    """activations per step"""
    l1_coef: float = 1.2
    """L1 coefficient in the cache's units (the trainer's default here would be ~1.7)"""
    resample_at: list[float] = field(default_factory=lambda: [0.15, 0.3, 0.45, 0.6])
    """fractions of training at which to resample (the last one leaves time to watch trends)"""
    holdout: float = 0.5
    """fraction of each resampling's picks left alone as the control group"""
    resample_below: float | None = None
    """resample features below this density over the dead window, not only silent ones, so the
    control group holds rare features that still fire (None: Anthropic's rule)"""
    density_window: int = 65_536
    """tokens per density-history window"""
    pool_tokens: int = 1_000_000
    """the report pools the last windows until they hold this many tokens (1e6 resolves 1e-6)"""
    seed: int = 0
    """seed for the cache order, initialisation and resampling"""
    device: str = "cpu"
    """torch device"""
    overwrite: bool = False
    """replace an existing experiment in --out"""


def rare_feature_experiment(cfg: RareFeatureConfig) -> Path:
    from saekit.activations.cache import build_cache
    from saekit.activations.cache_config import CacheConfig
    from saekit.diagnostics.diagnose import DiagnoseConfig, diagnose
    from saekit.diagnostics.evaluate import EvaluateConfig, evaluate
    from saekit.sae.io import atomic_write_json
    from saekit.training.config import TrainConfig
    from saekit.training.trainer import train

    out = Path(cfg.out)
    if not all(0 < f < 1 for f in cfg.resample_at):
        raise SaekitError(f"--resample-at fractions must be in (0, 1), got {cfg.resample_at}")
    clear_out(out, cfg.overwrite, OWN)
    t0 = time.perf_counter()
    cache = build_cache(
        CacheConfig(
            out=out / "cache",
            model="default",
            site="mlp_post",
            tokens=cfg.tokens,
            seed=cfg.seed,
            device=cfg.device,
        )
    )
    resample_steps = sorted({max(1, round(f * cfg.steps)) for f in cfg.resample_at})
    run = train(
        TrainConfig(
            cache=str(cache.path),
            out=str(out / "run"),
            arch="relu_l1",
            features=cfg.features,
            steps=cfg.steps,
            batch_size=cfg.batch_size,
            l1_coef=cfg.l1_coef,
            resample="anthropic",
            resample_steps=resample_steps,
            resample_holdout=cfg.holdout,
            resample_below=cfg.resample_below,
            density_window=cfg.density_window,
            checkpoint_every=0,
            seed=cfg.seed,
            device=cfg.device,
        )
    )
    ev = evaluate(EvaluateConfig(run=str(run), device=cfg.device))
    report = diagnose(
        DiagnoseConfig(
            run=str(run),
            out=str(out / "report"),
            min_window_tokens=cfg.pool_tokens,
            device=cfg.device,
        )
    ).path
    summary = json.loads((report / "summary.json").read_text())
    doc = record(cfg, resample_steps, t0, summary, ev.metrics, report)
    atomic_write_json(out / "experiment.json", doc)
    c = summary["counts"]
    print(
        f"rare_feature_experiment: {cfg.features} features: {c['dead']} dead, {c['ultra_rare']} "
        f"ultra-rare, {c['live']} live (Anthropic A/1: 168 dead, 292 ultralow of 4,096); "
        f"{summary.get('held_out')} held out; {doc['seconds']:.0f}s"
    )
    print(f"verdict: {(summary.get('trajectory_test') or {}).get('verdict')}")
    print(f"report: {doc['report']}")
    return out


OWN = ("cache", "run", "report", "experiment.json")  # everything the experiment writes in --out


def record(
    cfg: RareFeatureConfig,
    resample_steps: list[int],
    t0: float,
    summary: dict,
    metrics: dict,
    report: Path,
) -> dict:
    """experiment.json: the config, the class counts, the test's verdict, the quality."""
    return {
        "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        "resample_steps": resample_steps,
        "seconds": time.perf_counter() - t0,
        "counts": summary["counts"],
        "held_out": summary.get("held_out"),
        "window": summary.get("window"),
        "l0": metrics["l0"],
        "fvu_pooled": metrics["fvu_pooled"],
        "loss_recovered_zero": metrics["loss_recovered_zero"],
        "loss_recovered_mean": metrics["loss_recovered_mean"],
        "trajectory_test": summary.get("trajectory_test"),
        "geometry": summary.get("geometry"),
        "report": str(report / "report.html"),
        "anthropic_a1": {"features": 4096, "dead": 168, "ultra_rare": 292},
    }


def main(argv: list[str] | None = None) -> None:
    from saekit.scripts.cli import run_script

    run_script(
        "saekit.scripts.experiments.rare_features",
        __doc__,
        RareFeatureConfig,
        rare_feature_experiment,
        argv,
    )


if __name__ == "__main__":
    main()
