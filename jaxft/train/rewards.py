"""Rewards of online RL: Python functions over a completion's text, their weighted combination, and a reward model.

A reward function is any callable with a ``name`` that scores one completion::

    fn(prompt: str, completion: str, record: dict, *, stopped: bool, num_tokens: int) -> float

``completion`` is the decoded text of the completion without its stop token, ``stopped`` whether a stop token ended
it (False: cut at ``max_new_tokens``, the rollout's ``stopped``), ``num_tokens`` its token count with the stop token
(the rollout's mask summed, TRL's ``len(completion_ids)``), ``record`` the data record of its prompt. A function that
needs none of the keywords takes ``**_``, as TRL's reward functions take ``**kwargs``.

:class:`WeightedRewards` runs them over a batch of completions: the weighted total per completion (TRL's
``reward_weights``, default 1 each) and each function's column for the logs. A function that raises, or returns
anything but a finite number, stops the batch with a :class:`RewardError` naming the function, the record and the
value (TRL would turn ``None`` into NaN and skip it: here a silent NaN is a bug in the function).

A function that scores a whole batch at once (a model) has a ``score_batch`` method instead, called once per batch
with every completion's arguments as sequences and ``prompt_sources``, each prompt as its record holds it (a string
or messages), and returning [R] numbers::

    fn.score_batch(prompts, completions, records, *, stopped, num_tokens, prompt_sources) -> np.ndarray

:func:`reward_model_scores` scores [prompt | completion] rows with a one-label sequence classifier
(:class:`jaxft.train.pairwise.RewardModel`'s head), without gradient; :class:`RewardModelScore` is the reward
function of such a model: a reward run's export or a Hugging Face ``*ForSequenceClassification`` folder.
"""
from __future__ import annotations

import functools
import math
import numbers
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import jax
import numpy as np

from jaxft.config import PATH_FIELD, ConfigError, HeadConfig, ModelConfig
from jaxft.data.chat import resolve_template
from jaxft.data.preference import split_ids
from jaxft.errors import JaxftError
from jaxft.hf.checkpoint import from_pretrained
from jaxft.hf.config import config_from_hf, read_json
from jaxft.hf.peft_format import CONFIG_FILE as ADAPTER_CONFIG_FILE
from jaxft.hf.peft_format import adapter_head, load_adapter
from jaxft.hf.tokenizer import load_tokenizer
from jaxft.peft.methods import merge
from jaxft.train.pairwise import RewardModel

REGEX_MODES = ("fullmatch", "search")


class RewardError(JaxftError, ValueError):
    """A reward function failed or gave no finite number for a completion; the message names both and the record."""


@dataclass(frozen=True)
class ExactMatch:
    """1.0 when the completion stopped and its text equals the record's ``answer_key`` field, both stripped of
    surrounding whitespace (the demo task's and ``jaxft eval --exact-match``'s rule), else 0.0. A non-string
    answer (a number in JSON) is compared as ``str(answer)``."""

    answer_key: str = "answer"
    name: str = "exact_match"

    def __call__(self, prompt: str, completion: str, record: dict, *, stopped: bool, **_) -> float:
        if self.answer_key not in record:
            raise RewardError(f"the record has no {self.answer_key!r} field to compare the completion with; it has "
                              f"{sorted(record)}")
        return float(stopped and completion.strip() == str(record[self.answer_key]).strip())


@dataclass(frozen=True)
class RegexFormat:
    """1.0 when the completion's text matches ``pattern``, else 0.0: ``mode`` ``fullmatch`` (the whole text, the
    usual format check) or ``search`` (anywhere in it). ``.`` also matches a newline (``re.DOTALL``), since
    completions span lines; TRL's ``think_format_reward`` is this with its pattern under ``fullmatch``."""

    pattern: str
    mode: str = "fullmatch"
    name: str = "format"

    def __post_init__(self):
        if self.mode not in REGEX_MODES:
            raise ConfigError(f"reward {self.name!r}: mode {self.mode!r} is unknown; expected one of {REGEX_MODES}")
        try:
            re.compile(self.pattern, re.DOTALL)
        except (re.error, TypeError) as e:
            raise ConfigError(f"reward {self.name!r}: pattern {self.pattern!r} is not a regular expression ({e})"
                              ) from None

    def __call__(self, prompt: str, completion: str, record: dict, **_) -> float:
        match = re.fullmatch if self.mode == "fullmatch" else re.search
        return float(match(self.pattern, completion, re.DOTALL) is not None)


