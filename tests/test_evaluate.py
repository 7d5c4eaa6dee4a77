"""Loss recovered on the default model: a perfect reconstruction recovers everything, a zero one
is zero ablation."""

import json

import pytest
import torch

from saekit.activations.corpus import load_texts, tokenize_contexts
from saekit.activations.models import load_model
from saekit.diagnostics.evaluate import EvaluateConfig, evaluate, splice_metrics

TOKENS = 8 * 256


@pytest.fixture(scope="module")
def model():
    return load_model("default")


@pytest.fixture(scope="module")
def tokens(model):
    return tokenize_contexts(load_texts("default", "test"), model.tokenizer, 256, TOKENS)


def _save_run(run_dir, model, d_sae, W_enc, W_dec):
    from saekit.sae.io import save_sae
    from saekit.sae.model import SAE, SAEConfig

    d_in = W_enc.shape[0]
    sae = SAE(SAEConfig(arch="relu_l1", d_in=d_in, d_sae=d_sae))
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    meta = dict(
        model_name="default",
        hook_name="blocks.0.mlp.hook_post",
        site="mlp_post",
        layer=0,
        cache_dir=None,
        context_size=256,
        dataset="default",
        arch="relu_l1",
        d_in=d_in,
        d_sae=d_sae,
    )
    save_sae(sae, run_dir, meta)


def test_identity_sae_recovers_all_loss(tmp_path, model, tokens):
    # mlp_post activations are >= 0, so relu(x I) I = x exactly.
    eye = torch.eye(model.cfg.d_mlp)
    _save_run(tmp_path, model, model.cfg.d_mlp, eye, eye)
    ev = evaluate(EvaluateConfig(run=str(tmp_path), tokens=TOKENS, batch_size=8))
    m = json.loads((tmp_path / "eval.json").read_text())
    assert m == json.loads(json.dumps(ev.metrics))
    assert m["split"] == "test" and m["spliced"] is True
    assert m["loss_recovered_zero"] == pytest.approx(1.0, abs=1e-5)
    assert m["loss_recovered_mean"] == pytest.approx(1.0, abs=1e-5)
    assert m["kl_clean_spliced"] == pytest.approx(0.0, abs=1e-5)
    assert m["fvu_pooled"] == pytest.approx(0.0, abs=1e-6)
    assert m["ce_zero_ablated"] > m["ce_clean"] + 0.1  # the MLP matters
    assert m["n_tokens"] == int((tokens != model.tokenizer.bos_token_id).sum())  # BOS excluded


def test_residual_identity_and_zero_sae(model, tokens):
    hook = "blocks.0.hook_resid_post"

    # [I, -I] encoder, [I; -I] decoder: relu(x) - relu(-x) = x for signed activations.
    def plus_minus(x):
        f = torch.relu(torch.cat([x, -x], -1))
        return f[:, : x.shape[1]] - f[:, x.shape[1] :], f

    ident = splice_metrics(model, tokens, hook, plus_minus, batch_size=8, bos_id=0, progress=False)
    assert ident["loss_recovered_zero"] == pytest.approx(1.0, abs=1e-5)
    assert ident["loss_recovered_mean"] == pytest.approx(1.0, abs=1e-5)
    assert ident["kl_clean_spliced"] == pytest.approx(0.0, abs=1e-5)

    def zero(x):
        return torch.zeros_like(x), torch.zeros(x.shape[0], 4)

    z = splice_metrics(model, tokens, hook, zero, batch_size=8, bos_id=0, progress=False)
    assert z["ce_spliced"] == pytest.approx(z["ce_zero_ablated"], abs=1e-6)
    assert z["loss_recovered_zero"] == pytest.approx(0.0, abs=1e-6)
    assert z["l0"] == 0
    assert z["fvu_pooled"] >= 1.0  # sum |x|^2 >= sum |x - mean|^2
