"""Files: atomic writes, verified reads, and the run dir's SAE format (loadable by SAELens).

The SAE is saved as SAELens 6 saves one: `cfg.json` (`architecture` from the arch's row in
sae/archs.py: standard, topk, jumprelu (batchtopk and matryoshka too, with their estimated
threshold, as SAELens saves them) or gated) and `sae_weights.safetensors` with `W_enc`
[d_in, d_sae], `b_enc` (gated: `b_gate`), `W_dec` [d_sae, d_in], `b_dec`, and `threshold`
[d_sae] (jumprelu) or `r_mag`, `b_mag` [d_sae] (gated). saekit's own fields ride in cfg.json's
`metadata`, which SAELens keeps as free-form attributes, and are mirrored in `saekit.json`.
`load_sae` reads these and any SAELens-format dir (sae/saelens_format.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .archs import ARCHS
from .errors import SaekitError, signals_deferred

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SAEKIT_FILE = "saekit.json"
# The cfg.json layout we write is SAELens 6's; without a version >= 6 SAELens would run its
# pre-6 converter, which drops the metadata.
SAELENS_FORMAT_VERSION = "6.0.0"


def atomic_write_bytes(path: str | Path, data: bytes | Iterable[Any], durable: bool = True) -> None:
    """Write `data` (or its chunks, in order) to `path` so that readers see either the old file
    or the whole new one. `durable`: fsync before the rename, so that this holds across a power
    loss too (a killed process needs no fsync: what it wrote is in the kernel)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for chunk in [data] if isinstance(data, bytes) else data:
                f.write(chunk)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise write_error(e, path, tmp) from None
    except BaseException:  # Ctrl-C, SIGTERM: no temporary file left behind
        with signals_deferred():
            tmp.unlink(missing_ok=True)
        raise


def write_error(e: OSError, path: Path, tmp: Path | None = None) -> OSError:
    """`e` with the file being written named (a failed write() names none), after removing the
    temporary file, so that nothing half-written stays behind (a full disk, a file-size limit)."""
    if tmp is not None:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
    return OSError(e.errno, e.strerror or str(e), str(path))


def atomic_write_json(path: str | Path, obj: Any, durable: bool = True) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode(), durable)


# safetensors' names of the torch dtypes saekit writes
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
              torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
              torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}  # fmt: skip


def safetensors_header(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> bytes:
    """A safetensors file's leading bytes (length prefix, JSON header padded so the data is
    8-byte aligned) for these tensors laid out in this order; metadata keys sorted, so that equal
    runs give equal bytes."""
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    for k, t in tensors.items():
        if t.dtype not in _ST_DTYPES:
            raise SaekitError(f"cannot save {k}: dtype {t.dtype} has no safetensors name")
        n = t.numel() * t.element_size()
        header[k] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                     "data_offsets": [offset, offset + n]}  # fmt: skip
        offset += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    return struct.pack("<Q", len(hb)) + hb


