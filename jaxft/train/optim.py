"""The optimizer: one optax chain built from an :class:`OptimConfig`.

The chain is ``clip_by_global_norm -> the optimizer's scaling -> decoupled weight decay -> learning-rate schedule``.
It is applied to the *trainable* tree, which holds ``None`` where a leaf is frozen: optax treats ``None`` as an
empty subtree, so frozen weights get neither updates nor optimizer state, and the global norm is the norm of the
trainable gradients only.

Weight decay reaches matrices only. Norm scales, biases and any 1-D leaf are excluded, by name as well as by rank,
because scanned layers stack a per-layer norm scale or bias into a 2-D ``[L, D]`` array.

Two memory savers stand in for bitsandbytes' 8-bit and paged optimizers:

- ``adam8bit`` stores both Adam moments as 8-bit codes with a float32 scale per block of 256 values
  (:func:`scale_by_adam_8bit`), about a quarter of the bytes of float32 AdamW state.
- ``offload_state`` keeps the optimizer state in host memory between steps and brings it to the accelerator only
  inside the update (:func:`offloaded`, :func:`place_state`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxft.config import ConfigError
from jaxft.ops.dynamic_map import SIGNED_MAP, UNSIGNED_MAP
from jaxft.peft.tree import path_names

OPTIMIZERS = ("adamw", "adam8bit", "sgd", "adafactor", "lion")
SCHEDULES = ("constant", "linear", "cosine")
HOST_MEMORY_KIND = "pinned_host"


@dataclass(frozen=True)
class OptimConfig:
    """What to optimize with. ``b1``/``b2``/``eps`` are Adam's (Lion reads ``b1``/``b2``; the Lion paper uses
    ``b2=0.99`` and a 3-10x smaller ``lr`` than AdamW). ``momentum`` is SGD's heavy-ball coefficient (0 = none).
    Adafactor keeps no first moment, its memory-saving default.

    The schedule warms up linearly from 0 to ``lr`` over ``warmup_steps``, then stays (``constant``) or decays
    (``linear``, ``cosine``) to ``lr * min_lr_ratio`` at ``total_steps`` (``None``: a run config sets it to
    ``train.steps``). ``max_grad_norm`` of ``None`` or 0 turns
    global-norm clipping off.
    """

    name: str = "adamw"
    lr: float = 2e-4
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    momentum: float = 0.0
    schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int | None = None
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    offload_state: bool = False

    def __post_init__(self):
        def bad(field: str, expected: str):
            raise ConfigError(f"optim.{field} = {getattr(self, field)!r}: expected {expected}")

        if self.name not in OPTIMIZERS:
            bad("name", f"one of {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            bad("schedule", f"one of {SCHEDULES}")
        if not self.lr > 0:
            bad("lr", "a learning rate > 0")
        if not self.weight_decay >= 0:
            bad("weight_decay", "a value >= 0")
        for field in ("b1", "b2", "momentum"):
            if not 0 <= getattr(self, field) < 1:
                bad(field, "a value in [0, 1)")
        if not self.eps >= 0:
            bad("eps", "a value >= 0")
        for field in ("warmup_steps", "total_steps"):
            value = getattr(self, field)
            if (value is not None or field == "warmup_steps") and (
                    isinstance(value, bool) or not isinstance(value, int) or value < 0):
                bad(field, "an integer >= 0")
        if self.schedule != "constant" and self.total_steps is not None and self.total_steps <= self.warmup_steps:
            bad("total_steps", f"more than warmup_steps ({self.warmup_steps}) for the {self.schedule!r} schedule")
        if not 0 <= self.min_lr_ratio <= 1:
            bad("min_lr_ratio", "a value in [0, 1]")
        if self.max_grad_norm is not None and not self.max_grad_norm >= 0:
            bad("max_grad_norm", "None or a value >= 0 (None and 0 turn clipping off)")


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Step -> learning rate: linear warmup from 0, then constant or a linear / cosine decay to ``min_lr_ratio``."""
    if cfg.schedule != "constant" and cfg.total_steps is None:
        raise ConfigError(f"optim.total_steps is not set: the {cfg.schedule!r} schedule decays until it (a run config "
                          "sets it to train.steps)")
    end = cfg.lr * cfg.min_lr_ratio
    decay_steps = (cfg.total_steps or 0) - cfg.warmup_steps  # unused by the constant schedule
    if cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(cfg.lr, end, decay_steps)
    else:
        after = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
    if cfg.warmup_steps == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps), after], [cfg.warmup_steps])


