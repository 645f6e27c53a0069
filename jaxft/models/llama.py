"""A functional Llama-family decoder (Llama 2/3/3.x, Mistral, Qwen2) over a plain dict of arrays.

Param tree (kernels are [in, out]; everything under "layers" is stacked on a leading [L] axis and scanned):

    {"embed_tokens": {"embedding": [V, D]},
     "layers": {"input_layernorm": {"scale": [L, D]},
                "q_proj": {"kernel": [L, D, H*hd], "bias"?: [L, H*hd]}, "k_proj", "v_proj": [L, D, KVH*hd],
                "o_proj": {"kernel": [L, H*hd, D]},
                "post_attention_layernorm": {"scale": [L, D]},
                "gate_proj", "up_proj": {"kernel": [L, D, F]}, "down_proj": {"kernel": [L, F, D]}},
     "norm": {"scale": [D]},
     "lm_head": {"kernel": [D, V]}}            # absent when embeddings are tied, or with a task head:
     "score": {"kernel": [D, N], "bias"?: [N]} | "qa_outputs": {"kernel": [D, 2], "bias": [2]}  (models.heads)

Module names are Hugging Face's, so PEFT-style ``target_modules`` read naturally.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxft.config import ModelConfig
from jaxft.errors import JaxftError
from jaxft.models.hooks import Hooks, unhooked_prompt
from jaxft.ops.attention import NO_WINDOW, attention_mask, lse_attention, with_prefix_slots
from jaxft.ops.blockwise_attention import platform_attention
from jaxft.ops.linear import embed, embedding_table, linear
from jaxft.ops.mlp import swiglu
from jaxft.ops.registry import norm_scale
from jaxft.ops.rope import apply_rope, rope_tables

ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
LINEAR_MODULES = ATTN_PROJ + MLP_PROJ
LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")


class InputError(JaxftError, ValueError):
    """Arrays given to the model API (token ids, positions, prompts) of the wrong shape, type or values; the
    message names the argument, what it got and the shapes accepted."""


REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# The logical axes of every param's dims, declared once, by leaf group (its path in the tree) and leaf:
# init_params reads each leaf's shape off these names (axis_sizes), and jaxft.parallel shards each leaf by them
# (a method's leaves declare their own axes in terms of these). Stacked groups lead with "layer".
KERNEL_AXES = {  # (in, out) of each linear module's kernel
    "q_proj": ("embed", "heads"), "k_proj": ("embed", "kv_heads"), "v_proj": ("embed", "kv_heads"),
    "o_proj": ("heads", "embed"), "gate_proj": ("embed", "mlp"), "up_proj": ("embed", "mlp"),
    "down_proj": ("mlp", "embed"), "lm_head": ("embed", "vocab"),
}
PARAM_AXES: dict[tuple[str, ...], dict[str, tuple[str, ...]]] = {
    ("embed_tokens",): {"embedding": ("vocab", "embed")},
    **{("layers", norm): {"scale": ("layer", "norm")} for norm in LAYER_NORMS},
    **{("layers", m): {"kernel": ("layer", *KERNEL_AXES[m]), "bias": ("layer", KERNEL_AXES[m][1])}
       for m in LINEAR_MODULES},
    ("norm",): {"scale": ("norm",)},
    ("lm_head",): {"kernel": KERNEL_AXES["lm_head"]},
    # task heads (ModelConfig.head) in place of lm_head: "labels" is in no sharding rule, so it is replicated
    **{(group,): {"kernel": ("embed", "labels"), "bias": ("labels",)} for group in ("score", "qa_outputs")},
}


def axis_sizes(cfg: ModelConfig) -> dict[str, int]:
    """The size of each logical axis of the model's params."""
    hd = cfg.head_dim
    return {"layer": cfg.num_hidden_layers, "vocab": cfg.vocab_size, "embed": cfg.hidden_size,
            "norm": cfg.hidden_size, "heads": cfg.num_attention_heads * hd, "kv_heads": cfg.num_key_value_heads * hd,
            "mlp": cfg.intermediate_size, "labels": cfg.head.num_labels if cfg.head else 0}


def linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of every linear module of one layer."""
    sizes = axis_sizes(cfg)
    return {m: tuple(sizes[axis] for axis in KERNEL_AXES[m]) for m in LINEAR_MODULES}


def has_bias(cfg: ModelConfig, module: str) -> bool:
    if module in ("q_proj", "k_proj", "v_proj"):
        return cfg.qkv_bias
    if module == "o_proj":
        return cfg.o_bias
    return cfg.mlp_bias


def param_axes(cfg: ModelConfig) -> dict:
    """The logical axes of every leaf :func:`init_params` creates (and a HF checkpoint of ``cfg`` holds), as a tree
    of the params' structure with a tuple of axis names per leaf."""
    layers = {norm: dict(PARAM_AXES[("layers", norm)]) for norm in LAYER_NORMS}
    for name in LINEAR_MODULES:
        declared = PARAM_AXES[("layers", name)]
        layers[name] = {leaf: declared[leaf] for leaf in ("kernel", "bias") if leaf == "kernel" or has_bias(cfg, name)}
    tree = {"embed_tokens": dict(PARAM_AXES[("embed_tokens",)]), "layers": layers, "norm": dict(PARAM_AXES[("norm",)])}
    if cfg.head is not None:  # a task head replaces the LM head
        declared = PARAM_AXES[(cfg.head.group,)]
        tree[cfg.head.group] = {leaf: declared[leaf] for leaf in ("kernel", "bias") if
                                leaf == "kernel" or cfg.head.has_bias}
    elif not cfg.tie_word_embeddings:
        tree["lm_head"] = dict(PARAM_AXES[("lm_head",)])
    return tree


def init_params(cfg: ModelConfig, rng: jax.Array, dtype="float32", std: float = 0.02,
                groups: tuple[str, ...] | None = None) -> dict:
    """Random params like HF's ``_init_weights``: N(0, std) matrices, unit norms, zero biases; every leaf's shape
    is read off its declared axes (:func:`param_axes`). ``groups``: only these top-level groups (the same values
    the whole tree would hold), e.g. a new task head on loaded weights."""
    sizes = axis_sizes(cfg)
    keys = dict(zip(LINEAR_MODULES + ("embed_tokens", "lm_head"), jax.random.split(rng, len(LINEAR_MODULES) + 2)))
    keys["score"] = keys["qa_outputs"] = jax.random.fold_in(rng, 1)  # apart, so the decoder's draws stay as they were

    def create(group: str, leaf: str, axes: tuple[str, ...]):
        shape = tuple(sizes[axis] for axis in axes)
        if leaf == "scale":
            return jnp.ones(shape, dtype)
        if leaf == "bias":
            return jnp.zeros(shape, dtype)
        return (std * jax.random.normal(keys[group], shape, jnp.float32)).astype(dtype)

    def fill(tree: dict, group: str = "") -> dict:
        return {k: fill(v, k) if isinstance(v, dict) else create(group, k, v) for k, v in tree.items()}

    return fill({k: v for k, v in param_axes(cfg).items() if groups is None or k in groups})


def rms_norm(x: jnp.ndarray, scale: jnp.ndarray, eps: float) -> jnp.ndarray:
    """Normalize in float32, cast back, then scale (HF's order of operations)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * normed.astype(x.dtype)


def layer_windows(cfg: ModelConfig) -> jnp.ndarray:
    """[L] int32: each layer's attention window (NO_WINDOW for full attention), scanned with the params."""
    return jnp.asarray([cfg.sliding_window if s else NO_WINDOW for s in cfg.sliding_layers], jnp.int32)


