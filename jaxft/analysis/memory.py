"""Per-device memory of a run's train step, estimated from shapes alone: no weights, no devices, no compile.

The param tree is built abstractly (``jax.eval_shape`` of init -> NF4 -> LoRA with the sizes in config.json) and
every term is a real buffer of the jitted step (:func:`jaxft.train.loop.jit_train_step`), per device:

- **frozen / trainable**: the param leaves, each divided as the rules table shards it on this mesh shape (a dim
  its mesh axes don't divide stays whole, as :mod:`jaxft.parallel` does). NF4 kernels count their packed codes.
- **optimizer state**: ``optimizer.init`` of the trainable tree (so adamw is 2x, adam8bit ~0.26x, adafactor its
  factored rows/columns, lion 1x, sgd its momentum or nothing), sharded like the params it mirrors. Offloaded
  state lives in host memory and is reported apart.
- **batch**: the [A, B, T] int32 arrays (ids, labels, segments, positions), rows split over the batch axes.
- **grads**: one gradient per trainable leaf (two with gradient accumulation: the running sum and the newest).
- **activations** (backward pass): the residuals jax saves for the backward pass of one micro-batch's loss (read
  off the traced VJP, so they follow the remat policy and the ops' own custom VJPs: all of a layer's saved
  intermediates under ``none``, only each layer's input under ``full``), plus the larger of two transient
  working sets. One layer's backward, from the shapes: the f32 attention probabilities and their two cotangents
  ([B, H, T, T] on the plain path, one tile on the blockwise one), the cotangents of the layer's activations,
  its recomputed matmul inputs and outputs under a remat policy, its kernels dequantized (QLoRA) and its weights
  all-gathered over fsdp. Or the cross-entropy's: one block of f32 logits, probabilities and their cotangent
  (the whole [B, T, V] logits without chunking).
- **update**: the optimizer's update tree (f32, trainable-shaped), plus an offloaded state's copy on the device.
  It exists only after the backward pass has freed the activations, so the peak takes the larger of the two.
- **sampler** (RL runs, :mod:`jaxft.recipes.rl`): the KV cache of a generation batch's completions, K and V
  [layers, prompts x num_generations, max_prompt_length + max_completion_length - 1, KV heads, head dim] in the
  compute dtype (the last token is drawn, never fed back) and its segment ids; its working set, the larger of
  the prefill's f32 logits at every prompt position [prompts, max_prompt_length, V] (it keeps only the last)
  and a decoding step's: the new stacked cache its layer scan writes beside the carried one, one layer's
  weights sliced out of the stack (dequantized from 4 bits) and that layer's K and V as read and as written;
  and the rollout arrays (tokens, log-probs and mask [rows, max_completion_length], the stop flags). Rows and
  prompts split over the batch axes, KV heads and the vocabulary as the training activations'. The sampler
  runs apart from the step: the peak takes the largest of it, the backward pass and the update. Against
  ``memory_analysis()`` of the compiled sampler (temp + output) it reads 0.86-1.06 on XLA:CPU (tiny models;
  1 and 2 tensor shards; cache- or logits-bound).

What it is compared with (:func:`compiled_memory`): XLA's ``memory_analysis()`` of the compiled step, per
device: ``argument + output - alias + temp`` bytes (the state is donated, so its outputs alias its inputs and
count once). Activations are traced on the per-device shapes (batch rows / batch shards; heads, MLP and vocab
columns / their tensor shards), the shapes XLA's partitioner gives every device. On XLA:CPU (1 and 8 devices,
LoRA / QLoRA / full, remat none / full) the estimate reads 0.87-1.06 of that peak.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import jax
import jax.extend.core as jex
import jax.numpy as jnp
from jax.sharding import AbstractMesh, AxisType

from jaxft import parallel
from jaxft.config import ConfigError, ModelConfig, QuantConfig
from jaxft.hf.config import config_from_hf, read_json
from jaxft.models.llama import init_params, linear_shapes
from jaxft.ops import nf4
from jaxft.ops.blockwise_attention import DEFAULT_BLOCK_K, DEFAULT_BLOCK_Q
from jaxft.peft import lora
from jaxft.peft.tree import combine, split
from jaxft.recipes import rl, skeleton
from jaxft.recipes.config import RunConfig
from jaxft.train.loop import init_state, with_reference
from jaxft.train.loss import VOCAB_BLOCK
from jaxft.train.objectives import batch_structs
from jaxft.train.optim import HOST_MEMORY_KIND, make_optimizer

F32 = 4


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device for one mesh shape; ``optimizer_host`` is the offloaded optimizer state (per device)."""

    mesh: tuple[int, int, int]
    frozen: int
    trainable: int
    optimizer: int
    optimizer_host: int
    batch: int
    grads: int
    activations: int
    update: int
    kv_cache: int = 0  # an RL run's sampler: its KV cache,
    sampler_work: int = 0  # its prefill's or decoding step's working set,
    rollout: int = 0  # and its outputs

    @property
    def total(self) -> int:
        """Peak device bytes: what is always resident, plus the largest of the backward pass, the update and the
        sampler (an RL run's rollouts)."""
        resident = self.frozen + self.trainable + self.optimizer + self.batch + self.grads
        return resident + max(self.activations, self.update, self.kv_cache + self.sampler_work + self.rollout)


