"""A finished run dir as an object: what `saekit.train(...)` returns and `saekit.load_run` opens.

Also the readers of the run dir's own files (density_history.safetensors, metrics.jsonl), so that
diagnostics reads them through the package that writes them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..sae.errors import SaekitError
from .density import FINGERPRINT

HISTORY_FILE = "density_history.safetensors"
_noted: set[str] = set()  # histories without a fingerprint already mentioned
MECHANISMS_FILE = "mechanisms.safetensors"
METRICS_FILE = "metrics.jsonl"


class History(NamedTuple):
    counts: torch.Tensor  # int64 [n_windows, d_sae]
    window_tokens: torch.Tensor  # int64 [n_windows]
    window_end_step: torch.Tensor  # int64 [n_windows]
    resample_steps: torch.Tensor  # int64 [n_events]
    resampled: torch.Tensor  # bool [n_events, d_sae]
    held_out: torch.Tensor  # bool [n_events, d_sae]
    control_mask: torch.Tensor  # bool [d_sae]
    metadata: dict


def _sae_fingerprint(run_dir: Path) -> str | None:
    """The fingerprint in the run dir's cfg.json (None: absent, or an SAE saekit did not train)."""
    try:
        meta = json.loads((run_dir / "cfg.json").read_text()).get("metadata") or {}
    except (OSError, ValueError, AttributeError):
        return None
    fp = meta.get(FINGERPRINT) if isinstance(meta, dict) else None
    return fp if isinstance(fp, str) else None


def check_history_run(path: Path, file_meta: dict) -> None:
    """SaekitError if the history was written by another run than the SAE beside it; a history
    or SAE without a fingerprint (saved before saekit had them) is read, with a note, once."""
    theirs, ours = file_meta.get(FINGERPRINT), _sae_fingerprint(path.parent)
    if theirs and ours and theirs != ours:
        raise SaekitError(
            f"{path} is from another run (run fingerprint {theirs}; the SAE in {path.parent} has {ours}); put back this run's own {path.name} or re-run training"
        )
    if not (theirs and ours) and str(path) not in _noted:
        _noted.add(str(path))
        print(
            f"saekit: note: {path} or its cfg.json has no run fingerprint (saved before saekit "
            "recorded one), so it is not checked to be this run's history",
            file=sys.stderr,
        )


def load_history(path: str | Path, d_sae: int | None) -> History:
    """density_history.safetensors, checked to be the run's (`check_history_run`) and against
    the SAE's width (None: not checked)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            meta = f.metadata() or {}
    except Exception as e:
        raise SaekitError(
            f"{path} is not a readable safetensors file ({e}); re-run training"
        ) from None
    need = ("counts", "window_tokens", "window_end_step", "resample_steps", "resampled", "held_out")
    missing = [k for k in need if k not in t]
    if missing:
        raise SaekitError(f"{path} lacks {missing}; re-run training with this saekit version")
    check_history_run(path, meta)
    counts = t["counts"].long()
    d_sae = counts.shape[-1] if d_sae is None and counts.ndim == 2 else d_sae
    if counts.ndim != 2 or counts.shape[1] != d_sae:
        raise SaekitError(
            f"{path}: counts has shape {tuple(counts.shape)}, expected [n_windows, {d_sae}]"
        )
    n_ev = len(t["resample_steps"])
    empty = torch.zeros(n_ev, d_sae, dtype=torch.bool)
    resampled = t["resampled"].bool().reshape(n_ev, d_sae) if n_ev else empty
    held_out = t["held_out"].bool().reshape(n_ev, d_sae) if n_ev else empty
    control = t.get("control_mask", held_out.any(0)).bool()
    return History(
        counts,
        t["window_tokens"].long(),
        t["window_end_step"].long(),
        t["resample_steps"].long(),
        resampled,
        held_out,
        control,
        dict(meta),
    )


def load_mechanisms(path: str | Path, d_sae: int) -> dict[str, torch.Tensor]:
    """mechanisms.safetensors (training/mechanisms.py): each check [n_windows, d_sae] float32,
    and window_end_step [n_windows]; checked against the SAE's width."""
    from safetensors.torch import load_file

    from .mechanisms import KEYS

    path = Path(path)
    try:
        t = load_file(str(path))
    except Exception as e:
        raise SaekitError(
            f"{path} is not a readable safetensors file ({e}); re-run training"
        ) from None
    missing = [k for k in (*KEYS, "window_end_step") if k not in t]
    n = len(t.get("window_end_step", ()))
    bad = [k for k in KEYS if k in t and tuple(t[k].shape) != (n, d_sae)]
    if missing or bad:
        what = (
            f"lacks {missing[0]}"
            if missing
            else f"has {bad[0]} of shape {tuple(t[bad[0]].shape)}, expected [{n}, {d_sae}]"
        )
        raise SaekitError(f"{path} {what}; re-run training with this saekit version")
    return t


