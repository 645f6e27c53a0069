"""Sharded training on 8 fake CPU devices equals the single-device run; params are really sharded."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxft
from jaxft.parallel import MeshConfig, batch_sharding, make_mesh, param_shardings, shard_params, state_shardings
from jaxft.train.loop import StepConfig, init_state, jit_train_step
from jaxft.train.objectives import CausalLM

CFG = jaxft.ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=8, num_key_value_heads=2, head_dim=8)
MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8)]


def _params(quant):
    base = jaxft.init_params(CFG, jax.random.PRNGKey(0))
    if quant:
        base["layers"] = {k: ({"kernel": jaxft.nf4.quantize(v["kernel"])} if "kernel" in v else v)
                          for k, v in base["layers"].items()}
    lcfg = jaxft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return jaxft.lora.add(CFG, base, lcfg, jax.random.PRNGKey(1))


def _batches(steps=5):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, CFG.vocab_size, (steps, 1, 8, 16)).astype(np.int32)
    labels = np.roll(ids, -1, axis=-1)
    labels[..., -1] = -100
    labels[:, :, ::3, :5] = -100  # uneven targets
    return ids, labels


def _losses(params, mesh_shape=None, steps=5):
    trainable, frozen = jaxft.split(params, jaxft.Trainable())
    trainable = jax.tree.map(jnp.copy, trainable)
    opt = optax.adamw(1e-2)
    state = init_state(trainable, opt)
    if mesh_shape is None:
        step = jit_train_step(CFG, StepConfig(objective=CausalLM(chunk_size=32)), opt)
        put = lambda x: x  # noqa: E731
    else:
        mesh = make_mesh(MeshConfig(*mesh_shape))
        state = jax.device_put(state, state_shardings(state, mesh))
        frozen = shard_params(frozen, mesh)
        step = jit_train_step(CFG, StepConfig(objective=CausalLM(chunk_size=32)), opt, mesh, state, frozen)
        put = lambda x: jax.device_put(x, batch_sharding(mesh, 3, accumulation_axis=True))  # noqa: E731
    ids, labels = _batches(steps)
    out = []
    for i in range(steps):
        state, metrics = step(state, frozen, {"input_ids": put(ids[i]), "labels": put(labels[i])})
        out.append(float(metrics["loss"]))
    return np.array(out)


@pytest.fixture(scope="module", params=[False, True], ids=["lora", "qlora"])
def reference(request):
    params = _params(request.param)
    return request.param, params, _losses(params)


@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda m: "x".join(map(str, m)))
def test_sharded_losses_equal_single_device(reference, mesh_shape):
    quant, params, ref = reference
    np.testing.assert_allclose(_losses(params, mesh_shape), ref, atol=1e-5, rtol=0)


def test_fsdp_really_shards_base_weights():
    mesh = make_mesh(MeshConfig(1, 8, 1))
    params = shard_params(jaxft.init_params(CFG, jax.random.PRNGKey(0)), mesh)
    matrices = [(p, x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
                if p[-1].key in ("kernel", "embedding")]
    assert len(matrices) == 9
    for path, leaf in matrices:
        assert leaf.addressable_shards[0].data.size * 8 == leaf.size, jax.tree_util.keystr(path)


def test_fsdp_alone_shards_every_lora_matrix_through_the_fallback_rules():
    """lora_b is [L, rank, heads/mlp]: its big dim maps to `tensor` first, so on a (1, 8, 1) mesh it falls back
    to `fsdp` rather than being replicated; the base kernels keep `embed` on `fsdp` as their first choice."""
    mesh = make_mesh(MeshConfig(1, 8, 1))
    trainable, frozen = jaxft.split(_params(quant=False), jaxft.Trainable())
    adapters = [(p, x) for p, x in jax.tree_util.tree_flatten_with_path(shard_params(trainable, mesh))[0]
                if p[-2].key == "lora" and p[-1].key in ("a", "b")]
    assert len(adapters) == 14
    for path, leaf in adapters:
        assert leaf.addressable_shards[0].data.size * 8 == leaf.size, jax.tree_util.keystr(path)
    shardings = param_shardings(frozen, mesh)
    assert shardings["layers"]["o_proj"]["kernel"].spec == jax.sharding.PartitionSpec(None, None, "fsdp")
    assert shardings["layers"]["q_proj"]["kernel"].spec == jax.sharding.PartitionSpec(None, "fsdp", None)


def test_kv_heads_that_do_not_divide_the_tensor_axis_are_replicated():
    mesh = make_mesh(MeshConfig(1, 1, 8))
    shardings = param_shardings(jaxft.init_params(CFG.replace(head_dim=5), jax.random.PRNGKey(0)), mesh)
    assert shardings["layers"]["k_proj"]["kernel"].spec == jax.sharding.PartitionSpec(None, None, None)
    assert shardings["layers"]["gate_proj"]["kernel"].spec == jax.sharding.PartitionSpec(None, None, "tensor")


def test_bad_mesh_shape_is_explained():
    with pytest.raises(jaxft.ConfigError, match="does not fit 8 devices"):
        make_mesh(MeshConfig(3, -1, 1))


def test_state_shardings_keep_offloaded_optimizer_state_in_host_memory():
    from jaxft.train.optim import OptimConfig, make_optimizer

    mesh = make_mesh(MeshConfig(2, 4, 1))
    trainable, _ = jaxft.split(_params(quant=False), jaxft.Trainable())
    state = init_state(trainable, make_optimizer(OptimConfig(offload_state=True)))
    shardings = state_shardings(state, mesh)
    assert {s.memory_kind for s in jax.tree.leaves(shardings["opt_state"])} == {"pinned_host"}
    assert {s.memory_kind for s in jax.tree.leaves(shardings["trainable"])} == {"device"}
    mu = shardings["opt_state"][1].mu["layers"]["q_proj"]["lora"]["a"]  # (clip, adam, schedule) states
    assert mu.spec == shardings["trainable"]["layers"]["q_proj"]["lora"]["a"].spec != jax.sharding.PartitionSpec()
