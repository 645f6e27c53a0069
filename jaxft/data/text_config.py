"""`TextDataConfig`: the data of a pretraining run (``data: {type: text, ...}``): plain documents streamed from
files that need not fit in memory, cleaned, tokenized and packed into fixed-length rows.

Flat scalars and tuples, like :class:`jaxft.data.config.DataConfig` (the chat data of fine-tuning), so one YAML
mapping builds it and unknown keys are refused by name. The stages that read each group of fields:
`jaxft.data.text_sources` (sources), `jaxft.data.text_cleaning` (filters, PII, dedup), `jaxft.data.text_stream`
(rows, mixing, the pre-tokenized store).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from jaxft.config import PATH_FIELD, ConfigError
from jaxft.data.config import check_choice, check_shared_fields

DOCUMENT_UNITS = ("file", "line", "paragraph")
ROW_PACKING = ("concat", "segments")


@dataclass(frozen=True)
class TextDataConfig:
    """Sources, cleaning, and the rows a pretraining run trains on.

    ``paths``: source specs (``jaxft.data.text_sources.expand_source``): a file, a glob (``**`` recursive), a
    folder (its files, sorted), a ``datasets.save_to_disk`` folder, or ``hf:NAME[[:CONFIG]:SPLIT]`` read by
    ``datasets.load_dataset(NAME, CONFIG, split=SPLIT, streaming=True)``. ``weights`` (one per path) set each
    source's share of the rows. ``document``: a plain text file is one document (``file``: held whole, so a very
    large file should use ``line``), one per line, or one per blank-line separated paragraph (streamed).
    JSONL / parquet / dataset records give ``text_field``.

    ``packing``: ``concat`` joins documents (each ending in EOS) into one token stream cut into rows, attention
    crossing document boundaries (GPT-2 / Llama pretraining); ``segments`` gives each document its own segment id
    and positions, so attention stays within it. A document cut at a row's end continues in the next row.
    """

    paths: tuple[str, ...] = field(metadata=PATH_FIELD)
    weights: tuple[float, ...] | None = None
    text_field: str = "text"
    document: str = "file"
    max_length: int = 2048  # tokens per row
    batch_size: int = 8  # rows per process per micro-batch
    packing: str = "concat"
    seed: int = 0
    # Cleaning (jaxft.data.text_cleaning); None turns a filter off.
    normalize_unicode: str | None = "NFC"
    min_chars: int = 1
    max_chars: int | None = None
    max_bad_char_fraction: float | None = 0.1  # replacement / control / private-use characters
    max_symbol_fraction: float | None = None  # '#' and '...' per word (Gopher: 0.1)
    min_alpha_word_fraction: float | None = None  # words with a letter (Gopher: 0.8): non-word sequences
    max_repeated_word_run: int | None = None  # the longest run of one word repeated back to back
    max_duplicate_line_fraction: float | None = None  # lines that repeat an earlier line (Gopher: 0.3)
    drop_patterns: tuple[str, ...] = ()
    scrub_pii: bool = False  # emails, phone numbers and IP addresses replaced by <EMAIL>, <PHONE>, <IP>
    dedup: str | None = "exact"
    near_dup_threshold: float = 0.85
    # A folder of pre-tokenized rows (`jaxft data tokenize`): rows are read from it instead of the sources.
    store: str | None = field(default=None, metadata=PATH_FIELD)

    def __post_init__(self):
        if isinstance(self.paths, str):
            object.__setattr__(self, "paths", (self.paths,))
        if not self.paths:
            raise ConfigError("data.paths is empty; name at least one text/JSONL/parquet file, glob or dataset")
        check_choice("document", self.document, DOCUMENT_UNITS)
        check_choice("packing", self.packing, ROW_PACKING)
        check_shared_fields(self)
        for name in ("max_bad_char_fraction", "max_symbol_fraction", "min_alpha_word_fraction",
                     "max_duplicate_line_fraction"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ConfigError(f"data.{name} must be in [0, 1] (or null: off), got {value}")
        if self.max_repeated_word_run is not None and self.max_repeated_word_run < 1:
            raise ConfigError("data.max_repeated_word_run must be >= 1 (or null: off), got "
                              f"{self.max_repeated_word_run}")

    def replace(self, **changes) -> "TextDataConfig":
        return dataclasses.replace(self, **changes)

