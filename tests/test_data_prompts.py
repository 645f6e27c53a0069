"""jaxft.data.prompts: RL prompt records -> prompt ids -> batches of prompts with their records.

The oracle for token ids is transformers' tokenizer as TRL 1.16's `GRPOTrainer._tokenize_prompts` calls it
(`tokenizer(text=prompts)["input_ids"]` for strings, `apply_chat_template(..., add_generation_prompt=True)` for
messages) on test_tokenizer.py's offline tokenizer folders.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jaxft.data import DataConfig, DataError, DataReport
from jaxft.data.chat import CHATML_TEMPLATE
from jaxft.data.prompts import TOO_LONG, PromptIterator, build_prompt_iterator, read_prompt_records, tokenize_prompts
from jaxft.hf.tokenizer import load_tokenizer
from jaxft.recipes import demo
from test_tokenizer import folders, pairs  # noqa: F401  (fixtures: both tokenizer folders, loaded twice)

PROMPTS = ["the quick brown fox", "hello world llama", "café über naïve 東京", "jumps over a lazy dog " * 3]


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def _records(tmp_path) -> Path:
    """Both forms: string prompts with answers, a conversational prompt, and a chat whose reply is the answer."""
    records = [{"prompt": p, "answer": str(i)} for i, p in enumerate(PROMPTS)]
    records.append({"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                    "answer": "hello"})
    records.append({"messages": [{"role": "user", "content": "two and two"}, {"role": "assistant", "content": "four"}],
                    "id": 7})
    return _jsonl(tmp_path / "prompts.jsonl", records)


@pytest.mark.parametrize("kind", ["bpe", "spm"])
def test_prompt_ids_equal_trls_tokenization(pairs, tmp_path, kind):  # noqa: F811
    ours, ref = pairs[kind]
    template = ours.chat_template or CHATML_TEMPLATE
    records = read_prompt_records(_records(tmp_path))
    samples = tokenize_prompts(records, ours, template, 10_000, truncation="right", report=DataReport())
    for sample in samples:
        prompt = sample.record.prompt
        want = (ref.apply_chat_template(prompt, add_generation_prompt=True, chat_template=template, tokenize=True,
                                        return_dict=True)["input_ids"]
                if isinstance(prompt, list) else ref(text=prompt)["input_ids"])
        assert sample.ids.tolist() == list(want), prompt


def test_records_give_the_rewards_their_fields(tmp_path):
    records = read_prompt_records(_records(tmp_path))
    assert records[0].fields == {"answer": "0"} and records[0].prompt == PROMPTS[0]
    assert records[4].prompt[-1] == {"role": "user", "content": "hi"} and records[4].fields == {"answer": "hello"}
    chat = records[5]
    assert chat.prompt == [{"role": "user", "content": "two and two"}]
    assert chat.fields == {"answer": "four", "id": 7}
    own = read_prompt_records(_jsonl(tmp_path / "own.jsonl", [{"messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "answer": "mine"}]))
    assert own[0].fields["answer"] == "mine"  # the record's own answer wins over the reply


@pytest.mark.parametrize("record, reason", [
    ({"text": "no prompt here"}, "no prompt"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "prompt ends with an assistant turn"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "empty prompt"),
    ({"prompt": 3}, "prompt"),
])
def test_bad_records_name_file_and_line(tmp_path, record, reason):
    path = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine"}, record])
    with pytest.raises(DataError) as err:
        read_prompt_records(path)
    assert f"{path}:2" in str(err.value) and reason in str(err.value)
    report = DataReport()
    assert len(read_prompt_records(path, skip_bad_records=True, report=report)) == 1 and report.dropped


def test_long_prompts_are_dropped_and_counted_or_refused(pairs, tmp_path):  # noqa: F811
    ours, _ = pairs["bpe"]
    records = read_prompt_records(_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in PROMPTS]))
    lengths = [len(ours.encode(p)) for p in PROMPTS]
    limit = sorted(lengths)[1]
    report = DataReport()
    kept = tokenize_prompts(records, ours, None, limit, truncation="right", report=report)
    assert [len(s.ids) for s in kept] == [n for n in lengths if n <= limit]
    assert report.dropped[TOO_LONG] == sum(n > limit for n in lengths)
    with pytest.raises(DataError, match="max_prompt_length"):
        tokenize_prompts(records, ours, None, limit, truncation="error", report=DataReport())
    (tmp_path / "words").mkdir()
    demo.build_tokenizer(tmp_path / "words", ["one two three"])  # a word-level tokenizer that adds no BOS
    empty = read_prompt_records(_jsonl(tmp_path / "e.jsonl", [{"prompt": ""}]))
    with pytest.raises(DataError, match=f"{tmp_path / 'e.jsonl'}:1.*empty prompt"):
        tokenize_prompts(empty, load_tokenizer(tmp_path / "words"), None, 10, truncation="right", report=DataReport())
    with pytest.raises(DataError, match="vocab_size"):
        tokenize_prompts(records, ours, None, 10_000, truncation="right", report=DataReport(), vocab_size=5)


def _fake_samples(n: int):
    records = [type("R", (), {"location": f"r{i}"})() for i in range(n)]
    return [type("S", (), {"ids": np.array([i, i + 1], np.int32), "record": r})() for i, r in enumerate(records)]


def test_iterator_covers_each_epoch_and_resumes_exactly():
    samples = _fake_samples(7)
    it = PromptIterator(samples, batch_size=3, seed=5)
    batches = [[s.record.location for s in next(it)] for _ in range(7)]  # 21 prompts: 3 epochs of 7
    flat = [x for b in batches for x in b]
    for epoch in range(3):
        assert sorted(flat[epoch * 7:(epoch + 1) * 7]) == sorted(f"r{i}" for i in range(7))
    assert flat[:7] != flat[7:14]  # reshuffled each epoch
    again = PromptIterator(samples, batch_size=3, seed=5)
    next(again), next(again)
    state = json.loads(json.dumps(again.get_state()))
    resumed = PromptIterator(samples, batch_size=3, seed=5)
    resumed.set_state(state)
    assert [[s.record.location for s in next(resumed)] for _ in range(5)] == batches[2:]
    with pytest.raises(DataError, match="seed: checkpoint 5 vs now 6"):
        PromptIterator(samples, batch_size=3, seed=6).set_state(state)


def test_processes_share_the_prompts(pairs, folders, tmp_path):  # noqa: F811
    ours, _ = pairs["bpe"]
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": f"{p} {i}"} for i in range(5) for p in PROMPTS])
    config = DataConfig(paths=(str(path),), batch_size=2)
    shares = [build_prompt_iterator(config, ours, max_prompt_length=10_000, process_index=i, process_count=2)
              for i in range(2)]
    seen = [{s.record.location for s in share.iterator.samples} for share in shares]
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 20
    batch = next(shares[0].iterator)
    assert len(batch) == 2 and shares[0].chat_template is None and shares[0].report.kept
