"""Model FLOPs utilization (MFU): the FLOPs a train step needs by the model's shape, over the hardware's peak.

Model FLOPs per token follow the PaLM paper's appendix B: ``6 N + 12 L H Q T`` for a causal forward and backward
pass, where N is the non-embedding parameter count (every matmul weight: 2 FLOPs per weight forward, 4 backward),
and ``12 L H Q T`` the attention scores and values (L layers, H heads of Q dims, T tokens of context; no causal
discount). N leaves out the input embedding table (a lookup, no matmul) but counts the LM head's matmul, tied to the
embedding or not. Recomputation (remat) is not counted: MFU measures useful work, not the work done.

The peak is the accelerator's dense bf16 FLOP/s from :data:`PEAK_FLOPS` by ``device_kind``; on hardware the table
does not know (a CPU, another GPU) it is measured once: the best of a few 2048^2 float32 matmuls
(:func:`measure_matmul_peak`, also ``scripts/bench_train.py``'s denominator). The peak of a run is per device
times the devices, since the tokens/s it divides are the whole mesh's.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxft.config import ModelConfig
from jaxft.models.llama import axis_sizes, param_axes

# Dense bf16 FLOP/s by device_kind (lower case), as vendors state them: H100 SXM, A100, TPU v4, v5e ("TPU v5 lite"),
# v5p ("TPU v5"), v6e ("TPU v6 lite"). The first entry contained in the kind wins; an H100 PCIe or NVL (lower
# clocks) is not an SXM part and is measured instead.
PEAK_FLOPS = (("h100 pcie", None), ("h100 nvl", None), ("h100", 989e12), ("a100", 312e12),
              ("tpu v5 lite", 197e12), ("tpu v5e", 197e12), ("tpu v5p", 459e12), ("tpu v6 lite", 918e12),
              ("tpu v6e", 918e12), ("tpu v5", 459e12), ("tpu v4", 275e12))
MATMUL_N = 2048  # the measured peak's square float32 matmul


def non_embedding_params(cfg: ModelConfig) -> int:
    """N of ``6 N``: every parameter but the input embedding table, plus the LM head's weights when they are tied
    to it (the head's matmul costs the same either way)."""
    sizes = axis_sizes(cfg)

    def count(tree: dict, group: str = "") -> int:
        return sum(count(v, k) if isinstance(v, dict) else math.prod(sizes[a] for a in v) if group != "embed_tokens"
                   else 0 for k, v in tree.items())

    head = cfg.hidden_size * cfg.vocab_size if cfg.tie_word_embeddings and cfg.head is None else 0
    return count(param_axes(cfg)) + head


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """PaLM's ``12 L H Q T``: scores and weighted values, forward and backward, over a context of ``seq_len``."""
    return 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Model FLOPs of training on one token in rows of ``seq_len`` tokens: ``6 N + 12 L H Q T``."""
    return 6 * non_embedding_params(cfg) + attention_flops_per_token(cfg, seq_len)


def known_peak(device_kind: str) -> float | None:
    """The table's dense bf16 FLOP/s of one device of this kind, or None when it does not know the kind."""
    kind = device_kind.lower()
    return next((flops for pattern, flops in PEAK_FLOPS if pattern in kind), None)


def measure_matmul_peak(n: int = MATMUL_N, repeats: int = 5, device=None) -> float:
    """FLOP/s of the fastest of ``repeats`` ``n`` x ``n`` float32 matmuls on ``device`` (default: the first),
    after one compiling call."""
    device = device or jax.devices()[0]
    a = jax.device_put(jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32), device)
    b = jax.device_put(jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32), device)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


@dataclass(frozen=True)
class ModelFlops:
    """What a run's MFU divides: its model FLOPs per token and the peak FLOP/s of all its devices."""

    flops_per_token: int
    peak_flops: float  # all devices together
    peak_source: str  # "table: <device kind>" or "measured: ..."
    devices: int

    def mfu(self, tokens_per_s: float | None) -> float | None:
        """Achieved model FLOP/s over the peak; None before the first timed step."""
        return None if tokens_per_s is None else self.flops_per_token * tokens_per_s / self.peak_flops

    def report(self, tokens_per_s: float | None) -> dict:
        """The numbers summary.json records, so the MFU can be recomputed from them."""
        return {"mfu": self.mfu(tokens_per_s), "flops_per_token": self.flops_per_token,
                "peak_flops": self.peak_flops, "peak_flops_per_device": self.peak_flops / self.devices,
                "peak_flops_source": self.peak_source, "devices": self.devices}


def model_flops(cfg: ModelConfig, seq_len: int, devices=None) -> ModelFlops:
    """The run's :class:`ModelFlops` on ``devices`` (default: all of the job's): the table's peak for their kind,
    else one measured on the first of them."""
    devices = devices or jax.devices()
    kind = devices[0].device_kind
    peak = known_peak(kind)
    source = f"table: {kind}"
    if peak is None:
        peak = measure_matmul_peak(device=devices[0])
        source = f"measured: best {MATMUL_N}^2 float32 matmul on {kind}"
    return ModelFlops(flops_per_token(cfg, seq_len), peak * len(devices), source, len(devices))
