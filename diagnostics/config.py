"""`saekit diagnose`'s flags (DiagnoseConfig) and the checks that refuse bad ones before any
file is read or written."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..sae.errors import SaekitError, check_device, check_seed
from ..sae.lock import LOCK_FILE
from ..sae.outdir import NAMES, check_replace, first_problem, kind_of

REPORT_FILES = ("report.html", "features.csv", "summary.json")  # what a report dir holds


@dataclass
class DiagnoseConfig:
    """Classify an SAE's features (dead / ultra-rare / live), measure their geometry and logit
    weights, run the trajectory test (falling / settled / died) on the density history, and write report.html, features.csv and
    summary.json."""

    run: str
    """run dir written by `saekit train`, or any SAELens-format SAE dir"""
    out: str
    """report dir to write report.html, features.csv and summary.json into"""
    cache: str | None = None
    """cache dir: measure every feature's density afresh on --tokens rows from the end of the
    cache (instead of the last training window) and show top-activating contexts"""
    synthetic: list[str] | None = None
    """measure every feature's density afresh on --tokens fresh synthetic rows: of the run's own
    synthetic source (--synthetic alone) or of a spec (JSON/YAML files and/or FIELD=VALUE
    items). A run on synthetic activations is scored against its true features either way."""
    tokens: int = 200_000
    """with --cache or --synthetic: how many rows (tokens) to measure density on"""
    batch_size: int = 4096
    """with --cache: rows per SAE forward pass"""
    scan_tokens: int | None = None
    """rows scanned in one pass for the feature dashboards (activation histograms, top and
    quantile examples): the whole --cache up to this many, or this many fresh rows of a synthetic
    run's source; None: 10,000,000 from a cache, 262,144 synthetic; 0: no scan"""
    dead_threshold: float = 0.0
    """dead: density at most this (0: zero firings in the window)"""
    ultra_rare_threshold: float = 1e-6
    """ultra-rare: density above the dead threshold and below this"""
    min_window_tokens: int = 0
    """density from training history: pool the last windows until they hold at least this many
    tokens (0: the last window only)"""
    alpha: float = 0.05
    """trajectory test: false discovery rate of falling, settled and died (Benjamini-Hochberg
    within each); the trend interval is the 1 - 2*alpha one"""
    band: float = 0.3
    """trajectory test: a feature is settled when its trend's interval lies within +-this many
    decades per 1e7 tokens (relative to the live baseline)"""
    burn_in_tokens: int = 131_072
    """trajectory test: tokens after each feature's last resampling (or hold-out, or the start
    of training) whose windows are not tested"""
    min_firings: int = 10
    """trajectory test: members with fewer firings over their tested windows are unresolved"""
    rare_threshold: float = 1e-5
    """trajectory test: besides the control group, features firing but below this density over
    their selection windows are tested (as "rare") on the windows after them"""
    selection_fraction: float = 0.25
    """trajectory test: the first this fraction of each feature's windows after burn-in choose
    the "rare" group; the test sees only the windows after them (choosing on the tested windows
    biases towards falling)"""
    features: list[int] = field(default_factory=list)
    """features to show logit weights and contexts for (empty: a few live, ultra-rare and
    control-group features, chosen with --seed)"""
    n_show: int = 4
    """when --features is empty: how many features of each group to show"""
    n_top_contexts: int = 8
    """with --cache: top-activating contexts shown per chosen feature"""
    n_logit_tokens: int = 10
    """top and bottom logit tokens listed per feature"""
    logits: bool = True
    """compute logit weights (loads the run's model)"""
    ln_scale: float | None = None
    """ln_final's typical scale for the logit weights (default: measured on ~2k tokens of the
    run's dataset, test split)"""
    model: str | None = None
    """model the SAE reads, for logit weights and contexts (default: cfg.json's metadata.model_name)"""
    hook: str | None = None
    """TransformerLens hook the SAE reads, e.g. blocks.0.mlp.hook_post (default: cfg.json's metadata.hook_name); its site and layer are read from the name"""
    device: str = "cpu"
    """torch device"""
    seed: int = 0
    """seed for choosing features to show and for sampling plots"""
    overwrite: bool = False
    """replace an existing report in --out"""


# ---------------------------------------------------------------------------- checks


