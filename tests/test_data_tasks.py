"""jaxft.data.tasks: task records -> samples -> packed batches, against transformers and its examples as oracles.

Tokenizer folders are test_tokenizer.py's, built offline (a Llama-2-style sentencepiece BPE whose pair template
is `<s> A <s> B`, and a Llama-3-style ByteLevel BPE whose pair template is `<|begin_of_text|> A B`), loaded by
`AutoTokenizer` and `jaxft.hf.load_tokenizer`. Word alignment is checked against run_ner.py's
`tokenize_and_align_labels` and QA features against run_qa.py's `prepare_train_features`, both reproduced as the
examples write them.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import datasets
from jaxft.config import HeadConfig
from jaxft.data import (DataConfig, DataError, DataReport, PackedIterator, build_task_iterator, read_task_records,
                        tokenize_task_records)
from jaxft.data.chat import IGNORE_INDEX
from test_tokenizer import folders, pairs  # noqa: F401  (fixtures: both tokenizer folders, loaded twice)

NER_LABELS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")
SENTENCE = "the quick brown fox jumps over a lazy dog"
CONTEXT = " ".join(f"{SENTENCE} {word} hello world llama token 2024 café naïve" for word in
                   ["über", "東京", "🦙", "42"] * 3)


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def _samples(tmp_path, tok, head, records, **kwargs):
    path = _jsonl(tmp_path / "data.jsonl", records)
    return tokenize_task_records(read_task_records(path, head), tok, head, **kwargs)


# ----- oracles: transformers' examples, as they write them ---------------------------------------------------------

def run_ner_tokenize_and_align_labels(tokenizer, examples, label_list, label_all_tokens, max_seq_length):
    """run_ner.py (transformers/examples/pytorch/token-classification), with its label maps."""
    label_to_id = {label: i for i, label in enumerate(label_list)}
    b_to_i_label = []
    for idx, label in enumerate(label_list):
        if label.startswith("B-") and label.replace("B-", "I-") in label_list:
            b_to_i_label.append(label_list.index(label.replace("B-", "I-")))
        else:
            b_to_i_label.append(idx)
    tokenized_inputs = tokenizer(examples["tokens"], padding=False, truncation=True, max_length=max_seq_length,
                                 is_split_into_words=True)
    labels = []
    for i, label in enumerate(examples["ner_tags"]):
        word_ids = tokenized_inputs.word_ids(batch_index=i)
        previous_word_idx = None
        label_ids = []
        for word_idx in word_ids:
            if word_idx is None:
                label_ids.append(-100)
            elif word_idx != previous_word_idx:
                label_ids.append(label_to_id[label[word_idx]])
            else:
                if label_all_tokens:
                    label_ids.append(b_to_i_label[label_to_id[label[word_idx]]])
                else:
                    label_ids.append(-100)
            previous_word_idx = word_idx
        labels.append(label_ids)
    tokenized_inputs["labels"] = labels
    return tokenized_inputs


def run_qa_prepare_train_features(tokenizer, examples, max_seq_length, doc_stride):
    """run_qa.py's prepare_train_features (transformers/examples/pytorch/question-answering), padding on the right."""
    question_column_name, context_column_name, answer_column_name = "question", "context", "answers"
    pad_on_right = tokenizer.padding_side == "right"
    examples[question_column_name] = [q.lstrip() for q in examples[question_column_name]]
    tokenized_examples = tokenizer(
        examples[question_column_name if pad_on_right else context_column_name],
        examples[context_column_name if pad_on_right else question_column_name],
        truncation="only_second" if pad_on_right else "only_first",
        max_length=max_seq_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding=False,
    )
    sample_mapping = tokenized_examples.pop("overflow_to_sample_mapping")
    offset_mapping = tokenized_examples.pop("offset_mapping")
    tokenized_examples["start_positions"] = []
    tokenized_examples["end_positions"] = []
    for i, offsets in enumerate(offset_mapping):
        input_ids = tokenized_examples["input_ids"][i]
        if tokenizer.cls_token_id in input_ids:
            cls_index = input_ids.index(tokenizer.cls_token_id)
        elif tokenizer.bos_token_id in input_ids:
            cls_index = input_ids.index(tokenizer.bos_token_id)
        else:
            cls_index = 0
        sequence_ids = tokenized_examples.sequence_ids(i)
        sample_index = sample_mapping[i]
        answers = examples[answer_column_name][sample_index]
        if len(answers["answer_start"]) == 0:
            tokenized_examples["start_positions"].append(cls_index)
            tokenized_examples["end_positions"].append(cls_index)
        else:
            start_char = answers["answer_start"][0]
            end_char = start_char + len(answers["text"][0])
            token_start_index = 0
            while sequence_ids[token_start_index] != (1 if pad_on_right else 0):
                token_start_index += 1
            token_end_index = len(input_ids) - 1
            while sequence_ids[token_end_index] != (1 if pad_on_right else 0):
                token_end_index -= 1
            if not (offsets[token_start_index][0] <= start_char and offsets[token_end_index][1] >= end_char):
                tokenized_examples["start_positions"].append(cls_index)
                tokenized_examples["end_positions"].append(cls_index)
            else:
                while token_start_index < len(offsets) and offsets[token_start_index][0] <= start_char:
                    token_start_index += 1
                tokenized_examples["start_positions"].append(token_start_index - 1)
                while offsets[token_end_index][1] >= end_char:
                    token_end_index -= 1
                tokenized_examples["end_positions"].append(token_end_index + 1)
    tokenized_examples["example_index"] = sample_mapping
    tokenized_examples["offset_mapping"] = offset_mapping
    return tokenized_examples


