"""Objectives: per-token log-probs from the chunked pass, the causal-LM loss, and a new objective defined only here
that the ordinary train step trains (equal to a hand-computed update, and sharded on 8 devices equal to 1)."""
from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxft
from jaxft.data.chat import IGNORE_INDEX
from jaxft.models.llama import hidden_states, logits_from_hidden
from jaxft.parallel import MeshConfig, batch_sharding, make_mesh, shard_params, state_shardings
from jaxft.train.loop import StepConfig, init_state, jit_train_step
from jaxft.train.loss import token_logprobs
from jaxft.train.metrics import evaluate
from jaxft.train.objectives import CausalLM

CFG = jaxft.ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=8, num_key_value_heads=2, head_dim=8)


def _hidden_kernel_labels(b=3, t=37, d=16, v=50, seed=0):
    """B * T = 111 tokens (no multiple of the chunk of 32), V = 50 (no multiple of the block of 16)."""
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(b, t, d)).astype(np.float32)
    kernel = (rng.normal(size=(d, v)) / np.sqrt(d)).astype(np.float32)
    labels = rng.integers(0, v, size=(b, t)).astype(np.int32)
    labels[rng.random((b, t)) < 0.3] = IGNORE_INDEX
    labels[0, :4] = (0, 15, 16, 49)  # labels at vocabulary block edges
    return jnp.asarray(hidden), jnp.asarray(kernel), jnp.asarray(labels)


def _full_logprobs(hidden, kernel, labels):
    """The oracle: log_softmax of the materialized logits, picked at the labels, 0 at ignored positions."""
    log_probs = jax.nn.log_softmax(jnp.einsum("btd,dv->btv", hidden, kernel), axis=-1)
    picked = jnp.take_along_axis(log_probs, jnp.where(labels == IGNORE_INDEX, 0, labels)[..., None], -1)[..., 0]
    return jnp.where(labels == IGNORE_INDEX, 0.0, picked)


def _chunked_logprobs(hidden, kernel, labels):
    return token_logprobs(hidden, kernel, labels, chunk_size=32, vocab_block=16)


def test_token_logprobs_equal_log_softmax_of_full_logits():
    hidden, kernel, labels = _hidden_kernel_labels()
    actual = jax.jit(_chunked_logprobs)(hidden, kernel, labels)
    assert actual.shape == labels.shape and actual.dtype == jnp.float32
    np.testing.assert_allclose(actual, _full_logprobs(hidden, kernel, labels), atol=1e-5, rtol=1e-6)
    assert not np.any(np.asarray(actual)[np.asarray(labels) == IGNORE_INDEX])


def test_token_logprobs_gradients_equal_those_of_full_logits():
    """A different cotangent per token (random weights), so the backward pass sees per-token cotangents."""
    hidden, kernel, labels = _hidden_kernel_labels()
    weights = jnp.asarray(np.random.default_rng(1).normal(size=labels.shape), jnp.float32)

    def grads(logprobs):
        return jax.jit(jax.grad(lambda h, w: jnp.sum(weights * logprobs(h, w, labels)), argnums=(0, 1)))(hidden,
                                                                                                        kernel)

    for name, actual, expected in zip(("hidden", "kernel"), grads(_chunked_logprobs), grads(_full_logprobs)):
        np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=1e-5, err_msg=name)


def _lm_batch(b=4, t=16, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, CFG.vocab_size, (b, t)).astype(np.int32)
    labels = np.roll(ids, -1, axis=1)
    labels[:, -1] = IGNORE_INDEX
    labels[::2, :5] = IGNORE_INDEX
    return {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(labels)}


