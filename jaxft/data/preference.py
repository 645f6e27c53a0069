"""Preference data for reward models, the DPO family and KTO: records -> token ids -> packed pair rows.

**Records** (read with `formats.read_records`: JSON/JSONL, CSV, parquet, `save_to_disk` folders; every error
names the file and line or row):

| kind    | record keys                                                                                       |
|---------|---------------------------------------------------------------------------------------------------|
| `pairs` | `prompt`, `chosen`, `rejected`: three strings or three message lists; optional `margin` (number)    |
| `pairs` | implicit prompt: `chosen`, `rejected` conversations that start with the same messages (the prompt)  |
| `kto`   | `prompt`, `completion` (two strings or two message lists), `label`: true (desirable) or false      |
| `completions` | scored alone (`jaxft eval --scores`): `prompt` + `completion`, `messages`, or `text` |

The implicit prompt is TRL's `maybe_extract_prompt`: used when a record has no `prompt`, or a string prompt beside
conversational completions; the prompt is the messages both conversations start with, the completions the rest.

**Tokens**, as TRL 1.16's `DPOTrainer` / `KTOTrainer` `_prepare_dataset` make them. Strings: the completion gets
the tokenizer's EOS text unless it ends with it; `prompt_ids = tokenizer(prompt)` and the sequence is
`tokenizer(prompt + completion)` (special tokens such as BOS as the tokenizer adds them). Conversations: the
prompt rendered with the generation prompt, the sequence is `prompt + completion` messages rendered (the chat
template: the tokenizer's or `data.template`), encoded without special tokens. The completion starts where the
prompt's ids and the sequence's ids part (for a pair: the earlier of chosen and rejected), and only its tokens
carry loss: labels are SFT's shifted convention (`jaxft.data.chat`) on the completion tokens.

**Length.** `max_prompt_length` keeps a prompt's last tokens and `max_completion_length` a completion's first
(TRL 0.x's `tokenize_row`; TRL 1.16 has neither). Then each sequence (prompt + one completion) longer than
`data.max_length` (TRL's per-sequence `max_length`) is cut as `data.truncation` says: `right` keeps its first
tokens (TRL's `keep_start`; as TRL, a record whose prompt alone fills `max_length` is dropped and counted),
`left` its last (`keep_end`), `drop` drops the record (counted), `error` raises.

**Batches** (`PackedIterator`, rows of `2 * data.max_length` tokens: one unit holds two sequences; the design of
issue #17): a pair is one packing unit of two consecutive segments, prompt + chosen then prompt + rejected
(positions restart at each), so segment 2k + 1 of a row is a chosen and 2k + 2 its rejected
(`jaxft.train.sequences.pairs`). `margin` [B, T] float32 is the pair's margin at its chosen tokens (0 elsewhere and
for records without one). KTO: a unit is the example's segment and its KL-baseline segment, the example's prompt
with another example's completion, as TRL's KTO dataset rotates completions by one within each run of
`data.batch_size` records; `kto_label` [B, T] int32 is 1 (desirable) or 2 (undesirable) at the example's tokens,
3 at the KL segment's, 0 on padding.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from jaxft.config import ConfigError
from jaxft.data.chat import IGNORE_INDEX, Sample, check_token_ids, checked_pad_id, resolve_template
from jaxft.data.config import DataConfig
from jaxft.data.formats import (DataError, DataReport, convert_records, read_records, string_field,
                                validate_messages)
from jaxft.data.iterator import DataPipeline, PackedIterator, shard_indices

KINDS = ("pairs", "kto", "completions")
SEQUENCES_PER_UNIT = 2  # a pair (chosen, rejected), or a KTO example with its KL-baseline completion: one row holds
                        # whole units, so rows are this many times data.max_length (TRL's per-sequence max_length)
DESIRABLE, UNDESIRABLE, KL_BASELINE = 1, 2, 3  # `kto_label` values
IDENTICAL_PAIRS = "pairs with identical chosen and rejected (kept)"


# ----- records -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class PreferenceRecord:
    """A prompt and its chosen and rejected completions: strings, or message lists (conversational)."""

    source: str
    prompt: str | list[dict]
    chosen: str | list[dict]
    rejected: str | list[dict]
    margin: float = 0.0


@dataclass(frozen=True, eq=False)
class UnpairedRecord:
    """KTO: a prompt, one completion, and whether it is desirable."""

    source: str
    prompt: str | list[dict]
    completion: str | list[dict]
    desirable: bool


@dataclass(frozen=True, eq=False)
class CompletionRecord:
    """One completion to score (a reward model ranking samples): a prompt and the completion, strings or messages."""

    source: str
    prompt: str | list[dict]
    completion: str | list[dict]


def _completion(record: Mapping, key: str, location: str) -> str | list[dict]:
    """A completion: a non-empty string, or messages with an assistant turn."""
    value = record.get(key)
    if isinstance(value, list):
        return validate_messages(value, key, location)
    text = string_field(record, key, location)
    if not text.strip():
        raise DataError(location, "empty completion", f"{key!r} is empty")
    return text


def _prompt(record: Mapping, location: str, conversational: bool) -> str | list[dict]:
    """A prompt of the completions' form: a string (may be empty), or messages."""
    value = record.get("prompt")
    if conversational:
        if not isinstance(value, list):
            raise DataError(location, "mixed forms", f"the completions are messages but 'prompt' is {value!r:.60}")
        return validate_messages(value, "prompt", location, require_assistant=False)
    if isinstance(value, list):
        raise DataError(location, "mixed forms", "'prompt' is messages but the completions are strings")
    return string_field(record, "prompt", location)


