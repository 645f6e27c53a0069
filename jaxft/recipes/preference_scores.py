"""``jaxft eval`` on preference data: the metrics of a preference objective (reward, dpo, orpo, simpo, kto) over one
pass of data files, and the scores of every record (``--scores``): a reward model's reward r of a pair's chosen and
rejected completions or of one completion, a DPO policy's implicit reward β · log-ratio (TRL's ``rewards/*``).

Every record is a row of its own (a pair's chosen and rejected documents, a KTO example with its KL-baseline
document, or one completion), rows in record order, ``data.batch_size`` rows per batch; so the scores come back in
input order, and the metrics are the objective's ``eval_metrics`` of its eval sums over these batches (KTO's KL
baseline is each batch's, as TRL's per batch). Records that truncation or ``skip_bad_records`` drops get no scores
line: the output counts them (``dropped_records``) and the data report names the reasons.
"""
from __future__ import annotations

import functools
import json
from dataclasses import fields
from pathlib import Path

import jax
import numpy as np

from jaxft.config import ConfigError, HeadConfig, ModelConfig
from jaxft.data.config import DataConfig
from jaxft.data.chat import checked_pad_id
from jaxft.data.formats import DataError, record_number
from jaxft.data.packing import extras_layout, rows_to_batch
from jaxft.data.preference import SEQUENCES_PER_UNIT, preference_samples, record_kind
from jaxft.files import write_text_atomic
from jaxft.recipes.config import TASK_UNION, TrainConfig
from jaxft.recipes.skeleton import to_host
from jaxft.recipes.tasks import task_of
from jaxft.train.metrics import evaluate
from jaxft.train.rewards import is_reward_head

# the tasks whose data is preference records (pairs, or KTO's unpaired examples), by their ``--task`` name
PREFERENCE_TASKS = {name: cls for name, cls in TASK_UNION.members.items() if hasattr(cls, "record_kind")}


def eval_task(name: str | None, head: HeadConfig | None, paths, *, has_adapter: bool, settings: dict, **qa_windows):
    """The task ``jaxft eval`` scores by: ``--task`` ``name`` with the objective's ``settings`` ({field: value}, None
    for the task's default), or without a name what the model and the data imply: a one-label sequence classifier
    on preference pairs is a reward model, other preference data needs ``--task``, else the model's head
    (:func:`jaxft.recipes.tasks.task_of`)."""
    given = {key: value for key, value in settings.items() if value is not None}
    kind = record_kind(paths[0]) if name is None else None
    if kind == "pairs" and is_reward_head(head):
        name = "reward"
    elif kind in ("pairs", "kto"):
        raise ConfigError(f"{paths[0]} holds {'preference pairs' if kind == 'pairs' else 'KTO examples'}; choose the "
                          f"objective to evaluate them by with --task {{{','.join(PREFERENCE_TASKS)}}}")
    if name is None:
        if given:
            raise ConfigError(f"{', '.join(_flag(key) for key in given)}: settings of a preference objective; "
                              f"choose one with --task {{{','.join(PREFERENCE_TASKS)}}}")
        return task_of(head, **qa_windows)
    if name not in PREFERENCE_TASKS:
        raise ConfigError(f"--task {name!r}: expected one of {', '.join(PREFERENCE_TASKS)}")
    cls = PREFERENCE_TASKS[name]
    known = [f.name for f in fields(cls)]
    unknown = [key for key in given if key not in known]
    if unknown:
        raise ConfigError(f"{_flag(unknown[0])} is not a setting of --task {name} (its settings: {', '.join(known)})")
    _check_model(name, cls, head, has_adapter)
    return cls(**given)


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _check_model(name: str, cls, head: HeadConfig | None, has_adapter: bool):
    """The model can be scored by task ``name``: a reward model has its one-label head; the others score with the
    LM head, and DPO / KTO need adapters to switch off for their reference."""
    if name == "reward" and not is_reward_head(head):
        has = "no task head (a causal LM)" if head is None else f"a {head.kind} head with {head.num_labels} labels"
        raise ConfigError(f"--task reward scores with a one-label sequence-classification head (an HF "
                          f"*ForSequenceClassification folder with num_labels 1, or an adapter saving 'score'); "
                          f"this model has {has}")
    if name != "reward" and head is not None:
        raise ConfigError(f"--task {name} scores completions by the LM head's log-probs; this model has a "
                          f"{head.kind} head")
    if getattr(cls, "reference_policy", False) and not has_adapter:
        raise ConfigError(f"--task {name} compares the policy with its reference, the same base with the adapters "
                          "off: give the policy's adapter with --adapter")


