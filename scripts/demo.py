"""`saekit demo`: the rare-feature story end to end in under 3 minutes on 2 CPU cores.

    saekit demo                     # synthetic: -> saekit-demo/{run,report}/
    saekit demo --model default     # the bundled model: -> saekit-demo/{cache,run,report}/
    python -m saekit.scripts.demo --out /tmp/demo

By default it trains a `relu_l1` SAE on synthetic activations whose true features are known
(activations/synthetic.py): a power law of frequencies plus planted blocks of rare features,
so the answer is known. Resampling (`--resample-below`: rare features too, not only silent
ones) with half of each resampling's picks held out gives a control group of rare, still-firing
features for the trajectory test; the report scores every rare SAE feature against the truth
(real rare, absorbed, artifact). `--model default` instead caches the default model's MLP
neurons (`mlp_post`) on the default corpus, trains there, splices the SAE back into the model
(`saekit evaluate`) and writes the report with text contexts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

from ..sae.errors import SaekitError
from ..sae.lock import DirLock, entries
from ..sae.outdir import check_replace, drop_stash, remove_owned, restore_stash, stash_owned

DEFAULT_D_IN = 512  # the default model's d_mlp: the width of its mlp_post cache
# The synthetic demo's source: 32-wide rows, 256 true features whose frequencies run from 0.1
# down to 1e-7, plus planted blocks of rare features; parents with children, so absorption happens.
SYNTHETIC_SPEC = [
    "d_in=32",
    "n_features=256",
    "planted=1e-4,3e-5,1e-5,3e-6",
    "planted_per_block=16",
    "n_parents=16",
    "children_per_parent=2",
    "seed=0",
]


@dataclass
class DemoConfig:
    """Train an SAE, run the trajectory test and write the report in under 3 minutes on 2 CPU
    cores: on synthetic activations with known rare features (default), or on the bundled model."""

    out: str = "saekit-demo"
    """output dir: run/ and report/ (and cache/ with --model default) go under it"""
    model: Literal["synthetic", "default"] = "synthetic"
    """synthetic: activations with planted rare features and a known answer; default: the
    bundled model's MLP neurons on the default corpus"""
    synthetic: list[str] = field(default_factory=list)
    """with --model synthetic: FIELD=VALUE items (or JSON/YAML files) that change the demo's
    synthetic source (see SyntheticConfig)"""
    tokens: int = 800_000
    """with --model default: activations (tokens) to cache (the default corpus' train split
    holds ~950k at context 128)"""
    steps: int | None = None
    """training steps (None: 1500 synthetic, 600 default)"""
    batch_size: int | None = None
    """activations per training step (None: 4096 synthetic, 2048 default)"""
    features: int = 1024
    """number of SAE features"""
    l1_coef: float | None = None
    """L1 coefficient in the source's units (None: 0.7 on the default model, about half the
    trainer's default, which leaves FVU above 0.2 at this short budget; 1.6 synthetic, a third
    above the trainer's default, so more features turn rare within the budget)"""
    lr: float | None = None
    """Adam learning rate (None: 5e-3 synthetic, so features sort themselves out within the
    budget; the trainer's default on the default model)"""
    holdout: float = 0.5
    """fraction of each resampling's picks left alone as a control group"""
    resample_below: float | None = 2e-4
    """with --model synthetic: resample features below this density over the dead window, so
    the control group holds rare features that still fire (the default model uses Anthropic's
    rule: no firing)"""
    scan_tokens: int = 131_072
    """with --model synthetic: fresh rows the feature dashboards scan for examples (--model
    default scans the whole cache)"""
    eval_tokens: int = 65_536
    """tokens of the held-out split (rows of the synthetic source) to evaluate the SAE on"""
    seed: int = 0
    """seed for the cache order, the initialisation and resampling"""
    device: str = "cpu"
    """torch device"""
    overwrite: bool = False
    """replace an existing demo in --out"""

    def resolved(self) -> tuple[int, int]:
        """(steps, batch size) after the per-model defaults."""
        syn = self.model == "synthetic"
        steps = self.steps if self.steps is not None else (1500 if syn else 600)
        batch = self.batch_size if self.batch_size is not None else (4096 if syn else 2048)
        return steps, batch


