"""Prompts for online RL (GRPO, PPO): records -> prompt token ids -> batches of prompts, each with its record for
the reward functions.

**Records** (read with `formats.read_records`: JSON/JSONL, CSV, parquet, `save_to_disk` folders; every error names
the file and line or row), as TRL's `GRPOTrainer` datasets:

| record keys  | the prompt                                                   | what the rewards see                  |
|--------------|--------------------------------------------------------------|---------------------------------------|
| `prompt`     | a string, or messages ending in a user (or system/tool) turn  | every other key, e.g. `answer`        |
| `messages`   | the turns before the chat's last assistant turn              | `answer`: that turn's content (unless the record has its own), and every other key |

The second form lets SFT chat data serve as RL prompts with its replies as the answers to check.

**Tokens**, as TRL 1.16's `GRPOTrainer._tokenize_prompts`: messages rendered with the chat template (the
tokenizer's or `data.template`) and the generation prompt; strings encoded as the tokenizer encodes them (special
tokens such as BOS as it adds them). A prompt longer than the task's `max_prompt_length` is dropped and counted in
the data report (`data.truncation: error` raises instead): cutting it would cut its generation prompt or its start.

**Batches** (:class:`PromptIterator`): `batch_size` prompts at a time from this process's share of the records
(`shard_indices`), in an order reshuffled every epoch; a batch may span two epochs, so every batch is full.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from jaxft.config import ConfigError
from jaxft.data.chat import checked_pad_id, resolve_template
from jaxft.data.config import DataConfig
from jaxft.data.formats import DataError, DataReport, convert_records, string_field, validate_messages
from jaxft.data.iterator import DataPipeline, check_state, shard_indices

STATE_VERSION = 1
TOO_LONG = "prompts longer than max_prompt_length"


@dataclass(frozen=True, eq=False)
class PromptRecord:
    """One record: where it came from, its prompt (a string or messages) and what the reward functions see."""

    location: str
    prompt: str | list[dict]
    fields: dict


def _prompt_record(record: Mapping, location: str) -> PromptRecord:
    if "prompt" in record:
        value = record["prompt"]
        if isinstance(value, list):
            prompt = validate_messages(value, "prompt", location, require_assistant=False)
            if prompt[-1]["role"] == "assistant":
                raise DataError(location, "prompt ends with an assistant turn",
                                "an RL prompt is what the policy answers: end it with a user turn")
        else:
            prompt = string_field(record, "prompt", location)
        return PromptRecord(location, prompt, {k: v for k, v in record.items() if k != "prompt"})
    if "messages" in record:
        messages = validate_messages(record["messages"], "messages", location)
        last = max(i for i, message in enumerate(messages) if message["role"] == "assistant")
        if last == 0:
            raise DataError(location, "empty prompt", "the chat's first turn is its last assistant turn, so no "
                            "turn before it can be the prompt")
        fields = {"answer": messages[last]["content"], **{k: v for k, v in record.items() if k != "messages"}}
        return PromptRecord(location, messages[:last], fields)
    raise DataError(location, "no prompt", f"keys {sorted(record)}: an RL prompt record needs 'prompt' (a string or "
                    "messages) or 'messages' (a chat; the turns before its last assistant turn are the prompt)")


def read_prompt_records(path, *, skip_bad_records: bool = False, report: DataReport | None = None
                        ) -> list[PromptRecord]:
    """The prompt records of one file, checked (a DataError names the file and line, or with
    `skip_bad_records` the record is dropped and counted in `report`)."""
    return convert_records(path, _prompt_record, skip_bad_records=skip_bad_records, report=report)


@dataclass(frozen=True, eq=False)
class PromptSample:
    """A prompt's token ids and its record."""

    ids: np.ndarray
    record: PromptRecord


def encode_prompt(tokenizer, template: str | None, prompt: str | list[dict]) -> list[int]:
    """A prompt's token ids (module docstring, "Tokens")."""
    if isinstance(prompt, list):
        return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, chat_template=template))
    return list(tokenizer.encode(prompt))


