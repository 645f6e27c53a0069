"""The optimizer chain against PyTorch and the published update rules; 8-bit Adam vs f32 AdamW; host offload."""
import bitsandbytes.functional as bnbf
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from jax.sharding import NamedSharding, PartitionSpec

from jaxft.errors import JaxftError
from jaxft.ops.dynamic_map import SIGNED_MAP, UNSIGNED_MAP, dynamic_map
from jaxft.train.optim import (OPTIMIZERS, OptimConfig, QuantizedMoment, decay_mask, make_optimizer, make_schedule,
                               place_state, quantize_blockwise)

STEPS = 5


def _tree(rng, shapes: dict) -> dict:
    return {group: {name: rng.normal(size=shape).astype(np.float32) for name, shape in leaves.items()}
            for group, leaves in shapes.items()}


SHAPES = {"proj": {"kernel": (6, 5), "bias": (5,)}, "norm": {"scale": (5,)}}


def _problem(shapes=SHAPES, seed=0):
    """Initial params and STEPS gradient trees, fed identically to both sides (no loss: the update rule alone)."""
    rng = np.random.default_rng(seed)
    return _tree(rng, shapes), [_tree(rng, shapes) for _ in range(STEPS)]


def _run_jax(cfg, params, grads):
    tx = make_optimizer(cfg)
    params = jax.tree.map(jnp.asarray, params)
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, params)
        params = optax.apply_updates(params, updates)
    return jax.tree.map(np.asarray, params)


def _run_torch(make, params, grads):
    """``make(decayed, not_decayed)`` builds the torch optimizer from two param groups, as HF's Trainer does."""
    decays = jax.tree.leaves(decay_mask(params))
    tensors = [torch.tensor(x, requires_grad=True) for x in jax.tree.leaves(params)]
    opt = make([t for t, d in zip(tensors, decays) if d], [t for t, d in zip(tensors, decays) if not d])
    for g in grads:
        for t, gx in zip(tensors, jax.tree.leaves(g)):
            t.grad = torch.tensor(gx)
        opt.step()
    return jax.tree.unflatten(jax.tree.structure(params), [t.detach().numpy() for t in tensors])


def _assert_trees_close(actual, expected, atol=1e-6):
    jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=0, atol=atol), actual, expected)


