"""The architecture table (sae/archs.py) drives behaviour: every row trains on a tiny synthetic
cache and round-trips through save/load with the settings its fields promise, the CLI offers
exactly its rows, and a row added to the table trains with no other code."""

from __future__ import annotations

import dataclasses
import json
import shutil
import typing
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saekit.activations.cache_files import write_cache
from saekit.sae.archs import ARCHS, Arch, saved_arch
from saekit.sae.fast_step import has_fast_step
from saekit.sae.io import load_sae
from saekit.training.config import TrainConfig
from saekit.training.trainer import train

D_IN = 16


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory) -> Path:
    """4,000 rows of sparse non-negative sums of 32 random directions in 16 dimensions."""
    g = torch.Generator().manual_seed(0)
    D = torch.randn(32, D_IN, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    shards = []
    for s in range(0, 4000, 2000):
        codes = (torch.rand(2000, 32, generator=g) < 0.1) * torch.rand(2000, 32, generator=g) * 3
        a = (codes @ D + 0.05 * torch.randn(2000, D_IN, generator=g)).relu() + 1.0
        shards.append({"activations": a, "tokens": torch.zeros(2000),
                       "context": torch.arange(s, s + 2000), "position": torch.ones(2000)})  # fmt: skip
    return write_cache(tmp_path_factory.mktemp("tiny") / "cache", shards)


def _train(cache: Path, out: Path, arch: str) -> Path:
    return train(
        TrainConfig(
            cache=str(cache),
            out=str(out),
            arch=arch,
            features=64,
            k=4,
            steps=8,
            batch_size=128,
            log_every=2,
            checkpoint_every=4,
            resample_inputs=1000,
        )  # fmt: skip
    )


def test_cli_choices_are_the_table():
    hint = typing.get_type_hints(TrainConfig)["arch"]
    assert typing.get_origin(hint) is typing.Literal
    assert typing.get_args(hint) == tuple(ARCHS)
    import argparse

    from saekit.scripts.cli import add_dataclass_args

    p = argparse.ArgumentParser()
    add_dataclass_args(p, TrainConfig)
    (action,) = [a for a in p._actions if a.dest == "arch"]
    assert list(action.choices) == list(ARCHS)


def test_every_field_is_documented():
    from saekit.scripts.cli import field_docs

    docs = field_docs(Arch)
    assert [f.name for f in dataclasses.fields(Arch) if f.name not in docs] == []


@pytest.mark.parametrize("name", list(ARCHS))
def test_every_arch_trains_and_round_trips(tiny_cache, tmp_path, name):
    arch = ARCHS[name]
    run = _train(tiny_cache, tmp_path / "run", name)
    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [2, 4, 6, 8]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in lines)
    assert ("aux" in lines[-1]) == (arch.aux_loss != "none")
    if arch.uses_k:
        assert all(m["l0"] <= 4 for m in lines)
    # What the row promises shows in the saved files.
    sl_cfg = json.loads((run / "cfg.json").read_text())
    assert sl_cfg["architecture"] == arch.saelens_architecture
    assert sl_cfg["apply_b_dec_to_input"] == arch.subtract_b_dec
    assert ("k" in sl_cfg) == (arch.saelens_architecture == "topk")
    assert (sl_cfg["metadata"]["input_scale_folded"] != 1.0) == (arch.input_norm != "none")
    hist = load_file(str(run / "density_history.safetensors"))
    assert (len(hist["resample_steps"]) > 0) == (arch.resample == "anthropic")  # --resample auto
    w = load_file(str(run / "sae_weights.safetensors"))
    if arch.unit_decoder:  # unit rows in training units; saved in input units (W_dec / scale)
        norms = w["W_dec"].norm(dim=1) * sl_cfg["metadata"]["input_scale_folded"]
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    ckpt = json.loads(next((run / "checkpoints").glob("*.json")).read_text())
    resolved = ckpt["resolved"]
    assert resolved["lr"] == arch.default_lr
    assert ckpt["config"]["arch"] == name
    assert resolved["lr_decay"] == arch.lr_decay and resolved["l1_warmup"] == arch.l1_warmup
    assert (resolved["l1_coef"] == 0.0) == (arch.default_l1 is None)
    # Loaded back: the same arch, weights and features.
    sae, meta = load_sae(run)
    assert sae.cfg.arch == name and meta["arch"] == name and sae.arch == arch
    saved_names = {"b_enc": "b_gate"} if arch.activation == "gated" else {}
    for k in ("W_enc", "b_enc", "W_dec", "b_dec", *sae.extra_tensors()):
        assert torch.equal(getattr(sae, k).detach(), w[saved_names.get(k, k)]), k
    if arch.threshold == "estimated":  # BatchTopK's moving average of the smallest kept value
        assert (w["threshold"] > 0).all() and (w["threshold"] == w["threshold"][0]).all()
    if arch.threshold == "trained":  # JumpReLU's thresholds moved from their start, >= 0
        assert (w["threshold"] >= 0).all() and (w["threshold"] != arch.threshold_init).any()
    x = torch.rand(32, D_IN) + 1.0
    with torch.no_grad():
        assert torch.isfinite(sae.encode(x)).all()
        if arch.activation == "topk":
            assert ((sae.encode(x) > 0).sum(1) <= 4).all()