@dataclass(frozen=True)
class LengthPenalty:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13; TRL's ``get_soft_overlong_punishment``): 0 up to
    ``max_completion_len - soft_punish_cache`` completion tokens, then falling linearly by 1 / ``soft_punish_cache``
    per token to -1 at ``max_completion_len``, and -1 past it. It never rewards a short completion."""

    max_completion_len: int
    soft_punish_cache: int
    name: str = "length_penalty"

    def __post_init__(self):
        if not 0 <= self.soft_punish_cache <= self.max_completion_len or self.max_completion_len < 1:
            raise ConfigError(f"reward {self.name!r}: needs max_completion_len >= 1 and 0 <= soft_punish_cache <= "
                              f"max_completion_len, got {self.max_completion_len} and {self.soft_punish_cache}")

    def __call__(self, prompt: str, completion: str, record: dict, *, num_tokens: int, **_) -> float:
        target = self.max_completion_len - self.soft_punish_cache
        if num_tokens <= target:
            return 0.0
        if num_tokens <= self.max_completion_len:
            return (target - num_tokens) / self.soft_punish_cache
        return -1.0


def _checked_reward(value, name: str, where: str) -> float:
    """``value`` as a float, or a RewardError: a bool, a non-number, NaN and infinity are refused."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise RewardError(f"reward {name!r} returned {value!r} ({type(value).__name__}) for {where}; a reward is "
                          "a finite int or float")
    if not math.isfinite(value):
        raise RewardError(f"reward {name!r} returned {value!r} for {where}; a reward must be finite")
    return float(value)


