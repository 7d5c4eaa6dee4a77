"""Per-feature firing counts over training: accumulated on the device every step (no host sync),
kept per window of whole batches, with the resampling events and the held-out control group.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from torch import Tensor

from ..sae.io import atomic_save_safetensors

# Expected firings at a density threshold for a window to resolve it: a count of features below
# it is reported only then (Poisson relative error 1/sqrt(10) ~ 0.32); with fewer, "below 1e-6"
# mostly means "fired once", which says little about the feature's density.
RESOLVE_FIRINGS = 10

# Firing-density bands logged each window (--wandb-project): [low, high) per band.
BANDS = {"dead": (0.0, 0.0), "below_1e-6": (0.0, 1e-6), "1e-6_to_1e-4": (1e-6, 1e-4),
         "1e-4_to_1e-2": (1e-4, 1e-2), "above_1e-2": (1e-2, math.inf)}  # fmt: skip
LOG10_EDGES = torch.arange(-10.0, 0.01, 0.25)  # the histogram's bins, the same every window
# The key, in cfg.json's metadata and in the history's safetensors metadata, of the fingerprint
# that binds a density history to its run (training/run.py checks it on read).
FINGERPRINT = "run_fingerprint"


def resolves(tokens: float, threshold: float) -> bool:
    """Whether a window of `tokens` resolves densities below `threshold` (RESOLVE_FIRINGS)."""
    return tokens * threshold >= RESOLVE_FIRINGS


def run_fingerprint(meta: dict) -> str:
    """16 hex digits of sha256 over what makes a run's results: cfg.json's metadata (its source
    and settings), without --resume and --overwrite, which change none of them. Equal settings
    train equal runs, so two runs share a fingerprint only when their histories are the same."""
    tc = {
        k: v
        for k, v in (meta.get("train_config") or {}).items()
        if k not in ("resume", "overwrite")
    }
    body = {k: v for k, v in meta.items() if k not in ("train_config", FINGERPRINT)}
    text = json.dumps({**body, "train_config": tc}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def window_summary(counts: Tensor, tokens: int) -> dict[str, object]:
    """One density window as it goes to wandb: how many features fall in each band (dead: no
    firing) and the histogram (values, bin edges) of log10 density of the features that fired."""
    dens = counts.double().cpu() / max(tokens, 1)
    out: dict[str, object] = {"dead": int((dens == 0).sum())}
    for name, (lo, hi) in list(BANDS.items())[1:]:
        out[name] = int(((dens > 0) & (dens >= lo) & (dens < hi)).sum())
    log10 = dens[dens > 0].log10().clamp(-10, 0).float()
    values = (
        torch.histogram(log10, bins=LOG10_EDGES).hist
        if len(log10)
        else torch.zeros(len(LOG10_EDGES) - 1)
    )
    out["hist"] = (values.long().numpy(), LOG10_EDGES.numpy())
    return out


class DensityTracker:
    def __init__(self, d_sae: int, batch_size: int, steps_per_window: int, device) -> None:
        self.d_sae, self.batch_size, self.steps_per_window = d_sae, batch_size, steps_per_window
        self.window = torch.zeros(d_sae, dtype=torch.int64, device=device)
        self.window_steps = 0
        # Step after which each feature last fired (0: not since the start).
        self.last_fired = torch.zeros(d_sae, dtype=torch.int64, device=device)
        self.control_mask = torch.zeros(d_sae, dtype=torch.bool, device=device)
        self.counts: list[Tensor] = []
        self.window_tokens: list[int] = []
        self.window_end_step: list[int] = []
        self.event_steps: list[int] = []
        self.resampled: list[Tensor] = []
        self.held_out: list[Tensor] = []

    def update(self, fired: Tensor, step: int) -> None:
        """Add one batch's firing counts; `step` is the number of steps done including this one."""
        self.window += fired
        self.last_fired.masked_fill_(fired > 0, step)
        self.window_steps += 1
        if self.window_steps == self.steps_per_window:
            self.flush(step)

    def flush(self, step: int) -> None:
        if self.window_steps == 0:
            return
        self.counts.append(self.window.clone())
        self.window_tokens.append(self.window_steps * self.batch_size)
        self.window_end_step.append(step)
        self.window.zero_()
        self.window_steps = 0

    def dead_mask(self, step: int, dead_window: int) -> Tensor:
        """Features that fired in none of the last `dead_window` steps (device tensor, no sync)."""
        return (step - self.last_fired) >= dead_window

    def open_window(self) -> Tensor:
        """The open window's counts (a copy; summed over the ranks when distributed)."""
        return self.window.clone()

    def dead_window_counts(self, step: int, dead_window: int) -> tuple[Tensor, int]:
        """Firings per feature over the last `dead_window` steps, from the per-window counts (no
        host sync), and the tokens they cover: the open window plus the most recent closed
        windows until they span at least `dead_window` steps. Exact when the dead window is a
        whole number of windows and `step` ends one (as at a resampling step that is a multiple
        of the window); otherwise the span reaches back to the start of the window the dead
        window begins in, up to steps_per_window - 1 steps more."""
        total = self.open_window()
        steps = self.window_steps
        for c, tok in zip(reversed(self.counts), reversed(self.window_tokens), strict=True):
            if steps >= dead_window:
                break
            total += c
            steps += tok // self.batch_size
        return total, steps * self.batch_size

    def below_mask(self, step: int, dead_window: int, density: float) -> Tensor:
        """Features whose density over the dead window (`dead_window_counts`) is below `density`,
        leaving out those resampled within the last `dead_window` steps (their window mixes two
        lives; Anthropic's rule gives them a fresh dead window the same way). Device tensor."""
        counts, tokens = self.dead_window_counts(step, dead_window)
        below = counts.double() < density * max(tokens, 1)
        for ev, res in zip(self.event_steps, self.resampled, strict=True):
            if step - ev < dead_window:
                below &= ~res
        return below

    def record_event(self, step: int, resampled: Tensor, held_out: Tensor) -> None:
        self.event_steps.append(step)
        self.resampled.append(resampled.clone())
        self.held_out.append(held_out.clone())
        self.control_mask |= held_out
        # A resampled feature gets a fresh dead_window before it can count as dead again.
        self.last_fired.masked_fill_(resampled, step)

    def recent_density(self, min_tokens: int = 0) -> tuple[Tensor, int]:
        """Density over the most recent windows holding >= min_tokens (or the open window if none closed)."""
        if not self.counts:
            tokens = self.window_steps * self.batch_size
            return self.window.double() / max(tokens, 1), tokens
        total = torch.zeros_like(self.window)
        tokens = 0
        for c, t in zip(reversed(self.counts), reversed(self.window_tokens), strict=True):
            total += c
            tokens += t
            if tokens >= min_tokens:
                break
        return total.double() / tokens, tokens

    def tensors(self) -> dict[str, Tensor]:
        """The history as density_history.safetensors holds it (docs/architecture.md)."""
        empty_events = torch.zeros(0, self.d_sae, dtype=torch.bool)
        return {
            "counts": torch.stack(self.counts).cpu()
            if self.counts
            else torch.zeros(0, self.d_sae, dtype=torch.int64),
            "window_tokens": torch.tensor(self.window_tokens, dtype=torch.int64),
            "window_end_step": torch.tensor(self.window_end_step, dtype=torch.int64),
            "resample_steps": torch.tensor(self.event_steps, dtype=torch.int64),
            "resampled": torch.stack(self.resampled).cpu() if self.resampled else empty_events,
            "held_out": torch.stack(self.held_out).cpu() if self.held_out else empty_events,
            "control_mask": self.control_mask.cpu(),
        }

    def state(self) -> dict[str, Tensor]:
        """Everything needed to resume exactly (for checkpoints)."""
        return {
            **{f"history.{k}": v for k, v in self.tensors().items()},
            "density.window": self.window.cpu(),
            "density.last_fired": self.last_fired.cpu(),
            "density.window_steps": torch.tensor(self.window_steps),
        }

    def load_state(self, t: dict[str, Tensor]) -> None:
        dev = self.window.device
        self.window.copy_(t["density.window"])
        self.last_fired.copy_(t["density.last_fired"])
        self.window_steps = int(t["density.window_steps"])
        self.control_mask.copy_(t["history.control_mask"])
        self.counts = [c.to(dev) for c in t["history.counts"]]
        self.window_tokens = t["history.window_tokens"].tolist()
        self.window_end_step = t["history.window_end_step"].tolist()
        self.event_steps = t["history.resample_steps"].tolist()
        self.resampled = [r.to(dev) for r in t["history.resampled"]]
        self.held_out = [h.to(dev) for h in t["history.held_out"]]

    def save(self, path: str | Path, metadata: dict[str, str]) -> None:
        atomic_save_safetensors(path, self.tensors(), metadata)