# ----- classify ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["spm", "bpe"])
def test_texts_and_pairs_are_transformers_ids_with_the_label_at_the_last_token(pairs, kind, tmp_path):
    ours, hf = pairs[kind]
    head = HeadConfig("seq_cls", num_labels=3, labels=("neg", "neu", "pos"))
    records = [{"text": "hello world café", "label": "pos"},
               {"text_a": "the quick brown fox", "text_b": "a lazy dog 42", "label": 1},
               {"text": " naïve über 東京 🦙", "label": 0}]
    samples = _samples(tmp_path, ours, head, records).samples
    expected = [hf("hello world café")["input_ids"], hf("the quick brown fox", "a lazy dog 42")["input_ids"],
                hf(" naïve über 東京 🦙")["input_ids"]]
    assert [s.input_ids.tolist() for s in samples] == expected
    for sample, label in zip(samples, [2, 1, 0]):
        assert sample.labels[-1] == label and (sample.labels[:-1] == IGNORE_INDEX).all()
        assert sample.extras is None
    assert samples[0].input_ids[-1] != ours.eos_token_id


def test_multi_label_and_regression_targets_sit_at_the_last_token(pairs, tmp_path):
    ours, _ = pairs["spm"]
    multi = HeadConfig("seq_cls", num_labels=3, labels=("a", "b", "c"), problem_type="multi_label_classification")
    [sample] = _samples(tmp_path, ours, multi, [{"text": "hello world", "label": ["c", 0]}]).samples
    targets = sample.extras["targets"]
    assert targets.shape == (len(sample.input_ids), 3) and targets.dtype == np.float32
    np.testing.assert_array_equal(targets[-1], [1, 0, 1])
    assert not targets[:-1].any() and sample.labels[-1] == 0
    regression = HeadConfig("seq_cls", num_labels=2, problem_type="regression")
    [sample] = _samples(tmp_path, ours, regression, [{"text": "hello", "label": [0.5, -2]}]).samples
    np.testing.assert_array_equal(sample.extras["targets"][-1], [0.5, -2.0])
    [sample] = _samples(tmp_path, ours, HeadConfig("seq_cls", num_labels=1), [{"text": "hi", "label": 3}]).samples
    np.testing.assert_array_equal(sample.extras["targets"][-1], [3.0])