@pytest.mark.parametrize("chunk_size", [0, 16])
def test_causal_lm_loss_with_z_loss_equals_a_direct_computation(chunk_size):
    params = jaxft.init_params(CFG, jax.random.PRNGKey(0))
    batch = _lm_batch()
    logits = np.asarray(jaxft.forward(CFG, params, batch["input_ids"]), np.float64)
    labels = np.asarray(batch["labels"])
    target = labels != IGNORE_INDEX
    lse = np.log(np.exp(logits).sum(-1))
    label_logit = np.take_along_axis(logits, np.where(target, labels, 0)[..., None], -1)[..., 0]
    expected = ((lse - label_logit + 1e-2 * lse ** 2) * target).sum()
    objective = CausalLM(chunk_size=chunk_size, z_loss=1e-2)
    np.testing.assert_allclose(objective.loss_sum(CFG, params, batch), expected, rtol=1e-5)
    assert float(objective.units(batch)) == target.sum()


@dataclass(frozen=True)
class HalvedLM(CausalLM):
    """A subclass that redefines the loss: the step must train on it, z-loss or not."""

    def loss_sum(self, cfg, params, batch, rng=None, activation_sharding=None):
        return 0.5 * super().loss_sum(cfg, params, batch, rng, activation_sharding)


def test_with_a_z_loss_the_step_loss_is_a_subclass_loss_sum_and_reports_no_parts():
    params = jaxft.init_params(CFG, jax.random.PRNGKey(0))
    batch = _lm_batch()
    plain = CausalLM(chunk_size=16, z_loss=1e-2)
    halved = HalvedLM(chunk_size=16, z_loss=1e-2)
    loss, sums = halved.loss_and_sums(CFG, params, batch)
    np.testing.assert_allclose(loss, 0.5 * plain.loss_sum(CFG, params, batch), rtol=1e-6)
    assert sums == {} and halved.step_metric_keys == () and plain.step_metric_keys == ("ce_loss", "z_loss")


@dataclass(frozen=True)
class LogitRegression:
    """A toy objective jaxft knows nothing of: squared error between the logit of one fixed token id and a target
    value per position, over the non-padding tokens (segment id != 0)."""

    token: int = 5
    batch_keys: ClassVar[tuple[str, ...]] = ("input_ids", "segment_ids", "targets")

    def units(self, batches):
        return jnp.sum(batches["segment_ids"] != 0, dtype=jnp.int32).astype(jnp.float32)

    def squared_errors(self, cfg, params, batch, rng=None, activation_sharding=None):
        h = hidden_states(cfg, params, batch["input_ids"], segment_ids=batch["segment_ids"], rng=rng,
                          activation_sharding=activation_sharding).hidden
        logit = logits_from_hidden(cfg, params, h)[..., self.token]
        return jnp.where(batch["segment_ids"] != 0, jnp.square(logit - batch["targets"]), 0.0)

    def loss_sum(self, cfg, params, batch, rng=None, activation_sharding=None):
        return jnp.sum(self.squared_errors(cfg, params, batch, rng, activation_sharding))

    def eval_sums(self, cfg, params, batch):
        return {"squared_error": jnp.sum(self.squared_errors(cfg, params, batch)), "tokens": self.units(batch)}

    def eval_metrics(self, sums):
        return {"mse": float(sums["squared_error"]) / float(sums["tokens"])}


def _lora_params():
    base = jaxft.init_params(CFG, jax.random.PRNGKey(0))
    lcfg = jaxft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return jaxft.lora.add(CFG, base, lcfg, jax.random.PRNGKey(1))


def _regression_batches(steps, micro=2, rows=8, t=16):
    """[steps, micro, rows, t] ids, segment ids (each row padded at its end by a different length) and targets."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, CFG.vocab_size, (steps, micro, rows, t)).astype(np.int32)
    lengths = rng.integers(4, t + 1, (steps, micro, rows, 1))
    segment_ids = (np.arange(t) < lengths).astype(np.int32)
    targets = rng.normal(size=(steps, micro, rows, t)).astype(np.float32)
    return {"input_ids": ids, "segment_ids": segment_ids, "targets": targets}


def _direct_mean_loss(trainable, frozen, batch):
    """The oracle: the model's logits at the token, squared error over the non-padding tokens, mean over them."""
    params = jaxft.combine(trainable, frozen)
    logits = jaxft.forward(CFG, params, batch["input_ids"], segment_ids=batch["segment_ids"])[..., 5]
    real = batch["segment_ids"] != 0
    return jnp.sum(jnp.where(real, jnp.square(logits - batch["targets"]), 0.0)) / jnp.sum(real)