def implicit_prompt(chosen: list[dict], rejected: list[dict], location: str) -> tuple[list, list, list]:
    """(prompt, chosen, rejected): the leading messages both conversations share, and the rest of each, as TRL's
    `extract_prompt` splits them (identical conversations keep their last message as the completions)."""
    shared = min(len(chosen), len(rejected))
    split = next((i for i in range(shared) if chosen[i] != rejected[i]), shared - 1)
    if split == 0:
        raise DataError(location, "implicit prompt is not a prefix",
                        "'chosen' and 'rejected' start with different messages, so no prompt is shared; give the "
                        "prompt as 'prompt' or start both conversations with the same prompt messages")
    for key, rest in (("chosen", chosen[split:]), ("rejected", rejected[split:])):
        if not any(message["role"] == "assistant" for message in rest):
            raise DataError(location, "empty completion",
                            f"after the shared prompt (messages[:{split}]) {key!r} has no assistant turn")
    return chosen[:split], chosen[split:], rejected[split:]


def _margin(record: Mapping, location: str) -> float:
    value = record.get("margin")
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise DataError(location, "bad 'margin'", f"'margin' must be a finite number, got {value!r}")
    return float(value)


def _pair_record(record: Mapping, location: str, report: DataReport) -> PreferenceRecord:
    chosen, rejected = _completion(record, "chosen", location), _completion(record, "rejected", location)
    conversational = isinstance(chosen, list)
    if isinstance(rejected, list) != conversational:
        raise DataError(location, "mixed forms", "'chosen' and 'rejected' must both be strings or both messages")
    if conversational and not isinstance(record.get("prompt"), list):
        prompt, chosen, rejected = implicit_prompt(chosen, rejected, location)
    else:
        prompt = _prompt(record, location, conversational)
    if chosen == rejected:
        report.kept[IDENTICAL_PAIRS] += 1
    return PreferenceRecord(location, prompt, chosen, rejected, _margin(record, location))


def _unpaired_record(record: Mapping, location: str) -> UnpairedRecord:
    completion = _completion(record, "completion", location)
    prompt = _prompt(record, location, isinstance(completion, list))
    label = record.get("label")
    if not isinstance(label, bool):
        raise DataError(location, "bad 'label'",
                        f"'label' must be true (desirable) or false (undesirable), got {label!r}")
    return UnpairedRecord(location, prompt, completion, label)


def _completion_record(record: Mapping, location: str) -> CompletionRecord:
    """`prompt` + `completion`; a chat's turns before its last assistant turn + the rest; or `text` alone."""
    if record.get("messages") is not None:
        messages = validate_messages(record["messages"], "messages", location)
        last = max(i for i, message in enumerate(messages) if message["role"] == "assistant")
        return CompletionRecord(location, messages[:last], messages[last:])
    if record.get("completion") is None and record.get("text") is not None:
        return CompletionRecord(location, "", _completion(record, "text", location))
    completion = _completion(record, "completion", location)
    return CompletionRecord(location, _prompt(record, location, isinstance(completion, list)), completion)