@pytest.mark.parametrize("side", ["right", "left"])
def test_truncation_keeps_the_side_transformers_keeps(pairs, tmp_path, side):
    ours, hf = pairs["spm"]
    head = HeadConfig("seq_cls", num_labels=2)
    records = [{"text": SENTENCE, "label": 1}, {"text_a": SENTENCE, "text_b": "hello world", "label": 0}]
    samples = _samples(tmp_path, ours, head, records, max_length=6, truncation=side).samples
    hf.truncation_side = side
    try:
        expected = [hf(SENTENCE, truncation=True, max_length=6)["input_ids"],
                    hf(SENTENCE, "hello world", truncation=True, max_length=6)["input_ids"]]
    finally:
        hf.truncation_side = "right"
    assert [s.input_ids.tolist() for s in samples] == expected
    assert [s.labels[-1] for s in samples] == [1, 0]


def test_over_length_records_drop_with_a_count_or_raise(pairs, tmp_path):
    ours, _ = pairs["spm"]
    head = HeadConfig("seq_cls", num_labels=2)
    path = _jsonl(tmp_path / "long.jsonl", [{"text": "hi", "label": 0}, {"text": SENTENCE, "label": 1}])
    report = DataReport()
    kept = tokenize_task_records(read_task_records(path, head), ours, head, max_length=5, truncation="drop",
                                 report=report)
    assert len(kept.samples) == 1 and report.dropped["over-length sample (dropped)"] == 1
    with pytest.raises(DataError, match=rf"{path}:2: over-length sample"):
        tokenize_task_records(read_task_records(path, head), ours, head, max_length=5, truncation="error")


# ----- token classification ----------------------------------------------------------------------------------------

NER_RECORDS = [
    {"tokens": ["hello", "brownfox", "jumpsover", "東京"], "ner_tags": ["O", "B-PER", "I-PER", "B-LOC"]},
    {"tokens": ["the", "naïveüber", "dog", "2024", "llamatoken"], "ner_tags": ["B-LOC", "I-LOC", "O", "O", "B-PER"]},
    {"tokens": ["café", "🦙🦙", "world"], "ner_tags": ["B-PER", "B-LOC", "O"]},
]


@pytest.mark.parametrize("kind", ["spm", "bpe"])
@pytest.mark.parametrize("label_all_tokens", [False, True])
@pytest.mark.parametrize("max_length", [64, 6])
def test_word_labels_align_as_run_ner(pairs, tmp_path, kind, label_all_tokens, max_length):
    ours, hf = pairs[kind]
    head = HeadConfig("token_cls", num_labels=5, labels=NER_LABELS)
    samples = _samples(tmp_path, ours, head, NER_RECORDS, label_all_tokens=label_all_tokens,
                       max_length=max_length).samples
    columns = {"tokens": [r["tokens"] for r in NER_RECORDS], "ner_tags": [r["ner_tags"] for r in NER_RECORDS]}
    oracle = run_ner_tokenize_and_align_labels(hf, columns, list(NER_LABELS), label_all_tokens, max_length)
    assert [s.input_ids.tolist() for s in samples] == oracle["input_ids"]
    assert [s.labels.tolist() for s in samples] == oracle["labels"]
    if max_length == 64:  # the words split into several tokens, so both label rules are exercised
        assert any((s.labels == IGNORE_INDEX).sum() > 1 for s in samples) != label_all_tokens


def test_token_labels_as_indices_under_each_accepted_key(pairs, tmp_path):
    ours, _ = pairs["spm"]
    head = HeadConfig("token_cls", num_labels=3)
    records = [{"tokens": ["hello", "world"], key: [2, 1]} for key in ("labels", "tags", "ner_tags")]
    samples = _samples(tmp_path, ours, head, records).samples
    assert all(s.labels.tolist() == samples[0].labels.tolist() for s in samples)
    assert sorted(samples[0].labels[samples[0].labels != IGNORE_INDEX].tolist()) == [1, 2]


