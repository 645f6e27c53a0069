"""Exact match of greedy chat replies: the score a user of a task with checkable answers (the demo's) wants.

Teacher-forced token accuracy (``CausalLM.eval_sums``) is cheap and needs no generation; exact match generates, so it
is opt-in (``jaxft eval --exact-match N``, ``jaxft sweep --exact-match N``) and scores the first N chats only.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import jax

from jaxft.config import ModelConfig
from jaxft.data import DataConfig, build_iterator, load_examples, resolve_template
from jaxft.data.formats import DataError
from jaxft.hf.checkpoint import from_pretrained
from jaxft.hf.peft_format import load_adapter
from jaxft.models.generate import generate, stop_token_ids
from jaxft.recipes.config import RunConfig
from jaxft.recipes.skeleton import load_base
from jaxft.train.metrics import evaluate
from jaxft.train.objectives import CausalLM

BATCH = 64  # prompts per generate call: bounds the KV cache however many chats are scored


def data_metrics(model_cfg: ModelConfig, params: dict, tokenizer, data: DataConfig) -> dict:
    """Loss, perplexity and token accuracy over one pass of ``data`` (what ``jaxft eval`` prints), with the number
    of batches and the data pipeline's report."""
    pipeline = build_iterator(data, tokenizer, vocab_size=model_cfg.vocab_size)
    n_batches = pipeline.iterator.batches_per_epoch
    objective = CausalLM()  # `jaxft eval` scores next-token prediction
    step = jax.jit(partial(objective.eval_sums, model_cfg))
    result = evaluate(lambda batch: step(params, batch), (next(pipeline.iterator) for _ in range(n_batches)),
                      objective.eval_metrics)
    return {**result, "batches": n_batches, "data_report": pipeline.report.summary()}


def chat_exact_match(model_cfg: ModelConfig, params: dict, tokenizer, data: DataConfig, limit: int) -> dict:
    """Greedy replies to the first ``limit`` chats of ``data`` that end in an assistant turn, each prompted with
    the turns before it; a reply counts when it stops (an end-of-turn/EOS token) and its text equals that turn's
    content, both stripped of surrounding whitespace. Returns ``{"exact_match", "exact_match_chats"}``."""
    if limit < 1:
        raise ValueError(f"exact match: the number of chats to score must be >= 1, got {limit}")
    chats = [e.messages for path in data.paths for e in load_examples(path, data.format)
             if e.messages and e.messages[-1]["role"] == "assistant"][:limit]
    if not chats:
        raise DataError(", ".join(data.paths), "exact match", "no chat ends in an assistant turn; it scores chat "
                        "data (messages) only")
    template = resolve_template(tokenizer, data.template)
    prompts = [tokenizer.apply_chat_template(chat[:-1], add_generation_prompt=True, chat_template=template)
               for chat in chats]
    references = [chat[-1]["content"].strip() for chat in chats]
    stops = stop_token_ids(model_cfg, tokenizer.eos_token_id)
    longest = max(len(tokenizer.encode(ref, add_special_tokens=False)) for ref in references)
    hits = 0
    for start in range(0, len(prompts), BATCH):
        outputs = generate(model_cfg, params, prompts[start:start + BATCH], max_new_tokens=longest + 8,
                           stop_token_ids=stops)
        for reference, out in zip(references[start:start + BATCH], outputs):
            stopped = bool(out) and out[-1] in stops
            hits += stopped and tokenizer.decode(out[:-1], skip_special_tokens=True).strip() == reference
    return {"exact_match": hits / len(chats), "exact_match_chats": len(chats)}


def load_trained(cfg: RunConfig, export: str | Path):
    """(model config, params) of a finished run: its base (4-bit for QLoRA) plus the exported adapter, or the
    exported model of full fine-tuning."""
    if cfg.full:
        return from_pretrained(export, dtype=cfg.dtype, compute_dtype=cfg.compute_dtype)
    model_cfg, params = load_base(cfg)
    return model_cfg, load_adapter(export, params)