def check_scores_file(path: str, overwrite: bool, paths):
    """``--scores`` may write ``path``: nothing is there (or ``overwrite``), and one data file is scored (each line
    names its record by the record's line in it)."""
    if Path(path).exists() and not overwrite:
        raise FileExistsError(f"--scores {path}: the file already exists; pass --overwrite to replace it, or choose "
                              "another file")
    if len(paths) != 1:
        raise ConfigError(f"--scores names each record by its line in the data file; give one --data file, not "
                          f"{len(paths)}")


def _records_kind(task, objective, path) -> str:
    """The record kind to read ``path`` as: the task's, or single completions for an objective that scores them."""
    kind = record_kind(path)
    if kind != "completions":
        return task.record_kind
    if not hasattr(objective, "document_rewards"):
        raise DataError(str(path), "single completions", f"the records are single completions (no 'chosen'), "
                        f"which --task reward or dpo score; --task {TASK_UNION.type_of(task)} evaluates "
                        f"{task.record_kind} records")
    return kind


def preference_eval(task, model_cfg: ModelConfig, params: dict, tokenizer, data: DataConfig, *,
                    scores: bool = False) -> tuple[dict, list[dict]]:
    """(result, score lines) of ``task`` over ``data`` (module docstring). The result: the objective's metrics
    (none for single completions: their mean score instead), the records scored and dropped, the data report; the
    lines (with ``scores``, else empty): ``{"line", "chosen", "rejected"}`` per pair, ``{"line", "score"}`` per
    completion, in input order."""
    objective = task.objective(TrainConfig())
    kind = _records_kind(task, objective, data.paths[0])
    if scores and not hasattr(objective, "document_rewards"):
        raise ConfigError(f"--scores writes a reward model's or a DPO policy's rewards; --task "
                          f"{TASK_UNION.type_of(task)} has none per record")
    shards, report, _ = preference_samples(data, tokenizer, kind=kind, max_prompt_length=task.max_prompt_length,
                                           max_completion_length=task.max_completion_length,
                                           vocab_size=model_cfg.vocab_size)
    samples = [sample for shard in shards for sample in shard]
    if not samples:
        raise DataError(", ".join(data.paths), "no records", f"no record is left to score: {report.summary()}")
    step = _scoring_step(objective, model_cfg, kind != "completions", scores or kind == "completions")
    batches = _record_batches(samples, data.batch_size, SEQUENCES_PER_UNIT * data.max_length,
                              checked_pad_id(tokenizer, model_cfg.vocab_size))
    rewards = []

    def eval_step(batch):
        sums, batch_rewards = step(params, batch)
        rewards.append(batch_rewards)
        return sums

    metrics = evaluate(eval_step, batches, objective.eval_metrics if kind != "completions" else lambda sums: {})
    per_record = np.concatenate([to_host(r) for r in rewards])[:len(samples)] if rewards[0] is not None else None
    if kind == "completions":
        metrics = {"mean_score": float(np.mean(per_record[:, 0]))}
    result = {"task": TASK_UNION.type_of(task), **metrics, "records": len(samples),
              "dropped_records": sum(report.dropped.values()), "data_report": report.summary()}
    return result, _score_lines(samples, per_record, kind) if scores else []


@functools.cache
def _scoring_step(objective, model_cfg: ModelConfig, metrics: bool, rewards: bool):
    """The jitted (eval sums, [B, 2] rewards of each row's documents 1 and 2) of a batch; either may be left out
    ({}, None)."""
    def step(params, batch):
        sums = objective.eval_sums(model_cfg, params, batch) if metrics else {}
        return sums, objective.document_rewards(model_cfg, params, batch)[:, 1:3] if rewards else None

    return jax.jit(step)


def _record_batches(samples, batch_size: int, row_length: int, pad_id: int):
    """Batches of one sample per row, in order; the last filled up with padding rows."""
    layout = extras_layout(samples)
    for start in range(0, len(samples), batch_size):
        rows = [[i] for i in range(start, min(start + batch_size, len(samples)))]
        yield rows_to_batch(samples, rows + [[]] * (batch_size - len(rows)), row_length, pad_id, layout)


def _score_lines(samples, rewards: np.ndarray, kind: str) -> list[dict]:
    if kind == "completions":
        return [{"line": record_number(s.source), "score": float(r[0])} for s, r in zip(samples, rewards)]
    return [{"line": record_number(s.source), "chosen": float(r[0]), "rejected": float(r[1])}
            for s, r in zip(samples, rewards)]


def write_scores(path: str, lines: list[dict]) -> Path:
    """The score lines as JSONL at ``path``, written atomically (a reader never sees half a file)."""
    return write_text_atomic(path, "".join(json.dumps(line) + "\n" for line in lines))
