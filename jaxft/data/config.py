"""`DataConfig`: everything that decides which tokens a supervised fine-tuning run sees.

The fields are flat scalars and tuples (no nested dataclasses) so that `jaxft.config.from_dict` can build it
from one YAML mapping and reject unknown keys by name.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from jaxft.config import PATH_FIELD, TEMPLATE_FIELD, ConfigError

FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text")
LOSS_STRATEGIES = ("all_assistant", "last_assistant", "per_assistant_turn")
TRUNCATION = ("right", "left", "drop", "error")
NORMALIZATIONS = ("NFC", "NFKC", "NFD", "NFKD")
DEDUP = ("exact", "near")


@dataclass(frozen=True)
class DataConfig:
    """One SFT data pipeline: sources, template, loss mask, batch shape, mixing, cleaning and iteration order.

    `paths` are local JSON/JSONL/CSV/parquet files or `datasets.save_to_disk` folders; `weights` (one per path)
    set the share of each source in every epoch, counted in examples. `template` is `None` (the tokenizer's
    own), a built-in name (`jaxft.data.chat.BUILTIN_TEMPLATES`), a `.jinja` path, or Jinja source.
    `truncation` says what happens to an example longer than `max_length`: keep its first (`right`) or last
    (`left`) tokens, `drop` it, or raise (`error`).
    """

    paths: tuple[str, ...] = field(metadata=PATH_FIELD)
    format: str = "auto"
    template: str | None = field(default=None, metadata=TEMPLATE_FIELD)
    loss: str = "all_assistant"
    train_on_inputs: bool = False
    max_length: int = 2048
    truncation: str = "right"
    packing: bool = True
    batch_size: int = 8
    seed: int = 0
    weights: tuple[float, ...] | None = None
    skip_bad_records: bool = False
    # Cleaning; see jaxft.data.cleaning.clean.
    normalize_unicode: str | None = "NFC"
    dedup: str | None = "exact"
    near_dup_threshold: float = 0.85
    min_chars: int = 1
    max_chars: int | None = None
    max_bad_char_fraction: float = 0.1
    drop_patterns: tuple[str, ...] = ()

    def __post_init__(self):
        if isinstance(self.paths, str):
            object.__setattr__(self, "paths", (self.paths,))
        if not self.paths:
            raise ConfigError("data.paths is empty; name at least one JSON/JSONL/CSV/parquet file or dataset folder")
        check_choice("format", self.format, FORMATS)
        check_choice("loss", self.loss, LOSS_STRATEGIES)
        check_choice("truncation", self.truncation, TRUNCATION)
        check_shared_fields(self)
        if not 0.0 <= self.max_bad_char_fraction <= 1.0:
            raise ConfigError(f"data.max_bad_char_fraction must be in [0, 1], got {self.max_bad_char_fraction}")

    def replace(self, **changes) -> "DataConfig":
        return dataclasses.replace(self, **changes)


def check_choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"data.{name} is {value!r}; expected one of {list(allowed)}")


def check_shared_fields(cfg) -> None:
    """The checks of the fields a chat data section and a text data section share (cleaning, rows, mixing)."""
    if cfg.normalize_unicode is not None:
        check_choice("normalize_unicode", cfg.normalize_unicode, NORMALIZATIONS)
    if cfg.dedup is not None:
        check_choice("dedup", cfg.dedup, DEDUP)
    if cfg.max_length < 2:
        raise ConfigError(f"data.max_length must be >= 2 (one input and one target), got {cfg.max_length}")
    if cfg.batch_size < 1:
        raise ConfigError(f"data.batch_size must be >= 1, got {cfg.batch_size}")
    check_weights(cfg.weights, cfg.paths)
    compile_drop_patterns(cfg.drop_patterns)
    if not 0.0 < cfg.near_dup_threshold <= 1.0:
        raise ConfigError(f"data.near_dup_threshold must be in (0, 1], got {cfg.near_dup_threshold}")


def compile_drop_patterns(patterns) -> list[re.Pattern]:
    """``data.drop_patterns`` compiled; one that is no regular expression is a ConfigError naming its index."""
    compiled = []
    for i, pattern in enumerate(patterns):
        try:
            compiled.append(re.compile(pattern))
        except re.error as e:
            raise ConfigError(f"data.drop_patterns[{i}] {pattern!r} is not a regular expression: {e}") from e
    return compiled


def check_weights(weights: tuple[float, ...] | None, paths: tuple[str, ...]) -> None:
    """Mixture weights, when given: one per path, none negative, some positive."""
    if weights is None:
        return
    if len(weights) != len(paths):
        raise ConfigError(f"data.weights has {len(weights)} entries for {len(paths)} paths")
    if any(w < 0 for w in weights) or not any(w > 0 for w in weights):
        raise ConfigError(f"data.weights must be >= 0 with at least one > 0, got {list(weights)}")
