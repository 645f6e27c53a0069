"""LoHa and LoKr (LyCORIS) as registered methods, with PEFT's ``LoHaConfig`` / ``LoKrConfig`` semantics.

Both add a weight change ΔW [out, in] (torch's layout) to a frozen linear kernel, scaled by alpha / r:

- LoHa: ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b), a Hadamard product of two rank-r products, so rank up to r².
- LoKr: ΔW = w1 ⊗ w2, a Kronecker product of a [out_l, in_m] and an [out_k, in_n] factor (out = out_l · out_k,
  in = in_m · in_n, PEFT's ``factorization``); either factor may itself be a rank-r product (w1_a @ w1_b when
  ``decompose_both`` and r is small against it, w2_a @ w2_b when r is small against w2). KronA is LoKr without
  any decomposition: ``decompose_both`` off and r at least half of w2's larger side give exactly that.

The namespace beside the kernel (``loha`` / ``lokr``) keeps the factors in PEFT's own layout, so they are written
and read without transposes under PEFT's tensor names (``hada_w1_a``, ``lokr_w2_b``, ...)::

    {"kernel": W [L, in, out], "bias"?,
     "loha": {"w1_a": [L, out, r], "w1_b": [L, r, in], "w2_a": [L, out, r], "w2_b": [L, r, in],  # trained
              "scale": [L],               # alpha_l / r_l; 0 in a layer left out (layers_to_transform)
              "rank"?: [L],               # each layer's real rank, only when a rank_pattern makes them differ
              "rank_dropout"?: [L], "module_dropout"?: [L]}}                                     # only when > 0

Layers are scanned, so all layers of a group have the same shapes: a ``rank_pattern`` that gives a module different
ranks in different layers pads the smaller ranks with zero columns of w*_a and zero rows of w*_b (the products are
unchanged, the padding gets no gradient, and PEFT's file holds each layer's real shapes). For LoKr the rank also
decides whether a factor is decomposed; layers whose ranks decide that differently cannot be stacked and are
refused. Dropout, as PEFT's, acts only in training
(an ``rng``): ``module_dropout`` skips the whole adapter of a module, ``rank_dropout`` zeroes output rows of ΔW.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.config import ConfigError, ModelConfig
from jaxft.ops import nf4
from jaxft.ops.linear import base_linear
from jaxft.ops.registry import REGISTRY, Method, PeftTensor, register
from jaxft.peft import lora
from jaxft.peft.adapters import check_task_type, config_dict, fields_from_peft, register_config
from jaxft.peft.tree import Trainable, leaf_paths


@dataclass(frozen=True)
class _LycorisFields:
    """PEFT's ``LycorisConfig`` fields that LoHa and LoKr share, validated. Lists are stored as tuples."""

    r: int = 8
    alpha: float = 8  # ΔW is scaled by alpha / r
    rank_dropout: float = 0.0  # training only: output rows of ΔW dropped
    module_dropout: float = 0.0  # training only: the whole adapter of a module skipped
    use_effective_conv2d: bool = False  # for convolutions only, which Llama-family models have none of
    target_modules: tuple[str, ...] | str | None = None  # None: PEFT's Llama default (q_proj, v_proj)
    exclude_modules: tuple[str, ...] | str | None = None
    init_weights: bool | str = True
    layers_to_transform: tuple[int, ...] | int | None = None
    layers_pattern: tuple[str, ...] | str | None = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    modules_to_save: tuple[str, ...] | None = None
    inference_mode: bool = False
    task_type: str = "CAUSAL_LM"

    method: ClassVar[str] = ""  # the registered method's namespace
    init_choices: ClassVar[tuple] = (True, False)

    def __post_init__(self):
        for name in ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
                     "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, (list, set, frozenset)):
                object.__setattr__(self, name, tuple(sorted(value) if isinstance(value, (set, frozenset)) else value))
        if isinstance(self.layers_to_transform, int):
            object.__setattr__(self, "layers_to_transform", (self.layers_to_transform,))
        self._validate()
        object.__setattr__(self, "modules_to_save", lora.with_task_head(self.modules_to_save, self.task_type))

    def _validate(self):
        key = self.method
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ConfigError(f"{key}.r must be a positive integer, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ConfigError(f"{key}.alpha must be > 0, got {self.alpha!r}")
        for name in ("rank_dropout", "module_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{key}.{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.init_weights not in self.init_choices:
            raise ConfigError(f"{key}.init_weights must be one of {self.init_choices}, got {self.init_weights!r}")
        if self.layers_pattern not in (None, "layers", ("layers",)):
            raise ConfigError(f"{key}.layers_pattern {self.layers_pattern!r}: Llama-family layers are 'layers'")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ConfigError(f"{key}.layers_to_transform needs target_modules as a list of names: with a string "
                              "(a regex or 'all-linear') PEFT's LyCORIS tuners ignore it (and LoRA refuses it)")
        check_task_type(self.task_type, key)
        for pattern, rank in self.rank_pattern.items():
            if not isinstance(rank, int) or rank <= 0:
                raise ConfigError(f"{key}.rank_pattern[{pattern!r}] must be a positive integer, got {rank!r}")

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def add(self, cfg: ModelConfig, params: dict, rng) -> dict:
        """The method step of a run (``recipes.skeleton.build_params``): :func:`add` with this config."""
        return add(cfg, params, self, rng)

    def trainable(self, cfg: ModelConfig, params: dict) -> Trainable:
        """The leaves of ``modules_to_save``'s groups, trained whole besides the method's own leaves (which the
        registry declares trained)."""
        return Trainable(frozenset(lora.saved_leaves(cfg, params, self)))

    def peft_config(self, base_model_name_or_path: str | None = None) -> dict:
        """adapter_config.json as PEFT writes it."""
        return config_dict(self, base_model_name_or_path)

    def untrained_entries(self, cfg: ModelConfig, params: dict) -> int:
        """Entries of this method's stacked factors that train nothing (the zeros of layers left out, rank padding),
        which PEFT's counts do not have; ``params`` may be abstract (shapes only, ``jax.eval_shape``)."""
        total = 0
        for path, g in plan(cfg, self).items():
            p = lora.group_at(params, path)[self.method]
            shapes = {leaf: p[leaf].shape for leaf in REGISTRY[self.method].trained & set(p)}
            total += sum(math.prod(shape) for shape in shapes.values()) - trained_entries(shapes, g.ranks)
        return total

    @classmethod
    def from_peft(cls, d: dict, source: str):
        """The fields jaxft models; what it refuses is refused by the config's own checks, naming ``source``;
        PEFT's bookkeeping fields are ignored."""
        kwargs = fields_from_peft(cls, d, source, {})
        try:
            return cls(**{k: v for k, v in kwargs.items() if v is not None or k == "target_modules"})
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None


@register_config
@dataclass(frozen=True)
class LohaConfig(_LycorisFields):
    """PEFT's ``LoHaConfig``: ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) · alpha / r. An adapter config
    (:mod:`jaxft.peft.adapters`)."""

    peft_type: ClassVar[str] = "LOHA"
    method: ClassVar[str] = "loha"


@register_config
@dataclass(frozen=True)
class LokrConfig(_LycorisFields):
    """PEFT's ``LoKrConfig``: ΔW = w1 ⊗ w2 · alpha / r, each factor whole or a rank-r product. An adapter config
    (:mod:`jaxft.peft.adapters`)."""

    peft_type: ClassVar[str] = "LOKR"

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False

    method: ClassVar[str] = "lokr"
    init_choices: ClassVar[tuple] = (True, False, "lycoris")

    def _validate(self):
        super()._validate()
        if not isinstance(self.decompose_factor, int) or (self.decompose_factor <= 0 and self.decompose_factor != -1):
            raise ConfigError(f"lokr.decompose_factor must be a positive integer or -1 (near the square root), got "
                              f"{self.decompose_factor!r}")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's (LyCORIS') split of ``dimension`` into m · n, m <= n: m = ``factor`` when it divides the dimension,
    else the divisor pair with the smallest sum whose smaller side stays <= ``factor`` (-1: no bound)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    bound = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > bound:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def _kaiming(key, shape) -> jnp.ndarray:
    """torch's ``kaiming_uniform_(a=sqrt(5))`` on a tensor of (torch) ``shape``: U(±1/sqrt(shape[1]))."""
    bound = 1 / math.sqrt(shape[1])
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def _init(key, shapes: dict[str, tuple], zeros: set[str]) -> dict:
    keys = jax.random.split(key, len(shapes))
    return {name: jnp.zeros(shape) if name in zeros else _kaiming(k, shape)
            for k, (name, shape) in zip(keys, shapes.items())}


def _loha_factors(key, acfg: LohaConfig, r: int, fan_in: int, fan_out: int) -> dict:
    """PEFT's LoHa init: all four uniform (kaiming), w2_b zero unless ``init_weights`` is False."""
    shapes = {"w1_a": (fan_out, r), "w1_b": (r, fan_in), "w2_a": (fan_out, r), "w2_b": (r, fan_in)}
    return _init(key, shapes, set() if acfg.init_weights is False else {"w2_b"})


def lokr_shapes(acfg: LokrConfig, r: int, fan_in: int, fan_out: int) -> dict[str, tuple]:
    """The factors PEFT's LoKr creates for a [out, in] linear: w1 whole or as w1_a @ w1_b, the same for w2."""
    in_m, in_n = factorization(fan_in, acfg.decompose_factor)
    out_l, out_k = factorization(fan_out, acfg.decompose_factor)
    shapes = {}
    if acfg.decompose_both and r < max(out_l, in_m) / 2:
        shapes.update(w1_a=(out_l, r), w1_b=(r, in_m))
    else:
        shapes.update(w1=(out_l, in_m))
    if r < max(out_k, in_n) / 2:
        shapes.update(w2_a=(out_k, r), w2_b=(r, in_n))
    else:
        shapes.update(w2=(out_k, in_n))
    return shapes


def _lokr_factors(key, acfg: LokrConfig, r: int, fan_in: int, fan_out: int) -> dict:
    """PEFT's LoKr init: w1 (or w1_a) zero and w2 uniform; "lycoris": w2 (or w2_b) zero instead; False: none."""
    shapes = lokr_shapes(acfg, r, fan_in, fan_out)
    if acfg.init_weights is False:
        zeros = set()
    elif acfg.init_weights == "lycoris":
        zeros = {"w2", "w2_b"}
    else:
        zeros = {"w1", "w1_a"}
    return _init(key, shapes, zeros)


def _check_group(path: tuple, g: lora.GroupPlan, acfg, group: dict):
    """A targeted group LoHa / LoKr can stack: a linear one, and for LoKr the same factors (whole or decomposed,
    which the rank decides) in every layer that has the adapter, so that only the ranks differ (zero padding)."""
    if g.kind != "linear":
        raise ConfigError(f"{acfg.method} adapts linear layers only (as PEFT's), but target_modules selects "
                          f"{'/'.join(path)} ({g.kind}); leave it out of target_modules")
    if acfg.method != "lokr":
        return
    fan_in, fan_out = group["kernel"].shape[-2:]
    structures: dict[tuple, list[int]] = {}
    for layer, r in enumerate(g.ranks):
        if r:
            structures.setdefault(tuple(lokr_shapes(acfg, r, fan_in, fan_out)), []).append(layer)
    if len(structures) > 1:
        kinds = "; ".join(f"layers {layers} ({', '.join(names)})" for names, layers in structures.items())
        raise ConfigError(f"lokr.rank_pattern gives {'/'.join(path)} ranks {sorted(set(r for r in g.ranks if r))} "
                          f"that make different factors in different layers: {kinds}; layers are stacked, so give "
                          "this module ranks that all decompose a factor or all keep it whole (PEFT decomposes a "
                          "factor when r < half its larger side)")


def _padded(factors: dict, r_max: int) -> dict:
    """Factors of a smaller rank padded to ``r_max`` with zeros: zero columns of w*_a [out, r] and zero rows of
    w*_b [r, in] leave w*_a @ w*_b unchanged, and get zero gradient (each meets the other's zeros)."""
    out = {}
    for name, x in factors.items():
        if name.endswith("_a"):
            x = jnp.pad(x, ((0, 0), (0, r_max - x.shape[1])))
        elif name.endswith("_b"):
            x = jnp.pad(x, ((0, r_max - x.shape[0]), (0, 0)))
        out[name] = x
    return out


def trained_entries(shapes: dict[str, tuple], ranks) -> int:
    """The entries a group's factors (``shapes``: leaf -> [..., rows, cols], padded) really train, given each layer's
    real rank (0: a layer left out, all zeros): PEFT's shapes in each layer, without the padding."""
    total = 0
    for r in ranks:
        if not r:
            continue
        for name, shape in shapes.items():
            rows, cols = shape[-2:]
            total += rows * r if name.endswith("_a") else r * cols if name.endswith("_b") else rows * cols
    return total


def plan(cfg: ModelConfig, acfg) -> dict[tuple[str, ...], lora.GroupPlan]:
    """Which groups get the method, with which rank and alpha in each layer: PEFT's targeting is the same for
    every tuner (target_modules, layers_to_transform, rank and alpha patterns), so LoRA's planning decides."""
    as_lora = lora.LoraConfig(r=acfg.r, lora_alpha=acfg.alpha, target_modules=acfg.target_modules,
                              exclude_modules=acfg.exclude_modules, modules_to_save=acfg.modules_to_save,
                              layers_to_transform=acfg.layers_to_transform, rank_pattern=acfg.rank_pattern,
                              alpha_pattern=acfg.alpha_pattern)
    return lora.plan(cfg, as_lora)


def _group_adapter(key, acfg, g: lora.GroupPlan, fan_in: int, fan_out: int) -> dict:
    """One group's namespace: every layer's factors (its own rank, zero-padded to the largest) stacked, zero (and
    scale 0) in layers left out; a ``rank`` leaf keeps each layer's real rank when they differ."""
    make = _loha_factors if acfg.method == "loha" else _lokr_factors
    r_max = max(g.ranks)
    layers = [_padded(make(k, acfg, r or r_max, fan_in, fan_out), r_max)
              for k, r in zip(jax.random.split(key, len(g.ranks)), g.ranks)]
    out = {name: jnp.stack([f[name] if rank else jnp.zeros_like(f[name]) for f, rank in zip(layers, g.ranks)])
           for name in layers[0]}
    out["scale"] = jnp.asarray([alpha / rank if rank else 0.0 for rank, alpha in zip(g.ranks, g.alphas)], jnp.float32)
    if len({r for r in g.ranks if r}) > 1:
        out["rank"] = jnp.asarray(g.ranks, jnp.int32)
    n = len(g.ranks)
    if acfg.rank_dropout > 0:
        out["rank_dropout"] = jnp.full((n,), acfg.rank_dropout, jnp.float32)
        # LoHa always rescales the kept rows by their mean; LoKr only with rank_dropout_scale (PEFT's quirk)
        rescale = getattr(acfg, "rank_dropout_scale", True)
        out["rank_dropout_scale"] = jnp.full((n,), float(rescale), jnp.float32)
    if acfg.module_dropout > 0:
        out["module_dropout"] = jnp.full((n,), acfg.module_dropout, jnp.float32)
    return out


def add(cfg: ModelConfig, params: dict, acfg, rng: jax.Array) -> dict:
    """A new tree with ``acfg``'s method (LoHa or LoKr) beside every targeted linear kernel, and ``modules_to_save``'s
    groups ready to train whole (:func:`lora.prepare_saved_modules`); the base leaves are shared, not copied or
    changed."""
    params = jax.tree.map(lambda x: x, params, is_leaf=lambda x: isinstance(x, nf4.QuantizedTensor))
    if any(acfg.method in path.split("/") for path in leaf_paths(params)):
        raise ConfigError(f"these params already have {acfg.method} adapters; merge them (jaxft.merge) before "
                          "adding new ones")
    groups = plan(cfg, acfg)
    for path, key in zip(groups, jax.random.split(rng, len(groups))):
        group = lora.group_at(params, path)
        _check_group(path, groups[path], acfg, group)
        adapter = _group_adapter(key, acfg, groups[path], *group["kernel"].shape[-2:])
        group[acfg.method] = adapter if path[0] == "layers" else {k: v[0] for k, v in adapter.items()}
    lora.prepare_saved_modules(cfg, params, acfg)
    return params


def _torch_delta(method: str, p: dict) -> jnp.ndarray:
    """ΔW [..., out, in] in torch's layout, without the scale, in float32."""
    f = {k: v.astype(jnp.float32) for k, v in p.items()}
    if method == "loha":
        return (jnp.einsum("...or,...ri->...oi", f["w1_a"], f["w1_b"])
                * jnp.einsum("...or,...ri->...oi", f["w2_a"], f["w2_b"]))
    w1 = f["w1"] if "w1" in f else jnp.einsum("...ar,...rc->...ac", f["w1_a"], f["w1_b"])
    w2 = f["w2"] if "w2" in f else jnp.einsum("...br,...rd->...bd", f["w2_a"], f["w2_b"])
    kron = jnp.einsum("...ac,...bd->...abcd", w1, w2)
    return kron.reshape(*kron.shape[:-4], kron.shape[-4] * kron.shape[-3], kron.shape[-2] * kron.shape[-1])


def delta_kernel(method: str, p: dict) -> jnp.ndarray:
    """The method's change of the kernel in jaxft's layout [..., in, out], scale included, in float32."""
    return jnp.swapaxes(_torch_delta(method, p), -1, -2) * p["scale"][..., None, None]


def _output_mask(p: dict, rng, n_out: int, dtype):
    """PEFT's training-time dropouts as one factor on the delta's output [out] (None outside training):
    ``rank_dropout`` zeroes rows of ΔW (kept rows rescaled by the kept fraction when asked), ``module_dropout``
    skips the whole adapter."""
    if rng is None or ("rank_dropout" not in p and "module_dropout" not in p):
        return None
    rank_key, module_key = jax.random.split(rng)
    mask = jnp.ones((n_out,), jnp.float32)
    if "rank_dropout" in p:
        kept = (jax.random.uniform(rank_key, (n_out,)) > p["rank_dropout"]).astype(jnp.float32)
        mean = jnp.mean(kept)
        rescaled = jnp.where(mean > 0, kept / jnp.maximum(mean, 1e-12), 0.0)
        mask = jnp.where(p["rank_dropout_scale"] > 0, rescaled, kept)
    if "module_dropout" in p:
        mask = mask * (jax.random.uniform(module_key, ()) > p["module_dropout"]).astype(jnp.float32)
    return mask.astype(dtype)


class _Lycoris(Method):
    """What LoHa and LoKr share: an additive ΔW over whatever comes before them (``inner``), merged by addition."""

    frozen = frozenset({"scale", "rank", "rank_dropout", "rank_dropout_scale", "module_dropout"})
    tensor_prefix = ""  # PEFT's parameter names: <prefix><leaf>, e.g. hada_w1_a

    def _delta_out(self, p: dict, x: jnp.ndarray) -> jnp.ndarray:
        return jnp.einsum("...i,io->...o", x, delta_kernel(self.name, p).astype(x.dtype))

    def linear(self, p, group, x, rng, inner):
        y = base_linear(group, x) if inner is None else inner(x)
        delta = self._delta_out(p, x)
        mask = _output_mask(p, rng, delta.shape[-1], x.dtype)
        return y + (delta if mask is None else delta * mask)

    def merge(self, p, group):
        return {**group, "kernel": group["kernel"] + delta_kernel(self.name, p)}

    def unmerge(self, p, group):
        return {**group, "kernel": group["kernel"] - delta_kernel(self.name, p)}

    def peft_tensors(self, p, group, stacked):
        """PEFT's tensors of each layer that has the adapter, in PEFT's layout (no transpose), at the layer's real
        rank (the padding of w*_a's columns and w*_b's rows is not written)."""
        out = []
        for layer, r in zip(range(p["scale"].shape[0]) if stacked else [None], _ranks(p)):
            for leaf in sorted(self.trained & set(p)) if r else ():
                rank_axis = {"_a": 1, "_b": 0}.get(leaf[-2:]) if "rank" in p else None
                out.append(PeftTensor(self.tensor_prefix + leaf, leaf, layer, False,
                                      None if rank_axis is None else r, rank_axis))
        return out

    def count(self, p):
        """Only the layers that have the adapter (a layer left out holds zeros), at their real ranks."""
        return trained_entries({leaf: p[leaf].shape for leaf in self.trained & set(p)}, _ranks(p))


def _ranks(p: dict) -> list[int]:
    """Each layer's real rank of a LoHa / LoKr namespace (0: a layer left out), whole factors' rank axis when all
    layers share one (LoKr's whole factors have none: any non-zero number counts them)."""
    scale = np.atleast_1d(np.asarray(p["scale"]))
    if "rank" in p:
        return [int(r) for r in np.asarray(p["rank"])]
    rank_leaf = next((p[leaf] for leaf in ("w1_a", "w2_a") if leaf in p), None)
    r = 1 if rank_leaf is None else rank_leaf.shape[-1]
    return [r if live else 0 for live in scale != 0]


class Loha(_Lycoris):
    """LoHa: the Hadamard product of two low-rank products."""

    name = "loha"
    trained = frozenset({"w1_a", "w1_b", "w2_a", "w2_b"})
    tensor_prefix = "hada_"

    def axes(self, base):
        if "kernel" not in base:
            return {}
        *lead, fan_in, fan_out = base["kernel"]
        lead = tuple(lead)
        factors = {"w1_a": (*lead, fan_out, "lora_rank"), "w1_b": (*lead, "lora_rank", fan_in),
                   "w2_a": (*lead, fan_out, "lora_rank"), "w2_b": (*lead, "lora_rank", fan_in)}
        return {**factors, **{leaf: lead for leaf in self.frozen}}


class Lokr(_Lycoris):
    """LoKr: the Kronecker product of two factors, each whole or a low-rank product. Its forward never forms ΔW:
    x [.., in_m · in_n] @ (w1 ⊗ w2)ᵀ is two small contractions over x viewed as [.., in_m, in_n]."""

    name = "lokr"
    trained = frozenset({"w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b"})
    tensor_prefix = "lokr_"

    def axes(self, base):
        if "kernel" not in base:
            return {}
        lead = tuple(base["kernel"][:-2])
        factor, rank = "kron_factor", "lora_rank"
        factors = {"w1": (*lead, factor, factor), "w2": (*lead, factor, factor),
                   "w1_a": (*lead, factor, rank), "w1_b": (*lead, rank, factor),
                   "w2_a": (*lead, factor, rank), "w2_b": (*lead, rank, factor)}
        return {**factors, **{leaf: lead for leaf in self.frozen}}

    def _delta_out(self, p, x):
        f = {k: v.astype(x.dtype) for k, v in p.items() if k in self.trained}
        w1 = f["w1"] if "w1" in f else f["w1_a"] @ f["w1_b"]
        w2 = f["w2"] if "w2" in f else f["w2_a"] @ f["w2_b"]
        (out_l, in_m), (out_k, in_n) = w1.shape, w2.shape
        xs = x.reshape(*x.shape[:-1], in_m, in_n)
        y = jnp.einsum("...cd,ac,bd->...ab", xs, w1, w2)
        return y.reshape(*x.shape[:-1], out_l * out_k) * p["scale"].astype(x.dtype)


register(Loha())
register(Lokr())
