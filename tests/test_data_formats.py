"""Loading every supported format from every file type, the end-to-end pipeline, and malformed inputs.

Each malformed input must raise `DataError` naming the file, the line (or record) and the problem.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from jaxft.data import DataConfig, DataError, DataReport, build_iterator, load_examples
from jaxft.data.chat import IGNORE_INDEX as IGNORE
from jaxft.hf.tokenizer import load_tokenizer
from test_data_chat import build_tokenizer_folders

CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "world"}]
CANONICAL = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
             {"role": "assistant", "content": "world"}]


def _jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    return load_tokenizer(build_tokenizer_folders(tmp_path_factory.mktemp("fmt_tok"))["llama3"])


# ----- formats -----------------------------------------------------------------------------------------------------

RECORDS = {
    "messages": {"messages": CHAT},
    "messages_parts": {"messages": [{**m, "content": [{"type": "text", "text": m["content"][:2]},
                                                      {"type": "text", "text": m["content"][2:]}]} for m in CHAT]},
    "sharegpt": {"system": "be brief", "conversations": [{"from": "human", "value": "hello"},
                                                         {"from": "gpt", "value": "world"}]},
    "alpaca": {"system": "be brief", "instruction": "hello", "input": "", "output": "world"},
    "prompt_completion_messages": {"prompt": CHAT[:2], "completion": CHAT[2:]},
}


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_chat_formats_load_as_the_same_canonical_messages(tmp_path, name):
    example, = load_examples(_jsonl(tmp_path / "d.jsonl", [RECORDS[name]]))
    assert example.messages == CANONICAL and example.source == f"{tmp_path / 'd.jsonl'}:1"


def test_alpaca_input_is_appended_to_the_instruction(tmp_path):
    example, = load_examples(_jsonl(tmp_path / "a.jsonl", [{"instruction": "sum", "input": "2 2", "output": "4"}]))
    assert example.messages[0] == {"role": "user", "content": "sum\n\n2 2"}


def test_prompt_completion_strings_and_text_load_as_plain_text(tmp_path):
    pc, = load_examples(_jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2=", "completion": "4"}]))
    text, = load_examples(_jsonl(tmp_path / "t.jsonl", [{"text": "plain words"}]))
    assert (pc.prompt, pc.completion, text.text) == ("2+2=", "4", "plain words")


@pytest.mark.parametrize("kind", ["json", "csv", "parquet", "saved"])
def test_json_csv_parquet_and_saved_datasets_load_alike(tmp_path, kind):
    import datasets

    records = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(3)]
    if kind == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(records))
    else:
        ds = datasets.Dataset.from_list(records)
        path = tmp_path / ("saved" if kind == "saved" else f"d.{kind}")
        {"csv": ds.to_csv, "parquet": ds.to_parquet, "saved": ds.save_to_disk}[kind](str(path))
    examples = load_examples(path)
    assert [e.messages[1]["content"] for e in examples] == ["a0", "a1", "a2"]


def test_format_can_be_given_instead_of_detected(tmp_path):
    example, = load_examples(_jsonl(tmp_path / "d.jsonl", [{"text": "x", "messages": CHAT}]), "text")
    assert example.text == "x"


# ----- malformed inputs --------------------------------------------------------------------------------------------

def _bad(tmp_path, lines: list, match: str, name: str = "bad.jsonl", **kwargs):
    path = tmp_path / name
    path.write_bytes(b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n"
                              for line in lines))
    with pytest.raises(DataError, match=match):
        load_examples(path, **kwargs)


def test_bad_json_line_names_file_line_and_column(tmp_path):
    _bad(tmp_path, [{"messages": CHAT}, b'{"messages": [}'], r"bad\.jsonl:2: bad JSON: .* at column 15")


def test_missing_role(tmp_path):
    _bad(tmp_path, [{"messages": [{"content": "hi"}, CHAT[2]]}], r"bad\.jsonl:1: missing role: messages\[0\]")


def test_unknown_role(tmp_path):
    _bad(tmp_path, [{"messages": [{"role": "bot", "content": "hi"}]}],
         r":1: unknown role: messages\[0\]\.role is 'bot'; expected one of")


def test_unknown_sharegpt_speaker(tmp_path):
    _bad(tmp_path, [{"conversations": [{"from": "robot", "value": "hi"}]}], r"unknown role: conversations\[0\]\.from")


def test_empty_assistant_turn(tmp_path):
    _bad(tmp_path, [{"messages": [CHAT[1], {"role": "assistant", "content": "  "}]}],
         r":1: empty assistant turn: messages\[1\]")


def test_non_string_content(tmp_path):
    _bad(tmp_path, [{"messages": [CHAT[1], {"role": "assistant", "content": 42}]}],
         r"non-string content: messages\[1\]\.content must be a string or a list of text parts, got int")


def test_non_text_content_part(tmp_path):
    _bad(tmp_path, [{"messages": [{"role": "user", "content": [{"type": "image", "url": "x"}]}, CHAT[2]]}],
         r"non-string content: messages\[0\]\.content\[0\] must be a text part")


def test_no_assistant_turn(tmp_path):
    _bad(tmp_path, [{"messages": CHAT[:2]}], r":1: no assistant turn: messages has roles \['system', 'user'\]")


def test_unknown_format(tmp_path):
    _bad(tmp_path, [{"question": "q", "answer": "a"}],
         r":1: unknown format: keys \['answer', 'question'\] match no format.*data\.format")


def test_mixed_formats(tmp_path):
    _bad(tmp_path, [{"messages": CHAT}, {"text": "x"}, {"messages": CHAT}],
         r"bad\.jsonl:2: mixed formats: this record is 'text' but the file is 'messages' \(from .*bad\.jsonl:1\)")


def test_empty_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: empty file"):
        load_examples(tmp_path / "empty.jsonl")


def test_non_utf8_bytes(tmp_path):
    _bad(tmp_path, [{"messages": CHAT}, b'{"text": "caf\xe9"}'], r"bad\.jsonl:2: not UTF-8: byte 0xe9 at column 14")


def test_record_that_is_not_an_object(tmp_path):
    _bad(tmp_path, [[1, 2]], r":1: bad record: expected a JSON object, got list")


def test_missing_alpaca_output(tmp_path):
    _bad(tmp_path, [{"instruction": "q", "output": "a"}, {"instruction": "q", "outptu": "a"}],
         r":2: missing 'output'")


def test_unknown_file_type(tmp_path):
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(DataError, match=r"d\.txt: unknown file type"):
        load_examples(tmp_path / "d.txt")


def test_bad_records_are_skipped_and_counted_when_asked(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join([json.dumps({"messages": CHAT}).encode(), b"{oops", b'{"text": "\xff"}',
                                 json.dumps({"messages": CHAT[:2]}).encode(), json.dumps({"messages": CHAT}).encode()]))
    report = DataReport()
    examples = load_examples(path, skip_bad_records=True, report=report)
    assert len(examples) == 2
    assert dict(report.dropped) == {"bad JSON": 1, "not UTF-8": 1, "no assistant turn": 1}


def test_over_length_sample_is_an_error_when_truncation_is_error(tmp_path, llama3):
    path = _jsonl(tmp_path / "long.jsonl", [{"messages": [CHAT[1], {"role": "assistant", "content": "word " * 50}]}])
    config = DataConfig(paths=(path,), template="llama3", max_length=16, truncation="error")
    with pytest.raises(DataError, match=r"long\.jsonl:1: over-length sample: \d+ tokens > max_length 16"):
        build_iterator(config, llama3)


def test_template_that_rewrites_history_is_an_error_naming_the_record(tmp_path, llama3):
    rewriting = ("{% for m in messages %}{% if loop.last %}{{ m['role'] + ': ' + m['content'] + '\n' }}"
                 "{% else %}{{ m['role'] + ': ' + m['content'][:3] + '\n' }}{% endif %}{% endfor %}")
    path = _jsonl(tmp_path / "c.jsonl", [{"messages": CHAT[1:] + [CHAT[1], CHAT[2]]}])
    with pytest.raises(DataError, match=r"c\.jsonl:1: template rewrites history"):
        build_iterator(DataConfig(paths=(path,), template=rewriting), llama3)


# ----- the pipeline ------------------------------------------------------------------------------------------------

def _chats(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"question {i} " + "hello " * (i % 7)},
                          {"role": "assistant", "content": f"answer {i} " + "world " * (i % 5)}]} for i in range(n)]


def test_pipeline_targets_are_exactly_the_assistant_tokens(tmp_path, llama3):
    path = _jsonl(tmp_path / "chats.jsonl", _chats(30))
    pipeline = build_iterator(DataConfig(paths=(path,), template="llama3", max_length=128, batch_size=4), llama3)
    batches = [next(pipeline.iterator) for _ in range(pipeline.iterator.batches_per_epoch)]
    targets = np.concatenate([b["labels"][b["labels"] != IGNORE] for b in batches])
    text = llama3.decode(targets.tolist())
    assert text.count("<|eot_id|>") == 30 and "question" not in text and text.count("answer") == 30


def test_pipeline_report_names_what_was_dropped(tmp_path, llama3):
    records = _chats(5) + _chats(2) + [{"messages": [{"role": "user", "content": "x"}]}]
    path = _jsonl(tmp_path / "dups.jsonl", records)
    pipeline = build_iterator(DataConfig(paths=(path,), template="llama3", max_length=128, skip_bad_records=True),
                              llama3)
    assert dict(pipeline.report.dropped) == {"exact duplicate": 2, "no assistant turn": 1}
    summary = pipeline.report.summary()
    assert "dups.jsonl:6: duplicate of" in summary and "dups.jsonl:8: no assistant turn" in summary


def test_processes_tokenize_disjoint_shards(tmp_path, llama3):
    path = _jsonl(tmp_path / "chats.jsonl", _chats(21))
    config = DataConfig(paths=(path,), template="llama3", max_length=128)
    shards = [{s.source for s in build_iterator(config, llama3, process_index=p, process_count=3).iterator.samples}
              for p in range(3)]
    assert set.union(*shards) == {f"{path}:{i}" for i in range(1, 22)} and sum(map(len, shards)) == 21


def test_pipeline_returns_the_template_it_used(tmp_path, llama3):
    from jaxft.data import BUILTIN_TEMPLATES
    path = _jsonl(tmp_path / "chats.jsonl", _chats(3))
    assert build_iterator(DataConfig(paths=(path,), template="chatml"), llama3).chat_template == \
        BUILTIN_TEMPLATES["chatml"]


def test_mixture_weights_select_sources_in_the_pipeline(tmp_path, llama3):
    general = _jsonl(tmp_path / "general.jsonl", _chats(10))
    domain = _jsonl(tmp_path / "domain.jsonl", [{"messages": [{"role": "user", "content": f"llama {i}"},
                                                              {"role": "assistant", "content": f"alpaca {i}"}]}
                                                for i in range(10)])
    config = DataConfig(paths=(general, domain), template="llama3", max_length=64, weights=(0.0, 1.0))
    iterator = build_iterator(config, llama3).iterator
    batches = [next(iterator) for _ in range(iterator.batches_per_epoch)]
    text = "".join(llama3.decode(b["input_ids"][b["segment_ids"] > 0].tolist()) for b in batches)
    assert "alpaca" in text and "answer" not in text and iterator.epoch_stats["samples"] == 20


def test_data_config_names_a_bad_choice():
    from jaxft.config import ConfigError
    with pytest.raises(ConfigError, match=r"data\.loss is 'assistant'; expected one of"):
        DataConfig(paths=("x.jsonl",), loss="assistant")


def test_data_config_needs_one_weight_per_path():
    from jaxft.config import ConfigError
    with pytest.raises(ConfigError, match="data.weights has 1 entries for 2 paths"):
        DataConfig(paths=("a.jsonl", "b.jsonl"), weights=(1.0,))


def test_data_config_builds_from_a_yaml_mapping_and_rejects_unknown_keys():
    from jaxft.config import ConfigError, from_dict
    config = from_dict(DataConfig, {"paths": ["a.jsonl"], "weights": [1], "drop_patterns": ["x"]}, source="run.yaml")
    assert config.paths == ("a.jsonl",) and config.weights == (1,)
    with pytest.raises(ConfigError, match=r"run\.yaml: unknown key\(s\) \['pack'\]"):
        from_dict(DataConfig, {"paths": ["a.jsonl"], "pack": True}, source="run.yaml")
