"""Extension points of the decoder's forward pass, behind one static structure.

A :class:`Hooks` is hashable and holds functions, never arrays, so it is a static argument under ``jit`` (a new
``Hooks`` retraces, as a new config does). What a hook trains lives in the params: a group under
``params["layers"]`` is stacked on [L] and scanned with the layer, so each hook receives its layer's slice ``lp``
(for example ``lp["prefix"]["k"]``). ``Hooks()`` (every field off) traces exactly the plain model.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax


# Top-level param groups of a prompt-style method, each with the function (cfg, params, rng) -> {"key", "value"}
# that computes the stacked prefix a forward pass reads through ``Hooks.prefix`` (prefix tuning's MLP, prompt and
# P-tuning's virtual tokens; ``rng`` in training only, for an encoder's dropout): filled by the method modules
# (jaxft.peft.prefix, jaxft.peft.prompt). With ``layers/prefix`` they make a tree the plain model must not run
# silently without its prefix (unhooked_prompt).
PREFIX_SOURCES: dict[str, Callable] = {}


def unhooked_prompt(params: dict, hooks) -> list[str]:
    """The prompt-style groups ``params`` hold that ``hooks`` do not feed (none when a prefix hook is set)."""
    if hooks.prefix is not None:
        return []
    stacked = ["layers/prefix"] if "prefix" in params.get("layers", {}) else []
    return stacked + sorted(PREFIX_SOURCES.keys() & params.keys())


@dataclass(frozen=True)
class Hooks:
    """Hooks into :func:`jaxft.models.llama.hidden_states` (input embeddings are its ``inputs_embeds`` argument).

    ``prefix(lp) -> (k, v)``, each [P, KVH, hd] or [B, P, KVH, hd]: keys and values put in front of the layer's
    own in its attention (prefix tuning), used as given (no RoPE, as PEFT's prefix ``past_key_values``). They sit
    right before each sequence's first token: every non-padding query sees them, whatever its segment, except where
    a sliding window has moved past them (as transformers' mask hides a past cache's first slots); padding does not
    (the mask rule of :mod:`jaxft.ops.attention`). With a KV cache they are not stored in it: each step adds them
    again.
    ``position_offset`` is added to every token position (given or default, with or without a KV cache): PEFT's
    prefix tuning numbers the tokens after its P virtual ones, which ``position_offset=P`` reproduces in training,
    forward passes and generation alike.

    ``after_attention(lp, out) -> out``: the attention output after ``o_proj`` [B, T, D], before the residual add.

    ``after_mlp(lp, out) -> out``: the MLP output after ``down_proj`` [B, T, D], before the residual add
    (bottleneck adapters: ``out + relu(out @ W1) @ W2``).

    ``taps``: also return every layer's output hidden state [L, B, T, D], before the final norm (the last one is
    not HF's last ``hidden_states`` entry, which is after the norm). Off by default: it keeps L activations alive.
    """
    prefix: Callable[[dict], tuple[jax.Array, jax.Array]] | None = None
    after_attention: Callable[[dict, jax.Array], jax.Array] | None = None
    after_mlp: Callable[[dict, jax.Array], jax.Array] | None = None
    taps: bool = False
    position_offset: int = 0
