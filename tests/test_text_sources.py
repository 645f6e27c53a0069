"""Streaming document readers: each format's documents, in order, against the files read independently here (plain
file reads, json, pyarrow, datasets), and resuming at every document number gives the rest of the same sequence."""
from __future__ import annotations

import gzip
import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxft.data.formats import DataError
from jaxft.data.text_sources import expand_source, read_documents


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
    latin.write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match="latin.txt: not UTF-8"):
        texts(latin)
