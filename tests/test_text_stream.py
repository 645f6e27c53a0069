"""Streaming pretraining rows (`jaxft.data.text_stream`) against transformers' tokenizer as the oracle.

The oracle of a pass is ``transformers.AutoTokenizer(folder)(text)["input_ids"] + [eos]`` for the documents the
test itself decides are kept (long enough, not an exact repeat), in reading order; the stream reads the same
folder through jaxft's own tokenizer loader. Properties checked on the batches: the rows' tokens are that
concatenation, every token after a document's first (after the pass's first, in ``concat``) is a label exactly
once, segments never mix documents, processes' shards are disjoint and cover every kept document, mixing follows
the weights within binomial tolerance, and a saved position resumes with identical batches.
"""
from __future__ import annotations

import json
import math
import random
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from jaxft.data.formats import DataError
from jaxft.data.text_config import TextDataConfig
from jaxft.data.text_sources import read_documents
from jaxft.data.text_stream import BATCH_KEYS, TextStream, build_text_pipeline
from jaxft.hf.tokenizer import load_tokenizer

WORDS = "the quick brown fox jumps over a lazy dog hello world llama token answer question café".split()
SPECIALS = ["<s>", "</s>", "<pad>"]
MIN_CHARS = 5
IGNORE = -100


def build_tokenizer(folder: Path, template: str = "<s> $A", bos: str = "<s>") -> Path:
    """A byte-level BPE (vocab 300) whose post-processor adds BOS to every text (``template``), as Llama's does;
    ``bos``: the token its config names as BOS."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    rng = random.Random(1)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(500)]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus, trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("<s>", 0), ("</s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token="</s>",
                                                pad_token="<pad>")
    fast.save_pretrained(folder)
    return folder


def make_documents(seed: int, count: int, words=WORDS) -> list[str]:
    """Documents of 1 to 30 words; some repeat an earlier one and some are shorter than MIN_CHARS."""
    rng = random.Random(seed)
    docs = []
    for _ in range(count):
        roll = rng.random()
        if roll < 0.1 and docs:
            docs.append(rng.choice(docs))
        elif roll < 0.15:
            docs.append("ab")
        else:
            docs.append(" ".join(rng.choice(words) for _ in range(rng.randint(1, 30))))
    return docs


def kept_documents(docs: list[str]) -> list[str]:
    """The test's own cleaning rule for these documents: at least MIN_CHARS characters, first occurrence only."""
    seen, kept = set(), []
    for doc in docs:
        if len(doc) >= MIN_CHARS and doc not in seen:
            seen.add(doc)
            kept.append(doc)
    return kept


def write_jsonl(path: Path, docs: list[str]) -> str:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return str(path)


def make_setup(tmp_path_factory) -> dict:
    """The tokenizer (jaxft's and transformers' load of one folder) and two JSONL sources with their documents."""
    root = tmp_path_factory.mktemp("text_stream")
    folder = build_tokenizer(root / "tok")
    sources = {"a": make_documents(0, 120), "b": make_documents(1, 60)}
    paths = {name: write_jsonl(root / f"{name}.jsonl", docs) for name, docs in sources.items()}
    return {"root": root, "tok": load_tokenizer(folder), "hf": transformers.AutoTokenizer.from_pretrained(folder),
            "sources": sources, "paths": paths}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory)


def config(setup, names=("a", "b"), **changes) -> TextDataConfig:
    settings = dict(paths=tuple(setup["paths"][n] for n in names), max_length=16, batch_size=3,
                    min_chars=MIN_CHARS, dedup="exact")
    return TextDataConfig(**{**settings, **changes})


def oracle_ids(setup, docs: list[str]) -> list[list[int]]:
    hf = setup["hf"]
    return [hf(doc)["input_ids"] + [hf.eos_token_id] for doc in docs]


def one_pass(stream: TextStream) -> list[dict]:
    return [next(stream) for _ in range(stream.batches_per_epoch)]


def rows_of(batches: list[dict]) -> dict[str, np.ndarray]:
    return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}


