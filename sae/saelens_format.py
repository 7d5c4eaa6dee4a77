"""Reading any SAELens-format SAE dir: every cfg.json field that changes the math is implemented
here or refused in one line naming the field and the fix; none is ignored.

SAELens 6 writes `cfg.json` (the inference config, or a training config with its extra fields)
and `sae_weights.safetensors`. What saekit does with each field that changes the math:

| field | read as |
|---|---|
| `architecture` | standard, topk, jumprelu, gated: the inference SAE; batchtopk, matryoshka_batchtopk (a training config saved with `save_model`): the inference SAE SAELens' `save_inference_model` makes of it, jumprelu with the estimated threshold (`topk_threshold`) for every feature; any other: refused |
| `apply_b_dec_to_input` | the encoder sees x - b_dec or x (any architecture) |
| `normalize_activations` | none; layer_norm and constant_norm_rescale per row, undone on the reconstruction; expected_average_only_in and covariance_whitening: refused (their constants are not in cfg.json) |
| `rescale_acts_by_decoder_norm` | topk and the BatchTopK training configs: the decoder norms folded into the weights (the same features and reconstruction); other architectures: refused when true |
| `reshape_activations` | none; hook_z: refused |
| `k` | topk: latents kept per input (a whole number) |
| `dtype` | the weights are cast to it, and inputs too (as SAELens does) |
| `finetuning_scaling_factor`, tensor `scaling_factor` | all ones: dropped; else refused |
| `metadata.hook_head_index` | None; anything else refused |
| `metadata.model_from_pretrained_kwargs` | refused if it turns on weight processing saekit's models do not do |
| tensor `log_threshold` (older jumprelu) | threshold = exp(log_threshold), as SAELens |

Pre-6 configs (no `metadata`, `hook_point` or `hook_name` at the top level) are read the way
SAELens converts them: their run fields become metadata, `activation_fn_str` relu or topk (with
`activation_fn_kwargs.k`) picks the architecture; other activation functions are refused.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from .archs import Arch, saved_arch
from .errors import SaekitError

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    **{f"torch.{n}": getattr(torch, n) for n in ("float32", "float64", "float16", "bfloat16")},
}
# SAELens architectures saekit reads; the BatchTopK ones are training configs (save_model).
READABLE = ("standard", "topk", "jumprelu", "gated", "batchtopk", "matryoshka_batchtopk")
BATCHTOPK_TRAINING = ("batchtopk", "matryoshka_batchtopk")
# Pre-6 top-level fields SAELens moves into metadata (with its renames).
PRE6_RENAMES = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index"}
PRE6_METADATA = ("model_name", "hook_name", "hook_head_index", "context_size", "prepend_bos",
                 "dataset_path", "model_from_pretrained_kwargs", "seqpos_slice")  # fmt: skip
# Weight processing saekit's models never do (activations/models.py loads without it).
PROCESSING = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases",
              "refactor_factored_attn_matrices")  # fmt: skip


class Plan(NamedTuple):
    """How a cfg.json's SAE becomes a saekit SAE."""

    arch: Arch  # the row (b_dec handling as saved)
    k: int  # topk's k (32 where it does not apply)
    dtype: torch.dtype | None  # cast the weights to this (None: keep the file's)
    normalize: str  # SAE.normalize: none | layer_norm | constant_norm_rescale
    fold_decoder_norm: bool  # rescale_acts_by_decoder_norm: fold the norms into the weights
    names: dict[str, str]  # saekit parameter -> tensor name in the weights file
    meta: dict  # the metadata (pre-6 run fields moved in)


def _refuse(cfg_path, field: str, value: Any, why: str) -> SaekitError:
    return SaekitError(f"{cfg_path}: field {field} is {value!r}: {why}")