class DemoResult(NamedTuple):
    out: Path
    report: Path  # report.html
    live: int
    fvu: float
    loss_recovered: float | None  # None: synthetic (no model to splice into)


def demo(cfg: DemoConfig) -> DemoResult:
    out = Path(cfg.out)
    _check_config(cfg)
    if out.exists() and not out.is_dir():
        raise SaekitError(f"--out {out} is a file; pass a directory")
    _check_out(cfg, out)
    with DirLock(out, "demo"):  # one writer per dir (and the cache, run and report lock theirs)
        _check_out(cfg, out)  # again, under the lock
        stashed = stash_owned(out, "demo")  # --overwrite: the old demo aside, checked above
        try:
            result = _pipeline(cfg, out)
        except (SaekitError, OSError):
            # A failed demo cannot be resumed: leave --out as it was (the old demo, or nothing).
            if stashed:
                restore_stash(out)
            else:
                remove_owned(out, "demo")  # (and the lock removes a dir it made)
            raise
        drop_stash(out)
        return result


def _check_out(cfg: DemoConfig, out: Path) -> None:
    if entries(out):
        check_replace(out, "demo", "--overwrite" if cfg.overwrite else "--out")
        if not cfg.overwrite:
            raise SaekitError(f"{out} is not empty; pass --overwrite or another --out")


