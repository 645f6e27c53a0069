"""Held-out scores beyond a step's evaluation: a task's metrics over one pass of data files (``jaxft eval``), the
text scores of question answering (SQuAD's exact match and F1 of the predicted spans), and exact match of greedy chat
replies: the score a user of a task with checkable answers (the demo's) wants.

Teacher-forced token accuracy (``CausalLM.eval_sums``) is cheap and needs no generation; exact match generates, so it
is opt-in (``jaxft eval --exact-match N``, ``jaxft sweep --exact-match N``) and scores the first N chats only.
"""
from __future__ import annotations

import functools
from functools import partial
from itertools import islice
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from jaxft.config import ModelConfig
from jaxft.data import DataConfig, resolve_template
from jaxft.data.chat import checked_pad_id
from jaxft.data.formats import DataError, iter_examples
from jaxft.data.packing import rows_to_batch
from jaxft.data.tasks import read_task_records, tokenize_task_records
from jaxft.hf.checkpoint import from_pretrained
from jaxft.hf.peft_format import load_adapter
from jaxft.models.generate import generate, stop_token_ids
from jaxft.models.heads import token_logits
from jaxft.peft.prefix import prompt_inputs
from jaxft.recipes.config import RunConfig, TrainConfig
from jaxft.recipes.tasks import QaTask, SftTask, task_pipeline
from jaxft.recipes.skeleton import exports_adapter, load_base, to_host
from jaxft.train.metrics import evaluate
from jaxft.train.squad import best_spans, squad_scores

BATCH = 64  # prompts per generate call: bounds the KV cache however many chats are scored


def data_metrics(model_cfg: ModelConfig, params: dict, tokenizer, data: DataConfig, task=SftTask()) -> dict:
    """The task's held-out metrics over one pass of ``data`` (what ``jaxft eval`` prints: for SFT loss, perplexity
    and token accuracy; for a head, its task's), with the number of batches and the data pipeline's report."""
    pipeline = task_pipeline(task, data, tokenizer, vocab_size=model_cfg.vocab_size)
    n_batches = pipeline.iterator.batches_per_epoch
    objective = task.objective(TrainConfig())
    step = jax.jit(partial(objective.eval_sums, model_cfg))
    batches = ({k: b[k] for k in objective.batch_keys} for b in (next(pipeline.iterator) for _ in range(n_batches)))
    result = evaluate(lambda batch: step(params, batch), batches, objective.eval_metrics)
    return {**result, "batches": n_batches, "data_report": pipeline.report.summary()}


def task_scores(task, model_cfg: ModelConfig, params: dict, tokenizer, data: DataConfig) -> dict:
    """The held-out scores of ``task`` that need the text and so are computed on the host, beside its objective's
    (:func:`data_metrics`): SQuAD's exact match and F1 for question answering; none for the other tasks."""
    return qa_scores(model_cfg, params, tokenizer, data, task) if isinstance(task, QaTask) else {}


def qa_scores(model_cfg: ModelConfig, params: dict, tokenizer, data: DataConfig, task: QaTask) -> dict:
    """SQuAD v1.1's exact match and F1 over the questions of ``data`` that have an answer: every example's
    predicted answer is the best span over all its context windows (``jaxft.train.squad.best_spans``, as
    transformers' ``run_qa`` post-processing). One window per row, ``data.batch_size`` rows per forward pass."""
    head, skip = model_cfg.head, data.skip_bad_records  # the records the run's eval pipeline kept
    records = [r for path in data.paths for r in read_task_records(path, head, skip_bad_records=skip)]
    tokenized = tokenize_task_records(records, tokenizer, head, max_length=data.max_length,
                                      doc_stride=task.doc_stride, skip_bad_records=skip)
    rows, t = len(tokenized.samples), data.max_length
    pad_id = checked_pad_id(tokenizer, model_cfg.vocab_size)
    logits = []
    for start in range(0, rows, data.batch_size):
        batch_rows = [[i] for i in range(start, min(start + data.batch_size, rows))]
        batch = rows_to_batch(tokenized.samples, batch_rows + [[]] * (data.batch_size - len(batch_rows)), t, pad_id)
        logits.append(to_host(_token_logits(model_cfg)(params, batch))[:len(batch_rows)])
    logits = np.concatenate(logits)                                      # [features, T, 2]
    offsets = np.full((rows, t, 2), -1, np.int32)
    for i, feature in enumerate(tokenized.qa_features):
        offsets[i, :len(feature.offsets)] = feature.offsets
    examples = tokenized.qa_examples
    predicted = best_spans(logits[..., 0], logits[..., 1], offsets, [f.example for f in tokenized.qa_features],
                           [e.context for e in examples], max_answer_length=task.max_answer_length)
    answered = [i for i, e in enumerate(examples) if e.answer_texts]
    scores = squad_scores([predicted[i] for i in answered], [list(examples[i].answer_texts) for i in answered])
    return {**scores, "qa_examples": len(answered)}


