"""LoRA (and rsLoRA, DoRA) as a transformation of the param tree, with PEFT's configuration semantics.

``add`` puts a ``lora`` namespace next to the frozen kernel of every targeted linear group::

    {"kernel": W [L, in, out] (dense or NF4), "bias"?,
     "lora": {"a": [L, in, r_max], "b": [L, r_max, out],   # trained
              "scale": [L],                                # alpha/r (or alpha/sqrt(r)); 0 where a layer has none
              "mask"?: [L, r_max],      # only when ranks differ per layer or some layers are skipped
              "dropout"?: [L],          # only when lora_dropout > 0
              "magnitude"?: [L, out]}}  # DoRA (PEFT's LoraVariant: the leaf selects the variant), trained

and ``{"lora": {"a": [V, r], "b": [r, D], "scale": []}}`` beside an embedding table; PEFT's TrainableTokens is its
own method, ``trainable_tokens: {"rows": [n, D] (trained), "ids": [n]}`` beside the table. Both are registered
methods (:mod:`jaxft.ops.registry`): their forward, axes, merge and counts live in the classes below.

Layers are scanned, so every layer has the same shapes: ranks are padded to the largest and masked. Masked
entries multiply to zero in the forward pass, so they get exactly zero gradient and never reach an exported file.
Module names follow HF (``model.layers.3.self_attn.q_proj``), so ``target_modules``, ``rank_pattern``,
``alpha_pattern``, ``layers_to_transform`` and ``modules_to_save`` match exactly what PEFT would match.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.config import ConfigError, HeadConfig, ModelConfig
from jaxft.models.llama import ATTN_PROJ, LINEAR_MODULES
from jaxft.ops import nf4
from jaxft.ops.linear import dense_kernel, dora_linear, embedding_table, lora_delta, lora_linear, with_bias
from jaxft.ops.registry import REGISTRY, Method, PeftTensor, own_leaves, register
from jaxft.peft.adapters import check_task_type, config_dict, fields_from_peft, register_config
from jaxft.peft.tree import Trainable, leaf_paths

BIAS_MODES = ("none", "all", "lora_only")
# What PEFT's PeftModelFor<Task> adds to modules_to_save: the task head, trained in full and saved with the adapter.
# PEFT lists the head names of every architecture it knows, so a name may match no module of this one.
TASK_HEAD_MODULES = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
                     "QUESTION_ANS": ("qa_outputs",)}
# The trained leaves' names before the method registry (jaxft up to b4e718f kept them beside the kernel or table),
# each with its path inside today's group: training checkpoints written then restore through this table. Frozen
# leaves (lora_scale, lora_mask, lora_dropout, trainable_row_ids) were never saved, so they need no entry.
OLD_LEAF_NAMES = {"lora_a": "lora/a", "lora_b": "lora/b", "lora_magnitude": "lora/magnitude",
                  "lora_embedding_a": "lora/a", "lora_embedding_b": "lora/b", "trainable_rows": "trainable_tokens/rows"}


@register_config
@dataclass(frozen=True)
class LoraConfig:
    """PEFT's ``LoraConfig`` fields, validated. Lists may be given; they are stored as tuples. An adapter config
    (:mod:`jaxft.peft.adapters`)."""

    peft_type: ClassVar[str] = "LORA"

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] | str | None = None  # None: PEFT's Llama default (q_proj, v_proj)
    exclude_modules: tuple[str, ...] | str | None = None  # never adapted, even when target_modules matches them
    modules_to_save: tuple[str, ...] | None = None
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | str = True
    layers_to_transform: tuple[int, ...] | int | None = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    inference_mode: bool = False
    task_type: str = "CAUSAL_LM"
    # Embedding rows trained in full (new special tokens after a vocabulary resize), PEFT's TrainableTokens.
    trainable_token_indices: tuple[int, ...] | None = None

    def __post_init__(self):
        if isinstance(self.trainable_token_indices, dict):
            if set(self.trainable_token_indices) != {"embed_tokens"}:
                raise ConfigError(f"trainable_token_indices: only embed_tokens is supported, got "
                                  f"{sorted(self.trainable_token_indices)}")
            object.__setattr__(self, "trainable_token_indices", self.trainable_token_indices["embed_tokens"])
        for name in ("target_modules", "exclude_modules", "modules_to_save", "layers_to_transform",
                     "trainable_token_indices"):
            object.__setattr__(self, name, as_tuple(getattr(self, name)))
        if isinstance(self.layers_to_transform, int):
            object.__setattr__(self, "layers_to_transform", (self.layers_to_transform,))
        if not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"lora.r must be a positive integer, got {self.r!r}")
        if self.lora_alpha <= 0:
            raise ConfigError(f"lora.lora_alpha must be > 0, got {self.lora_alpha!r}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in BIAS_MODES:
            raise ConfigError(f"lora.bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ConfigError(f"lora.init_lora_weights must be True, False or 'gaussian', "
                              f"got {self.init_lora_weights!r}")
        for key, rank in self.rank_pattern.items():
            if not isinstance(rank, int) or rank <= 0:
                raise ConfigError(f"lora.rank_pattern[{key!r}] must be a positive integer, got {rank!r}")
        check_task_type(self.task_type, "lora")
        object.__setattr__(self, "modules_to_save", with_task_head(self.modules_to_save, self.task_type))

    def replace(self, **changes) -> "LoraConfig":
        return dataclasses.replace(self, **changes)

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def add(self, cfg: ModelConfig, params: dict, rng) -> dict:
        """The method step of a run (``recipes.skeleton.build_params``): :func:`add` with this config."""
        return add(cfg, params, self, rng)

    def trainable(self, cfg: ModelConfig, params: dict) -> Trainable:
        """What this config trains besides the adapters: :func:`trainable`."""
        return trainable(cfg, params, self)

    def peft_config(self, base_model_name_or_path: str | None = None) -> dict:
        """adapter_config.json as PEFT writes it."""
        return config_dict(self, base_model_name_or_path, fan_in_fan_out=False, layers_pattern=None, lora_bias=False)

    @classmethod
    def from_peft(cls, d: dict, source: str) -> "LoraConfig":
        """The fields jaxft models; features it doesn't implement are errors, PEFT bookkeeping fields are ignored."""
        unsupported = {"fan_in_fan_out": False, "lora_bias": False, "layer_replication": None,
                       "target_parameters": None, "use_qalora": False}
        kwargs = fields_from_peft(cls, d, source, unsupported)
        if d.get("layers_pattern") not in (None, "layers", ["layers"]):
            raise ConfigError(f"{source}: layers_pattern {d['layers_pattern']!r}: Llama-family layers are 'layers'")
        return cls(**{k: v for k, v in kwargs.items() if v is not None or k == "target_modules"})


