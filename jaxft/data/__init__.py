"""SFT data: files -> canonical examples -> cleaned -> this process's shard -> ids + shifted labels -> packed batches.

`build_iterator(DataConfig(...), tokenizer)` runs the whole pipeline; the stages are usable on their own:
`formats.load_examples`, `cleaning.clean`, `chat.tokenize_examples`, `packing.best_fit_decreasing`,
`iterator.PackedIterator`. Label convention and batch layout: see `jaxft.data.chat` and `jaxft.data.iterator`.
"""
from __future__ import annotations

from typing import NamedTuple

from jaxft.data.chat import (BUILTIN_TEMPLATES, IGNORE_INDEX, Sample, check_token_ids, resolve_template,
                             save_chat_template, tokenize_examples)
from jaxft.data.cleaning import clean
from jaxft.data.config import DataConfig
from jaxft.data.formats import DataError, DataReport, Example, load_examples
from jaxft.data.iterator import DataIterator, PackedIterator, shard_indices
from jaxft.data.mixture import mixture_plan
from jaxft.data.packing import best_fit_decreasing

__all__ = ["BUILTIN_TEMPLATES", "DataConfig", "DataError", "DataIterator", "DataPipeline", "DataReport", "Example",
           "IGNORE_INDEX", "PackedIterator", "Sample", "best_fit_decreasing", "build_iterator", "check_token_ids",
           "clean", "load_examples",
           "mixture_plan", "resolve_template", "save_chat_template", "shard_indices", "tokenize_examples"]


class DataPipeline(NamedTuple):
    """What a run needs from its data: the batches, the report of what was dropped, and the chat template
    used (None for non-chat data), to save with the run and export with the adapter."""

    iterator: PackedIterator
    report: DataReport
    chat_template: str | None


def build_iterator(config: DataConfig, tokenizer, *, process_index: int = 0, process_count: int = 1,
                   vocab_size: int | None = None) -> DataPipeline:
    """Load, clean, shard, tokenize and batch the data described by `config` for one process.

    Loading and cleaning see every record (they are cheap and must agree across processes); tokenizing, the
    expensive step, only sees this process's shard. With the model's `vocab_size`, a token id (or pad id) without
    an embedding row is a `DataError` here, before any batch is made (`check_token_ids`).
    """
    report = DataReport()
    sources = [load_examples(path, config.format, skip_bad_records=config.skip_bad_records, report=report)
               for path in config.paths]
    sources = clean(sources, normalize_unicode=config.normalize_unicode, dedup=config.dedup,
                    near_dup_threshold=config.near_dup_threshold, min_chars=config.min_chars,
                    max_chars=config.max_chars, max_bad_char_fraction=config.max_bad_char_fraction,
                    drop_patterns=config.drop_patterns, report=report)
    has_chats = any(e.messages is not None for source in sources for e in source)
    template = resolve_template(tokenizer, config.template) if has_chats else None
    shards = []
    for source in sources:
        mine = shard_indices(len(source), seed=config.seed, process_index=process_index, process_count=process_count)
        shards.append(tokenize_examples(
            [source[i] for i in mine], tokenizer, template, loss=config.loss, train_on_inputs=config.train_on_inputs,
            max_length=config.max_length, truncation=config.truncation, skip_bad_records=config.skip_bad_records,
            report=report))
        if vocab_size is not None:
            check_token_ids(shards[-1], vocab_size, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if vocab_size is not None and pad_id >= vocab_size:
        raise DataError(f"the tokenizer's pad token {tokenizer.pad_token!r}", "pad id beyond the model's vocabulary",
                        f"id {pad_id} has no embedding row (the model's config.json says vocab_size {vocab_size}); "
                        "padding would embed as NaN. Use the model's own tokenizer, or resize the embeddings to "
                        "the tokenizer first (transformers: model.resize_token_embeddings(len(tokenizer)))")
    iterator = PackedIterator(shards, batch_size=config.batch_size, row_length=config.max_length,
                              packing=config.packing, weights=config.weights, seed=config.seed, pad_id=pad_id,
                              process_index=process_index, process_count=process_count)
    return DataPipeline(iterator, report, template)
