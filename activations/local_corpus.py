"""Local corpus files read directly (never copied into the Hugging Face datasets cache), with
every bad row refused in one line naming the file and the row.

- .txt: UTF-8, one document per line. Bytes that are not UTF-8 are refused with their offset
  (decoding them as U+FFFD would train on text that was never there).
- .jsonl / .json: a JSON object per line (.json may also be one array of objects). A line that
  is not JSON is refused with its line number; so is a `text` value that is null or not a
  string (a number is a sign the wrong column was named).
- .csv: a header row, then one document per row; an empty cell is an empty document (skipped,
  like a blank line of a .txt file).
- .parquet: a string column; a null value is refused with its row index.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from ..sae.errors import SaekitError

SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".csv")
KIND = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def read_utf8(path: Path) -> str:
    """The file's text; SaekitError naming the first byte that is not UTF-8 and its offset."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SaekitError(
            f"{path} is not UTF-8: byte 0x{data[e.start]:02x} at byte offset {e.start}; "
            "convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def json_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """("line N", object) of each non-blank line of a JSON lines file (or ("item N", object) of
    each item of a .json file holding one array)."""
    text = read_utf8(path)
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise SaekitError(f"{path} is not valid JSON ({e}); fix the file") from None
        lines: Iterator[tuple[int, object]] = ((i + 1, r) for i, r in enumerate(items))
        what = "item"
    else:
        lines = _parsed_lines(path, text)
        what = "line"
    for n, row in lines:
        if not isinstance(row, dict):
            raise SaekitError(
                f"{path} {what} {n} is {type(row).__name__}, not a JSON object; give one object per row"
            )
        yield f"{what} {n}", row


def _parsed_lines(path: Path, text: str) -> Iterator[tuple[int, object]]:
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise SaekitError(
                f"{path} line {n} is not valid JSON ({e.msg} at column {e.colno}); fix or delete that line"
            ) from None


def _text_value(path: Path, where: str, value: object, column: str) -> str:
    if isinstance(value, str):
        return value
    what = "null" if value is None else f"{value!r} ({type(value).__name__})"
    raise SaekitError(
        f"{path} {where}: field {column!r} is {what}, not a string; fix or delete that row, or pass --text-column NAME"
    )


def _json_texts(path: Path, column: str) -> Iterator[str]:
    for where, row in json_rows(path):
        if column not in row:
            raise SaekitError(
                f"dataset {path} has no column {column!r} ({where}); its columns are {list(row)}: pass --text-column NAME"
            )
        yield _text_value(path, where, row[column], column)


def _csv_texts(path: Path, column: str) -> Iterator[str]:
    csv.field_size_limit(sys.maxsize)  # one long document is one cell
    reader = csv.DictReader(read_utf8(path).splitlines(keepends=True))
    try:
        if reader.fieldnames is None:
            return
        if column not in reader.fieldnames:
            raise SaekitError(
                f"dataset {path} has no column {column!r}; its columns are {list(reader.fieldnames)}: pass --text-column NAME"
            )
        for row in reader:
            value = row.get(column)
            yield value or ""  # an empty or missing cell: an empty document
    except csv.Error as e:
        raise SaekitError(
            f"{path} line {reader.line_num} is not valid CSV ({e}); fix that line"
        ) from None


def _parquet_texts(path: Path, column: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
        if column not in names:
            raise SaekitError(
                f"dataset {path} has no column {column!r}; its columns are {names}: pass --text-column NAME"
            )
        values = pq.read_table(path, columns=[column]).column(column).to_pylist()
    except SaekitError:
        raise
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        raise SaekitError(f"{path} is not a readable parquet file ({e}); re-create it") from None
    for i, v in enumerate(values):
        yield _text_value(path, f"row {i}", v, column)


def read_documents(files: list[Path], column: str) -> list[str]:
    """Every document of the files, in order; SaekitError if none holds any text."""
    docs: list[str] = []
    for f in files:
        kind = KIND[f.suffix.lower()]
        if kind == "text":
            docs.extend(read_utf8(f).splitlines())
        elif kind == "json":
            docs.extend(_json_texts(f, column))
        elif kind == "csv":
            docs.extend(_csv_texts(f, column))
        else:
            docs.extend(_parquet_texts(f, column))
    if not any(d.strip() for d in docs):
        where = files[0] if len(files) == 1 else f"{len(files)} files in {files[0].parent}"
        raise SaekitError(f"{where} holds no text (empty); pass a corpus with text in it")
    return docs