# ---------------------------------------------------------------------------------------------------- update rules
def test_adamw_matches_torch_adamw_with_decay_on_matrices_only():
    params, grads = _problem()
    cfg = OptimConfig(name="adamw", lr=1e-2, weight_decay=0.1, b1=0.8, b2=0.95, eps=1e-6, max_grad_norm=None)
    expected = _run_torch(lambda decayed, rest: torch.optim.AdamW(
        [{"params": decayed, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=1e-2, betas=(0.8, 0.95), eps=1e-6), params, grads)
    _assert_trees_close(_run_jax(cfg, params, grads), expected)


def test_sgd_momentum_matches_torch_sgd_with_coupled_weight_decay():
    params, grads = _problem()
    cfg = OptimConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=0.1, max_grad_norm=None)
    expected = _run_torch(lambda decayed, rest: torch.optim.SGD(
        [{"params": decayed, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=0.05, momentum=0.9), params, grads)
    _assert_trees_close(_run_jax(cfg, params, grads), expected)


def test_lion_matches_published_update_rule():
    """Chen et al. 2023, Algorithm 2: sign of the b1-interpolation, momentum tracked with b2, decoupled decay."""
    params, grads = _problem()
    lr, wd, b1, b2 = 1e-3, 0.5, 0.9, 0.99
    cfg = OptimConfig(name="lion", lr=lr, weight_decay=wd, b1=b1, b2=b2, max_grad_norm=None)
    decays = decay_mask(params)
    p = jax.tree.map(np.float64, params)
    m = jax.tree.map(np.zeros_like, p)
    for g in grads:
        step = jax.tree.map(lambda m, g: np.sign(b1 * m + (1 - b1) * g), m, g)
        p = jax.tree.map(lambda p, s, d: p - lr * (s + wd * p * d), p, step, decays)
        m = jax.tree.map(lambda m, g: b2 * m + (1 - b2) * g, m, g)
    _assert_trees_close(_run_jax(cfg, params, grads), p)


def _adafactor_reference(params, grads, lr, wd, eps1=1e-30, d=1.0):
    """Shazeer & Stern 2018, Algorithms 4 (factored, matrices with both dims >= 128) and 5, with update clipping
    d = 1, beta2_t = 1 - t^-0.8, and the chain's decoupled decay on matrices."""
    decays = jax.tree.leaves(decay_mask(params))
    flat = [x.astype(np.float64) for x in jax.tree.leaves(params)]
    row, col, full = {}, {}, {}
    for t, g_tree in enumerate(grads, start=1):
        beta2 = 1 - t ** -0.8
        for i, g in enumerate(jax.tree.leaves(g_tree)):
            g2 = g.astype(np.float64) ** 2 + eps1
            if g.ndim == 2 and min(g.shape) >= 128:
                row[i] = beta2 * row.get(i, 0) + (1 - beta2) * g2.sum(axis=1)
                col[i] = beta2 * col.get(i, 0) + (1 - beta2) * g2.sum(axis=0)
                v = np.outer(row[i], col[i]) / row[i].sum()
            else:
                v = full[i] = beta2 * full.get(i, 0) + (1 - beta2) * g2
            u = g / np.sqrt(v)
            u = u / max(1.0, np.sqrt(np.mean(u ** 2)) / d)
            flat[i] = flat[i] - lr * (u + wd * flat[i] * decays[i])
    return jax.tree.unflatten(jax.tree.structure(params), flat)


def test_adafactor_matches_published_update_rule_factored_and_not():
    params, grads = _problem({"proj": {"kernel": (128, 160), "bias": (160,)}, "lora": {"lora_a": (8, 160)}})
    cfg = OptimConfig(name="adafactor", lr=1e-2, weight_decay=0.1, max_grad_norm=None)
    _assert_trees_close(_run_jax(cfg, params, grads), _adafactor_reference(params, grads, lr=1e-2, wd=0.1))


def test_global_norm_clipping_matches_torch_clip_grad_norm():
    _, grads = _problem()
    tensors = [torch.tensor(g) for g in jax.tree.leaves(grads[0])]
    for t in tensors:
        t.grad = t.clone()
    torch.nn.utils.clip_grad_norm_(tensors, max_norm=0.5)
    tx = make_optimizer(OptimConfig(name="sgd", lr=1.0, max_grad_norm=0.5))
    g = jax.tree.map(jnp.asarray, grads[0])
    updates, _ = tx.update(g, tx.init(g), g)
    for u, t in zip(jax.tree.leaves(updates), tensors):
        np.testing.assert_allclose(-np.asarray(u), t.grad.numpy(), rtol=1e-5)


@pytest.mark.parametrize("max_grad_norm", [None, 0.0])
def test_clipping_is_off_when_max_grad_norm_is_none_or_zero(max_grad_norm):
    g = {"w": jnp.full((3, 3), 100.0)}
    tx = make_optimizer(OptimConfig(name="sgd", lr=1.0, max_grad_norm=max_grad_norm))
    updates, _ = tx.update(g, tx.init(g), g)
    np.testing.assert_array_equal(updates["w"], -g["w"])


def test_decay_mask_excludes_norms_biases_and_vectors_even_when_stacked_over_layers():
    L, D, R = 2, 8, 4
    params = {"embed_tokens": {"embedding": jnp.zeros((16, D))},
              "layers": {"input_layernorm": {"scale": jnp.zeros((L, D))},
                         "q_proj": {"kernel": jnp.zeros((L, D, D)), "bias": jnp.zeros((L, D)),
                                    "lora_a": jnp.zeros((L, D, R))}},
              "norm": {"scale": jnp.zeros(D)}, "lm_head": {"kernel": None}, "prompt": jnp.zeros(D)}
    assert decay_mask(params) == {
        "embed_tokens": {"embedding": True},
        "layers": {"input_layernorm": {"scale": False}, "q_proj": {"kernel": True, "bias": False, "lora_a": True}},
        "norm": {"scale": False}, "lm_head": {"kernel": None}, "prompt": False}


# ------------------------------------------------------------------------------------------------------ schedules
def _lrs(cfg, steps):
    schedule = make_schedule(cfg)
    return np.array([schedule(s) for s in steps], np.float64)


def _torch_lrs(make_scheduler, lr, n):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    scheduler = make_scheduler(opt)
    lrs = []
    for _ in range(n):
        lrs.append(scheduler.get_last_lr()[0])
        opt.step()
        scheduler.step()
    return np.array(lrs)


def test_warmup_rises_linearly_from_zero_to_peak():
    cfg = OptimConfig(lr=1e-3, schedule="cosine", warmup_steps=10, total_steps=100)
    np.testing.assert_allclose(_lrs(cfg, [0, 5, 10]), [0.0, 5e-4, 1e-3], rtol=1e-6)


def test_cosine_decay_after_warmup_matches_torch_cosine_annealing():
    cfg = OptimConfig(lr=1e-3, schedule="cosine", warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    expected = _torch_lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=100, eta_min=1e-4), 1e-3, 101)
    np.testing.assert_allclose(_lrs(cfg, range(10, 111)), expected, rtol=1e-5)


def test_cosine_midpoint_is_halfway_between_peak_and_floor():
    cfg = OptimConfig(lr=1e-3, schedule="cosine", warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    np.testing.assert_allclose(_lrs(cfg, [60]), [(1e-3 + 1e-4) / 2], rtol=1e-6)


def test_linear_decay_after_warmup_matches_torch_linear_lr():
    cfg = OptimConfig(lr=1e-3, schedule="linear", warmup_steps=10, total_steps=60, min_lr_ratio=0.2)
    expected = _torch_lrs(lambda o: torch.optim.lr_scheduler.LinearLR(o, 1.0, 0.2, total_iters=50), 1e-3, 51)
    np.testing.assert_allclose(_lrs(cfg, range(10, 61)), expected, rtol=1e-5)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_decay_ends_at_min_lr_ratio_and_stays_there(schedule):
    cfg = OptimConfig(lr=1e-3, schedule=schedule, warmup_steps=5, total_steps=50, min_lr_ratio=0.1)
    np.testing.assert_allclose(_lrs(cfg, [50, 51, 500]), [1e-4] * 3, rtol=1e-6)


def test_constant_schedule_holds_peak_after_warmup():
    cfg = OptimConfig(lr=1e-3, schedule="constant", warmup_steps=4)
    np.testing.assert_allclose(_lrs(cfg, [2, 4, 1000]), [5e-4, 1e-3, 1e-3], rtol=1e-6)


# ---------------------------------------------------------------------------------------------- trainable masking
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_frozen_none_leaves_get_no_optimizer_state(name):
    lora = {"lora_a": jnp.ones((64, 8)), "lora_b": jnp.ones((8, 64))}
    tx = make_optimizer(OptimConfig(name=name, weight_decay=0.1, momentum=0.9 if name == "sgd" else 0.0))
    with_frozen, without = tx.init({"q_proj": {"kernel": None, **lora}}), tx.init({"q_proj": lora})
    assert [x.shape for x in jax.tree.leaves(with_frozen)] == [x.shape for x in jax.tree.leaves(without)]


def test_frozen_none_leaves_get_no_update():
    trainable = {"q_proj": {"kernel": None, "lora_a": jnp.ones((64, 8))}}
    tx = make_optimizer(OptimConfig(weight_decay=0.1))
    updates, _ = tx.update(trainable, tx.init(trainable), trainable)
    assert updates["q_proj"]["kernel"] is None and updates["q_proj"]["lora_a"].shape == (64, 8)


# ------------------------------------------------------------------------------------------------------- 8-bit Adam
@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_maps_are_bitsandbytes_maps(signed):
    np.testing.assert_allclose(dynamic_map(signed), bnbf.create_dynamic_map(signed=signed).numpy(), rtol=1e-6)


def test_blockwise_codes_are_nearest_entries_and_agree_with_bitsandbytes():
    """bitsandbytes' CPU kernel finds codes by a bounded binary search that now and then lands one entry off the
    nearest; ours is exactly nearest, so the two agree everywhere except where theirs is farther."""
    x = np.random.default_rng(0).standard_t(3, size=4 * 256).astype(np.float32)
    codes, state = bnbf.quantize_blockwise(torch.from_numpy(x), code=torch.from_numpy(SIGNED_MAP), blocksize=256)
    q = quantize_blockwise(jnp.asarray(x), SIGNED_MAP)
    ours, theirs = np.asarray(q.codes).reshape(-1), codes.numpy()
    np.testing.assert_array_equal(q.absmax, state.absmax.numpy())
    normalized = x / np.repeat(np.asarray(q.absmax), 256)
    assert np.all(np.abs(SIGNED_MAP[ours] - normalized) <= np.abs(SIGNED_MAP[theirs] - normalized))
    assert np.mean(ours != theirs) < 0.01


def test_sqrt_code_keeps_second_moments_spanning_ten_decades_nonzero_within_2x():
    """Why v is stored as sqrt(v): v spans the square of the gradients' range, beyond the map's six decades."""
    v = np.logspace(-10, 0, 256, dtype=np.float32)
    s = quantize_blockwise(jnp.sqrt(jnp.asarray(v)), UNSIGNED_MAP)
    roundtrip = (UNSIGNED_MAP[np.asarray(s.codes)] * np.asarray(s.absmax)[:, None]).reshape(-1) ** 2
    assert np.all((roundtrip > v / 2) & (roundtrip < v * 2))


def test_adam8bit_keeps_float32_moments_for_leaves_under_4096_values():
    tx = make_optimizer(OptimConfig(name="adam8bit"))
    state = tx.init({"big": jnp.zeros((64, 64)), "small": jnp.zeros((63, 64))})[1]
    assert isinstance(state.mu["big"], QuantizedMoment) and state.mu["big"].codes.dtype == jnp.uint8
    assert state.mu["small"].dtype == jnp.float32 and state.nu["small"].shape == (63, 64)


def _softmax_regression():
    """Fixed synthetic classification: 4096 examples, 128 features, 64 classes drawn from a random linear teacher;
    the student's 128x64 kernel (8192 values) takes the 8-bit path, its bias stays float32."""
    rng = np.random.default_rng(0)
    n, d, c = 4096, 128, 64
    x = rng.normal(size=(n, d)).astype(np.float32)
    logits = x @ (rng.normal(size=(d, c)) * 3 / np.sqrt(d))
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    labels = (probs.cumsum(1) > rng.random((n, 1))).argmax(1)
    x, labels = jnp.asarray(x), jnp.asarray(labels)

    def loss(p):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(x @ p["kernel"] + p["bias"], labels))

    return {"kernel": jnp.zeros((d, c)), "bias": jnp.zeros(c)}, loss


@pytest.fixture(scope="module")
def trained():
    """name -> (loss after 200 full-batch steps, optimizer state), for f32 AdamW and 8-bit Adam, same settings."""
    params, loss = _softmax_regression()

    def train(name):
        tx = make_optimizer(OptimConfig(name=name, lr=3e-3, weight_decay=0.01))

        def step(carry, _):
            p, s = carry
            updates, s = tx.update(jax.grad(loss)(p), s, p)
            return (optax.apply_updates(p, updates), s), None

        (p, s), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=200)
        return loss(p), s

    return {name: jax.jit(lambda: train(name))() for name in ("adamw", "adam8bit")}


def _nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def test_adam8bit_state_takes_at_most_0_3x_the_bytes_of_f32_adamw(trained):
    assert _nbytes(trained["adam8bit"][1]) <= 0.3 * _nbytes(trained["adamw"][1])


def test_adam8bit_200_step_loss_is_within_2_percent_of_f32_adamw(trained):
    loss32, loss8 = float(trained["adamw"][0]), float(trained["adam8bit"][0])
    assert loss32 < 0.3 * np.log(64)  # far from the uniform start, so the comparison says something
    assert abs(loss8 - loss32) <= 0.02 * loss32


# ------------------------------------------------------------------------------------------------------ host offload
def _train_states(cfg, steps=4):
    """Params and optimizer state after ``steps`` jitted steps that donate both, as a training loop runs them.

    Every argument and result has an explicit sharding: jax matches donated buffers to results by shape and
    dtype, and by memory kind only when all of them are known; otherwise a host-resident state buffer may be
    aliased to a device-resident result of the same shape.
    """
    params, loss = _softmax_regression()
    tx = make_optimizer(cfg)
    state = tx.init(params)
    shardings = jax.tree.map(lambda x: x.sharding, (params, state))

    def step(p, s):
        updates, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, updates), s

    jitted = jax.jit(step, in_shardings=shardings, out_shardings=shardings, donate_argnums=(0, 1))
    for _ in range(steps):
        params, state = jitted(params, state)
    return params, state


