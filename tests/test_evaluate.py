"""Loss recovered on the default model: a perfect reconstruction recovers everything, a zero one
is zero ablation."""

import json

import pytest
import torch

from saekit.activations.corpus import load_texts, tokenize_contexts
from saekit.activations.models import load_model
from saekit.diagnostics.evaluate import EvaluateConfig, evaluate
from saekit.diagnostics.splice import splice_metrics

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


def _history(run_dir, d_sae: int, window_tokens: int) -> None:
    """A one-window density history: 0-99 dead, 100-199 at 1 firing (ultra-rare when the window
    holds >= 1e7 tokens: 10 firings at 1e-6), the rest live; 200-209 the control group."""
    from saekit.sae.io import atomic_save_safetensors

    counts = torch.full((1, d_sae), 10_000)
    counts[0, :100], counts[0, 100:200] = 0, 1
    control = torch.zeros(d_sae, dtype=torch.bool)
    control[200:210] = True
    hist = {
        "counts": counts,
        "window_tokens": torch.tensor([window_tokens]),
        "window_end_step": torch.tensor([100]),
        "resample_steps": torch.tensor([50]),
        "resampled": torch.zeros(1, d_sae, dtype=torch.bool),
        "held_out": control[None].clone(),
        "control_mask": control,
    }
    atomic_save_safetensors(run_dir / "density_history.safetensors", hist, {})


def test_ablating_a_class_against_the_model_with_those_neurons_zeroed(tmp_path, model, tokens):
    # Identity SAE on mlp_post: ablating features zeroes exactly those neurons.
    d = model.cfg.d_mlp
    eye = torch.eye(d)
    _save_run(tmp_path, model, d, eye, eye)
    _history(tmp_path, d, 20_000_000)
    (tmp_path / "some.txt").write_text("# a list\n300, 301\n302 300\n")
    ev = evaluate(
        EvaluateConfig(
            run=str(tmp_path),
            tokens=TOKENS,
            batch_size=8,
            ablate=f"dead,ultra_rare,control,{tmp_path / 'some.txt'}",
        )
    )
    m = json.loads((tmp_path / "eval.json").read_text())
    assert m == json.loads(json.dumps(ev.metrics))
    abl = m["ablations"]
    sets = {
        "dead": range(100),
        "ultra_rare": range(100, 200),
        "control": range(200, 210),
        str(tmp_path / "some.txt"): [300, 301, 302],
    }
    assert list(abl) == list(sets)
    assert "density_history" in m["ablation_classes"]["classes_from"]
    # Independently: the clean model with those neurons zeroed at the non-BOS positions.
    hook = "blocks.0.mlp.hook_post"
    bos = model.tokenizer.bos_token_id
    keep = tokens != bos
    loss_keep = keep[:, :-1]
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=hook)
        x = cache[hook][keep]
        logp = logits[:, :-1].log_softmax(-1)
        ce_clean = -logp.gather(-1, tokens[:, 1:, None])[..., 0][loss_keep].mean()
        for name, feats in sets.items():
            idx = torch.tensor(list(feats))

            def zero(act, hook, idx=idx):
                act[..., idx] = torch.where(keep[..., None], 0.0, act[..., idx])
                return act

            lp = model.run_with_hooks(tokens, fwd_hooks=[(hook, zero)])[:, :-1].log_softmax(-1)
            ce = -lp.gather(-1, tokens[:, 1:, None])[..., 0][loss_keep].mean()
            kl = (logp.exp() * (logp - lp)).sum(-1)[loss_keep].mean()
            r = abl[name]
            assert r["n_features"] == len(idx)
            assert r["delta_mse"] == pytest.approx(float(x[:, idx].pow(2).sum(-1).mean()), rel=1e-5)
            assert r["delta_ce"] == pytest.approx(float(ce - ce_clean), abs=2e-5)
            assert r["delta_kl"] == pytest.approx(float(kl), abs=2e-5)
    assert abl["dead"]["delta_ce"] > 0.01  # the first 100 neurons matter


def test_bad_ablations_are_refused_before_the_model_runs(tmp_path, model):
    from saekit.sae.errors import SaekitError

    eye = torch.eye(model.cfg.d_mlp)
    _save_run(tmp_path, model, model.cfg.d_mlp, eye, eye)
    with pytest.raises(SaekitError, match="needs .*density_history"):
        evaluate(EvaluateConfig(run=str(tmp_path), ablate="dead"))
    _history(tmp_path, model.cfg.d_mlp, 5_000_000)  # 10 firings: resolves only >= 2e-6
    (tmp_path / "bad.txt").write_text("1 2 x")
    (tmp_path / "far.txt").write_text("512")
    for spec, msg in [
        ("ultra_rare", "too few to resolve"),
        ("nope", "neither a class"),
        ("dead,,live", "empty item"),
        (str(tmp_path / "bad.txt"), "holds 'x'"),
        (str(tmp_path / "far.txt"), "out of range"),
    ]:
        with pytest.raises(SaekitError, match=msg):
            evaluate(EvaluateConfig(run=str(tmp_path), ablate=spec))
    assert not (tmp_path / "eval.json").exists()