def record_kind(path) -> str:
    """The kind of preference data the first readable record of ``path`` is: `pairs` (it has `chosen`), `kto` (a
    `label` beside a `completion`; the reader checks that the label is a boolean), else `completions`. Unreadable
    lines are passed over here: reading the file as that kind reports them, or skips them as asked."""
    _, first = next(iter(read_records(path, on_error=lambda error: None)), (None, None))
    if isinstance(first, Mapping) and "chosen" in first:
        return "pairs"
    if isinstance(first, Mapping) and "label" in first and "completion" in first:
        return "kto"
    return "completions"


def read_preference_records(path, kind: str, *, skip_bad_records: bool = False,
                            report: DataReport | None = None) -> list:
    """The records of one file (`PreferenceRecord` for `pairs`, `UnpairedRecord` for `kto`, `CompletionRecord`
    for `completions`), checked.

    Missing fields, empty completions, mixed string and message forms, an implicit prompt that is not a shared
    prefix, a bad margin or label raise a DataError naming file and line, or with `skip_bad_records` are counted
    in `report`. Identical chosen and rejected are kept and counted there.
    """
    if kind not in KINDS:
        raise ValueError(f"preference data kind {kind!r} is unknown; expected one of {KINDS}")
    report = report if report is not None else DataReport()
    convert = {"pairs": lambda record, location: _pair_record(record, location, report), "kto": _unpaired_record,
               "completions": _completion_record}[kind]
    return convert_records(path, convert, skip_bad_records=skip_bad_records, report=report)


# ----- tokens ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Lengths:
    """How long prompts, completions and sequences may be (see the module's "Length")."""

    max_length: int
    truncation: str = "right"
    max_prompt_length: int | None = None
    max_completion_length: int | None = None

    def __post_init__(self):
        for name in ("max_prompt_length", "max_completion_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1 (or unset), got {value}")


def _common_prefix_length(ids: Sequence[int], other: Sequence[int]) -> int:
    return next((i for i, (a, b) in enumerate(zip(ids, other)) if a != b), min(len(ids), len(other)))


def split_ids(tokenizer, template: str | None, prompt, completions: Sequence) -> tuple[list[int], list[list[int]]]:
    """(prompt ids, one id list per completion) as TRL's `_prepare_dataset` tokenizes a record (module docstring)."""
    if isinstance(prompt, list):
        prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, chat_template=template)
        sequences = [tokenizer.apply_chat_template(prompt + c, chat_template=template) for c in completions]
    else:
        eos = tokenizer.eos_token or ""
        prompt_ids = tokenizer.encode(prompt)
        sequences = tokenizer.encode_batch([prompt + (c if c.endswith(eos) else c + eos) for c in completions])
    start = min(_common_prefix_length(prompt_ids, sequence) for sequence in sequences)
    return prompt_ids[:start], [sequence[start:] for sequence in sequences]