@pytest.mark.parametrize("name", ["adamw", "adam8bit"])
def test_offloaded_state_gives_bit_identical_training(name):
    on_device = _train_states(OptimConfig(name=name, lr=1e-2, weight_decay=0.01))
    offloaded = _train_states(OptimConfig(name=name, lr=1e-2, weight_decay=0.01, offload_state=True))
    jax.tree.map(np.testing.assert_array_equal, offloaded, on_device)


def test_offloaded_state_lives_in_pinned_host_memory_across_steps():
    _, state = _train_states(OptimConfig(name="adam8bit", offload_state=True))
    assert {x.sharding.memory_kind for x in jax.tree.leaves(state)} == {"pinned_host"}


def test_place_state_moves_sharded_state_between_memories_keeping_its_sharding():
    mesh = jax.make_mesh((len(jax.devices()),), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, PartitionSpec("fsdp"))
    tx = make_optimizer(OptimConfig())
    state = tx.init({"kernel": jax.device_put(jnp.ones((64, 8)), sharding)})
    host = place_state(state, offload=True)
    back = place_state(host, offload=False)
    mu = lambda s: s[1].mu["kernel"]  # noqa: E731  (clip, adam, schedule) states
    assert mu(host).sharding == sharding.with_memory_kind("pinned_host")
    assert mu(back).sharding.memory_kind == "device" and mu(back).sharding.spec == PartitionSpec("fsdp")


# ------------------------------------------------------------------------------------------------------ bad configs
@pytest.mark.parametrize("field, value", [
    ("name", "adam"), ("lr", 0.0), ("weight_decay", -0.1), ("b1", 1.0), ("b2", -0.1), ("eps", -1.0),
    ("momentum", 1.0), ("schedule", "step"), ("warmup_steps", -1), ("total_steps", 1.5), ("min_lr_ratio", 1.5),
    ("max_grad_norm", -1.0)])
def test_bad_config_value_is_an_error_naming_the_field(field, value):
    with pytest.raises(JaxftError, match=rf"optim\.{field} = "):
        OptimConfig(**{field: value})


def test_decaying_schedule_needs_total_steps_beyond_warmup():
    with pytest.raises(JaxftError, match=r"optim\.total_steps = 10: expected more than warmup_steps \(10\)"):
        OptimConfig(schedule="cosine", warmup_steps=10, total_steps=10)