# ----- QA ----------------------------------------------------------------------------------------------------------

def _qa_records() -> list[dict]:
    def answer(text, nth=0):
        start = -1
        for _ in range(nth + 1):
            start = CONTEXT.index(text, start + 1)
        return {"text": [text], "answer_start": [start]}

    return [
        {"id": "a", "question": "  who jumps over the lazy dog?", "context": CONTEXT, "answers": answer("brown fox")},
        {"id": "b", "question": "where?", "context": CONTEXT, "answers": answer("東京 hello world", 1)},
        {"id": "c", "question": "what llama?", "context": CONTEXT, "answers": answer("🦙 hello", 2)},
        {"id": "d", "question": "nothing?", "context": SENTENCE, "answers": {"text": [], "answer_start": []}},
    ]


@pytest.mark.parametrize("kind", ["spm", "bpe"])
@pytest.mark.parametrize("max_length, stride", [(48, 12), (96, 30)])
def test_qa_features_are_run_qa_features(pairs, tmp_path, kind, max_length, stride):
    ours, hf = pairs[kind]
    records = _qa_records()
    tokenized = _samples(tmp_path, ours, HeadConfig("qa"), records, max_length=max_length, doc_stride=stride)
    columns = {key: [r[key] for r in records] for key in ("question", "context", "answers")}
    hf.padding_side = "right"  # run_qa puts the question first when padding on the right; jaxft always does
    oracle = run_qa_prepare_train_features(hf, columns, max_length, stride)
    samples = tokenized.samples
    assert len(samples) > len(records)  # long contexts became several windows
    assert [s.input_ids.tolist() for s in samples] == oracle["input_ids"]
    starts = [int(np.flatnonzero(s.extras["answer_start"])[0]) for s in samples]
    ends = [int(np.flatnonzero(s.extras["answer_end"])[0]) for s in samples]
    assert starts == oracle["start_positions"] and ends == oracle["end_positions"]
    assert all(s.extras["answer_start"].sum() == 1 == s.extras["answer_end"].sum() for s in samples)
    assert all((s.labels == IGNORE_INDEX).all() for s in samples)
    assert [f.example for f in tokenized.qa_features] == list(oracle["example_index"])
    assert [e.id for e in tokenized.qa_examples] == ["a", "b", "c", "d"]
    for feature, offsets, sequence_ids in zip(tokenized.qa_features, oracle["offset_mapping"],
                                              [oracle.sequence_ids(i) for i in range(len(samples))]):
        expected = [list(o) if s == 1 else [-1, -1] for o, s in zip(offsets, sequence_ids)]
        assert feature.offsets.tolist() == expected


def test_qa_offsets_map_the_answer_tokens_back_to_the_answer_text(pairs, tmp_path):
    ours, _ = pairs["bpe"]
    tokenized = _samples(tmp_path, ours, HeadConfig("qa"), _qa_records(), max_length=48, doc_stride=12)
    found = set()
    for sample, feature in zip(tokenized.samples, tokenized.qa_features):
        start, end = (int(np.argmax(sample.extras[k])) for k in ("answer_start", "answer_end"))
        if start:
            example = tokenized.qa_examples[feature.example]
            text = example.context[feature.offsets[start][0]:feature.offsets[end][1]]
            assert text.strip() == example.answer_texts[0]
            found.add(feature.example)
    assert found == {0, 1, 2}


# ----- bad input ---------------------------------------------------------------------------------------------------

