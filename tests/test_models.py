import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from saekit.activations.models import (
    default_tokenizer,
    llama_to_hooked,
    load_model,
    model_spec,
    smollm2_hf,
)
from saekit.sae.errors import SaekitError
from saekit.scripts.experiments.train_default_model import evaluate

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def default_model():
    return load_model("default")


def test_default_model_loads_fast_with_the_specified_shapes():
    import transformer_lens  # noqa: F401  (importing it takes seconds; the bar is for loading)

    t0 = time.time()
    model = load_model("default")
    seconds = time.time() - t0
    print(f"default model loaded in {seconds:.2f}s")
    assert seconds < 5  # the promise is < 2 s; 5 leaves room for a busy CI machine
    cfg = model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.d_mlp, cfg.d_vocab, cfg.act_fn) == (
        1,
        128,
        512,
        4096,
        "relu",
    )
    assert cfg.normalization_type == "LN" and cfg.n_ctx >= 128
    assert model.blocks[0].mlp.W_in.shape == (128, 512)
    assert model_spec(model) == "default"
    assert model.tokenizer.bos_token_id == 0
    tokens = model.to_tokens("In the beginning God created the heaven and the earth.")
    assert tokens[0, 0] == model.tokenizer.bos_token_id and (tokens[0, 1:] != 0).all()
    assert (
        model.tokenizer.decode(tokens[0, 1:])
        == "In the beginning God created the heaven and the earth."
    )
    _, cache = model.run_with_cache(tokens, names_filter="blocks.0.mlp.hook_post")
    assert cache["blocks.0.mlp.hook_post"].shape == (1, tokens.shape[1], 512)
    assert hasattr(model, "ln_final") and model.ln_final.w.shape == (128,)


def test_default_model_beats_unigram_entropy_by_1_5_nats(default_model):
    ev = evaluate(default_model, max_tokens=50_000)
    print(ev)
    assert ev.n_tokens > 40_000
    assert ev.unigram_entropy - ev.heldout_loss >= 1.5


@pytest.mark.slow
def test_smollm2_logits_match_transformers():
    torch.manual_seed(0)
    # what load_model("smollm2-135m") does, keeping the transformers model to compare with
    hf_model, tokenizer = smollm2_hf()
    model = llama_to_hooked(hf_model, tokenizer, "smollm2-135m")
    assert (model.cfg.n_layers, model.cfg.d_model, model.cfg.n_key_value_heads) == (30, 576, 3)
    text = "The quick brown fox jumps over the lazy dog. In the beginning God created"
    tokens = model.to_tokens(text)
    assert tokens[0, 0] == tokenizer.bos_token_id
    with torch.no_grad():
        ours = model(tokens)
        theirs = hf_model(tokens).logits
    diff = (ours - theirs).abs().max().item()
    print(
        f"smollm2-135m max |logit difference| = {diff:.2e} (logit scale {theirs.abs().max().item():.1f})"
    )
    # measured: 6.6e-05 (float32, logits up to ~31). A wrong conversion (e.g. rotary pairing, GQA, RMS eps) is off by >1.
    assert diff < 1e-3
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_local_hf_directory_round_trips(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=64, n_head=2, n_positions=64, n_ctx=64, vocab_size=4096)
    ).eval()
    hf.save_pretrained(tmp_path)
    default_tokenizer().save_pretrained(tmp_path)
    model = load_model(str(tmp_path))
    assert model_spec(model) == str(tmp_path.resolve())
    tokens = model.to_tokens("And God said, Let there be light")
    with torch.no_grad():
        diff = (model(tokens) - hf(tokens).logits).abs().max().item()
    assert diff < 1e-4


def test_unknown_names_and_dirs(tmp_path):
    with pytest.raises(SaekitError, match="unknown model 'no-such-model'.*smollm2-135m"):
        load_model("no-such-model")
    with pytest.raises(SaekitError, match="does not exist"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(SaekitError, match="no config.json"):
        load_model(str(tmp_path))


def test_hub_model_offline_fails_fast_in_one_line():
    from saekit.activations.models import _in_hf_cache

    if _in_hf_cache("gpt2"):
        pytest.skip("gpt2 is in the local Hugging Face cache")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    code = (
        "from saekit.sae.errors import SaekitError\n"
        "from saekit.activations.models import load_model\n"
        "try:\n    load_model('gpt2-small')\nexcept SaekitError as e:\n    print('ERR', e)\n"
    )
    t0 = time.time()
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    seconds = time.time() - t0
    print(f"gpt2-small offline failed in {seconds:.1f}s: {out.stdout.strip()}")
    assert seconds < 30
    assert out.stdout.startswith(
        "ERR model 'gpt2-small' is not in the local Hugging Face cache and the hub cannot be reached"
    )
    assert len(out.stdout.strip().splitlines()) == 1
