"""The pre-tokenized store (`jaxft.data.token_store`): its rows are the stream's rows of one pass, read back in a
seeded per-epoch order that covers every row once across processes, resumable, and refused for other settings."""
from __future__ import annotations

import json

import numpy as np
import pytest
import transformers
import yaml

from jaxft.cli import main
from jaxft.data.formats import DataError
from jaxft.data.text_stream import TextStream, build_text_pipeline
from jaxft.data.token_store import StoredRows, read_manifest, write_token_store
from jaxft.hf.tokenizer import load_tokenizer
from test_text_stream import config, make_setup

KEYS = ("input_ids", "labels", "segment_ids", "positions")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory)


@pytest.fixture(scope="module")
def store(setup, tmp_path_factory):
    folder = tmp_path_factory.mktemp("store") / "rows"
    cfg = config(setup, weights=(2.0, 1.0), packing="segments")
    write_token_store(cfg, setup["tok"], folder, rows_per_shard=7)
    return cfg.replace(store=str(folder))


def _stream_rows(cfg, tok) -> np.ndarray:
    """The stream's own rows of one pass, in order: its batches, less the padding rows of the last one."""
    stream = TextStream(cfg.replace(store=None), tok)
    batches = [next(stream) for _ in range(stream.batches_per_epoch)]
    rows = np.stack([np.concatenate([b[key] for b in batches]) for key in KEYS], axis=1)
    return rows[:stream.rows_per_pass]


def test_the_stores_rows_are_the_streams_rows_of_one_pass(setup, store):
    manifest = read_manifest(store.store)
    shards = [np.load(f"{store.store}/{s['file']}") for s in manifest["shards"]]
    assert len(shards) > 1 and all(len(s) == 7 for s in shards[:-1])
    np.testing.assert_array_equal(np.concatenate(shards), _stream_rows(store, setup["tok"]))
    assert manifest["rows"] == sum(len(s) for s in shards) and manifest["keys"] == list(KEYS)


def test_each_epoch_reads_every_row_once_spread_over_processes(setup, store):
    rows = _stream_rows(store, setup["tok"])
    seen = []
    for process in range(2):
        it = StoredRows(store, setup["tok"], process_index=process, process_count=2)
        batches = [next(it) for _ in range(it.batches_per_epoch)]
        stacked = np.stack([np.concatenate([b[key] for b in batches]) for key in KEYS], axis=1)
        seen.append(stacked[(stacked[:, 2] > 0).any(axis=1)])  # rows holding a segment: not the padding rows
    everything = np.concatenate(seen)
    assert len(everything) == len(rows)
    order = sorted(range(len(rows)), key=lambda i: rows[i].tobytes())
    np.testing.assert_array_equal(everything[sorted(range(len(everything)), key=lambda i: everything[i].tobytes())],
                                  rows[order])
    first_epoch = [next(StoredRows(store, setup["tok"]))["input_ids"]]
    it = StoredRows(store, setup["tok"])
    for _ in range(it.batches_per_epoch):
        next(it)
    assert not np.array_equal(next(it)["input_ids"], first_epoch[0])  # a new epoch, a new order


def test_a_stored_position_resumes_with_identical_batches(setup, store):
    pipeline = build_text_pipeline(store, setup["tok"], process_index=1, process_count=2)
    total = 2 * pipeline.iterator.batches_per_epoch + 2
    reference = [next(pipeline.iterator) for _ in range(total)]
    for cut in (1, pipeline.iterator.batches_per_epoch, total - 1):
        it = StoredRows(store, setup["tok"], process_index=1, process_count=2)
        for _ in range(cut):
            next(it)
        resumed = StoredRows(store, setup["tok"], process_index=1, process_count=2)
        resumed.set_state(json.loads(json.dumps(it.get_state())))
        for want in reference[cut:]:
            got = next(resumed)
            for key in KEYS:
                np.testing.assert_array_equal(got[key], want[key])


def test_a_store_of_other_settings_or_tokenizer_is_refused_naming_the_difference(setup, store, tmp_path):
    with pytest.raises(DataError, match=r"manifest.json.*data.packing: checkpoint 'segments' vs now 'concat'"):
        StoredRows(store.replace(packing="concat"), setup["tok"])
    other = transformers.AutoTokenizer.from_pretrained(setup["root"] / "tok")
    other.add_tokens(["<extra>"])
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(DataError, match="tokenizer vocabulary"):
        StoredRows(store, load_tokenizer(tmp_path / "other"))
    with pytest.raises(DataError, match="token id beyond the model's vocabulary"):
        StoredRows(store, setup["tok"], vocab_size=100)
    with pytest.raises(DataError, match="kind: checkpoint 'text stream' vs now 'token store'"):
        StoredRows(store, setup["tok"]).set_state(TextStream(store, setup["tok"]).get_state())