def _sequence(prompt_ids: list[int], completion_ids: list[int], lengths: Lengths,
              source: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, shifted labels) of prompt + completion, cut to `lengths.max_length` (right / left)."""
    ids = np.asarray(prompt_ids + completion_ids, np.int32)
    loss = np.arange(len(ids)) >= len(prompt_ids)
    if len(ids) > lengths.max_length:
        keep = slice(None, lengths.max_length) if lengths.truncation == "right" else slice(-lengths.max_length, None)
        ids, loss = ids[keep], loss[keep]
    labels = np.full(len(ids), IGNORE_INDEX, np.int32)
    labels[:-1] = np.where(loss[1:], ids[1:], IGNORE_INDEX)
    if not (labels != IGNORE_INDEX).any():
        raise DataError(source, "no completion tokens",
                        f"no completion token follows another token ({len(prompt_ids)} prompt, "
                        f"{len(completion_ids)} completion tokens), so none can be scored")
    return ids, labels


def _fitted(prompt_ids: list[int], completions: list[list[int]], lengths: Lengths, source: str,
            report: DataReport) -> tuple[list[int], list[list[int]]] | None:
    """Prompt and completions cut to their own limits, checked against `max_length`; None if dropped (counted)."""
    if lengths.max_prompt_length is not None:
        prompt_ids = prompt_ids[len(prompt_ids) - min(len(prompt_ids), lengths.max_prompt_length):]
    if lengths.max_completion_length is not None:
        completions = [ids[:lengths.max_completion_length] for ids in completions]
    longest = len(prompt_ids) + max(len(ids) for ids in completions)
    if lengths.truncation == "right" and len(prompt_ids) >= lengths.max_length:
        report.drop("prompt fills max_length (dropped)",
                    f"{source}: {len(prompt_ids)} prompt tokens >= max_length {lengths.max_length}")
        return None
    if longest > lengths.max_length and lengths.truncation == "drop":
        report.drop("over-length sample (dropped)", f"{source}: {longest} tokens > max_length {lengths.max_length}")
        return None
    if longest > lengths.max_length and lengths.truncation == "error":
        raise DataError(source, "over-length sample",
                        f"prompt + completion is {longest} tokens > max_length {lengths.max_length}; raise "
                        "data.max_length, set max_prompt_length / max_completion_length, or set data.truncation "
                        "to 'right', 'left' or 'drop'")
    return prompt_ids, completions


def _unit(sequences: list[tuple[np.ndarray, np.ndarray]], source: str, extras: list[dict]) -> Sample:
    """One packing unit of consecutive documents; `extras[i]` holds document i's per-token value of each key."""
    lengths = tuple(len(ids) for ids, _ in sequences)
    stacked = {key: np.concatenate([np.full(n, extra[key]) for n, extra in zip(lengths, extras)])
               for key in extras[0]}
    return Sample(np.concatenate([ids for ids, _ in sequences]), np.concatenate([labels for _, labels in sequences]),
                  source, stacked, lengths)


def _pair_sample(record: PreferenceRecord, tokenizer, template, lengths: Lengths, report: DataReport) -> Sample | None:
    prompt_ids, completions = split_ids(tokenizer, template, record.prompt, [record.chosen, record.rejected])
    fitted = _fitted(prompt_ids, completions, lengths, record.source, report)
    if fitted is None:
        return None
    prompt_ids, completions = fitted
    sequences = [_sequence(prompt_ids, ids, lengths, record.source) for ids in completions]
    return _unit(sequences, record.source, [{"margin": np.float32(record.margin)}, {"margin": np.float32(0.0)}])


def _completion_sample(record: CompletionRecord, tokenizer, template, lengths: Lengths,
                       report: DataReport) -> Sample | None:
    prompt_ids, completions = split_ids(tokenizer, template, record.prompt, [record.completion])
    fitted = _fitted(prompt_ids, completions, lengths, record.source, report)
    if fitted is None:
        return None
    return _unit([_sequence(fitted[0], fitted[1][0], lengths, record.source)], record.source, [{}])


def _guarded(step, skip_bad_records: bool, report: DataReport):
    """`step()`, or with `skip_bad_records` None for a DataError it raises (counted in `report`)."""
    try:
        return step()
    except DataError as err:
        if not skip_bad_records:
            raise
        report.drop_error(err)
        return None


def _kto_samples(records: Sequence[UnpairedRecord], tokenizer, template, lengths: Lengths, batch_size: int,
                 skip_bad_records: bool, report: DataReport) -> list[Sample]:
    """Example + KL-baseline units: KL completions rotate by one within each run of `batch_size` kept records,
    as TRL's `add_kl_completion_ids` maps its (filtered) dataset in batches."""
    kept = []
    for record in records:
        prompt_ids, completions = split_ids(tokenizer, template, record.prompt, [record.completion])
        fitted = _guarded(lambda: _fitted(prompt_ids, completions, lengths, record.source, report),
                          skip_bad_records, report)
        if fitted is not None:
            kept.append((record, fitted[0], fitted[1][0]))
    samples = []
    for start in range(0, len(kept), batch_size):
        chunk = kept[start:start + batch_size]
        for j, (record, prompt_ids, completion_ids) in enumerate(chunk):
            baseline_ids = chunk[j - 1][2]  # j = 0 takes the chunk's last completion
            label = DESIRABLE if record.desirable else UNDESIRABLE
            sample = _guarded(lambda: _unit(
                [_sequence(prompt_ids, completion_ids, lengths, record.source),
                 _sequence(prompt_ids, baseline_ids, lengths, record.source)],
                record.source, [{"kto_label": np.int32(label)}, {"kto_label": np.int32(KL_BASELINE)}]),
                skip_bad_records, report)
            if sample is not None:
                samples.append(sample)
    return samples


