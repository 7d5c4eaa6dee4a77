"""SAE dirs written by SAELens itself (its SAE classes, save_model / save_inference_model, no
hub): each loads through saekit.sae.io.load_sae and encodes and reconstructs as SAELens does,
or is refused in one line naming the cfg.json field; never a traceback, never silently wrong.
sae/saelens_format.py lists how each field is read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from saekit.sae.errors import SaekitError
from saekit.sae.io import load_sae

sae_lens = pytest.importorskip("sae_lens")
from sae_lens import (  # noqa: E402
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
    GatedSAE,
    GatedSAEConfig,
    GatedTrainingSAE,
    GatedTrainingSAEConfig,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    JumpReLUTrainingSAE,
    JumpReLUTrainingSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    StandardTrainingSAE,
    StandardTrainingSAEConfig,
    TopKSAE,
    TopKSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
)
from sae_lens.saes.matryoshka_batchtopk_sae import (  # noqa: E402
    MatryoshkaBatchTopKTrainingSAE,
    MatryoshkaBatchTopKTrainingSAEConfig,
)
from sae_lens.saes.sae import SAEMetadata  # noqa: E402

D_IN, D_SAE = 16, 64
HOOK = "blocks.0.mlp.hook_post"


def _meta(**kw) -> SAEMetadata:
    return SAEMetadata(hook_name=HOOK, model_name="default", context_size=32, **kw)


def _randomize(sae, seed: int = 0):
    """Random weights that make some features fire and others not (thresholds, gates)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name == "threshold":
                p.copy_(torch.rand(p.shape, generator=g) * 0.5)
            elif name in ("W_enc", "W_dec"):
                p.copy_(torch.randn(p.shape, generator=g) / D_IN**0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        if hasattr(sae, "topk_threshold"):
            sae.topk_threshold.fill_(0.2)
    return sae


def _x(n: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(9)
    return torch.randn(n, D_IN, generator=g) * 2 + torch.linspace(-1, 3, D_IN)


def _agree(path: Path, reference, atol: float = 1e-5) -> None:
    """Our load of `path` encodes and reconstructs as SAELens' `reference` inference SAE."""
    ours, meta = load_sae(path)
    x = _x()
    with torch.no_grad():
        f_theirs, r_theirs = reference.encode(x), reference(x)
        out = ours.reconstruct(x)
        f_ours = ours.encode(x)
    assert (f_theirs > 0).any() and (f_theirs == 0).any()
    assert torch.allclose(f_ours.float(), f_theirs.float(), atol=atol), (
        (f_ours - f_theirs).abs().max()
    )
    assert torch.allclose(out.acts, f_ours)
    assert torch.allclose(out.recon.float(), r_theirs.float(), atol=10 * atol)
    assert meta["hook_name"] == HOOK


INFERENCE = {
    # name: (SAE class, config class, config kwargs)
    "standard": (StandardSAE, StandardSAEConfig, {}),
    "standard no b_dec in": (StandardSAE, StandardSAEConfig, {"apply_b_dec_to_input": False}),
    "standard layer_norm": (StandardSAE, StandardSAEConfig, {"normalize_activations": "layer_norm"}),
    "standard constant_norm_rescale": (StandardSAE, StandardSAEConfig, {"normalize_activations": "constant_norm_rescale"}),
    "topk": (TopKSAE, TopKSAEConfig, {"k": 5}),
    "topk no b_dec in": (TopKSAE, TopKSAEConfig, {"k": 5, "apply_b_dec_to_input": False}),
    "topk rescale_acts_by_decoder_norm": (TopKSAE, TopKSAEConfig, {"k": 5, "rescale_acts_by_decoder_norm": True}),
    "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig, {}),
    "jumprelu no b_dec in": (JumpReLUSAE, JumpReLUSAEConfig, {"apply_b_dec_to_input": False}),
    "jumprelu layer_norm": (JumpReLUSAE, JumpReLUSAEConfig, {"normalize_activations": "layer_norm"}),
    "gated": (GatedSAE, GatedSAEConfig, {}),
    "gated no b_dec in": (GatedSAE, GatedSAEConfig, {"apply_b_dec_to_input": False}),
    "standard bfloat16": (StandardSAE, StandardSAEConfig, {"dtype": "bfloat16"}),
}  # fmt: skip


@pytest.mark.parametrize("case", list(INFERENCE))
def test_inference_saes_load_and_agree(tmp_path, case):
    cls, cfg_cls, kw = INFERENCE[case]
    sae = _randomize(cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, metadata=_meta(), **kw)))
    if kw.get("dtype") == "bfloat16":
        sae = sae.to(torch.bfloat16)
    sae.save_model(tmp_path)
    reference = cls.load_from_disk(tmp_path)
    _agree(tmp_path, reference, atol=5e-2 if "bfloat16" in case else 1e-5)
    ours, _ = load_sae(tmp_path)
    if kw.get("dtype"):
        assert ours.W_enc.dtype == torch.bfloat16


