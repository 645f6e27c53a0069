"""Read SFT data files and turn each record into one canonical `Example`.

Supported record formats (auto-detected from the first record of each file, or given):

| format              | keys                                                         |
|---------------------|--------------------------------------------------------------|
| `messages` (OpenAI) | `messages: [{role, content}]`, optional `tools`               |
| `sharegpt`          | `conversations: [{from, value}]`, optional `system`           |
| `alpaca`            | `instruction`, optional `input`, `output`, optional `system`  |
| `prompt_completion` | `prompt`, `completion` (two strings, or two message lists)    |
| `text`              | `text` (continued pretraining: loss on every token)           |

JSON and JSONL files are parsed here, line by line, rather than by `datasets`' pyarrow reader: pyarrow reports
neither the line of a malformed record nor accepts a file where `content` is a string in one message and a list
of parts in another, and it fills absent keys with nulls. CSV, parquet and `save_to_disk` folders go through
`datasets`. Every problem raises `DataError` naming the file, the line (or row) and what is wrong; with
`skip_bad_records` the record is dropped and counted in a `DataReport` instead.
"""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jaxft.errors import JaxftError

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "chatgpt": "assistant", "tool": "tool", "function_response": "tool", "observation": "tool",
}
# The keys that identify each format, most specific first.
_FORMAT_KEYS = (
    ("messages", ("messages",)),
    ("sharegpt", ("conversations",)),
    ("alpaca", ("instruction", "output")),
    ("prompt_completion", ("prompt", "completion")),
    ("text", ("text",)),
)
_FORMAT_HELP = ("'messages' (OpenAI), 'conversations' (ShareGPT), 'instruction'+'output' (Alpaca), "
                "'prompt'+'completion', or 'text'")
_MAX_SAMPLES_PER_REASON = 3


class DataError(JaxftError, ValueError):
    """A record or file is unusable. `reason` is a short category for reports; the message says where and why."""

    def __init__(self, location: str, reason: str, detail: str):
        super().__init__(f"{location}: {reason}: {detail}")
        self.location = location
        self.reason = reason


@dataclass
class DataReport:
    """Counts of what each stage kept and dropped, with a few example messages per drop reason.

    Printed at the start of a run, so that a filter or a broken template cannot silently eat the data.
    """

    kept: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    samples: dict[str, list[str]] = field(default_factory=dict)

    def drop(self, reason: str, detail: str) -> None:
        self.dropped[reason] += 1
        examples = self.samples.setdefault(reason, [])
        if len(examples) < _MAX_SAMPLES_PER_REASON:
            examples.append(detail)

    def drop_error(self, error: DataError) -> None:
        self.drop(error.reason, str(error))

    def summary(self) -> str:
        lines = [f"kept {name}: {count}" for name, count in self.kept.items()]
        for reason, count in self.dropped.most_common():
            lines.append(f"dropped {count} ({reason}), e.g. {self.samples[reason][0]}")
        return "\n".join(lines)


@dataclass(frozen=True, eq=False)
class Example:
    """One training example in canonical form: exactly one of `messages`, (`prompt`, `completion`), `text`.

    `source` ("file:line") travels with the example so that errors found later (tokenizing, masking) still
    point at the record that caused them.
    """

    source: str
    messages: list[dict] | None = None
    tools: list[dict] | None = None
    prompt: str | None = None
    completion: str | None = None
    text: str | None = None

    def plain_text(self) -> str:
        """All human-readable text of the example, for filters and deduplication."""
        if self.messages is not None:
            return "\n".join(m.get("content") or "" for m in self.messages)
        if self.text is not None:
            return self.text
        return f"{self.prompt}\n{self.completion}"


# ----- reading files -----------------------------------------------------------------------------------------------

def _decode_line(raw: bytes, location: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(location, "not UTF-8",
                        f"byte 0x{raw[err.start]:02x} at column {err.start + 1} is not valid UTF-8; "
                        "re-encode the file as UTF-8") from None


def _json_lines(path: Path, data: bytes, on_error) -> Iterator[tuple[str, Any]]:
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        location = f"{path}:{lineno}"
        try:
            line = _decode_line(raw, location).strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(location, "bad JSON", f"{err.msg} at column {err.colno}") from None
        except DataError as err:
            on_error(err)
            continue
        yield location, record


def _raise(error: DataError) -> None:
    raise error


def _json_array(path: Path, data: bytes) -> Iterator[tuple[str, Any]]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line_start = data.rfind(b"\n", 0, err.start) + 1
        line_end = data.find(b"\n", err.start)
        line = data[line_start:] if line_end < 0 else data[line_start:line_end]
        lineno = data.count(b"\n", 0, err.start) + 1
        _decode_line(line, f"{path}:{lineno}")
        raise
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}", "bad JSON", f"{err.msg} at column {err.colno}") from None
    for index, record in enumerate(records):
        yield f"{path}[{index}]", record


def _arrow_rows(dataset, name: str) -> Iterator[tuple[str, Any]]:
    for index, row in enumerate(dataset):
        yield f"{name}:row {index + 1}", row


