"""Task data for the heads of `jaxft.models.heads`: records -> samples -> packed batches.

One file holds records of one task, chosen by the run's `HeadConfig.kind` (read with `formats.read_records`:
JSON/JSONL, CSV, parquet, `save_to_disk` folders; every error names the file and line or row):

| task (`head.kind`)            | record keys                                                                  |
|-------------------------------|------------------------------------------------------------------------------|
| classify (`seq_cls`)          | `text` or the pair `text_a`, `text_b`; `label`                               |
| token_classify (`token_cls`)  | `tokens` (the words); per-word labels in `labels`, `tags` or `ner_tags`      |
| qa (`qa`)                     | `question`, `context`, `answers: {text: [...], answer_start: [...]}`, `id`?  |

**Labels.** A class is an index 0..num_labels-1 or, with `label_names` (`HeadConfig.labels`), its name. The
head's problem type decides the form of a classification label: single-label takes one class; multi-label a
list of classes (names or indices, made multi-hot; lists need JSON, parquet or dataset folders, not CSV);
regression a number (num_labels 1) or a list of num_labels numbers. Token labels are classes, one per word.

**Tokens**, as transformers' examples make them: a text is `tokenizer(text)` (special tokens such as BOS, no
EOS appended); a pair `tokenizer(text_a, text_b)` (the post-processor's pair template); words
`tokenizer(words, is_split_into_words=True)`, labelled as `run_ner.py`'s `tokenize_and_align_labels` does
(the first sub-token of each word gets its label, the others -100, or with `label_all_tokens` the word's label
with B- turned into I- where the label names have that I- class; special tokens -100). QA features are
`run_qa.py`'s `prepare_train_features` for a tokenizer padding on the right: the question (left-stripped) first,
the context second and truncated alone into windows of `max_length` tokens overlapping by `doc_stride`; a window
without the answer points start and end at its first token. (run_qa puts the context first for a tokenizer that
pads on the left, as transformers' `LlamaTokenizer` does by default; the padding side means nothing to packed
rows, so jaxft keeps one order.)

**Batches** (`jaxft.data.iterator.PackedIterator`, packing allowed: documents stay apart by segment ids), keys
besides `input_ids`, `segment_ids`, `positions`; labels are not shifted:

- classify: `labels` [B, T] int32, at each document's last token its class (0, a marker, for multi-label and
  regression), -100 elsewhere; multi-label and regression also `targets` [B, T, N] float32, the multi-hot vector
  or the N values at that last token, 0 elsewhere.
- token_classify: `labels` [B, T] int32, the word labels as aligned above, -100 elsewhere.
- qa: `answer_start`, `answer_end` [B, T] int32, 1 at the answer's first / last token of each feature (its first
  token when the window lacks the answer), 0 elsewhere; `labels` all -100.

**Length.** `data.max_length` and `data.truncation` apply to classify and token_classify: keep the first
(`right`) or last (`left`) tokens as transformers' `truncation=True` with that `truncation_side` does (the
longer text of a pair first), `drop` the record (counted), or raise (`error`); a classification label is read
at the last token kept, and token labels of cut words are lost (as in `run_ner.py`). QA ignores
`data.truncation`: long contexts always become several windows. A QA record is bad when its question leaves a
window no room for `doc_stride` + 1 context tokens, or when no window holds its first answer whole ("answer cut
away by truncation": the answer is longer than a window's context): training would only see it unanswerable.

**Evaluation** of QA maps predictions back to text with `TaskSamples.qa_features` (one per sample: its
example's index and its tokens' character offsets in the context, -1 outside the context) and
`TaskSamples.qa_examples` (context and gold answers). Read an eval file with `read_task_records` and
`tokenize_task_records`, and batch its samples in order with `packing.rows_to_batch`.
"""
from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from jaxft.config import HeadConfig
from jaxft.data.chat import IGNORE_INDEX, Sample, check_token_ids, checked_pad_id
from jaxft.data.config import TRUNCATION, DataConfig
from jaxft.data.formats import DataError, DataReport, convert_records, string_field
from jaxft.data.iterator import DataPipeline, PackedIterator, shard_indices

TOKEN_LABEL_KEYS = ("labels", "tags", "ner_tags")  # run_ner.py's label column is "ner_tags" (CoNLL)


# ----- records -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class ClassifyRecord:
    """A text (or pair) and its class; `targets` [N] float32 for multi-label (multi-hot) and regression."""

    source: str
    text: str
    text_pair: str | None
    label: int
    targets: np.ndarray | None


