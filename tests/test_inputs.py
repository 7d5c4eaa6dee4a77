"""Bad inputs get one `saekit: error:` line and exit 2, never a traceback, and write nothing:
corpus rows, seeds, manifest statistics, SAE weights, per-head hooks and density histories from
another run (issue 23). Every case is a row of docs/reliability.md."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from saekit.activations.corpus import PIECE_CHARS, load_texts, tokenize_contexts
from saekit.activations.models import default_tokenizer
from saekit.scripts.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]


def refused(argv: list[str], capsys) -> str:
    """Run the CLI in-process: exit 2 and exactly one `saekit: error:` line, no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err, err
    lines = [s for s in err.splitlines() if s.strip()]
    errors = [s for s in lines if s.startswith("saekit: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    return errors[0]


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory) -> Path:
    from saekit.activations.cache import build_cache
    from saekit.activations.cache_config import CacheConfig

    out = tmp_path_factory.mktemp("inputs") / "cache"
    return build_cache(
        CacheConfig(out=out, tokens=3000, context_size=64, batch_size=8, shard_mb=0.25)
    ).path


def _train(cache: Path, out: Path, seed: int = 0) -> Path:
    from saekit.training.config import TrainConfig
    from saekit.training.trainer import train

    return train(TrainConfig(cache=str(cache), out=str(out), features=64, batch_size=128,
                             steps=40, checkpoint_every=0, log_every=10, seed=seed))  # fmt: skip


@pytest.fixture(scope="module")
def finished_run(small_cache, tmp_path_factory) -> Path:
    return _train(small_cache, tmp_path_factory.mktemp("run") / "run")


# ------------------------------------------------------------------------------ corpus rows

BAD_CORPORA = {
    # name: (file name, bytes, what the one line must say)
    "empty_txt": ("empty.txt", b"", "holds no text"),
    "blank_lines_only_txt": ("blank.txt", b"\n\n  \n", "holds no text"),
    "non_utf8_txt": ("latin1.txt", "caf\u00e9 au lait\n".encode("latin1"), "byte 0xe9 at byte offset 3"),
    "null_text_jsonl": ("null.jsonl", b'{"text": "ok"}\n{"text": null}\n', "line 2: field 'text' is null"),
    "numeric_text_jsonl": ("num.jsonl", b'{"text": 5}\n', "line 1: field 'text' is 5 (int)"),
    "malformed_jsonl_line": ("bad.jsonl", b'{"text": "a"}\n{"text": "b"}\n{"text": \n', "line 3 is not valid JSON"),
    "jsonl_row_not_an_object": ("list.jsonl", b'["a", "b"]\n', "line 1 is list, not a JSON object"),
    "non_utf8_jsonl": ("latin1.jsonl", b'{"text": "caf\xe9"}\n', "byte 0xe9 at byte offset 13"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_CORPORA))
def test_bad_corpus_is_one_line(case, tmp_path, capsys):
    name, data, says = BAD_CORPORA[case]
    (tmp_path / name).write_bytes(data)
    out = tmp_path / "cache"
    line = refused(["cache", "--dataset", str(tmp_path / name), "--out", str(out),
                    "--tokens", "200", "--context-size", "16"], capsys)  # fmt: skip
    assert says in line and name in line, line
    assert not out.exists()


def test_null_parquet_value_and_json_array_item_are_one_line(tmp_path, capsys):
    datasets.Dataset.from_dict({"text": ["fine", None]}).to_parquet(str(tmp_path / "a.parquet"))
    (tmp_path / "b.json").write_text('[{"text": "fine"}, {"text": 3.5}]')
    for name, says in (("a.parquet", "row 1: field 'text' is null"),
                       ("b.json", "item 2: field 'text' is 3.5 (float)")):  # fmt: skip
        line = refused(["cache", "--dataset", str(tmp_path / name), "--out",
                        str(tmp_path / "c"), "--tokens", "200"], capsys)  # fmt: skip
        assert says in line and name in line, line
    assert not (tmp_path / "c").exists()


def test_non_string_document_of_a_loaded_dataset_is_refused_while_tokenising(tok):
    """A hub dataset is not read by saekit's own reader: its rows are checked as they are
    tokenised."""
    from saekit.sae.errors import SaekitError

    with pytest.raises(
        SaekitError, match=r"document 1 of the corpus is None \(NoneType\), not text"
    ):
        tokenize_contexts(datasets.Dataset.from_dict({"text": ["fine words", None]}), tok, 2)


def test_empty_csv_cells_are_empty_documents(tmp_path, tok):
    """The documented repair: an empty cell is an empty document, skipped like a blank line."""
    (tmp_path / "a.csv").write_text('text,id\n"first, with a comma",1\n,2\nsecond one here,3\n')
    (tmp_path / "b.csv").write_text('text,id\n"first, with a comma",1\nsecond one here,3\n')
    a, b = load_texts(str(tmp_path / "a.csv")), load_texts(str(tmp_path / "b.csv"))
    assert a["text"] == ["first, with a comma", "", "second one here"]
    assert torch.equal(tokenize_contexts(a, tok, 4), tokenize_contexts(b, tok, 4))


def test_local_corpus_is_not_copied_into_the_datasets_cache(tmp_path, monkeypatch):
    hf = tmp_path / "hf-cache"
    hf.mkdir()
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", hf)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(hf))
    for name, text in (("a.jsonl", '{"text": "hello there"}\n'), ("b.txt", "hello\n"),
                       ("c.csv", "text\nhello\n")):  # fmt: skip
        (tmp_path / name).write_text(text)
        assert load_texts(str(tmp_path / name))["text"][0].startswith("hello")
    assert load_texts("default", "test")["text"][0]  # the bundled KJV is read directly too
    assert list(hf.rglob("*")) == []


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


def test_long_document_tokenised_in_pieces_gives_the_same_tokens(tok):
    words = "In the beginning God created   the heaven and\tthe earth.\nAnd 1234 it's".split(" ")
    doc = " ".join(words[i % len(words)] for i in range(3 * PIECE_CHARS // 5))
    assert len(doc) > 2 * PIECE_CHARS
    whole = tok(doc, add_special_tokens=False)["input_ids"]
    ours = tokenize_contexts(datasets.Dataset.from_dict({"text": [doc, "x"]}), tok, 2)
    assert ours[:, 1].tolist()[: len(whole)] == whole
    assert ours[len(whole), 1] == tok.bos_token_id  # then the separator and the next document


RSS_SCRIPT = """
import sys
import datasets, numpy as np
from saekit.activations.corpus import tokenize_contexts
from saekit.activations.models import default_tokenizer
n = int(sys.argv[1])
words = np.array("the of and a to in is you that it he was for on are as with his they".split())
para = " ".join(words[np.random.default_rng(0).integers(len(words), size=20_000)].tolist()) + " "
doc = (para * (n // len(para) + 1))[:n]
ds = datasets.Dataset.from_dict({"text": [doc]})
tok = default_tokenizer()
tokenize_contexts(datasets.Dataset.from_dict({"text": [doc[:300_000]]}), tok, 128)  # warm up
# VmHWM reset here, not ru_maxrss: that keeps the peak from before exec, i.e. pytest's own
open("/proc/self/clear_refs", "w").write("5")
rss = lambda key: next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
before = rss("VmRSS:")
out = tokenize_contexts(ds, tok, 128)
print(len(doc), out.numel(), rss("VmHWM:") - before)
"""


@pytest.mark.slow
def test_one_huge_line_costs_bounded_memory():
    """A 10 MB single-line document: peak RSS grows by < 16 bytes per byte of text (tokenised
    whole, a fast tokenizer's encoding alone costs ~160; streamed, the tokens cost ~8-9)."""
    n = 10_000_000
    p = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(n)], capture_output=True,
                       text=True, cwd=REPO, check=True)  # fmt: skip
    chars, tokens, growth = map(int, p.stdout.split())
    assert chars == n and tokens > n // 5
    assert growth < 16 * n, f"peak RSS grew by {growth / n:.1f} bytes per byte of text"


# ------------------------------------------------------------------------------------ seeds

SEED_VERBS = {
    "train": ["train", "--model", "synthetic", "--steps", "5"],
    "cache": ["cache", "--tokens", "100"],
    "demo": ["demo"],
}


@pytest.mark.parametrize("seed", ["-1", str(2**66)])
@pytest.mark.parametrize("verb", sorted(SEED_VERBS))
def test_seed_out_of_range_is_one_line(verb, seed, tmp_path, capsys):
    out = tmp_path / "out"
    line = refused([*SEED_VERBS[verb], "--out", str(out), f"--seed={seed}"], capsys)
    assert f"--seed {seed} is out of range: give an integer from 0 to 4294967295" in line
    assert not out.exists()


@pytest.mark.parametrize("seed", ["-1", str(2**66)])
def test_seed_out_of_range_is_one_line_in_diagnose(seed, finished_run, tmp_path, capsys):
    out = tmp_path / "report"
    line = refused(["diagnose", "--run", str(finished_run), "--out", str(out),
                    f"--seed={seed}"], capsys)  # fmt: skip
    assert f"--seed {seed} is out of range" in line and not out.exists()


def test_synthetic_spec_seed_out_of_range_is_one_line(tmp_path, capsys):
    line = refused(["train", "--synthetic", f"seed={2**66}", "--out", str(tmp_path / "o")], capsys)
    assert "seed must be an integer from 0 to 4294967295" in line


# -------------------------------------------------------------------- manifest statistics


@pytest.mark.parametrize("value", [0, -5.0, "nan", None, "12"])
def test_bad_mean_norm_in_manifest_is_one_line(value, small_cache, tmp_path, capsys):
    cache = tmp_path / "cache"
    shutil.copytree(small_cache, cache)
    m = json.loads((cache / "manifest.json").read_text())
    m["stats"]["mean_norm"] = math.nan if value == "nan" else value
    (cache / "manifest.json").write_text(json.dumps(m))
    out = tmp_path / "run"
    line = refused(["train", "--cache", str(cache), "--out", str(out), "--steps", "5"], capsys)
    assert "manifest.json: stats.mean_norm is" in line and "rebuild the cache" in line
    assert not out.exists()


# ----------------------------------------------------------------------------- SAE weights


def _weights_as(run: Path, dst: Path, fn) -> Path:
    shutil.copytree(run, dst)
    w = load_file(str(dst / "sae_weights.safetensors"))
    save_file({k: fn(k, v) for k, v in w.items()}, str(dst / "sae_weights.safetensors"))
    return dst


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_weights_are_upcast_by_evaluate(dtype, finished_run, tmp_path, capsys):
    run = _weights_as(finished_run, tmp_path / "run", lambda k, v: v.to(getattr(torch, dtype)))
    cli_main(["evaluate", "--run", str(run), "--tokens", "256", "--batch-size", "4"])
    ev = json.loads((run / "eval.json").read_text())
    assert ev["weights_dtype"] == dtype and ev["compute_dtype"] == "float32"
    assert all(math.isfinite(ev[k]) for k in ("mse", "fvu_pooled", "ce_spliced"))


BAD_WEIGHTS = {
    "int64": (lambda k, v: v.round().long(), "has dtype torch.int64, not a float"),
    "bool": (lambda k, v: v > 0, "has dtype torch.bool, not a float"),
    "nan": (lambda k, v: v.index_fill(0, torch.tensor([0, 3]), math.nan) if k == "W_dec" else v,
            "W_dec holds 1024 NaN/inf values"),
    "inf": (lambda k, v: v.index_fill(0, torch.tensor([1]), math.inf) if k == "b_enc" else v,
            "b_enc holds 1 NaN/inf values"),
}  # fmt: skip


@pytest.mark.parametrize("verb", ["evaluate", "diagnose"])
@pytest.mark.parametrize("case", sorted(BAD_WEIGHTS))
def test_bad_weights_are_one_line(case, verb, finished_run, tmp_path, capsys):
    fn, says = BAD_WEIGHTS[case]
    run = _weights_as(finished_run, tmp_path / "run", fn)
    before = sorted(p.name for p in run.iterdir())
    extra = ["--out", str(tmp_path / "report")] if verb == "diagnose" else []
    line = refused([verb, "--run", str(run), *extra], capsys)
    assert says in line and "sae_weights.safetensors" in line, line
    assert sorted(p.name for p in run.iterdir()) == before and not (tmp_path / "report").exists()


@pytest.mark.parametrize("verb", ["evaluate", "diagnose"])
def test_sae_width_differing_from_the_hook_is_one_line(verb, finished_run, tmp_path, capsys):
    extra = ["--out", str(tmp_path / "report")] if verb == "diagnose" else ["--tokens", "256"]
    line = refused([verb, "--run", str(finished_run), "--hook", "blocks.0.hook_resid_pre",
                    *extra], capsys)  # fmt: skip
    assert (
        "hook blocks.0.hook_resid_pre of model default has width 128 but the SAE reads 512" in line
    )
    assert not (finished_run / "eval.json").exists() and not (tmp_path / "report").exists()


# ---------------------------------------------------------------------- per-head hooks


@pytest.mark.slow
def test_per_head_hook_caches_trains_evaluates_and_diagnoses(tmp_path, capsys):
    """hook_q is [batch, pos, head, d_head]: every verb reads it with the heads side by side
    (d_in = n_heads * d_head = 128), and evaluate splices the reconstruction back per head."""
    hook, cache, run = "blocks.0.attn.hook_q", tmp_path / "cache", tmp_path / "run"
    cli_main(["cache", "--hook", hook, "--out", str(cache), "--tokens", "2000",
              "--context-size", "64", "--batch-size", "8"])  # fmt: skip
    assert json.loads((cache / "manifest.json").read_text())["d_in"] == 128
    cli_main(["train", "--cache", str(cache), "--out", str(run), "--features", "64",
              "--batch-size", "128", "--steps", "20", "--checkpoint-every", "0"])  # fmt: skip
    cli_main(["evaluate", "--run", str(run), "--tokens", "256", "--batch-size", "4"])
    ev = json.loads((run / "eval.json").read_text())
    assert ev["hook_name"] == hook and ev["spliced"]
    assert all(math.isfinite(ev[k]) for k in ("mse", "ce_clean", "ce_spliced", "kl_clean_spliced"))
    assert ev["ce_spliced"] != ev["ce_clean"]  # the reconstruction really went in
    cli_main(["diagnose", "--run", str(run), "--out", str(tmp_path / "report"), "--no-logits",
              "--scan-tokens", "0"])  # fmt: skip
    assert (tmp_path / "report" / "report.html").is_file()
    live = tmp_path / "live"
    cli_main(["train", "--model", "default", "--hook", hook, "--out", str(live), "--features",
              "64", "--batch-size", "128", "--steps", "5", "--checkpoint-every", "0",
              "--context-size", "64", "--buffer-tokens", "4096"])  # fmt: skip
    assert json.loads((live / "cfg.json").read_text())["d_in"] == 128


# ------------------------------------------------------------ density history of another run


@pytest.fixture(scope="module")
def other_run(small_cache, tmp_path_factory) -> Path:
    return _train(small_cache, tmp_path_factory.mktemp("other") / "run", seed=1)


@pytest.mark.parametrize("verb", ["evaluate", "diagnose"])
def test_density_history_of_another_run_is_refused(verb, finished_run, other_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    hist = "density_history.safetensors"
    shutil.copy(other_run / hist, run / hist)  # same shape, another seed
    extra = ["--out", str(tmp_path / "report")] if verb == "diagnose" else ["--tokens", "256"]
    line = refused([verb, "--run", str(run), *extra], capsys)
    assert f"{run / hist} is from another run (run fingerprint" in line, line
    assert not (run / "eval.json").exists() and not (tmp_path / "report").exists()


def test_density_history_without_fingerprint_still_loads_with_one_note(
    finished_run, tmp_path, capsys
):
    from saekit.diagnostics.run_info import feature_classes
    from saekit.training.run import FINGERPRINT, load_history

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    path = run / "density_history.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != FINGERPRINT}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    save_file(tensors, str(path), metadata=meta)
    capsys.readouterr()
    h = load_history(path, 64)
    load_history(path, 64)
    assert feature_classes(run)["dead"] >= 0
    assert torch.equal(h.counts, load_file(str(finished_run / path.name))["counts"])
    err = capsys.readouterr().err
    assert err.count("has no run fingerprint") == 1, err
