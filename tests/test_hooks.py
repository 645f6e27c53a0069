"""The forward hooks (jaxft.models.hooks) against direct implementations: transformers with inputs_embeds, a prefix
KV cache, torch forward hooks and output_hidden_states; prefix attention against a mask built by hand."""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import DynamicCache

import jaxft
from hf_oracle import build, random_ids, save
from jaxft.models import llama
from jaxft.models.generate import left_pad
from jaxft.models.sample import forward_cached, init_cache
from jaxft.models.hooks import Hooks
from jaxft.models.llama import forward, hidden_states, rms_norm
from jaxft.ops.attention import attention_mask, dot_product_attention, lse_attention, with_prefix_slots
from jaxft.ops.blockwise_attention import blockwise_attention, fused_attention

P = 3            # prefix length
SMALL_BLOCKS = partial(blockwise_attention, block_q=4, block_k=4)   # several query and key blocks at T ~ 10
# jitted: one compilation per call site instead of one per eager op
hidden_jit = jax.jit(hidden_states, static_argnums=0, static_argnames="hooks")
forward_jit = jax.jit(forward, static_argnums=0, static_argnames="hooks")


@pytest.fixture(scope="module")
def llama_model(tmp_path_factory):
    model = build("llama")
    cfg, params = jaxft.from_pretrained(save(model, tmp_path_factory.mktemp("hooks") / "m"))
    return model, cfg, params


def _attention_cfg(cfg, attention, monkeypatch):
    """cfg with plain attention, or blockwise attention with blocks small enough that the model's short rows span
    several of them (the model calls platform_attention, which on CPU is blockwise_attention at 512-blocks)."""
    if attention == "blockwise":
        monkeypatch.setattr(llama, "platform_attention", SMALL_BLOCKS)
    return cfg.replace(attention=attention)


def _torch(x):
    return torch.as_tensor(np.array(x))


# ---- inputs_embeds ----

def test_inputs_embeds_match_transformers_and_the_ids_path(llama_model):
    model, cfg, params = llama_model
    embeds = np.random.default_rng(0).normal(size=(2, 9, cfg.hidden_size)).astype(np.float32) * 0.5
    ours = hidden_jit(cfg, params, None, inputs_embeds=jnp.asarray(embeds)).hidden
    with torch.no_grad():
        ref = model.model(inputs_embeds=_torch(embeds)).last_hidden_state.numpy()
        ref_logits = model(inputs_embeds=_torch(embeds)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(forward_jit(cfg, params, None, inputs_embeds=embeds)), ref_logits, atol=1e-4,
                               rtol=0)
    ids = random_ids((2, 9), seed=1)
    looked_up = params["embed_tokens"]["embedding"][ids]
    np.testing.assert_allclose(np.asarray(forward_jit(cfg, params, None, inputs_embeds=looked_up)),
                               np.asarray(forward_jit(cfg, params, ids)), atol=1e-6, rtol=0)


# ---- prefix keys/values: one attention against a mask built by hand ----

