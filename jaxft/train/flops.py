"""Model FLOPs utilization (MFU): the FLOPs a train step needs by the model's shape, over the hardware's peak.

Model FLOPs per token follow the PaLM paper's appendix B: ``6 N + 12 L H Q T`` for a causal forward and backward
pass, where N is the non-embedding parameter count (every matmul weight: 2 FLOPs per weight forward, 4 backward),
and ``12 L H Q T`` the attention scores and values (L layers, H heads of Q dims, T tokens of context; no causal
discount). N leaves out the input embedding table (a lookup, no matmul) but counts the LM head's matmul, tied to the
embedding or not. Recomputation (remat) is not counted: MFU measures useful work, not the work done.

The peak is the accelerator's dense bf16 FLOP/s from :data:`PEAK_FLOPS` by ``device_kind``; on hardware the table
does not know (a CPU, another GPU) it is measured once: the best of a few 2048^2 matmuls in the run's compute dtype
(:func:`measure_matmul_peak`, also ``scripts/bench_train.py``'s denominator), since a float32 matmul on a GPU runs
far below its bf16 tensor-core peak and would let a bf16 run's MFU pass 1. A measured peak is a lower bound of the
real one (a 2048^2 matmul does not saturate a large GPU), so its MFU reads high: ``peak_flops_source`` says which
it is, and a run logs it. The peak of a run is per device times the devices, since the tokens/s it divides are the
whole mesh's.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxft.config import ModelConfig
from jaxft.models.llama import axis_sizes, param_axes

# Dense bf16 FLOP/s by device_kind (lower case), as vendors state them: H100 SXM, H200, B200, A100, L40S, L4, A10G,
# TPU v4, v5e (jax's kind "TPU v5 lite"), v5p ("TPU v5"), v6e ("TPU v6 lite"). An entry matches whole words of the
# kind ("l4" is not "l40s", "b200" not "gb200"); the first match wins, so the parts with lower clocks than their
# namesake (H100 PCIe / NVL, H200 NVL), listed first without a number, are measured instead.
PEAK_FLOPS = (("h100 pcie", None), ("h100 nvl", None), ("h200 nvl", None), ("h100", 989e12), ("h200", 989e12),
              ("b200", 2.25e15), ("a100", 312e12), ("l40s", 362e12), ("l4", 121e12), ("a10g", 125e12),
              ("tpu v5 lite", 197e12), ("tpu v5e", 197e12), ("tpu v5p", 459e12), ("tpu v6 lite", 918e12),
              ("tpu v6e", 918e12), ("tpu v5", 459e12), ("tpu v4", 275e12))
MATMUL_N = 2048  # the measured peak's square matmul


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
    return next((flops for pattern, flops in PEAK_FLOPS if re.search(rf"\b{re.escape(pattern)}\b", kind)), None)


def matmul_operands(n: int, dtype, device) -> tuple[jax.Array, jax.Array]:
    """Two random ``n`` x ``n`` matrices of ``dtype`` on ``device``: what :func:`measure_matmul_peak` multiplies."""
    keys = jax.random.split(jax.random.PRNGKey(0))
    return tuple(jax.device_put(jax.random.normal(key, (n, n), jnp.float32).astype(dtype), device) for key in keys)


def measure_matmul_peak(n: int = MATMUL_N, repeats: int = 5, device=None, dtype="float32") -> float:
    """FLOP/s of the fastest of ``repeats`` ``n`` x ``n`` matmuls of ``dtype`` (the run's compute dtype: a bf16
    matmul runs on tensor cores, a float32 one need not) on ``device`` (default: the first), after one compiling
    call."""
    device = device or jax.devices()[0]
    a, b = matmul_operands(n, dtype, device)
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
    else one measured on the first of them in the model's compute dtype (``cfg.dtype``)."""
    devices = devices or jax.devices()
    kind = devices[0].device_kind
    peak = known_peak(kind)
    source = f"table: {kind}"
    if peak is None:
        dtype = jnp.dtype(cfg.dtype).name
        peak = measure_matmul_peak(device=devices[0], dtype=dtype)
        source = (f"measured: best {MATMUL_N}^2 {dtype} matmul on {kind} (not in jaxft.train.flops.PEAK_FLOPS; a "
                  "lower bound of the peak, so the MFU reads high)")
    return ModelFlops(flops_per_token(cfg, seq_len), peak * len(devices), source, len(devices))
