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

:func:`reward_model_scores` scores [prompt | completion] rows with a one-label sequence classifier
(:class:`jaxft.train.pairwise.RewardModel`'s head), without gradient.
"""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import jax
import numpy as np

from jaxft.config import ConfigError, ModelConfig
from jaxft.errors import JaxftError
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

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], records: Sequence[dict],
                 stopped: Sequence[bool], num_tokens: Sequence[int], record_indices: Sequence[int] | None = None
                 ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(total [R] float32, {name: [R] float32}) over R completions; every argument has one entry per completion
        (a prompt's record repeated for each of its completions). ``record_indices``: what an error calls each
        completion's record (its index in the data), default its position in the batch."""
        rows = len(completions)
        if not len(prompts) == len(records) == len(stopped) == len(num_tokens) == rows:
            raise RewardError(f"rewards: expected one prompt, record, stopped flag and token count per completion "
                              f"({rows}), got {len(prompts)}, {len(records)}, {len(stopped)}, {len(num_tokens)}")
        indices = range(rows) if record_indices is None else record_indices
        columns = {name: np.zeros(rows, np.float64) for name in self.names}
        for i in range(rows):
            where = f"record {indices[i]} (completion {completions[i][:200]!r})"
            for fn in self.functions:
                try:
                    value = fn(prompts[i], completions[i], records[i], stopped=bool(stopped[i]),
                               num_tokens=int(num_tokens[i]))
                except Exception as e:
                    raise RewardError(f"reward {fn.name!r} failed on {where}: {type(e).__name__}: {e}") from e
                columns[fn.name][i] = _checked_reward(value, fn.name, where)
        weights = np.ones(len(self.names)) if self.weights is None else np.asarray(self.weights, np.float64)
        total = sum(w * columns[name] for w, name in zip(weights, self.names))
        return total.astype(np.float32), {name: c.astype(np.float32) for name, c in columns.items()}


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