def upgrade_pre6(sl_cfg: Any) -> Any:
    """A pre-6 cfg.json in SAELens 6's layout (SAELens' handle_pre_6_0_config, the fields that
    matter here); a 6.x one (metadata.sae_lens_version >= 6), or one that is not an object of
    settings with an object or no metadata, unchanged."""
    if not isinstance(sl_cfg, dict):
        return sl_cfg
    meta = sl_cfg.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        return sl_cfg
    major = str((meta or {}).get("sae_lens_version") or "").split(".")[0]
    if major.isdigit() and int(major) >= 6:
        return sl_cfg
    cfg = {PRE6_RENAMES.get(k, k): v for k, v in sl_cfg.items()}
    moved = {k: cfg.pop(k) for k in PRE6_METADATA if k in cfg}
    cfg["metadata"] = {**moved, **(meta or {})}
    if cfg.get("activation_fn_str", cfg.get("activation_fn")) == "topk":
        cfg.setdefault("architecture", "topk")
        kw = cfg.get("activation_fn_kwargs")
        if isinstance(kw, dict) and "k" in kw:
            cfg["k"] = kw["k"]
    if isinstance(cfg.get("normalize_activations"), bool):
        cfg["normalize_activations"] = (
            "expected_average_only_in" if cfg["normalize_activations"] else "none"
        )
    return cfg


