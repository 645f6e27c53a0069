"""Supervised fine-tuning (full, LoRA or QLoRA) from a HF model folder: the whole run in one readable script.

data -> model (+ adapters, 4-bit base) -> mesh -> optimizer -> jitted step -> loop with logs, evals and
checkpoints -> adapter in PEFT format (with tokenizer and chat template).
"""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxft import parallel
from jaxft.config import ConfigError
from jaxft.data import build_iterator, save_chat_template
from jaxft.hf.checkpoint import from_pretrained, prepare_output_dir, save_pretrained
from jaxft.hf.config import config_from_hf, read_json
from jaxft.hf.peft_format import save_adapter
from jaxft.hf.safetensors_io import CheckpointError
from jaxft.hf.tokenizer import load_tokenizer
from jaxft.models.llama import hidden_states, logits_from_hidden
from jaxft.peft import lora
from jaxft.peft.tree import combine, split
from jaxft.recipes.config import RunConfig, dump_run_config
from jaxft.train.checkpoint import Checkpointer, base_reference, check_base
from jaxft.train.loop import StepConfig, init_state, jit_train_step
from jaxft.train.loss import IGNORE_INDEX, cross_entropy
from jaxft.train.metrics import MetricsLogger, SkipGuard, Throughput, evaluate
from jaxft.train.optim import make_optimizer, make_schedule


def load_base(cfg: RunConfig, mesh=None):
    """(model config with the run's memory knobs, base params: 4-bit for QLoRA); with a mesh each process reads only
    its slices."""
    quant = cfg.quant if cfg.method == "qlora" else None
    model_cfg, params = from_pretrained(cfg.model, dtype=cfg.dtype, compute_dtype=cfg.compute_dtype, quant=quant,
                                        mesh=mesh)
    return cfg.train.apply(model_cfg), params


def load_model(cfg: RunConfig, rng, mesh=None):
    """(model config, params with adapters for LoRA/QLoRA)."""
    model_cfg, params = load_base(cfg, mesh)
    if cfg.method != "full":
        params = lora.add(model_cfg, params, cfg.lora, rng)
    return model_cfg, params


def initial_loss_scale(model_cfg) -> float | None:
    """fp16 compute trains with dynamic loss scaling from 2**15; other dtypes need none."""
    return 2.0 ** 15 if model_cfg.dtype == "float16" else None