def decay_mask(params):
    """True where weight decay applies: leaves of rank >= 2 that are not a norm scale or a bias.

    A callable of the tree rather than a fixed tree, so the same optimizer serves any trainable tree; ``None``
    (frozen) leaves stay ``None``.
    """
    def decays(path, leaf) -> bool:
        keys = path_names(path)
        return leaf.ndim >= 2 and keys[-1] not in ("scale", "bias") and not any("norm" in k for k in keys)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """The whole chain for ``cfg``. ``update`` needs ``params`` (the trainable tree) for weight decay and
    Adafactor; with ``cfg.offload_state`` the state lives in host memory between steps (see :func:`offloaded`)."""
    decay = [optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask)] if cfg.weight_decay else []
    if cfg.name == "adamw":
        core = [optax.scale_by_adam(cfg.b1, cfg.b2, cfg.eps), *decay]
    elif cfg.name == "adam8bit":
        core = [scale_by_adam_8bit(cfg.b1, cfg.b2, cfg.eps), *decay]
    elif cfg.name == "lion":
        core = [optax.scale_by_lion(cfg.b1, cfg.b2), *decay]
    elif cfg.name == "adafactor":
        # Shazeer & Stern's defaults: eps1 = 1e-30 on squared grads, update clipping at RMS 1; explicit lr, no
        # relative step or parameter scaling (the usual fine-tuning setting, as in HF's relative_step=False).
        core = [optax.scale_by_factored_rms(), optax.clip_by_block_rms(1.0), *decay]
    else:
        # torch.optim.SGD's coupled L2: the decay joins the gradient before the momentum buffer.
        core = [*decay] + ([optax.trace(cfg.momentum)] if cfg.momentum else [])
    clip = [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm else []
    tx = optax.chain(*clip, *core, optax.scale_by_learning_rate(make_schedule(cfg)))
    return offloaded(tx) if cfg.offload_state else tx


# ---------------------------------------------------------------------------------------------------------------
# 8-bit Adam
#
# Each moment leaf is flattened, padded to a multiple of BLOCK_SIZE and cut into blocks; a block keeps its absmax
# in float32 and every value as the uint8 index of the nearest entry of a 256-entry code table, applied to
# value / absmax. The tables are bitsandbytes' dynamic maps (:mod:`jaxft.ops.dynamic_map`), precise across six
# decades below the block's absmax.
#
# m is signed and uses the signed map. For v we store sqrt(v) with the unsigned map: the update divides by
# sqrt(v), so this quantizes the quantity the update uses, and v spans the square of the gradient's range, twice
# the decades sqrt(v) needs; small v rounded to 0 would turn a tiny m into a step of size m / eps.
# Leaves under MIN_8BIT_SIZE values keep float32 moments (bitsandbytes' min_8bit_size): their bytes do not matter
# and biases / norms are where quantization error would hurt most.
# ---------------------------------------------------------------------------------------------------------------
BLOCK_SIZE = 256
MIN_8BIT_SIZE = 4096


class QuantizedMoment(NamedTuple):
    """A moment leaf as block-wise 8-bit codes; the leaf's shape is the gradient's, so it is not stored."""

    codes: jax.Array  # uint8 [n_blocks, BLOCK_SIZE]: index into the code table
    absmax: jax.Array  # float32 [n_blocks]


def quantize_blockwise(x: jax.Array, table: np.ndarray) -> QuantizedMoment:
    """Nearest code for every ``x / absmax(block)``; padding and all-zero blocks encode 0 exactly."""
    flat = x.astype(jnp.float32).reshape(-1)
    blocks = jnp.pad(flat, (0, -flat.size % BLOCK_SIZE)).reshape(-1, BLOCK_SIZE)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    normalized = blocks / jnp.where(absmax > 0, absmax, 1.0)[:, None]
    midpoints = jnp.asarray((table[1:] + table[:-1]) / 2)
    return QuantizedMoment(jnp.searchsorted(midpoints, normalized).astype(jnp.uint8), absmax)


def dequantize_blockwise(q: QuantizedMoment, table: np.ndarray, shape) -> jax.Array:
    blocks = jnp.asarray(table)[q.codes] * q.absmax[:, None]
    return blocks.reshape(-1)[: int(np.prod(shape))].reshape(shape)


class ScaleByAdam8bitState(NamedTuple):
    count: jax.Array  # int32 []
    mu: optax.Updates  # per leaf: QuantizedMoment of m, or float32 m for small leaves
    nu: optax.Updates  # per leaf: QuantizedMoment of sqrt(v), or float32 v for small leaves


class _Moments:
    """One leaf's results; not a pytree node, so ``jax.tree.map`` returns it whole and the trees can be split."""

    def __init__(self, step, mu, nu):
        self.step, self.mu, self.nu = step, mu, nu


def _state(count, moments) -> ScaleByAdam8bitState:
    return ScaleByAdam8bitState(count, jax.tree.map(lambda o: o.mu, moments), jax.tree.map(lambda o: o.nu, moments))


def scale_by_adam_8bit(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """``optax.scale_by_adam`` with 8-bit block-wise moments: dequantize, Adam step in float32, requantize."""

    def init(params):
        def moments(p):
            # Two distinct zero arrays: one buffer in both trees could not be donated to a jitted step.
            mu, nu = jnp.zeros(p.shape, jnp.float32), jnp.zeros(p.shape, jnp.float32)
            if p.size < MIN_8BIT_SIZE:
                return _Moments(None, mu, nu)
            return _Moments(None, quantize_blockwise(mu, SIGNED_MAP), quantize_blockwise(nu, UNSIGNED_MAP))

        return _state(jnp.zeros([], jnp.int32), jax.tree.map(moments, params))

    def update(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        mu_correction = 1 - b1 ** count.astype(jnp.float32)
        nu_correction = 1 - b2 ** count.astype(jnp.float32)

        def leaf(g, mu, nu):
            g = g.astype(jnp.float32)
            quantized = isinstance(mu, QuantizedMoment)
            m = dequantize_blockwise(mu, SIGNED_MAP, g.shape) if quantized else mu
            v = jnp.square(dequantize_blockwise(nu, UNSIGNED_MAP, g.shape)) if quantized else nu
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * jnp.square(g)
            step = (m / mu_correction) / (jnp.sqrt(v / nu_correction) + eps)
            if quantized:
                return _Moments(step, quantize_blockwise(m, SIGNED_MAP), quantize_blockwise(jnp.sqrt(v), UNSIGNED_MAP))
            return _Moments(step, m, v)

        out = jax.tree.map(leaf, updates, state.mu, state.nu)
        return jax.tree.map(lambda o: o.step, out), _state(count, out)

    return optax.GradientTransformation(init, update)


# ---------------------------------------------------------------------------------------------------------------
# Optimizer state in host memory
# ---------------------------------------------------------------------------------------------------------------
def check_host_memory(device: jax.Device | None = None) -> None:
    """Raise unless ``device`` (default: the first) can address pinned host memory, which offloading needs.

    ``pinned_host`` is the memory kind jax's type system calls host (``jax.memory.Space.Host``): GPU and TPU
    expose it, and so does XLA:CPU, where it is the same RAM as ``device`` memory.
    """
    device = device or jax.devices()[0]
    kinds = sorted(m.kind for m in device.addressable_memories())
    if HOST_MEMORY_KIND not in kinds:
        raise ConfigError(f"optim.offload_state needs {HOST_MEMORY_KIND!r} memory, but {device.platform} device "
                          f"{device.id} offers only {kinds}; set optim.offload_state: false")


def place_state(state, offload: bool):
    """Every array of ``state`` moved to host (``offload``) or device memory, keeping its sharding.

    Use it on a state that was made without :func:`offloaded` (a restored checkpoint), and read the shardings of
    the result for a jitted step's ``in_shardings`` / ``out_shardings``.
    """
    kind = HOST_MEMORY_KIND if offload else "device"
    if offload:
        check_host_memory()
    return jax.tree.map(lambda x: jax.device_put(x, x.sharding.with_memory_kind(kind)), state)


def offloaded(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` whose state lives in host memory between steps.

    ``init`` returns host-resident state. ``update`` copies it to device memory, runs ``tx.update`` there and puts
    the new state back in host memory, so under ``jax.jit`` XLA schedules the two transfers around the update; the
    arithmetic is that of ``tx``, so results are bit-identical to keeping the state on the device.

    A jitted step passes the state's own shardings (``jax.tree.map(lambda x: x.sharding, state)``, memory kind
    ``pinned_host``) as its in and out shardings. If it donates the state it must give *every* argument and result
    an explicit sharding: jax pairs donated buffers with results by memory kind only when all are known, and
    otherwise may alias a host buffer to a same-shaped device result (on XLA:CPU, a hard abort).
    """
    check_host_memory()

    def init(params):
        return jax.device_put(tx.init(params), jax.memory.Space.Host)

    def update(updates, state, params=None):
        new_updates, new_state = tx.update(updates, jax.device_put(state, jax.memory.Space.Device), params)
        return new_updates, jax.device_put(new_state, jax.memory.Space.Host)

    return optax.GradientTransformation(init, update)