def test_concat_pass_is_every_kept_document_tokenized_then_eos_and_every_token_a_label_once(setup):
    stream = TextStream(config(setup), setup["tok"])
    batches = one_pass(stream)
    rows = rows_of(batches)
    expected = np.concatenate([np.concatenate(oracle_ids(setup, kept_documents(setup["sources"][n])))
                               for n in ("a", "b")])
    real = rows["segment_ids"] > 0
    np.testing.assert_array_equal(rows["input_ids"][real], expected)
    assert setup["tok"].bos_token_id == expected[0]  # the tokenizer's BOS starts each document
    # labels: the stream shifted by one, the pass's last token without a target; padding has none
    np.testing.assert_array_equal(rows["labels"][real], np.append(expected[1:], IGNORE))
    assert (rows["labels"][~real] == IGNORE).all() and (rows["input_ids"][~real] == setup["tok"].pad_token_id).all()
    full = real.all(axis=1)
    assert full.sum() == len(expected) // 16 and (rows["segment_ids"][real] == 1).all()
    np.testing.assert_array_equal(rows["positions"][full], np.tile(np.arange(16), (full.sum(), 1)))
    assert stream.batches_per_epoch == math.ceil(math.ceil(len(expected) / 16) / 3)
    # the next epoch is a new pass over the same documents: the same batches (dedup starts afresh each pass)
    for want in batches:
        got = next(stream)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_segments_restart_positions_per_document_never_mix_documents_and_lose_no_label(setup):
    stream = TextStream(config(setup, packing="segments", max_length=12), setup["tok"])
    rows = rows_of(one_pass(stream))
    docs = oracle_ids(setup, kept_documents(setup["sources"]["a"]) + kept_documents(setup["sources"]["b"]))
    doc_of_token = np.concatenate([np.full(len(d), i) for i, d in enumerate(docs)])
    stream_tokens = np.concatenate(docs)
    real = rows["segment_ids"] > 0
    np.testing.assert_array_equal(rows["input_ids"][real], stream_tokens)
    index = np.cumsum(real.ravel()).reshape(real.shape) - 1  # each real position's place in the stream
    for r in range(len(rows["input_ids"])):
        for segment in np.unique(rows["segment_ids"][r][real[r]]):
            where = rows["segment_ids"][r] == segment
            assert len(np.unique(doc_of_token[index[r][where]])) == 1  # one document per segment
            np.testing.assert_array_equal(rows["positions"][r][where], np.arange(where.sum()))
    # a token's label is the next token of its document; a document's last token (EOS) has none
    next_in_doc = np.where(np.append(doc_of_token[1:] == doc_of_token[:-1], False),
                           np.append(stream_tokens[1:], IGNORE), IGNORE)
    np.testing.assert_array_equal(rows["labels"][real], next_in_doc)
    assert (rows["labels"][real] == IGNORE).sum() == len(docs)


def _batches(cfg, setup, count, **kwargs) -> list[dict]:
    stream = TextStream(cfg, setup["tok"], **kwargs)
    return [next(stream) for _ in range(count)]