TRAINING = {
    # name: (training class, config class, kwargs); inference reference: save_inference_model
    "standard": (StandardTrainingSAE, StandardTrainingSAEConfig, {}),
    "topk (rescale_acts_by_decoder_norm, SAELens' training default)": (TopKTrainingSAE, TopKTrainingSAEConfig, {"k": 5}),
    "jumprelu": (JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig, {}),
    "gated": (GatedTrainingSAE, GatedTrainingSAEConfig, {}),
    "batchtopk": (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, {"k": 5, "rescale_acts_by_decoder_norm": False}),
    "batchtopk rescaled": (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, {"k": 5}),
    "matryoshka": (MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig, {"k": 5, "matryoshka_widths": [8, 32, 64]}),
}  # fmt: skip


@pytest.mark.parametrize("case", list(TRAINING))
def test_training_saes_load_as_their_inference_sae(tmp_path, case):
    """A training SAE saved with save_model (its training config) and the same SAE saved with
    save_inference_model (what SAELens serves it as) load as the same SAE, which encodes as
    SAELens' inference SAE. BatchTopK's and Matryoshka's inference SAE is a JumpReLU with the
    estimated threshold for every feature."""
    cls, cfg_cls, kw = TRAINING[case]
    sae = _randomize(cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, metadata=_meta(), **kw)))
    sae.save_model(tmp_path / "training")
    sae.save_inference_model(tmp_path / "inference")
    reference = sae_lens.SAE.load_from_disk(tmp_path / "inference")
    _agree(tmp_path / "training", reference)
    _agree(tmp_path / "inference", reference)
    arch = json.loads((tmp_path / "training" / "cfg.json").read_text())["architecture"]
    ours, meta = load_sae(tmp_path / "training")
    if arch in ("batchtopk", "matryoshka_batchtopk"):
        assert ours.arch.threshold == "estimated" and (ours.threshold == 0.2).all()


def _saved(tmp_path: Path, cls=StandardSAE, cfg_cls=StandardSAEConfig, **kw) -> Path:
    sae = _randomize(cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, metadata=_meta(), **kw)))
    sae.save_model(tmp_path / "sae")
    return tmp_path / "sae"


def _edit(path: Path, **fields) -> Path:
    cfg = json.loads((path / "cfg.json").read_text())
    for k, v in fields.items():
        if k.startswith("metadata__"):
            cfg["metadata"][k.split("__", 1)[1]] = v
        else:
            cfg[k] = v
    (path / "cfg.json").write_text(json.dumps(cfg))
    return path