def test_saved_arch_reads_the_table():
    assert saved_arch(None, None, True) is ARCHS["relu_l1"]
    assert saved_arch(None, "standard", False) is ARCHS["relu_l1_v2"]
    assert saved_arch(None, "topk", True) is ARCHS["topk"]
    assert saved_arch(None, "jumprelu", False) is ARCHS["jumprelu"]
    assert saved_arch("batchtopk", "jumprelu", True) is ARCHS["batchtopk"]
    assert saved_arch("relu_l1", "standard", False) is ARCHS["relu_l1_v2"]  # b_dec decides
    # No row has the saved b_dec handling: the row with the flag as saved (the math reads it).
    tk = saved_arch("topk", "topk", False)
    assert tk.name == "topk" and not tk.subtract_b_dec
    assert tk == dataclasses.replace(ARCHS["topk"], subtract_b_dec=False)
    jr = saved_arch(None, "jumprelu", True)  # a JumpReLU SAE, never the BatchTopK row
    assert jr.name == "jumprelu" and jr.subtract_b_dec
    with pytest.raises(ValueError, match="saved as SAELens architecture 'jumprelu', not 'topk'"):
        saved_arch("batchtopk", "topk", True)
    with pytest.raises(ValueError, match="no saekit arch"):
        saved_arch(None, "transcoder", True)


def test_a_new_row_trains_through_autograd(tiny_cache, tmp_path, monkeypatch):
    """A row with no hand-written step (relu + L1 + AuxK) trains on the autograd fallback and
    saves and loads like the others: adding an architecture starts with a row."""
    row = dataclasses.replace(ARCHS["relu_l1"], name="relu_auxk", aux_loss="auxk", resample="none")
    assert not has_fast_step(row)
    monkeypatch.setitem(ARCHS, row.name, row)
    run = _train(tiny_cache, tmp_path / "run", row.name)
    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert "aux" in lines[-1] and lines[-1]["loss"] < lines[0]["loss"]
    sae, meta = load_sae(run)
    assert sae.cfg.arch == "relu_auxk" and sae.arch == row


def test_unknown_arch_is_one_line_error():
    from saekit.sae.errors import SaekitError

    cfg = TrainConfig(cache="c", out="o", arch="gatd")  # the Python API: no CLI choices check
    with pytest.raises(SaekitError, match="--arch 'gatd' is unknown; choose one of relu_l1"):
        cfg.resolve(16, 4.0, 1000)


@pytest.mark.parametrize("name", list(ARCHS))
def test_every_arch_resumes_bitwise(tiny_cache, tmp_path, name):
    """A run cut back to its step-4 checkpoint (as a kill leaves it) and resumed ends bitwise
    equal to the uninterrupted run: weights, thresholds, Adam's state, history, metrics."""
    full = _train(tiny_cache, tmp_path / "full", name)
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    for f in ("cfg.json", "saekit.json", "sae_weights.safetensors", "sparsity.safetensors",
              "density_history.safetensors"):  # fmt: skip
        (cut / f).unlink()
    assert [p.name for p in sorted((cut / "checkpoints").glob("*.json"))] == ["step-00000004.json"]
    with open(cut / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "torn"')  # what the killed run wrote after its checkpoint
    cfg = json.loads((cut / "checkpoints" / "step-00000004.json").read_text())["config"]
    train(TrainConfig(**{**cfg, "out": str(cut), "resume": True}))
    for f in ("sae_weights.safetensors", "density_history.safetensors", "sparsity.safetensors"):
        a, b = load_file(str(full / f)), load_file(str(cut / f))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (f, k)
    assert (full / "metrics.jsonl").read_text().count("\n") == 4
    steps = [json.loads(s)["step"] for s in (cut / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8]


def test_matryoshka_widths_flag(tiny_cache, tmp_path):
    """--widths sets the nested dictionaries; they are saved and read back; the default is the
    row's fractions of the features."""
    base = dict(cache=str(tiny_cache), arch="matryoshka", features=64, k=4, steps=4,
                batch_size=128, log_every=2, checkpoint_every=0)  # fmt: skip
    run = train(TrainConfig(out=str(tmp_path / "a"), widths=[8, 20, 64], **base))
    meta = json.loads((run / "cfg.json").read_text())["metadata"]
    assert meta["matryoshka_widths"] == [8, 20, 64]
    sae, _ = load_sae(run)
    assert sae.widths == [8, 20, 64]
    run = train(TrainConfig(out=str(tmp_path / "b"), **base))
    assert load_sae(run)[0].widths == [4, 8, 16, 32, 64]
    from saekit.sae.errors import SaekitError

    with pytest.raises(SaekitError, match="--widths 8 4 64 must increase"):
        TrainConfig(out="o", widths=[8, 4, 64], **base).resolve(D_IN, 4.0, 4000)


def test_memory_estimate_counts_each_step():
    """The estimate charges archs without a hand-written step (and the batch top-k) for the dense
    tensors their step makes (a brief peak, on top of what stays), the hand-written relu step
    for its two [B, d_sae] buffers, jumprelu's for three (what stays)."""
    from saekit.training.memory import estimate

    est = {}
    for name in ARCHS:
        cfg = TrainConfig(cache="c", out="o", arch=name, features=8192, batch_size=4096,
                          resample="none")  # fmt: skip
        est[name] = estimate(cfg, cfg.resolve(512, 20.0, 10**6))
    dense = 4096 * 4  # bytes per feature of one [B, d_sae] float32 tensor
    assert 0.8 * dense < est["jumprelu"].per_feature - est["relu_l1"].per_feature < 1.2 * dense
    assert est["gated"].transient == 10 * dense and est["batchtopk"].transient == 9 * dense
    assert est["gated"].total - est["relu_l1"].total > 5 * 8192 * dense
    assert est["batchtopk"].total - est["topk"].total > 4 * 8192 * dense