CLASSIFY = HeadConfig("seq_cls", num_labels=3, labels=("neg", "neu", "pos"))
BAD_RECORDS = [
    (CLASSIFY, {"text": "hi", "label": "happy"}, "unknown label name"),
    (CLASSIFY, {"text": "hi", "label": 3}, "label index out of range"),
    (CLASSIFY, {"text": "hi", "label": -1}, "label index out of range"),
    (CLASSIFY, {"text": "hi", "label": 1.5}, "wrong label form"),
    (CLASSIFY, {"text": "hi"}, "missing 'label'"),
    (CLASSIFY, {"txt": "hi", "label": 0}, "missing 'text'"),
    (CLASSIFY, {"text_a": "hi", "label": 0}, "missing 'text_b'"),
    (CLASSIFY, {"text": "  ", "label": 0}, "empty text"),
    (HeadConfig("seq_cls", num_labels=1), {"text": "hi", "label": float("nan")}, "wrong label form"),
    (HeadConfig("seq_cls", num_labels=2), {"text": "hi", "label": "pos"}, "label name without label_names"),
    (HeadConfig("seq_cls", num_labels=2, problem_type="multi_label_classification"), {"text": "hi", "label": 1},
     "wrong label form"),
    (HeadConfig("seq_cls", num_labels=2, problem_type="regression"), {"text": "hi", "label": 0.5},
     "wrong label form"),
    (HeadConfig("seq_cls", num_labels=1), {"text": "hi", "label": "neg"}, "wrong label form"),
    (HeadConfig("token_cls", num_labels=5, labels=NER_LABELS), {"tokens": ["a", "b"], "ner_tags": ["O"]},
     "labels do not match the words"),
    (HeadConfig("token_cls", num_labels=5, labels=NER_LABELS), {"tokens": ["a"], "ner_tags": ["B-ORG"]},
     "unknown label name"),
    (HeadConfig("token_cls", num_labels=5), {"tokens": ["a"], "tags": [5]}, "label index out of range"),
    (HeadConfig("token_cls", num_labels=5), {"words": ["a"], "tags": [0]}, "missing 'tokens'"),
    (HeadConfig("token_cls", num_labels=5), {"tokens": ["a"]}, "missing labels"),
    (HeadConfig("token_cls", num_labels=5), {"tokens": ["a", ""], "tags": [0, 0]}, "bad word"),
    (HeadConfig("qa"), {"question": "q?", "context": "the fox", "answers": {"text": ["fox"], "answer_start": [1]}},
     "answer not in context"),
    (HeadConfig("qa"), {"question": "q?", "context": "the fox", "answers": {"text": ["fox"]}}, "bad answers"),
    (HeadConfig("qa"), {"context": "the fox", "answers": {"text": [], "answer_start": []}}, "missing 'question'"),
]


@pytest.mark.parametrize("head, bad, reason", BAD_RECORDS, ids=[r for _, _, r in BAD_RECORDS])
def test_bad_records_name_file_and_line_or_are_counted(pairs, tmp_path, head, bad, reason):
    good = {"seq_cls": {"text": "hello", "label": 0}, "token_cls": {"tokens": ["hello"], "tags": [0]},
            "qa": {"question": "q?", "context": "the fox", "answers": {"text": ["fox"], "answer_start": [4]}}}
    if head.problem != "single_label_classification":
        good["seq_cls"]["label"] = [0] if head.problem == "multi_label_classification" else [0.0] * head.num_labels
    path = _jsonl(tmp_path / "bad.jsonl", [good[head.kind], bad, good[head.kind]])
    with pytest.raises(DataError, match=rf"^{path}:2: {reason}"):
        read_task_records(path, head)
    report = DataReport()
    assert len(read_task_records(path, head, skip_bad_records=True, report=report)) == 2
    assert report.dropped == {reason: 1}