REFUSED = {
    # name: (cfg.json edits, the field the one-line message must name)
    "expected_average_only_in": ({"normalize_activations": "expected_average_only_in"}, "normalize_activations"),
    "covariance_whitening": ({"normalize_activations": "covariance_whitening"}, "normalize_activations"),
    "an unknown normalisation": ({"normalize_activations": "l2"}, "normalize_activations"),
    "hook_z reshaping": ({"reshape_activations": "hook_z"}, "reshape_activations"),
    "a head index": ({"metadata__hook_head_index": 3}, "hook_head_index"),
    "a transcoder": ({"architecture": "transcoder"}, "architecture"),
    "abstopk": ({"architecture": "abstopk"}, "architecture"),
    "an unknown dtype": ({"dtype": "int8"}, "dtype"),
    "fine-tuning scale": ({"finetuning_scaling_factor": True}, "finetuning_scaling_factor"),
    "a processed model": ({"metadata__model_from_pretrained_kwargs": {"fold_ln": True}}, "model_from_pretrained_kwargs"),
    "rescale on standard": ({"rescale_acts_by_decoder_norm": True}, "rescale_acts_by_decoder_norm"),
    "fractional topk k": ({"architecture": "topk", "k": 2.5}, "k"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSED))
def test_fields_saekit_does_not_implement_are_refused_in_one_line(tmp_path, case):
    edits, field = REFUSED[case]
    path = _edit(_saved(tmp_path), **edits)
    with pytest.raises(SaekitError) as e:
        load_sae(path)
    msg = str(e.value)
    assert "\n" not in msg and "cfg.json" in msg and field in msg, msg


def test_unknown_and_missing_tensors_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    path = _saved(tmp_path, JumpReLUSAE, JumpReLUSAEConfig)
    w = load_file(str(path / "sae_weights.safetensors"))
    save_file({**w, "W_skip": torch.zeros(D_IN, D_IN)}, str(path / "sae_weights.safetensors"))
    with pytest.raises(SaekitError, match="holds 'W_skip'"):
        load_sae(path)
    save_file(
        {k: v for k, v in w.items() if k != "threshold"}, str(path / "sae_weights.safetensors")
    )
    with pytest.raises(SaekitError, match="lacks 'threshold'"):
        load_sae(path)
    ones = {**w, "scaling_factor": torch.ones(D_SAE)}  # all ones: dropped, as SAELens
    save_file(ones, str(path / "sae_weights.safetensors"))
    load_sae(path)
    save_file(
        {**ones, "scaling_factor": torch.full((D_SAE,), 2.0)}, str(path / "sae_weights.safetensors")
    )
    with pytest.raises(SaekitError, match="scaling_factor"):
        load_sae(path)


def test_pre6_config_loads_as_saelens_converts_it(tmp_path):
    """A SAELens 5 cfg.json (run fields at the top level, activation_fn_str topk with k in
    activation_fn_kwargs, hook_point) reads as SAELens 6 reads it."""
    path = _saved(tmp_path, TopKSAE, TopKSAEConfig, k=5)
    old = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
           "model_name": "default", "hook_point": HOOK, "hook_point_layer": 0, "context_size": 32,
           "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 5},
           "apply_b_dec_to_input": True, "normalize_activations": False,
           "finetuning_scaling_factor": False, "sae_lens_training_version": "3.0.0"}  # fmt: skip
    (path / "cfg.json").write_text(json.dumps(old))
    reference = sae_lens.SAE.load_from_disk(path)
    assert type(reference).__name__ == "TopKSAE"
    _agree(path, reference)
    (path / "cfg.json").write_text(json.dumps({**old, "activation_fn_str": "tanh-relu"}))
    with pytest.raises(SaekitError, match="activation_fn_str"):
        load_sae(path)


def test_other_libraries_dirs_are_refused_in_one_line(tmp_path):
    dl = tmp_path / "dictionary_learning"
    dl.mkdir()
    (dl / "ae.pt").write_bytes(b"not opened")
    (dl / "config.json").write_text("{}")
    with pytest.raises(SaekitError, match="dictionary_learning SAE .* never loads"):
        load_sae(dl)
    sp = tmp_path / "sparsify"
    sp.mkdir()
    (sp / "cfg.json").write_text(json.dumps({"d_in": D_IN, "num_latents": D_SAE, "k": 4}))
    (sp / "sae.safetensors").write_bytes(b"")
    with pytest.raises(SaekitError, match="sparsify SAE"):
        load_sae(sp)


