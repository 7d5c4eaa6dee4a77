"""`saekit evaluate --ablate`: zero a class of features at once and measure what the SAE loses.

Each item of `--ablate A,B,...` is one ablation, measured on its own: a class (`dead`,
`ultra_rare`, `live` from the density history, `control` for the held-out control group) or a
file of feature indices. The ablated SAE is the full one with those features' activations set
to 0 before decoding (nothing else changes: the same encoder, biases and the other features);
eval.json reports its MSE, CE and KL and their deltas against the full SAE's.

Classes come from the density history's last windows, pooled (across resamplings, if need be)
until they hold 10 / ultra-rare-threshold tokens so the ultra-rare class is resolved (10
expected firings: training/density.py's RESOLVE_FIRINGS); when the
whole history is shorter, `ultra_rare` is refused rather than read off an unresolving window.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from ..sae.errors import SaekitError
from .features import CLASSES, classify

ABLATE_CLASSES = ("dead", "ultra_rare", "live", "control")
DEAD_DENSITY = 0.0
ULTRA_RARE_DENSITY = 1e-6


def parse_ablate(spec: str) -> list[str]:
    """The items of `--ablate A,B,...` (classes or files), each once, in order."""
    items = [s.strip() for s in spec.split(",")]
    if not spec.strip() or any(not s for s in items):
        raise SaekitError(
            f"--ablate {spec!r} has an empty item; pass classes ({', '.join(ABLATE_CLASSES)}) "
            "or files of feature indices, separated by commas"
        )
    return list(dict.fromkeys(items))


def read_feature_list(path: Path, d_sae: int) -> Tensor:
    """Feature indices from a text file: integers separated by whitespace or commas, `#`
    starting a comment; SaekitError for anything else or an index out of range."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise SaekitError(f"--ablate {path}: not a readable text file ({e})") from None
    words = [w for line in text.splitlines() for w in re.split(r"[\s,]+", line.split("#")[0]) if w]
    bad = [w for w in words if not w.isdigit()]
    if bad or not words:
        raise SaekitError(
            f"--ablate {path}: {'holds ' + repr(bad[0]) if bad else 'is empty'}; write feature "
            "indices (integers) separated by whitespace or commas"
        )
    idx = torch.tensor([int(w) for w in words])
    if int(idx.max()) >= d_sae:
        raise SaekitError(
            f"--ablate {path}: feature {int(idx.max())} is out of range; the SAE has {d_sae}"
        )
    return idx


def history_classes(run_dir: Path, d_sae: int, need_ultra_rare: bool) -> tuple[Tensor, dict]:
    """Class per feature (features.CLASSES) from the density history's last windows, pooled to
    RESOLVE_FIRINGS / ULTRA_RARE_DENSITY tokens, and where they came from."""
    from ..training.density import RESOLVE_FIRINGS
    from ..training.run import HISTORY_FILE, load_history

    path = run_dir / HISTORY_FILE
    if not path.is_file():
        raise SaekitError(
            f"--ablate by class needs {path} (written by `saekit train`); pass a file of "
            "feature indices instead"
        )
    h = load_history(path, d_sae)
    need = round(RESOLVE_FIRINGS / ULTRA_RARE_DENSITY)
    tok = h.window_tokens.flip(0).cumsum(0)
    n_pool = min(int((tok < need).sum()) + 1, len(tok))
    tokens = int(h.window_tokens[-n_pool:].sum()) if n_pool else 0
    if tokens == 0 or (need_ultra_rare and tokens < need):
        raise SaekitError(
            f"--ablate ultra_rare: the density history holds {tokens} tokens, too few to "
            f"resolve density {ULTRA_RARE_DENSITY:g} (needs {need}); drop ultra_rare or pass a "
            "file of feature indices"
        )
    cls = classify(h.counts[-n_pool:].sum(0), tokens, DEAD_DENSITY, ULTRA_RARE_DENSITY)
    info = {"windows_pooled": n_pool, "tokens": tokens, "control": h.control_mask}
    return cls, info


def ablation_masks(run_dir: Path, spec: str, d_sae: int) -> tuple[dict[str, Tensor], dict]:
    """bool [d_sae] per `--ablate` item (features to zero), and eval.json's note on where the
    classes came from. Every check happens here, before the model is run."""
    items = parse_ablate(spec)
    masks: dict[str, Tensor] = {}
    classes = [i for i in items if i in ABLATE_CLASSES]
    note: dict = {}
    if classes:
        cls, info = history_classes(run_dir, d_sae, "ultra_rare" in classes)
        note = {
            "classes_from": f"density_history.safetensors, the last {info['windows_pooled']} "
            f"window(s) ({info['tokens']} tokens); control: its control_mask",
            "thresholds": {"dead": DEAD_DENSITY, "ultra_rare": ULTRA_RARE_DENSITY},
        }
    for item in items:
        if item == "control":
            masks[item] = info["control"].clone()
        elif item in ABLATE_CLASSES:
            masks[item] = cls == CLASSES.index(item)
        elif Path(item).is_file():
            m = torch.zeros(d_sae, dtype=torch.bool)
            m[read_feature_list(Path(item), d_sae)] = True
            masks[item] = m
        else:
            raise SaekitError(
                f"--ablate {item!r} is neither a class ({', '.join(ABLATE_CLASSES)}) nor a file "
                "of feature indices"
            )
    return masks, note


def ablation_results(out: dict, sums: dict[str, dict[str, float]], n_tok: int, n_loss: int) -> dict:
    """Each ablation's MSE, CE and KL (means over the tokens) and their deltas against the full
    SAE's (`out`: splice_metrics' results); CE and KL are None on a derived site."""
    res = {}
    for name, s in sums.items():
        mse = s["sq_err"] / max(n_tok, 1)
        r = {"mse": mse, "delta_mse": mse - out["mse"]}
        if "ce" in s:
            ce, kl = s["ce"] / max(n_loss, 1), s["kl"] / max(n_loss, 1)
            r |= {"ce": ce, "delta_ce": ce - out["ce_spliced"]}
            r |= {"kl": kl, "delta_kl": kl - out["kl_clean_spliced"]}
        res[name] = r
    return res
