"""Streaming document readers for pretraining: one document at a time, from sources that need not fit in memory.

A source spec (``data.paths`` entry of a :class:`~jaxft.data.text_config.TextDataConfig`) is

| spec                              | documents                                                               |
|-----------------------------------|-------------------------------------------------------------------------|
| a text file (any other suffix)    | the whole file, or one per line / per blank-line separated paragraph   |
| ``*.jsonl`` (``.jsonl.gz``)       | each line's ``text_field``                                              |
| ``*.parquet``                     | each row's ``text_field``, read a record batch at a time (pyarrow)      |
| a ``datasets.save_to_disk`` folder | each row's ``text_field`` (memory-mapped arrow)                        |
| any other folder, or a glob       | the files it matches (``**`` recursive), sorted, each read as above    |
| ``hf:NAME[[:CONFIG]:SPLIT]``      | ``datasets.load_dataset(NAME, CONFIG, split=SPLIT, streaming=True)``    |

An ``hf:`` spec without a split reads ``train``; CONFIG is the dataset's config name
(``hf:wikitext:wikitext-103-raw-v1:train``), and an error of ``load_dataset`` is a DataError naming the spec.
Text files read with ``document: line`` or ``paragraph`` are streamed a line at a time (lines as
``str.splitlines`` cuts them, numbered from 1), so their size does not matter; ``document: file`` holds the whole
file as one document, so a very large single text file should use ``line`` or ``paragraph``.

Documents are numbered from 0 in reading order across a source's files; ``read_documents(..., start=n)`` resumes at
document ``n`` without decoding the ones before it where the format allows (whole text files and parquet files
are skipped by their counts). A checkpoint therefore stores a document number per source, not a file offset, and
`source_signature` (the names and sizes of a source's files, in the stream's fingerprint) tells a resume that a
file was added, removed or resized since, which would shift those numbers.
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import os
from collections import deque
from collections.abc import Iterator
from itertools import takewhile
from pathlib import Path
from typing import NamedTuple

from jaxft.data.formats import DataError

HF_PREFIX = "hf:"
_PARQUET_BATCH_ROWS = 1024


class Document(NamedTuple):
    """One document's text and where it came from (``file:line``, ``file:row``, ``file``), for reports."""

    location: str
    text: str


def expand_source(spec: str) -> list[str]:
    """The files (or the one dataset folder / ``hf:`` name) a source spec reads, in reading order; a spec that
    matches nothing is a DataError naming it."""
    if spec.startswith(HF_PREFIX):
        parse_hf_spec(spec)
        return [spec]
    path = Path(spec)
    if path.is_dir():
        if _is_saved_dataset(path):
            return [spec]
        files = sorted(str(p) for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    elif path.is_file():
        files = [spec]
    else:
        files = sorted(p for p in glob.glob(spec, recursive=True) if Path(p).is_file())
    if not files:
        raise DataError(spec, "no documents", "matches no file (expected a file, a folder, a glob, a "
                        "datasets.save_to_disk folder or hf:NAME[[:CONFIG]:SPLIT])")
    return files


def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """``hf:NAME``, ``hf:NAME:SPLIT`` or ``hf:NAME:CONFIG:SPLIT`` as (name, config or None, split)."""
    parts = spec[len(HF_PREFIX):].split(":")
    if len(parts) > 3 or not all(parts):
        raise DataError(spec, "bad hf: source", "expected hf:NAME, hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT (the "
                        "dataset, its config name and split, e.g. hf:wikitext:wikitext-103-raw-v1:train) in "
                        "data.paths")
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    return parts[0], None, parts[1] if len(parts) == 2 else "train"


def source_signature(spec: str) -> str:
    """A cheap signature of what a source spec reads: how many files, their bytes, and a digest of their names
    (relative to the spec's fixed part, so a moved corpus still matches) and sizes. A file added, removed or
    resized changes it (an edit that keeps every size does not: nothing is read). An ``hf:`` source is remote
    and signed by its spec alone; a ``save_to_disk`` folder by its data files."""
    if spec.startswith(HF_PREFIX):
        return spec
    items = expand_source(spec)
    root = Path(spec) if Path(spec).is_dir() else Path(*takewhile(lambda part: not glob.has_magic(part),
                                                                  Path(spec).parent.parts))
    files = [Path(item) for item in items]
    if len(files) == 1 and files[0].is_dir():  # a save_to_disk folder: the arrow files its state.json lists
        files = _saved_dataset_files(files[0])
    listing = [(os.path.relpath(f, root), f.stat().st_size) for f in files]
    digest = hashlib.sha1(json.dumps(listing).encode()).hexdigest()[:12]
    return f"{len(listing)} files, {sum(size for _, size in listing)} bytes, names and sizes {digest}"


def _saved_dataset_files(folder: Path) -> list[Path]:
    """The data files of a ``save_to_disk`` folder (``state.json``'s ``_data_files``), not the caches or locks that
    later ``map`` calls or readers leave beside them."""
    try:
        listed = json.loads((folder / "state.json").read_text(encoding="utf-8"))["_data_files"]
        return [folder / entry["filename"] for entry in listed]
    except (OSError, ValueError, KeyError, TypeError):  # no state.json (a DatasetDict's top folder): every file
        return sorted(p for p in folder.rglob("*") if p.is_file())


def read_documents(spec: str, *, text_field: str = "text", document: str = "file",
                   start: int = 0) -> Iterator[Document]:
    """The documents of one source spec, from document number ``start`` on; a record without a string
    ``text_field`` is a DataError naming its file and line / row."""
    skip = start
    for item in expand_source(spec):
        held = yield from _read_item(item, text_field, document, skip)  # each reader returns its item's count
        skip = max(0, skip - held)


def _read_item(item: str, text_field: str, document: str, skip: int):
    """A generator of one item's documents after its first ``skip``, returning how many the item holds."""
    if item.startswith(HF_PREFIX):
        return (yield from _read_hf(item, text_field, skip))
    if Path(item).is_dir():
        return (yield from _read_saved_dataset(item, text_field, skip))
    if item.endswith(".parquet"):
        return (yield from _read_parquet(item, text_field, skip))
    if item.endswith((".jsonl", ".jsonl.gz")):
        return (yield from _read_jsonl(item, text_field, skip))
    return (yield from _read_text(item, document, skip))


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()


def _read_text(path: str, document: str, skip: int):
    if document == "file":
        return (yield from _read_whole_text(path, skip))
    parts = _line_documents(path) if document == "line" else _paragraphs(path)
    count = 0
    for location, part in parts:
        count += 1
        if count > skip:
            yield Document(location, part)
    return count


def _read_whole_text(path: str, skip: int):
    if skip:
        return 1  # a whole file is one document (an empty one is dropped by cleaning): skipped unread
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        deque(_text_lines(path), maxlen=0)  # read again a line at a time: raises the error naming the line
        raise DataError(path, "not UTF-8", f"byte {e.start} cannot be decoded ({e.reason})") from None
    yield Document(path, text)
    return 1


def _text_lines(path: str) -> Iterator[tuple[int, str]]:
    """A text file's lines as ``str.splitlines`` of the whole text cuts and numbers them (from 1), read one
    ``\\n``-terminated line at a time: no UTF-8 sequence holds the byte 0x0A, and ``splitlines`` of each such line
    gives the same lines (``\\r\\n``, ``\\r``, ``\\x85``, ``\\u2028``... included) as of the whole text."""
    number = 0
    with open(path, "rb") as raw:
        for chunk in raw:
            try:
                text = chunk.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{number + 1}", "not UTF-8", f"byte {e.start} of the line cannot be "
                                f"decoded ({e.reason})") from None
            for line in text.splitlines():
                number += 1
                yield number, line