@pytest.fixture(scope="module")
def foreign_sae(cache, tmp_path_factory) -> Path:
    """A SAELens JumpReLU SAE on the default model's mlp_post, saved by SAELens with none of
    saekit's metadata (no site, no layer, no model): only hook_name."""
    from saekit.activations.cache_reader import CacheReader

    d_in = json.loads((cache / "manifest.json").read_text())["d_in"]
    cfg = JumpReLUSAEConfig(d_in=d_in, d_sae=256, metadata=SAEMetadata(hook_name=HOOK))
    sae = JumpReLUSAE(cfg)
    x = CacheReader(cache, 256).sample(4096, seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # directions of real rows, so that features fire at various rates
        W = x[torch.randperm(len(x), generator=g)[:256]]
        W = W / W.norm(dim=1, keepdim=True)
        sae.W_dec.copy_(W)
        sae.W_enc.copy_(W.T)
        pre = (x - sae.b_dec) @ sae.W_enc
        sae.threshold.copy_(pre.quantile(0.99, dim=0))
    path = tmp_path_factory.mktemp("foreign") / "sae"
    sae.save_model(path)
    return path


def _cli(argv: list[str]) -> tuple[int, str]:
    import contextlib
    import io

    from saekit.scripts import cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            cli.main(argv)
        except SystemExit as e:
            return int(e.code or 0), err.getvalue()
    return 0, err.getvalue()


def test_evaluate_a_saelens_sae_with_model_and_hook_flags(foreign_sae, tmp_path):
    run = tmp_path / "sae"
    import shutil

    shutil.copytree(foreign_sae, run)
    code, err = _cli(["evaluate", "--run", str(run), "--tokens=256"])
    assert code == 2 and "model_name; pass --model" in err and "Traceback" not in err
    code, err = _cli(["evaluate", "--run", str(run), "--model", "default", "--hook",
                      "blocks.0.hook_resid_post", "--context-size", "32", "--tokens=256"])  # fmt: skip
    assert code == 2 and "has width" in err and "--hook" in err
    code, err = _cli(["evaluate", "--run", str(run), "--model", "default",
                      "--context-size", "32", "--tokens=256"])  # fmt: skip
    assert code == 0, err
    m = json.loads((run / "eval.json").read_text())
    assert m["hook_name"] == HOOK and m["site"] == "mlp_post" and m["layer"] == 0
    assert m["fvu_pooled"] > 0 and 0 < m["l0"] < 256  # a planted SAE, not a trained one
    # No density history: dead / ultra-rare from the evaluated tokens, said so.
    assert m["density_source"].startswith("fresh measurement on the")
    assert m["ultra_rare_resolvable"] is False and m["d_sae"] == 256


def test_diagnose_a_saelens_sae_on_a_cache(foreign_sae, cache, tmp_path):
    """No density history: the density is measured afresh on the cache; the layer for the
    logit weights comes from the hook's name (this crashed in logit_weights before)."""
    from saekit.diagnostics.report import Report

    out = tmp_path / "report"
    code, err = _cli(["diagnose", "--run", str(foreign_sae), "--out", str(out), "--model",
                      "default", "--cache", str(cache), "--tokens", "20000", "--ln-scale", "1"])  # fmt: skip
    assert code == 0, err
    rep = Report.open(out)
    assert rep.summary["density_source"].startswith("fresh measurement")
    assert (
        rep.summary["logit_weights"]["computed"]
        and rep.summary["logit_weights"]["recipe"] == "mlp_post"
    )
    assert rep.summary["counts"]["live"] > 0
    code, err = _cli(["diagnose", "--run", str(foreign_sae), "--out", str(tmp_path / "r2")])
    assert code == 2 and "pass --cache" in err and "Traceback" not in err