def default_positions(segment_ids: jnp.ndarray) -> jnp.ndarray:
    """Positions that restart at 0 at every segment boundary (a packed row holds several documents)."""
    t = segment_ids.shape[1]
    index = jnp.broadcast_to(jnp.arange(t), segment_ids.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    segment_start = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    return index - segment_start


class DecoderOutput(NamedTuple):
    """What :func:`hidden_states` returns."""
    hidden: jax.Array            # [B, T, D] after the final norm, in the compute dtype
    cache: dict | None           # the updated KV cache, when one was given
    taps: jax.Array | None       # [L, B, T, D] every layer's output before the final norm, with Hooks(taps=True)


def _block(cfg: ModelConfig, lp: dict, x, cos, sin, attend, hooks: Hooks, rng=None, kv_cache=None, cache_start=None):
    """One decoder layer. x: [B, T, D]. With a KV cache ([B, S, KVH, hd] each) new K/V are written at cache_start.

    ``attend(q, k, v)`` is the attention implementation with this layer's mask (and prefix) already bound;
    ``hooks.after_attention`` / ``hooks.after_mlp`` transform the two outputs before their residual adds.

    ``rng`` (training only) gives each linear module its own dropout key.
    """
    b, t, _ = x.shape
    hd = cfg.head_dim
    keys = dict(zip(LINEAR_MODULES, jax.random.split(rng, len(LINEAR_MODULES)))) if rng is not None else {}

    def proj(name, inputs):
        return linear(lp[name], inputs, keys.get(name))

    h = rms_norm(x, norm_scale(lp["input_layernorm"]), cfg.rms_norm_eps)
    q_heads = apply_rope(proj("q_proj", h).reshape(b, t, -1, hd), cos, sin)
    k_heads = apply_rope(proj("k_proj", h).reshape(b, t, -1, hd), cos, sin)
    v_heads = proj("v_proj", h).reshape(b, t, -1, hd)
    if kv_cache is not None:
        k_cache, v_cache = kv_cache
        k_heads = jax.lax.dynamic_update_slice_in_dim(k_cache, k_heads.astype(k_cache.dtype), cache_start, axis=1)
        v_heads = jax.lax.dynamic_update_slice_in_dim(v_cache, v_heads.astype(v_cache.dtype), cache_start, axis=1)
        kv_cache = (k_heads, v_heads)
    attn = attend(q_heads, k_heads.astype(x.dtype), v_heads.astype(x.dtype))
    x = x + _after(hooks.after_attention, lp, proj("o_proj", attn.reshape(b, t, -1)))
    h = rms_norm(x, norm_scale(lp["post_attention_layernorm"]), cfg.rms_norm_eps)
    x = x + _after(hooks.after_mlp, lp, proj("down_proj", swiglu(proj("gate_proj", h), proj("up_proj", h))))
    return x, kv_cache


def _after(hook, lp: dict, out):
    """``hook(lp, out)`` in ``out``'s shape and dtype (the residual stream's); ``out`` itself without a hook."""
    if hook is None:
        return out
    changed = hook(lp, out)
    if changed.shape != out.shape:
        raise InputError(f"hook {getattr(hook, '__name__', hook)!r} returned shape {list(changed.shape)}; it must "
                         f"return the shape of the output it was given, {list(out.shape)}")
    return changed.astype(out.dtype)


def _prefix_keys_values(cfg: ModelConfig, hooks: Hooks, lp: dict, batch: int, dtype):
    """The prefix hook's (k, v) for one layer as [B, P, KVH, hd] each, or None without the hook."""
    if hooks.prefix is None:
        return None
    k, v = hooks.prefix(lp)
    kv_shape = (cfg.num_key_value_heads, cfg.head_dim)
    for name, a in (("k", k), ("v", v)):
        if a.ndim not in (3, 4) or a.shape[-2:] != kv_shape or a.shape[-3] != k.shape[-3] or (
                a.ndim == 4 and a.shape[0] != batch):
            raise InputError(f"hooks.prefix returned {name} of shape {list(a.shape)}; expected [P, {kv_shape[0]}, "
                             f"{kv_shape[1]}] or [{batch}, P, {kv_shape[0]}, {kv_shape[1]}] ([B, P, KVH, hd]), "
                             "the same P for k and v")
    return tuple(jnp.broadcast_to(a, (batch, *a.shape[-3:])).astype(dtype) for a in (k, v))


def _slots(segment_ids, cache, with_prefix: bool) -> tuple:
    """(q_index, k_index, k_segment, q_position) for the mask rule of :mod:`jaxft.ops.attention`: the slots of the
    queries and keys, the keys' segment ids (with a cache: its own, this call's written in at ``cache["index"]``)
    and, ``with_prefix``, each query's position in its own sequence, counted over the slots of its segment (a
    packed document's or a left-padded prompt's tokens count from 0) rather than read off the RoPE positions, as
    transformers counts a past cache's slots in its sliding window whatever the position ids."""
    b, t = segment_ids.shape
    start = 0 if cache is None else cache["index"]
    q_index = jnp.broadcast_to(start + jnp.arange(t), (b, t))
    if cache is None:
        k_index, k_segment = q_index, segment_ids
    else:
        k_segment = jax.lax.dynamic_update_slice_in_dim(cache["segment_ids"], segment_ids, start, axis=1)
        k_index = jnp.broadcast_to(jnp.arange(k_segment.shape[1]), k_segment.shape)
    q_position = None
    if with_prefix:
        q_position = jax.lax.dynamic_slice_in_dim(default_positions(k_segment), start, t, axis=1)
    return q_index, k_index, k_segment, q_position


def _attention(cfg: ModelConfig, mask_inputs: tuple, prefix=None, q_position=None):
    """``attend(q, k, v)``: this layer's attention with its mask bound. ``prefix`` (k, v), each [B, P, KVH, hd],
    go in front of the keys and values, in slots the mask rule shows to every non-padding query within the window
    of them from its position ``q_position`` [B, Tq] (:func:`_slots`); without a prefix ``q_position`` is None."""
    if prefix is not None:
        q_index, k_index, q_segment, k_segment, window = mask_inputs
        k_index, k_segment = with_prefix_slots(k_index, k_segment, prefix[0].shape[1])
        mask_inputs = (q_index, k_index, q_segment, k_segment, window)

    def keys_values(k, v):
        if prefix is None:
            return k, v
        return jnp.concatenate([prefix[0], k], axis=1), jnp.concatenate([prefix[1], v], axis=1)

    if cfg.attention == "blockwise":
        return lambda q, k, v: platform_attention(q, *keys_values(k, v), *mask_inputs, q_position=q_position)
    mask = attention_mask(*mask_inputs, q_position)
    return lambda q, k, v: lse_attention(q, *keys_values(k, v), mask)


def hidden_states(cfg: ModelConfig, params: dict, input_ids, positions=None, segment_ids=None, *, inputs_embeds=None,
                  hooks: Hooks = Hooks(), cache=None, rng=None, activation_sharding=None) -> DecoderOutput:
    """Final-norm hidden states [B, T, D] (compute dtype), the updated cache when one is given, and the taps.

    ``inputs_embeds`` [B, T, D] (float) replace the embedding lookup of ``input_ids`` (then None): prompt tuning.
    ``segment_ids`` [B, T] (default: one segment) keep packed documents apart; 0 marks padding.
    ``positions`` [B, T] (default: restart at each segment) drive RoPE.
    ``hooks`` (:class:`jaxft.models.hooks.Hooks`): prefix keys/values, transforms after attention / the MLP, taps.
    ``cache`` (see :mod:`jaxft.models.sample`) holds K/V [L, B, S, KVH, hd], the key slots' segment ids and
    ``index``, the slot where ``input_ids`` start. ``rng`` turns on adapter dropout (training).
    ``activation_sharding`` (a sharding of [B, T, D]) constrains the residual stream at every layer boundary.
    """
    unfed = unhooked_prompt(params, hooks)
    if unfed:
        raise InputError(f"params hold a prompt-style method ({', '.join(unfed)}) but no prefix hook feeds it: the "
                         "model would run as the bare base; take (params, hooks) from "
                         "jaxft.peft.prefix.prompt_inputs(cfg, params) and pass hooks=")
    dtype = jnp.dtype(cfg.dtype)
    b, t = input_ids.shape if inputs_embeds is None else inputs_embeds.shape[:2]
    if segment_ids is None:
        segment_ids = jnp.ones((b, t), jnp.int32)
    if positions is None:
        positions = default_positions(segment_ids)
    if hooks.position_offset:
        positions = positions + hooks.position_offset
    if inputs_embeds is None:
        x = embed(params["embed_tokens"], input_ids, dtype)
    else:
        x = jnp.asarray(inputs_embeds, dtype)
    cos, sin = rope_tables(cfg, positions, dtype)
    q_index, k_index, k_segment, q_position = _slots(segment_ids, cache, hooks.prefix is not None)

    def body(x, layer):
        if activation_sharding is not None:
            x = jax.lax.with_sharding_constraint(x, activation_sharding)
        lp, window, layer_rng, kv = layer
        attend = _attention(cfg, (q_index, k_index, segment_ids, k_segment, window),
                            _prefix_keys_values(cfg, hooks, lp, b, dtype), q_position)
        x, kv = _block(cfg, lp, x, cos, sin, attend, hooks, layer_rng, kv, None if cache is None else cache["index"])
        return x, (kv, x if hooks.taps else None)

    if cfg.remat != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[cfg.remat])
    kv_in = None if cache is None else (cache["k"], cache["v"])
    layer_rngs = None if rng is None else jax.random.split(rng, cfg.num_hidden_layers)
    x, (kv_out, taps) = jax.lax.scan(body, x, (params["layers"], layer_windows(cfg), layer_rngs, kv_in))
    x = rms_norm(x, norm_scale(params["norm"]), cfg.rms_norm_eps)
    if cache is not None:
        cache = {"k": kv_out[0], "v": kv_out[1], "segment_ids": k_segment, "index": cache["index"] + t}
    return DecoderOutput(x, cache, taps)