@dataclass(frozen=True, eq=False)
class TokenRecord:
    """Words and one class per word."""

    source: str
    words: tuple[str, ...]
    labels: tuple[int, ...]


@dataclass(frozen=True, eq=False)
class QaExample:
    """A SQuAD record: the context and its gold answers (texts, character starts; both empty if unanswerable).
    Training targets the first answer; evaluation scores against all of them."""

    source: str
    id: str | None
    question: str
    context: str
    answer_texts: tuple[str, ...]
    answer_starts: tuple[int, ...]


@dataclass(frozen=True, eq=False)
class QaFeature:
    """One window of a QA example: `example` indexes `TaskSamples.qa_examples`; `offsets` [n, 2] int32 are each
    token's `[start, end)` characters in the example's context, -1 for question and special tokens."""

    example: int
    offsets: np.ndarray


class TaskSamples(NamedTuple):
    """Tokenized task records: the samples, and for QA a feature per sample and the examples they came from."""

    samples: list[Sample]
    qa_features: list[QaFeature]
    qa_examples: list[QaExample]


def _nonempty_text(record: Mapping, key: str, location: str) -> str:
    text = string_field(record, key, location)
    if not text.strip():
        raise DataError(location, "empty text", f"{key!r} is empty")
    return text


def _class_id(value, head: HeadConfig, location: str, what: str) -> int:
    """A class given as an index or (with label names) a name."""
    if isinstance(value, str):
        if head.labels is None:
            raise DataError(location, "label name without label_names",
                            f"{what} {value!r} is a name but the task has no label_names; give indices "
                            f"0..{head.num_labels - 1} or list the names in task.label_names")
        if value not in head.labels:
            raise DataError(location, "unknown label name", f"{what} {value!r} is not one of {list(head.labels)}")
        return head.labels.index(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise DataError(location, "wrong label form",
                        f"{what} must be a class index or name, got {type(value).__name__} {value!r}")
    if not 0 <= value < head.num_labels:
        raise DataError(location, "label index out of range",
                        f"{what} {value} is outside 0..{head.num_labels - 1} (num_labels {head.num_labels})")
    return int(value)


def _regression_targets(value, head: HeadConfig, location: str) -> np.ndarray:
    values = value if isinstance(value, (list, tuple)) else [value]
    if len(values) != head.num_labels or any(isinstance(v, bool) or not isinstance(v, numbers.Real) for v in values):
        wanted = "a number" if head.num_labels == 1 else f"a list of {head.num_labels} numbers"
        raise DataError(location, "wrong label form",
                        f"regression with num_labels {head.num_labels} needs {wanted} as label, got {value!r}")
    targets = np.asarray(values, np.float32)
    if not np.isfinite(targets).all():
        raise DataError(location, "wrong label form", f"regression targets must be finite, got {value!r}")
    return targets


def _classify_label(value, head: HeadConfig, location: str) -> tuple[int, np.ndarray | None]:
    """(label id at the last token, targets) for the head's problem type."""
    if head.problem == "regression":
        return 0, _regression_targets(value, head, location)
    if head.problem == "single_label_classification":
        return _class_id(value, head, location, "label"), None
    if not isinstance(value, (list, tuple)):
        raise DataError(location, "wrong label form",
                        f"multi-label classification needs a list of label names or indices, got {value!r}")
    hot = np.zeros(head.num_labels, np.float32)
    for j, item in enumerate(value):
        hot[_class_id(item, head, location, f"label[{j}]")] = 1.0
    return 0, hot


def _classify_record(record: Mapping, location: str, head: HeadConfig) -> ClassifyRecord:
    if record.get("text_a") is not None or record.get("text_b") is not None:
        text, pair = _nonempty_text(record, "text_a", location), _nonempty_text(record, "text_b", location)
    else:
        text, pair = _nonempty_text(record, "text", location), None
    if record.get("label") is None:
        raise DataError(location, "missing 'label'", f"the record has keys {sorted(record)}")
    label, targets = _classify_label(record["label"], head, location)
    return ClassifyRecord(location, text, pair, label, targets)


def _token_record(record: Mapping, location: str, head: HeadConfig) -> TokenRecord:
    words = record.get("tokens")
    if not isinstance(words, (list, tuple)) or not words:
        raise DataError(location, "missing 'tokens'",
                        f"'tokens' must be a non-empty list of words, got {words!r} (keys: {sorted(record)})")
    bad = next((j for j, word in enumerate(words) if not isinstance(word, str) or not word), None)
    if bad is not None:
        raise DataError(location, "bad word", f"tokens[{bad}] must be a non-empty string, got {words[bad]!r}")
    key = next((key for key in TOKEN_LABEL_KEYS if record.get(key) is not None), None)
    if key is None:
        raise DataError(location, "missing labels",
                        f"no per-word labels in any of {list(TOKEN_LABEL_KEYS)} (keys: {sorted(record)})")
    labels = record[key]
    if not isinstance(labels, (list, tuple)) or len(labels) != len(words):
        count = len(labels) if isinstance(labels, (list, tuple)) else type(labels).__name__
        raise DataError(location, "labels do not match the words",
                        f"{key!r} has {count} labels for {len(words)} words; give one label per word")
    ids = tuple(_class_id(value, head, location, f"{key}[{j}]") for j, value in enumerate(labels))
    return TokenRecord(location, tuple(words), ids)


def _qa_answers(record: Mapping, location: str, context: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    answers = record.get("answers")
    texts = answers.get("text") if isinstance(answers, Mapping) else None
    starts = answers.get("answer_start") if isinstance(answers, Mapping) else None
    if not isinstance(texts, (list, tuple)) or not isinstance(starts, (list, tuple)) or len(texts) != len(starts):
        raise DataError(location, "bad answers", "'answers' must be {'text': [str, ...], 'answer_start': "
                        f"[int, ...]}} with one start per text, got {answers!r}")
    for j, (text, start) in enumerate(zip(texts, starts)):
        if not isinstance(text, str) or not text or isinstance(start, bool) or not isinstance(start,
                                                                                               numbers.Integral):
            raise DataError(location, "bad answers",
                            f"answer {j}: text must be a non-empty string and answer_start an integer, got "
                            f"{text!r} at {start!r}")
        if start < 0 or context[start:start + len(text)] != text:
            raise DataError(location, "answer not in context",
                            f"answer {j} {text!r} is not at character {start} of the context (there: "
                            f"{context[max(start, 0):max(start, 0) + len(text)]!r})")
    return tuple(texts), tuple(int(s) for s in starts)


def _qa_record(record: Mapping, location: str, head: HeadConfig) -> QaExample:
    question = _nonempty_text(record, "question", location)
    context = _nonempty_text(record, "context", location)
    texts, starts = _qa_answers(record, location, context)
    example_id = record.get("id")
    return QaExample(location, None if example_id is None else str(example_id), question, context, texts, starts)


_READERS = {"seq_cls": _classify_record, "token_cls": _token_record, "qa": _qa_record}


def read_task_records(path: str | Path, head: HeadConfig, *, skip_bad_records: bool = False,
                      report: DataReport | None = None) -> list:
    """The records of one file for `head`'s task (`ClassifyRecord`, `TokenRecord` or `QaExample`), checked.

    Bad records (missing keys, unknown label names, label indices outside 0..num_labels-1, a label of the wrong
    form for the problem type, as many token labels as words, an answer that is not at its `answer_start`)
    raise a DataError naming file and line, or with `skip_bad_records` are counted in `report`.
    """
    return convert_records(path, lambda record, location: _READERS[head.kind](record, location, head),
                           skip_bad_records=skip_bad_records, report=report)


# ----- tokenizing --------------------------------------------------------------------------------------------------

def _encode_within(tokenizer, text, pair, source: str, *, max_length: int, truncation: str,
                   is_pretokenized: bool = False):
    """The text's encoding at most `max_length` tokens long (see the module's "Length"); None to drop it."""
    encoding = tokenizer.encode_windows(text, pair, is_pretokenized=is_pretokenized)[0]
    if len(encoding.ids) <= max_length:
        return encoding
    if truncation == "drop":
        return None
    if truncation == "error":
        raise DataError(source, "over-length sample",
                        f"{len(encoding.ids)} tokens > max_length {max_length}; raise data.max_length or set "
                        "data.truncation to 'right', 'left' or 'drop'")
    return tokenizer.encode_windows(text, pair, is_pretokenized=is_pretokenized, max_length=max_length,
                                    direction=truncation)[0]


def _classify_sample(record: ClassifyRecord, encoding) -> Sample:
    ids = np.asarray(encoding.ids, np.int32)
    labels = np.full(len(ids), IGNORE_INDEX, np.int32)
    labels[-1] = record.label
    if record.targets is None:
        return Sample(ids, labels, record.source)
    targets = np.zeros((len(ids), len(record.targets)), np.float32)
    targets[-1] = record.targets
    return Sample(ids, labels, record.source, {"targets": targets})


def continuation_labels(head: HeadConfig) -> list[int]:
    """run_ner.py's `b_to_i_label`: the label a word's later sub-tokens get with `label_all_tokens`, the I- class
    of a B- class where the label names have it, else the class itself."""
    names = head.labels or ()
    return [names.index("I-" + name[2:]) if name.startswith("B-") and "I-" + name[2:] in names else index
            for index, name in enumerate(names)] or list(range(head.num_labels))


def aligned_word_labels(word_ids: Sequence[int | None], word_labels: Sequence[int],
                        continuation: Sequence[int] | None) -> np.ndarray:
    """run_ner.py's `tokenize_and_align_labels` for one encoding: special tokens (no word) -100, a word's first
    sub-token its label, later ones -100 or, with `continuation` (label_all_tokens), `continuation[label]`."""
    labels, previous = [], None
    for word in word_ids:
        if word is None:
            labels.append(IGNORE_INDEX)
        elif word != previous:
            labels.append(word_labels[word])
        else:
            labels.append(IGNORE_INDEX if continuation is None else continuation[word_labels[word]])
        previous = word
    return np.asarray(labels, np.int32)


def _token_sample(record: TokenRecord, encoding, continuation: Sequence[int] | None) -> Sample:
    labels = aligned_word_labels(encoding.word_ids, record.labels, continuation)
    return Sample(np.asarray(encoding.ids, np.int32), labels, record.source)


def answer_positions(encoding, start_char: int, end_char: int) -> tuple[int, int]:
    """run_qa.py's start/end token of the answer `[start_char, end_char)` in one window (the context is sequence
    1), or (0, 0) when the window does not hold it whole."""
    sequence_ids, offsets = encoding.sequence_ids, encoding.offsets
    first = sequence_ids.index(1)
    last = len(sequence_ids) - 1 - sequence_ids[::-1].index(1)
    if not (offsets[first][0] <= start_char and offsets[last][1] >= end_char):
        return 0, 0
    while first < len(offsets) and offsets[first][0] <= start_char:
        first += 1
    while offsets[last][1] >= end_char:
        last -= 1
    return first - 1, last + 1


def _qa_windows(tokenizer, example: QaExample, max_length: int, doc_stride: int) -> list:
    """The example's windows (encodings), after checking that each leaves room for the stride."""
    question = example.question.lstrip()  # as run_qa.py: leading spaces only waste room
    room = (max_length - len(tokenizer.encode(question, add_special_tokens=False))
            - tokenizer.num_special_tokens_to_add(pair=True))
    if room <= doc_stride:
        raise DataError(example.source, "question too long for the window",
                        f"the question leaves {max(room, 0)} of max_length {max_length} tokens for the context, "
                        f"which must be more than doc_stride {doc_stride}; raise data.max_length or lower "
                        "doc_stride")
    return tokenizer.encode_windows(question, example.context, max_length=max_length, stride=doc_stride,
                                    strategy="only_second")


def _qa_samples(tokenizer, example: QaExample, index: int, max_length: int,
                doc_stride: int) -> list[tuple[Sample, QaFeature]]:
    """One sample per window, with run_qa.py's answer positions of the first answer as one-hot extras."""
    windows = _qa_windows(tokenizer, example, max_length, doc_stride)
    answer = None
    if example.answer_texts:
        answer = (example.answer_starts[0], example.answer_starts[0] + len(example.answer_texts[0]))
    pairs, found = [], False
    for window in windows:
        start, end = answer_positions(window, *answer) if answer else (0, 0)
        found |= start != 0
        ids = np.asarray(window.ids, np.int32)
        extras = {"answer_start": np.zeros(len(ids), np.int32), "answer_end": np.zeros(len(ids), np.int32)}
        extras["answer_start"][start] = extras["answer_end"][end] = 1
        offsets = np.asarray(window.offsets, np.int32).reshape(-1, 2)
        offsets[np.asarray(window.sequence_ids, dtype=object) != 1] = -1
        pairs.append((Sample(ids, np.full(len(ids), IGNORE_INDEX, np.int32), example.source, extras),
                      QaFeature(index, offsets)))
    if answer and not found:
        raise DataError(example.source, "answer cut away by truncation",
                        f"no window of max_length {max_length} holds the answer {example.answer_texts[0]!r} "
                        "whole; raise data.max_length")
    return pairs


def _record_samples(record, tokenizer, head: HeadConfig, index: int, *, max_length: int, truncation: str,
                    continuation: Sequence[int] | None, doc_stride: int) -> list[tuple[Sample, QaFeature | None]]:
    """The samples of one record (several QA windows, else one; none when `truncation="drop"` drops it)."""
    if head.kind == "qa":
        return _qa_samples(tokenizer, record, index, max_length, doc_stride)
    words = head.kind == "token_cls"
    encoding = _encode_within(tokenizer, list(record.words) if words else record.text,
                              None if words else record.text_pair, record.source, max_length=max_length,
                              truncation=truncation, is_pretokenized=words)
    if encoding is None:
        return []
    if not words and encoding.ids[-1] == tokenizer.pad_token_id:
        raise DataError(record.source, "ends with the pad token",
                        f"the text's last token is the tokenizer's pad token {tokenizer.pad_token!r} (the tokenizer "
                        "appends it: pad = eos?); transformers' *ForSequenceClassification scores the last token "
                        "that is not padding, so the exported model would read another token than the one trained. "
                        "Give the tokenizer a pad token of its own")
    return [(_token_sample(record, encoding, continuation) if words else _classify_sample(record, encoding), None)]


def tokenize_task_records(records: Sequence, tokenizer, head: HeadConfig, *, max_length: int = 2048,
                          truncation: str = "right", label_all_tokens: bool = False, doc_stride: int = 128,
                          skip_bad_records: bool = False, report: DataReport | None = None) -> TaskSamples:
    """Samples of `read_task_records`' records, in order (see the module's "Tokens", "Length" and "Batches").

    Bad records (a QA answer no window holds, a question too long for a window, over-length with
    `truncation="error"`) raise a DataError naming their source, or with
    `skip_bad_records` are counted in `report`; `truncation="drop"` always drops and counts.
    """
    if truncation not in TRUNCATION:
        raise ValueError(f"truncation {truncation!r} is unknown; expected one of {TRUNCATION}")
    report = report if report is not None else DataReport()
    continuation = continuation_labels(head) if label_all_tokens else None
    samples, features, examples = [], [], []
    for record in records:
        try:
            made = _record_samples(record, tokenizer, head, len(examples), max_length=max_length,
                                   truncation=truncation, continuation=continuation, doc_stride=doc_stride)
        except DataError as err:
            if not skip_bad_records:
                raise
            report.drop_error(err)
            continue
        if not made:
            report.drop("over-length sample (dropped)", f"{record.source}: more than max_length {max_length} tokens")
        samples += [sample for sample, _ in made]
        if head.kind == "qa":
            features += [feature for _, feature in made]
            examples.append(record)
    report.kept["tokenized samples"] += len(samples)
    return TaskSamples(samples, features, examples)


def build_task_iterator(config: DataConfig, tokenizer, head: HeadConfig, *, label_all_tokens: bool = False,
                        doc_stride: int = 128, process_index: int = 0, process_count: int = 1,
                        vocab_size: int | None = None) -> DataPipeline:
    """Load, shard, tokenize and batch the task data of `config` for `head`'s task on one process.

    As `jaxft.data.build_iterator`, but records are task records (module docstring) and SFT's settings do not
    apply: no cleaning or deduplication (a label makes two equal texts different records, and evaluation sets
    must stay whole), no `format`, `template`, `loss` or `train_on_inputs`. `max_length`, `truncation` (not for
    QA), `packing`, `batch_size`, `weights`, `seed` and `skip_bad_records` do. Records are sharded over processes
    before tokenizing, so a QA example's windows stay on one process. With the model's `vocab_size`, token ids
    without an embedding row are a DataError before any batch is made. The pipeline has no chat template.
    """
    report = DataReport()
    sources = [read_task_records(path, head, skip_bad_records=config.skip_bad_records, report=report)
               for path in config.paths]
    shards = []
    for source in sources:
        mine = shard_indices(len(source), seed=config.seed, process_index=process_index, process_count=process_count)
        shards.append(tokenize_task_records(
            [source[i] for i in mine], tokenizer, head, max_length=config.max_length, truncation=config.truncation,
            label_all_tokens=label_all_tokens, doc_stride=doc_stride, skip_bad_records=config.skip_bad_records,
            report=report).samples)
        if vocab_size is not None:
            check_token_ids(shards[-1], vocab_size, tokenizer)
    iterator = PackedIterator(shards, batch_size=config.batch_size, row_length=config.max_length,
                              packing=config.packing, weights=config.weights, seed=config.seed,
                              pad_id=checked_pad_id(tokenizer, vocab_size), process_index=process_index,
                              process_count=process_count)
    return DataPipeline(iterator, report, None)