def tokenize_prompts(records: Sequence[PromptRecord], tokenizer, template: str | None, max_prompt_length: int, *,
                     truncation: str, report: DataReport, vocab_size: int | None = None) -> list[PromptSample]:
    """The records' prompt ids, without the ones longer than `max_prompt_length` (counted in `report`, or a
    DataError with `truncation="error"`); an id without an embedding row is a DataError naming the record."""
    samples = []
    for record in records:
        ids = np.asarray(encode_prompt(tokenizer, template, record.prompt), np.int32)
        if not len(ids):
            raise DataError(record.location, "empty prompt", "the prompt encodes to no token; the policy needs "
                            "something to answer")
        if vocab_size is not None and len(ids) and ids.max() >= vocab_size:
            raise DataError(record.location, "token id beyond the model's vocabulary",
                            f"the prompt holds id {int(ids.max())}, but the model has vocab_size {vocab_size}; "
                            "use the model's own tokenizer")
        if len(ids) > max_prompt_length:
            if truncation == "error":
                raise DataError(record.location, "prompt too long", f"{len(ids)} tokens > max_prompt_length "
                                f"{max_prompt_length}; raise it, or set data.truncation to drop such prompts")
            report.drop(TOO_LONG, f"{record.location}: {len(ids)} tokens")
            continue
        samples.append(PromptSample(ids, record))
    return samples


class PromptIterator:
    """Endless batches of `batch_size` prompts (lists of :class:`PromptSample`) over one process's samples: each
    epoch a new seeded order; a batch that reaches the end of an epoch takes the rest from the next one."""

    def __init__(self, samples: Sequence[PromptSample], *, batch_size: int, seed: int = 0, process_index: int = 0,
                 process_count: int = 1):
        if not samples:
            raise DataError(f"process {process_index} of {process_count}", "no prompts",
                            "no prompt to iterate over (every record was dropped or the share is empty)")
        if batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {batch_size}")
        self.samples, self.batch_size, self.seed = list(samples), batch_size, seed
        self.process_index, self.process_count = process_index, process_count
        self.fingerprint = self._fingerprint()
        self.taken = 0  # prompts handed out so far, over all epochs

    def _fingerprint(self) -> str:
        digest = hashlib.sha1()
        for sample in self.samples:
            digest.update(sample.ids.tobytes() + b"|")
        digest.update(json.dumps([self.batch_size, len(self.samples)]).encode())
        return digest.hexdigest()[:16]

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, self.process_index, epoch]).permutation(len(self.samples))

    def __iter__(self) -> "PromptIterator":
        return self

    def __next__(self) -> list[PromptSample]:
        n, picks = len(self.samples), []
        for i in range(self.taken, self.taken + self.batch_size):
            if i % n == 0 or not picks:  # a new epoch, or the first pick: that epoch's order
                order = self._order(i // n)
            picks.append(self.samples[order[i % n]])
        self.taken += self.batch_size
        return picks

    def get_state(self) -> dict:
        return {"version": STATE_VERSION, "taken": self.taken, "seed": self.seed,
                "process_index": self.process_index, "process_count": self.process_count,
                "fingerprint": self.fingerprint}

    def set_state(self, state: dict) -> None:
        check_state(state, {"version": STATE_VERSION, "seed": self.seed, "process_index": self.process_index,
                            "process_count": self.process_count, "fingerprint": self.fingerprint},
                    "prompt iterator state", "does not match these prompts", "a different file, tokenizer, seed, "
                    "batch size or process layout would not resume at the same prompt")
        self.taken = int(state["taken"])


def build_prompt_iterator(config: DataConfig, tokenizer, *, max_prompt_length: int, process_index: int = 0,
                          process_count: int = 1, vocab_size: int | None = None) -> DataPipeline:
    """Read, shard and tokenize the prompts of `config.paths` for one process: batches of `config.batch_size`
    prompts (`config.format`, `loss`, `packing` and the cleaning settings are SFT's and do not apply)."""
    report = DataReport()
    sources = [read_prompt_records(path, skip_bad_records=config.skip_bad_records, report=report)
               for path in config.paths]
    has_chats = any(isinstance(record.prompt, list) for source in sources for record in source)
    template = resolve_template(tokenizer, config.template) if has_chats else None
    samples = []
    for source in sources:
        mine = shard_indices(len(source), seed=config.seed, process_index=process_index, process_count=process_count)
        samples += tokenize_prompts([source[i] for i in mine], tokenizer, template, max_prompt_length,
                                    truncation=config.truncation, report=report, vocab_size=vocab_size)
    checked_pad_id(tokenizer, vocab_size)
    iterator = PromptIterator(samples, batch_size=config.batch_size, seed=config.seed, process_index=process_index,
                              process_count=process_count)
    return DataPipeline(iterator, report, template)