def tied_head(cfg: ModelConfig, params: dict) -> bool:
    """The head is the embedding table, unless ``modules_to_save`` gave a tied model its own ``lm_head`` copy. A
    model with a task head has no LM head at all: asking for next-token logits is an error (every LM-head path
    starts here)."""
    if cfg.head is not None:
        raise InputError(f"this model has a {cfg.head.kind} head in place of the LM head, so it gives no next-token "
                         "logits; its outputs come from jaxft.models.heads (sequence_logits, token_logits)")
    return cfg.tie_word_embeddings and "lm_head" not in params


def plain_head(cfg: ModelConfig, params: dict) -> bool:
    """The logits are exactly ``h @ lm_head_kernel(cfg, params)``: the head carries no adapter or other leaf that
    :func:`logits_from_hidden` would apply, so a loss may contract the kernel block by block itself."""
    return tied_head(cfg, params) or params["lm_head"].keys() <= {"kernel"}


def lm_head_kernel(cfg: ModelConfig, params: dict) -> jnp.ndarray:
    """[D, V] base output projection (the transposed embedding when tied); an lm_head adapter is not included."""
    if tied_head(cfg, params):
        return embedding_table(params["embed_tokens"]).T
    return params["lm_head"]["kernel"]


def logits_from_hidden(cfg: ModelConfig, params: dict, h: jnp.ndarray, rng=None) -> jnp.ndarray:
    """float32 logits [..., V] from hidden states in the compute dtype."""
    if tied_head(cfg, params):
        w = embedding_table(params["embed_tokens"]).astype(h.dtype)
        return jnp.einsum("...d,vd->...v", h, w, preferred_element_type=jnp.float32)
    return linear(params["lm_head"], h, rng).astype(jnp.float32)


