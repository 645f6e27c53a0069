"""jaxft.data.preference: preference records -> token ids -> packed pair rows, against TRL 1.16 as the oracle.

Tokenizer folders are test_tokenizer.py's, built offline (a Llama-3-style ByteLevel BPE with a Llama-3 chat
template, and a Llama-2-style sentencepiece BPE without one, given ChatML here). TRL's own dataset processing is
the oracle for token ids: `DPOTrainer._prepare_dataset` / `KTOTrainer._prepare_dataset` (prompt extraction, EOS,
tokenization, the prompt-fills-max_length filter, KL completions) called on a `datasets.Dataset` of the same
records, and TRL's collators (`DataCollatorForPreference`, `DataCollatorForUnpairedPreference`) for truncation
and completion masks. Neither needs a model: `_prepare_dataset` reads only the tokenizer and the KTO switches.
"""
from __future__ import annotations

import json
import types
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import datasets
from jaxft.config import ConfigError
from jaxft.data import DataConfig, DataError, DataReport
from jaxft.data.chat import CHATML_TEMPLATE, IGNORE_INDEX
from jaxft.data.preference import (IDENTICAL_PAIRS, KL_BASELINE, Lengths, build_preference_iterator,
                                   read_preference_records, tokenize_preference_records)
from jaxft.train.sequences import pairs as sequence_pairs
from jaxft.train.sequences import segment_totals
from test_tokenizer import folders, pairs  # noqa: F401  (fixtures: both tokenizer folders, loaded twice)
from trl.data_utils import maybe_extract_prompt
from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer
from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference, KTOTrainer

PROMPTS = ["the quick brown fox", "hello world llama", "café über naïve 東京", "jumps over a lazy dog " * 3]
ANSWERS = [" jumps over", " a lazy dog token 2024", " 🦙 hello", " world", " the fox and the dog hello world"]


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def _string_pairs() -> list[dict]:
    return [{"prompt": p, "chosen": ANSWERS[i % 5], "rejected": ANSWERS[(i + 2) % 5]} for i, p in enumerate(PROMPTS)]


def _chat_pairs() -> list[dict]:
    records = []
    for i, prompt in enumerate(PROMPTS):
        head = [{"role": "system", "content": "be brief"}] if i % 2 else []
        records.append({"prompt": head + [{"role": "user", "content": prompt}],
                        "chosen": [{"role": "assistant", "content": ANSWERS[i % 5].strip()}],
                        "rejected": [{"role": "assistant", "content": ANSWERS[(i + 1) % 5].strip()}]})
    return records


def _trl_tokenizer(pairs, kind):
    """transformers' tokenizer of `kind` and the chat template both sides use (spm has none: ChatML)."""
    ours, ref = pairs[kind]
    template = ours.chat_template or CHATML_TEMPLATE
    ref.chat_template = template
    return ours, ref, template


def _trl_prepared(trainer, ref, records: list[dict], max_length=None, truncation_mode="keep_start", batch_size=2):
    args = types.SimpleNamespace(dataset_num_proc=None, max_length=max_length, truncation_mode=truncation_mode,
                                 per_device_train_batch_size=batch_size)
    trainer_self = types.SimpleNamespace(_tokenizer=ref, calculate_KL=True, desirable_weight=1.0,
                                         undesirable_weight=1.0)
    return trainer._prepare_dataset(trainer_self, datasets.Dataset.from_list(records), ref, args, "train")


