"""Supervised fine-tuning (full, LoRA or QLoRA) from a HF model folder: a short recipe on the run skeleton
(:mod:`jaxft.recipes.skeleton`).

data -> mesh -> model (+ adapters, 4-bit base) -> optimizer -> jitted step -> loop with callbacks (logs, evals,
checkpoints, sample replies) -> adapter in PEFT format (with tokenizer and chat template).
"""
from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxft.peft.tree import combine
from jaxft.recipes import rl
from jaxft.recipes.config import RunConfig, with_token_batch
from jaxft.recipes.reference import precompute_reference, use_reference
from jaxft.recipes.samples import Sampler
from jaxft.recipes.scoring import task_scores
from jaxft.recipes.skeleton import (Latest, check_run_dir, eval_batches, finished_summary, load_inputs, load_model,
                                    next_batches, restore_checkpoint, train_and_publish, train_state, write_run_dir)
from jaxft.train.checkpoint import base_reference
from jaxft.train.flops import ModelFlops, model_flops
from jaxft.train.metrics import MetricsLogger, evaluate
from jaxft.train.optim import make_schedule


def run(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Train per ``cfg``; returns a summary (final losses, tokens/s, trainable params, output paths).

    Every input is loaded and checked before ``output_dir`` is written, so a refused run leaves it as it was.
    ``overwrite`` replaces an earlier run whole; ``resume`` continues one whose config.yaml differs only in
    :data:`jaxft.recipes.skeleton.RESUME_MAY_CHANGE` keys, and leaves a finished run untouched.
    """
    if getattr(cfg.task, "online", False):  # batches from the policy itself: RL's loop
        return rl.run(cfg, resume=resume, overwrite=overwrite)
    cfg = with_token_batch(cfg, jax.process_count())
    out = Path(cfg.output_dir)
    resumed = check_run_dir(cfg, out, resume, overwrite)
    if resumed and resumed.finished:
        return finished_summary(cfg, out, resumed)
    inputs = load_inputs(cfg)
    base = base_reference(cfg.model)
    # a separate reference model's pass runs before the policy loads: the two are never in memory together
    reference = precompute_reference(cfg, inputs, out, base, resume=resumed is not None)
    model_cfg, params = load_model(cfg, jax.random.PRNGKey(cfg.train.seed), inputs.mesh)
    reference = reference or precompute_reference(cfg, inputs, out, base, resume=resumed is not None,
                                                  policy=(model_cfg, params))
    training = train_state(cfg, model_cfg, params, inputs.mesh)
    if resumed and resumed.step is not None:
        training = training._replace(state=restore_checkpoint(cfg, out, training.state, inputs.pipeline.iterator,
                                                              base))
    sampler = Sampler(cfg, model_cfg, inputs, training.frozen) if cfg.train.sample_every else None
    flops = _run_flops(cfg, model_cfg)
    write_run_dir(cfg, out, resumed, overwrite)
    use_reference(reference, inputs, out)
    return train_and_publish(cfg, out, inputs, training, base, resumed, batches=next_batches(cfg, inputs),
                             run_eval=_evaluator(cfg, model_cfg, inputs, training.frozen),
                             log_train=lambda logger, latest: _log_train(logger, make_schedule(cfg.optim), latest,
                                                                         flops),
                             sampler=sampler, flops=flops)


def _run_flops(cfg: RunConfig, model_cfg) -> ModelFlops | None:
    """A pretraining run trained in full reports its MFU (PaLM's model FLOPs count every weight's gradient, which
    an adapter run does not compute); its peak is read or measured once, before the loop."""
    if not getattr(cfg.task, "reads_text", False) or not cfg.full:
        return None
    flops = model_flops(model_cfg, cfg.data.max_length)
    if jax.process_index() == 0:
        print(f"MFU peak {flops.peak_flops / flops.devices:.4g} FLOP/s per device, {flops.peak_source}",
              file=sys.stderr)
    return flops


def _log_train(logger: MetricsLogger, schedule, latest: Latest, flops: ModelFlops | None = None):
    """Each step's train record: the objective's metrics, the learning rate, the speed; for a pretraining run also
    the perplexity of the cross-entropy (``ce_loss`` when a z-loss makes ``loss`` more than that) and the MFU
    (computed on the host when the record is written, not per step)."""
    def log(result):
        latest.train = {**result.metrics, "lr": float(schedule(result.step - 1)), **result.speed}
        if flops is not None:
            # exp on the device: the record's float() waits for it only on logging steps (metrics.perplexity's
            # float would wait every step)
            cross_entropy = result.metrics.get("ce_loss", result.metrics["loss"])
            latest.train["perplexity"] = jnp.exp(cross_entropy.astype(jnp.float32))
            if result.speed.get("tokens_per_s") is not None:
                latest.train["mfu"] = flops.mfu(result.speed["tokens_per_s"])
        logger.log(result.step, latest.train)

    return log


def _evaluator(cfg: RunConfig, model_cfg, inputs, frozen: dict):
    """``run_eval(trainable)``: the objective's held-out metrics over the first eval batches, and the task's text
    scores over the whole eval data (question answering's exact match and F1). Eval data of several sources
    (``{name: pipeline}``, the pretraining tasks) is scored per source, as ``<name>/loss``, ``<name>/perplexity``
    ..., beside the metrics over all of them (every token weighing the same)."""
    objective = cfg.objective()
    eval_step = _eval_step(model_cfg, objective)

    def sums(trainable, pipeline) -> dict:
        batches = eval_batches(pipeline.iterator, cfg.train.eval_batches, inputs.batch_sharding, objective.batch_keys)
        return evaluate(lambda b: eval_step(trainable, frozen, b), batches, lambda total: total)

    def run_eval(trainable):
        if not isinstance(inputs.eval_pipeline, dict):
            metrics = objective.eval_metrics(sums(trainable, inputs.eval_pipeline))
            return {**metrics, **task_scores(cfg.task, model_cfg, combine(trainable, frozen), inputs.tokenizer,
                                             cfg.eval_data)}
        per_source = {name: sums(trainable, pipeline) for name, pipeline in inputs.eval_pipeline.items()}
        overall = objective.eval_metrics(jax.tree.map(lambda *xs: sum(xs), *per_source.values()))
        return {**overall, **{f"{name}/{key}": value for name, source in per_source.items()
                              for key, value in objective.eval_metrics(source).items()}}

    return run_eval


def _eval_step(model_cfg, objective):
    @jax.jit
    def step(trainable, frozen, batch):
        return objective.eval_sums(model_cfg, combine(trainable, frozen), batch)

    return step