def test_the_seed_counts_for_a_store_only_where_weights_draw_its_rows_by_it(setup, store, tmp_path):
    with pytest.raises(DataError, match="data.seed: checkpoint 0 vs now 1"):
        StoredRows(store.replace(seed=1), setup["tok"])  # with weights the seed picks each row's source
    cfg = store.replace(store=None, weights=None)
    write_token_store(cfg, setup["tok"], tmp_path / "rows")
    rows = _stream_rows(cfg, setup["tok"])
    reordered = StoredRows(cfg.replace(store=str(tmp_path / "rows"), seed=1), setup["tok"])
    assert reordered.batches_up_to(10**6) == reordered.batches_per_epoch
    assert reordered.batches_up_to(2) == 2 and reordered.batches_up_to(0) == 0
    batches = [next(reordered) for _ in range(reordered.batches_per_epoch)]
    stacked = np.stack([np.concatenate([b[key] for b in batches]) for key in KEYS], axis=1)
    stacked = stacked[(stacked[:, 2] > 0).any(axis=1)]  # the stream's rows, read in seed 1's order
    assert sorted(r.tobytes() for r in stacked) == sorted(r.tobytes() for r in rows)


def test_an_existing_store_is_replaced_only_with_overwrite(setup, store, tmp_path):
    folder = tmp_path / "rows"
    cfg = store.replace(store=None)
    first = write_token_store(cfg, setup["tok"], folder, rows_per_shard=5)
    files = sorted(p.name for p in folder.iterdir())
    with pytest.raises(FileExistsError, match="overwrite"):
        write_token_store(cfg, setup["tok"], folder)
    assert read_manifest(folder) == first and sorted(p.name for p in folder.iterdir()) == files
    manifest = write_token_store(cfg, setup["tok"], folder, overwrite=True)
    assert manifest["rows"] == first["rows"] and len(manifest["shards"]) == 1
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "rows-00000.npy"]


def test_jaxft_data_tokenize_writes_the_store_a_run_config_names(setup, store, tmp_path, capsys):
    model = tmp_path / "model"  # config.json alone: the command reads the model's vocab_size, no weights
    transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2).save_pretrained(model)
    cfg = store.replace(store=str(tmp_path / "rows"))
    data = {"type": "text", "paths": list(cfg.paths), "weights": list(cfg.weights), "packing": cfg.packing,
            "max_length": cfg.max_length, "batch_size": cfg.batch_size, "min_chars": cfg.min_chars,
            "dedup": cfg.dedup, "store": cfg.store}
    run = {"model": str(model), "tokenizer": str(setup["root"] / "tok"), "output_dir": str(tmp_path / "run"),
           "task": {"type": "continued_pretrain"}, "method": "full", "data": data}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    assert main(["data", "tokenize", str(tmp_path / "run.yaml")]) == 0
    printed = json.loads(capsys.readouterr().out)
    rows = np.concatenate([np.load(tmp_path / "rows" / s["file"]) for s in read_manifest(cfg.store)["shards"]])
    assert printed["rows"] == len(rows)
    np.testing.assert_array_equal(rows, _stream_rows(cfg, setup["tok"]))
    assert main(["data", "tokenize", str(tmp_path / "run.yaml")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["data", "tokenize", str(tmp_path / "run.yaml"), "--set", "data.store=null"]) == 2
    assert "data.store" in capsys.readouterr().err


def test_a_store_is_read_without_its_corpus(setup, tmp_path):
    """The store holds the rows: a run reading it needs neither the source files nor their being unchanged."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(open(setup["paths"]["a"]).read())
    cfg = config(setup, names=("a",)).replace(paths=(str(corpus),))
    write_token_store(cfg, setup["tok"], tmp_path / "rows")
    expected = _stream_rows(cfg, setup["tok"])
    corpus.unlink()
    it = StoredRows(cfg.replace(store=str(tmp_path / "rows"), seed=0), setup["tok"])
    batches = [next(it) for _ in range(it.batches_per_epoch)]
    rows = np.stack([np.concatenate([b[key] for b in batches]) for key in KEYS], axis=1)
    rows = rows[(rows[:, 2] > 0).any(axis=1)]
    assert sorted(map(bytes, rows)) == sorted(map(bytes, expected))  # the same rows, in the epoch's order