def _load_with_datasets(path: Path):
    import datasets

    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise DataError(str(path), "no train split", f"splits are {list(loaded)}; save the train split alone")
            loaded = loaded["train"]
        return loaded
    builder = {".csv": "csv", ".parquet": "parquet"}[path.suffix.lower()]
    return datasets.load_dataset(builder, data_files=str(path), split="train")


def record_number(location: str) -> int:
    """The 1-based number of the record at a `read_records` location: its JSONL line, its CSV / parquet / dataset
    row, its place in a JSON array."""
    if location.endswith("]"):
        return int(location[location.rindex("[") + 1:-1]) + 1
    return int(location.rsplit(" ", 1)[-1].rsplit(":", 1)[-1])


def read_records(path: str | Path, on_error=_raise) -> Iterator[tuple[str, Any]]:
    """Yield `(location, record)` for each record of a JSON/JSONL/CSV/parquet file or `save_to_disk` folder.

    `on_error(DataError)` is called for an unreadable JSON line (bad JSON, not UTF-8); unless it raises,
    reading goes on with the next line. Problems with the file as a whole always raise.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(str(path), "missing file", "no such file or folder")
    suffix = path.suffix.lower()
    if path.is_dir() or suffix in (".csv", ".parquet"):
        yield from _arrow_rows(_load_with_datasets(path), str(path))
        return
    if suffix not in (".json", ".jsonl"):
        raise DataError(str(path), "unknown file type", "expected .json, .jsonl, .csv, .parquet or a dataset folder")
    data = path.read_bytes()
    if not data.strip():
        raise DataError(str(path), "empty file", "the file has no records")
    if suffix == ".json" and data.lstrip()[:1] == b"[":
        yield from _json_array(path, data)
    else:
        yield from _json_lines(path, data, on_error)


# ----- formats -----------------------------------------------------------------------------------------------------

def detect_format(record: Mapping) -> str | None:
    """The format whose keys the record has (absent and null values don't count), or None."""
    present = {key for key, value in record.items() if value is not None}
    return next((name for name, keys in _FORMAT_KEYS if set(keys) <= present), None)


def string_field(record: Mapping, key: str, location: str, *, required: bool = True) -> str | None:
    """`record[key]`, a string: a DataError naming `location` when it is absent (unless not `required`) or not a
    string."""
    value = record.get(key)
    if value is None and not required:
        return None
    if value is None:
        raise DataError(location, f"missing {key!r}", f"the record has keys {sorted(record)}")
    if not isinstance(value, str):
        raise DataError(location, "non-string content", f"{key!r} must be a string, got {type(value).__name__}")
    return value


def _content(message: Mapping, where: str, location: str) -> str | None:
    """A message's text: a string, or OpenAI-style text parts joined (templates expect one string)."""
    content = message.get("content")
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise DataError(location, "non-string content",
                                f"{where}.content[{j}] must be a text part {{'type': 'text', 'text': str}}, got "
                                f"{json.dumps(part, default=str)[:80]}")
            texts.append(part["text"])
        return "".join(texts)
    raise DataError(location, "non-string content",
                    f"{where}.content must be a string or a list of text parts, got {type(content).__name__}")


def _turn_role(turn: Any, role_key: str, roles: Sequence[str], where: str, location: str) -> str:
    """A chat turn's role, read from ``turn[role_key]``, which must be one of ``roles`` (for both chat formats)."""
    if not isinstance(turn, Mapping):
        raise DataError(location, "bad message", f"{where} must be an object, got {type(turn).__name__}")
    role = turn.get(role_key)
    if role is None:
        raise DataError(location, "missing role", f"{where} has no {role_key!r} (keys: {sorted(turn)})")
    if role not in roles:
        raise DataError(location, "unknown role", f"{where}.{role_key} is {role!r}; expected one of {list(roles)}")
    return role


def validate_messages(messages: Any, key: str, location: str, *, require_assistant: bool = True) -> list[dict]:
    """Check roles and contents; returns messages with `None` fields removed and text parts joined.

    `require_assistant`: there must be an assistant turn to learn from (not for a preference record's prompt)."""
    if not isinstance(messages, list) or not messages:
        raise DataError(location, f"bad {key!r}", f"expected a non-empty list of messages, got {messages!r:.80}")
    clean = []
    for i, message in enumerate(messages):
        where = f"{key}[{i}]"
        role = _turn_role(message, "role", ROLES, where, location)
        content = _content(message, where, location)
        has_tool_calls = bool(message.get("tool_calls"))
        if content is None and not has_tool_calls:
            raise DataError(location, "non-string content", f"{where} has no 'content'")
        if role == "assistant" and not (content or "").strip() and not has_tool_calls:
            raise DataError(location, "empty assistant turn", f"{where} is an assistant message with no text")
        clean.append({**{k: v for k, v in message.items() if v is not None}, "content": content or ""})
    if require_assistant and not any(m["role"] == "assistant" for m in clean):
        raise DataError(location, "no assistant turn",
                        f"{key} has roles {[m['role'] for m in clean]}; SFT needs an assistant message to learn from")
    return clean


def _from_messages(record: Mapping, location: str) -> Example:
    tools = record.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, Mapping) for t in tools)):
        raise DataError(location, "bad 'tools'", "expected a list of JSON-schema objects")
    return Example(location, messages=validate_messages(record.get("messages"), "messages", location), tools=tools)