def check_out(cfg: DiagnoseConfig) -> Path:
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise SaekitError(f"--out {out} is a file; pass a directory")
    existing = [f for f in REPORT_FILES if (out / f).exists()]
    if existing and not cfg.overwrite:
        raise SaekitError(f"{out} already holds {existing[0]}; pass --overwrite or another --out")
    if not cfg.overwrite and out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir()):
        # a report is not mixed into a run dir, a cache or someone's folder
        if first_problem(out, "report") is None:  # an interrupted report's files
            raise SaekitError(f"{out} holds a report's files; pass --overwrite or another --out")
        kind = kind_of(out)
        what = f"is a {NAMES[kind]}" if kind else "is not empty"
        raise SaekitError(f"--out {out} {what}; pass a new or empty dir for the report")
    if cfg.overwrite:  # it will delete only an earlier report's files: nothing else may be there
        check_replace(out, "report")
    return out


def check_config(cfg: DiagnoseConfig) -> None:
    """SaekitError for any flag out of its range (nan included), before anything is loaded."""
    checks = [
        (0 < cfg.alpha < 0.5, f"--alpha must be between 0 and 0.5 (got {cfg.alpha})"),
        (0 < cfg.band < math.inf, f"--band must be a finite number > 0 (got {cfg.band})"),
        (cfg.burn_in_tokens >= 0, f"--burn-in-tokens must be >= 0 (got {cfg.burn_in_tokens})"),
        (cfg.min_firings >= 1, f"--min-firings must be >= 1 (got {cfg.min_firings})"),
        (
            0 <= cfg.dead_threshold < cfg.ultra_rare_threshold <= 1,
            "need 0 <= --dead-threshold < --ultra-rare-threshold <= 1 "
            f"(got {cfg.dead_threshold} and {cfg.ultra_rare_threshold})",
        ),
        (
            0 < cfg.rare_threshold <= 1,
            f"--rare-threshold must be in (0, 1] (got {cfg.rare_threshold})",
        ),
        (
            0 < cfg.selection_fraction < 1,
            f"--selection-fraction must be in (0, 1) (got {cfg.selection_fraction})",
        ),
        (
            cfg.min_window_tokens >= 0,
            f"--min-window-tokens must be >= 0 (got {cfg.min_window_tokens})",
        ),
        (cfg.n_show >= 0, f"--n-show must be >= 0 (got {cfg.n_show})"),
        (cfg.n_top_contexts >= 1, f"--n-top-contexts must be >= 1 (got {cfg.n_top_contexts})"),
        (cfg.n_logit_tokens >= 1, f"--n-logit-tokens must be >= 1 (got {cfg.n_logit_tokens})"),
        (
            cfg.ln_scale is None or 0 < cfg.ln_scale < math.inf,
            f"--ln-scale must be a finite number > 0 (got {cfg.ln_scale})",
        ),
        (cfg.tokens >= 1, f"--tokens must be >= 1 (got {cfg.tokens})"),
        (cfg.batch_size >= 1, f"--batch-size must be >= 1 (got {cfg.batch_size})"),
        (
            cfg.scan_tokens is None or cfg.scan_tokens >= 0,
            f"--scan-tokens must be >= 0 (got {cfg.scan_tokens})",
        ),
    ]
    for ok, msg in checks:
        if not ok:
            raise SaekitError(msg)
    check_seed(cfg.seed)
    check_device(cfg.device)


def check_inputs(cfg: DiagnoseConfig) -> Path:
    """Every check that needs no file read: the paths and the flags. Returns the report dir."""
    run = Path(cfg.run)
    if not run.is_dir():
        raise SaekitError(
            f"--run {run} is not a directory; pass a run dir written by `saekit train`"
        )
    out = check_out(cfg)
    check_config(cfg)
    if cfg.cache is not None and cfg.synthetic is not None:
        raise SaekitError("--cache and --synthetic both give fresh rows; pass one of them")
    if cfg.synthetic == [] and not (run / "synthetic.json").is_file():
        raise SaekitError(
            f"--synthetic alone measures on the run's synthetic source, but {run} has none (no synthetic.json); pass a spec or drop --synthetic"
        )
    if cfg.cache is not None and not Path(cfg.cache).is_dir():
        raise SaekitError(
            f"--cache {cfg.cache} is not a directory; pass a cache dir from `saekit cache`"
        )
    return out
