"""The train step: accumulation equals one big batch, full fine-tuning gradients equal torch autograd."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import jaxft
from hf_oracle import build, random_ids, save
from jaxft.parallel import MeshConfig, make_mesh, state_shardings
from jaxft.train.loop import StepConfig, init_state, jit_train_step
from jaxft.train.objectives import CausalLM
from jaxft.train.optim import OptimConfig, make_optimizer

CFG = jaxft.ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)


def _batch(n, t=12, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, CFG.vocab_size, (n, t))
    labels = np.roll(ids, -1, axis=1)
    labels[:, -1] = -100
    # uneven targets per row: mask a different-length prompt in each row
    for row in range(n):
        labels[row, : rng.integers(0, t - 2)] = -100
    return {"input_ids": jnp.asarray(ids, jnp.int32), "labels": jnp.asarray(labels, jnp.int32)}


def _lora_params():
    base = jaxft.init_params(CFG, jax.random.PRNGKey(0))
    return jaxft.lora.add(CFG, base, jaxft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
                          jax.random.PRNGKey(1))


def _run(micro, per_micro, params, chunk):
    batch = _batch(micro * per_micro)
    batches = jax.tree.map(lambda x: x.reshape(micro, per_micro, *x.shape[1:]), batch)
    trainable, frozen = jaxft.split(params, jaxft.Trainable())
    trainable = jax.tree.map(jnp.copy, trainable)  # the step donates its state
    opt = optax.sgd(0.1)
    step = jit_train_step(CFG, StepConfig(objective=CausalLM(chunk_size=chunk)), opt)
    state, metrics = step(init_state(trainable, opt), frozen, batches)
    return state, metrics


@pytest.mark.parametrize("chunk", [0, 16])
def test_accumulation_4x2_equals_1x8_with_uneven_targets(chunk):
    params = _lora_params()
    s_acc, m_acc = _run(4, 2, params, chunk)
    s_one, m_one = _run(1, 8, params, chunk)
    np.testing.assert_allclose(m_acc["loss"], m_one["loss"], atol=1e-6)
    for a, b in zip(jax.tree.leaves(s_acc["trainable"]), jax.tree.leaves(s_one["trainable"])):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("offload", [False, True], ids=["state-on-device", "state-offloaded"])
def test_nonfinite_gradients_skip_the_update(offload):
    params = _lora_params()
    trainable, frozen = jaxft.split(params, jaxft.Trainable())
    trainable = jax.tree.map(lambda x: x, trainable)
    trainable["layers"]["q_proj"]["lora"]["a"] = trainable["layers"]["q_proj"]["lora"]["a"].at[0, 0, 0].set(jnp.nan)
    opt = make_optimizer(OptimConfig(lr=1e-2, offload_state=offload))
    state = init_state(trainable, opt)
    before = jax.tree.map(np.asarray, {"trainable": state["trainable"], "opt_state": state["opt_state"]})
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    state = jax.device_put(state, state_shardings(state, mesh))
    step = jit_train_step(CFG, StepConfig(), opt, mesh, state, frozen)
    new, metrics = step(state, frozen, jax.tree.map(lambda x: x[None], _batch(2)))
    assert int(metrics["skipped"]) == 1
    after = {"trainable": new["trainable"], "opt_state": new["opt_state"]}
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), after, before)
    kinds = {x.sharding.memory_kind for x in jax.tree.leaves(new["opt_state"])}
    assert kinds == ({"pinned_host"} if offload else {"device"})


def test_full_finetuning_gradients_equal_torch_autograd(tmp_path):
    model = build("qwen2", scale=0.1)
    cfg, params = jaxft.from_pretrained(save(model, tmp_path / "m"))
    batch = {"input_ids": jnp.asarray(random_ids((2, 10), seed=5), jnp.int32),
             "labels": jnp.asarray(random_ids((2, 10), seed=6), jnp.int32)}
    trainable, frozen = jaxft.split(params, lambda path, leaf: True)

    def loss(t):
        objective = CausalLM(chunk_size=8)
        return objective.loss_sum(cfg, jaxft.combine(t, frozen), batch) / objective.units(batch)

    grads = jax.grad(loss)(trainable)
    logits = model(torch.as_tensor(np.asarray(batch["input_ids"]))).logits
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                      torch.as_tensor(np.asarray(batch["labels"])).reshape(-1).long()).backward()
    from jaxft.hf.checkpoint import to_hf_tensors
    ours = to_hf_tensors(cfg, grads)
    for name, p in model.named_parameters():
        np.testing.assert_allclose(ours[name], p.grad.numpy(), atol=1e-5, rtol=1e-4, err_msg=name)


def test_fp16_dynamic_loss_scaling_halves_on_overflow_and_grows_after_good_steps():
    cfg16 = CFG.replace(dtype="float16")
    trainable, frozen = jaxft.split(_lora_params(), jaxft.Trainable())
    opt = optax.sgd(0.1)
    state = init_state(jax.tree.map(jnp.copy, trainable), opt, loss_scale=2.0 ** 40)  # overflows fp16
    step = jit_train_step(cfg16, StepConfig(loss_scale_interval=2), opt)
    batch = jax.tree.map(lambda x: x[None], _batch(4))
    scales, skipped = [], []
    for _ in range(30):
        state, m = step(state, frozen, batch)
        scales.append(float(m["loss_scale"]))
        skipped.append(int(m["skipped"]))
    first_ok = skipped.index(0)
    assert first_ok > 0 and all(skipped[:first_ok])
    assert scales[1] == scales[0] / 2  # halved after the overflow
    assert scales[first_ok + 2] == 2 * scales[first_ok]  # doubled after 2 finite steps


def test_fp16_scaled_gradients_match_float32():
    params = _lora_params()
    batch = jax.tree.map(lambda x: x[None], _batch(4))
    grads = {}
    for dtype, scale in (("float32", None), ("float16", 2.0 ** 12)):
        trainable, frozen = jaxft.split(params, jaxft.Trainable())
        state = init_state(jax.tree.map(jnp.copy, trainable), optax.sgd(1.0), loss_scale=scale)
        new, m = jit_train_step(CFG.replace(dtype=dtype), StepConfig(), optax.sgd(1.0))(state, frozen, batch)
        assert int(m["skipped"]) == 0
        grads[dtype] = jax.tree.map(lambda a, b: a - b, trainable, new["trainable"])
    for a, b in zip(jax.tree.leaves(grads["float16"]), jax.tree.leaves(grads["float32"])):
        np.testing.assert_allclose(a, b, atol=1e-2 * float(jnp.max(jnp.abs(b))))  # fp16 compute precision
