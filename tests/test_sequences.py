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
