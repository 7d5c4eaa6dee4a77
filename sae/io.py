"""Files: atomic writes, verified reads, and the run dir's SAE format (loadable by SAELens).

The SAE is saved as SAELens 6 saves one: `cfg.json` (architecture "standard" for the ReLU archs,
"topk" for TopK) and `sae_weights.safetensors` with `W_enc` [d_in, d_sae], `b_enc`, `W_dec`
[d_sae, d_in], `b_dec`. saekit's own fields ride in cfg.json's `metadata`, which SAELens keeps
as free-form attributes, and are mirrored in `saekit.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from sae.errors import SaekitError

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SAEKIT_FILE = "saekit.json"
# The cfg.json layout we write is SAELens 6's; without a version >= 6 SAELens would run its
# pre-6 converter, which drops the metadata.
SAELENS_FORMAT_VERSION = "6.0.0"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the whole new one."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def atomic_save_safetensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write_bytes(path, st_save(tensors, metadata=metadata))


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_safetensors(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; SaekitError naming the file if it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise SaekitError(f"{path} does not exist; check the path")
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises several types for a damaged file
        raise SaekitError(
            f"{path} is not a readable safetensors file ({e}); re-create it"
        ) from None


def save_sae(sae, run_dir: str | Path, metadata: dict, input_scale: float = 1.0) -> None:
    """Write cfg.json + sae_weights.safetensors (+ saekit.json) so that SAELens and saekit load it.

    `input_scale`: the factor the inputs were multiplied by during training (relu_l1_v2's
    normalisation to mean norm sqrt(d_in)). It is folded into the weights, so the saved SAE works
    on raw activations: W_enc*s, W_dec/s, b_dec/s.
    """
    from sae.model import SAE

    assert isinstance(sae, SAE)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = sae.cfg
    s = float(input_scale)
    with torch.no_grad():
        tensors = {
            "W_enc": sae.W_enc * s,
            "b_enc": sae.b_enc.clone(),
            "W_dec": sae.W_dec / s,
            "b_dec": sae.b_dec / s,
        }
    dtype = str(sae.W_enc.dtype).removeprefix("torch.")
    meta = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        **metadata,
        "arch": cfg.arch,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "k": cfg.k,
        "k_aux": cfg.k_aux,
        "aux_coef": cfg.aux_coef,
        "input_scale_folded": s,
    }
    sl_cfg: dict[str, Any] = {
        "architecture": "topk" if cfg.arch == "topk" else "standard",
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": dtype,
        "device": "cpu",
        # relu_l1 and topk subtract b_dec from the input (Anthropic 2023, Gao et al.); the April
        # 2024 recipe does not.
        "apply_b_dec_to_input": cfg.arch != "relu_l1_v2",
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": meta,
    }
    if cfg.arch == "topk":
        sl_cfg["k"] = cfg.k
        sl_cfg["rescale_acts_by_decoder_norm"] = False
    atomic_save_safetensors(run_dir / WEIGHTS_FILE, tensors)
    atomic_write_json(run_dir / CFG_FILE, sl_cfg)
    atomic_write_json(run_dir / SAEKIT_FILE, meta)


def load_sae(run_dir: str | Path, device: str = "cpu") -> tuple[Any, dict]:
    """The SAE of a run dir, in input units, and cfg.json's metadata (saekit's fields included)."""
    from sae.model import SAE, SAEConfig

    run_dir = Path(run_dir)
    cfg_path = run_dir / CFG_FILE
    if not cfg_path.is_file():
        raise SaekitError(f"{run_dir} has no {CFG_FILE}; pass a run dir written by `saekit train`")
    try:
        sl_cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise SaekitError(f"{cfg_path} is not valid JSON ({e}); re-run training") from None
    meta = dict(sl_cfg.get("metadata") or {})
    arch = meta.get("arch") or ("topk" if sl_cfg.get("architecture") == "topk" else "relu_l1")
    if arch == "relu_l1" and not sl_cfg.get("apply_b_dec_to_input", True):
        arch = "relu_l1_v2"
    tensors = load_safetensors(run_dir / WEIGHTS_FILE, device=device)
    missing = {"W_enc", "b_enc", "W_dec", "b_dec"} - set(tensors)
    if missing:
        raise SaekitError(f"{run_dir / WEIGHTS_FILE} lacks {sorted(missing)}; re-run training")
    d_in, d_sae = tensors["W_enc"].shape
    cfg = SAEConfig(
        arch=arch,
        d_in=d_in,
        d_sae=d_sae,
        k=int(sl_cfg.get("k") or meta.get("k") or 32),
        k_aux=meta.get("k_aux"),
        aux_coef=float(meta.get("aux_coef", 1 / 32)),
    )
    sae = SAE(cfg, device=device, dtype=tensors["W_enc"].dtype)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(tensors[name])
    return sae, meta
