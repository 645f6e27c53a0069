"""The run skeleton's own pieces: the callback cadence, the loop (guard, throughput, callbacks in order) and the one
builder of a run's params."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxft
from jaxft.models.llama import LINEAR_MODULES
from jaxft.ops import nf4
from jaxft.peft import lora
from jaxft.recipes.skeleton import Every, build_params, train_loop
from jaxft.train.metrics import SkipGuard, Throughput, TrainingDiverged

MODEL = jaxft.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("n, steps, due", [(3, range(1, 11), [3, 6, 9, 10]), (None, range(1, 11), [10]),
                                           (0, range(1, 5), [4]), (2, range(5, 9), [6, 8]),
                                           (1, range(3, 6), [3, 4, 5])])
def test_every_is_due_on_multiples_of_n_and_on_the_last_step(n, steps, due):
    assert [s for s in steps if Every(n, print).due(s, steps.stop - 1)] == due


def _batches(step: int) -> dict:
    """A [1, 2, 4] batch whose real tokens (segment id != 0) number ``step`` (at most 8)."""
    segments = (np.arange(8) < step).astype(np.int32).reshape(1, 2, 4)
    return {"segment_ids": jnp.asarray(segments), "target": jnp.float32(step)}


def _toy_update(state, batches):
    """One gradient step of 0.5 * (w - target)^2 with lr 0.5, and the step's metrics as a train step reports them."""
    w = state["w"]
    grad = w - batches["target"]
    loss = 0.5 * grad ** 2
    return {"w": w - 0.5 * grad}, {"loss": loss, "grad_norm": jnp.abs(grad), "skipped": ~jnp.isfinite(grad)}


def test_loop_updates_then_runs_due_callbacks_in_order_with_each_steps_state():
    seen = []
    callbacks = [Every(1, lambda r: seen.append(("log", r.step, float(r.state["w"]), float(r.metrics["loss"])))),
                 Every(2, lambda r: seen.append(("eval", r.step, float(r.state["w"])))),
                 Every(3, lambda r: seen.append(("save", r.step, r.speed.get("padding"))))]
    batches = iter([_batches(step) for step in range(2, 6)])
    state = train_loop({"w": jnp.float32(1.0)}, range(2, 6), _toy_update, lambda _state: next(batches), SkipGuard(3),
                       Throughput(), callbacks)

    expected, w, tokens = [], 1.0, 0
    for step in range(2, 6):  # the same arithmetic, by hand
        loss, w = 0.5 * (w - step) ** 2, w - 0.5 * (w - step)
        tokens += step
        expected.append(("log", step, w, loss))
        if step % 2 == 0 or step == 5:
            expected.append(("eval", step, w))
        if step % 3 == 0 or step == 5:
            expected.append(("save", step, 1 - tokens / (8 * (step - 1))))
    assert seen == expected  # every value a binary fraction: exact in float32
    assert float(state["w"]) == w


def test_loop_stops_at_the_guards_limit_of_non_finite_steps():
    def diverging(state, batches):
        return _toy_update(state, {**batches, "target": jnp.float32(np.nan)})

    logged = []
    with pytest.raises(TrainingDiverged, match="step 2: 2 steps in a row were skipped"):
        train_loop({"w": jnp.float32(0.0)}, range(1, 11), diverging, lambda _state: _batches(4), SkipGuard(2), Throughput(),
                   [Every(1, lambda r: logged.append(r.step))])
    assert logged == [1, 2]  # step 2's flag is read when step 3 is dispatched: the loop stops there


def _lora_config():
    return lora.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])


def test_build_params_quantizes_every_linear_kernel_then_adds_the_adapters():
    base = jaxft.init_params(MODEL, jax.random.PRNGKey(0))
    rng, quant = jax.random.PRNGKey(3), jaxft.QuantConfig(quant_type="fp4", blocksize=32, double_quant=False)
    built = build_params(MODEL, base, rng, quant=quant, peft=(_lora_config(),))

    by_hand = jax.tree.map(lambda x: x, base)
    for m in LINEAR_MODULES:
        by_hand["layers"][m]["kernel"] = nf4.quantize(base["layers"][m]["kernel"], 32, False, "fp4")
    by_hand = lora.add(MODEL, by_hand, _lora_config(), rng)
    assert jax.tree.structure(built) == jax.tree.structure(by_hand)
    for ours, theirs in zip(jax.tree.leaves(built), jax.tree.leaves(by_hand), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    assert not isinstance(base["layers"]["q_proj"]["kernel"], nf4.QuantizedTensor)  # the base is left as it was


def test_build_params_without_quant_or_adapters_is_the_base_and_traces_to_the_same_shapes():
    base = jaxft.init_params(MODEL, jax.random.PRNGKey(0))
    assert build_params(MODEL, base, jax.random.PRNGKey(1)) is base
    concrete = build_params(MODEL, base, jax.random.PRNGKey(1), quant=jaxft.QuantConfig(), peft=(_lora_config(),))
    abstract = jax.eval_shape(
        lambda p, k: build_params(MODEL, p, k, quant=jaxft.QuantConfig(), peft=(_lora_config(),)), base,
        jax.random.PRNGKey(1))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), abstract) == jax.tree.map(lambda x: (x.shape, x.dtype), concrete)