def test_qa_answers_cut_away_or_crowded_out_name_their_line(pairs, tmp_path):
    ours, _ = pairs["spm"]
    long_answer = CONTEXT[:200]
    records = [_qa_records()[0],
               {"question": "q?", "context": CONTEXT, "answers": {"text": [long_answer], "answer_start": [0]}},
               {"question": SENTENCE * 4, "context": CONTEXT, "answers": {"text": ["fox"], "answer_start": [16]}}]
    path = _jsonl(tmp_path / "qa.jsonl", records)
    examples = read_task_records(path, HeadConfig("qa"))
    with pytest.raises(DataError, match=rf"^{path}:2: answer cut away by truncation"):
        tokenize_task_records(examples, ours, HeadConfig("qa"), max_length=32, doc_stride=8)
    with pytest.raises(DataError, match=rf"^{path}:3: question too long for the window"):
        tokenize_task_records(examples[2:], ours, HeadConfig("qa"), max_length=32, doc_stride=8)
    report = DataReport()
    kept = tokenize_task_records(examples, ours, HeadConfig("qa"), max_length=32, doc_stride=8,
                                 skip_bad_records=True, report=report)
    assert report.dropped == {"answer cut away by truncation": 1, "question too long for the window": 1}
    assert {f.example for f in kept.qa_features} == {0} and len(kept.qa_examples) == 1


def test_samples_of_two_tasks_do_not_share_an_iterator(pairs, tmp_path):
    ours, _ = pairs["spm"]
    single, multi = HeadConfig("seq_cls"), HeadConfig("seq_cls", problem_type="multi_label_classification")
    a = _samples(tmp_path, ours, single, [{"text": "hello", "label": 1}]).samples
    b = _samples(tmp_path, ours, multi, [{"text": "world", "label": [1]}]).samples
    with pytest.raises(DataError, match="mixed sample extras"):
        PackedIterator([a, b], batch_size=1, row_length=16)


def test_token_ids_beyond_the_model_vocabulary_are_an_error(pairs, tmp_path):
    ours, _ = pairs["spm"]
    path = _jsonl(tmp_path / "c.jsonl", [{"text": "hello world 東京", "label": 1}])
    config = DataConfig(paths=(str(path),), max_length=32, batch_size=2)
    with pytest.raises(DataError, match=rf"{path}:1: token id beyond the model's vocabulary"):
        build_task_iterator(config, ours, HeadConfig("seq_cls"), vocab_size=10)


# ----- other file formats ------------------------------------------------------------------------------------------

def test_csv_and_parquet_and_dataset_folders(pairs, tmp_path):
    ours, hf = pairs["spm"]
    rows = {"text_a": ["hello world", "the dog", "a fox"], "text_b": ["café", "über", "東京"],
            "label": ["pos", "neg", "oops"]}
    datasets.Dataset.from_dict(rows).to_csv(tmp_path / "pairs.csv", index=False)
    with pytest.raises(DataError, match=rf"{tmp_path / 'pairs.csv'}:row 3: unknown label name"):
        read_task_records(tmp_path / "pairs.csv", CLASSIFY)
    good = {key: values[:2] for key, values in rows.items()}
    datasets.Dataset.from_dict(good).to_csv(tmp_path / "good.csv", index=False)
    datasets.Dataset.from_dict(good).to_parquet(tmp_path / "good.parquet")
    expected = [hf("hello world", "café")["input_ids"], hf("the dog", "über")["input_ids"]]
    for path in (tmp_path / "good.csv", tmp_path / "good.parquet"):
        samples = tokenize_task_records(read_task_records(path, CLASSIFY), ours, CLASSIFY).samples
        assert [s.input_ids.tolist() for s in samples] == expected and [s.labels[-1] for s in samples] == [2, 0]
    ner = HeadConfig("token_cls", num_labels=5, labels=NER_LABELS)
    columns = {"tokens": [r["tokens"] for r in NER_RECORDS], "ner_tags": [r["ner_tags"] for r in NER_RECORDS]}
    datasets.Dataset.from_dict(columns).to_parquet(tmp_path / "ner.parquet")
    datasets.Dataset.from_dict(columns).save_to_disk(str(tmp_path / "ner_folder"))
    from_jsonl = _samples(tmp_path, ours, ner, NER_RECORDS).samples
    for path in (tmp_path / "ner.parquet", tmp_path / "ner_folder"):
        samples = tokenize_task_records(read_task_records(path, ner), ours, ner).samples
        assert [s.labels.tolist() for s in samples] == [s.labels.tolist() for s in from_jsonl]
    qa = _qa_records()
    datasets.Dataset.from_list(qa).to_parquet(tmp_path / "qa.parquet")
    examples = read_task_records(tmp_path / "qa.parquet", HeadConfig("qa"))
    assert [(e.id, e.answer_texts) for e in examples] == [(r["id"], tuple(r["answers"]["text"])) for r in qa]


