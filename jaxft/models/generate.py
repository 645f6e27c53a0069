"""KV-cache decoding: batched prompts of different lengths (left padded), greedy or sampled, one jitted loop.

The cache is a dict ``{"k", "v": [L, B, S, KVH, hd], "segment_ids": [B, S], "index": slot of the next token}``.
Prompt padding gets segment id 0, so real tokens never attend to it (the mask rule of
:mod:`jaxft.ops.attention`), and positions count real tokens only, as HF derives them from the attention mask.
Hooks (:class:`jaxft.models.hooks.Hooks`) apply at every step; prefix keys/values are added to each step's keys
rather than stored in the cache.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.config import ModelConfig
from jaxft.models.hooks import Hooks
from jaxft.models.llama import InputError, hidden_states, logits_from_hidden


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


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids [B, P], mask [B, P]) with each prompt right-aligned."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InputError("generate needs a non-empty list of non-empty prompts")
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = p
        mask[row, width - len(p):] = 1
    return ids, mask


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


@partial(jax.jit, static_argnames=("cfg", "hooks", "max_new_tokens", "temperature", "top_k", "top_p"))
def _generate(cfg, params, ids, mask, stop_ids, pad_id, rng, *, hooks, max_new_tokens, temperature, top_k, top_p):
    batch, width = ids.shape
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    cache = init_cache(cfg, batch, width + max_new_tokens)
    logits, cache = forward_cached(cfg, params, ids, positions, mask, cache, hooks)
    out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
    state = (0, logits[:, -1], positions[:, -1], cache, out, jnp.zeros(batch, bool), rng)

    def cond(state):
        step, *_, done, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, logits, last_pos, cache, out, done, rng = state
        rng, key = jax.random.split(rng)
        if temperature == 0.0:
            token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        else:
            token = jax.random.categorical(key, process_logits(logits, temperature, top_k, top_p)).astype(jnp.int32)
        token = jnp.where(done, pad_id, token)
        out = out.at[:, step].set(token)
        done = done | jnp.isin(token, stop_ids)
        pos = last_pos + 1
        logits, cache = forward_cached(cfg, params, token[:, None], pos[:, None], jnp.ones((batch, 1), jnp.int32),
                                       cache, hooks)
        return step + 1, logits[:, -1], pos, cache, out, done, rng

    step, *_, out, done, _ = jax.lax.while_loop(cond, body, state)
    return out


PROMPT_FORMS = ("one prompt [T] or a batch [B, T] of token ids: a list of ints, a list of such lists (rows may differ "
                "in length), or a 1-D / 2-D integer numpy or jax array")


def prompt_rows(prompt_ids) -> list[list[int]]:
    """Prompts as lists of ints, from any of :data:`PROMPT_FORMS`; anything else is an error naming them."""
    if isinstance(prompt_ids, (np.ndarray, jax.Array)):
        rows = [prompt_ids]
        if prompt_ids.ndim == 2:
            rows = list(prompt_ids)
        elif prompt_ids.ndim != 1:
            raise InputError(f"generate: prompt_ids has shape {list(prompt_ids.shape)}; expected {PROMPT_FORMS}")
    elif isinstance(prompt_ids, (list, tuple)):
        one = bool(prompt_ids) and all(_is_id(t) for t in prompt_ids)
        rows = [prompt_ids] if one else list(prompt_ids)
    else:
        raise InputError(f"generate: prompt_ids is a {type(prompt_ids).__name__}; expected {PROMPT_FORMS}")
    out = []
    for i, row in enumerate(rows):
        array = np.asarray(row) if isinstance(row, (np.ndarray, jax.Array)) else None
        if array is not None and (array.ndim != 1 or not np.issubdtype(array.dtype, np.integer)):
            raise InputError(f"generate: prompt {i} is an array of shape {list(array.shape)} and dtype {array.dtype}; "
                             f"expected {PROMPT_FORMS}")
        if array is None and not (isinstance(row, (list, tuple)) and all(_is_id(t) for t in row)):
            raise InputError(f"generate: prompt {i} is {_describe(row)}, not a list of token ids; expected "
                             f"{PROMPT_FORMS}")
        out.append([int(t) for t in (array.tolist() if array is not None else row)])
    return out


def _is_id(token) -> bool:
    return isinstance(token, (int, np.integer)) and not isinstance(token, bool)


def _describe(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40] + '...' if len(text) > 40 else text}"


def check_vocab(cfg: ModelConfig, rows: list[list[int]]):
    """Every id must name an embedding row: an id beyond vocab_size would read a clamped, unrelated row."""
    for i, row in enumerate(rows):
        bad = [t for t in row if not 0 <= t < cfg.vocab_size]
        if bad:
            raise InputError(f"generate: prompt {i} holds token id {bad[0]} at position {row.index(bad[0])}, outside "
                             f"the model's vocabulary (vocab_size {cfg.vocab_size}: ids 0..{cfg.vocab_size - 1}); "
                             "was it encoded with another model's tokenizer?")


def stop_token_ids(cfg: ModelConfig, eos_token_id: int | None) -> list[int]:
    """The tokens that end a reply: the model's EOS ids (config.json / generation config) and the tokenizer's EOS
    token (a chat model's end-of-turn token is often only the latter)."""
    return sorted(set(cfg.eos_token_ids) | ({eos_token_id} - {None}))


def generate(cfg: ModelConfig, params: dict, prompt_ids, *, max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, stop_token_ids: Sequence[int] | None = None,
             pad_token_id: int | None = None, seed: int | None = None, rng: jax.Array | None = None,
             hooks: Hooks = Hooks()) -> list[list[int]]:
    """New tokens for each prompt, up to and including a stop token. ``prompt_ids`` is one prompt [T] or a batch
    [B, T]: a list of ints, a list of lists (of different lengths), or a 1-D / 2-D integer numpy / jax array.

    ``temperature=0`` is greedy; otherwise tokens are sampled after temperature / top-k / top-p filtering, from
    ``seed`` (default 0; the same seed gives the same sample) or an explicit ``rng`` key.
    Stop tokens default to the config's EOS ids. ``hooks`` apply at every step (a batch-shaped prefix is [B, ...]
    with B the number of prompts); their taps are not returned.
    """
    rows = prompt_rows(prompt_ids)
    if max_new_tokens <= 0:
        raise InputError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise InputError(f"bad sampling settings: temperature={temperature} (>= 0), top_k={top_k} (>= 0), "
                         f"top_p={top_p} (in (0, 1])")
    if seed is not None and rng is not None:
        raise InputError("generate: give seed or rng, not both")
    check_vocab(cfg, rows)
    stops = tuple(cfg.eos_token_ids if stop_token_ids is None else stop_token_ids)
    pad = pad_token_id if pad_token_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None else 0)
    ids, mask = left_pad(rows, pad)
    out = _generate(cfg, params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(stops or (-1,), jnp.int32),
                    jnp.int32(pad), jax.random.PRNGKey(seed or 0) if rng is None else rng, hooks=hooks,
                    max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=int(top_k),
                    top_p=float(top_p))
    result = []
    for row in np.asarray(out).tolist():
        hits = [i for i, t in enumerate(row) if t in stops]
        result.append(row[:hits[0] + 1] if hits else row)
    return result
