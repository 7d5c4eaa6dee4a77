"""What `saekit diagnose` reads: the run's SAE, density history, metrics and mechanism arrays,
checked against the flags, and the run's model for logit weights and contexts."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..sae.errors import SaekitError
from ..training.run import MECHANISMS_FILE, History, last_metrics, load_history, load_mechanisms
from .config import DiagnoseConfig
from .features import vocab_strings
from .run_info import check_hook, complete_metadata


class RunInputs(NamedTuple):
    run: Path  # the run dir
    sae: Any  # saekit.sae.model.SAE, in eval mode on cfg.device
    meta: dict  # cfg.json's saekit metadata
    history: History | None  # density_history.safetensors (None when absent)
    metrics: dict  # the last line of metrics.jsonl ({} when absent)
    control: torch.Tensor  # bool [F]: the held-out control group
    mechanisms: dict | None  # mechanisms.safetensors (None when absent)


def load_inputs(cfg: DiagnoseConfig) -> RunInputs:
    """The SAE, its history and metrics; SaekitError when they cannot make a report."""
    from ..sae.io import load_sae
    from .evaluate import COMPUTE_DTYPE

    run = Path(cfg.run)
    sae, meta = load_sae(run, device=cfg.device, dtype=COMPUTE_DTYPE)
    sae.eval()
    meta = complete_metadata(meta, cfg.model, cfg.hook)
    d_sae = sae.W_dec.shape[0]
    bad = [i for i in cfg.features if not 0 <= i < d_sae]
    if bad:
        raise SaekitError(f"--features {bad[0]} is out of range; the SAE has {d_sae} features")
    if cfg.cache is not None:
        from ..activations.cache_format import read_manifest
        from .evaluate import check_cache_of_run

        check_cache_of_run(Path(cfg.cache), read_manifest(cfg.cache), meta, run)
    hist_path = run / "density_history.safetensors"
    hist = load_history(hist_path, d_sae) if hist_path.is_file() else None
    fresh = cfg.cache is not None or cfg.synthetic is not None
    if cfg.synthetic is not None and meta.get("d_in") not in (None, _spec_d_in(cfg, run)):
        raise SaekitError(
            f"--synthetic makes rows of width {_spec_d_in(cfg, run)} but the SAE in {run} reads {meta.get('d_in')}; use the run's spec"
        )
    if hist is None and not fresh:
        raise SaekitError(
            f"{run} has no density_history.safetensors; pass --cache (a cache of the SAE's model and hook) or --synthetic to measure density afresh"
        )
    if hist is not None and len(hist.counts) == 0 and not fresh:
        raise SaekitError(f"{hist_path} holds no windows (training too short); pass --cache")
    control = hist.control_mask if hist is not None else torch.zeros(d_sae, dtype=torch.bool)
    mech_path = run / MECHANISMS_FILE
    mech = load_mechanisms(mech_path, d_sae) if mech_path.is_file() else None
    return RunInputs(run, sae, meta, hist, last_metrics(run / "metrics.jsonl"), control, mech)


def _spec_d_in(cfg: DiagnoseConfig, run: Path) -> int:
    from ..activations.source import parse_synthetic
    from ..activations.synthetic import SyntheticSource

    if cfg.synthetic:
        return parse_synthetic(cfg.synthetic).d_in
    return SyntheticSource.load(run).d_in


def synthetic_run(meta: dict) -> bool:
    """Whether the run trained on synthetic activations (no model: no logits, no contexts)."""
    return meta.get("model_name") == "synthetic"


def load_run_model(
    cfg: DiagnoseConfig, meta: dict, d_in: int, warnings: list[str]
) -> tuple[Any, list[str]]:
    """The run's model (checked to have the SAE's hook, d_in wide) and its token texts, for
    logit weights and contexts (loaded before any long work: it fails fast when offline).
    (None, []) when neither needs it."""
    if not (cfg.logits or cfg.cache is not None) or synthetic_run(meta):
        return None, []
    from ..activations.models import load_model as load

    if meta.get("model_name") is None:
        raise SaekitError(
            f"{cfg.run}/cfg.json metadata lacks model_name; pass --model (or --no-logits without --cache)"
        )
    try:
        model = load(meta["model_name"], device=cfg.device)
        if meta.get("hook_name") is not None:
            check_hook(model, meta, d_in)
    except SaekitError as e:
        if cfg.logits:
            raise SaekitError(f"{e} (or pass --no-logits to skip logit weights)") from None
        warnings.append(f"Contexts show token ids: the run's model did not load ({e}).")
        return None, []
    if cfg.logits and cfg.n_logit_tokens > model.cfg.d_vocab:
        raise SaekitError(
            f"--n-logit-tokens {cfg.n_logit_tokens} exceeds the model's vocabulary of {model.cfg.d_vocab} tokens; lower it"
        )
    return model, vocab_strings(model.tokenizer, model.cfg.d_vocab)