def _reference_prefix_attention(q, k, v, prefix_k, prefix_v, segments, window):
    """numpy: softmax attention over concat(prefix, keys); prefix slot j (of 0..P-1, right before each document's
    first token) visible to every non-padding query at position t of its document with t + P - j < window
    (transformers' sliding window over a past cache of P slots), the others under the causal / same-segment /
    window rule."""
    b, t, h, hd = q.shape
    keys, values = np.concatenate([prefix_k, k], 1), np.concatenate([prefix_v, v], 1)
    group = h // k.shape[2]
    out = np.zeros_like(q)
    for row in range(b):
        for i in range(t):
            position = i - min(j for j in range(t) if segments[row, j] == segments[row, i])
            seen = [segments[row, i] != 0 and position + P - j < window for j in range(P)] + [j <= i and segments[row, j] == segments[row, i] and i - j < window
                                                  for j in range(t)]
            for head in range(h):
                scores = keys[row, :, head // group] @ q[row, i, head] / np.sqrt(hd)
                scores = np.where(seen, scores, -np.inf)
                probs = np.exp(scores - scores.max())
                out[row, i, head] = probs / probs.sum() @ values[row, :, head // group]
    return out


def test_prefix_attention_matches_attention_over_concatenated_keys_by_hand():
    rng = np.random.default_rng(0)
    b, t, h, kvh, hd, window = 2, 10, 4, 2, 8, 3
    q = rng.normal(size=(b, t, h, hd)).astype(np.float32)
    k, v = (rng.normal(size=(b, t, kvh, hd)).astype(np.float32) for _ in range(2))
    prefix_k, prefix_v = (rng.normal(size=(b, P, kvh, hd)).astype(np.float32) for _ in range(2))
    segments = np.array([[1, 1, 1, 1, 2, 2, 2, 0, 0, 0], [1] * t], np.int32)   # packed row + padding, one document
    expected = _reference_prefix_attention(q, k, v, prefix_k, prefix_v, segments, window)

    index = jnp.broadcast_to(jnp.arange(t), (b, t))
    k_index, k_segment = with_prefix_slots(index, jnp.asarray(segments), P)
    mask_inputs = (index, k_index, jnp.asarray(segments), k_segment, jnp.int32(window))
    q_position = llama.default_positions(jnp.asarray(segments))
    keys, values = jnp.concatenate([prefix_k, k], 1), jnp.concatenate([prefix_v, v], 1)
    mask = attention_mask(*mask_inputs, q_position)
    real = segments != 0
    for name, out in {
        "plain": jax.jit(lse_attention)(q, keys, values, mask),
        "blockwise": jax.jit(partial(SMALL_BLOCKS, q_position=q_position))(q, keys, values, *mask_inputs),
        "fused": jax.jit(partial(fused_attention, q_position=q_position))(q, keys, values, *mask_inputs),
    }.items():
        np.testing.assert_allclose(np.asarray(out)[real], expected[real], atol=1e-5, rtol=0, err_msg=name)
    np.testing.assert_allclose(np.asarray(lse_attention(q, keys, values, mask)), expected, atol=1e-5, rtol=0)

    d_out = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

    def grads(attention):
        return jax.jit(jax.grad(lambda q, kk, vv: jnp.sum(attention(q, kk, vv) * d_out), argnums=(0, 1, 2)))(
            q, keys, values)

    autodiff = grads(lambda q, kk, vv: dot_product_attention(q, kk, vv, mask))
    blockwise = grads(lambda q, kk, vv: SMALL_BLOCKS(q, kk, vv, *mask_inputs, q_position=q_position))
    for ours, ref in zip(blockwise, autodiff):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=1e-5, rtol=0)


# ---- prefix keys/values: the model against transformers with a prefix KV cache (PEFT's prefix tuning) ----

def _prefix_hook(lp):
    return lp["prefix"]["k"], lp["prefix"]["v"]


PREFIX = Hooks(prefix=_prefix_hook)


def _with_prefix(cfg, params, batch=None, seed=0):
    """params with a random prefix group under "layers": [L, (B,) P, KVH, hd] keys and values."""
    lead = (cfg.num_hidden_layers,) + (() if batch is None else (batch,))
    shape = (*lead, P, cfg.num_key_value_heads, cfg.head_dim)
    rng = np.random.default_rng(seed)
    prefix = {name: jnp.asarray(rng.normal(size=shape), jnp.float32) for name in ("k", "v")}
    return {**params, "layers": {**params["layers"], "prefix": prefix}}


def _transformers_with_prefix(model, ids, prefix, grad=False, positions_from_zero=True):
    """HF's last hidden state of ``ids`` [B, T] after a cache pre-filled with the prefix ([L, B, P, KVH, hd] numpy,
    moved to HF's [B, KVH, P, hd]), attention mask all ones over P + T, positions 0..T-1 (jaxft's default), or
    without ``positions_from_zero`` HF's own cache positions P..P+T-1 (what PEFT's prefix tuning gives)."""
    cache = DynamicCache(config=model.config)
    tensors = {name: torch.tensor(np.asarray(prefix[name]), requires_grad=grad) for name in ("k", "v")}
    for layer in range(model.config.num_hidden_layers):
        cache.update(tensors["k"][layer].transpose(1, 2), tensors["v"][layer].transpose(1, 2), layer)
    b, t = ids.shape
    out = model.model(torch.as_tensor(ids), attention_mask=torch.ones(b, P + t, dtype=torch.long),
                      position_ids=torch.arange(t).expand(b, t) if positions_from_zero else None, cache=cache,
                      use_cache=True)
    return out.last_hidden_state, tensors


@pytest.mark.parametrize("attention", ["plain", "blockwise"])
def test_prefix_matches_transformers_prefix_cache(llama_model, attention, monkeypatch):
    model, cfg, params = llama_model
    cfg = _attention_cfg(cfg, attention, monkeypatch)
    ids = random_ids((2, 10), seed=2)
    for batch in (None, 2):                        # one prefix for every row, and one per row
        with_prefix = _with_prefix(cfg, params, batch, seed=3)
        prefix = {name: np.broadcast_to(with_prefix["layers"]["prefix"][name][:, None] if batch is None else
                                        with_prefix["layers"]["prefix"][name], (cfg.num_hidden_layers, 2, P,
                                                                                cfg.num_key_value_heads, cfg.head_dim))
                  for name in ("k", "v")}
        with torch.no_grad():
            ref = _transformers_with_prefix(model, ids, prefix)[0].numpy()
        ours = hidden_jit(cfg, with_prefix, ids, hooks=PREFIX).hidden
        np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)