def as_tuple(value):
    """A list or set field of a config as a tuple (a set sorted); anything else as it is."""
    if isinstance(value, (set, frozenset)):
        return tuple(sorted(value))
    return tuple(value) if isinstance(value, list) else value


def with_task_head(modules_to_save: tuple[str, ...] | None, task_type: str) -> tuple[str, ...] | None:
    """``modules_to_save`` with the task head PEFT's PeftModelFor<Task> adds for ``task_type``, as PEFT extends the
    config, so the saved adapter_config.json says the same."""
    head_modules = [m for m in TASK_HEAD_MODULES.get(task_type, ()) if m not in (modules_to_save or ())]
    return (*(modules_to_save or ()), *head_modules) if head_modules else modules_to_save


@dataclass(frozen=True)
class Module:
    """One HF module of the model and where its params live in the tree."""

    key: str  # e.g. "model.layers.3.mlp.up_proj"
    kind: str  # linear | embedding | norm | head (a task head: linear, but never in all-linear)
    group: tuple[str, ...]  # path of its leaf group in the param tree
    layer: int | None  # index into the stacked [L] axis, None for unstacked groups


def modules(cfg: ModelConfig) -> list[Module]:
    out = [Module("model.embed_tokens", "embedding", ("embed_tokens",), None)]
    for i in range(cfg.num_hidden_layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out.append(Module(f"model.layers.{i}.{norm}", "norm", ("layers", norm), i))
        for m in LINEAR_MODULES:
            block = "self_attn" if m in ATTN_PROJ else "mlp"
            out.append(Module(f"model.layers.{i}.{block}.{m}", "linear", ("layers", m), i))
    out.append(Module("model.norm", "norm", ("norm",), None))
    if cfg.head is None:
        out.append(Module("lm_head", "linear", ("lm_head",), None))
    else:
        out.append(Module(cfg.head.group, "head", (cfg.head.group,), None))
    return out


def pattern_key(patterns, key: str):
    """PEFT's ``get_pattern_key``: the first pattern matching a dotted suffix of ``key``."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return pattern
    return None


def _layer_index(key: str) -> int | None:
    match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    return int(match["idx"]) if match else None


def targeted(acfg, module: Module) -> bool:
    """PEFT's ``check_target_module_exists`` for one module, for any adapter config (one without
    ``layers_to_transform``, as IA3's, transforms every layer, as in PEFT; one without ``exclude_modules`` excludes
    nothing): ``exclude_modules`` as a string is a regex of the whole key, as a list names or key suffixes."""
    excluded = getattr(acfg, "exclude_modules", None)
    if isinstance(excluded, str) and re.fullmatch(excluded, module.key):
        return False
    if isinstance(excluded, tuple) and (module.key in excluded or any(module.key.endswith(f".{e}") for e in excluded)):
        return False
    if acfg.modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", module.key) for m in acfg.modules_to_save):
        return False
    targets = acfg.target_modules if acfg.target_modules is not None else ("q_proj", "v_proj")
    if targets == "all-linear":
        found = module.kind == "linear" and module.key != "lm_head"
    elif isinstance(targets, str):
        return re.fullmatch(targets, module.key) is not None
    else:
        found = module.key in targets or any(module.key.endswith(f".{t}") for t in targets)
    layers = getattr(acfg, "layers_to_transform", None)
    if found and layers is not None:
        return _layer_index(module.key) in layers
    return found


@dataclass
class GroupPlan:
    """Per-layer ranks and alphas of one leaf group (rank 0: that layer has no adapter)."""

    kind: str
    ranks: list[int]
    alphas: list[float]


def plan(cfg: ModelConfig, lcfg: LoraConfig) -> dict[tuple[str, ...], GroupPlan]:
    """Which groups get adapters, with which rank and alpha in each layer; unknown targets are errors."""
    n_layers = cfg.num_hidden_layers
    groups: dict[tuple[str, ...], GroupPlan] = {}
    matched = set()
    for m in modules(cfg):
        if m.kind == "norm" or not targeted(lcfg, m):
            continue
        if m.key == "lm_head" and cfg.tie_word_embeddings:
            raise ConfigError("LoRA on lm_head of a model with tied embeddings is not supported: target "
                              "embed_tokens instead, or untie the embeddings")
        if m.kind == "embedding" and lcfg.use_dora:
            raise ConfigError("DoRA on embed_tokens is not supported; leave embed_tokens out of target_modules "
                              "or set use_dora=False")
        rank_key, alpha_key = pattern_key(lcfg.rank_pattern, m.key), pattern_key(lcfg.alpha_pattern, m.key)
        r = lcfg.rank_pattern[rank_key] if rank_key else lcfg.r
        alpha = lcfg.alpha_pattern[alpha_key] if alpha_key else lcfg.lora_alpha
        size = n_layers if m.layer is not None else 1
        g = groups.setdefault(m.group, GroupPlan(m.kind, [0] * size, [0.0] * size))
        g.ranks[m.layer or 0], g.alphas[m.layer or 0] = r, alpha
        matched.add(m.key)
    if not groups:
        excluded = f" outside exclude_modules {lcfg.exclude_modules!r}" if lcfg.exclude_modules else ""
        raise ConfigError(f"target_modules {lcfg.target_modules!r} matched no module{excluded} of this "
                          f"{cfg.model_type} model; its modules are "
                          f"{sorted(set(m.key.rsplit('.', 1)[-1] for m in modules(cfg)))}")
    if isinstance(lcfg.target_modules, tuple):
        names = [m.key for m in modules(cfg)]
        unknown = [t for t in lcfg.target_modules
                   if not any(n == t or n.endswith(f".{t}") for n in names)]
        if unknown:
            raise ConfigError(f"target_modules {unknown} match no module of this {cfg.model_type} model; "
                              f"known names: {sorted(set(n.rsplit('.', 1)[-1] for n in names))}")
    return groups


def targeted_groups(cfg: ModelConfig, acfg, section: str) -> dict[tuple[str, ...], list[Module]]:
    """The leaf groups holding a module that ``acfg`` targets (:func:`targeted`), each with those modules. Layers are
    stacked, so a stacked group is targeted in every layer or in none; no target at all is an error naming the
    model's modules (``section``: the config's name in messages)."""
    hits: dict[tuple[str, ...], list[Module]] = {}
    for m in modules(cfg):
        if targeted(acfg, m):
            hits.setdefault(m.group, []).append(m)
    if not hits:
        raise ConfigError(f"{section}.target_modules {acfg.target_modules!r} matched no module of this "
                          f"{cfg.model_type} model; its modules are "
                          f"{sorted(set(m.key.rsplit('.', 1)[-1] for m in modules(cfg)))}")
    for group, found in hits.items():
        if found[0].layer is not None and len(found) != cfg.num_hidden_layers:
            raise ConfigError(f"{section} targets {'/'.join(group)} in layers {[m.layer for m in found]} only; "
                              "layers are stacked, so target it in every layer or in none")
    return hits


def _uniform(key, shape, bound):
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def _init_pair(key, lcfg: LoraConfig, fan_in: int, fan_out: int, r: int):
    """A [in, r] and B [r, out] as PEFT initializes lora_A / lora_B (torch's Linear init when not reset)."""
    ka, kb = jax.random.split(key)
    if lcfg.init_lora_weights == "gaussian":
        a = jax.random.normal(ka, (fan_in, r)) / r
    else:
        a = _uniform(ka, (fan_in, r), 1 / math.sqrt(fan_in))  # kaiming_uniform(a=sqrt(5)) on [r, in]
    b = _uniform(kb, (r, fan_out), 1 / math.sqrt(r)) if lcfg.init_lora_weights is False else jnp.zeros((r, fan_out))
    return a, b


def _linear_adapters(key, lcfg: LoraConfig, group: dict, g: GroupPlan, fan_in: int, fan_out: int, stacked: bool):
    r_max = max(g.ranks)
    a_all, b_all = [], []
    for layer_key, r in zip(jax.random.split(key, len(g.ranks)), g.ranks):
        a, b = _init_pair(layer_key, lcfg, fan_in, fan_out, max(r, 1))
        a_all.append(jnp.zeros((fan_in, r_max)).at[:, :r].set(a[:, :r]))
        b_all.append(jnp.zeros((r_max, fan_out)).at[:r].set(b[:r]))
    a, b = jnp.stack(a_all), jnp.stack(b_all)
    scale = jnp.asarray([lcfg.scaling(r, al) if r else 0.0 for r, al in zip(g.ranks, g.alphas)], jnp.float32)
    out = {"a": a, "b": b, "scale": scale}
    if any(r != r_max for r in g.ranks):
        out["mask"] = jnp.asarray([[1.0] * r + [0.0] * (r_max - r) for r in g.ranks], jnp.float32)
    if lcfg.lora_dropout > 0:
        out["dropout"] = jnp.full((len(g.ranks),), lcfg.lora_dropout, jnp.float32)
    if lcfg.use_dora:
        w = dense_kernel(group["kernel"], jnp.float32)
        if not stacked:
            w = w[None]
        out["magnitude"] = dora_norm(w, masked(out))
    if not stacked:
        out = {k: v[0] for k, v in out.items()}
    return out


def masked(p: dict) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """(A, B, scale) of a ``lora`` namespace with the rank padding zeroed out."""
    a, b = p["a"], p["b"]
    if "mask" in p:
        mask = p["mask"]
        a, b = a * mask[..., None, :], b * mask[..., :, None]
    return a, b, p["scale"]


def dora_norm(w: jnp.ndarray, lora: tuple) -> jnp.ndarray:
    """||W + s·A·B|| per output column (over the input dim), W: [..., in, out]."""
    a, b, s = lora
    delta = jnp.einsum("...ir,...ro->...io", a, b) * s[..., None, None]
    return jnp.linalg.norm(w.astype(jnp.float32) + delta, axis=-2)


def _embedding_adapters(key, lcfg: LoraConfig, g: GroupPlan, vocab: int, dim: int):
    r, alpha = g.ranks[0], g.alphas[0]
    ka, kb = jax.random.split(key)
    if lcfg.init_lora_weights is False:
        a, b = jax.random.normal(ka, (vocab, r)), jax.random.normal(kb, (r, dim))
    else:  # PEFT: A zero, B normal for embeddings (the reverse of linear layers)
        a, b = jnp.zeros((vocab, r)), jax.random.normal(kb, (r, dim))
    return {"a": a, "b": b, "scale": jnp.asarray(lcfg.scaling(r, alpha), jnp.float32)}


class Lora(Method):
    """LoRA and rsLoRA (the scale says which), with DoRA as its variant: a ``magnitude`` leaf selects it, as PEFT's
    ``LoraVariant`` does. On a linear group it is the first method (it fuses with the base matmul); on an
    embedding group it adds s · A[ids] @ B after the lookup (PEFT's ``lora_embedding``)."""

    name = "lora"
    trained = frozenset({"a", "b", "magnitude"})

    def axes(self, base):
        if "kernel" in base:
            *lead, fan_in, fan_out = base["kernel"]
            lead = tuple(lead)
            return {"a": (*lead, fan_in, "lora_rank"), "b": (*lead, "lora_rank", fan_out), "scale": lead,
                    "dropout": lead, "mask": (*lead, "lora_rank"), "magnitude": (*lead, fan_out)}
        if "embedding" in base:
            vocab, width = base["embedding"]
            return {"a": (vocab, "lora_rank"), "b": ("lora_rank", width), "scale": ()}
        return {}  # a group the model declares nothing for: parallel names the leaf and the fix

    def linear(self, p, group, x, rng, inner):
        a, b, scale = (t.astype(x.dtype) for t in masked(p))
        dropout = p.get("dropout")
        if "magnitude" in p:
            if inner is not None:
                raise ConfigError("DoRA normalizes the base kernel's columns, so no method may come before it")
            magnitude = p["magnitude"]
            if "mask" in p:  # a layer without adapter keeps its magnitude fixed (= ||W||): no gradient
                magnitude = jnp.where(jnp.any(p["mask"] > 0), magnitude, jax.lax.stop_gradient(magnitude))
            return with_bias(group, dora_linear(x, group["kernel"], a, b, scale, magnitude, dropout, rng))
        if inner is None:
            return with_bias(group, lora_linear(x, group["kernel"], a, b, scale, dropout, rng))
        return inner(x) + lora_delta(x, a, b, scale, dropout, rng)

    def embed(self, p, ids, x):
        dtype = x.dtype
        return x + jnp.einsum("...r,rd->...d", p["a"][ids].astype(dtype), p["b"].astype(dtype)) * p["scale"].astype(
            dtype)

    def merge(self, p, group):
        if "embedding" in group:
            return {**group, "embedding": group["embedding"] + (p["a"] @ p["b"]) * p["scale"]}
        w = group["kernel"]
        lora = masked(p)
        a, b, s = lora
        merged = w + jnp.einsum("...ir,...ro->...io", a, b) * s[..., None, None]
        if "magnitude" in p:
            ratio = p["magnitude"] / dora_norm(w, lora)
            merged = jnp.where(_layers_on(p)[..., None, None], merged * ratio[..., None, :], w)
        return {**group, "kernel": merged}

    def unmerge(self, p, group):
        if "magnitude" in p:
            raise ConfigError("cannot unmerge DoRA: the merged weight no longer holds ||W + s·A·B||; keep the "
                              "unmerged params (merge returns a new tree) instead")
        if "embedding" in group:
            return {**group, "embedding": group["embedding"] - (p["a"] @ p["b"]) * p["scale"]}
        a, b, s = masked(p)
        return {**group, "kernel": group["kernel"] - jnp.einsum("...ir,...ro->...io", a, b) * s[..., None, None]}

    def peft_tensors(self, p, group, stacked):
        """``lora_A.weight`` [r, in], ``lora_B.weight`` [out, r] (real ranks only) and DoRA's
        ``lora_magnitude_vector`` per layer; ``lora_embedding_A`` [r, vocab] / ``lora_embedding_B`` [dim, r]."""
        if "embedding" in group:
            return [PeftTensor("lora_embedding_A", "a", None, True), PeftTensor("lora_embedding_B", "b", None, True)]
        out = []
        for layer, r in zip(range(p["a"].shape[0]) if stacked else [None], _ranks(p)):
            if r:
                out += [PeftTensor("lora_A.weight", "a", layer, True, r, rank_axis=1),
                        PeftTensor("lora_B.weight", "b", layer, True, r, rank_axis=0)]
            if r and "magnitude" in p:
                out.append(PeftTensor("lora_magnitude_vector", "magnitude", layer))
        return out

    def count(self, p):
        """Without rank padding, as PEFT's ``get_nb_trainable_parameters`` counts."""
        a, b = p["a"], p["b"]
        lead = int(np.prod(a.shape[:-2]))
        active = int(jnp.sum(p["mask"])) if "mask" in p else a.shape[-1] * lead
        total = active * (a.shape[-2] + b.shape[-1])
        if "magnitude" in p:
            total += int(jnp.sum(_layers_on(p))) * p["magnitude"].shape[-1]
        return total


class TrainableTokens(Method):
    """PEFT's TrainableTokens: the listed embedding rows, copied, replace the frozen ones and are trained."""

    name = "trainable_tokens"
    trained = frozenset({"rows"})

    def axes(self, base):
        if "embedding" not in base:
            return {}
        _, width = base["embedding"]
        return {"rows": ("trainable_tokens", width), "ids": ("trainable_tokens",)}

    def table(self, p, table):
        return table.at[p["ids"]].set(p["rows"].astype(table.dtype))

    def merge(self, p, group):
        return {**group, "embedding": self.table(p, group["embedding"])}

    def unmerge(self, p, group):
        """The table keeps the trained rows: re-attached, they overwrite the same rows, so the forward is the same."""
        return group

    def peft_tensors(self, p, group, stacked):
        return [PeftTensor("token_adapter.trainable_tokens_delta", "rows", None)]


register(TrainableTokens())  # before LoRA: on an embedding its rows are written before LoRA's lookup adds to them
register(Lora())


def _ranks(p: dict) -> list[int]:
    """Each layer's real rank of a linear group's ``lora`` namespace (0: no adapter in that layer)."""
    a = p["a"]
    if "mask" in p:
        return [int(x) for x in np.asarray(p["mask"]).sum(-1).reshape(-1)]
    return [a.shape[-1]] * (a.shape[0] if a.ndim == 3 else 1)


def _layers_on(p: dict) -> jnp.ndarray:
    if "mask" in p:
        return jnp.any(p["mask"] > 0, axis=-1)
    return jnp.ones(p["scale"].shape, bool)


def group_at(tree: dict, path):
    """The leaf group at ``path`` (a tuple of keys) of a param tree."""
    for k in path:
        tree = tree[k]
    return tree


def fresh_group(params: dict, path, name: str, what: str) -> dict:
    """The leaf group at ``path``, refused when it already holds method ``name``'s namespace (``what`` names its
    leaves in the message): a second copy would be trained beside the first, not instead of it."""
    group = group_at(params, path)
    if name in group:
        raise ConfigError(f"{'/'.join(path)} already has {what}; merge them (jaxft.merge) before adding new ones")
    return group


def _saved_groups(cfg: ModelConfig, lcfg: LoraConfig) -> list[tuple[str, ...]]:
    """Groups named by ``modules_to_save`` (PEFT: module names ending with an entry), whole stacks only."""
    if not lcfg.modules_to_save:
        return []
    hits: dict[tuple[str, ...], set] = {}
    for m in modules(cfg):
        if any(m.key.endswith(entry) for entry in lcfg.modules_to_save):
            hits.setdefault(m.group, set()).add(m.layer)
    for group, layers in hits.items():
        if None not in layers and len(layers) != cfg.num_hidden_layers:
            raise ConfigError(f"modules_to_save {list(lcfg.modules_to_save)} selects {'/'.join(group)} in layers "
                              f"{sorted(layers)} only; layers are stacked, so select it in every layer or none")
    head_modules = TASK_HEAD_MODULES.get(lcfg.task_type, ())
    if head_modules and (cfg.head is None or cfg.head.group not in head_modules):
        raise ConfigError(f"lora.task_type {lcfg.task_type!r} trains the task head {' or '.join(head_modules)}, but "
                          f"this model has {'no task head (a causal LM)' if cfg.head is None else cfg.head.group}: "
                          f"load the base with its head (jaxft.from_pretrained(folder, head=HeadConfig(...)))")
    unknown = [e for e in lcfg.modules_to_save
               if e not in head_modules and not any(m.key.endswith(e) for m in modules(cfg))]
    if unknown:
        raise ConfigError(f"modules_to_save {unknown} match no module of this {cfg.model_type} model")
    return list(hits)


def add(cfg: ModelConfig, params: dict, lcfg: LoraConfig, rng: jax.Array) -> dict:
    """A new tree with adapters added per ``lcfg``; the base leaves are shared, not copied or changed. What trains
    besides the adapters (``modules_to_save``, ``bias``) is :func:`trainable`'s answer, kept beside the tree."""
    params = jax.tree.map(lambda x: x, params, is_leaf=lambda x: isinstance(x, nf4.QuantizedTensor))
    if any(name in (Lora.name, TrainableTokens.name) for path in leaf_paths(params) for name in path.split("/")):
        raise ConfigError("these params already have adapters; merge them (jaxft.merge) before adding new ones")
    groups = plan(cfg, lcfg)
    for path, rng_group in zip(groups, jax.random.split(rng, len(groups))):
        g, group = groups[path], group_at(params, path)
        if g.kind == "embedding":
            group["lora"] = _embedding_adapters(rng_group, lcfg, g, *group["embedding"].shape)
            continue
        fan_in, fan_out = group["kernel"].shape[-2:]
        group["lora"] = _linear_adapters(rng_group, lcfg, group, g, fan_in, fan_out, stacked=path[0] == "layers")
        if lcfg.bias == "lora_only" and "bias" in group and 0 in g.ranks:
            raise ConfigError(f"bias='lora_only' with adapters on some layers of {path[-1]} only: stacked "
                              "biases are trained in every layer or none")
    prepare_saved_modules(cfg, params, lcfg)
    if lcfg.trainable_token_indices:
        params["embed_tokens"]["trainable_tokens"] = _trainable_rows(params["embed_tokens"],
                                                                      lcfg.trainable_token_indices)
    return params


def prepare_saved_modules(cfg: ModelConfig, params: dict, acfg):
    """Gets the groups of an adapter config's ``modules_to_save`` ready to train whole, in ``params`` (a copy):
    one side of tied embeddings is untied (:func:`_untied_head`); a quantized group is refused."""
    for path in _saved_groups(cfg, acfg):
        if path in (("lm_head",), ("embed_tokens",)) and cfg.tie_word_embeddings and "lm_head" not in params:
            params["lm_head"] = _untied_head(params["embed_tokens"])
        if any(isinstance(v, nf4.QuantizedTensor) for v in group_at(params, path).values()):
            raise ConfigError(f"modules_to_save: {'/'.join(path)} is quantized and cannot be trained fully")


def saved_leaves(cfg: ModelConfig, params: dict, acfg) -> set[str]:
    """The leaves of an adapter config's ``modules_to_save``'s groups (trained whole, saved with the adapter)."""
    return {"/".join(path + (leaf,)) for path in _saved_groups(cfg, acfg) for leaf in own_leaves(group_at(params, path))}


def bias_leaves(params: dict, with_method: str | None = None) -> set[str]:
    """Every bias leaf of the model's linear groups (``with_method``: of the groups holding that method's
    namespace only); a method's own "bias" leaf is the method's business. LoRA's ``bias`` and BitFit select here."""
    paths = set()
    for path in leaf_paths(params):
        *group, leaf = path.split("/")
        if leaf == "bias" and group[-1] not in REGISTRY and (with_method is None or with_method in group_at(params, group)):
            paths.add(path)
    return paths


def trainable(cfg: ModelConfig, params: dict, lcfg: LoraConfig) -> Trainable:
    """What trains in ``params`` (after :func:`add`) besides the adapters: the leaves of ``modules_to_save``'s
    groups, and biases per ``bias`` ("all": every bias; "lora_only": those of groups with an adapter)."""
    paths = saved_leaves(cfg, params, lcfg)
    if lcfg.bias != "none":
        paths |= bias_leaves(params, Lora.name if lcfg.bias == "lora_only" else None)
    return Trainable(frozenset(paths))


def _untied_head(embed_group: dict) -> dict:
    """PEFT's ModulesToSaveWrapper on one side of tied embeddings copies that module and trains the copy, so the
    other side keeps the original weight: with ``lm_head`` listed the head is a trained copy (saved as
    ``lm_head.weight``), with ``embed_tokens`` listed it is a frozen copy of the base table (not saved: loading
    rebuilds it from the base). Either way the head is untied from then on."""
    return {"kernel": jnp.array(embedding_table(embed_group).T)}


def _trainable_rows(group: dict, indices) -> dict:
    """The ``trainable_tokens`` namespace: copies of the listed rows and their ids."""
    vocab = group["embedding"].shape[0]
    bad = [i for i in indices if not 0 <= i < vocab]
    if bad or len(set(indices)) != len(indices):
        raise ConfigError(f"trainable_token_indices {list(indices)}: indices must be distinct and in [0, {vocab}); "
                          "resize the embeddings first (lora.resize_embeddings) for new tokens")
    ids = jnp.asarray(indices, jnp.int32)
    return {"rows": group["embedding"][ids], "ids": ids}


def resize_embeddings(cfg: ModelConfig, params: dict, vocab_size: int) -> tuple[ModelConfig, dict]:
    """Grow the vocabulary (new special tokens); new rows start at the mean of the old ones (for the input
    embedding and the untied output head), so existing tokens' logits and the new tokens' start are sane."""
    old = params["embed_tokens"]["embedding"]
    if vocab_size < old.shape[0]:
        raise ConfigError(f"resize_embeddings only grows the vocabulary ({old.shape[0]} -> {vocab_size} requested)")
    params = dict(params)

    def grow(table, axis):
        extra = jnp.repeat(jnp.mean(table.astype(jnp.float32), axis=axis, keepdims=True), vocab_size - old.shape[0],
                           axis=axis)
        return jnp.concatenate([table, extra.astype(table.dtype)], axis=axis)

    params["embed_tokens"] = {**params["embed_tokens"], "embedding": grow(old, 0)}
    if "lm_head" in params:
        params["lm_head"] = {**params["lm_head"], "kernel": grow(params["lm_head"]["kernel"], 1)}
    return cfg.replace(vocab_size=vocab_size), params


def structure_config(params: dict) -> ModelConfig:
    """The shape facts LoRA planning needs (layer count, vocab, tied head, task head), read off a param tree.

    Lets an adapter be attached to params without their ModelConfig; attention head counts are not needed
    because adapter shapes come from the kernels themselves. The family (``model_type``) is not in the shapes.
    """
    vocab, hidden = params["embed_tokens"]["embedding"].shape
    head = _task_head(params)
    return ModelConfig(vocab_size=vocab, hidden_size=hidden,
                       intermediate_size=params["layers"]["gate_proj"]["kernel"].shape[-1],
                       num_hidden_layers=params["layers"]["q_proj"]["kernel"].shape[0],
                       num_attention_heads=1, head=head, tie_word_embeddings="lm_head" not in params and head is None)


def _task_head(params: dict) -> HeadConfig | None:
    """The task head a param tree holds (``qa_outputs``; ``score`` with a bias: token classification, without:
    sequence classification), or None for a causal LM."""
    if "qa_outputs" in params:
        return HeadConfig("qa")
    if "score" not in params:
        return None
    num_labels = params["score"]["kernel"].shape[-1]
    return HeadConfig("token_cls" if "bias" in params["score"] else "seq_cls", num_labels=num_labels)
