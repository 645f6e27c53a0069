"""The jitted train step: micro-batch accumulation, the objective's loss, NaN guard, sharded in/out.

Gradients are taken only with respect to the trainable part of the tree (``jaxft.split``): frozen weights get
neither gradients nor optimizer state. The loss is the objective's (:mod:`jaxft.train.objectives`; next-token
cross-entropy by default) summed over every unit of the whole accumulated batch and divided by their total count,
so accumulating A micro-batches gives the same update as one batch A times larger, however unevenly the units fall.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import optax

from jaxft.config import ModelConfig
from jaxft.peft.tree import combine
from jaxft.train.objectives import CausalLM, Objective


@dataclass(frozen=True)
class StepConfig:
    """Static settings of the train step."""

    objective: Objective = CausalLM()  # the loss, its batch keys and units (a frozen dataclass)
    skip_nonfinite: bool = True  # skip (and report) updates whose gradients are not finite
    activation_sharding: object = None  # sharding of [B, T, D] activations at layer boundaries (set per mesh)
    loss_scale_interval: int = 2000  # fp16: double the loss scale after this many finite steps in a row


def _accumulated_grads(cfg, step_cfg, trainable, frozen, batches, rng, scale=1.0):
    """Sum of per-micro-batch gradients of (loss sum / total units), scanned over the leading [A] axis, and the
    objective's metric sums (:func:`_loss_and_sums`) added over the micro-batches.

    The loss is multiplied by ``scale`` before differentiation (fp16 loss scaling) and the result divided again.
    """
    objective = step_cfg.objective
    total = jnp.maximum(objective.units(batches), 1.0)  # a batch without units gives loss 0, not 0 / 0
    loss_and_sums = _loss_and_sums(objective)

    def micro(carry, xs):
        grads, loss = carry
        batch, key = xs
        batch = with_reference(objective, cfg, combine(trainable, frozen), batch)

        def loss_fn(t):
            loss_sum, sums = loss_and_sums(cfg, combine(t, frozen), batch, key, step_cfg.activation_sharding)
            return loss_sum / total * scale, jax.lax.stop_gradient(sums)

        (value, sums), g = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        return (jax.tree.map(jnp.add, grads, g), loss + value), sums

    n_micro = jax.tree.leaves(batches)[0].shape[0]
    keys = jax.random.split(rng, n_micro) if rng is not None else None
    zeros = jax.tree.map(jnp.zeros_like, trainable)
    (grads, loss), sums = jax.lax.scan(micro, (zeros, jnp.zeros((), jnp.float32)), (batches, keys))
    sums = jax.tree.map(lambda s: jnp.sum(s, axis=0), sums)  # [A] per micro-batch -> the whole batch's
    return jax.tree.map(lambda g: g / scale, grads), loss / scale, total, sums


def _loss_and_sums(objective):
    """The objective's ``loss_and_sums`` (loss sum and metric sums of one forward pass), or its ``loss_sum`` with no
    sums for an objective that reports no train metrics of its own."""
    if hasattr(objective, "loss_and_sums"):
        return objective.loss_and_sums
    return lambda *args: (objective.loss_sum(*args), {})


def with_reference(objective, cfg: ModelConfig, params: dict, batch: dict) -> dict:
    """The micro-batch with what the objective's optional ``reference(cfg, params, batch)`` returns added (a
    reference policy's log-probs): computed outside the differentiated function and without gradient, so the
    backward pass neither recomputes nor differentiates it. When the batch already holds every key of the
    objective's ``reference_keys`` (a reference precomputed into the data) the reference is not computed."""
    reference, keys = getattr(objective, "reference", None), getattr(objective, "reference_keys", ())
    if reference is None or (keys and set(keys) <= batch.keys()):
        return batch
    return {**batch, **jax.lax.stop_gradient(reference(cfg, params, batch))}


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
    grads, loss, n_targets, sums = _accumulated_grads(cfg, step_cfg, state["trainable"], frozen, batches, step_rng,
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
    metrics = {"loss": loss, "grad_norm": grad_norm, "n_targets": n_targets,  # the objective's units
               "skipped": (~finite).astype(jnp.int32)}
    if sums:
        metrics.update(step_cfg.objective.step_metrics(sums))
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


def metric_names(state: dict, objective: Objective) -> tuple[str, ...]:
    """The metrics :func:`train_step` returns for ``state`` and ``objective`` (each gets an output sharding under a
    mesh): the step's own, then the objective's ``step_metric_keys``."""
    return (("loss", "grad_norm", "n_targets", "skipped") + (("loss_scale",) if "loss_scale" in state else ())
            + tuple(getattr(objective, "step_metric_keys", ())))


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
    metrics_sh = dict.fromkeys(metric_names(state, step_cfg.objective), parallel.replicated(mesh))
    return jax.jit(fn, in_shardings=(state_sh, frozen_sh, batch_sh), out_shardings=(state_sh, metrics_sh),
                   donate_argnums=(0,))
