"""KV-cache sampling in one jitted loop: G completions per prompt with their log-probs (online RL's rollouts), and
the body of :func:`jaxft.models.generate.generate`.

The cache is a dict ``{"k", "v": [L, B, S, KVH, hd], "segment_ids": [B, S], "index": slot of the next token}``.
Prompt padding gets segment id 0, so real tokens never attend to it (the mask rule of
:mod:`jaxft.ops.attention`), and positions count real tokens only, as HF derives them from the attention mask.
Hooks (:class:`jaxft.models.hooks.Hooks`) apply at every step; prefix keys/values are added to each step's keys
rather than stored in the cache.

Each prompt is prefilled once and its cache repeated for its G completions (the rows b * G .. b * G + G - 1). Every
row draws from its own key (``rng`` split per row, folded with the step), so a row's tokens depend neither on the
other rows, nor on how the rows are sharded, nor on the stop tokens (up to its own stop). Under ``jit`` XLA
propagates the prompts' sharding to the rows; a caller that needs them on given devices says so with the jit's
``out_shardings`` (:class:`jaxft.recipes.rl.Rollouts` puts them over the batch axes, as its prompts).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxft.config import ModelConfig
from jaxft.models.hooks import Hooks
from jaxft.models.llama import InputError, hidden_states, logits_from_hidden


class Rollout(NamedTuple):
    """Completions of B prompts, G each: R = B * G rows, prompt-major (row b * G + g is prompt b's g-th)."""
    tokens: jax.Array     # [R, N] int32, pad_id after the stop token
    logprobs: jax.Array   # [R, N] float32: log p(token) under log_softmax(logits / temperature) (temperature 0:
    #                       log_softmax(logits)), before top-k / top-p (TRL's old_per_token_logps); 0 where mask is 0
    mask: jax.Array       # [R, N] int32: 1 on completion tokens up to and including the stop token
    stopped: jax.Array    # [R] bool: a stop token ended the row (False: cut at max_new_tokens, "truncated")


def init_cache(cfg: ModelConfig, batch: int, length: int) -> dict:
    shape = (cfg.num_hidden_layers, batch, length, cfg.num_key_value_heads, cfg.head_dim)
    dtype = jnp.dtype(cfg.dtype)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "segment_ids": jnp.zeros((batch, length), jnp.int32), "index": jnp.array(0, jnp.int32)}


def forward_cached(cfg: ModelConfig, params: dict, input_ids, positions, segment_ids, cache: dict,
                   hooks: Hooks = Hooks()):
    """Logits [B, T, V] of ``input_ids`` written at ``cache["index"]``, and the updated cache."""
    out = hidden_states(cfg, params, input_ids, positions, segment_ids, hooks=hooks, cache=cache)
    return logits_from_hidden(cfg, params, out.hidden), out.cache