def test_tokens_numbered_after_the_prefix_match_transformers_cache_positions(llama_model):
    """PEFT's prefix tuning numbers the tokens after the P virtual ones (HF's cache positions P..P+T-1): given
    those positions, the prefix hook reproduces it."""
    model, cfg, params = llama_model
    ids = random_ids((2, 10), seed=2)
    with_prefix = _with_prefix(cfg, params, 2, seed=3)
    prefix = {name: np.asarray(with_prefix["layers"]["prefix"][name]) for name in ("k", "v")}
    with torch.no_grad():
        ref = _transformers_with_prefix(model, ids, prefix, positions_from_zero=False)[0].numpy()
    positions = jnp.broadcast_to(P + jnp.arange(10), (2, 10))
    ours = hidden_jit(cfg, with_prefix, ids, positions, hooks=PREFIX).hidden
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)
    from_zero = hidden_jit(cfg, with_prefix, ids, hooks=PREFIX).hidden
    assert np.max(np.abs(np.asarray(from_zero) - ref)) > 1e-3, "positions must matter here"


@pytest.mark.parametrize("attention", ["plain", "blockwise"])
def test_every_document_of_a_packed_row_sees_the_prefix(llama_model, attention, monkeypatch):
    model, cfg, params = llama_model
    cfg = _attention_cfg(cfg, attention, monkeypatch)
    with_prefix = _with_prefix(cfg, params, seed=4)
    prefix = {name: np.asarray(with_prefix["layers"]["prefix"][name])[:, None] for name in ("k", "v")}
    doc_a, doc_b = random_ids((1, 5), seed=5), random_ids((1, 4), seed=6)
    packed = np.concatenate([doc_a, doc_b, np.zeros((1, 3), np.int64)], axis=1)
    segments = np.array([[1] * 5 + [2] * 4 + [0] * 3])
    ours = np.asarray(hidden_jit(cfg, with_prefix, packed, segment_ids=jnp.asarray(segments), hooks=PREFIX).hidden)
    with torch.no_grad():
        alone_a = _transformers_with_prefix(model, doc_a, prefix)[0].numpy()
        alone_b = _transformers_with_prefix(model, doc_b, prefix)[0].numpy()
    np.testing.assert_allclose(ours[:, :5], alone_a, atol=1e-4, rtol=0)
    np.testing.assert_allclose(ours[:, 5:9], alone_b, atol=1e-4, rtol=0)
    assert np.isfinite(ours).all()


def test_prefix_gradients_match_torch_autograd_in_plain_blockwise_and_remat(llama_model, monkeypatch):
    model, cfg, params = llama_model
    with_prefix = _with_prefix(cfg, params, seed=7)
    ids = random_ids((2, 10), seed=8)
    weights = np.random.default_rng(9).normal(size=(2, 10, cfg.hidden_size)).astype(np.float32)

    def prefix_grads(cfg):
        def loss(prefix):
            tree = {**with_prefix, "layers": {**with_prefix["layers"], "prefix": prefix}}
            return jnp.sum(hidden_jit(cfg, tree, ids, hooks=PREFIX).hidden * weights)
        return jax.jit(jax.grad(loss))(with_prefix["layers"]["prefix"])

    prefix = {name: np.broadcast_to(np.asarray(with_prefix["layers"]["prefix"][name])[:, None],
                                    (cfg.num_hidden_layers, 2, P, cfg.num_key_value_heads, cfg.head_dim)).copy()
              for name in ("k", "v")}
    torch_hidden, tensors = _transformers_with_prefix(model, ids, prefix, grad=True)
    (torch_hidden * _torch(weights)).sum().backward()
    plain = prefix_grads(cfg)
    for name in ("k", "v"):     # a shared prefix's gradient sums over the rows it was broadcast to
        np.testing.assert_allclose(np.asarray(plain[name]), tensors[name].grad.sum(1).numpy(), atol=1e-4, rtol=0)
    remat = prefix_grads(cfg.replace(remat="full"))
    blockwise = prefix_grads(_attention_cfg(cfg, "blockwise", monkeypatch))
    for name in ("k", "v"):
        np.testing.assert_allclose(np.asarray(remat[name]), np.asarray(plain[name]), atol=1e-4, rtol=0)
        np.testing.assert_allclose(np.asarray(blockwise[name]), np.asarray(plain[name]), atol=1e-4, rtol=0)


