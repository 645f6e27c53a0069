"""Per-document totals and preference pairs of packed rows, against loops over the documents."""
import jax
import jax.numpy as jnp
import numpy as np

import jaxft
from jaxft.train.sequences import label_logprobs, pairs, segment_totals

CFG = jaxft.ModelConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=2)


def test_segment_totals_and_pairs_match_a_loop_over_documents():
    rng = np.random.default_rng(0)
    segment_ids = np.array([[1, 1, 2, 2, 2, 3, 4, 4, 0, 0], [1, 1, 1, 2, 2, 0, 0, 0, 0, 0]])
    values = rng.normal(size=(2, 10, 3)).astype(np.float32)
    totals = np.asarray(segment_totals(jnp.asarray(values), jnp.asarray(segment_ids)))
    for b in range(2):
        for s in range(10):
            np.testing.assert_allclose(totals[b, s], values[b][segment_ids[b] == s].sum(0), rtol=1e-6, atol=1e-6)
    chosen, rejected = (np.asarray(x) for x in pairs(jnp.asarray(totals)))
    assert chosen.shape == rejected.shape == (2, 5, 3)
    np.testing.assert_array_equal(chosen[0, :2], totals[0, [1, 3]])
    np.testing.assert_array_equal(rejected[0, :2], totals[0, [2, 4]])
    np.testing.assert_array_equal(chosen[1, :1], totals[1, [1]])
    assert not chosen[1, 1:].any() and not rejected[1, 1:].any()  # no further pair in row 1


def test_label_logprobs_chunked_equal_full_logits_and_log_softmax():
    params = jaxft.init_params(CFG, jax.random.PRNGKey(0), std=0.5)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 40, size=(2, 12))
    labels = np.where(rng.random((2, 12)) < 0.6, rng.integers(0, 40, size=(2, 12)), -100)
    batch = {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(labels),
             "segment_ids": jnp.asarray(np.array([[1] * 6 + [2] * 6, [1] * 12]))}
    logits = np.asarray(jaxft.forward(CFG, params, batch["input_ids"], segment_ids=batch["segment_ids"]), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    expected = np.where(labels != -100, np.take_along_axis(logp, np.maximum(labels, 0)[..., None], -1)[..., 0], 0)
    for chunk in (0, 5):
        np.testing.assert_allclose(np.asarray(label_logprobs(CFG, params, batch, chunk_size=chunk)), expected,
                                   rtol=1e-5, atol=1e-5)


def test_without_methods_is_the_base_and_a_reference_is_added_outside_the_gradient():
    from dataclasses import dataclass

    import optax

    from jaxft.peft import lora
    from jaxft.peft.methods import without_methods
    from jaxft.peft.tree import Trainable, split
    from jaxft.train.loop import StepConfig, init_state, train_step, with_reference
    from jaxft.train.objectives import CausalLM

    base = jaxft.init_params(CFG, jax.random.PRNGKey(0))
    params = lora.add(CFG, base, jaxft.LoraConfig(r=2, init_lora_weights=False), jax.random.PRNGKey(1))
    off = without_methods(params)
    assert jax.tree.structure(off) == jax.tree.structure(base)
    assert all(a is b for a, b in zip(jax.tree.leaves(off), jax.tree.leaves(base)))  # shared, not copied

    @dataclass(frozen=True)
    class WithReference(CausalLM):
        reference_keys = ("ref_logps",)

        def reference(self, cfg, params, batch):
            return {"ref_logps": label_logprobs(cfg, without_methods(params), batch, chunk_size=0)}

        def loss_sum(self, cfg, params, batch, rng=None, activation_sharding=None):
            logps = label_logprobs(cfg, params, batch, chunk_size=0)
            return jnp.sum(jnp.square(logps - batch["ref_logps"]))

    rng = np.random.default_rng(2)
    batch = {"input_ids": jnp.asarray(rng.integers(0, 40, (1, 2, 8))),
             "labels": jnp.asarray(rng.integers(0, 40, (1, 2, 8))),
             "segment_ids": jnp.ones((1, 2, 8), jnp.int32), "positions": jnp.tile(jnp.arange(8), (1, 2, 1))}
    objective = WithReference(chunk_size=0)
    single = {k: v[0] for k, v in batch.items()}
    expected = label_logprobs(CFG, base, single, chunk_size=0)
    np.testing.assert_array_equal(with_reference(objective, CFG, params, single)["ref_logps"], expected)
    kept = {**single, "ref_logps": jnp.zeros_like(expected)}  # precomputed: left as it is
    assert with_reference(objective, CFG, params, kept)["ref_logps"] is kept["ref_logps"]
    trainable, frozen = split(params, Trainable())
    state = init_state(trainable, optax.sgd(0.1))
    _, metrics = train_step(CFG, StepConfig(objective=objective), optax.sgd(0.1), state, frozen, batch)
    policy = label_logprobs(CFG, params, single, chunk_size=0)
    units = jnp.sum(single["labels"] != -100)
    np.testing.assert_allclose(metrics["loss"], jnp.sum(jnp.square(policy - expected)) / units, rtol=1e-5)