# ----- batches -----------------------------------------------------------------------------------------------------

def _documents(batch: dict) -> list[dict]:
    """Each document of a packed batch, its arrays cut out by segment id."""
    documents = []
    for r in range(batch["input_ids"].shape[0]):
        for segment in range(1, batch["segment_ids"][r].max() + 1):
            at = batch["segment_ids"][r] == segment
            documents.append({key: value[r][at] for key, value in batch.items()})
    return documents


@pytest.mark.parametrize("problem", ["single_label_classification", "multi_label_classification", "qa"])
def test_packed_batches_keep_labels_at_last_tokens_and_lay_out_extras(pairs, tmp_path, problem):
    ours, _ = pairs["spm"]
    if problem == "qa":
        short = {"question": "what?", "context": SENTENCE, "answers": {"text": ["fox"], "answer_start": [16]}}
        head, records = HeadConfig("qa"), _qa_records() + [short] * 3
    else:
        head = HeadConfig("seq_cls", num_labels=3, labels=("neg", "neu", "pos"), problem_type=problem)
        labels = ["pos", "neg", "neu"] if problem.startswith("single") else [["pos"], ["neg", "neu"], []]
        records = [{"text": t, "label": labels[i % 3]} for i, t in enumerate(SENTENCE.split())]
    path = _jsonl(tmp_path / "task.jsonl", records)
    config = DataConfig(paths=(str(path),), max_length=48, batch_size=2, packing=True)
    pipeline = build_task_iterator(config, ours, head, doc_stride=12, vocab_size=len(ours))
    assert pipeline.chat_template is None
    direct = tokenize_task_records(read_task_records(path, head), ours, head, max_length=48, doc_stride=12).samples
    batches = [next(pipeline.iterator) for _ in range(pipeline.iterator.batches_per_epoch)]
    documents = [d for batch in batches for d in _documents(batch)]
    assert len(documents) == len(direct)
    assert any(b["segment_ids"].max() > 1 for b in batches)  # several documents share a row
    by_ids = {tuple(s.input_ids.tolist()): s for s in direct}
    for document in documents:
        sample = by_ids[tuple(document["input_ids"].tolist())]
        np.testing.assert_array_equal(document["labels"], sample.labels)
        np.testing.assert_array_equal(document["positions"], np.arange(len(sample.input_ids)))
        for key, value in (sample.extras or {}).items():
            np.testing.assert_array_equal(document[key], value)
    batch = next(pipeline.iterator)
    expected_keys = {"qa": {"answer_start", "answer_end"}, "single_label_classification": set(),
                     "multi_label_classification": {"targets"}}[problem]
    assert set(batch) == {"input_ids", "labels", "segment_ids", "positions"} | expected_keys
    for key in expected_keys:
        assert not batch[key][batch["segment_ids"] == 0].any()
    if problem == "multi_label_classification":
        assert batch["targets"].shape == (2, 48, 3) and batch["targets"].dtype == np.float32


def test_the_fingerprint_covers_the_extras(pairs, tmp_path):
    ours, _ = pairs["spm"]
    head = HeadConfig("seq_cls", num_labels=2, problem_type="regression")
    fingerprints = []
    for value in (0.5, 0.25):
        path = _jsonl(tmp_path / f"r{value}.jsonl", [{"text": "hello", "label": [value, 1.0]}])
        config = DataConfig(paths=(str(path),), max_length=16, batch_size=1)
        fingerprints.append(build_task_iterator(config, ours, head).iterator.fingerprint)
    assert fingerprints[0] != fingerprints[1]