def check_inputs(input_ids, positions=None, segment_ids=None, where: str = "forward", inputs_embeds=None,
                 hidden_size: int | None = None) -> tuple:
    """(input_ids, positions, segment_ids, inputs_embeds) as arrays (None where not given), after checking that
    exactly one of ``input_ids`` ([B, T] integers) and ``inputs_embeds`` ([B, T, hidden_size] floats) is given and
    ``positions`` / ``segment_ids`` (when given) are integers of that [B, T]. Works on tracers (only shapes and
    dtypes are read)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise InputError(f"{where}: give exactly one of input_ids (token ids [B, T]) and inputs_embeds (embeddings "
                         f"[B, T, D]); got {'both' if input_ids is not None else 'neither'}")
    ids = embeds = None
    if inputs_embeds is None:
        ids = jnp.asarray(input_ids)
        if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise InputError(f"{where}: input_ids must be integer token ids of shape [B, T] (one sequence: ids[None] "
                             f"or [ids]); got shape {list(ids.shape)} of {ids.dtype}")
        shape, source = ids.shape, "input_ids"
    else:
        embeds = jnp.asarray(inputs_embeds)
        width = embeds.shape[-1] if hidden_size is None else hidden_size
        if embeds.ndim != 3 or embeds.shape[-1] != width or not jnp.issubdtype(embeds.dtype, jnp.floating):
            raise InputError(f"{where}: inputs_embeds must be floating-point embeddings of shape [B, T, {width}] "
                             f"(the model's hidden_size); got shape {list(embeds.shape)} of {embeds.dtype}")
        shape, source = embeds.shape[:2], "inputs_embeds' [B, T]"
    given = [None if x is None else jnp.asarray(x) for x in (positions, segment_ids)]
    for name, x in zip(("positions", "segment_ids"), given):
        if x is not None and (x.shape != shape or not jnp.issubdtype(x.dtype, jnp.integer)):
            raise InputError(f"{where}: {name} must be integers of shape [B, T], the shape of {source} "
                             f"{list(shape)}; got shape {list(x.shape)} of {x.dtype}")
    return ids, *given, embeds


def forward(cfg: ModelConfig, params: dict, input_ids, positions=None, segment_ids=None, *, inputs_embeds=None,
            hooks: Hooks = Hooks(), rng=None) -> jnp.ndarray:
    """Logits [B, T, V] in float32 for ``input_ids`` [B, T] (integers) or ``inputs_embeds`` [B, T, D] (floats, then
    ``input_ids`` is None); ``positions`` and ``segment_ids``, when given, are [B, T] integers too. ``hooks`` as in
    :func:`hidden_states`, but taps come only from there. Pass ``rng`` only in training (adapter dropout)."""
    if hooks.taps:
        raise InputError("forward returns logits only; read the taps of Hooks(taps=True) from "
                         "hidden_states(...).taps")
    input_ids, positions, segment_ids, inputs_embeds = check_inputs(input_ids, positions, segment_ids,
                                                                    inputs_embeds=inputs_embeds,
                                                                    hidden_size=cfg.hidden_size)
    body_rng, head_rng = (None, None) if rng is None else jax.random.split(rng)
    h = hidden_states(cfg, params, input_ids, positions, segment_ids, inputs_embeds=inputs_embeds, hooks=hooks,
                      rng=body_rng).hidden
    return logits_from_hidden(cfg, params, h, head_rng)
