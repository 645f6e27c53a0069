"""The jitted train step: micro-batch accumulation, chunked cross-entropy, NaN guard, sharded in/out.

Gradients are taken only with respect to the trainable part of the tree (``jaxft.split``): frozen weights get
neither gradients nor optimizer state. The loss is the token-level cross-entropy summed over every target token
of the whole accumulated batch and divided by their total count, so accumulating A micro-batches gives the same
update as one batch A times larger, however unevenly the targets fall.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import optax

from jaxft.config import ModelConfig
from jaxft.data.chat import IGNORE_INDEX
from jaxft.models.llama import hidden_states, lm_head_kernel, logits_from_hidden
from jaxft.peft.tree import combine
from jaxft.train.loss import chunked_cross_entropy, cross_entropy

BATCH_KEYS = ("input_ids", "labels", "segment_ids", "positions")


@dataclass(frozen=True)
class StepConfig:
    """Static settings of the train step."""

    loss_chunk_size: int = 1024  # tokens per chunk of the chunked cross-entropy; 0 = full logits
    skip_nonfinite: bool = True  # skip (and report) updates whose gradients are not finite
    activation_sharding: object = None  # sharding of [B, T, D] activations at layer boundaries (set per mesh)
    loss_scale_interval: int = 2000  # fp16: double the loss scale after this many finite steps in a row


def token_loss_sum(cfg: ModelConfig, params: dict, batch: dict, rng, chunk_size: int, activation_sharding=None):
    """(sum of per-token CE, number of target tokens) for one micro-batch ``[B, T]``."""
    lm_head_lora = "lora_a" in params.get("lm_head", {})
    body_rng, head_rng = (None, None) if rng is None else jax.random.split(rng)
    h, _ = hidden_states(cfg, params, batch["input_ids"], batch.get("positions"), batch.get("segment_ids"),
                         rng=body_rng, activation_sharding=activation_sharding)
    if chunk_size and not lm_head_lora:
        return chunked_cross_entropy(h, lm_head_kernel(cfg, params), batch["labels"], chunk_size=chunk_size)
    return cross_entropy(logits_from_hidden(cfg, params, h, head_rng), batch["labels"])


def _accumulated_grads(cfg, step_cfg, trainable, frozen, batches, rng, scale=1.0):
    """Sum of per-micro-batch gradients of (loss sum / total targets), scanned over the leading [A] axis.

    The loss is multiplied by ``scale`` before differentiation (fp16 loss scaling) and the result divided again.
    """
    total = jnp.maximum(jnp.sum(batches["labels"] != IGNORE_INDEX), 1).astype(jnp.float32)

    def micro(carry, xs):
        grads, loss = carry
        batch, key = xs

        def loss_fn(t):
            loss_sum, _ = token_loss_sum(cfg, combine(t, frozen), batch, key, step_cfg.loss_chunk_size,
                                         step_cfg.activation_sharding)
            return loss_sum / total * scale

        value, g = jax.value_and_grad(loss_fn)(trainable)
        return (jax.tree.map(jnp.add, grads, g), loss + value), None

    n_micro = batches["input_ids"].shape[0]
    keys = jax.random.split(rng, n_micro) if rng is not None else None
    zeros = jax.tree.map(jnp.zeros_like, trainable)
    (grads, loss), _ = jax.lax.scan(micro, (zeros, jnp.zeros((), jnp.float32)), (batches, keys))
    return jax.tree.map(lambda g: g / scale, grads), loss / scale, total


def train_step(cfg: ModelConfig, step_cfg: StepConfig, optimizer: optax.GradientTransformation,
               state: dict, frozen: dict, batches: dict):
    """One optimizer update. ``state`` = {step, trainable, opt_state, rng}; ``batches`` leaves are [A, B, T].

    Returns (new state, metrics). With ``skip_nonfinite`` an update whose gradients hold NaN/inf is dropped:
    params and optimizer state stay as they were and ``metrics["skipped"]`` is 1.
    A state with a ``loss_scale`` (fp16 training) gets dynamic loss scaling: halved on a non-finite step,
    doubled after ``loss_scale_interval`` finite steps in a row.
    """
    rng, step_rng = jax.random.split(state["rng"])
    scale = state.get("loss_scale", 1.0)
    grads, loss, n_targets = _accumulated_grads(cfg, step_cfg, state["trainable"], frozen, batches, step_rng,
                                                scale)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["trainable"])
    trainable = optax.apply_updates(state["trainable"], updates)
    finite = jnp.isfinite(grad_norm)
    if step_cfg.skip_nonfinite:
        keep_new = partial(_select_in_device_memory, finite)
        trainable = jax.tree.map(keep_new, trainable, state["trainable"])
        opt_state = jax.tree.map(keep_new, opt_state, state["opt_state"])
    new_state = {"step": state["step"] + 1, "trainable": trainable, "opt_state": opt_state, "rng": rng}
    metrics = {"loss": loss, "grad_norm": grad_norm, "n_targets": n_targets,
               "skipped": (~finite).astype(jnp.int32)}
    if "loss_scale" in state:
        good = jnp.where(finite, state["good_steps"] + 1, 0)
        grow = good >= step_cfg.loss_scale_interval
        new_state["loss_scale"] = jnp.where(finite, jnp.where(grow, scale * 2, scale), jnp.maximum(scale / 2, 1.0))
        new_state["good_steps"] = jnp.where(grow, 0, good)
        metrics["loss_scale"] = scale
    return new_state, metrics


def _select_in_device_memory(keep_new, new, old):
    """``where(keep_new, new, old)``; host-resident (offloaded) values are brought to device memory for the select
    and the result put back, because accelerators compute only on device memory."""
    if jax.typeof(old).memory_space != jax.memory.Space.Host:
        return jnp.where(keep_new, new, old)
    on_device = partial(jax.device_put, device=jax.memory.Space.Device)
    return jax.device_put(jnp.where(keep_new, on_device(new), on_device(old)), jax.memory.Space.Host)


def init_state(trainable: dict, optimizer: optax.GradientTransformation, seed: int = 0,
               loss_scale: float | None = None) -> dict:
    """A fresh train state; pass ``loss_scale`` (e.g. 2**15) for fp16 compute with dynamic loss scaling."""
    state = {"step": jnp.zeros((), jnp.int32), "trainable": trainable, "opt_state": optimizer.init(trainable),
             "rng": jax.random.PRNGKey(seed)}
    if loss_scale is not None:
        state.update(loss_scale=jnp.asarray(loss_scale, jnp.float32), good_steps=jnp.zeros((), jnp.int32))
    return state


def metric_names(state: dict) -> tuple[str, ...]:
    """The metrics :func:`train_step` returns for ``state`` (each gets an output sharding under a mesh)."""
    return ("loss", "grad_norm", "n_targets", "skipped") + (("loss_scale",) if "loss_scale" in state else ())


def jit_train_step(cfg: ModelConfig, step_cfg: StepConfig, optimizer, mesh=None, state=None, frozen=None,
                   rules=None):
    """``train_step`` under ``jax.jit`` with the state donated.

    With a ``mesh`` (and example ``state`` / ``frozen`` trees) every input and output gets an explicit
    NamedSharding from the rules table: params and their optimizer moments per their logical axes, batches over
    (data, fsdp), metrics replicated. Explicit shardings everywhere also let donation pair buffers by memory kind
    (host-offloaded optimizer state).
    """
    fn = partial(train_step, cfg, step_cfg, optimizer)
    if mesh is None:
        return jax.jit(fn, donate_argnums=(0,))
    from jaxft import parallel

    rules = rules or parallel.DEFAULT_RULES
    step_cfg = dataclasses.replace(step_cfg, activation_sharding=parallel.activation_sharding(mesh, rules))
    fn = partial(train_step, cfg, step_cfg, optimizer)
    state_sh = parallel.state_shardings(state, mesh, rules)
    frozen_sh = parallel.param_shardings(frozen, mesh, rules)
    batch_sh = parallel.batch_sharding(mesh, 3, rules, accumulation_axis=True)
    metrics_sh = dict.fromkeys(metric_names(state), parallel.replicated(mesh))
    return jax.jit(fn, in_shardings=(state_sh, frozen_sh, batch_sh), out_shardings=(state_sh, metrics_sh),
                   donate_argnums=(0,))