def _assert_same(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        for key in w:
            np.testing.assert_array_equal(g[key], w[key], err_msg=key)


@pytest.mark.parametrize("changes, kwargs", [
    ({}, {}),  # across a source's end and the next epoch's pass, dedup on
    ({"packing": "segments", "dedup": "near"}, {}),
    ({"weights": (3.0, 1.0), "packing": "segments"}, {}),  # sources cycling on their own
    ({"weights": (1.0, 2.0)}, {"process_index": 1, "process_count": 2}),
])
def test_a_saved_position_resumes_with_identical_batches(setup, changes, kwargs):
    cfg = config(setup, **changes)
    probe = TextStream(cfg, setup["tok"], **kwargs)
    total = 2 * probe.batches_per_epoch + 3
    reference = _batches(cfg, setup, total, **kwargs)
    epoch, states = probe.batches_per_epoch, []
    for cut in sorted({*range(1, total, 11), epoch - 1, epoch, epoch + 1, total - 1}):  # mid-document, across
        # a source's end (unweighted: into the next source; weighted: into its next pass) and the epoch's end
        stream = TextStream(cfg, setup["tok"], **kwargs)
        for _ in range(cut):
            next(stream)
        state = json.loads(json.dumps(stream.get_state()))
        states.append(state)
        resumed = TextStream(cfg, setup["tok"], **kwargs)
        resumed.set_state(state)
        _assert_same([next(resumed) for _ in range(total - cut)], reference[cut:])
    positions = [p for state in states for p in state["sources"]]
    assert any(p["offset"] > 0 for p in positions), "some cut falls inside a document"
    assert any(p["pass"] > 0 for p in positions), "some cut falls in a source's second pass"
    if "weights" not in changes:
        assert any(state["source"] == 1 for state in states), "some cut falls in the second source"


def test_a_tokenizer_that_ends_texts_with_eos_itself_gets_no_second_eos(setup, tmp_path):
    folder = build_tokenizer(tmp_path / "tok", template="<s> $A </s>")
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    stream = TextStream(config(setup, names=("b",)), load_tokenizer(folder))
    rows = rows_of(one_pass(stream))
    expected = [hf(doc)["input_ids"] for doc in kept_documents(setup["sources"]["b"])]
    assert all(ids[-1] == hf.eos_token_id and ids[-2] != hf.eos_token_id for ids in expected)
    np.testing.assert_array_equal(rows["input_ids"][rows["segment_ids"] > 0], np.concatenate(expected))


def test_a_tokenizer_whose_bos_is_its_eos_still_gets_eos_after_each_document(setup, tmp_path):
    folder = build_tokenizer(tmp_path / "tok", template="</s> $A", bos="</s>")  # OPT: "</s>" starts every text
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    assert hf("")["input_ids"] == [hf.eos_token_id] == [hf.bos_token_id]  # what an empty text cannot tell apart
    stream = TextStream(config(setup, names=("b",)), load_tokenizer(folder))
    rows = rows_of(one_pass(stream))
    expected = [hf(doc)["input_ids"] + [hf.eos_token_id] for doc in kept_documents(setup["sources"]["b"])]
    np.testing.assert_array_equal(rows["input_ids"][rows["segment_ids"] > 0], np.concatenate(expected))


def test_a_process_without_a_document_of_a_source_says_why_and_what_to_do(setup, tmp_path):
    book = tmp_path / "book.txt"
    book.write_text("one whole book of text\n\nwith two paragraphs\n", encoding="utf-8")
    for weights in (None, (1.0, 1.0)):  # one pass over the sources / each source cycling on its own
        paths = (str(book),) if weights is None else (setup["paths"]["a"], str(book))
        cfg = TextDataConfig(paths=paths, weights=weights, max_length=16, batch_size=2, min_chars=MIN_CHARS)
        next(TextStream(cfg, setup["tok"], process_index=0, process_count=2))  # process 0 holds the book
        stream = TextStream(cfg, setup["tok"], process_index=1, process_count=2)
        with pytest.raises(DataError, match=r"book\.txt.*1 document\(s\).*data\.document: file.*process 1 of 2.*"
                                            r"data\.document: line or paragraph, or split the source into more files"):
            for _ in range(20):
                next(stream)
    paragraphs = TextDataConfig(paths=(str(book),), document="paragraph", max_length=16, batch_size=2,
                                min_chars=MIN_CHARS)
    next(TextStream(paragraphs, setup["tok"], process_index=1, process_count=2))  # the advice works


def test_batches_up_to_counts_no_further_than_n_batches_and_eval_reads_the_same_batches(setup):
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from jaxft.recipes.skeleton import eval_batches
    cfg = config(setup)
    epoch = TextStream(cfg, setup["tok"]).batches_per_epoch
    sharding = NamedSharding(Mesh(np.array(jax.devices()[:1]), ("data",)), PartitionSpec())
    for n in (0, 1, 2, epoch - 1, epoch, epoch + 3):
        stream, tokenized = TextStream(cfg, setup["tok"]), []
        tokenize = stream.tokenize
        stream.tokenize = lambda documents: tokenized.extend(documents) or tokenize(documents)
        assert stream.batches_up_to(n) == min(n, epoch)
        if n <= 1:  # one batch is 48 tokens: the first source's first tokenizer buffer holds more than that
            assert not [d.location for d in tokenized if d.location.startswith(setup["paths"]["b"])]
        got = list(eval_batches(stream, n, sharding, BATCH_KEYS))
        _assert_same([{k: np.asarray(v) for k, v in b.items()} for b in got], _batches(cfg, setup, min(n, epoch)))


def test_batches_up_to_is_counted_once_per_stream(setup):
    """Every evaluation asks for its batch count again: the second ask (and, once a count reached the pass's end,
    batches_per_epoch) tokenizes nothing more."""
    cfg = config(setup)
    epoch = TextStream(cfg, setup["tok"]).batches_per_epoch
    for n in (2, epoch + 3):
        stream, tokenized = TextStream(cfg, setup["tok"]), []
        tokenize = stream.tokenize
        stream.tokenize = lambda documents: tokenized.extend(documents) or tokenize(documents)
        first = stream.batches_up_to(n)
        counted = len(tokenized)
        assert stream.batches_up_to(n) == first == min(n, epoch) and len(tokenized) == counted
        if n > epoch:
            assert stream.batches_per_epoch == epoch and len(tokenized) == counted


def test_a_resume_replays_no_finished_source(setup, monkeypatch):
    import jaxft.data.text_stream as text_stream
    cfg = config(setup)
    stream = TextStream(cfg, setup["tok"])
    while stream.get_state()["source"] == 0:  # into the second source: the first one's pass has ended
        next(stream)
    state, want = stream.get_state(), [next(stream) for _ in range(3)]
    read = []

    def counting(spec, **kwargs):
        for document in read_documents(spec, **kwargs):
            read.append(spec)
            yield document

    monkeypatch.setattr(text_stream, "read_documents", counting)
    resumed = TextStream(cfg, setup["tok"])
    read.clear()
    resumed.set_state(state)
    assert setup["paths"]["a"] not in read and read.count(setup["paths"]["b"]) >= state["sources"][1]["document"]
    _assert_same([next(resumed) for _ in range(3)], want)


def test_rewind_reads_the_same_batches_again(setup):
    stream = TextStream(config(setup, weights=(1.0, 1.0)), setup["tok"])
    first = [next(stream) for _ in range(5)]
    stream.rewind()
    _assert_same([next(stream) for _ in range(5)], first)


def _documents_of(rows: dict[str, np.ndarray], eos: int) -> list[tuple[int, ...]]:
    """Split a pass's real tokens after each EOS: its documents' ids."""
    tokens = rows["input_ids"][rows["segment_ids"] > 0].tolist()
    docs, current = [], []
    for token in tokens:
        current.append(token)
        if token == eos:
            docs.append(tuple(current))
            current = []
    assert not current
    return docs


def test_processes_hold_disjoint_shards_that_together_cover_every_kept_document(setup):
    cfg = config(setup, names=("a",))
    kept = [tuple(ids) for ids in oracle_ids(setup, kept_documents(setup["sources"]["a"]))]
    shards = []
    for process in range(3):
        stream = TextStream(cfg, setup["tok"], process_index=process, process_count=3)
        shards.append(_documents_of(rows_of(one_pass(stream)), setup["tok"].eos_token_id))
        assert shards[-1] == kept[process::3]  # kept document k goes to process k % 3, in order
    assert sorted(sum(shards, [])) == sorted(kept)


def test_weighted_mixing_gives_each_source_its_share_of_rows(setup, tmp_path):
    docs = {"x": make_documents(2, 60, words=["aaa", "aa", "a"]), "y": make_documents(3, 60, words=["zzz", "zz"])}
    paths = tuple(write_jsonl(tmp_path / f"{name}.jsonl", d) for name, d in docs.items())
    hf = setup["hf"]
    only = {name: set(sum(oracle_ids(setup, d), [])) for name, d in docs.items()}
    only = {"x": only["x"] - only["y"], "y": only["y"] - only["x"]}
    cfg = TextDataConfig(paths=paths, weights=(3.0, 1.0), max_length=8, batch_size=10, min_chars=MIN_CHARS)
    stream = TextStream(cfg, setup["tok"])
    rows = rows_of([next(stream) for _ in range(60)])["input_ids"]
    from_x = [bool(only["x"] & set(r.tolist())) for r in rows]
    from_y = [bool(only["y"] & set(r.tolist())) for r in rows]
    assert all(a != b for a, b in zip(from_x, from_y)), "each row is filled from one source"
    n, p = len(rows), 0.75
    assert abs(sum(from_x) - n * p) <= 4 * math.sqrt(n * p * (1 - p))
    assert hf.eos_token_id not in only["x"] | only["y"]


def test_a_state_of_other_settings_or_tokenizer_is_refused_naming_what_differs(setup, tmp_path):
    stream = TextStream(config(setup), setup["tok"])
    next(stream)
    state = stream.get_state()
    with pytest.raises(DataError, match="data.max_length: checkpoint 16 vs now 32"):
        TextStream(config(setup, max_length=32), setup["tok"]).set_state(state)
    other = transformers.AutoTokenizer.from_pretrained(setup["root"] / "tok")
    other.add_tokens(["<extra>"])
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(DataError, match="tokenizer vocabulary"):
        TextStream(config(setup), load_tokenizer(tmp_path / "other")).set_state(state)
    with pytest.raises(DataError, match="process_count: checkpoint 1 vs now 2"):
        TextStream(config(setup), setup["tok"], process_count=2).set_state(state)


def test_a_token_id_beyond_the_models_vocabulary_names_the_document(setup):
    pipeline = build_text_pipeline(config(setup), setup["tok"], vocab_size=260)
    with pytest.raises(DataError, match=r"a\.jsonl:\d+.*token id beyond the model's vocabulary"):
        for _ in range(50):
            next(pipeline.iterator)


def test_the_report_counts_each_document_of_a_pass_once(setup):
    pipeline = build_text_pipeline(config(setup), setup["tok"])
    batches = pipeline.iterator.batches_per_epoch
    for _ in range(2 * batches + 1):
        next(pipeline.iterator)
    pipeline.iterator.rewind()
    next(pipeline.iterator)
    sources = setup["sources"]
    assert pipeline.report.kept["documents after cleaning"] == sum(len(kept_documents(d)) for d in sources.values())
    assert sum(pipeline.report.dropped.values()) == sum(len(d) - len(kept_documents(d)) for d in sources.values())


@pytest.fixture(scope="session")
def big_jsonl(tmp_path_factory) -> Path:
    """About 16 MB of JSONL written by a generator, one record at a time."""
    path = tmp_path_factory.mktemp("big") / "big.jsonl"
    rng = random.Random(5)
    with path.open("w", encoding="utf-8") as out:
        while out.tell() < 16_000_000:
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(50, 400)))
            out.write(json.dumps({"text": f"{out.tell()} {words}"}) + "\n")
    return path


@pytest.mark.slow
def test_a_corpus_larger_than_the_memory_budget_streams_in_little_memory(setup, big_jsonl):
    size = big_jsonl.stat().st_size
    cfg = TextDataConfig(paths=(str(big_jsonl),), max_length=512, batch_size=8, dedup=None)
    stream = TextStream(cfg, setup["tok"])
    tracemalloc.start()
    try:
        batches = stream.batches_per_epoch
        for _ in range(batches):
            next(stream)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert batches * 8 * 512 > size / 4  # the whole file was read: a pass is tokens of all of it
    assert peak < 8e6 < size / 2, f"peak Python heap {peak} bytes for a {size}-byte corpus"  # a budget of 8 MB
