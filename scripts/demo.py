"""`saekit demo`: the whole pipeline on the bundled default model in a few minutes on 2 CPU cores.

    saekit demo                     # -> saekit-demo/{cache,run,report}/
    python -m saekit.scripts.demo --out /tmp/demo

Caches the default model's MLP neurons (`mlp_post`) on the default corpus, trains a `relu_l1` SAE
with Anthropic's resampling and half of each resampling's picks held out as a control group,
splices it back into the model (`saekit evaluate`), and writes the diagnostics report.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from ..sae.errors import SaekitError
from ..sae.lock import DirLock, empty_dir, entries

DEFAULT_D_IN = 512  # the default model's d_mlp: the width of its mlp_post cache


@dataclass
class DemoConfig:
    """Cache, train, evaluate and diagnose an SAE on the bundled default model (a few minutes on
    2 CPU cores); prints where the report is."""

    out: str = "saekit-demo"
    """output dir: cache/, run/ and report/ go under it"""
    tokens: int = 800_000
    """activations (tokens) to cache (the default corpus' train split holds ~950k at context 128)"""
    steps: int = 600
    """training steps"""
    batch_size: int = 2048
    """activations per training step"""
    features: int = 1024
    """number of SAE features"""
    l1_coef: float = 0.7
    """L1 coefficient (in the cache's units; about half the trainer's default, which leaves FVU
    above 0.2 at this short budget)"""
    holdout: float = 0.5
    """fraction of each resampling's dead features left alone as a control group"""
    eval_tokens: int = 65_536
    """tokens of the held-out split to splice the SAE in on"""
    seed: int = 0
    """seed for the cache order, the initialisation and resampling"""
    device: str = "cpu"
    """torch device"""
    overwrite: bool = False
    """replace an existing demo in --out"""


class DemoResult(NamedTuple):
    out: Path
    report: Path  # report.html
    live: int
    fvu: float
    loss_recovered: float


def demo(cfg: DemoConfig) -> DemoResult:
    out = Path(cfg.out)
    _check_config(cfg)
    if out.exists() and not out.is_dir():
        raise SaekitError(f"--out {out} is a file; pass a directory")
    _check_out(cfg, out)
    with DirLock(out, "demo"):  # one writer per dir (and the cache, run and report lock theirs)
        _check_out(cfg, out)  # again, under the lock
        empty_dir(out)  # --overwrite of a demo dir, checked above
        try:
            return _pipeline(cfg, out)
        except (SaekitError, OSError):
            # A failed demo cannot be resumed: leave --out as it was (missing or empty).
            empty_dir(out)  # (and the lock removes a dir it made)
            raise


def _check_out(cfg: DemoConfig, out: Path) -> None:
    if entries(out):
        if not cfg.overwrite:
            raise SaekitError(f"{out} is not empty; pass --overwrite or another --out")
        if not (out / "demo.json").is_file() and not (out / "cache").is_dir():
            raise SaekitError(f"{out} does not look like a demo dir; refusing to delete it")


def _train_config(cfg: DemoConfig, cache: Path, run: Path):
    from ..training.config import TrainConfig

    return TrainConfig(
        cache=str(cache),
        out=str(run),
        arch="relu_l1",
        features=cfg.features,
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        l1_coef=cfg.l1_coef,
        resample="anthropic",
        resample_holdout=cfg.holdout,
        seed=cfg.seed,
        checkpoint_every=0,
        device=cfg.device,
    )


def _pipeline(cfg: DemoConfig, out: Path) -> DemoResult:
    from ..activations.cache import build_cache
    from ..activations.cache_config import CacheConfig
    from ..diagnostics.diagnose import DiagnoseConfig, diagnose
    from ..diagnostics.evaluate import EvaluateConfig, evaluate
    from ..training.trainer import train

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
    run = train(_train_config(cfg, cache.path, out / "run"))
    ev = evaluate(EvaluateConfig(run=str(run), tokens=cfg.eval_tokens, device=cfg.device))
    report = diagnose(
        DiagnoseConfig(
            run=str(run), out=str(out / "report"), cache=str(cache.path), device=cfg.device
        )
    )
    summary = report.summary
    live = _count(summary, "live")
    m = ev.metrics
    result = {
        "live": live,
        "dead": _count(summary, "dead"),
        "ultra_rare": summary["counts"]["ultra_rare"],  # None: the window cannot resolve it
        "l0": m["l0"],
        "fvu": m["fvu_pooled"],
        "loss_recovered": m["loss_recovered_zero"],
        "loss_recovered_mean_ablation": m["loss_recovered_mean"],
        "kl": m["kl_clean_spliced"],
        "seconds": time.perf_counter() - t0,
        "report": str(report.html),
    }
    from ..sae.io import atomic_write_json

    atomic_write_json(out / "demo.json", result)
    rare = result["ultra_rare"]
    rare = "ultra-rare not resolvable" if rare is None else f"{rare} ultra-rare"
    print(
        f"saekit demo: {live} live / {result['dead']} dead / {rare} "
        f"features, L0 {m['l0']:.1f}, FVU {m['fvu_pooled']:.3f}, loss recovered "
        f"{m['loss_recovered_zero']:.3f} (vs zero ablation; {m['loss_recovered_mean']:.3f} vs mean) "
        f"in {result['seconds']:.0f}s"
    )
    print(f"report: {result['report']}")
    return DemoResult(out, Path(result["report"]), live, m["fvu_pooled"], m["loss_recovered_zero"])


def _check_config(cfg: DemoConfig) -> None:
    """SaekitError for any flag out of its range (nan included), before anything is written."""
    from ..sae.errors import check_device

    checks = [
        (cfg.tokens >= 1, f"--tokens must be >= 1 (got {cfg.tokens})"),
        (cfg.steps >= 1, f"--steps must be >= 1 (got {cfg.steps})"),
        (cfg.batch_size >= 1, f"--batch-size must be >= 1 (got {cfg.batch_size})"),
        (cfg.features >= 1, f"--features must be >= 1 (got {cfg.features})"),
        (
            0 <= cfg.l1_coef < float("inf"),
            f"--l1-coef must be a finite number >= 0 (got {cfg.l1_coef})",
        ),
        (0 <= cfg.holdout < 1, f"--holdout must be in [0, 1) (got {cfg.holdout})"),
        (cfg.eval_tokens >= 1, f"--eval-tokens must be >= 1 (got {cfg.eval_tokens})"),
    ]
    for ok, msg in checks:
        if not ok:
            raise SaekitError(msg)
    check_device(cfg.device)
    # What training will check once the cache exists, checked now (the default model's mlp_post
    # is 512 wide): the trainer's ranges, and that the SAE fits in memory at all.
    from ..training.config import check_memory

    tcfg = _train_config(cfg, Path(cfg.out) / "cache", Path(cfg.out) / "run")
    rows = max(cfg.tokens, tcfg.resample_inputs)  # (no warning about the cache's size here)
    check_memory(tcfg, tcfg.resolve(DEFAULT_D_IN, 1.0, rows))


def _count(summary: dict, cls: str) -> int:
    return int(summary["counts"][cls])


if __name__ == "__main__":
    from .cli import main

    main(["demo", *__import__("sys").argv[1:]])