def process_logits(logits, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> jnp.ndarray:
    """Temperature, then top-k, then top-p (nucleus), like HF's logits warpers; removed entries are -inf."""
    logits = logits.astype(jnp.float32)
    if temperature != 1.0:
        logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        order = jnp.argsort(logits, axis=-1)  # ascending, as HF sorts
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        remove_sorted = (cumulative <= 1 - top_p).at[..., -1].set(False)  # always keep the most likely token
        remove = jnp.zeros_like(remove_sorted).at[
            jnp.arange(logits.shape[0])[:, None], order].set(remove_sorted)
        logits = jnp.where(remove, -jnp.inf, logits)
    return logits


def check_settings(num_generations: int, max_new_tokens: int, temperature: float, top_k: int, top_p: float):
    """Sampling settings a run could otherwise take silently (a negative temperature flips the distribution)."""
    if max_new_tokens <= 0:
        raise InputError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if num_generations < 1:
        raise InputError(f"num_generations must be positive, got {num_generations}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise InputError(f"bad sampling settings: temperature={temperature} (>= 0), top_k={top_k} (>= 0), "
                         f"top_p={top_p} (in (0, 1])")


def _check_prompts(prompt_ids, prompt_mask):
    for name, x in (("prompt_ids", prompt_ids), ("prompt_mask", prompt_mask)):
        if x.ndim != 2 or x.shape != prompt_ids.shape or not jnp.issubdtype(x.dtype, jnp.integer):
            raise InputError(f"sample: {name} must be integers of shape [B, P] (prompts left padded, mask 1 on "
                             f"their tokens), the shape of prompt_ids {list(prompt_ids.shape)}; got shape "
                             f"{list(x.shape)} of {x.dtype}")


def _choose(logits, step, keys, temperature: float, top_k: int, top_p: float):
    """Each row's next token (argmax at temperature 0, else drawn after top-k / top-p with the row's key) and its
    float32 log-prob under log_softmax(logits / temperature), taken before the truncation."""
    logits = logits.astype(jnp.float32)
    if temperature == 0.0:
        token = jnp.argmax(logits, axis=-1)
        logps = jax.nn.log_softmax(logits, axis=-1)
    else:
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
        token = jax.vmap(jax.random.categorical)(step_keys, process_logits(logits, temperature, top_k, top_p))
        logps = jax.nn.log_softmax(logits / temperature, axis=-1)
    token = token.astype(jnp.int32)
    return token, jnp.take_along_axis(logps, token[:, None], axis=-1)[:, 0]


def _write(rollout: Rollout, step, token, logp, stops, pad_id) -> Rollout:
    """``rollout`` with column ``step`` filled: the token where the row has not stopped yet, else padding."""
    live = ~rollout.stopped
    return Rollout(rollout.tokens.at[:, step].set(jnp.where(live, token, pad_id)),
                   rollout.logprobs.at[:, step].set(jnp.where(live, logp, 0.0)),
                   rollout.mask.at[:, step].set(live.astype(jnp.int32)),
                   rollout.stopped | (live & jnp.isin(token, stops)))


def _repeated_rows(tree, groups: int):
    """Every array of ``tree`` (last logits [B, V], positions [B], a cache) with each prompt's row repeated
    ``groups`` times in place; a cache's k / v carry the rows on axis 1, behind the layers."""
    def repeat(path, x):
        axis = 1 if getattr(path[-1], "key", None) in ("k", "v") else 0
        return x if x.ndim == 0 else jnp.repeat(x, groups, axis=axis)
    return jax.tree_util.tree_map_with_path(repeat, tree)


def _grouped_hooks(hooks: Hooks, groups: int) -> Hooks:
    """``hooks`` for the B * G completion rows: a batch-shaped prefix [B, P, KVH, hd] repeated as the rows are."""
    if hooks.prefix is None or groups == 1:
        return hooks

    def prefix(lp):
        return tuple(x if x.ndim == 3 else jnp.repeat(x, groups, axis=0) for x in hooks.prefix(lp))
    return dataclasses.replace(hooks, prefix=prefix)


@partial(jax.jit, static_argnames=("cfg", "num_generations", "max_new_tokens", "temperature", "top_k", "top_p",
                                   "hooks"))
def sample(cfg: ModelConfig, params: dict, prompt_ids, prompt_mask, rng, *, num_generations: int = 1,
           max_new_tokens: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           stop_ids: Sequence[int] | jax.Array | None = None, pad_id: int = 0, hooks: Hooks = Hooks()) -> Rollout:
    """``num_generations`` completions of each prompt of ``prompt_ids`` [B, P] (left padded; ``prompt_mask`` 1 on
    prompt tokens), at most ``max_new_tokens`` each, as a :class:`Rollout` of B * G prompt-major rows.

    ``temperature=0`` is greedy; otherwise tokens are drawn after temperature / top-k / top-p filtering. A row ends
    with the first of ``stop_ids`` (default: the config's EOS ids) it draws; the loop ends when every row has.
    ``hooks`` apply at every step (a batch-shaped prefix is [B, ...], one per prompt). Jitted; the settings are
    static, ``stop_ids`` and ``pad_id`` are traced (other stop tokens of the same count do not retrace).
    """
    check_settings(num_generations, max_new_tokens, temperature, top_k, top_p)
    _check_prompts(prompt_ids, prompt_mask)
    stops = jnp.asarray(cfg.eos_token_ids if stop_ids is None else stop_ids, jnp.int32).reshape(-1)
    batch, width = prompt_ids.shape
    rows = batch * num_generations
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0)
    cache = init_cache(cfg, batch, width + max_new_tokens - 1)  # the last token is drawn, never fed back
    logits, cache = forward_cached(cfg, params, prompt_ids, positions, prompt_mask, cache, hooks)
    logits, last_pos, cache = _repeated_rows((logits[:, -1], positions[:, -1], cache), num_generations)
    hooks = _grouped_hooks(hooks, num_generations)
    choose = partial(_choose, keys=jax.random.split(rng, rows), temperature=temperature, top_k=top_k, top_p=top_p)
    write = partial(_write, stops=stops, pad_id=jnp.asarray(pad_id, jnp.int32))
    shape = (rows, max_new_tokens)
    empty = Rollout(jnp.full(shape, pad_id, jnp.int32), jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.int32),
                    jnp.zeros(rows, bool))
    start = jnp.int32(0)
    rollout = write(empty, start, *choose(logits, start))

    def unfinished(state):
        step, _, _, rollout = state
        return (step < max_new_tokens) & ~jnp.all(rollout.stopped)

    def decode(state):
        step, pos, cache, rollout = state
        previous = jax.lax.dynamic_index_in_dim(rollout.tokens, step - 1, axis=1)
        logits, cache = forward_cached(cfg, params, previous, pos[:, None] + 1, jnp.ones((rows, 1), jnp.int32),
                                       cache, hooks)
        return step + 1, pos + 1, cache, write(rollout, step, *choose(logits[:, -1], step))

    return jax.lax.while_loop(unfinished, decode, (start + 1, last_pos, cache, rollout))[-1]