def _documents(sample) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, labels) of each document of a packing unit."""
    bounds = np.cumsum([0, *sample.documents])
    return [(sample.input_ids[a:b], sample.labels[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def _assert_matches_collated(sample, input_ids, completion_mask) -> None:
    """One document against a TRL collator row: the same ids, and a label exactly where the next token is a
    completion token (the shifted convention), naming that token."""
    n = int((input_ids != -1).sum())
    ids, labels = sample
    np.testing.assert_array_equal(ids, input_ids[:n])
    expected = np.where(completion_mask[1:n] == 1, input_ids[1:n], IGNORE_INDEX)
    np.testing.assert_array_equal(labels, np.append(expected, IGNORE_INDEX))


def _samples(tmp_path, tok, records, kind="pairs", template=None, **lengths):
    path = _jsonl(tmp_path / "data.jsonl", records)
    batch_size = lengths.pop("batch_size", 2)
    report = DataReport()
    found = read_preference_records(path, kind, report=report)
    return tokenize_preference_records(found, tok, template, Lengths(**lengths), batch_size=batch_size,
                                       report=report), report


@pytest.mark.parametrize("kind", ["bpe", "spm"])
@pytest.mark.parametrize("form", ["strings", "messages"])
@pytest.mark.parametrize("max_length,mode", [(None, "keep_start"), (9, "keep_start"), (9, "keep_end")])
def test_pairs_are_trls_token_ids_and_completion_masks(pairs, tmp_path, kind, form, max_length, mode):
    ours, ref, template = _trl_tokenizer(pairs, kind)
    records = _string_pairs() if form == "strings" else _chat_pairs()
    if max_length is not None and form == "messages":  # room for the template's headers
        max_length += 25
    truncation = "right" if mode == "keep_start" else "left"
    samples, report = _samples(tmp_path, ours, records, template=template, max_length=max_length or 10_000,
                               truncation=truncation)
    prepared = _trl_prepared(DPOTrainer, ref, records, max_length, mode)
    assert len(samples) == len(prepared)
    assert 0 < len(prepared) and (max_length is None or len(prepared) < len(records) or mode == "keep_end")
    # a prompt that fills max_length: TRL filters it out (keep_start), jaxft counts it
    assert report.dropped["prompt fills max_length (dropped)"] == len(records) - len(prepared)
    collated = DataCollatorForPreference(pad_token_id=-1, max_length=max_length, truncation_mode=mode)(list(prepared))
    ids, mask = collated["input_ids"].numpy(), collated["completion_mask"].numpy()
    for i, sample in enumerate(samples):
        chosen, rejected = _documents(sample)
        _assert_matches_collated(chosen, ids[i], mask[i])
        _assert_matches_collated(rejected, ids[len(samples) + i], mask[len(samples) + i])
        if max_length is None:
            row = prepared[i]
            assert len(chosen[0]) == len(row["prompt_ids"]) + len(row["chosen_ids"])
            assert (chosen[1] != IGNORE_INDEX).sum() == len(row["chosen_ids"])


@pytest.mark.parametrize("kind", ["bpe", "spm"])
def test_implicit_prompts_split_as_maybe_extract_prompt(pairs, tmp_path, kind):
    ours, ref, template = _trl_tokenizer(pairs, kind)
    records = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in _chat_pairs()]
    records.append({"prompt": "ignored, as TRL ignores a string prompt beside conversations",
                    "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"},
                               {"role": "user", "content": "and?"}, {"role": "assistant", "content": "b"}],
                    "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"},
                                 {"role": "user", "content": "and?"}, {"role": "assistant", "content": "c"}]})
    path = _jsonl(tmp_path / "data.jsonl", records)
    for record, ours_record in zip(records, read_preference_records(path, "pairs")):
        expected = maybe_extract_prompt(record)
        assert (ours_record.prompt, ours_record.chosen, ours_record.rejected) == (
            expected["prompt"], expected["chosen"], expected["rejected"])
    samples, _ = _samples(tmp_path, ours, records, template=template, max_length=10_000)
    prepared = _trl_prepared(DPOTrainer, ref, [maybe_extract_prompt(r) for r in records])
    for sample, row in zip(samples, prepared):
        chosen, rejected = _documents(sample)
        assert chosen[0].tolist() == row["prompt_ids"] + row["chosen_ids"]
        assert rejected[0].tolist() == row["prompt_ids"] + row["rejected_ids"]


@pytest.mark.parametrize("kind", ["bpe", "spm"])
@pytest.mark.parametrize("form", ["strings", "messages"])
@pytest.mark.parametrize("max_length", [None, 9])
def test_kto_examples_and_kl_baselines_are_trls(pairs, tmp_path, kind, form, max_length):
    ours, ref, template = _trl_tokenizer(pairs, kind)
    records = [{"prompt": r["prompt"], "completion": r["chosen"], "label": i % 3 != 1}
               for i, r in enumerate((_string_pairs() if form == "strings" else _chat_pairs()) * 2)]
    if max_length is not None and form == "messages":  # room for the template's headers
        max_length += 25
    samples, _ = _samples(tmp_path, ours, records, kind="kto", template=template, max_length=max_length or 10_000,
                          batch_size=3)
    prepared = _trl_prepared(KTOTrainer, ref, records, max_length, batch_size=3)
    assert len(samples) == len(prepared) > 0 and "KL_completion_ids" in prepared.column_names
    assert max_length is None or len(prepared) < len(records)  # the long prompts are dropped before the rotation
    collated = DataCollatorForUnpairedPreference(pad_token_id=-1, max_length=max_length)(list(prepared))
    for i, sample in enumerate(samples):
        example, baseline = _documents(sample)
        _assert_matches_collated(example, collated["input_ids"][i].numpy(), collated["completion_mask"][i].numpy())
        _assert_matches_collated(baseline, collated["KL_input_ids"][i].numpy(),
                                 collated["KL_completion_mask"][i].numpy())
        expected = 1 if prepared[i]["label"] else 2
        np.testing.assert_array_equal(sample.extras["kto_label"],
                                      [expected] * len(example[0]) + [KL_BASELINE] * len(baseline[0]))


def test_prompt_and_completion_limits_keep_the_prompts_end_and_the_completions_start(pairs, tmp_path):
    ours, _ = pairs["bpe"]
    records = _string_pairs()
    full, _ = _samples(tmp_path, ours, records, max_length=10_000)
    cut, _ = _samples(tmp_path, ours, records, max_length=10_000, max_prompt_length=4, max_completion_length=3)
    for whole, short in zip(full, cut):
        for (ids, labels), (cut_ids, cut_labels) in zip(_documents(whole), _documents(short)):
            start = int(np.argmax(labels != IGNORE_INDEX)) + 1  # the first completion token
            prompt, completion = ids[:start], ids[start:]
            np.testing.assert_array_equal(cut_ids, np.concatenate([prompt[-4:], completion[:3]]))
            assert (cut_labels != IGNORE_INDEX).sum() == min(3, len(completion))


def test_prompt_and_completion_limits_must_be_positive():
    with pytest.raises(ConfigError, match="max_completion_length must be >= 1"):
        Lengths(64, max_completion_length=0)


def test_over_length_pairs_drop_with_a_count_or_raise_naming_the_line(pairs, tmp_path):
    ours, _ = pairs["bpe"]
    records = [{"prompt": "hi", "chosen": " yes", "rejected": " no"},
               {"prompt": "hi", "chosen": ANSWERS[4] * 4, "rejected": " no"}]
    samples, report = _samples(tmp_path, ours, records, max_length=16, truncation="drop")
    assert len(samples) == 1 and report.dropped["over-length sample (dropped)"] == 1
    with pytest.raises(DataError, match=r"data\.jsonl:2: over-length sample: prompt \+ completion is \d+ tokens"):
        _samples(tmp_path, ours, records, max_length=16, truncation="error")
    path = _jsonl(tmp_path / "data.jsonl", records)
    report = DataReport()
    kept = tokenize_preference_records(read_preference_records(path, "pairs"), ours, None,
                                       Lengths(16, "error"), skip_bad_records=True, report=report)
    assert len(kept) == 1 and report.dropped["over-length sample"] == 1


BAD_RECORDS = {
    "missing 'chosen'": ({"prompt": "p", "rejected": "r"}, "pairs"),
    "missing 'prompt'": ({"chosen": "c", "rejected": "r"}, "pairs"),
    "empty completion": ({"prompt": "p", "chosen": "  ", "rejected": "r"}, "pairs"),
    "empty assistant turn": ({"prompt": [{"role": "user", "content": "p"}], "chosen": [
        {"role": "assistant", "content": ""}], "rejected": [{"role": "assistant", "content": "r"}]}, "pairs"),
    "mixed forms": ({"prompt": [{"role": "user", "content": "p"}], "chosen": "c", "rejected": "r"}, "pairs"),
    "implicit prompt is not a prefix": ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant",
                                                                                        "content": "c"}],
                                         "rejected": [{"role": "user", "content": "b"},
                                                      {"role": "assistant", "content": "r"}]}, "pairs"),
    "bad 'margin'": ({"prompt": "p", "chosen": "c", "rejected": "r", "margin": "big"}, "pairs"),
    "bad 'label'": ({"prompt": "p", "completion": "c", "label": 1}, "kto"),
    "missing 'completion'": ({"prompt": "p", "label": True}, "kto"),
}


@pytest.mark.parametrize("reason", sorted(BAD_RECORDS))
def test_bad_records_name_file_and_line_or_are_counted(tmp_path, reason):
    bad, kind = BAD_RECORDS[reason]
    good = {"prompt": "p", "chosen": "c", "rejected": "r"} if kind == "pairs" else {"prompt": "p", "completion": "c",
                                                                                   "label": False}
    path = _jsonl(tmp_path / "data.jsonl", [good, bad])
    with pytest.raises(DataError, match=rf"data\.jsonl:2: {reason}"):
        read_preference_records(path, kind)
    report = DataReport()
    assert len(read_preference_records(path, kind, skip_bad_records=True, report=report)) == 1
    assert report.dropped[reason] == 1


def test_identical_chosen_and_rejected_are_kept_and_counted(tmp_path):
    path = _jsonl(tmp_path / "data.jsonl", [{"prompt": "p", "chosen": "same", "rejected": "same"},
                                            {"prompt": "p", "chosen": "c", "rejected": "r"}])
    report = DataReport()
    assert len(read_preference_records(path, "pairs", report=report)) == 2
    assert report.kept[IDENTICAL_PAIRS] == 1 and IDENTICAL_PAIRS in report.summary()


def test_packed_rows_hold_pairs_as_consecutive_segments(pairs, tmp_path):
    ours, _ = pairs["bpe"]
    records = [dict(r, margin=0.5 * i) for i, r in enumerate(_string_pairs() * 3)]
    records += [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in _chat_pairs()]
    path = _jsonl(tmp_path / "data.jsonl", records)
    config = DataConfig(paths=(str(path),), max_length=40, batch_size=2)
    pipeline = build_preference_iterator(config, ours, kind="pairs", vocab_size=ours.vocab_size)
    samples = pipeline.iterator.samples
    expected = sorted((int((d[1] != IGNORE_INDEX).sum()), int((r[1] != IGNORE_INDEX).sum()), float(s.extras[
        "margin"][0])) for s in samples for d, r in [_documents(s)])
    found = []
    for _ in range(pipeline.iterator.batches_per_epoch):
        batch = next(pipeline.iterator)
        assert batch["input_ids"].shape == (2, 80) and batch["margin"].dtype == np.float32
        totals = segment_totals(jnp.asarray(batch["labels"] != IGNORE_INDEX, jnp.int32), batch["segment_ids"])
        margins = segment_totals(jnp.asarray(batch["margin"]), batch["segment_ids"])
        lengths = segment_totals(jnp.ones_like(batch["segment_ids"]), batch["segment_ids"])
        chosen, rejected = sequence_pairs(totals)
        chosen_margin, rejected_margin = sequence_pairs(margins)
        chosen_tokens, _ = sequence_pairs(lengths)
        assert not np.asarray(rejected_margin).any()
        for b in range(2):
            for k in np.flatnonzero(np.asarray(chosen[b])):
                found.append((int(chosen[b, k]), int(rejected[b, k]),
                              round(float(chosen_margin[b, k] / chosen_tokens[b, k]), 5)))
        starts = np.flatnonzero(np.diff(batch["segment_ids"], prepend=0, axis=1) != 0)
        assert (batch["positions"].reshape(-1)[starts] == 0).all()
    assert sorted(found) == expected
    assert pipeline.chat_template == ours.chat_template


def test_kto_iterator_lays_out_labels_and_baselines(pairs, tmp_path):
    ours, _ = pairs["spm"]
    records = [{"prompt": p, "completion": ANSWERS[i], "label": i % 2 == 0} for i, p in enumerate(PROMPTS)]
    config = DataConfig(paths=(str(_jsonl(tmp_path / "data.jsonl", records)),), max_length=32, batch_size=4,
                        packing=False)
    batch = next(build_preference_iterator(config, ours, kind="kto").iterator)
    assert batch["kto_label"].dtype == np.int32 and batch["input_ids"].shape == (4, 64)
    for row_labels, row_segments in zip(batch["kto_label"], batch["segment_ids"]):
        assert set(row_labels[row_segments == 2]) == {KL_BASELINE} and set(row_labels[row_segments == 1]) <= {1, 2}
        assert set(row_labels[row_segments == 0]) <= {0}