@functools.cache
def _token_logits(model_cfg: ModelConfig):
    """The jitted head logits of a batch, one per model config: every evaluation of a run reuses its compilation."""
    return jax.jit(lambda p, b: token_logits(model_cfg, p, b["input_ids"], b["positions"], b["segment_ids"]))


class ChatPrompt(NamedTuple):
    """A held-out chat cut before its last assistant turn: what a model is asked, and the reply the data gives."""

    text: str        # the turns before the reply, rendered with the chat template and its generation prompt
    ids: list[int]   # ``text`` as the template's tokenization gives it (the model's prompt)
    reference: str   # the last assistant turn's content


def chat_prompts(data: DataConfig, tokenizer, template: str, limit: int) -> list[ChatPrompt]:
    """The first ``limit`` chats of ``data``, each cut before its last assistant turn and rendered with ``template``
    (Jinja source) and the generation prompt; records that are no chat (plain text) are passed over."""
    if limit < 1:
        raise ValueError(f"the number of chats to prompt must be >= 1, got {limit}")
    examples = (e for path in data.paths for e in iter_examples(path, data.format))  # read only as far as needed
    chats = list(islice((e.messages for e in examples
                         if e.messages and any(m["role"] == "assistant" for m in e.messages)), limit))
    if not chats:
        raise DataError(", ".join(data.paths), "chat prompts", "no chat holds an assistant turn; replies are "
                        "generated for chat data (messages) only")
    prompts = []
    for chat in chats:
        last = max(i for i, m in enumerate(chat) if m["role"] == "assistant")
        render = partial(tokenizer.apply_chat_template, chat[:last], add_generation_prompt=True,
                         chat_template=template)
        prompts.append(ChatPrompt(render(tokenize=False), list(render()), chat[last]["content"].strip()))
    return prompts


def chat_exact_match(model_cfg: ModelConfig, params: dict, tokenizer, data: DataConfig, limit: int) -> dict:
    """Greedy replies to the first ``limit`` chats of ``data`` that hold an assistant turn, each prompted with the
    turns before its last one (:func:`chat_prompts`); a reply counts when it stops (an end-of-turn/EOS token) and
    its text equals that turn's content, both stripped of surrounding whitespace. Returns ``{"exact_match",
    "exact_match_chats"}``."""
    chats = chat_prompts(data, tokenizer, resolve_template(tokenizer, data.template), limit)
    references = [chat.reference for chat in chats]
    stops = stop_token_ids(model_cfg, tokenizer.eos_token_id)
    longest = max(len(tokenizer.encode(ref, add_special_tokens=False)) for ref in references)
    hits, (params, hooks) = 0, prompt_inputs(model_cfg, params)
    for start in range(0, len(chats), BATCH):
        outputs = generate(model_cfg, params, [chat.ids for chat in chats[start:start + BATCH]],
                           max_new_tokens=longest + 8, stop_token_ids=stops, hooks=hooks)
        for reference, out in zip(references[start:start + BATCH], outputs):
            hits += reply_text(tokenizer, out, stops) == reference
    return {"exact_match": hits / len(chats), "exact_match_chats": len(chats)}


def reply_tokens(tokens: list[int], stops) -> tuple[list[int], bool]:
    """A generated reply's tokens without the stop token that ended it (never shown), and whether one did (False:
    cut off at the token limit)."""
    stopped = bool(tokens) and tokens[-1] in stops
    return (tokens[:-1] if stopped else tokens), stopped


def reply_text(tokenizer, tokens: list[int], stops) -> str | None:
    """A generated reply's text, stripped of surrounding whitespace, when it ended with one of ``stops`` (which is
    left out); None for a reply cut off at the token limit."""
    body, stopped = reply_tokens(tokens, stops)
    return tokenizer.decode(body, skip_special_tokens=True).strip() if stopped else None


def load_trained(cfg: RunConfig, export: str | Path):
    """(model config, params) of a finished run: its base (4-bit for QLoRA) plus the exported adapter, or the
    exported model (full fine-tuning, methods merged in, a head trained alone)."""
    if not exports_adapter(cfg):
        return from_pretrained(export, dtype=cfg.dtype, compute_dtype=cfg.compute_dtype)
    model_cfg, params = load_base(cfg)
    return model_cfg, load_adapter(export, params, model_cfg)