def _train_config(cfg: DemoConfig, cache: Path | None, run: Path):
    from ..training.config import TrainConfig

    steps, batch = cfg.resolved()
    syn = cfg.model == "synthetic"
    return TrainConfig(
        cache=None if syn else str(cache),
        synthetic=[*SYNTHETIC_SPEC, *cfg.synthetic] if syn else None,
        out=str(run),
        arch="relu_l1",
        features=cfg.features,
        steps=steps,
        batch_size=batch,
        l1_coef=cfg.l1_coef if cfg.l1_coef is not None else (1.6 if syn else 0.7),
        lr=cfg.lr if cfg.lr is not None or not syn else 5e-3,
        resample="anthropic",
        # synthetic: resample early (20, 35, 50%) so the control group has half of training left
        resample_steps=[steps * k // 20 for k in (4, 7, 10)] if syn else None,
        resample_holdout=cfg.holdout,
        resample_below=cfg.resample_below if syn else None,
        # windows of ~1/50 of training: enough points for a trend, each resolving ~1e-5
        density_window=max(batch, steps * batch // 50) if syn else None,
        seed=cfg.seed,
        checkpoint_every=0,
        device=cfg.device,
    )


def _pipeline(cfg: DemoConfig, out: Path) -> DemoResult:
    from ..diagnostics.diagnose import DiagnoseConfig, diagnose
    from ..diagnostics.evaluate import EvaluateConfig, evaluate
    from ..training.trainer import train

    t0 = time.perf_counter()
    syn = cfg.model == "synthetic"
    cache = None if syn else _cache(cfg, out)
    run = train(_train_config(cfg, cache, out / "run"))
    ev = evaluate(EvaluateConfig(run=str(run), tokens=cfg.eval_tokens, device=cfg.device))
    steps, batch = cfg.resolved()
    report = diagnose(
        DiagnoseConfig(
            run=str(run),
            out=str(out / "report"),
            cache=None if cache is None else str(cache),
            # the density the classes use: the last windows pooled to 1e6 tokens (10 firings
            # resolve 1e-5; 1e-6 would need 1e7, more than the run's 6.1M)
            min_window_tokens=10**6 if syn else 0,
            scan_tokens=cfg.scan_tokens if syn else None,  # None: the whole cache
            device=cfg.device,
        )
    )
    s, m = report.summary, ev.metrics
    result = {
        "model": cfg.model,
        "n_features": s["n_features"],
        "live": _count(s, "live"),
        "dead": _count(s, "dead"),
        "ultra_rare": s["counts"]["ultra_rare"],  # None: the window cannot resolve it
        "control": s["held_out"],
        "trajectory": {g: v["counts"] for g, v in s["trajectory_test"].get("by_group", {}).items()},
        "ground_truth": _rare_classes(s),
        "l0": m["l0"],
        "fvu": m["fvu_pooled"],
        "loss_recovered": m.get("loss_recovered_zero"),
        "loss_recovered_mean_ablation": m.get("loss_recovered_mean"),
        "kl": m.get("kl_clean_spliced"),
        "seconds": time.perf_counter() - t0,
        "report": str(report.html),
    }
    from ..sae.io import atomic_write_json

    atomic_write_json(out / "demo.json", result)
    print(final_line(result))
    return DemoResult(
        out, Path(result["report"]), result["live"], m["fvu_pooled"], result["loss_recovered"]
    )


def _cache(cfg: DemoConfig, out: Path) -> Path:
    from ..activations.cache import build_cache
    from ..activations.cache_config import CacheConfig

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
    return cache.path


def _rare_classes(s: dict) -> dict | None:
    """The ground truth's classes of the SAE's rare features (None: not a synthetic run)."""
    gt = s.get("ground_truth")
    if not gt:
        return None
    live = gt["rare"]["live"]
    return {"density_below": gt["rare"]["density_below"], **live}


def final_line(r: dict) -> str:
    """What the demo found, in one line: classes, the truth about the rare ones, the control
    group's outcomes, where the report is."""
    parts = [f"demo: {r['n_features']} features, {r['dead']} dead"]
    ur = r["ultra_rare"]
    parts.append("ultra-rare not resolvable" if ur is None else f"{ur} ultra-rare (< 1e-6)")
    gt = r["ground_truth"]
    if gt is not None:
        parts.append(
            f"{gt['n']} rare (< {gt['density_below']:g}): {gt['real_rare']} real, "
            f"{gt['absorbed']} absorbed, {gt['artifact']} artifacts, "
            f"{gt['unresolved'] + gt['imprecise']} unresolved or imprecise"
        )
    ctl = r["trajectory"].get("control")
    if r["control"]:
        what = ", ".join(f"{n} {o}" for o, n in ctl.items() if n) if ctl else "not tested"
        parts.append(f"control group {r['control']}: {what}")
    else:
        parts.append("no control group")
    if r["loss_recovered"] is not None:
        parts.append(f"loss recovered {r['loss_recovered']:.3f}")
    parts.append(f"FVU {r['fvu']:.3f}, {r['seconds']:.0f} s")
    return "; ".join(parts) + f"; report: {r['report']}"


def _check_config(cfg: DemoConfig) -> None:
    """SaekitError for any flag out of its range (nan included), before anything is written."""
    from ..sae.errors import check_device, check_seed

    checks = [
        (cfg.tokens >= 1, f"--tokens must be >= 1 (got {cfg.tokens})"),
        (cfg.resolved()[0] >= 1, f"--steps must be >= 1 (got {cfg.steps})"),
        (cfg.resolved()[1] >= 1, f"--batch-size must be >= 1 (got {cfg.batch_size})"),
        (cfg.features >= 1, f"--features must be >= 1 (got {cfg.features})"),
        (
            cfg.l1_coef is None or 0 <= cfg.l1_coef < float("inf"),
            f"--l1-coef must be a finite number >= 0 (got {cfg.l1_coef})",
        ),
        (0 <= cfg.holdout < 1, f"--holdout must be in [0, 1) (got {cfg.holdout})"),
        (
            cfg.resample_below is None or 0 < cfg.resample_below < 1,
            f"--resample-below must be in (0, 1) (got {cfg.resample_below})",
        ),
        (cfg.eval_tokens >= 1, f"--eval-tokens must be >= 1 (got {cfg.eval_tokens})"),
    ]
    for ok, msg in checks:
        if not ok:
            raise SaekitError(msg)
    check_seed(cfg.seed)
    check_device(cfg.device)
    # What training will check once the cache exists, checked now (the default model's mlp_post
    # is 512 wide): the trainer's ranges, and that the SAE fits in memory at all.
    from ..training.memory import check_memory

    tcfg = _train_config(cfg, Path(cfg.out) / "cache", Path(cfg.out) / "run")
    d_in = DEFAULT_D_IN
    if cfg.model == "synthetic":
        from ..activations.source import parse_synthetic

        d_in = parse_synthetic(tcfg.synthetic).d_in
    rows = max(cfg.tokens, tcfg.resample_inputs)  # (no warning about the cache's size here)
    check_memory(tcfg, tcfg.resolve(d_in, 1.0, rows))


def _count(summary: dict, cls: str) -> int:
    return int(summary["counts"][cls])


if __name__ == "__main__":
    from .cli import main

    main(["demo", *__import__("sys").argv[1:]])