# ---- prefix keys/values in KV-cache decoding ----

@pytest.mark.parametrize("attention", ["plain", "blockwise"])
def test_cached_decoding_with_prefix_equals_full_forward_at_every_step(llama_model, attention, monkeypatch):
    _, cfg, params = llama_model
    cfg = _attention_cfg(cfg, attention, monkeypatch)
    with_prefix = _with_prefix(cfg, params, seed=10)
    prompts = [random_ids(4, seed=11).tolist(), random_ids(7, seed=12).tolist()]    # left padded: padding rows
    continuation = random_ids((2, 3), seed=13)
    rows = [p + continuation[row].tolist() for row, p in enumerate(prompts)]
    width = max(map(len, rows))       # full rows right padded, which no real token sees
    full = np.asarray(forward_jit(cfg, with_prefix, np.array([r + [0] * (width - len(r)) for r in rows]),
                                  segment_ids=np.array([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
                                  hooks=PREFIX))
    ids, mask = left_pad(prompts, pad_id=0)
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    cache = init_cache(cfg, 2, ids.shape[1] + continuation.shape[1])
    logits, cache = forward_cached(cfg, with_prefix, jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(mask),
                                   cache, PREFIX)
    for row, prompt in enumerate(prompts):
        np.testing.assert_allclose(np.asarray(logits)[row, -1], full[row][len(prompt) - 1], atol=1e-4, rtol=0)
    step_fn = jax.jit(forward_cached, static_argnums=(0, 6))
    for step in range(continuation.shape[1]):
        pos = positions[:, -1:] + step + 1
        logits, cache = step_fn(cfg, with_prefix, jnp.asarray(continuation[:, step:step + 1]), jnp.asarray(pos),
                                jnp.ones((2, 1), jnp.int32), cache, PREFIX)
        for row, prompt in enumerate(prompts):
            np.testing.assert_allclose(np.asarray(logits)[row, 0], full[row][len(prompt) + step], atol=1e-4, rtol=0)


def test_greedy_generate_with_prefix_takes_the_argmax_of_the_full_forward_with_prefix(llama_model):
    _, cfg, params = llama_model
    with_prefix = _with_prefix(cfg, params, seed=14)
    prompts = [random_ids(3, seed=15).tolist(), random_ids(6, seed=16).tolist()]
    new = 4
    ours = jaxft.generate(cfg, with_prefix, prompts, max_new_tokens=new, stop_token_ids=[], hooks=PREFIX)
    for row, prompt in enumerate(prompts):      # teacher forcing the reply: each token is the argmax before it
        teacher_forced = np.asarray(forward_jit(cfg, with_prefix, np.array([prompt + ours[row]]), hooks=PREFIX))[0]
        assert ours[row] == np.argmax(teacher_forced[len(prompt) - 1:len(prompt) - 1 + new], axis=-1).tolist()


# ---- after_attention / after_mlp: bottleneck adapters against torch forward hooks ----

def _bottleneck(group):
    def adapter(lp, out):
        return out + jax.nn.relu(out @ lp[group]["w1"]) @ lp[group]["w2"]
    return adapter


ADAPTERS = Hooks(after_attention=_bottleneck("adapter_attn"), after_mlp=_bottleneck("adapter_mlp"))


def _with_adapters(cfg, params, rank=8):
    rng = np.random.default_rng(17)
    layers, d = cfg.num_hidden_layers, cfg.hidden_size
    groups = {group: {"w1": jnp.asarray(0.2 * rng.normal(size=(layers, d, rank)), jnp.float32),
                      "w2": jnp.asarray(0.2 * rng.normal(size=(layers, rank, d)), jnp.float32)}
              for group in ("adapter_attn", "adapter_mlp")}
    return {**params, "layers": {**params["layers"], **groups}}


def test_after_attention_and_after_mlp_match_torch_forward_hooks(llama_model):
    model, cfg, params = llama_model
    with_adapters = _with_adapters(cfg, params)
    ids = random_ids((2, 9), seed=18)

    def torch_adapter(group, layer):
        w1, w2 = (_torch(with_adapters["layers"][group][w][layer]) for w in ("w1", "w2"))
        return lambda h: h + torch.relu(h @ w1) @ w2

    handles = []
    for layer, block in enumerate(model.model.layers):
        attn, mlp = torch_adapter("adapter_attn", layer), torch_adapter("adapter_mlp", layer)
        # self_attn returns (attn_output, attn_weights); only the output is transformed
        handles.append(block.self_attn.register_forward_hook(lambda m, i, out, f=attn: (f(out[0]), *out[1:])))
        handles.append(block.mlp.register_forward_hook(lambda m, i, out, f=mlp: f(out)))
    try:
        with torch.no_grad():
            ref = model(torch.as_tensor(ids)).logits.numpy()
    finally:
        for handle in handles:
            handle.remove()
    ours = np.asarray(forward_jit(cfg, with_adapters, ids, hooks=ADAPTERS))
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    rematted = forward_jit(cfg.replace(remat="full"), with_adapters, ids, hooks=ADAPTERS)
    np.testing.assert_array_equal(np.asarray(rematted), ours)
    assert np.abs(ours - np.asarray(forward_jit(cfg, params, ids))).max() > 1e-2    # the adapters matter


# ---- taps ----

def test_taps_match_transformers_output_hidden_states(llama_model):
    model, cfg, params = llama_model
    ids = random_ids((2, 9), seed=19)
    out = hidden_jit(cfg, params, ids, hooks=Hooks(taps=True))
    with torch.no_grad():
        ref = model.model(torch.as_tensor(ids), output_hidden_states=True).hidden_states
    layers = cfg.num_hidden_layers
    assert out.taps.shape == (layers, 2, 9, cfg.hidden_size) and len(ref) == layers + 1
    for layer in range(layers - 1):         # HF: (embeddings, layer 1 .. L-1 outputs, last output after the norm)
        np.testing.assert_allclose(np.asarray(out.taps[layer]), ref[layer + 1].numpy(), atol=1e-4, rtol=0)
    last_normed = rms_norm(out.taps[-1], params["norm"]["scale"], cfg.rms_norm_eps)
    np.testing.assert_allclose(np.asarray(last_normed), ref[layers].numpy(), atol=1e-4, rtol=0)
    np.testing.assert_array_equal(np.asarray(out.hidden), np.asarray(hidden_jit(cfg, params, ids).hidden))
    remat = hidden_jit(cfg.replace(remat="full"), params, ids, hooks=Hooks(taps=True)).taps
    np.testing.assert_array_equal(np.asarray(remat), np.asarray(out.taps))
    assert hidden_jit(cfg, params, ids).taps is None


# ---- bad input ----

def test_bad_hook_inputs_name_what_was_expected(llama_model):
    _, cfg, params = llama_model
    ids = random_ids((2, 5), seed=20)
    embeds = np.zeros((2, 5, cfg.hidden_size), np.float32)
    with pytest.raises(jaxft.JaxftError, match="exactly one of input_ids .* and inputs_embeds .*; got both"):
        forward(cfg, params, ids, inputs_embeds=embeds)
    with pytest.raises(jaxft.JaxftError, match="got neither"):
        forward(cfg, params, None)
    with pytest.raises(jaxft.JaxftError, match=r"inputs_embeds must be floating-point embeddings of shape "
                                               r"\[B, T, 64\].*got shape \[2, 5, 32\]"):
        forward(cfg, params, None, inputs_embeds=embeds[..., :32])
    with pytest.raises(jaxft.JaxftError, match=r"inputs_embeds .*got shape \[5, 64\]"):
        forward(cfg, params, None, inputs_embeds=embeds[0])
    with pytest.raises(jaxft.JaxftError, match=r"inputs_embeds .*of int32"):
        forward(cfg, params, None, inputs_embeds=embeds.astype(np.int32))
    with pytest.raises(jaxft.JaxftError, match=r"positions must be integers of shape \[B, T\], the shape of "
                                               r"inputs_embeds' \[B, T\] \[2, 5\]; got shape \[5\]"):
        forward(cfg, params, None, np.arange(5), inputs_embeds=embeds)
    with pytest.raises(jaxft.JaxftError, match=r"hidden_states\(...\).taps"):
        forward(cfg, params, ids, hooks=Hooks(taps=True))
    wrong = _with_prefix(cfg, params)
    wrong["layers"]["prefix"]["v"] = wrong["layers"]["prefix"]["v"][..., :8]
    with pytest.raises(jaxft.JaxftError, match=r"hooks.prefix returned v of shape \[3, 2, 8\]; expected "
                                               r"\[P, 2, 16\] or \[2, P, 2, 16\]"):
        forward(cfg, wrong, ids, hooks=PREFIX)
    with pytest.raises(jaxft.JaxftError, match=r"hook 'halve' returned shape \[2, 5, 32\]; it must return the "
                                               r"shape of the output it was given, \[2, 5, 64\]"):
        def halve(lp, out):
            return out[..., :32]
        forward(cfg, params, ids, hooks=Hooks(after_mlp=halve))