class AbstractModel(NamedTuple):
    """A run's model as shapes: what ``skeleton.load_model`` would build, without reading a weight."""

    model_cfg: ModelConfig
    params: dict  # ShapeDtypeStruct leaves (NF4 kernels as QuantizedTensors of them), adapters included
    quant: QuantConfig | None  # the base's 4-bit format, None for a dense base


def abstract_model(cfg: RunConfig) -> AbstractModel:
    """The run's model config and param tree (adapters, 4-bit base) from its config.json alone."""
    if cfg.model_dir is None:  # an inline model config: trained from scratch, in full, unquantized
        model_cfg = skeleton.inline_model_config(cfg)
        return AbstractModel(model_cfg, _abstract_params(model_cfg, cfg, None), None)
    config_path = Path(cfg.model) / "config.json"
    if not config_path.exists():
        raise ConfigError(f"{cfg.model}: no config.json (the memory estimate reads the model's sizes from it)")
    hf = read_json(config_path)
    model_cfg = config_from_hf(hf, source=str(config_path), dtype=cfg.compute_dtype or cfg.dtype)
    model_cfg = cfg.train.apply(model_cfg).with_head(cfg.head, str(config_path))  # as the run loads it
    quant = _quant(cfg, hf)
    return AbstractModel(model_cfg, _abstract_params(model_cfg, cfg, quant), quant)


def _quant(cfg: RunConfig, hf: dict) -> QuantConfig | None:
    """The 4-bit format the loader will use: a bitsandbytes checkpoint's own (blocksize 64, transformers' only one),
    else the run's ``quant`` for QLoRA, else none."""
    qc = hf.get("quantization_config") or {}
    if qc.get("load_in_4bit", qc.get("_load_in_4bit")):
        return QuantConfig(quant_type=qc.get("bnb_4bit_quant_type", "nf4"), blocksize=64,
                           double_quant=bool(qc.get("bnb_4bit_use_double_quant", False)))
    return cfg.quant


def _abstract_params(model_cfg: ModelConfig, cfg: RunConfig, quant) -> dict:
    def build(rng):
        params = skeleton.build_params(model_cfg, init_params(model_cfg, rng, cfg.dtype), rng, quant=quant,
                                       peft=cfg.peft, tokenizer_dir=cfg.tokenizer_dir)
        return rl.with_nested_models(cfg, model_cfg, params, rng)

    return jax.eval_shape(build, jax.random.PRNGKey(0))


