"""Supervised fine-tuning (full, LoRA or QLoRA) from a HF model folder: a short recipe on the run skeleton
(:mod:`jaxft.recipes.skeleton`).

data -> mesh -> model (+ adapters, 4-bit base) -> optimizer -> jitted step -> loop with callbacks (logs, evals,
checkpoints) -> adapter in PEFT format (with tokenizer and chat template).
"""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from jaxft.models.llama import hidden_states, logits_from_hidden
from jaxft.peft.tree import combine
from jaxft.recipes.config import RunConfig
from jaxft.recipes.skeleton import (Every, Latest, check_run_dir, eval_batches, finished_summary, last_logged,
                                    load_inputs, load_model, publish, restore_checkpoint, run_summary,
                                    save_checkpoint, stack_micro_batches, to_host, train_loop, train_state,
                                    write_run_dir)
from jaxft.train.checkpoint import Checkpointer, base_reference
from jaxft.data.chat import IGNORE_INDEX
from jaxft.train.loss import cross_entropy
from jaxft.train.metrics import MetricsLogger, SkipGuard, Throughput, evaluate
from jaxft.train.optim import make_schedule


def run(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Train per ``cfg``; returns a summary (final losses, tokens/s, trainable params, output paths).

    Every input is loaded and checked before ``output_dir`` is written, so a refused run leaves it as it was.
    ``overwrite`` replaces an earlier run whole; ``resume`` continues one whose config.yaml differs only in
    :data:`jaxft.recipes.skeleton.RESUME_MAY_CHANGE` keys, and leaves a finished run untouched.
    """
    out = Path(cfg.output_dir)
    resumed = check_run_dir(cfg, out, resume, overwrite)
    if resumed and resumed.finished:
        return finished_summary(cfg, out, resumed)
    inputs = load_inputs(cfg)
    model_cfg, params = load_model(cfg, jax.random.PRNGKey(cfg.train.seed), inputs.mesh)
    state, frozen, step_fn, n_trainable = train_state(cfg, model_cfg, params, inputs.mesh)
    base = base_reference(cfg.model)
    if resumed and resumed.step is not None:
        state = restore_checkpoint(cfg, out, state, inputs.pipeline.iterator, base)
    write_run_dir(cfg, out, resumed, overwrite)
    tc = cfg.train
    checkpointer = Checkpointer(out / "checkpoints", save_every=tc.save_every or tc.steps, keep_last=tc.keep_last)
    start = int(state["step"])
    latest = Latest(last_logged(out, start) if start else {})  # read before process 0 appends to the log
    logger = MetricsLogger(out, tc.steps, tensorboard=tc.tensorboard, log_every=tc.log_every, start_step=start)
    if resumed:
        logger.log_resume(start, resumed.changes)
    run_eval = _evaluator(cfg, model_cfg, inputs, frozen)
    callbacks = [Every(1, _log_train(logger, make_schedule(cfg.optim), latest)),
                 *([Every(tc.eval_every, _log_eval(logger, run_eval, latest))] if inputs.eval_pipeline else []),
                 Every(checkpointer.save_every, save_checkpoint(checkpointer, tc.steps, inputs.pipeline.iterator,
                                                                base))]
    throughput, guard = Throughput(), SkipGuard(tc.max_skipped_steps)
    state = train_loop(state, range(start + 1, tc.steps + 1), lambda st, batches: step_fn(st, frozen, batches),
                       lambda: stack_micro_batches(inputs.pipeline.iterator, tc.grad_accum, inputs.batch_sharding),
                       guard, throughput, callbacks)
    checkpointer.close()
    logger.close()
    guard.finish()  # a run in which no update was applied is not a success

    params = combine(to_host(state["trainable"]), to_host(frozen))
    # the final step's evaluation, else one now (the same batches either way)
    summary = run_summary(tc, n_trainable, latest.train, throughput, inputs.pipeline.report,
                          (latest.eval or run_eval(state["trainable"])) if inputs.eval_pipeline else None)
    return publish(cfg, out, summary, params, inputs.tokenizer, inputs.pipeline.chat_template)


def _log_train(logger: MetricsLogger, schedule, latest: Latest):
    def log(result):
        latest.train = {**result.metrics, "lr": float(schedule(result.step - 1)), **result.speed}
        logger.log(result.step, latest.train)

    return log


def _log_eval(logger: MetricsLogger, run_eval, latest: Latest):
    def log(result):
        latest.eval = run_eval(result.state["trainable"])
        logger.log_eval(result.step, latest.eval)

    return log


def _evaluator(cfg: RunConfig, model_cfg, inputs, frozen: dict):
    """``run_eval(trainable)``: held-out loss, perplexity and token accuracy over the first eval batches."""
    eval_step = _eval_step(model_cfg, cfg.train.loss_chunk_size or 1024)

    def run_eval(trainable):
        batches = eval_batches(inputs.eval_pipeline.iterator, cfg.train.eval_batches, inputs.batch_sharding)
        return evaluate(lambda b: eval_step(trainable, frozen, b), batches)

    return run_eval


def eval_sums(model_cfg, params: dict, batch: dict, chunk_tokens: int = 1024):
    """(loss sum, target count, correct count) of one batch [B, T]; a target is correct when the argmax logit is
    its label (teacher-forced token accuracy), so every eval reports an accuracy whatever the task.

    Logits come a slice of positions at a time, [B, c, V] with B * c ~ ``chunk_tokens``, so an evaluation never
    holds [B, T, V]; slicing the position axis (not rows) keeps each slice's rows sharded as the batch is.
    """
    h, _ = hidden_states(model_cfg, params, batch["input_ids"], batch.get("positions"), batch.get("segment_ids"))
    b, t, d = h.shape
    c = max(1, min(t, chunk_tokens // b))
    pad = -t % c
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    labels = jnp.pad(batch["labels"], ((0, 0), (0, pad)), constant_values=IGNORE_INDEX)
    h_slices = jnp.moveaxis(h.reshape(b, -1, c, d), 1, 0)              # [T / c, B, c, D]
    label_slices = jnp.moveaxis(labels.reshape(b, -1, c), 1, 0)        # [T / c, B, c]

    def add_slice(totals, xs):
        h_slice, label_slice = xs
        logits = logits_from_hidden(model_cfg, params, h_slice)        # [B, c, V] float32
        loss_sum, n_targets = cross_entropy(logits, label_slice)
        hits = (jnp.argmax(logits, axis=-1) == label_slice) & (label_slice != IGNORE_INDEX)
        return (totals[0] + loss_sum, totals[1] + n_targets, totals[2] + jnp.sum(hits, dtype=jnp.float32)), None

    zero = jnp.zeros((), jnp.float32)
    totals, _ = jax.lax.scan(add_slice, (zero, zero, zero), (h_slices, label_slices))
    return totals


def _eval_step(model_cfg, chunk_tokens: int):
    @jax.jit
    def step(trainable, frozen, batch):
        return eval_sums(model_cfg, combine(trainable, frozen), batch, chunk_tokens)

    return step