def trainable_predicate(cfg: RunConfig):
    """Full fine-tuning trains every leaf; otherwise the tree's own predicate (adapters + marked leaves)."""
    return (lambda path, leaf: True) if cfg.method == "full" else None


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
    """Batch rows are split over the data and fsdp axes; say so before jit fails with a tiling message."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    rows = cfg.data.batch_size * jax.process_count()
    if rows % shards:
        raise ConfigError(f"data.batch_size {cfg.data.batch_size} x {jax.process_count()} process(es) = {rows} rows "
                          f"do not split over the mesh's data x fsdp = {shards} devices; use a batch_size that makes "
                          f"the global batch a multiple of {shards}, or change mesh")


def check_model_folder(cfg: RunConfig):
    """Fails before anything is written, so a run fixed after this error needs no --overwrite."""
    if not (Path(cfg.model) / "config.json").is_file():
        raise ConfigError(f"model {cfg.model!r}: no config.json there (is it a Hugging Face model folder?); point "
                          "`model` at a folder with config.json and *.safetensors")


def _pipelines(cfg: RunConfig, tokenizer):
    """(train pipeline, eval pipeline or None); token ids the model has no embedding row for are refused here."""
    vocab_size = config_from_hf(read_json(Path(cfg.model) / "config.json")).vocab_size
    build = partial(build_iterator, tokenizer=tokenizer, process_index=jax.process_index(),
                    process_count=jax.process_count(), vocab_size=vocab_size)
    return build(cfg.data), build(cfg.eval_data) if cfg.eval_data else None


def _prepare_run_dir(cfg: RunConfig, resume: bool, overwrite: bool) -> Path:
    check_model_folder(cfg)
    out = Path(cfg.output_dir)
    if resume:
        if not (out / "checkpoints").exists():
            raise FileNotFoundError(f"{out}: nothing to resume (no checkpoints/ folder)")
        return out
    final, tmp = prepare_output_dir(out, overwrite)
    tmp.rmdir()
    final.mkdir(parents=True, exist_ok=True)
    if jax.process_count() > 1:  # every process checks the folder before process 0 writes into it
        multihost_utils.sync_global_devices("sft: run folder checked")
    return final


def run(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Train per ``cfg``; returns a summary (final losses, tokens/s, trainable params, output paths)."""
    check_model_folder(cfg)
    tc = cfg.train
    rng = jax.random.PRNGKey(tc.seed)
    tokenizer = load_tokenizer(cfg.model)
    pipeline, eval_pipeline = _pipelines(cfg, tokenizer)
    mesh = parallel.make_mesh(cfg.mesh)
    _check_batch_fits(cfg, mesh)
    model_cfg, params = load_model(cfg, rng, mesh)
    out = _prepare_run_dir(cfg, resume, overwrite)  # only once data and weights have been checked
    is_main = jax.process_index() == 0
    if is_main:
        dump_run_config(cfg, out / "config.yaml")
    trainable, frozen = split(params, trainable_predicate(cfg))
    n_trainable = lora.trainable_count(params) if cfg.method != "full" else sum(
        x.size for x in jax.tree.leaves(trainable))

    optimizer = make_optimizer(cfg.optim)
    state = init_state(trainable, optimizer, seed=tc.seed, loss_scale=initial_loss_scale(model_cfg))
    state = jax.device_put(state, parallel.state_shardings(state, mesh))
    frozen = parallel.shard_params(frozen, mesh)
    step_fn = jit_train_step(model_cfg, StepConfig(loss_chunk_size=tc.loss_chunk_size), optimizer, mesh, state,
                             frozen)
    batch_sharding = parallel.batch_sharding(mesh, 3, accumulation_axis=True)

    checkpointer = Checkpointer(out / "checkpoints", save_every=tc.save_every or tc.steps, keep_last=tc.keep_last)
    if resume and checkpointer.latest_step() is not None:
        state, extra = checkpointer.restore(jax.tree.map(lambda x: x.sharding, state))
        check_base(extra["base"], cfg.model)
        pipeline.iterator.set_state(_own_iterator_state(extra["iterators"], out))
    start = int(state["step"])

    eval_step = _eval_step(model_cfg, tc.loss_chunk_size or 1024)

    def run_eval():
        batches = _eval_batches(eval_pipeline.iterator, tc.eval_batches, batch_sharding)
        return evaluate(lambda b: eval_step(state["trainable"], frozen, b), batches)

    base = base_reference(cfg.model)
    logger = MetricsLogger(out, tc.steps, tensorboard=tc.tensorboard, log_every=tc.log_every, start_step=start)
    schedule = make_schedule(cfg.optim)
    throughput, guard = Throughput(), SkipGuard(tc.max_skipped_steps)
    last, last_eval = {}, None
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
    summary = {"steps": tc.steps, "trainable_params": int(n_trainable),
               "final_loss": float(last.get("loss", float("nan"))) if last else None,
               "tokens_per_s": last.get("tokens_per_s"), "padding": throughput.padding,
               "data_report": pipeline.report.summary()}
    if eval_pipeline:  # the final step's evaluation, else one now (the same batches either way)
        summary["eval"] = last_eval or run_eval()
    summary["export"] = str(export_dir(cfg, out))
    if is_main:
        _export(cfg, params, tokenizer, pipeline.chat_template, out)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    if jax.process_count() > 1:  # every process returns with the folder complete (a sweep then reads the export)
        multihost_utils.sync_global_devices("sft: run folder written")
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
    return out / ("model" if cfg.method == "full" else "adapter")


def _export(cfg: RunConfig, params: dict, tokenizer, chat_template: str | None, out: Path) -> Path:
    """The adapter (PEFT format) with tokenizer and chat template; full fine-tuning exports the whole model."""
    target = export_dir(cfg, out)
    if cfg.method == "full":
        model_cfg = config_from_hf(read_json(Path(cfg.model) / "config.json"))
        save_pretrained(model_cfg, params, target, overwrite=True)
    else:
        save_adapter(params, cfg.lora, target, base_model_name_or_path=str(Path(cfg.model).resolve()),
                     overwrite=True)
    tokenizer.save(target)
    if chat_template:
        save_chat_template(chat_template, target)
    return target