def read_plan(cfg_path, sl_cfg: dict, tensor_names: set[str]) -> Plan:
    """The Plan for a (type-checked) cfg.json; SaekitError in one line for anything that
    changes the math and is not implemented."""
    meta = dict(sl_cfg.get("metadata") or {})
    arch_field = sl_cfg.get("architecture")
    fn = sl_cfg.get("activation_fn_str", sl_cfg.get("activation_fn"))
    if fn is not None and fn not in ("relu", "topk"):
        raise _refuse(
            cfg_path,
            "activation_fn_str",
            fn,
            "saekit implements relu and topk; convert the SAE to a SAELens 6 architecture",
        )
    if arch_field is not None and arch_field not in READABLE:
        raise _refuse(
            cfg_path,
            "architecture",
            arch_field,
            f"saekit reads {', '.join(READABLE)}; this SAELens class is not implemented",
        )
    saved_as = "jumprelu" if arch_field in BATCHTOPK_TRAINING else arch_field
    if arch_field in BATCHTOPK_TRAINING and meta.get("arch") is None:
        meta["arch"] = "matryoshka" if arch_field == "matryoshka_batchtopk" else "batchtopk"
    try:
        arch = saved_arch(meta.get("arch"), saved_as, sl_cfg.get("apply_b_dec_to_input", True))
    except ValueError as e:
        raise SaekitError(
            f"{cfg_path}: fields metadata.arch and architecture disagree ({e}); fix one of them or re-save the SAE"
        ) from None
    _check_fields(cfg_path, sl_cfg, meta, arch, arch_field)
    k = 32
    if arch.activation == "topk":
        kv = sl_cfg.get("k", meta.get("k", 32))
        if float(kv) != int(kv):
            raise _refuse(cfg_path, "k", kv, "topk keeps a whole number of latents; fix it")
        k = int(kv)
    elif arch.uses_k:
        k = max(1, round(float(sl_cfg.get("k", meta.get("k", 32)))))
    names = {n: n for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if arch.activation == "gated":
        names.update(b_enc="b_gate", r_mag="r_mag", b_mag="b_mag")
    if arch.threshold != "none":
        names["threshold"] = "topk_threshold" if arch_field in BATCHTOPK_TRAINING else "threshold"
        if names["threshold"] not in tensor_names and "log_threshold" in tensor_names:
            names["threshold"] = "log_threshold"
    return Plan(
        arch,
        k,
        DTYPES[sl_cfg["dtype"]] if "dtype" in sl_cfg else None,
        sl_cfg.get("normalize_activations", "none"),
        bool(sl_cfg.get("rescale_acts_by_decoder_norm", False)),
        names,
        meta,
    )


def _check_fields(cfg_path, sl_cfg: dict, meta: dict, arch: Arch, arch_field) -> None:
    """Refuse, in one line, every field value that changes the math and is not implemented."""
    dtype = sl_cfg.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise _refuse(
            cfg_path, "dtype", dtype, f"saekit reads {', '.join(list(DTYPES)[:4])}; fix it"
        )
    norm = sl_cfg.get("normalize_activations", "none")
    if norm in ("expected_average_only_in", "covariance_whitening"):
        fold = (
            "fold_activation_norm_scaling_factor" if norm[0] == "e" else "fold_activation_whitening"
        )
        raise _refuse(
            cfg_path,
            "normalize_activations",
            norm,
            f"the weights expect inputs transformed by constants cfg.json does not record; fold them into the weights (SAELens: sae.{fold}(...)) and save it again",
        )
    if norm not in ("none", "layer_norm", "constant_norm_rescale"):
        raise _refuse(
            cfg_path,
            "normalize_activations",
            norm,
            "saekit reads none, layer_norm, constant_norm_rescale; fix it",
        )
    reshape = sl_cfg.get("reshape_activations", "none")
    if reshape != "none":
        raise _refuse(
            cfg_path,
            "reshape_activations",
            reshape,
            "saekit's hooks read activations unreshaped; use an SAE on a hook without head reshaping",
        )
    if sl_cfg.get("rescale_acts_by_decoder_norm") and not (
        arch.uses_k or arch_field in BATCHTOPK_TRAINING
    ):
        raise _refuse(
            cfg_path,
            "rescale_acts_by_decoder_norm",
            True,
            f"SAELens' {arch_field} SAE does not read it; fold the decoder norms into the weights and set it false",
        )
    if sl_cfg.get("finetuning_scaling_factor"):
        raise _refuse(
            cfg_path,
            "finetuning_scaling_factor",
            True,
            "saekit does not implement the fine-tuning scale; fold scaling_factor into W_dec and set it false",
        )
    head = meta.get("hook_head_index")
    if head is not None:
        raise _refuse(
            cfg_path,
            "metadata.hook_head_index",
            head,
            "saekit's hooks read all heads; use an SAE on a whole hook",
        )
    kwargs = meta.get("model_from_pretrained_kwargs") or {}
    on = [p for p in PROCESSING if isinstance(kwargs, dict) and kwargs.get(p)]
    if on:
        raise _refuse(
            cfg_path,
            "metadata.model_from_pretrained_kwargs",
            kwargs,
            f"the SAE was trained on a model loaded with {on[0]}, and saekit loads models without weight processing; pass a model processed that way with --model",
        )


def apply_plan(plan: Plan, tensors: dict[str, Tensor], weights_path) -> dict[str, Tensor]:
    """The weights under saekit's names, cast and folded as the plan says; SaekitError naming the
    weights file for a missing or unknown tensor."""
    used = set(plan.names.values()) | {"scaling_factor"}
    unknown = sorted(set(tensors) - used)
    if unknown:
        raise SaekitError(
            f"{weights_path} holds {unknown[0]!r}, which {plan.arch.saelens_architecture} SAEs do not have and saekit does not implement; remove it or re-save the SAE"
        )
    sf = tensors.get("scaling_factor")
    if sf is not None and not torch.all(sf == 1):
        raise SaekitError(
            f"{weights_path} holds a fine-tuning scaling_factor that is not all ones; fold it into W_dec and remove it"
        )
    missing = [f for f in plan.names.values() if f not in tensors]
    if missing:
        raise SaekitError(
            f"{weights_path} lacks {missing[0]!r}, which {plan.arch.saelens_architecture} SAEs need; re-save the SAE"
        )
    out = {ours: tensors[theirs] for ours, theirs in plan.names.items()}
    for ours, t in out.items():  # before any cast: integer weights are never rounded into floats
        if not t.is_floating_point():
            raise SaekitError(
                f"{weights_path}: {plan.names[ours]} has dtype {t.dtype}, not a float; re-save the SAE with float32, float16 or bfloat16 weights"
            )
    if plan.dtype is not None:
        out = {k: v.to(plan.dtype) for k, v in out.items()}
    if plan.names.get("threshold") == "log_threshold":
        out["threshold"] = out["threshold"].exp()
    if plan.names.get("threshold") == "topk_threshold":  # one scalar for every feature
        out["threshold"] = out["threshold"].reshape(-1)[:1].expand(out["b_enc"].shape).clone()
    if plan.fold_decoder_norm:
        # SAELens: pre * ||W_dec,i|| selects and scales the latents, decode divides them back;
        # with the norms folded in, the features and reconstruction are the same.
        n = out["W_dec"].norm(dim=1).clamp_min(1e-8)
        out["W_enc"] = out["W_enc"] * n
        out["b_enc"] = out["b_enc"] * n
        out["W_dec"] = out["W_dec"] / n[:, None]
    return out
