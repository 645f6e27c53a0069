"""SFT data: files -> canonical examples -> cleaned -> this process's shard -> ids + shifted labels -> packed batches.

`build_iterator(DataConfig(...), tokenizer)` runs the whole pipeline; the stages are usable on their own:
`formats.load_examples`, `cleaning.clean`, `chat.tokenize_examples`, `packing.best_fit_decreasing`,
`iterator.PackedIterator`. Label convention and batch layout: see `jaxft.data.chat` and `jaxft.data.iterator`.
Task-head data (classify, token_classify, qa): `build_task_iterator`, see `jaxft.data.tasks`.
Preference data (reward models, the DPO family, KTO): `build_preference_iterator`, see `jaxft.data.preference`.
"""
from __future__ import annotations

from jaxft.data.chat import (BUILTIN_TEMPLATES, IGNORE_INDEX, Sample, check_token_ids, checked_pad_id,
                             resolve_template, save_chat_template, tokenize_examples)
from jaxft.data.cleaning import clean
from jaxft.data.config import DataConfig
from jaxft.data.formats import DataError, DataReport, Example, load_examples
from jaxft.data.iterator import DataIterator, DataPipeline, PackedIterator, shard_indices
from jaxft.data.mixture import mixture_plan
from jaxft.data.packing import best_fit_decreasing
from jaxft.data.preference import build_preference_iterator, read_preference_records, tokenize_preference_records
from jaxft.data.tasks import (QaExample, QaFeature, TaskSamples, build_task_iterator, read_task_records,
                              tokenize_task_records)

__all__ = ["BUILTIN_TEMPLATES", "DataConfig", "DataError", "DataIterator", "DataPipeline", "DataReport", "Example",
           "IGNORE_INDEX", "PackedIterator", "Sample", "best_fit_decreasing", "build_iterator", "check_token_ids",
           "clean", "load_examples",
           "mixture_plan", "resolve_template", "save_chat_template", "shard_indices", "tokenize_examples",
           "QaExample", "QaFeature", "TaskSamples", "build_task_iterator", "read_task_records", "tokenize_task_records",
           "build_preference_iterator", "read_preference_records", "tokenize_preference_records"]


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
    pad_id = checked_pad_id(tokenizer, vocab_size)
    iterator = PackedIterator(shards, batch_size=config.batch_size, row_length=config.max_length,
                              packing=config.packing, weights=config.weights, seed=config.seed, pad_id=pad_id,
                              process_index=process_index, process_count=process_count)
    return DataPipeline(iterator, report, template)
