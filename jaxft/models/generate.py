"""Host-side generation: prompts as Python lists or arrays in, new tokens per prompt out, over the jitted
sampler :func:`jaxft.models.sample.sample` (its module describes the KV cache and the decoding loop).
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from jaxft.config import ModelConfig
from jaxft.models.hooks import Hooks
from jaxft.models.llama import InputError
from jaxft.models.sample import check_settings, sample


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, width: int | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """(ids [B, P], mask [B, P]) with each prompt right-aligned; P is ``width`` (a fixed shape, so a jitted sampler
    compiles once) or the longest prompt's length."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InputError("generate needs a non-empty list of non-empty prompts")
    longest = max(len(p) for p in prompts)
    if width is not None and longest > width:
        raise InputError(f"a prompt has {longest} tokens, more than the width {width} to pad to")
    width = longest if width is None else width
    ids = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = p
        mask[row, width - len(p):] = 1
    return ids, mask


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
    check_settings(num_generations=1, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                   top_p=top_p)
    if seed is not None and rng is not None:
        raise InputError("generate: give seed or rng, not both")
    check_vocab(cfg, rows)
    stops = tuple(cfg.eos_token_ids if stop_token_ids is None else stop_token_ids)
    pad = pad_token_id if pad_token_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None else 0)
    ids, mask = left_pad(rows, pad)
    rollout = sample(cfg, params, ids, mask, jax.random.PRNGKey(seed or 0) if rng is None else rng,
                     max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=int(top_k),
                     top_p=float(top_p), stop_ids=stops, pad_id=pad, hooks=hooks)
    lengths = np.asarray(rollout.mask).sum(axis=1)
    return [row[:n] for row, n in zip(np.asarray(rollout.tokens).tolist(), lengths.tolist())]