@dataclass(frozen=True)
class WeightedRewards:
    """Reward functions combined with ``weights`` (default 1.0 each): the total of a completion is
    Σ_f weight_f · f(completion), as TRL's ``GRPOTrainer`` adds its ``reward_funcs``."""

    functions: tuple[Callable, ...]
    weights: tuple[float, ...] | None = None

    def __post_init__(self):
        names = [getattr(f, "name", None) for f in self.functions]
        if not self.functions or not all(isinstance(n, str) and n for n in names):
            raise ConfigError(f"rewards: expected one or more reward functions, each with a name, got {names}")
        if len(set(names)) != len(names):
            raise ConfigError(f"rewards: the names {names} repeat; each function's column in the logs needs its own")
        weights = self.weights
        if weights is not None and (len(weights) != len(names) or not all(
                isinstance(w, numbers.Real) and not isinstance(w, bool) and math.isfinite(w) for w in weights)):
            raise ConfigError(f"rewards: weights {weights!r} must be {len(names)} finite numbers, one per function "
                              f"{names}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.functions)

    def load(self):
        """Read what the functions read from files (a reward model's weights) now: a run calls this before it
        writes anything, so a folder that does not load fails it at the start, not after the first rollout."""
        for fn in self.functions:
            if hasattr(fn, "load"):
                fn.load()

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], records: Sequence[dict],
                 stopped: Sequence[bool], num_tokens: Sequence[int], record_indices: Sequence[int] | None = None,
                 prompt_sources: Sequence | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(total [R] float32, {name: [R] float32}) over R completions; every argument has one entry per completion
        (a prompt's record repeated for each of its completions). ``record_indices``: what an error calls each
        completion's record (its index in the data), default its position in the batch; ``prompt_sources``: each
        prompt as its record holds it (a string or messages), for the functions with ``score_batch``, default
        ``prompts``."""
        batch = Completions(prompts, completions, records, stopped, num_tokens,
                            prompts if prompt_sources is None else prompt_sources)
        rows = len(completions)
        if not len(prompts) == len(records) == len(stopped) == len(num_tokens) == rows:
            raise RewardError(f"rewards: expected one prompt, record, stopped flag and token count per completion "
                              f"({rows}), got {len(prompts)}, {len(records)}, {len(stopped)}, {len(num_tokens)}")
        if len(batch.prompt_sources) != rows:
            raise RewardError(f"rewards: expected one prompt source per completion ({rows}), got "
                              f"{len(batch.prompt_sources)}")
        indices = range(rows) if record_indices is None else record_indices

        def where(i: int) -> str:
            return f"record {indices[i]} (completion {completions[i][:200]!r})"

        columns = {fn.name: (_batch_column if hasattr(fn, "score_batch") else _row_column)(fn, batch, where)
                   for fn in self.functions}
        weights = np.ones(len(self.names)) if self.weights is None else np.asarray(self.weights, np.float64)
        total = sum(w * columns[name] for w, name in zip(weights, self.names))
        return total.astype(np.float32), {name: c.astype(np.float32) for name, c in columns.items()}


class Completions(NamedTuple):
    """A batch of completions as :class:`WeightedRewards` hands them to its functions: one entry per completion."""

    prompts: Sequence[str]
    completions: Sequence[str]
    records: Sequence[dict]
    stopped: Sequence[bool]
    num_tokens: Sequence[int]
    prompt_sources: Sequence


def _row_column(fn: Callable, batch: Completions, where: Callable[[int], str]) -> np.ndarray:
    """[R] float64: ``fn`` called on each completion, each value checked."""
    column = np.zeros(len(batch.completions), np.float64)
    for i in range(len(column)):
        try:
            value = fn(batch.prompts[i], batch.completions[i], batch.records[i], stopped=bool(batch.stopped[i]),
                       num_tokens=int(batch.num_tokens[i]))
        except Exception as e:
            raise RewardError(f"reward {fn.name!r} failed on {where(i)}: {type(e).__name__}: {e}") from e
        column[i] = _checked_reward(value, fn.name, where(i))
    return column


def _batch_column(fn, batch: Completions, where: Callable[[int], str]) -> np.ndarray:
    """[R] float64: ``fn.score_batch`` over the whole batch, checked as :func:`_row_column` checks each value (the
    first value that is no finite number names its record)."""
    rows = len(batch.completions)
    try:
        values = fn.score_batch(batch.prompts, batch.completions, batch.records, stopped=batch.stopped,
                                num_tokens=batch.num_tokens, prompt_sources=batch.prompt_sources)
    except Exception as e:
        raise RewardError(f"reward {fn.name!r} failed on a batch of {rows} completions, from {where(0)} on: "
                          f"{type(e).__name__}: {e}") from e
    values = np.asarray(values)
    if values.shape != (rows,) or not (np.issubdtype(values.dtype, np.integer)
                                       or np.issubdtype(values.dtype, np.floating)):
        raise RewardError(f"reward {fn.name!r} returned a {values.dtype} array of shape {list(values.shape)} for a "
                          f"batch of {rows} completions, from {where(0)} on; expected [{rows}] numbers, one each")
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        first = int(bad[0])
        raise RewardError(f"reward {fn.name!r} returned {values[first].item()!r} for {where(first)}; a reward must be "
                          "finite")
    return values.astype(np.float64)


def reward_model_scores(cfg: ModelConfig, params: dict, batch: dict, *, batch_size: int) -> jax.Array:
    """[R] float32: a one-label sequence classifier's score of each row of ``batch`` (``input_ids``,
    ``positions``, ``segment_ids`` [R, T]; one document per row, a prompt and its completion, right padded), the
    head at the row's last token as :meth:`RewardModel.document_rewards` and transformers read it. No gradient
    flows into ``params``; ``batch_size`` rows go through the model at a time (jittable; R need not divide)."""
    if batch_size < 1:
        raise ConfigError(f"reward model: batch_size must be >= 1, got {batch_size}")
    params = jax.lax.stop_gradient(params)
    rows = {k: batch[k] for k in ("input_ids", "positions", "segment_ids")}

    def score(row: dict) -> jax.Array:
        one = {k: v[None] for k, v in row.items()}
        return RewardModel.document_rewards(cfg, params, one)[0, 1]   # the row's document is segment 1

    return jax.lax.map(score, rows, batch_size=batch_size)


def is_reward_head(head: HeadConfig | None) -> bool:
    """A reward model's head: sequence classification with one label (TRL's ``RewardTrainer``)."""
    return head is not None and head.kind == "seq_cls" and head.num_labels == 1


class RewardModelFolders(NamedTuple):
    """Where a reward model's parts are (:func:`reward_model_folders`)."""

    model: Path  # the Hugging Face folder whose weights load: the model itself, or the adapter's base
    adapter: Path | None  # a PEFT adapter folder attached to it (a reward run's adapter/ export)
    head: HeadConfig
    tokenizer: Path  # the adapter's own tokenizer when it was saved with one (a run's export is), else the model's


