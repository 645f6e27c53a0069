"""Supervised fine-tuning (full, LoRA or QLoRA) from a HF model folder: the whole run in one readable script.

data -> model (+ adapters, 4-bit base) -> mesh -> optimizer -> jitted step -> loop with logs, evals and
checkpoints -> adapter in PEFT format (with tokenizer and chat template).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxft import parallel
from jaxft.config import ConfigError, ModelConfig
from jaxft.data import build_iterator, save_chat_template
from jaxft.hf.checkpoint import (atomic_dir, check_output_dir, from_pretrained, occupied, to_hf_tensors,
                                 write_pretrained, write_text_atomic)
from jaxft.hf.config import config_from_hf, read_json
from jaxft.hf.peft_format import adapter_tensors, write_adapter
from jaxft.hf.safetensors_io import CheckpointError
from jaxft.hf.tokenizer import load_tokenizer
from jaxft.models.llama import hidden_states, init_params, logits_from_hidden
from jaxft.peft import lora
from jaxft.peft.tree import combine, split
from jaxft.recipes.config import RunConfig, config_changes, covered, dump_run_config, load_run_config
from jaxft.train.checkpoint import Checkpointer, base_reference, check_base
from jaxft.train.loop import StepConfig, init_state, jit_train_step
from jaxft.train.loss import IGNORE_INDEX, cross_entropy
from jaxft.train.metrics import MetricsLogger, SkipGuard, Throughput, evaluate, read_metrics
from jaxft.train.optim import make_optimizer, make_schedule


def load_base(cfg: RunConfig, mesh=None):
    """(model config with the run's memory knobs, base params: 4-bit for QLoRA); with a mesh each process reads only
    its slices. An inline model config (training from scratch) starts from ``init_params`` at train.seed, in the
    run's dtype and compute_dtype as a folder's weights would be."""
    if cfg.model_dir is None:
        return inline_model_config(cfg), init_params(inline_model_config(cfg), jax.random.PRNGKey(cfg.train.seed),
                                                     cfg.dtype)
    model_cfg, params = from_pretrained(cfg.model, dtype=cfg.dtype, compute_dtype=cfg.compute_dtype,
                                        quant=cfg.quant, mesh=mesh)
    return cfg.train.apply(model_cfg), params


def inline_model_config(cfg: RunConfig) -> ModelConfig:
    """An inline model config with the run's compute dtype and memory knobs, as :func:`load_base` trains it."""
    return cfg.train.apply(cfg.model.replace(dtype=cfg.compute_dtype or cfg.dtype))


def load_model(cfg: RunConfig, rng, mesh=None):
    """(model config, params with adapters for LoRA/QLoRA)."""
    model_cfg, params = load_base(cfg, mesh)
    if cfg.lora is not None:
        params = lora.add(model_cfg, params, cfg.lora, rng)
    return model_cfg, params


def initial_loss_scale(model_cfg) -> float | None:
    """fp16 compute trains with dynamic loss scaling from 2**15; other dtypes need none."""
    return 2.0 ** 15 if model_cfg.dtype == "float16" else None


def trainable_predicate(cfg: RunConfig):
    """Full fine-tuning trains every leaf; otherwise the tree's own predicate (adapters + marked leaves)."""
    return (lambda path, leaf: True) if cfg.full else None


def stack_micro_batches(iterator, n: int, sharding) -> dict:
    """``n`` host batches [B, T] -> one global [n, B, T] array per key, each process giving its local rows."""
    local = [next(iterator) for _ in range(n)]
    out = {}
    for key in ("input_ids", "labels", "segment_ids", "positions"):
        stacked = np.stack([b[key] for b in local]).astype(np.int32)
        out[key] = jax.make_array_from_process_local_data(sharding, stacked)
    return out


@jax.jit
def _real_tokens(segment_ids):
    return jnp.sum(segment_ids != 0, dtype=jnp.int32)


def count_tokens(batches: dict) -> tuple[int, int]:
    """(real tokens, token slots) of a global batch: padding (segment id 0, ``jaxft.data.packing``) is no token of
    the data, so tokens/s counts only the rest. Summed on the devices, so every process gets the global count."""
    return int(_real_tokens(batches["segment_ids"])), int(np.prod(batches["segment_ids"].shape))


def _check_batch_fits(cfg: RunConfig, mesh):
    """Batch rows (train and eval) are split over the data and fsdp axes; say so before jit fails with a tiling
    message, which for the eval batches would come only at the first evaluation."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    for section, data in (("data", cfg.data), ("eval_data", cfg.eval_data)):
        rows = data.batch_size * jax.process_count() if data else 0
        if rows % shards:
            raise ConfigError(f"{section}.batch_size {data.batch_size} x {jax.process_count()} process(es) = {rows} "
                              f"rows do not split over the mesh's data x fsdp = {shards} devices; use a batch_size "
                              f"that makes the global batch a multiple of {shards}, or change mesh")


def base_config(cfg: RunConfig) -> ModelConfig:
    """The base model's config as written: the inline one, or the model folder's config.json."""
    return cfg.model if cfg.model_dir is None else config_from_hf(read_json(Path(cfg.model) / "config.json"))


def check_model_folder(cfg: RunConfig):
    """Fails before anything is written, so a run fixed after this error needs no --overwrite."""
    if cfg.model_dir is not None and not (Path(cfg.model) / "config.json").is_file():
        raise ConfigError(f"model {cfg.model!r}: no config.json there (is it a Hugging Face model folder?); point "
                          "`model` at a folder with config.json and *.safetensors")


def _pipelines(cfg: RunConfig, tokenizer):
    """(train pipeline, eval pipeline or None); token ids the model has no embedding row for are refused here."""
    vocab_size = base_config(cfg).vocab_size
    build = partial(build_iterator, tokenizer=tokenizer, process_index=jax.process_index(),
                    process_count=jax.process_count(), vocab_size=vocab_size)
    return build(cfg.data), build(cfg.eval_data) if cfg.eval_data else None


# What a resume may change: how the run is executed, logged, evaluated and saved, never what is trained. The mesh
# is here because a resume on another mesh continues the same run (within float tolerance, tests/test_resume.py),
# and the model path because check_base compares the base's bytes wherever the folder now is.
RESUME_MAY_CHANGE = ("output_dir", "model", "train.steps", "train.log_every", "train.eval_every", "train.eval_batches",
                     "train.save_every", "train.keep_last", "train.tensorboard", "train.remat", "train.attention",
                     "train.max_skipped_steps", "train.loss_chunk_size", "mesh", "eval_data", "optim.offload_state")


@dataclass(frozen=True)
class Resumed:
    """The run a ``resume`` continues, as read from its folder before anything is loaded or written."""

    changes: dict   # "section.key" -> [old, new]: the changes to config.yaml this resume makes (all allowed ones)
    step: int | None  # its newest complete checkpoint; None when it stopped before the first one
    finished: bool  # that checkpoint is at train.steps and summary.json reports it: nothing is left to do


def _check_run_dir(cfg: RunConfig, out: Path, resume: bool, overwrite: bool) -> Resumed | None:
    """Reads only: refuses an output_dir this run may not use, before anything is loaded."""
    check_model_folder(cfg)
    if resume and overwrite:
        raise ConfigError(f"{out}: resume continues the run in output_dir and overwrite replaces it; pass one of "
                          "--resume / --overwrite")
    if resume:
        return _check_resume(cfg, out)
    check_output_dir(out, overwrite)
    inputs = [Path(p) for p in (cfg.model_dir or cfg.tokenizer_dir, *cfg.data.paths,
                                *(cfg.eval_data.paths if cfg.eval_data else ()))]
    inside = [str(p) for p in inputs if overwrite and occupied(out) and p.resolve().is_relative_to(out.resolve())]
    if inside:
        raise ConfigError(f"{out}: overwrite would delete this run's own inputs {inside}, which are inside it; "
                          "choose another output_dir or move them out first")
    return None


def _check_resume(cfg: RunConfig, out: Path) -> Resumed:
    """The run in ``out`` may be continued with ``cfg``: its config.yaml differs only in RESUME_MAY_CHANGE keys
    (every other difference is named, old and new value), and train.steps does not go below its checkpoint."""
    saved = out / "config.yaml"
    if not (out / "checkpoints").is_dir() or not saved.is_file():
        missing = "checkpoints/ folder" if saved.is_file() else "config.yaml"
        raise FileNotFoundError(f"{out}: nothing to resume (no {missing} there); start the run without --resume")
    with Checkpointer(out / "checkpoints", read_only=True) as checkpoints:
        step = checkpoints.latest_step()
    may_change = RESUME_MAY_CHANGE if step is not None else tuple(k for k in RESUME_MAY_CHANGE if k != "model")
    changes = config_changes(load_run_config(saved), cfg)  # without a checkpoint no base fingerprint checks "model"
    changes.pop("optim.total_steps", None)  # it follows train.steps (RunConfig), which is the change to name
    refused = [f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items()
               if not covered(k, may_change)]
    if refused:
        raise ConfigError(f"{out}: --resume with a config that changes what this run trains: {'; '.join(refused)} "
                          f"(old -> new; {saved} holds the run's config). Resume with that config, e.g. `jaxft train "
                          f"{saved} --resume`, or train the new config into another output_dir. A resume may change "
                          f"only {', '.join(may_change)}")
    if step is not None and cfg.train.steps < step:
        raise ConfigError(f"{out}: train.steps {cfg.train.steps} is below the step this run has reached, checkpoint "
                          f"{step}; resume with train.steps >= {step} (--set train.steps={step} finishes it there)")
    return Resumed(changes, step, step == cfg.train.steps and _summary_steps(out) == step)


def _summary_steps(out: Path) -> int | None:
    """The steps summary.json reports, or None without one: a run resumed for more steps that stopped after its last
    checkpoint but before its export still holds the shorter run's summary, and is not finished."""
    path = out / "summary.json"
    return json.loads(path.read_text()).get("steps") if path.is_file() else None


def _finished(cfg: RunConfig, out: Path, resumed: Resumed) -> dict:
    """A finished run is left as it is: its summary, and a note on how to train it further."""
    if jax.process_index() == 0:  # one note for the whole job
        print(f"{out}: this run is finished (checkpoint {resumed.step} = train.steps, and summary.json); nothing to "
              f"do, nothing was changed. To train it further, resume with more steps, e.g. --resume --set "
              f"train.steps={2 * cfg.train.steps}.", file=sys.stderr)
    return json.loads((out / "summary.json").read_text())


class _Inputs(NamedTuple):
    """Everything the validate phase loads and checks, ready for the loop."""

    tokenizer: Any
    pipeline: Any
    eval_pipeline: Any
    mesh: Any
    model_cfg: Any
    state: dict
    frozen: dict
    step_fn: Any
    n_trainable: int
    base: dict


def _validate(cfg: RunConfig, out: Path, resumed: Resumed | None) -> _Inputs:
    """Loads and checks every input (tokenizer, data, mesh, model, checkpoint, base) without writing anything."""
    tc = cfg.train
    rng = jax.random.PRNGKey(tc.seed)
    tokenizer = load_tokenizer(cfg.tokenizer_dir)
    pipeline, eval_pipeline = _pipelines(cfg, tokenizer)
    mesh = parallel.make_mesh(cfg.mesh)
    _check_batch_fits(cfg, mesh)
    model_cfg, params = load_model(cfg, rng, mesh)
    trainable, frozen = split(params, trainable_predicate(cfg))
    n_trainable = lora.trainable_count(params) if not cfg.full else sum(
        x.size for x in jax.tree.leaves(trainable))

    optimizer = make_optimizer(cfg.optim)
    state = init_state(trainable, optimizer, seed=tc.seed, loss_scale=initial_loss_scale(model_cfg))
    state = jax.device_put(state, parallel.state_shardings(state, mesh))
    frozen = parallel.shard_params(frozen, mesh)
    step_fn = jit_train_step(model_cfg, StepConfig(loss_chunk_size=tc.loss_chunk_size), optimizer, mesh, state,
                             frozen)
    base = base_reference(cfg.model)
    if resumed and resumed.step is not None:
        with Checkpointer(out / "checkpoints", read_only=True) as checkpoints:
            state, extra = checkpoints.restore(jax.tree.map(lambda x: x.sharding, state))
        check_base(extra["base"], cfg.model, current=base)
        pipeline.iterator.set_state(_own_iterator_state(extra["iterators"], out))
    return _Inputs(tokenizer, pipeline, eval_pipeline, mesh, model_cfg, state, frozen, step_fn, n_trainable, base)


def _write_run_dir(cfg: RunConfig, out: Path, resumed: Resumed | None, overwrite: bool):
    """The write phase's first step, once every input has passed: a new run's folder appears with its config.yaml in
    one rename (with overwrite, replacing the earlier run whole); a resume saves its allowed config changes."""
    if jax.process_count() > 1:  # every process has checked its inputs before process 0 writes
        multihost_utils.sync_global_devices("sft: inputs checked")
    if jax.process_index() == 0:
        if resumed is None:
            with atomic_dir(out, overwrite) as tmp:
                dump_run_config(cfg, tmp / "config.yaml")
        elif resumed.changes:
            dump_run_config(cfg, out / "config.yaml")
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("sft: run folder written")


def _last_logged(out: Path, step: int) -> dict:
    """The last train record up to ``step`` in metrics.jsonl: a run resumed at its final checkpoint trains no step,
    and its summary still reports the loss it ended with."""
    path = out / "metrics.jsonl"
    records = [r for r in read_metrics(path) if r["split"] == "train" and r["step"] <= step] if path.exists() else []
    return records[-1] if records else {}


def run(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Train per ``cfg``; returns a summary (final losses, tokens/s, trainable params, output paths).

    Every input is loaded and checked before ``output_dir`` is written, so a refused run leaves it as it was.
    ``overwrite`` replaces an earlier run whole; ``resume`` continues one whose config.yaml differs only in
    :data:`RESUME_MAY_CHANGE` keys, and leaves a finished run untouched.
    """
    out = Path(cfg.output_dir)
    resumed = _check_run_dir(cfg, out, resume, overwrite)
    if resumed and resumed.finished:
        return _finished(cfg, out, resumed)
    tokenizer, pipeline, eval_pipeline, mesh, model_cfg, state, frozen, step_fn, n_trainable, base = _validate(
        cfg, out, resumed)
    _write_run_dir(cfg, out, resumed, overwrite)
    tc = cfg.train
    batch_sharding = parallel.batch_sharding(mesh, 3, accumulation_axis=True)
    checkpointer = Checkpointer(out / "checkpoints", save_every=tc.save_every or tc.steps, keep_last=tc.keep_last)
    start = int(state["step"])

    eval_step = _eval_step(model_cfg, tc.loss_chunk_size or 1024)

    def run_eval():
        batches = _eval_batches(eval_pipeline.iterator, tc.eval_batches, batch_sharding)
        return evaluate(lambda b: eval_step(state["trainable"], frozen, b), batches)

    last, last_eval = _last_logged(out, start) if start else {}, None  # read before process 0 appends to the log
    logger = MetricsLogger(out, tc.steps, tensorboard=tc.tensorboard, log_every=tc.log_every, start_step=start)
    if resumed:
        logger.log_resume(start, resumed.changes)
    schedule = make_schedule(cfg.optim)
    throughput, guard = Throughput(), SkipGuard(tc.max_skipped_steps)
    for step in range(start + 1, tc.steps + 1):
        batches = stack_micro_batches(pipeline.iterator, tc.grad_accum, batch_sharding)
        state, metrics = step_fn(state, frozen, batches)
        guard.check(step, metrics)
        last = {**metrics, "lr": float(schedule(step - 1)), **throughput.tick(*count_tokens(batches))}
        logger.log(step, last)
        if eval_pipeline and ((tc.eval_every and step % tc.eval_every == 0) or step == tc.steps):
            last_eval = run_eval()
            logger.log_eval(step, last_eval)
        if step % checkpointer.save_every == 0 or step == tc.steps:
            checkpointer.save(step, state, {"iterators": _iterator_states(pipeline.iterator), "base": base},
                              force=step == tc.steps)
    checkpointer.close()
    logger.close()
    guard.finish()  # a run in which no update was applied is not a success

    params = combine(_to_host(state["trainable"]), _to_host(frozen))
    # the final step's evaluation, else one now (the same batches either way)
    summary = run_summary(tc, n_trainable, last, throughput, pipeline.report,
                          (last_eval or run_eval()) if eval_pipeline else None)
    return publish(cfg, out, summary, params, tokenizer, pipeline.chat_template)


def run_summary(tc, n_trainable: int, last: dict, throughput: Throughput, report, eval_result: dict | None) -> dict:
    """What summary.json reports of a run (``sft.run``, and each member of a parallel run)."""
    summary = {"steps": tc.steps, "trainable_params": int(n_trainable),
               "final_loss": float(last.get("loss", float("nan"))) if last else None,
               "tokens_per_s": last.get("tokens_per_s"), "padding": throughput.padding,
               "data_report": report.summary()}
    return {**summary, "eval": eval_result} if eval_result else summary


def publish(cfg: RunConfig, out: Path, summary: dict, params: dict, tokenizer, chat_template: str | None) -> dict:
    """Process 0 exports the run and writes summary.json; every process returns with the folder complete (a sweep
    then reads the export) and the summary naming the export."""
    summary = {**summary, "export": str(export_dir(cfg, out))}
    if jax.process_index() == 0:
        _export(cfg, params, tokenizer, chat_template, out)
        write_text_atomic(out / "summary.json", json.dumps(summary, indent=2, default=float))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"run folder written: {out}")
    return summary


def _iterator_states(iterator) -> list[dict]:
    """Every process's data position, gathered from all processes: only process 0 writes a checkpoint's JSON,
    and each process resumes from its own entry (their shards, and so their positions, differ)."""
    state = iterator.get_state()
    if jax.process_count() == 1:
        return [state]
    raw = np.frombuffer(json.dumps(state).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.array([raw.size])).ravel()
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:raw.size] = raw
    rows = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(row[:n])) for row, n in zip(rows, lengths)]


def _own_iterator_state(states: list[dict], out: Path) -> dict:
    if len(states) != jax.process_count():
        raise CheckpointError(f"{out}: the checkpoint holds the data positions of {len(states)} process(es), but "
                              f"this run has {jax.process_count()}; resume with the process count that wrote it "
                              "(each process's data shard depends on it)")
    return states[jax.process_index()]


def _to_host(tree):
    """numpy copies of a tree's arrays on every process; arrays spread over several processes are gathered first
    (a collective: every process calls this with the same tree)."""
    return jax.tree.map(lambda x: np.asarray(x if x.is_fully_addressable
                                             else multihost_utils.process_allgather(x, tiled=True)), tree)


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


def _eval_batches(iterator, n: int, sharding):
    """The first ``n`` eval batches, the same ones at every evaluation: the iterator is endless, so reading on
    would score a different subset each time; it is rewound to its start instead."""
    iterator.set_state({**iterator.get_state(), "epoch": 0, "batch": 0})
    for _ in range(n):
        yield {k: v[0] for k, v in stack_micro_batches(iterator, 1, sharding).items()}


def export_dir(cfg: RunConfig, out: Path) -> Path:
    """Where a run exports: ``model/`` for full fine-tuning, else ``adapter/``."""
    return out / ("model" if cfg.full else "adapter")


def _export(cfg: RunConfig, params: dict, tokenizer, chat_template: str | None, out: Path) -> Path:
    """The adapter (PEFT format) with tokenizer and chat template; full fine-tuning exports the whole model,
    replacing an earlier export whole."""
    if cfg.full:
        return write_export(export_dir(cfg, out), params, tokenizer, chat_template=chat_template, overwrite=True,
                            model_cfg=base_config(cfg))
    return write_export(export_dir(cfg, out), params, tokenizer, chat_template=chat_template, overwrite=True,
                        lcfg=cfg.lora, base_model=str(Path(cfg.model).resolve()))


def write_export(out, params: dict, tokenizer, *, model_cfg=None, lcfg=None, base_model: str | None = None,
                 chat_template: str | None = None, overwrite: bool = False) -> Path:
    """One export folder, published whole in one rename (or not at all): a dense HF model (``model_cfg``) or a PEFT
    adapter (``lcfg``, for ``base_model``), with the tokenizer and the chat template. The tensors are taken from
    ``params`` before anything is written, so a tree that cannot be exported leaves ``out`` as it was."""
    tensors = adapter_tensors(params) if lcfg else to_hf_tensors(model_cfg, params)
    with atomic_dir(out, overwrite) as tmp:
        if lcfg:
            write_adapter(tensors, lcfg, tmp, base_model)
        else:
            write_pretrained(model_cfg, tensors, tmp)
        tokenizer.save(tmp)
        if chat_template:
            save_chat_template(chat_template, tmp)
    return Path(out)
