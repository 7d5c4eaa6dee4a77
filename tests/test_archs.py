"""The architecture table (sae/archs.py) drives behaviour: every row trains on a tiny synthetic
cache and round-trips through save/load with the settings its fields promise, the CLI offers
exactly its rows, and a row added to the table trains with no other code."""

from __future__ import annotations

import dataclasses
import json
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
    assert ("k" in sl_cfg) == arch.uses_k
    assert (sl_cfg["metadata"]["input_scale_folded"] != 1.0) == arch.input_norm
    hist = load_file(str(run / "density_history.safetensors"))
    assert (len(hist["resample_steps"]) > 0) == (arch.resample == "anthropic")  # --resample auto
    w = load_file(str(run / "sae_weights.safetensors"))
    if arch.unit_decoder:  # saved in input units; the unit rows are those of training
        norms = w["W_dec"].norm(dim=1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    ckpt = json.loads(next((run / "checkpoints").glob("*.json")).read_text())
    resolved = ckpt["resolved"]
    assert resolved["lr"] == arch.default_lr
    assert resolved["lr_decay"] == arch.lr_decay and resolved["l1_warmup"] == arch.l1_warmup
    assert (resolved["l1_coef"] == 0.0) == (arch.default_l1 is None)
    # Loaded back: the same arch, weights and features.
    sae, meta = load_sae(run)
    assert sae.cfg.arch == name and meta["arch"] == name
    for k in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(sae, k).detach(), w[k])
    x = torch.rand(32, D_IN) + 1.0
    with torch.no_grad():
        assert torch.isfinite(sae.encode(x)).all()
        if arch.uses_k:
            assert ((sae.encode(x) > 0).sum(1) <= 4).all()


def test_saved_arch_reads_the_table():
    assert saved_arch(None, None, True) == "relu_l1"
    assert saved_arch(None, "standard", False) == "relu_l1_v2"
    assert saved_arch(None, "topk", True) == "topk"
    assert saved_arch("relu_l1", "standard", False) == "relu_l1_v2"  # b_dec handling decides
    assert saved_arch("topk", "topk", False) == "topk"  # no topk row without subtract_b_dec


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

    cfg = TrainConfig(cache="c", out="o", arch="gated")  # the Python API: no CLI choices check
    with pytest.raises(SaekitError, match="--arch 'gated' is unknown; choose one of relu_l1"):
        cfg.resolve(16, 4.0, 1000)
