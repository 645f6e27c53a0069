"""The stages every training recipe shares, as plain functions; a recipe (``sft.run``, ``multi.run_parallel``) is a
short script that calls them in order:

    check_run_dir -> load_inputs (tokenizer, data, mesh) -> load_model / build_params -> train_state
    -> restore_checkpoint (a resume) -> write_run_dir -> train_loop with its callbacks on a cadence (log, eval,
    save: ``Every(n, fn)``) -> run_summary -> publish (export, summary.json)

Every input is loaded and checked before the run folder is written, so a refused run leaves it as it was.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxft import parallel
from jaxft.config import ConfigError, ModelConfig, QuantConfig
from jaxft.data import save_chat_template
from jaxft.files import atomic_dir, check_output_dir, occupied, write_text_atomic
from jaxft.hf.checkpoint import from_pretrained, to_hf_tensors, write_pretrained
from jaxft.hf.config import config_from_hf, read_json
from jaxft.hf.peft_format import adapter_tensors, write_adapter
from jaxft.hf.safetensors_io import CheckpointError
from jaxft.hf.tokenizer import load_tokenizer
from jaxft.models.llama import LINEAR_MODULES, init_params
from jaxft.ops import nf4
from jaxft.peft.adapters import is_adapter_config
from jaxft.peft.methods import merge, trainable_count, without_methods
from jaxft.peft.tree import NESTED_MODELS, Trainable, combine, leaf_paths, outer_model, split
from jaxft.recipes.config import TASK_UNION, RunConfig, config_changes, covered, dump_run_config, load_run_config
from jaxft.recipes.tasks import task_eval_pipeline, task_pipeline
from jaxft.train.checkpoint import Checkpointer, check_base
from jaxft.train.flops import ModelFlops
from jaxft.train.loop import StepConfig, init_state, jit_train_step
from jaxft.train.metrics import MetricsLogger, SkipGuard, Throughput, read_metrics, tensorboard_writer_class
from jaxft.train.optim import make_optimizer

# ------------------------------------------------------------------------------------------------ run folder


def check_model_folder(cfg: RunConfig):
    """Fails before anything is written, so a run fixed after this error needs no --overwrite: the model folder
    exists, and a folder of a task-head class is trained with a task of that head."""
    from jaxft.gguf.read import is_gguf

    if cfg.model_dir is not None and is_gguf(cfg.model):
        raise ConfigError(f"model {cfg.model!r} is a GGUF file; a run's base is a Hugging Face model folder (it is "
                          f"fingerprinted and exported by its files): convert it first, `jaxft convert {cfg.model} "
                          "--out DIR`, and point `model` at DIR")
    if cfg.model_dir is not None and not (Path(cfg.model) / "config.json").is_file():
        raise ConfigError(f"model {cfg.model!r}: no config.json there (is it a Hugging Face model folder?); point "
                          "`model` at a folder with config.json and *.safetensors")
    folder_head = base_config(cfg).head
    if cfg.head is None and folder_head is not None:
        raise ConfigError(f"model {cfg.model!r} is a {folder_head.kind} model (a task head, no lm_head), but task "
                          f"{TASK_UNION.type_of(cfg.task)!r} trains a causal LM's next-token head; give the task of "
                          "its head (task: {type: classify | token_classify | qa}) or point model at its causal-LM "
                          "base")


# What a resume may change: how the run is executed, logged, evaluated and saved, never what is trained. The mesh
# is here because a resume on another mesh continues the same run (within float tolerance, tests/test_resume.py),
# and the model path because check_base compares the base's bytes wherever the folder now is.
RESUME_MAY_CHANGE = ("output_dir", "model", "train.steps", "train.log_every", "train.eval_every", "train.eval_batches",
                     "train.save_every", "train.keep_last", "train.tensorboard", "train.remat", "train.attention",
                     "train.max_skipped_steps", "train.loss_chunk_size", "train.sample_every", "train.sample_prompts",
                     "train.sample_max_new_tokens", "mesh", "eval_data", "optim.offload_state")


@dataclass(frozen=True)
class Resumed:
    """The run a ``resume`` continues, as read from its folder before anything is loaded or written."""

    changes: dict   # "section.key" -> [old, new]: the changes to config.yaml this resume makes (all allowed ones)
    step: int | None  # its newest complete checkpoint; None when it stopped before the first one
    finished: bool  # that checkpoint is at train.steps and summary.json reports it: nothing is left to do


def check_run_dir(cfg: RunConfig, out: Path, resume: bool, overwrite: bool) -> Resumed | None:
    """Reads only: refuses an output_dir this run may not use, or a setting whose optional package is missing,
    before anything is loaded."""
    check_model_folder(cfg)
    if cfg.train.tensorboard:
        tensorboard_writer_class()
    _check_stores_outside(cfg, out)
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


def _check_stores_outside(cfg: RunConfig, out: Path):
    """A pre-tokenized store (``data.store``, ``eval_data.store``) is an input that outlives runs and is costly to
    rebuild: one inside output_dir would be deleted by the run's --overwrite, so the config is refused whatever the
    flags."""
    for key, data in (("data", cfg.data), ("eval_data", cfg.eval_data)):
        store = getattr(data, "store", None)
        if store is not None and Path(store).resolve().is_relative_to(out.resolve()):
            raise ConfigError(f"{key}.store {store!r} is inside output_dir {str(out)!r}, which --overwrite deletes "
                              f"whole; keep pre-tokenized stores outside run folders (move it, or choose another "
                              f"output_dir)")


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


def finished_summary(cfg: RunConfig, out: Path, resumed: Resumed) -> dict:
    """A finished run is left as it is: its summary, and a note on how to train it further."""
    if jax.process_index() == 0:  # one note for the whole job
        print(f"{out}: this run is finished (checkpoint {resumed.step} = train.steps, and summary.json); nothing to "
              f"do, nothing was changed. To train it further, resume with more steps, e.g. --resume --set "
              f"train.steps={2 * cfg.train.steps}.", file=sys.stderr)
    return json.loads((out / "summary.json").read_text())


def write_run_dir(cfg: RunConfig, out: Path, resumed: Resumed | None, overwrite: bool):
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


def last_logged(out: Path, step: int) -> dict:
    """The last train record up to ``step`` in metrics.jsonl: a run resumed at its final checkpoint trains no step,
    and its summary still reports the loss it ended with."""
    path = out / "metrics.jsonl"
    records = [r for r in read_metrics(path) if r["split"] == "train" and r["step"] <= step] if path.exists() else []
    return records[-1] if records else {}


# ------------------------------------------------------------------------------------------------ data and mesh


class Inputs(NamedTuple):
    """What every recipe reads before its model: tokenizer, data pipelines, mesh and how batches lie on it."""

    tokenizer: Any
    pipeline: Any
    eval_pipeline: Any  # None without eval_data; {source name: pipeline} for a task that evaluates sources apart
    mesh: Any
    batch_sharding: Any  # of the stacked [micro-batches, B, T] arrays


def load_inputs(cfg: RunConfig) -> Inputs:
    """Tokenizer, train and eval pipelines, and the mesh, checked against each other; nothing is written."""
    tokenizer = load_tokenizer(cfg.tokenizer_dir)
    check_pad_token(cfg, tokenizer)
    pipeline, eval_pipeline = _pipelines(cfg, tokenizer)
    mesh = parallel.make_mesh(cfg.mesh)
    _check_batch_fits(cfg, mesh)
    return Inputs(tokenizer, pipeline, eval_pipeline, mesh, parallel.batch_sharding(mesh, 3, accumulation_axis=True))


def _pipelines(cfg: RunConfig, tokenizer):
    """(train pipeline, eval pipeline(s) or None) as the run's task reads its data; token ids the model has no
    embedding row for are refused here."""
    placement = dict(tokenizer=tokenizer, process_index=jax.process_index(), process_count=jax.process_count(),
                     vocab_size=base_config(cfg).vocab_size)
    return (task_pipeline(cfg.task, cfg.data, **placement),
            task_eval_pipeline(cfg.task, cfg.eval_data, **placement) if cfg.eval_data else None)


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


def stack_micro_batches(iterator, n: int, sharding, keys: tuple[str, ...]) -> dict:
    """``n`` host batches [B, T, ...] -> one global [n, B, T, ...] array per key (an objective's ``batch_keys``),
    each process giving its local rows; integers as int32, floats (regression targets) as float32."""
    local = [next(iterator) for _ in range(n)]
    out = {}
    for key in keys:
        stacked = np.stack([b[key] for b in local])
        stacked = stacked.astype(np.float32 if np.issubdtype(stacked.dtype, np.floating) else np.int32)
        out[key] = jax.make_array_from_process_local_data(sharding, stacked)
    return out


@jax.jit
def _real_tokens(segment_ids):
    return jnp.sum(segment_ids != 0, dtype=jnp.int32)


def count_tokens(batches: dict) -> tuple[int, int]:
    """(real tokens, token slots) of a global batch: padding (segment id 0, ``jaxft.data.packing``) is no token of
    the data, so tokens/s counts only the rest. Summed on the devices, so every process gets the global count."""
    return int(_real_tokens(batches["segment_ids"])), int(np.prod(batches["segment_ids"].shape))


def next_batches(cfg: RunConfig, inputs: Inputs) -> Callable[[Any], dict]:
    """The loop's batch source: ``train.grad_accum`` micro-batches of the objective's keys, stacked on the mesh (the
    train state it is given is not needed: the data does not depend on the params, as an RL run's rollouts do)."""
    keys = cfg.objective().batch_keys
    return lambda _state: stack_micro_batches(inputs.pipeline.iterator, cfg.train.grad_accum, inputs.batch_sharding,
                                              keys)


def eval_batches(iterator, n: int, sharding, keys: tuple[str, ...]):
    """The first ``n`` eval batches, the same ones at every evaluation: the iterator is endless, so reading on
    would score a different subset each time; it is rewound to its start instead. At most one epoch: past it the
    same records would be scored again (every process stops at the fewest batches any process has). The count is
    ``batches_up_to(n)``: a streamed eval corpus is read only as far as its first ``n`` batches."""
    iterator.rewind()
    available = np.array([iterator.batches_up_to(n)])
    if jax.process_count() > 1:
        available = multihost_utils.process_allgather(available)
    for _ in range(int(available.min())):
        yield {k: v[0] for k, v in stack_micro_batches(iterator, 1, sharding, keys).items()}


# ------------------------------------------------------------------------------------------------ model


def load_base(cfg: RunConfig, mesh=None):
    """(model config with the run's memory knobs, base params: 4-bit for QLoRA); with a mesh each process reads only
    its slices. An inline model config (training from scratch) starts from ``init_params`` at train.seed, in the
    run's dtype and compute_dtype as a folder's weights would be."""
    if cfg.model_dir is None:
        model_cfg = inline_model_config(cfg)
        return model_cfg, init_params(model_cfg, jax.random.PRNGKey(cfg.train.seed), cfg.dtype)
    model_cfg, params = from_pretrained(cfg.model, dtype=cfg.dtype, compute_dtype=cfg.compute_dtype,
                                        quant=cfg.quant, mesh=mesh, head=cfg.head, head_seed=cfg.train.seed)
    return cfg.train.apply(model_cfg), params


def inline_model_config(cfg: RunConfig) -> ModelConfig:
    """An inline model config with the run's compute dtype and memory knobs, as :func:`load_base` trains it."""
    return cfg.train.apply(cfg.model.replace(dtype=cfg.compute_dtype or cfg.dtype, head=cfg.head))


def base_config(cfg: RunConfig) -> ModelConfig:
    """The base model's config as written: the inline one, or the model folder's config.json."""
    return cfg.model if cfg.model_dir is None else config_from_hf(read_json(Path(cfg.model) / "config.json"))


def export_config(cfg: RunConfig, tokenizer) -> ModelConfig:
    """The exported model's config: the base's with the task's head, as the run loaded it
    (:meth:`ModelConfig.with_head`), and the tokenizer's pad id for a sequence classifier (:func:`with_pad_token`)."""
    return with_pad_token(base_config(cfg).with_head(cfg.head, str(cfg.model_dir)), tokenizer)


def with_pad_token(model_cfg: ModelConfig, tokenizer) -> ModelConfig:
    """A sequence classifier's config with the tokenizer's pad id where it names none: transformers finds each
    sequence's last token by it (:func:`check_pad_token` refuses a run with neither before it writes)."""
    if model_cfg.head is None or model_cfg.head.kind != "seq_cls" or model_cfg.pad_token_id is not None:
        return model_cfg
    return model_cfg.replace(pad_token_id=tokenizer.pad_token_id)


def check_pad_token(cfg: RunConfig, tokenizer):
    """A sequence classifier's export needs a pad id (transformers finds each sequence's last token by it): the
    base's config.json or the tokenizer must name one. Checked before anything is written."""
    if cfg.head is not None and cfg.head.kind == "seq_cls" and base_config(cfg).pad_token_id is None and (
            tokenizer.pad_token_id is None):
        raise ConfigError(f"task classify: neither the base's config.json ({cfg.model_dir or 'inline model'}) nor the "
                          f"tokenizer ({cfg.tokenizer_dir}) names a pad token, and transformers' "
                          "*ForSequenceClassification needs pad_token_id to score batches; add a pad token to the "
                          "tokenizer (a token of its own: with pad = eos, transformers would score the token before "
                          "a final eos) or set pad_token_id in config.json")


def build_params(model_cfg: ModelConfig, base: dict, rng, *, quant: QuantConfig | None = None,
                 peft: tuple = (), tokenizer_dir: str | None = None) -> dict:
    """A run's params over its base: every linear kernel in 4-bit per ``quant`` (a base built in memory; the loader
    gives a QLoRA run's base already 4-bit), then each ``peft`` method's leaves (``method.add``, with
    :func:`method_inputs`). Pure but for a TEXT init's tokenizer, so ``jax.eval_shape`` of it gives the run's param
    shapes without a weight (the memory estimate)."""
    if quant is not None:
        layers = dict(base["layers"])
        for m in LINEAR_MODULES:
            layers[m] = {**layers[m], "kernel": nf4.quantize(layers[m]["kernel"], quant.blocksize, quant.double_quant,
                                                             quant.quant_type)}
        base = {**base, "layers": layers}
    for method, method_rng in zip(peft, [rng] if len(peft) == 1 else jax.random.split(rng, len(peft))):
        base = method.add(model_cfg, base, method_rng, **method_inputs(with_run_tokenizer(method, tokenizer_dir)))
    return base


def with_run_tokenizer(method, tokenizer_dir: str | None):
    """A TEXT-initialized prompt tuning config that names no tokenizer, with the run's (``tokenizer_dir``): the run
    tokenizes ``prompt_tuning_init_text`` with it, and its export's adapter config records it, as PEFT needs. The run
    config itself keeps none, so moving the model folder does not change it (a resume may move it)."""
    if getattr(method, "prompt_tuning_init", None) != "TEXT" or method.tokenizer_name_or_path or not tokenizer_dir:
        return method
    return dataclasses.replace(method, tokenizer_name_or_path=str(tokenizer_dir))


def method_inputs(method) -> dict:
    """What a method's ``add`` reads from files: a TEXT-initialized prompt tuning's ``text_ids``, its init text
    tokenized as PEFT does (``tokenizer(prompt_tuning_init_text)["input_ids"]``, special tokens included) with the
    tokenizer its config names (:func:`with_run_tokenizer`)."""
    if getattr(method, "prompt_tuning_init", None) != "TEXT":
        return {}
    return {"text_ids": load_tokenizer(method.tokenizer_name_or_path).encode(method.prompt_tuning_init_text)}


def load_model(cfg: RunConfig, rng, mesh=None):
    """(model config, params with adapters for LoRA/QLoRA)."""
    model_cfg, base = load_base(cfg, mesh)
    return model_cfg, build_params(model_cfg, base, rng, peft=cfg.peft, tokenizer_dir=cfg.tokenizer_dir)


def initial_loss_scale(model_cfg) -> float | None:
    """fp16 compute trains with dynamic loss scaling from 2**15; other dtypes need none."""
    return 2.0 ** 15 if model_cfg.dtype == "float16" else None


def trainable_spec(cfg: RunConfig, model_cfg: ModelConfig, params: dict) -> Trainable:
    """What the run trains in ``params`` (its base with every method added): everything for full fine-tuning,
    else each method's trained leaves and the whole leaves its config selects (``modules_to_save``, ``bias``)."""
    spec = Trainable(everything=cfg.full)
    for method in cfg.peft:
        spec = spec | method.trainable(model_cfg, params)
    for key in NESTED_MODELS:  # a nested model's methods train as they declare, its head (the rest) whole
        if key in params:
            spec = spec | Trainable(frozenset(f"{key}/{path}" for path in leaf_paths(without_methods(params[key]))))
    return spec


# ------------------------------------------------------------------------------------------------ train state


def step_config(cfg: RunConfig) -> StepConfig:
    """What the train step computes per micro-batch, for every recipe's step."""
    return StepConfig(objective=cfg.objective())


class Training(NamedTuple):
    """A single run's sharded train state, frozen params and jitted step ``step_fn(state, frozen, batches)``."""

    state: dict
    frozen: dict
    step_fn: Any
    n_trainable: int  # without rank padding, as PEFT counts
    trainable: Trainable  # what trains: static, beside the params


def train_state(cfg: RunConfig, model_cfg, params: dict, mesh) -> Training:
    """Split ``params`` into trained and frozen leaves, build the optimizer and its state on ``mesh``, and jit the
    step (state donated)."""
    spec = trainable_spec(cfg, model_cfg, params)
    trainable, frozen = split(params, spec)
    n_trainable = trainable_count(params, spec) if not cfg.full else sum(x.size for x in jax.tree.leaves(trainable))
    optimizer = make_optimizer(cfg.optim)
    state = init_state(trainable, optimizer, seed=cfg.train.seed, loss_scale=initial_loss_scale(model_cfg))
    state = jax.device_put(state, parallel.state_shardings(state, mesh))
    frozen = parallel.shard_params(frozen, mesh)
    step_fn = jit_train_step(model_cfg, step_config(cfg), optimizer, mesh, state, frozen)
    return Training(state, frozen, step_fn, n_trainable, spec)


# ------------------------------------------------------------------------------------------------ checkpoints


def restore_checkpoint(cfg: RunConfig, out: Path, state: dict, iterator, base: dict) -> dict:
    """The state of the run's newest checkpoint, laid out as ``state`` is; the base must be the one it trained on,
    and the data ``iterator`` continues from this process's saved position."""
    with Checkpointer(out / "checkpoints", read_only=True) as checkpoints:
        state, extra = checkpoints.restore(jax.tree.map(lambda x: x.sharding, state))
    check_base(extra["base"], cfg.model, current=base)
    iterator.set_state(_own_iterator_state(extra["iterators"], out))
    return state


def save_checkpoint(checkpointer: Checkpointer, last_step: int, iterator, base: dict) -> Callable:
    """A callback saving the state with every process's data position and the base's fingerprint; the last step's
    save is forced and waited for."""
    def save(result: StepResult):
        checkpointer.save(result.step, result.state, {"iterators": iterator_states(iterator), "base": base},
                          force=result.step == last_step)

    return save


def iterator_states(iterator) -> list[dict]:
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


# ------------------------------------------------------------------------------------------------ the loop


class StepResult(NamedTuple):
    """What a callback sees after a step."""

    step: int
    state: Any  # after the step
    metrics: dict  # the step's metrics, on the devices
    speed: dict  # Throughput.tick's tokens/s, step time and padding


@dataclass(frozen=True)
class Every:
    """``fn(result)`` after every ``n``-th step and after the last step (only after the last when ``n`` is 0 or
    None)."""

    n: int | None
    fn: Callable[[StepResult], None]

    def due(self, step: int, last_step: int) -> bool:
        return bool(self.n) and step % self.n == 0 or step == last_step


@dataclass
class Latest:
    """The newest train and eval records a recipe's callbacks logged, for its summary."""

    train: Any
    eval: Any = None


def train_loop(state, steps: range, update: Callable, next_batches: Callable, guard: SkipGuard,
               throughput: Throughput, callbacks: list[Every]):
    """``state, metrics = update(state, next_batches(state))`` for each step, with the non-finite guard and the
    throughput, then the callbacks due at this step, in order; returns the final state."""
    for step in steps:
        batches = next_batches(state)
        state, metrics = update(state, batches)
        guard.check(step, metrics)
        result = StepResult(step, state, metrics, throughput.tick(*count_tokens(batches)))
        for callback in callbacks:
            if callback.due(step, steps.stop - 1):
                callback.fn(result)
    return state


def train_and_publish(cfg: RunConfig, out: Path, inputs: Inputs, training: Training, base: dict, resumed, *,
                      batches: Callable[[Any], dict], run_eval: Callable[[Any], dict],
                      log_train: Callable[[MetricsLogger, Latest], Callable],
                      sampler: Callable[[Any], list[dict]] | None = None, flops: ModelFlops | None = None) -> dict:
    """The loop of a single run and its end: ``train.steps`` steps from the (restored) state, each on
    ``batches(state)``, logged by ``log_train(logger, latest)``, evaluated by ``run_eval(trainable)`` every
    ``train.eval_every`` steps (with eval data), sampled by ``sampler(trainable)`` every ``train.sample_every``
    steps (with a sampler), checkpointed every ``train.save_every``; then the summary (with ``flops``, the MFU and
    the numbers it is computed from) and the export (:func:`publish`). A step's samples are logged before its
    checkpoint: a run resumed from that checkpoint has them and does not sample that step again."""
    tc, frozen = cfg.train, training.frozen
    checkpointer = Checkpointer(out / "checkpoints", save_every=tc.save_every or tc.steps, keep_last=tc.keep_last)
    start = int(training.state["step"])
    latest = Latest(last_logged(out, start) if start else {})  # read before process 0 appends to the log
    logger = MetricsLogger(out, tc.steps, tensorboard=tc.tensorboard, log_every=tc.log_every, start_step=start)
    if resumed:
        logger.log_resume(start, resumed.changes)
    callbacks = [Every(1, log_train(logger, latest)),
                 *([Every(tc.eval_every, _log_eval(logger, run_eval, latest))] if inputs.eval_pipeline else []),
                 *([Every(tc.sample_every, lambda r: logger.log_samples(r.step, sampler(r.state["trainable"])))]
                   if sampler else []),
                 Every(checkpointer.save_every, save_checkpoint(checkpointer, tc.steps, inputs.pipeline.iterator,
                                                                base))]
    throughput, guard = Throughput(), SkipGuard(tc.max_skipped_steps)
    state = train_loop(training.state, range(start + 1, tc.steps + 1),
                       lambda st, b: training.step_fn(st, frozen, b), batches, guard, throughput, callbacks)
    checkpointer.close()
    logger.close()
    guard.finish()  # a run in which no update was applied is not a success
    params = combine(to_host(state["trainable"]), to_host(frozen))
    # the final step's evaluation, else one now (the same batches either way)
    summary = run_summary(tc, training.n_trainable, latest.train, throughput, inputs.pipeline.report,
                          (latest.eval or run_eval(state["trainable"])) if inputs.eval_pipeline else None)
    if flops is not None:
        summary.update(flops.report(summary["tokens_per_s"]))
    return publish(cfg, out, summary, params, inputs.tokenizer, inputs.pipeline.chat_template)


def _log_eval(logger: MetricsLogger, run_eval, latest: Latest):
    def log(result: StepResult):
        latest.eval = run_eval(result.state["trainable"])
        logger.log_eval(result.step, latest.eval)

    return log


# ------------------------------------------------------------------------------------------------ summary, export


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
    if jax.process_index() == 0:  # a nested model (PPO's value model) stays in the checkpoints
        _export(cfg, outer_model(params), tokenizer, chat_template, out)
        write_text_atomic(out / "summary.json", json.dumps(summary, indent=2, default=float))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"run folder written: {out}")
    return summary


def to_host(tree):
    """numpy copies of a tree's arrays on every process; arrays spread over several processes are gathered first
    (a collective: every process calls this with the same tree)."""
    return jax.tree.map(lambda x: np.asarray(x if x.is_fully_addressable
                                             else multihost_utils.process_allgather(x, tiled=True)), tree)


def export_dir(cfg: RunConfig, out: Path) -> Path:
    """Where a run exports: ``adapter/`` for a run of one adapter config (PEFT's format), else ``model/`` (full
    fine-tuning, methods without a PEFT type, or several methods, which PEFT's one-type folder cannot hold, merged
    into the weights)."""
    return out / ("adapter" if exports_adapter(cfg) else "model")


def exports_adapter(cfg: RunConfig) -> bool:
    """The run's only method has a PEFT type (:mod:`jaxft.peft.adapters`): it exports a PEFT adapter (else the
    whole model)."""
    return len(cfg.peft) == 1 and is_adapter_config(cfg.peft[0])


def _export(cfg: RunConfig, params: dict, tokenizer, chat_template: str | None, out: Path) -> Path:
    """The adapter (PEFT format) with tokenizer and chat template; other runs export the whole model (methods
    merged in), replacing an earlier export whole."""
    model_cfg = export_config(cfg, tokenizer)
    if not exports_adapter(cfg):
        return write_export(export_dir(cfg, out), merge(params), tokenizer, chat_template=chat_template,
                            overwrite=True, model_cfg=model_cfg)
    return write_export(export_dir(cfg, out), params, tokenizer, chat_template=chat_template, overwrite=True,
                        model_cfg=model_cfg, acfg=with_run_tokenizer(cfg.peft[0], cfg.tokenizer_dir),
                        base_model=str(Path(cfg.model).resolve()))


def write_export(out, params: dict, tokenizer, *, model_cfg=None, acfg=None, base_model: str | None = None,
                 chat_template: str | None = None, overwrite: bool = False) -> Path:
    """One export folder, published whole in one rename (or not at all): a dense HF model (``model_cfg``) or a PEFT
    adapter (``acfg``, an adapter config, for ``base_model``), with the tokenizer and the chat template. The tensors
    are taken from ``params`` before anything is written, so a tree that cannot be exported leaves ``out`` as it was."""
    tensors = adapter_tensors(params, acfg, model_cfg) if acfg else to_hf_tensors(model_cfg, params)
    with atomic_dir(out, overwrite) as tmp:
        if acfg:
            write_adapter(tensors, acfg, tmp, base_model, model_cfg)
        else:
            write_pretrained(model_cfg, tensors, tmp)
        tokenizer.save(tmp)
        if chat_template:
            save_chat_template(chat_template, tmp)
    return Path(out)
