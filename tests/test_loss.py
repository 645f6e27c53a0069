"""Cross-entropy as (sum, count): the reference against PyTorch, the chunked version against the reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxft.data.chat import IGNORE_INDEX
from jaxft.train.loss import chunked_cross_entropy, cross_entropy

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


def _chunked(hidden, kernel, labels, z_loss=0.0, chunk_size=CHUNK, vocab_block=16):
    """V = 50 in blocks of 16: three full blocks and a last one shifted left to end at V (it overlaps the third)."""
    return chunked_cross_entropy(hidden, kernel, labels, chunk_size=chunk_size, vocab_block=vocab_block,
                                 z_loss=z_loss)


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


BLOCKINGS = [16, 25, 50, 64]  # overlapping last block, dividing, one block, one block wider than V
LABELS_AT_BLOCK_EDGES = [0, 15, 16, 33, 34, 47, 48, 49]  # 34..47 are seen by both of the last two blocks of 16


@pytest.mark.parametrize("vocab_block", BLOCKINGS)
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_chunked_value_matches_full(z_loss, vocab_block):
    hidden, kernel, labels = _batch()
    labels = labels.at[0, :len(LABELS_AT_BLOCK_EDGES)].set(jnp.asarray(LABELS_AT_BLOCK_EDGES))
    expected_sum, expected_count = _full(hidden, kernel, labels, z_loss)
    loss_sum, n_targets = jax.jit(_chunked, static_argnums=(3, 4, 5))(hidden, kernel, labels, z_loss, CHUNK,
                                                                        vocab_block)
    np.testing.assert_allclose(loss_sum, expected_sum, rtol=1e-6)
    assert n_targets == expected_count


@pytest.mark.parametrize("vocab_block", BLOCKINGS)
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_chunked_gradients_match_full_for_hidden_and_kernel(z_loss, vocab_block):
    hidden, kernel, labels = _batch()
    labels = labels.at[0, :len(LABELS_AT_BLOCK_EDGES)].set(jnp.asarray(LABELS_AT_BLOCK_EDGES))
    grad = lambda loss, **kw: jax.jit(jax.grad(lambda h, w: loss(h, w, labels, z_loss, **kw)[0], argnums=(0, 1)))
    expected = grad(_full)(hidden, kernel)
    actual = grad(_chunked, vocab_block=vocab_block)(hidden, kernel)
    for name, a, e in zip(("hidden", "kernel"), actual, expected):
        # kernel gradients sum over all tokens, so f32 rounding is relative to their size
        np.testing.assert_allclose(a, e, atol=1e-6, rtol=1e-6, err_msg=name)


def test_chunked_accepts_bfloat16_hidden_and_kernel_with_float32_logits():
    hidden, kernel, labels = _batch()
    hidden16, kernel16 = hidden.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
    logits = jnp.einsum("btd,dv->btv", hidden16, kernel16, preferred_element_type=jnp.float32)
    loss_sum, _ = _chunked(hidden16, kernel16, labels)
    np.testing.assert_allclose(loss_sum, cross_entropy(logits, labels)[0], rtol=1e-6)


def test_chunked_bfloat16_gradients_keep_their_dtypes_and_match_full():
    hidden, kernel, labels = _batch()
    hidden16, kernel16 = hidden.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)

    def full16(h, w):
        return cross_entropy(jnp.einsum("btd,dv->btv", h, w, preferred_element_type=jnp.float32), labels)[0]

    expected = jax.grad(full16, argnums=(0, 1))(hidden16, kernel16)
    actual = jax.grad(lambda h, w: _chunked(h, w, labels)[0], argnums=(0, 1))(hidden16, kernel16)
    for a, e in zip(actual, expected):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(e, np.float32), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("loss", [_full, _chunked], ids=["full", "chunked"])
def test_batch_without_targets_gives_zero_sum_zero_count_and_zero_finite_gradients(loss):
    hidden, kernel, _ = _batch()
    labels = jnp.full((B, T), IGNORE_INDEX)
    loss_sum, n_targets = loss(hidden, kernel, labels)
    assert loss_sum == 0 and n_targets == 0
    for grad in jax.grad(lambda h, w: loss(h, w, labels)[0], argnums=(0, 1))(hidden, kernel):
        assert np.all(np.isfinite(grad)) and not np.any(grad)


def _value_and_grad_temp_bytes(loss, tokens, vocab, chunk_size=256, d=64, vocab_block=2048):
    """Compiled scratch memory of value_and_grad(loss sum) w.r.t. hidden [1, tokens, d] and kernel [d, vocab]."""
    fn = jax.value_and_grad(lambda h, w, l: loss(h, w, l, chunk_size=chunk_size, vocab_block=vocab_block)[0],
                            argnums=(0, 1))
    args = (jax.ShapeDtypeStruct((1, tokens, d), jnp.float32), jax.ShapeDtypeStruct((d, vocab), jnp.float32),
            jax.ShapeDtypeStruct((1, tokens), jnp.int32))
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def _full_ignoring_chunks(hidden, kernel, labels, chunk_size, vocab_block):
    return _full(hidden, kernel, labels)


def test_chunked_value_and_grad_temp_memory_does_not_grow_with_token_count():
    assert (_value_and_grad_temp_bytes(_chunked, 8192, 4096)
            <= 1.05 * _value_and_grad_temp_bytes(_chunked, 1024, 4096))


def test_chunked_value_and_grad_temp_memory_does_not_grow_with_vocab():
    """4k -> 32k vocabulary at the same chunk and block sizes: the scratch memory stays the same."""
    assert (_value_and_grad_temp_bytes(_chunked, 8192, 32768)
            <= 1.05 * _value_and_grad_temp_bytes(_chunked, 8192, 4096))


def test_chunked_value_and_grad_temp_memory_stays_under_three_blocks_of_logits():
    for vocab in (4096, 32768):
        assert _value_and_grad_temp_bytes(_chunked, 8192, vocab) <= 3 * 256 * 2048 * 4


def test_full_value_and_grad_temp_memory_grows_with_tokens_and_vocab():
    """The control: the same measurement sees the [tokens, V] logits of the unchunked loss."""
    base = _value_and_grad_temp_bytes(_full_ignoring_chunks, 1024, 4096)
    assert _value_and_grad_temp_bytes(_full_ignoring_chunks, 8192, 4096) >= 7 * base
    assert _value_and_grad_temp_bytes(_full_ignoring_chunks, 1024, 32768) >= 7 * base