def _from_sharegpt(record: Mapping, location: str) -> Example:
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(location, "bad 'conversations'", f"expected a non-empty list, got {turns!r:.80}")
    messages = []
    for i, turn in enumerate(turns):
        speaker = _turn_role(turn, "from", sorted(SHAREGPT_ROLES), f"conversations[{i}]", location)
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": turn.get("value")})
    messages = validate_messages(messages, "conversations", location)  # before the system prompt: indices match
    system = string_field(record, "system", location, required=False)
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return Example(location, messages=messages)


def _from_alpaca(record: Mapping, location: str) -> Example:
    instruction = string_field(record, "instruction", location)
    extra = string_field(record, "input", location, required=False)
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    messages = [{"role": "user", "content": prompt},
                {"role": "assistant", "content": string_field(record, "output", location)}]
    system = string_field(record, "system", location, required=False)
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return Example(location, messages=validate_messages(messages, "alpaca record", location))


def _from_prompt_completion(record: Mapping, location: str) -> Example:
    prompt, completion = record.get("prompt"), record.get("completion")
    if isinstance(prompt, list) and isinstance(completion, list):
        return Example(location, messages=validate_messages(prompt + completion, "prompt+completion", location))
    prompt, completion = string_field(record, "prompt", location), string_field(record, "completion", location)
    if not completion.strip():
        raise DataError(location, "empty assistant turn", "'completion' is empty")
    return Example(location, prompt=prompt, completion=completion)


def _from_text(record: Mapping, location: str) -> Example:
    text = string_field(record, "text", location)
    if not text.strip():
        raise DataError(location, "empty text", "'text' is empty")
    return Example(location, text=text)


CONVERTERS = {"messages": _from_messages, "sharegpt": _from_sharegpt, "alpaca": _from_alpaca,
              "prompt_completion": _from_prompt_completion, "text": _from_text}


def convert_records(path: str | Path, convert, *, skip_bad_records: bool = False,
                    report: DataReport | None = None) -> list:
    """`convert(record, location)` of each record of one file or dataset folder, in order (:func:`iter_converted`)."""
    return list(iter_converted(path, convert, skip_bad_records=skip_bad_records, report=report))


def iter_converted(path: str | Path, convert, *, skip_bad_records: bool = False,
                   report: DataReport | None = None) -> Iterator:
    """`convert(record, location)` of each record of one file or dataset folder, in order, converting no further than
    the caller takes.

    A record that is not an object, or that `convert` rejects with a DataError, raises; with `skip_bad_records`
    it is dropped and counted in `report` instead (unreadable files always raise).
    """
    report = report if report is not None else DataReport()
    kept = 0
    for location, record in read_records(path, report.drop_error if skip_bad_records else _raise):
        try:
            if not isinstance(record, Mapping):
                raise DataError(location, "bad record", f"expected a JSON object, got {type(record).__name__}")
            converted = convert(record, location)
        except DataError as err:
            if not skip_bad_records:
                raise
            report.drop_error(err)
            continue
        kept += 1
        yield converted
    if not kept and not report.dropped:
        raise DataError(str(path), "empty file", "the file has no records")
    report.kept[f"records from {path}"] = kept


def load_examples(path: str | Path, fmt: str = "auto", *, skip_bad_records: bool = False,
                  report: DataReport | None = None) -> list[Example]:
    """All examples of one file or dataset folder (:func:`iter_examples`)."""
    return list(iter_examples(path, fmt, skip_bad_records=skip_bad_records, report=report))


def iter_examples(path: str | Path, fmt: str = "auto", *, skip_bad_records: bool = False,
                  report: DataReport | None = None) -> Iterator[Example]:
    """The examples of one file or dataset folder, in order, reading no further than the caller takes.

    With `fmt="auto"` the first record decides the file's format; a later record of another format is an
    error ("mixed formats"), since silently reading it under the wrong format would train on garbage.
    With `skip_bad_records`, bad records (not unreadable files) are dropped and counted in `report`.
    """
    file_format, first_location = (None, None) if fmt == "auto" else (fmt, None)

    def convert(record: Mapping, location: str) -> Example:
        nonlocal file_format, first_location
        detected = detect_format(record)
        if file_format is None:
            if detected is None:
                raise DataError(location, "unknown format",
                                f"keys {sorted(record)} match no format; expected {_FORMAT_HELP}, "
                                "or set data.format")
            file_format, first_location = detected, location
        elif fmt == "auto" and detected is not None and detected != file_format:
            raise DataError(location, "mixed formats",
                            f"this record is {detected!r} but the file is {file_format!r} (from "
                            f"{first_location}); put each format in its own file")
        return CONVERTERS[file_format](record, location)

    return iter_converted(path, convert, skip_bad_records=skip_bad_records, report=report)