def last_metrics(path: Path) -> dict:
    """The last line of metrics.jsonl ({} when absent)."""
    if not path.is_file():
        return {}
    last = ""
    with open(path) as f:
        for line in f:
            if line.strip():
                last = line
    try:
        return json.loads(last) if last else {}
    except json.JSONDecodeError:
        return {}


def read_metrics(path: Path) -> list[dict]:
    """Every whole line of metrics.jsonl ([] when absent; a torn last line is skipped)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class Run:
    """A finished run dir: its SAE, cfg.json metadata, density history and metrics, loaded on
    first use."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._sae: Any = None
        self._meta: dict | None = None
        self._history: History | None = None

    @classmethod
    def open(cls, path: str | Path) -> Run:
        from ..sae.io import SAEKIT_FILE, WEIGHTS_FILE

        p = Path(path)
        if not (p / WEIGHTS_FILE).is_file() or not (p / SAEKIT_FILE).is_file():
            raise SaekitError(
                f"{p} is not a finished run dir (no {WEIGHTS_FILE} and {SAEKIT_FILE}); pass the --out of a finished `saekit train`"
            )
        return cls(p)

    def _load(self) -> None:
        from ..sae.io import load_sae

        self._sae, self._meta = load_sae(self.path)

    @property
    def sae(self):
        """The SAE (saekit.sae.model.SAE), in input units, on the CPU."""
        if self._sae is None:
            self._load()
        return self._sae

    @property
    def metadata(self) -> dict:
        """cfg.json's metadata: model, hook, site, layer, dataset, arch, train_config, ..."""
        if self._meta is None:
            self._load()
        assert self._meta is not None
        return self._meta

    @property
    def history(self) -> History | None:
        """The per-window firing counts, resampling events and control group (None if absent)."""
        if self._history is None and (self.path / HISTORY_FILE).is_file():
            self._history = load_history(self.path / HISTORY_FILE, self.sae.cfg.d_sae)
        return self._history

    @property
    def mechanisms(self) -> dict[str, torch.Tensor] | None:
        """The mechanism checks per density window (training/mechanisms.py; None if absent)."""
        path = self.path / MECHANISMS_FILE
        return load_mechanisms(path, self.sae.cfg.d_sae) if path.is_file() else None

    @property
    def metrics(self) -> list[dict]:
        """metrics.jsonl, one dict per log step."""
        return read_metrics(self.path / METRICS_FILE)

    def __repr__(self) -> str:
        m = self.metadata
        return (
            f"Run({str(self.path)!r}: {m.get('arch')} {m.get('d_sae')} features on "
            f"{m.get('model_name')} {m.get('hook_name')})"
        )


def train_api(source: Any = None, **config: Any) -> Run:
    """`saekit.train(source, out=..., ...)`: `source` is a Cache (anything with `.path`), a cache
    dir, a SyntheticConfig or a SyntheticSource (or None, with cache=, model= or synthetic= among
    the keywords); the other keywords are TrainConfig's fields."""
    from ..activations.source import SyntheticStream
    from ..activations.synthetic import SyntheticConfig, SyntheticSource
    from .config import TrainConfig
    from .trainer import train

    opened = None
    if isinstance(source, (SyntheticConfig, SyntheticSource)):
        opened = SyntheticStream(source)
        config["model"] = "synthetic"
    elif source is not None:
        config["cache"] = str(getattr(source, "path", source))
    if "out" not in config:
        raise SaekitError("saekit.train needs out= (the run dir to write)")
    cfg = TrainConfig(**config)
    cfg.source_kind()  # one source: refuses cache= or model= beside a synthetic one
    return Run.open(train(cfg, opened))
