"""Logit parity of the functional decoder with transformers' eager implementation."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxft
from hf_oracle import build, random_ids, save, torch_logits

VARIANTS = {
    "llama_gqa_untied": ("llama", {}),
    "llama3_rope_tied": ("llama", dict(tie_word_embeddings=True, rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "linear_rope": ("llama", dict(rope_scaling=dict(rope_type="linear", factor=2.0))),
    "dynamic_rope": ("llama", dict(max_position_embeddings=16, rope_scaling=dict(rope_type="dynamic", factor=2.0))),
    "yarn_rope": ("llama", dict(rope_scaling=dict(rope_type="yarn", factor=4.0,
                                                   original_max_position_embeddings=16))),
    "llama_attention_bias": ("llama", dict(attention_bias=True, mlp_bias=True)),
    "qwen2_bias": ("qwen2", {}),
    "qwen2_sliding_layers": ("qwen2", dict(use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    "mistral_window": ("mistral", dict(sliding_window=6)),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_f32_logits_match_transformers(tmp_path, name):
    model_type, overrides = VARIANTS[name]
    model = build(model_type, **overrides)
    ids = random_ids((2, 24))
    cfg, params = jaxft.from_pretrained(save(model, tmp_path / name))
    ours = np.asarray(jaxft.forward(cfg, params, jnp.asarray(ids)))
    np.testing.assert_allclose(ours, torch_logits(model, ids), atol=1e-4, rtol=0)


def test_bf16_logits_match_transformers_bf16(tmp_path):
    # Smaller weights than the f32 tests: with std 0.15 bf16 rounding alone moves transformers' own logits by ~0.1.
    model = build("llama", dtype=torch.bfloat16, scale=0.08)
    ids = random_ids((2, 16))
    cfg, params = jaxft.from_pretrained(save(model, tmp_path / "bf16"), dtype="bfloat16")
    assert params["layers"]["q_proj"]["kernel"].dtype == jnp.bfloat16
    ours = np.asarray(jaxft.forward(cfg, params, jnp.asarray(ids)))
    np.testing.assert_allclose(ours, torch_logits(model, ids), atol=5e-2, rtol=0)


def test_packed_row_equals_documents_run_alone(tmp_path):
    model = build("mistral", sliding_window=4)
    cfg, params = jaxft.from_pretrained(save(model, tmp_path / "m"))
    doc_a, doc_b = random_ids((1, 9), seed=1), random_ids((1, 7), seed=2)
    packed = np.concatenate([doc_a, doc_b], axis=1)
    segments = np.array([[1] * 9 + [2] * 7])
    positions = np.array([list(range(9)) + list(range(7))])
    out = np.asarray(jaxft.forward(cfg, params, jnp.asarray(packed), jnp.asarray(positions), jnp.asarray(segments)))
    alone_a = np.asarray(jaxft.forward(cfg, params, jnp.asarray(doc_a)))
    alone_b = np.asarray(jaxft.forward(cfg, params, jnp.asarray(doc_b)))
    np.testing.assert_allclose(out[:, :9], alone_a, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out[:, 9:], alone_b, atol=1e-5, rtol=0)
    # Positions default to restarting at each segment.
    derived = np.asarray(jaxft.forward(cfg, params, jnp.asarray(packed), segment_ids=jnp.asarray(segments)))
    np.testing.assert_allclose(derived, out, atol=1e-6, rtol=0)


def test_remat_policies_do_not_change_logits(tmp_path):
    model = build("llama")
    cfg, params = jaxft.from_pretrained(save(model, tmp_path / "m"))
    ids = jnp.asarray(random_ids((1, 8)))
    ref = jaxft.forward(cfg, params, ids)
    for policy in ("full", "dots", "dots_no_batch"):
        np.testing.assert_array_equal(jaxft.forward(cfg.replace(remat=policy), params, ids), ref)