def reward_model_folders(path) -> RewardModelFolders:
    """The parts of the reward model at ``path``: a PEFT adapter folder with a one-label SEQ_CLS head (a ``task:
    reward`` run's ``adapter/`` export, on the base its adapter_config.json names), or a Hugging Face folder of a
    one-label ``*ForSequenceClassification`` (a reward run's ``model/`` export). Reads configs only; a ConfigError
    says what ``path`` holds when it is neither."""
    folder = Path(path)
    expected = ("expected a reward model: a task: reward run's export (output_dir/adapter or output_dir/model) or a "
                "Hugging Face *ForSequenceClassification folder with num_labels 1")
    if not folder.is_dir():
        raise ConfigError(f"{str(path)!r} is no folder; {expected}")
    if (folder / ADAPTER_CONFIG_FILE).is_file():
        head = adapter_head(folder)
        base = read_json(folder / ADAPTER_CONFIG_FILE).get("base_model_name_or_path")
        if not base or not (Path(base) / "config.json").is_file():
            raise ConfigError(f"{folder / ADAPTER_CONFIG_FILE}: its base_model_name_or_path {base!r} is no Hugging "
                              "Face model folder here (no config.json there); the reward adapter loads on that base")
        model, adapter = Path(base), folder
    elif (folder / "config.json").is_file():
        head = config_from_hf(read_json(folder / "config.json"), source=str(folder / "config.json")).head
        model, adapter = folder, None
    else:
        raise ConfigError(f"{folder}: neither {ADAPTER_CONFIG_FILE} nor config.json there; {expected}")
    if not is_reward_head(head):
        has = "no task head (a causal LM)" if head is None else f"a {head.kind} head with {head.num_labels} labels"
        raise ConfigError(f"{folder} holds {has}; {expected}")
    tokenizer = adapter if adapter is not None and (adapter / "tokenizer_config.json").is_file() else model
    return RewardModelFolders(model, adapter, head, tokenizer)


def reward_model_sequence(tokenizer, prompt: str | list[dict], completion: str) -> list[int]:
    """The ids a reward model scores for ``prompt`` + ``completion``, made as its reward run's data were
    (:func:`jaxft.data.preference.split_ids`, TRL's ``RewardTrainer``): a string prompt as ``prompt + completion``
    and the EOS text; a chat prompt (messages) with the completion as its assistant turn, rendered by the
    tokenizer's chat template (the one a reward run on chats exports with its model)."""
    if isinstance(prompt, str):
        prompt_ids, (completion_ids,) = split_ids(tokenizer, None, prompt, [completion])
    else:
        template = resolve_template(tokenizer, None)
        prompt_ids, (completion_ids,) = split_ids(tokenizer, template, prompt,
                                                  [[{"role": "assistant", "content": completion}]])
    return prompt_ids + completion_ids


def score_rows(sequences: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
    """One right-padded row per sequence (``input_ids``, ``positions``, ``segment_ids`` [R, W]), what
    :func:`reward_model_scores` takes; W is the longest sequence rounded up to a power of two (at least 8), so a
    run's batches compile a few widths, not one per length."""
    width = max(8, 1 << (max(map(len, sequences)) - 1).bit_length())
    rows = {k: np.zeros((len(sequences), width), np.int32) for k in ("input_ids", "positions", "segment_ids")}
    for i, ids in enumerate(sequences):
        rows["input_ids"][i, :len(ids)] = ids
        rows["positions"][i, :len(ids)] = np.arange(len(ids))
        rows["segment_ids"][i, :len(ids)] = 1
    return rows


@dataclass(frozen=True)
class RewardModelScore:
    """A reward model's score of each completion (``type: reward_model``): the one-label sequence classifier at
    ``path`` (:func:`reward_model_folders`) reads the prompt and completion as its own tokenizer encodes them
    (:func:`reward_model_sequence`), so it may sit on another base than the policy. Loaded once, on first use, in
    float32, whole on each process's first device (each process scores its own completions), an adapter merged
    into its weights; each batch of completions is scored in one jitted call (``batch_size`` rows per forward
    pass), without gradient. A completion cut at the length limit is scored as its text reads with the turn
    closed (as a finished one): PPO's ``missing_eos_penalty`` or GRPO's ``mask_truncated_completions`` treat
    those apart."""

    path: str = field(metadata=PATH_FIELD)
    name: str = "reward_model"
    batch_size: int = 8

    def __post_init__(self):
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"reward {self.name!r}: batch_size (rows per forward pass) must be an integer >= 1, got "
                              f"{self.batch_size!r}")

    def load(self):
        """Load the model now (else on first use)."""
        self._model

    @functools.cached_property
    def _model(self) -> tuple:
        """(tokenizer, params, jitted scores(params, rows))."""
        folders = reward_model_folders(self.path)
        cfg, params = from_pretrained(folders.model, head=folders.head)
        if folders.adapter is not None:
            params = merge(load_adapter(folders.adapter, params, cfg))
        score = jax.jit(functools.partial(reward_model_scores, cfg, batch_size=self.batch_size))
        return load_tokenizer(folders.tokenizer), params, score

    def score_batch(self, prompts: Sequence[str], completions: Sequence[str], records: Sequence[dict], *,
                    prompt_sources: Sequence, **_) -> np.ndarray:
        tokenizer, params, score = self._model
        sequences = [reward_model_sequence(tokenizer, p, c) for p, c in zip(prompt_sources, completions)]
        return np.asarray(score(params, score_rows(sequences)))
