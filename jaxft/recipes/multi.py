"""K LoRA/QLoRA runs in one compiled program (``jaxft sweep --parallel``): one base load, one data pipeline, one
jitted step that trains every member's adapters (see :mod:`jaxft.train.multi`).

The members may differ only in what :data:`MAY_DIFFER` lists (rank, alpha, dropout, rsLoRA, rank/alpha patterns,
learning rate, seed, output folder); they share the base, method, targets, data, steps, batch and schedule shape.
Each member's folder gets what ``sft.run`` writes: config.yaml, metrics.jsonl, curves.png, the PEFT adapter at its
own rank, summary.json. No checkpoints are written and runs cannot be resumed (``train.save_every`` is not used);
rerun the sweep instead.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import jax

from jaxft import parallel
from jaxft.config import ConfigError, to_dict
from jaxft.peft.methods import trainable_count
from jaxft.recipes.config import TASK_UNION, RunConfig, covered, flat_keys
from jaxft.recipes.skeleton import (Every, Latest, check_run_dir, eval_batches, initial_loss_scale, load_base,
                                    load_inputs, next_batches, publish, run_summary, step_config,
                                    to_host, train_loop, write_run_dir)
from jaxft.train import multi
from jaxft.train.metrics import MetricsLogger, SkipGuard, Throughput, evaluate
from jaxft.train.optim import make_schedule

MAY_DIFFER = ("output_dir", "lora.r", "lora.lora_alpha", "lora.lora_dropout", "lora.use_rslora", "lora.rank_pattern",
              "lora.alpha_pattern", "optim.lr", "train.seed")


def _members(cfgs: list[RunConfig]) -> list[multi.Member]:
    """What each run config gives its member of the stacked program: LoRA config, peak lr, seed."""
    return [multi.Member(c.lora, c.optim.lr, c.train.seed) for c in cfgs]


def check_members(cfgs: list[RunConfig]) -> None:
    """ConfigError unless the configs can share one program; the message names the first differing key."""
    if not cfgs:
        raise ConfigError("run_parallel needs at least one run config")
    if cfgs[0].lora is None or len(cfgs[0].peft) != 1:
        methods = [type(m).__name__ for m in cfgs[0].peft]
        raise ConfigError("parallel runs train LoRA adapters over one shared frozen base: the runs need one lora "
                          f"method (method lora or qlora) and no other, not peft {methods}; run these sweeps without "
                          "--parallel")
    if cfgs[0].head is not None:
        raise ConfigError(f"parallel runs stack LoRA adapters alone, but task {TASK_UNION.type_of(cfgs[0].task)!r} "
                          "also trains a task head in every run; sweep it without --parallel (one run after another)")
    if getattr(cfgs[0].task, "online", False):
        raise ConfigError(f"task {TASK_UNION.type_of(cfgs[0].task)!r} samples its batches from each run's own "
                          "policy, which parallel runs (one shared batch) cannot; sweep it without --parallel")
    if getattr(cfgs[0].task, "reads_text", False):
        raise ConfigError(f"task {TASK_UNION.type_of(cfgs[0].task)!r} streams text, derives grad_accum from "
                          "tokens_per_batch and scores each eval source apart, which parallel runs do not; sweep it "
                          "without --parallel")
    if getattr(cfgs[0].task, "precomputed_reference", False):
        raise ConfigError("task.precompute_reference and task.reference_model are not supported in parallel runs "
                          "(their reference log-probs are cached per run folder); run the configs separately")
    if cfgs[0].optim.offload_state:
        raise ConfigError("optim.offload_state is not supported in parallel runs; set it to false or run the "
                          "configs separately")
    if cfgs[0].train.sample_every:
        raise ConfigError("train.sample_every is not supported in parallel runs (one sampler per run's adapter); "
                          "set it to 0 or run the configs separately")
    multi.check_optimizer(_members(cfgs), cfgs[0].optim)
    dirs = [str(c.output_dir) for c in cfgs]
    if len(set(dirs)) != len(dirs):
        raise ConfigError(f"parallel runs need one output_dir each, got {dirs}")
    first = flat_keys(to_dict(cfgs[0]))
    for i, cfg in enumerate(cfgs[1:], 1):
        flat = flat_keys(to_dict(cfg))
        # optim.total_steps follows train.steps, so the key a user changed (train.steps) is named first
        for key in sorted(first.keys() | flat.keys(), key=lambda k: (k == "optim.total_steps", k)):
            if not covered(key, MAY_DIFFER) and first.get(key) != flat.get(key):
                raise ConfigError(f"parallel runs must share {key}: run 0 ({cfgs[0].output_dir}) has "
                                  f"{first.get(key)!r}, run {i} ({cfg.output_dir}) has {flat.get(key)!r}. Only "
                                  f"{', '.join(MAY_DIFFER)} may differ; run the others without --parallel")


def _member_records(metrics: dict, k: int, extra: dict) -> dict:
    return {**{name: value[k] for name, value in metrics.items()}, **extra}


def _member_eval(model_cfg, objective, tc, inputs, n_members: int):
    """``run_eval(trainable, consts, base)``: every member's held-out metrics (the objective's, as ``sft.run``
    evaluates) over the same first eval batches, one compiled pass for all members per batch."""
    @jax.jit
    def member_eval_sums(trainable, consts, base, batch):
        return multi.per_member(partial(objective.eval_sums, model_cfg, batch=batch), trainable, consts, base)

    def members_metrics(sums: dict) -> list[dict]:
        return [objective.eval_metrics(jax.tree.map(lambda x: x[k], sums)) for k in range(n_members)]

    def run_eval(trainable, consts, base):
        batches = eval_batches(inputs.eval_pipeline.iterator, tc.eval_batches, inputs.batch_sharding,
                               objective.batch_keys)
        return evaluate(lambda b: member_eval_sums(trainable, consts, base, b), batches, members_metrics)

    return run_eval


def _log_members(loggers: list[MetricsLogger], schedules: list, tc, latest: Latest):
    """Each member's train record into its own log: one transfer of all members' metrics, on logging steps only."""
    def log(result):
        logging = result.step % tc.log_every == 0 or result.step == tc.steps
        host = jax.device_get(result.metrics) if logging else None
        for k, logger in enumerate(loggers):
            if logging:
                latest.train[k] = _member_records(host, k, {"lr": float(schedules[k](result.step - 1)),
                                                            **result.speed})
            logger.log(result.step, latest.train[k])

    return log


def _eval_members(loggers: list[MetricsLogger], run_eval, consts: dict, base: dict, latest: Latest):
    def log(result):
        latest.eval = run_eval(result.state["trainable"], consts, base)
        for logger, member_result in zip(loggers, latest.eval):
            logger.log_eval(result.step, member_result)

    return log


def run_parallel(cfgs: list[RunConfig], *, overwrite: bool = False) -> list[dict]:
    """Train every config's adapters together; returns one ``sft.run``-style summary per config, in order."""
    check_members(cfgs)
    outs = [Path(c.output_dir) for c in cfgs]
    for c, out in zip(cfgs, outs):
        check_run_dir(c, out, resume=False, overwrite=overwrite)
    cfg, tc = cfgs[0], cfgs[0].train
    inputs = load_inputs(cfg)
    model_cfg, base = load_base(cfg, inputs.mesh)
    members = _members(cfgs)
    s = multi.stack(model_cfg, base, members)
    member_params = [multi.member_params(s, s.trainable, k) for k in range(len(cfgs))]
    n_trainable = [trainable_count(p, c.lora.trainable(model_cfg, p)) for c, p in zip(cfgs, member_params)]

    state = multi.shard(multi.init_states(s, members, cfg.optim, initial_loss_scale(model_cfg)), inputs.mesh)
    consts, base = multi.shard(s.consts, inputs.mesh), parallel.shard_params(s.base, inputs.mesh)
    step_fn = multi.jit_train_step(model_cfg, step_config(cfg), multi.member_optimizer(cfg.optim, 1.0),
                                   inputs.mesh, state, consts, base, group=multi.default_group())

    for c, out in zip(cfgs, outs):  # every input has passed: now the folders are written
        write_run_dir(c, out, None, overwrite)

    loggers = [MetricsLogger(out, tc.steps, tensorboard=tc.tensorboard, log_every=tc.log_every) for out in outs]
    latest = Latest([{} for _ in cfgs])
    callbacks = [Every(1, _log_members(loggers, [make_schedule(c.optim) for c in cfgs], tc, latest))]
    if inputs.eval_pipeline:
        run_eval = _member_eval(model_cfg, cfg.objective(), tc, inputs, len(cfgs))
        callbacks.append(Every(tc.eval_every, _eval_members(loggers, run_eval, consts, base, latest)))
    # one diverged member stops the sweep, as it does a sequential one
    throughput, guard = Throughput(), SkipGuard(tc.max_skipped_steps, [str(c.output_dir) for c in cfgs])
    state = train_loop(state, range(1, tc.steps + 1), lambda st, batches: step_fn(st, consts, base, batches),
                       next_batches(cfg, inputs), guard, throughput, callbacks)
    for logger in loggers:
        logger.close()
    guard.finish()

    trainable = to_host(state["trainable"])
    return [publish(c, out, run_summary(tc, n_trainable[k], latest.train[k], throughput, inputs.pipeline.report,
                                        latest.eval[k] if latest.eval else None),
                    multi.member_params(s, trainable, k), inputs.tokenizer, inputs.pipeline.chat_template)
            for k, (c, out) in enumerate(zip(cfgs, outs))]