def param_counts(cfg: RunConfig, model_cfg: ModelConfig, params: dict) -> tuple[int, int]:
    """(trainable, total) parameters, as PEFT counts them: LoRA's rank padding (per-layer ranks) and LoHa's / LoKr's
    untrained entries (layers left out, rank padding) are not counted as trainable."""
    trainable, frozen = split(params, skeleton.trainable_spec(cfg, model_cfg, params))
    n_frozen = sum(math.prod(x.shape) for x in jax.tree.leaves(frozen, is_leaf=_is_quantized))
    n_train = sum(math.prod(x.shape) for x in jax.tree.leaves(trainable))
    if cfg.lora is not None:
        n_train -= _rank_padding(model_cfg, cfg.lora)
    n_train -= sum(m.untrained_entries(model_cfg, params) for m in cfg.peft if hasattr(m, "untrained_entries"))
    return n_train, n_train + n_frozen


def _rank_padding(model_cfg: ModelConfig, lcfg) -> int:
    """Entries of the stacked A/B (and DoRA magnitudes) that pad layers to the largest rank: never trained."""
    padding = 0
    shapes = linear_shapes(model_cfg)
    for path, g in lora.plan(model_cfg, lcfg).items():
        if g.kind != "linear" or path[0] != "layers":
            continue
        fan_in, fan_out = shapes[path[-1]]
        padding += sum(max(g.ranks) - r for r in g.ranks) * (fan_in + fan_out)
        if lcfg.use_dora:
            padding += g.ranks.count(0) * fan_out
    return padding


def _is_quantized(x) -> bool:
    return isinstance(x, nf4.QuantizedTensor)


def abstract_mesh(shape: tuple[int, int, int]) -> AbstractMesh:
    """A (data, fsdp, tensor) mesh of ``shape`` that needs no devices: shardings and shard shapes only."""
    if len(shape) != 3 or any(int(s) < 1 for s in shape):
        raise ConfigError(f"mesh shape {tuple(shape)}: expected three positive sizes data,fsdp,tensor (e.g. 1,8,1)")
    return AbstractMesh(tuple(int(s) for s in shape), parallel.MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def _sharded_bytes(tree, shardings) -> int:
    """Bytes one device holds of ``tree`` laid out by ``shardings`` (a matching tree of NamedShardings)."""
    leaves = jax.tree.leaves(tree)
    return sum(math.prod(s.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
               for x, s in zip(leaves, jax.tree.leaves(shardings), strict=True))


def estimate(cfg: RunConfig, mesh_shape: tuple[int, int, int], *, processes: int = 1,
             rules=parallel.DEFAULT_RULES, model: AbstractModel | None = None) -> MemoryEstimate:
    """Per-device bytes of ``cfg``'s train step on a (data, fsdp, tensor) mesh of ``mesh_shape``.

    ``processes`` multiplies the per-process ``data.batch_size`` into the global batch, as the run does.
    ``model`` reuses an :func:`abstract_model` result.
    """
    mesh = abstract_mesh(mesh_shape)
    model_cfg, params, quant = model or abstract_model(cfg)
    trainable, frozen = split(params, skeleton.trainable_spec(cfg, model_cfg, params))
    optimizer = make_optimizer(dataclasses.replace(cfg.optim, offload_state=False))
    state = jax.eval_shape(lambda t: init_state(t, optimizer), trainable)
    state_sh = parallel.state_shardings(state, mesh, rules)
    opt_bytes = _sharded_bytes(state["opt_state"], state_sh["opt_state"])
    train_bytes = _sharded_bytes(trainable, state_sh["trainable"])
    local = _local_shapes(cfg, model_cfg, quant, mesh, rules, processes)
    offload = cfg.optim.offload_state
    update = _sharded_bytes(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), trainable),
                            state_sh["trainable"])
    kv_cache, sampler_work, rollout = _sampler_bytes(cfg, model_cfg, local, mesh, rules, processes)
    return MemoryEstimate(
        mesh=tuple(mesh_shape),
        frozen=_sharded_bytes(frozen, parallel.param_shardings(frozen, mesh, rules)),
        trainable=train_bytes,
        optimizer=0 if offload else opt_bytes,
        optimizer_host=opt_bytes if offload else 0,
        batch=sum(math.prod(x.shape) * 4 for x in batch_structs(  # int32 and float32
            cfg.objective(), (cfg.train.grad_accum, local.rows, cfg.row_length)).values()),
        grads=train_bytes * (2 if cfg.train.grad_accum > 1 else 1),
        activations=_activations(cfg, model_cfg, local, mesh, rules),
        update=update + (opt_bytes if offload else 0),
        kv_cache=kv_cache,
        sampler_work=sampler_work,
        rollout=rollout,
    )


