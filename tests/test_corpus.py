import json
import time

import datasets
import pytest
import torch
from transformer_lens.utilities.tokenize_utils import tokenize_and_concatenate

from saekit.activations.corpus import load_texts, tokenize_contexts
from saekit.activations.models import default_tokenizer
from saekit.sae.errors import SaekitError


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


def test_default_corpus_splits_disjoint_and_deterministic():
    train, test = load_texts("default", "train"), load_texts("default", "test")
    assert train.column_names == ["text"] and test.column_names == ["text"]
    # 1189 chapters in the KJV; every 20th is held out
    assert len(train) + len(test) == 1189 and len(test) == 1189 // 20
    assert not set(train["text"]) & set(test["text"])
    assert train["text"][0].startswith("In the beginning God created the heaven and the earth.")
    assert test["text"][0] == load_texts("default", "test")["text"][0]
    assert load_texts("default", "train")["text"][:50] == train["text"][:50]
    with pytest.raises(SaekitError, match="splits"):
        load_texts("default", "validation")


def test_local_files_and_folder(tmp_path):
    docs = ["first document here", "second one", "third and last"]
    (tmp_path / "a.txt").write_text("\n".join(docs) + "\n")
    with open(tmp_path / "b.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"body": d, "id": 1}) + "\n")
    datasets.Dataset.from_dict({"body": docs, "n": [1, 2, 3]}).to_parquet(
        str(tmp_path / "c.parquet")
    )
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, d in enumerate(docs):
        (folder / f"{i}.txt").write_text(d + "\n")

    assert load_texts(str(tmp_path / "a.txt"))["text"] == docs
    assert load_texts(str(tmp_path / "b.jsonl"), text_column="body")["text"] == docs
    pq = load_texts(str(tmp_path / "c.parquet"), text_column="body")
    assert pq.column_names == ["text"] and pq["text"] == docs
    assert sorted(load_texts(str(folder))["text"]) == sorted(docs)
    assert load_texts(str(tmp_path / "a.txt"), split="train[:2]")["text"] == docs[:2]

    with pytest.raises(SaekitError, match=r"columns are \['body', 'id'\]"):
        load_texts(str(tmp_path / "b.jsonl"), text_column="text")
    with pytest.raises(SaekitError, match="mixes file types"):
        load_texts(str(tmp_path))
    with pytest.raises(SaekitError, match="does not exist"):
        load_texts(str(tmp_path / "nope.jsonl"))


def test_hub_dataset_offline_fails_fast(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    t0 = time.time()
    with pytest.raises(SaekitError, match="cannot be reached"):
        load_texts("someone/some-dataset-that-is-not-local")
    assert time.time() - t0 < 10


def test_tokenize_contexts_layout(tok):
    docs = [
        "In the beginning God created the heaven and the earth.",
        "And God said,",
        "Let there be light.",
    ]
    ctx = 8
    out = tokenize_contexts(datasets.Dataset.from_dict({"text": docs}), tok, ctx)
    bos = tok.bos_token_id
    # by hand: docs joined with BOS, cut into rows of ctx-1, each prefixed with BOS
    stream = []
    for i, d in enumerate(docs):
        stream += ([bos] if i else []) + tok(d, add_special_tokens=False)["input_ids"]
    n = len(stream) // (ctx - 1)
    want = torch.tensor([[bos] + stream[i * (ctx - 1) : (i + 1) * (ctx - 1)] for i in range(n)])
    assert out.dtype == torch.int64 and out.shape == (n, ctx)
    assert torch.equal(out, want)
    assert (out[:, 0] == bos).all() and (out[:, 1:] == bos).sum() == len(docs) - 1


def test_tokenize_contexts_matches_transformer_lens(tok):
    texts = load_texts("default", "test").select(range(10))
    ours = tokenize_contexts(texts, tok, 64)
    # our tokenizer's EOS is its BOS, so TL's EOS separator is our BOS separator
    theirs = tokenize_and_concatenate(texts, tok, max_length=64, num_proc=None)[:]["tokens"]
    assert torch.equal(ours, theirs)


def test_tokenize_contexts_max_tokens(tok):
    texts = load_texts("default", "train")
    out = tokenize_contexts(texts, tok, 128, max_tokens=3000)
    assert out.shape == (24, 128)  # ceil(3000 / 128)
    assert torch.equal(out, tokenize_contexts(texts.select(range(40)), tok, 128)[:24])