def test_a_new_objective_trains_through_the_ordinary_step_as_a_hand_computed_update():
    trainable, frozen = jaxft.split(_lora_params(), jaxft.Trainable())
    batches = jax.tree.map(lambda x: jnp.asarray(x[0]), _regression_batches(1))  # 2 micro-batches of 8 rows
    opt = optax.sgd(0.5)
    step = jit_train_step(CFG, StepConfig(objective=LogitRegression()), opt)
    new, metrics = step(init_state(jax.tree.map(jnp.copy, trainable), opt), frozen, batches)

    whole = jax.tree.map(lambda x: x.reshape(-1, x.shape[-1]), batches)  # one batch of 16 rows
    loss, grads = jax.value_and_grad(_direct_mean_loss)(trainable, frozen, whole)
    updates, _ = opt.update(grads, opt.init(trainable), trainable)
    expected = optax.apply_updates(trainable, updates)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
    assert float(metrics["n_targets"]) == np.sum(np.asarray(batches["segment_ids"]) != 0)
    moved = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(trainable))]
    assert min(moved) > 0  # every trainable leaf got a gradient
    for path_a, b in zip(jax.tree_util.tree_flatten_with_path(new["trainable"])[0], jax.tree.leaves(expected)):
        np.testing.assert_allclose(path_a[1], b, atol=1e-6, rtol=1e-5, err_msg=jax.tree_util.keystr(path_a[0]))

    objective = LogitRegression()
    eval_step = jax.jit(lambda batch: objective.eval_sums(CFG, jaxft.combine(trainable, frozen), batch))
    micro_batches = [jax.tree.map(lambda x: x[i], batches) for i in range(2)]
    result = evaluate(eval_step, micro_batches, objective.eval_metrics)
    np.testing.assert_allclose(result["mse"], loss, rtol=1e-5)


def _regression_losses(params, mesh_shape=None, steps=3):
    trainable, frozen = jaxft.split(params, jaxft.Trainable())
    opt = optax.sgd(0.5)  # not Adam: its normalized update would magnify rounding in near-zero gradients
    state = init_state(jax.tree.map(jnp.copy, trainable), opt)
    step_cfg = StepConfig(objective=LogitRegression())
    put = jnp.asarray
    if mesh_shape is None:
        step = jit_train_step(CFG, step_cfg, opt)
    else:
        mesh = make_mesh(MeshConfig(*mesh_shape))
        state = jax.device_put(state, state_shardings(state, mesh))
        frozen = shard_params(frozen, mesh)
        step = jit_train_step(CFG, step_cfg, opt, mesh, state, frozen)
        put = lambda x: jax.device_put(x, batch_sharding(mesh, 3, accumulation_axis=True))  # noqa: E731
    batches, losses = _regression_batches(steps), []
    for i in range(steps):
        state, metrics = step(state, frozen, {k: put(v[i]) for k, v in batches.items()})
        losses.append(float(metrics["loss"]))
    return np.array(losses), jax.tree.map(np.asarray, state["trainable"])


def test_a_new_objective_sharded_on_8_devices_equals_1_device():
    params = _lora_params()
    one_losses, one_trainable = _regression_losses(params)
    sharded_losses, sharded_trainable = _regression_losses(params, (2, 2, 2))
    np.testing.assert_allclose(sharded_losses, one_losses, atol=1e-5, rtol=1e-5)
    initial = jax.tree.leaves(jaxft.split(params, jaxft.Trainable())[0])
    for a, b, before in zip(jax.tree.leaves(sharded_trainable), jax.tree.leaves(one_trainable), initial):
        assert np.max(np.abs(b - before)) > 1e-3  # it trained
        np.testing.assert_allclose(a, b, atol=1e-5)
