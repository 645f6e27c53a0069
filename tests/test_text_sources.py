"""Streaming document readers: each format's documents, in order, against the files read independently here (plain
file reads, json, pyarrow, datasets), and resuming at every document number gives the rest of the same sequence."""
from __future__ import annotations

import gzip
import itertools
import json
import re
import tracemalloc

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxft.data.formats import DataError
from jaxft.data.text_config import DOCUMENT_UNITS, TextDataConfig
from jaxft.data.text_sources import expand_source, read_documents, source_signature
from jaxft.data.text_stream import TextStream, stream_fingerprint
from jaxft.hf.tokenizer import load_tokenizer
from tests.test_text_stream import build_tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    (root / "text" / "sub").mkdir(parents=True)
    (root / "text" / "a.txt").write_text("first line\nsecond line\n\n\nnew paragraph\nits second line\n")
    (root / "text" / "sub" / "b.py").write_text("def f():\n    return 'ü'\n")
    (root / "text" / ".hidden").write_text("never read")
    records = [{"text": f"record {i}", "id": i} for i in range(7)]
    (root / "r.jsonl").write_text("\n".join(json.dumps(r) for r in records[:4]) + "\n\n")
    with gzip.open(root / "r2.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in records[4:]))
    pq.write_table(pa.table({"body": [f"row {i}" for i in range(2500)]}), root / "p.parquet", row_group_size=700)
    datasets.Dataset.from_dict({"text": [f"saved {i}" for i in range(5)]}).save_to_disk(str(root / "saved"))
    (root / "jsonl_folder").mkdir()
    (root / "jsonl_folder" / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    return root


def texts(spec, **kwargs):
    return [d.text for d in read_documents(str(spec), **kwargs)]


def test_each_format_reads_its_documents_in_order(corpus):
    text = corpus / "text"
    assert texts(text) == [(text / "a.txt").read_text(), (text / "sub" / "b.py").read_text()]
    assert texts(text / "a.txt", document="line") == ["first line", "second line", "new paragraph", "its second line"]
    assert texts(text / "a.txt", document="paragraph") == ["first line\nsecond line", "new paragraph\nits second line"]
    assert texts(corpus / "r*.jsonl*") == [f"record {i}" for i in range(7)]  # the glob sorts r.jsonl first
    assert texts(corpus / "p.parquet", text_field="body") == pq.read_table(corpus / "p.parquet")["body"].to_pylist()
    assert texts(corpus / "saved") == datasets.load_from_disk(str(corpus / "saved"))["text"]
    assert texts(f"hf:{corpus / 'jsonl_folder'}") == [f"record {i}" for i in range(7)]
    assert texts(f"hf:{corpus / 'jsonl_folder'}:train") == [f"record {i}" for i in range(7)]


@pytest.mark.parametrize("spec, kwargs", [("text", {"document": "line"}), ("text", {"document": "paragraph"}),
                                          ("text", {}), ("r*.jsonl*", {}), ("p.parquet", {"text_field": "body"}),
                                          ("saved", {})])
def test_resuming_at_any_document_gives_the_rest(corpus, spec, kwargs):
    full = list(read_documents(str(corpus / spec), **kwargs))
    starts = range(len(full) + 2) if len(full) < 50 else [0, 1, 699, 700, 701, 1400, 2499, 2500, 2600]
    for start in starts:
        assert list(read_documents(str(corpus / spec), start=start, **kwargs)) == full[start:], start


def test_locations_name_the_file_and_record(corpus):
    docs = list(read_documents(str(corpus / "r*.jsonl*")))
    assert docs[1].location == f"{corpus / 'r.jsonl'}:2"
    assert docs[4].location == f"{corpus / 'r2.jsonl.gz'}:1"
    assert list(read_documents(str(corpus / "p.parquet"), text_field="body", start=701))[0].location.endswith(
        "p.parquet:row 702")


def test_bad_sources_name_the_file_and_record(corpus, tmp_path):
    with pytest.raises(DataError, match="matches no file"):
        expand_source(str(tmp_path / "nothing*.txt"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"content": "no text key"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: no text: .*'text' \(data.text_field\).*\['content'\]"):
        texts(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(DataError, match="broken.jsonl:2: invalid JSON"):
        texts(broken)
    with pytest.raises(DataError, match=r"p.parquet: no text: no column 'text'.*\['body'\]"):
        texts(corpus / "p.parquet")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("fine\n\nstill fine\r\n".encode() + "café\n".encode("latin-1"))
    for document in DOCUMENT_UNITS:  # the file and the line (4: the same numbers as document: line's locations)
        with pytest.raises(DataError, match=r"latin.txt:4: not UTF-8: byte 3 of the line"):
            texts(latin, document=document)


# Every line terminator str.splitlines knows, blank and whitespace-only lines, a BOM, no final newline.
AWKWARD = ("\ufeffone\r\ntwo\rthree\x85four\u2028five\x0csix\n \t\n\nseven\x1ceight\r\n\r\n"
           "nine\u2029ten\x0bélan\n\n\n  eleven  \ntwelve")


def splitlines_oracle(path, document):
    """What reading the whole text and cutting it with str.splitlines gives: (location, text) per document."""
    numbered = list(enumerate(path.read_text(encoding="utf-8").splitlines(), 1))
    if document == "line":
        return [(f"{path}:{n}", line) for n, line in numbered if line.strip()]
    groups = itertools.groupby(numbered, key=lambda pair: bool(pair[1].strip()))
    return [(f"{path}:{run[0][0]}", "\n".join(line for _, line in run))
            for run in (list(g) for filled, g in groups if filled)]


@pytest.mark.parametrize("document", ["line", "paragraph"])
def test_lines_and_paragraphs_are_those_of_the_whole_text_and_resume_at_any_document(tmp_path, document):
    path = tmp_path / "awkward.txt"
    path.write_bytes(AWKWARD.encode())
    want = splitlines_oracle(path, document)
    assert len(want) >= 4
    for start in range(len(want) + 2):
        got = [tuple(d) for d in read_documents(str(path), document=document, start=start)]
        assert got == want[start:], start


@pytest.mark.parametrize("document", ["line", "paragraph"])
def test_a_text_file_is_streamed_not_held_in_memory(tmp_path, document):
    path = tmp_path / "big.txt"
    lines = [f"line {i} " + "word " * (i % 17) for i in range(100_000)]
    path.write_text("\n".join(line if i % 5 else "" for i, line in enumerate(lines)))
    size = path.stat().st_size
    assert size > 3_000_000
    count = 0
    tracemalloc.start()
    try:
        for _ in read_documents(str(path), document=document):
            count += 1
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == len(splitlines_oracle(path, document))
    assert peak < size / 20, (peak, size)  # holding the text (or its lines) would take more than the file


@pytest.fixture
def configured_hub_folder(tmp_path):
    """A local dataset folder with two configs (its README's ``configs:``), loaded as load_dataset loads the hub's."""
    for config, texts_ in {"small": ["s1", "s2"], "big": ["b1", "b2", "b3"]}.items():
        (tmp_path / config).mkdir()
        (tmp_path / config / "train.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts_))
    (tmp_path / "README.md").write_text("---\nconfigs:\n" + "".join(
        f"- config_name: {c}\n  data_files:\n  - split: train\n    path: {c}/*.jsonl\n" for c in ("small", "big"))
        + "---\n")
    return tmp_path


def test_hf_specs_name_a_config_and_split(configured_hub_folder):
    folder = configured_hub_folder
    for config in ("small", "big"):
        want = [r["text"] for r in datasets.load_dataset(str(folder), config, split="train")]
        assert texts(f"hf:{folder}:{config}:train") == want
    assert texts(f"hf:{folder}:big:train", start=2) == ["b3"]


@pytest.mark.parametrize("tail, message", [
    (":nope:train", r"cannot load: .*data.paths entry failed: ValueError: BuilderConfig 'nope' not found"),
    (":small:test", r"cannot load: .*data.paths entry failed: ValueError: .*test"),
    (":a:b:c", r"bad hf: source: expected hf:NAME, hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT"),
    ("::train", r"bad hf: source"),
])
def test_a_bad_hf_spec_is_a_data_error_naming_it(configured_hub_folder, tail, message):
    spec = f"hf:{configured_hub_folder}{tail}"
    with pytest.raises(DataError, match=re.escape(spec) + ": " + message):
        texts(spec)


def test_a_source_signature_changes_with_its_files_not_its_location(tmp_path, corpus):
    folder = tmp_path / "web"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("alpha\n")
    (folder / "sub" / "b.txt").write_text("beta\n")
    spec = str(folder / "**" / "*.txt")
    before = source_signature(spec)
    assert before.startswith("2 files, 11 bytes, ")
    assert source_signature(str(folder)) == before  # the folder and the glob read the same files
    moved = tmp_path / "moved"
    folder.rename(moved)
    assert source_signature(str(moved / "**" / "*.txt")) == before  # names are relative: a moved corpus matches
    (moved / "sub" / "b.txt").write_text("betas\n")
    resized = source_signature(str(moved / "**" / "*.txt"))
    assert resized.startswith("2 files, 12 bytes, ")
    (moved / "sub" / "b.txt").rename(moved / "sub" / "c.txt")  # same count and bytes, another name
    renamed = source_signature(str(moved / "**" / "*.txt"))
    assert renamed.startswith("2 files, 12 bytes, ") and renamed != resized
    saved = source_signature(str(corpus / "saved"))
    listed = json.loads((corpus / "saved" / "state.json").read_text())["_data_files"]
    data_bytes = sum((corpus / "saved" / f["filename"]).stat().st_size for f in listed)
    assert saved.startswith(f"{len(listed)} files, {data_bytes} bytes")  # its data files, as state.json lists them
    (corpus / "saved" / "cache-0123.arrow").write_bytes(b"a map() cache")  # what datasets leaves beside them
    assert source_signature(str(corpus / "saved")) == saved
    (corpus / "saved" / "cache-0123.arrow").unlink()
    assert source_signature("hf:wikitext:wikitext-103-raw-v1:train") == "hf:wikitext:wikitext-103-raw-v1:train"


def test_a_file_added_to_a_globbed_folder_refuses_the_old_position(tmp_path):
    tokenizer = load_tokenizer(build_tokenizer(tmp_path / "tok"))
    folder = tmp_path / "web"
    folder.mkdir()
    for name in ("b", "d"):
        (folder / f"{name}.txt").write_text("\n".join(f"the {name} cat sat {i}" for i in range(40)))
    cfg = TextDataConfig(paths=(str(folder / "*.txt"),), document="line", max_length=16, batch_size=2)
    stream = TextStream(cfg, tokenizer)
    next(stream)
    state = stream.get_state()
    TextStream(cfg, tokenizer).set_state(state)  # the same files: accepted
    (folder / "a.txt").write_text("a new first file shifts every document number\n")
    with pytest.raises(DataError, match=re.escape(f"files of data.paths: checkpoint {{'{cfg.paths[0]}': '2 files")):
        TextStream(cfg, tokenizer).set_state(state)
    assert "files of data.paths" not in stream_fingerprint(cfg.replace(paths=("nowhere/*.txt",)), tokenizer,
                                                          source_files=False)