def tokenize_preference_records(records: Sequence, tokenizer, template: str | None, lengths: Lengths, *,
                                batch_size: int = 1, skip_bad_records: bool = False,
                                report: DataReport | None = None) -> list[Sample]:
    """Packing units of one file's records (`read_preference_records`): a pair per `PreferenceRecord`, an example
    with its KL baseline per `UnpairedRecord` (`batch_size`: the runs the KL completions rotate within), one
    document per `CompletionRecord`.

    Conversational records need `template` source (`resolve_template`). Over-length records with truncation
    `error`, and records left without a completion token to score, raise a DataError naming their line, or with
    `skip_bad_records` are counted in `report`, as are the records truncation drops.
    """
    report = report if report is not None else DataReport()
    if records and isinstance(records[0], UnpairedRecord):
        samples = _kto_samples(records, tokenizer, template, lengths, batch_size, skip_bad_records, report)
    else:
        sample_of = _completion_sample if records and isinstance(records[0], CompletionRecord) else _pair_sample
        samples = [_guarded(lambda: sample_of(record, tokenizer, template, lengths, report), skip_bad_records,
                            report) for record in records]
        samples = [sample for sample in samples if sample is not None]
    report.kept["tokenized samples"] += len(samples)
    return samples


def preference_samples(config: DataConfig, tokenizer, *, kind: str, max_prompt_length: int | None = None,
                       max_completion_length: int | None = None, process_index: int = 0, process_count: int = 1,
                       vocab_size: int | None = None) -> tuple[list[list[Sample]], DataReport, str | None]:
    """(one list of packing units per file of `config.paths`, in record order; the data report; the chat template
    source, None without conversational records): this process's share of the preference data of `kind`.

    `config.template` renders conversational records (default: the tokenizer's template); `config.format`, `loss`
    and the cleaning settings are SFT's and do not apply. With the model's `vocab_size`, token ids without an
    embedding row are a DataError.
    """
    report = DataReport()
    sources = [read_preference_records(path, kind, skip_bad_records=config.skip_bad_records, report=report)
               for path in config.paths]
    has_chats = any(isinstance(record.prompt, list) for source in sources for record in source)
    template = resolve_template(tokenizer, config.template) if has_chats else None
    lengths = Lengths(config.max_length, config.truncation, max_prompt_length, max_completion_length)
    shards = []
    for source in sources:
        mine = shard_indices(len(source), seed=config.seed, process_index=process_index, process_count=process_count)
        shards.append(tokenize_preference_records(
            [source[i] for i in mine], tokenizer, template, lengths, batch_size=config.batch_size,
            skip_bad_records=config.skip_bad_records, report=report))
        if vocab_size is not None:
            check_token_ids(shards[-1], vocab_size, tokenizer)
    return shards, report, template


def build_preference_iterator(config: DataConfig, tokenizer, *, kind: str, max_prompt_length: int | None = None,
                              max_completion_length: int | None = None, process_index: int = 0,
                              process_count: int = 1, vocab_size: int | None = None) -> DataPipeline:
    """Read, shard, tokenize and pack the preference data of `config.paths` (`kind`: `pairs` or `kto`) for one
    process (:func:`preference_samples`), like `build_task_iterator`: rows of `2 * config.max_length` tokens (see
    the module docstring). Token ids without an embedding row are a DataError before any batch is made."""
    shards, report, template = preference_samples(
        config, tokenizer, kind=kind, max_prompt_length=max_prompt_length, max_completion_length=max_completion_length,
        process_index=process_index, process_count=process_count, vocab_size=vocab_size)
    iterator = PackedIterator(shards, batch_size=config.batch_size, row_length=SEQUENCES_PER_UNIT * config.max_length,
                              packing=config.packing, weights=config.weights, seed=config.seed,
                              pad_id=checked_pad_id(tokenizer, vocab_size), process_index=process_index,
                              process_count=process_count)
    return DataPipeline(iterator, report, template)