def atomic_save_safetensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> str:
    """Write a safetensors file atomically, each tensor straight from its memory (one device
    tensor at a time is copied to the host), hashing as it goes: no serialised copy of the whole
    file is made (safetensors' own `save` builds one, twice the state at a checkpoint). Returns
    the file's sha256."""
    tensors = {k: v.detach() for k, v in tensors.items()}
    head = safetensors_header(tensors, metadata)
    h = hashlib.sha256(head)

    def chunks() -> Iterator[Any]:
        yield head
        for t in tensors.values():
            # a view of a contiguous host tensor; else a copy of this one tensor only
            raw = t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            h.update(raw)
            yield raw

    atomic_write_bytes(path, chunks())
    return h.hexdigest()


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

    `input_scale`: the factor the inputs were multiplied by during training (relu_l1_v2's and
    jumprelu's normalisation). It is folded into the weights, so the saved SAE works on raw
    activations: W_enc*s, W_dec/s, b_dec/s (pre-activations, and so thresholds, are unchanged).
    """
    from .model import SAE

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
        for name in sae.extra_tensors():  # threshold, r_mag, b_mag
            tensors[name] = getattr(sae, name).detach().clone()
    arch = sae.arch
    if arch.activation == "gated":  # SAELens' GatedSAE has no b_enc: the gate's bias is b_gate
        tensors["b_gate"] = tensors.pop("b_enc")
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
    if len(sae.widths) > 1:
        meta["matryoshka_widths"] = list(sae.widths)
    sl_cfg: dict[str, Any] = {
        "architecture": arch.saelens_architecture,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": dtype,
        "device": "cpu",
        "apply_b_dec_to_input": arch.subtract_b_dec,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": meta,
    }
    if arch.saelens_architecture == "topk":
        sl_cfg["k"] = cfg.k
        sl_cfg["rescale_acts_by_decoder_norm"] = False
    atomic_save_safetensors(run_dir / WEIGHTS_FILE, tensors)
    atomic_write_json(run_dir / CFG_FILE, sl_cfg)
    atomic_write_json(run_dir / SAEKIT_FILE, meta)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (
        isinstance(v, (int, float))
        and not isinstance(v, bool)
        and v == v
        and abs(v) != float("inf")
    )


# cfg.json fields saekit reads: (where, field, required, test, what it must be).
_CFG_FIELDS: list[tuple[str, str, bool, Any, str]] = [
    ("", "d_in", True, lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    ("", "d_sae", True, lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    ("", "architecture", False, lambda v: isinstance(v, str), "a SAELens architecture name"),
    ("", "apply_b_dec_to_input", False, lambda v: isinstance(v, bool), "true or false"),
    ("", "k", False, lambda v: _is_num(v) and v > 0, "a number > 0"),
    ("", "dtype", False, lambda v: isinstance(v, str), "a string"),
    ("", "normalize_activations", False, lambda v: isinstance(v, str), "a string"),
    ("", "reshape_activations", False, lambda v: isinstance(v, str), "a string"),
    ("", "rescale_acts_by_decoder_norm", False, lambda v: isinstance(v, bool), "true or false"),
    ("", "finetuning_scaling_factor", False, lambda v: isinstance(v, bool), "true or false"),
    ("", "metadata", False, lambda v: v is None or isinstance(v, dict), "an object"),
    (
        "metadata.",
        "arch",
        False,
        lambda v: v is None or (isinstance(v, str) and v in ARCHS),
        " | ".join(ARCHS),
    ),
    ("metadata.", "k", False, lambda v: v is None or (_is_num(v) and v > 0), "a number > 0"),
    (
        "metadata.",
        "matryoshka_widths",
        False,
        lambda v: (
            v is None
            or (
                isinstance(v, list)
                and all(_is_int(w) and w >= 1 for w in v)
                and v == sorted(set(v))
            )
        ),
        "increasing integers >= 1",
    ),
    (
        "metadata.",
        "k_aux",
        False,
        lambda v: v is None or (_is_int(v) and v >= 1),
        "an integer >= 1",
    ),
    ("metadata.", "aux_coef", False, lambda v: _is_num(v) and v >= 0, "a number >= 0"),
    ("metadata.", "model_name", False, lambda v: v is None or isinstance(v, str), "a string"),
    ("metadata.", "hook_name", False, lambda v: v is None or isinstance(v, str), "a string"),
    (
        "metadata.",
        "model_from_pretrained_kwargs",
        False,
        lambda v: v is None or isinstance(v, dict),
        "an object",
    ),
    ("metadata.", "site", False, lambda v: v is None or isinstance(v, str), "a string"),
    ("metadata.", "layer", False, lambda v: v is None or _is_int(v), "an integer"),
    ("metadata.", "cache_dir", False, lambda v: v is None or isinstance(v, str), "a string"),
    ("metadata.", "cache", False, lambda v: v is None or isinstance(v, str), "a string"),
    (
        "metadata.",
        "include_bos",
        False,
        lambda v: v is None or isinstance(v, bool),
        "true or false",
    ),
    (
        "metadata.",
        "context_size",
        False,
        lambda v: v is None or (_is_int(v) and v >= 2),
        "an integer >= 2",
    ),
    (
        "metadata.",
        "dataset",
        False,
        lambda v: v is None or isinstance(v, (str, dict)),
        "a name or an object",
    ),
]


def check_run_cfg(cfg_path: Path, sl_cfg: Any) -> None:
    """SaekitError naming the file and the field unless cfg.json has every field saekit reads,
    each of the right type."""
    if not isinstance(sl_cfg, dict):
        raise SaekitError(
            f"{cfg_path} holds {type(sl_cfg).__name__}, not an object of SAE settings; re-run training"
        )
    meta = sl_cfg.get("metadata")
    for where, name, required, ok, what in _CFG_FIELDS:
        holder = sl_cfg if not where else meta if isinstance(meta, dict) else {}
        if name not in holder:
            if required:
                raise SaekitError(
                    f"{cfg_path} lacks the field {where}{name}; re-save the run with `saekit train`"
                )
            continue
        if not ok(holder[name]):
            raise SaekitError(
                f"{cfg_path}: field {where}{name} must be {what}, not {holder[name]!r}; fix it or re-run training"
            )


def load_sae(
    run_dir: str | Path, device: str = "cpu", dtype: torch.dtype | None = None
) -> tuple[Any, dict]:
    """The SAE of a run dir, or of any SAELens-format dir (sae/saelens_format.py says how each
    cfg.json field is read), in input units, and cfg.json's metadata (saekit's fields included,
    plus `weights_dtype`: the dtype the weights are stored in); SaekitError in one line for
    anything it cannot read exactly. `dtype`: cast the weights to it (None: keep theirs).
    Weights holding NaN or inf are refused."""
    from .model import SAE, SAEConfig
    from .saelens_format import apply_plan, read_plan, upgrade_pre6

    run_dir = Path(run_dir)
    cfg_path = run_dir / CFG_FILE
    if not cfg_path.is_file():
        raise SaekitError(f"{run_dir} has no {CFG_FILE}; {_not_a_run(run_dir)}")
    try:
        sl_cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SaekitError(f"{cfg_path} is not valid JSON ({e}); re-run training") from None
    weights_path = run_dir / WEIGHTS_FILE
    if not weights_path.is_file() and (run_dir / "sae.safetensors").is_file():
        raise SaekitError(
            f"{run_dir} is a sparsify SAE (sae.safetensors), which saekit does not read; convert it with SAELens' sparsify_disk_loader and save it with save_model"
        )
    tensors = load_safetensors(weights_path, device=device)
    sl_cfg = upgrade_pre6(sl_cfg)
    check_run_cfg(cfg_path, sl_cfg)
    plan = read_plan(cfg_path, sl_cfg, set(tensors))
    saved = tensors[plan.names["W_enc"]].dtype if plan.names["W_enc"] in tensors else None
    weights = apply_plan(plan, tensors, weights_path)  # refuses integer and bool weights
    for name, t in weights.items():
        n_bad = int((~torch.isfinite(t)).sum())
        if n_bad:
            raise SaekitError(
                f"{weights_path}: {plan.names[name]} holds {n_bad} NaN/inf values (the run diverged); train again with a lower --lr"
            )
    if weights["W_enc"].ndim != 2:
        raise SaekitError(f"{weights_path}: W_enc is not a matrix; re-run training")
    d_in, d_sae = weights["W_enc"].shape
    for name, t in weights.items():
        shape = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}.get(
            name, (d_sae,)
        )
        if tuple(t.shape) != shape:
            raise SaekitError(
                f"{weights_path}: {plan.names[name]} has shape {tuple(t.shape)}, not {shape}; re-run training"
            )
    if (sl_cfg["d_in"], sl_cfg["d_sae"]) != (d_in, d_sae):
        raise SaekitError(
            f"{cfg_path} says d_in {sl_cfg['d_in']}, d_sae {sl_cfg['d_sae']} but {WEIGHTS_FILE} holds W_enc {(d_in, d_sae)}; they are from different runs: re-run training"
        )
    meta = plan.meta
    widths = meta.get("matryoshka_widths")
    if widths is not None and widths[-1] != d_sae:
        raise SaekitError(
            f"{cfg_path}: field metadata.matryoshka_widths must end at d_sae {d_sae}, not {widths[-1]}; fix it or re-run training"
        )
    cfg = SAEConfig(
        arch=plan.arch.name,
        d_in=d_in,
        d_sae=d_sae,
        k=plan.k,
        k_aux=meta.get("k_aux"),
        aux_coef=float(meta.get("aux_coef", 1 / 32)),
        widths=widths,
    )
    if plan.arch.activation == "topk" and not cfg.k <= d_sae:
        raise SaekitError(
            f"{cfg_path}: field k is {cfg.k}, more than the SAE's {d_sae} features; fix it or re-run training"
        )
    sae = SAE(cfg, device=device, dtype=dtype or weights["W_enc"].dtype, arch=plan.arch)
    saved = saved or weights["W_enc"].dtype  # the file's dtype, before cfg.json's cast
    sae.normalize = plan.normalize  # type: ignore[assignment]
    with torch.no_grad():
        for name, t in weights.items():
            getattr(sae, name).copy_(t)
    meta["weights_dtype"] = str(saved).removeprefix("torch.")
    return sae, meta


def _not_a_run(path: Path) -> str:
    """What to do with a dir that is not an SAE dir saekit reads."""
    if (path / "ae.pt").is_file():
        return "it is a dictionary_learning SAE (ae.pt, a pickle), which saekit never loads; convert it to SAELens' format (safetensors) first"
    return "pass a run dir written by `saekit train` or a SAELens SAE dir"