def _sampler_bytes(cfg: RunConfig, model_cfg: ModelConfig, local: "_Local", mesh, rules, processes: int
                   ) -> tuple[int, int, int]:
    """(KV cache, working set, rollout arrays) bytes per device of an RL run's sampler (module docstring), zeros
    for other runs."""
    task = cfg.task
    if not getattr(task, "online", False):
        return 0, 0, 0
    rows = cfg.data.batch_size * task.num_generations * processes
    local_rows = parallel.batch_sharding(mesh, 1, rules).shard_shape((rows,))[0]
    lc = local.model_cfg  # the KV heads one device computes
    itemsize, slots = jnp.dtype(lc.dtype).itemsize, task.max_prompt_length + task.max_completion_length - 1
    kv = 2 * lc.num_hidden_layers * local_rows * slots * lc.num_key_value_heads * lc.head_dim * itemsize
    cache = kv + local_rows * slots * 4  # and the slots' int32 segment ids
    # the layer scan writes a new stacked cache beside the one the decode loop carries, from one layer's weights
    # (sliced out of the stack; a 4-bit base's dequantized) and that layer's K and V, as read and as written
    layer = _layer_bytes(cfg, model_cfg, local.quant, abstract_mesh((mesh.shape["data"], 1, mesh.shape["tensor"])),
                         rules)
    if local.quant is not None:
        layer += sum(fan_in * fan_out for fan_in, fan_out in linear_shapes(lc).values()) * itemsize
    decode = cache + layer + 2 * kv // lc.num_hidden_layers
    local_prompts = -(-local_rows // task.num_generations)
    prefill = local_prompts * task.max_prompt_length * lc.vocab_size * F32
    # tokens (int32), log-probs (float32), mask (int32) per completion slot, and one stop flag (bool) per row
    return cache, max(decode, prefill), local_rows * (task.max_completion_length * 3 * 4 + 1)


@dataclass(frozen=True)
class _Local:
    """One device's share of the activations: batch rows, and the model with tensor-sharded widths divided."""

    rows: int
    model_cfg: ModelConfig
    chunk: int  # cross-entropy rows per chunk on this device
    quant: QuantConfig | None  # the base's 4-bit format
    lm_head_lora: bool  # an adapter on lm_head makes the loss take full logits, as CausalLM.loss_sum does


def _local_shapes(cfg: RunConfig, model_cfg: ModelConfig, quant, mesh, rules, processes: int) -> _Local:
    rows = cfg.micro_batch_rows * processes
    batch = parallel.batch_sharding(mesh, 2, rules)
    try:
        local_rows = batch.shard_shape((rows, cfg.row_length))[0]
    except ValueError:
        raise ConfigError(f"a micro-batch's {cfg.micro_batch_rows} rows x {processes} process(es) = {rows} rows do not "
                          f"split over the batch axes of mesh {tuple(mesh.shape.values())}; use a batch_size that "
                          "makes the global batch a multiple of data x fsdp") from None
    batch_shards = rows // local_rows
    widths = _width_shards(model_cfg, mesh, rules)
    heads, kv_heads = widths["heads"], widths["kv_heads"]
    n_heads, n_kv = model_cfg.num_attention_heads, model_cfg.num_key_value_heads
    if n_heads % heads:
        heads = kv_heads = 1  # a split that cuts query heads apart is resharded to whole heads by XLA
    elif n_kv % kv_heads or (n_heads // heads) % (n_kv // kv_heads):
        # K/V heads that don't split like the query heads: the query heads (and the scores) still split, and each
        # device holds the K/V heads its own query groups read
        local_kv = max(1, n_kv // heads)
        kv_heads = n_kv // (local_kv if (n_heads // heads) % local_kv == 0 else 1)
    local_cfg = model_cfg.replace(num_attention_heads=model_cfg.num_attention_heads // heads,
                                  num_key_value_heads=model_cfg.num_key_value_heads // kv_heads,
                                  intermediate_size=model_cfg.intermediate_size // widths["mlp"],
                                  vocab_size=model_cfg.vocab_size // widths["vocab"], head_dim=model_cfg.head_dim)
    chunk = cfg.train.loss_chunk_size
    # The chunked loss reshapes the global [B * T] tokens into chunks; each chunk's rows split over the batch shards.
    local_chunk = chunk // batch_shards if chunk and chunk % batch_shards == 0 else chunk
    lm_head_lora = cfg.lora is not None and ("lm_head",) in lora.plan(model_cfg, cfg.lora)
    return _Local(local_rows, local_cfg, local_chunk, quant, lm_head_lora)


def _width_shards(model_cfg: ModelConfig, mesh, rules) -> dict[str, int]:
    """How many ways the activations' head, MLP and vocabulary widths split: as the kernels that produce them are
    split on the mesh axes the batch leaves free (the batch takes data and fsdp)."""
    free = abstract_mesh((1, 1, mesh.shape["tensor"]))
    d, hd = model_cfg.hidden_size, model_cfg.head_dim
    kernels = {"q_proj": (d, model_cfg.num_attention_heads * hd), "k_proj": (d, model_cfg.num_key_value_heads * hd),
               "gate_proj": (d, model_cfg.intermediate_size)}
    tree = {"layers": {m: {"kernel": jax.ShapeDtypeStruct((1, *shape), jnp.float32)} for m, shape in kernels.items()},
            "lm_head": {"kernel": jax.ShapeDtypeStruct((d, model_cfg.vocab_size), jnp.float32)}}
    shardings = parallel.param_shardings(tree, free, rules)

    def ways(module: str) -> int:
        stacked = module in kernels
        shape = (tree["layers"] if stacked else tree)[module]["kernel"].shape
        sharding = (shardings["layers"] if stacked else shardings)[module]["kernel"]
        return shape[-1] // sharding.shard_shape(shape)[-1]

    return {"heads": ways("q_proj"), "kv_heads": ways("k_proj"), "mlp": ways("gate_proj"), "vocab": ways("lm_head")}


def _activations(cfg: RunConfig, model_cfg: ModelConfig, local: _Local, mesh, rules) -> int:
    """Saved residuals of one micro-batch (for the real layer count) + the larger transient working set."""
    outside, per_layer = _residuals_by_depth(cfg, local)
    saved = outside + per_layer * model_cfg.num_hidden_layers
    layer = _layer_working_set(cfg, model_cfg, local, mesh, rules)
    return saved + max(layer, _loss_working_set(cfg, local))


def _residuals_by_depth(cfg: RunConfig, local: _Local) -> tuple[int, int]:
    """(residual bytes outside the layer scan, residual bytes per layer): residuals grow linearly with depth (the
    scan stacks each layer's), so a 1- and a 2-layer trace give both."""
    one, two = (_residual_bytes(cfg, _with_layers(local.model_cfg, n), local) for n in (1, 2))
    return 2 * one - two, two - one


def _with_layers(model_cfg: ModelConfig, n: int) -> ModelConfig:
    return model_cfg.replace(num_hidden_layers=n, sliding_layers=model_cfg.sliding_layers[:1] * n)


def _residual_bytes(cfg: RunConfig, model_cfg: ModelConfig, local: _Local) -> int:
    """Bytes of the new buffers the VJP of one micro-batch's loss keeps for the backward pass (params and the
    batch, which it also keeps, are counted elsewhere), traced on the per-device shapes in ``model_cfg``."""
    params = _abstract_params(model_cfg, cfg, local.quant)
    trainable, frozen = split(params, skeleton.trainable_spec(cfg, model_cfg, params))
    objective = cfg.objective()
    if hasattr(objective, "chunk_size"):  # the loss chunks its logits: as many rows per chunk as this device takes
        objective = dataclasses.replace(objective, chunk_size=local.chunk)
    batch = batch_structs(objective, (local.rows, cfg.row_length))
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)

    def pullback_leaves(trainable, frozen, batch, rng):
        batch = with_reference(objective, model_cfg, combine(trainable, frozen), batch)  # outside the VJP, as the step

        def loss(t):
            return objective.loss_sum(model_cfg, combine(t, frozen), batch, rng)
        return jax.tree.leaves(jax.vjp(loss, trainable)[1])

    jaxpr = jax.make_jaxpr(pullback_leaves)(trainable, frozen, batch, rng).jaxpr
    existing = set(jaxpr.invars) | set(jaxpr.constvars)
    residuals = {v for v in jaxpr.outvars if isinstance(v, jex.Var) and v not in existing}
    return sum(math.prod(v.aval.shape) * v.aval.dtype.itemsize for v in residuals)


def _layer_working_set(cfg: RunConfig, model_cfg: ModelConfig, local: _Local, mesh, rules) -> int:
    """Transient bytes of one layer's backward pass beyond the saved residuals, counted as if all live at once.

    Attention: the f32 probabilities (saved or recomputed), their cotangent and the scores' cotangent, [B, H, T, T]
    on the plain path or one [B, H, block_q, block_k] tile on the blockwise one. Activations: the cotangents of the
    residual stream, of q, k, v and the attention output, and of the MLP's gate, up and gated product. Under a
    remat policy the layer's forward runs again first and its matmul inputs and outputs exist once more. QLoRA
    dequantizes the layer's kernels to the compute dtype; fsdp all-gathers the layer's weights.
    """
    lc, b, t = local.model_cfg, local.rows, cfg.row_length
    itemsize = jnp.dtype(lc.dtype).itemsize
    q_width, kv_width = lc.num_attention_heads * lc.head_dim, lc.num_key_value_heads * lc.head_dim
    if lc.attention == "blockwise":
        tile = min(DEFAULT_BLOCK_Q, t) * min(DEFAULT_BLOCK_K, t)
    else:
        tile = t * t
    attention = 3 * b * lc.num_attention_heads * tile * F32
    cotangents = b * t * (lc.hidden_size + 2 * q_width + 2 * kv_width + 3 * lc.intermediate_size) * itemsize
    work = attention + cotangents
    if model_cfg.remat != "none":  # x, h, q, k, v, attention output, x2, h2; gate, up, their product
        work += b * t * (4 * lc.hidden_size + 2 * q_width + 2 * kv_width + 3 * lc.intermediate_size) * itemsize
    if local.quant is not None:
        work += sum(fan_in * fan_out for fan_in, fan_out in linear_shapes(lc).values()) * itemsize
    return work + _gathered_layer_bytes(cfg, model_cfg, local.quant, mesh, rules)


def _gathered_layer_bytes(cfg: RunConfig, model_cfg: ModelConfig, quant, mesh, rules) -> int:
    """One layer's weights as its devices use them: whole along fsdp-sharded dims (all-gathered), 0 without fsdp."""
    if mesh.shape["fsdp"] == 1:
        return 0
    return _layer_bytes(cfg, model_cfg, quant, abstract_mesh((mesh.shape["data"], 1, mesh.shape["tensor"])), rules)


def _layer_bytes(cfg: RunConfig, model_cfg: ModelConfig, quant, mesh, rules) -> int:
    """Bytes one device holds of one layer's weights (adapters included) laid out on ``mesh``."""
    layer = _abstract_params(_with_layers(model_cfg, 1), cfg, quant)["layers"]
    return _sharded_bytes(layer, parallel.param_shardings({"layers": layer}, mesh, rules)["layers"])


def _loss_working_set(cfg: RunConfig, local: _Local) -> int:
    """Transient bytes of the cross-entropy's backward pass: f32 logits and their cotangents (a task head's N
    outputs per token in place of the vocabulary's)."""
    lc = local.model_cfg
    if lc.head is not None:
        return 2 * local.rows * cfg.row_length * lc.head.num_labels * F32
    if local.chunk and not local.lm_head_lora:
        block = min(VOCAB_BLOCK, lc.vocab_size)
        # one block's logits, probabilities and cotangent, and the chunk's f32 hidden-state cotangent
        return local.chunk * (3 * block + lc.hidden_size) * F32
    return 2 * local.rows * cfg.row_length * lc.vocab_size * F32  # softmax and d_logits of the full logits


def compiled_memory(cfg: RunConfig, mesh_cfg: parallel.MeshConfig, devices=None, rules=parallel.DEFAULT_RULES
                    ) -> dict[str, int]:
    """XLA's ``memory_analysis()`` of the real step compiled on ``devices`` (default: all), per device, with
    ``peak`` = argument + output - alias + temp (what :class:`MemoryEstimate.total` estimates)."""
    from jaxft.train.loop import jit_train_step

    devices = jax.devices() if devices is None else devices
    mesh = parallel.make_mesh(mesh_cfg, devices)
    model_cfg, params, _ = abstract_model(cfg)
    trainable, frozen = split(params, skeleton.trainable_spec(cfg, model_cfg, params))
    optimizer = make_optimizer(cfg.optim)
    loss_scale = skeleton.initial_loss_scale(model_cfg)
    state = jax.eval_shape(lambda t: init_state(t, optimizer, seed=cfg.train.seed, loss_scale=loss_scale), trainable)
    if cfg.optim.offload_state:  # abstract state says where it lives, as the run's (host-resident) state does
        on_host = jax.tree.map(lambda s: s.with_memory_kind(HOST_MEMORY_KIND),
                               parallel.state_shardings(state, mesh, rules)["opt_state"])
        state["opt_state"] = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                          state["opt_state"], on_host)
    step = jit_train_step(model_cfg, skeleton.step_config(cfg), optimizer, mesh, state, frozen, rules)
    rows = cfg.micro_batch_rows * jax.process_count()
    batch = batch_structs(cfg.objective(), (cfg.train.grad_accum, rows, cfg.row_length))
    analysis = step.lower(state, frozen, batch).compile().memory_analysis()
    out = {k: int(getattr(analysis, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def format_table(estimates: list[MemoryEstimate], measured: list[dict | None] | None = None) -> str:
    """A per-device memory table, one column per mesh shape (and its compiled ``memory_analysis`` when given)."""
    rows = [("frozen weights", "frozen"), ("trainable", "trainable"), ("grads", "grads"),
            ("optimizer state", "optimizer"), ("batch", "batch"), ("activations", "activations"),
            ("optimizer update", "update")]
    header = ["per device"] + ["mesh " + ",".join(map(str, e.mesh)) for e in estimates]
    lines = [[label] + [_mib(getattr(e, key)) for e in estimates] for label, key in rows]
    if any(e.optimizer_host for e in estimates):
        lines.append(["optimizer state (host)"] + [_mib(e.optimizer_host) for e in estimates])
    if any(e.kv_cache for e in estimates):
        lines.append(["sampler KV cache"] + [_mib(e.kv_cache) for e in estimates])
        lines.append(["sampler working set"] + [_mib(e.sampler_work) for e in estimates])
        lines.append(["rollout arrays"] + [_mib(e.rollout) for e in estimates])
    lines.append(["total (peak)"] + [_mib(e.total) for e in estimates])
    if measured:
        lines.append(["compiled memory_analysis"] + [_mib(m["peak"]) if m else "-" for m in measured])
        lines.append(["estimate / compiled"] + [f"{e.total / m['peak']:.2f}" if m else "-"
                                                for e, m in zip(estimates, measured)])
    widths = [max(len(row[i]) for row in [header] + lines) for i in range(len(header))]
    fmt = "  ".join(["{:<%d}" % widths[0]] + ["{:>%d}" % w for w in widths[1:]])
    return "\n".join(fmt.format(*row) for row in [header] + lines)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"
