"""Cross-entropy as (sum, count): the reference against PyTorch, the chunked version against the reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxft.train.loss import IGNORE_INDEX, chunked_cross_entropy, cross_entropy

B, T, D, V = 3, 37, 16, 50      # B * T = 111 tokens: not a multiple of any chunk size used below
CHUNK = 32


def _batch(seed=0, ignored_fraction=0.3):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(B, T, D)).astype(np.float32)
    kernel = (rng.normal(size=(D, V)) / np.sqrt(D)).astype(np.float32)
    labels = rng.integers(0, V, size=(B, T)).astype(np.int32)
    labels[rng.random((B, T)) < ignored_fraction] = IGNORE_INDEX
    return jnp.asarray(hidden), jnp.asarray(kernel), jnp.asarray(labels)


def _full(hidden, kernel, labels, z_loss=0.0):
    return cross_entropy(jnp.einsum("btd,dv->btv", hidden, kernel), labels, z_loss=z_loss)


def _chunked(hidden, kernel, labels, z_loss=0.0, chunk_size=CHUNK):
    return chunked_cross_entropy(hidden, kernel, labels, chunk_size=chunk_size, z_loss=z_loss)


def test_reference_sum_matches_torch_cross_entropy_with_ignore_index():
    hidden, kernel, labels = _batch()
    logits = np.array(jnp.einsum("btd,dv->btv", hidden, kernel))
    expected = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits).reshape(-1, V), torch.from_numpy(np.array(labels)).reshape(-1).long(),
        ignore_index=-100, reduction="sum")
    loss_sum, _ = cross_entropy(jnp.asarray(logits), labels)
    np.testing.assert_allclose(loss_sum, expected.item(), rtol=1e-6)


def test_reference_counts_only_labels_that_are_not_ignored():
    _, _, labels = _batch()
    _, n_targets = cross_entropy(jnp.zeros((B, T, V)), labels)
    assert n_targets.dtype == jnp.float32
    assert n_targets == np.sum(np.asarray(labels) != -100)


def test_reference_z_loss_adds_squared_log_normalizer_per_target():
    hidden, kernel, labels = _batch()
    logits = torch.from_numpy(np.array(jnp.einsum("btd,dv->btv", hidden, kernel))).reshape(-1, V)
    targets = torch.from_numpy(np.array(labels)).reshape(-1).long()
    is_target = targets != -100
    expected = (torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
                + 1e-2 * torch.logsumexp(logits, -1)[is_target].square().sum())
    np.testing.assert_allclose(_full(hidden, kernel, labels, z_loss=1e-2)[0], expected.item(), rtol=1e-6)


def test_micro_batch_sums_over_total_count_equal_the_whole_batch_mean():
    hidden, kernel, labels = _batch()
    whole_sum, whole_count = _full(hidden, kernel, labels)
    parts = [_full(hidden[i:i + 1], kernel, labels[i:i + 1]) for i in range(B)]
    np.testing.assert_allclose(sum(s for s, _ in parts) / sum(n for _, n in parts), whole_sum / whole_count,
                               rtol=1e-6)


@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_chunked_value_matches_full(z_loss):
    hidden, kernel, labels = _batch()
    expected_sum, expected_count = _full(hidden, kernel, labels, z_loss)
    loss_sum, n_targets = jax.jit(_chunked, static_argnums=3)(hidden, kernel, labels, z_loss)
    np.testing.assert_allclose(loss_sum, expected_sum, rtol=1e-6)
    assert n_targets == expected_count


@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_chunked_gradients_match_full_for_hidden_and_kernel(z_loss):
    hidden, kernel, labels = _batch()
    grad = lambda loss: jax.jit(jax.grad(lambda h, w: loss(h, w, labels, z_loss)[0], argnums=(0, 1)))
    expected = grad(_full)(hidden, kernel)
    actual = grad(_chunked)(hidden, kernel)
    for name, a, e in zip(("hidden", "kernel"), actual, expected):
        # kernel gradients sum over all tokens, so f32 rounding is relative to their size
        np.testing.assert_allclose(a, e, atol=1e-6, rtol=1e-6, err_msg=name)


def test_chunked_accepts_bfloat16_hidden_and_kernel_with_float32_logits():
    hidden, kernel, labels = _batch()
    hidden16, kernel16 = hidden.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
    logits = jnp.einsum("btd,dv->btv", hidden16, kernel16, preferred_element_type=jnp.float32)
    loss_sum, _ = _chunked(hidden16, kernel16, labels)
    np.testing.assert_allclose(loss_sum, cross_entropy(logits, labels)[0], rtol=1e-6)


@pytest.mark.parametrize("loss", [_full, _chunked], ids=["full", "chunked"])
def test_batch_without_targets_gives_zero_sum_zero_count_and_zero_finite_gradients(loss):
    hidden, kernel, _ = _batch()
    labels = jnp.full((B, T), IGNORE_INDEX)
    loss_sum, n_targets = loss(hidden, kernel, labels)
    assert loss_sum == 0 and n_targets == 0
    for grad in jax.grad(lambda h, w: loss(h, w, labels)[0], argnums=(0, 1))(hidden, kernel):
        assert np.all(np.isfinite(grad)) and not np.any(grad)


def _value_and_grad_temp_bytes(loss, tokens, vocab, chunk_size=256, d=64):
    """Compiled scratch memory of value_and_grad(loss sum) w.r.t. hidden [1, tokens, d] and kernel [d, vocab]."""
    fn = jax.value_and_grad(lambda h, w, l: loss(h, w, l, chunk_size=chunk_size)[0], argnums=(0, 1))
    args = (jax.ShapeDtypeStruct((1, tokens, d), jnp.float32), jax.ShapeDtypeStruct((d, vocab), jnp.float32),
            jax.ShapeDtypeStruct((1, tokens), jnp.int32))
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def _full_ignoring_chunks(hidden, kernel, labels, chunk_size):
    return _full(hidden, kernel, labels)


def test_chunked_value_and_grad_temp_memory_does_not_grow_with_token_count():
    assert (_value_and_grad_temp_bytes(_chunked, 8192, 4096)
            <= 1.05 * _value_and_grad_temp_bytes(_chunked, 1024, 4096))


def test_chunked_value_and_grad_temp_memory_does_not_grow_with_vocab_at_fixed_chunk_logits_size():
    """Memory follows chunk_size * V (one chunk's logits), not tokens * V: 8x the vocab at 1/8 the chunk is flat."""
    assert (_value_and_grad_temp_bytes(_chunked, 8192, 32768, chunk_size=256)
            <= 1.05 * _value_and_grad_temp_bytes(_chunked, 8192, 4096, chunk_size=2048))


def test_chunked_value_and_grad_temp_memory_stays_under_three_chunks_of_logits():
    for vocab in (4096, 32768):
        assert _value_and_grad_temp_bytes(_chunked, 8192, vocab) <= 3 * 256 * vocab * 4


def test_full_value_and_grad_temp_memory_grows_with_tokens_and_vocab():
    """The control: the same measurement sees the [tokens, V] logits of the unchunked loss."""
    base = _value_and_grad_temp_bytes(_full_ignoring_chunks, 1024, 4096)
    assert _value_and_grad_temp_bytes(_full_ignoring_chunks, 8192, 4096) >= 7 * base
    assert _value_and_grad_temp_bytes(_full_ignoring_chunks, 1024, 32768) >= 7 * base