def _line_documents(path: str) -> Iterator[tuple[str, str]]:
    return ((f"{path}:{number}", line) for number, line in _text_lines(path) if line.strip())


def _paragraphs(path: str) -> Iterator[tuple[str, str]]:
    """Blank-line separated paragraphs with the line each starts on."""
    lines, first = [], 0
    for number, line in _text_lines(path):
        if line.strip():
            first = first or number
            lines.append(line)
        elif lines:
            yield f"{path}:{first}", "\n".join(lines)
            lines, first = [], 0
    if lines:
        yield f"{path}:{first}", "\n".join(lines)


def _read_jsonl(path: str, text_field: str, skip: int):
    raw = gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
    with io.TextIOWrapper(raw, encoding="utf-8") as lines:
        number = 0
        for line_number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            number += 1
            if number <= skip:
                continue
            location = f"{path}:{line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(location, "invalid JSON", e.msg) from None
            yield Document(location, _text_of(record, text_field, location))
    return number


def _text_of(record, text_field: str, location: str) -> str:
    value = record.get(text_field) if isinstance(record, dict) else None
    if not isinstance(value, str):
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(location, "no text", f"expected a string field {text_field!r} (data.text_field), got "
                        f"{type(value).__name__}; the record has {keys}")
    return value


def _read_parquet(path: str, text_field: str, skip: int):
    import pyarrow.parquet as pq  # datasets' dependency; imported only when a parquet source is read

    table = pq.ParquetFile(path)
    if skip >= table.metadata.num_rows:
        return table.metadata.num_rows  # skipped by its count, unread
    if text_field not in table.schema_arrow.names:
        raise DataError(path, "no text", f"no column {text_field!r} (data.text_field); columns: "
                        f"{table.schema_arrow.names}")
    row = 0
    for batch in table.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[text_field]):
        if row + batch.num_rows <= skip:
            row += batch.num_rows
            continue
        for value in batch.column(0).to_pylist():
            row += 1
            if row > skip:
                yield Document(f"{path}:row {row}", _text_of({text_field: value}, text_field, f"{path}:row {row}"))
    return row


def _read_saved_dataset(path: str, text_field: str, skip: int):
    import datasets

    dataset = datasets.load_from_disk(path)
    if isinstance(dataset, datasets.DatasetDict):
        raise DataError(path, "several splits", f"the folder holds splits {list(dataset)}; name one of their "
                        "folders")
    if skip >= len(dataset):
        return len(dataset)
    return (yield from _rows(path, iter(dataset.skip(skip)), text_field, skip))


def _read_hf(spec: str, text_field: str, skip: int):
    import datasets

    name, config, split = parse_hf_spec(spec)
    try:
        stream = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # datasets raises many kinds (missing name, config or split, hub errors): report each
        raise DataError(spec, "cannot load", f"datasets.load_dataset({name!r}, {config!r}, split={split!r}) of "
                        f"this data.paths entry failed: {type(e).__name__}: {e}") from e
    return (yield from _rows(spec, iter(stream.skip(skip)), text_field, skip))


def _rows(where: str, rows: Iterator[dict], text_field: str, skip: int):
    row = skip
    for row, record in enumerate(rows, skip + 1):
        location = f"{where}:row {row}"
        yield Document(location, _text_of(record, text_field, location))
    return row
