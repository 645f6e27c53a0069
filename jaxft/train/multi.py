"""K LoRA configurations trained together in one compiled step over one shared frozen (possibly NF4) base.

Each member's adapters are the tree ``lora.add`` gives for its own config; the K trees are padded to a common
shape and stacked on a leading ``member`` axis::

    trainable: {"layers": {"q_proj": {"lora": {"a": [K, L, in, R], "b": [K, L, R, out]}}, ...}}
    consts:    {"layers": {"q_proj": {"lora": {"scale": [K, L], "mask": [K, L, R], "dropout"?: [K, L]}}}}
    base:      the frozen weights, shared (no member axis)

R is the largest rank of a group over the members. A member of smaller rank gets zero-padded A/B and a rank mask,
which ``linear`` multiplies in, so the padding contributes nothing and gets exactly zero gradient: every member
trains exactly its own rank r with its own lora_scale (alpha/r, or alpha/sqrt(r) for rsLoRA).

The step maps the single-run :func:`jaxft.train.loop.train_step` over members (``jax.vmap``, or ``jax.lax.map`` over
groups of members), with the base and the batch closed over rather than mapped, so they are shared and each member
still gets its own loss, gradient norm, clipping, optimizer state and NaN guard.
Learning rates: the optimizer's schedule runs with a peak of 1 and each member's peak lr scales its updates,
held in its optimizer state by ``optax.inject_hyperparams``, so one update function serves every member.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from jaxft import parallel
from jaxft.config import ConfigError, ModelConfig
from jaxft.peft import lora
from jaxft.ops.registry import REGISTRY
from jaxft.peft.tree import combine, path_names, path_str, split
from jaxft.train import loop
from jaxft.train.optim import OptimConfig, make_optimizer


@dataclass(frozen=True)
class Member:
    """What may differ between the members of one program: the LoRA config, the peak learning rate, the seed
    (LoRA init and dropout). The base, targets, data, schedule shape and everything else are shared."""

    lora: lora.LoraConfig
    lr: float
    seed: int = 0


@dataclass
class Stack:
    """K members' adapters on a leading member axis, and what is needed to give each one back unpadded."""

    trainable: dict
    consts: dict
    base: dict
    own_frozen: list  # per member: base + its own (unpadded) constant adapter leaves
    own_shapes: list  # per member: its own trainable leaf shapes


def _is_member_const(path, _leaf) -> bool:
    """A method's leaf that is not trained but differs per member (LoRA's scale alpha/r, rank mask, dropout)."""
    *_, namespace, leaf = path_names(path)
    return namespace in REGISTRY and leaf not in REGISTRY[namespace].trained


def _lora_groups(tree: dict, path=()):
    """(path, namespace) of the ``lora`` namespace of every linear leaf group carrying LoRA."""
    for key, value in tree.items():
        if isinstance(value, dict):
            if "lora" in value and "kernel" in value:
                yield path + (key, "lora"), value["lora"]
            else:
                yield from _lora_groups(value, path + (key,))


def _pad_to(x, axis: int, size: int) -> np.ndarray:
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return np.pad(np.asarray(x), widths)


def _pad_group(group: dict, rank: int, with_mask: bool, with_dropout: bool) -> dict:
    """A group padded to ``rank`` with its own ranks masked; a member without dropout gets rate 0 (exact
    identity) when others have some, so that every member's tree has the same leaves."""
    out = dict(group)
    own_rank = group["a"].shape[-1]
    out["a"] = _pad_to(group["a"], -1, rank)
    out["b"] = _pad_to(group["b"], -2, rank)
    if with_mask:
        own_mask = group.get("mask", np.ones(group["scale"].shape + (own_rank,), np.float32))
        out["mask"] = _pad_to(own_mask, -1, rank)
    if with_dropout and "dropout" not in group:
        out["dropout"] = np.zeros(group["scale"].shape, np.float32)
    return out


def _set(tree: dict, path, value) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def _padded(trees: list[dict]) -> list[dict]:
    """The members' trees with every LoRA group padded to the members' largest rank of that group."""
    groups = [dict(_lora_groups(t)) for t in trees]
    for i, g in enumerate(groups[1:], 1):
        if g.keys() != groups[0].keys():
            raise ConfigError(f"member {i} puts LoRA on {sorted('/'.join(p[:-1]) for p in g)} but member 0 on "
                              f"{sorted('/'.join(p[:-1]) for p in groups[0])}; members must target the same modules")
    # New dicts (same leaves): groups are replaced in place below, and the callers' trees must stay unpadded.
    trees = [jax.tree.map(lambda x: x, t, is_leaf=lambda x: not isinstance(x, dict)) for t in trees]
    for path in groups[0]:
        member_groups = [g[path] for g in groups]
        ranks = [g["a"].shape[-1] for g in member_groups]
        with_mask = len(set(ranks)) > 1 or any("mask" in g for g in member_groups)
        with_dropout = any("dropout" in g for g in member_groups)
        for tree, group in zip(trees, member_groups):
            _set(tree, path, _pad_group(group, max(ranks), with_mask, with_dropout))
    return trees


def _check_same_layout(trees: list[dict], what: str) -> None:
    first = {path_str(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(trees[0])[0]}
    for i, tree in enumerate(trees[1:], 1):
        other = {path_str(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
        if other != first:
            diff = sorted(k for k in first.keys() | other.keys() if first.get(k) != other.get(k))
            raise ConfigError(f"member {i}'s {what} differ from member 0's at {diff[:3]} "
                              f"({[first.get(k) for k in diff[:3]]} vs {[other.get(k) for k in diff[:3]]}); "
                              "members may differ only in rank, alpha, dropout and lr (only linear-layer ranks are "
                              "padded), so give them the same target_modules and adapter options")


def stack(model_cfg: ModelConfig, base: dict, members: list[Member]) -> Stack:
    """Each member's adapters (``lora.add`` with its config and seed) padded and stacked over ``base``."""
    if not members:
        raise ConfigError("multi-adapter training needs at least one member")
    own = [lora.add(model_cfg, base, m.lora, jax.random.PRNGKey(m.seed)) for m in members]
    specs = [m.lora.trainable(model_cfg, p) for m, p in zip(members, own)]
    own_trainable, own_frozen = zip(*(split(p, spec) for p, spec in zip(own, specs)))
    own_shapes = [jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t) for t in own_trainable]
    trainable, frozen = zip(*(split(p, spec) for p, spec in zip(_padded(own), specs)))
    consts, bases = zip(*(split(f, _is_member_const) for f in frozen))
    _check_same_layout(list(trainable), "trainable adapters")
    _check_same_layout(list(consts), "adapter constants")
    # Padding and stacking run on the host (numpy): op by op on the device, every member's new shapes compiled
    # a handful of tiny programs, which took longer than the sweep's one compile of the step.
    stacked = partial(jax.tree.map, lambda *xs: jnp.asarray(np.stack([np.asarray(x) for x in xs])))
    return Stack(stacked(*trainable), stacked(*consts), bases[0], list(own_frozen), own_shapes)


def member_params(s: Stack, trainable: dict, k: int) -> dict:
    """Member ``k``'s params exactly as a single run of its config would hold them (own rank, no padding); its
    trainable leaves are host (numpy) copies."""
    def take(path, shape):
        stacked = trainable
        for key in path:
            stacked = stacked[key.key]
        return np.asarray(stacked)[k][tuple(slice(0, n) for n in shape.shape)]

    return combine(jax.tree_util.tree_map_with_path(take, s.own_shapes[k]), s.own_frozen[k])


def member_optimizer(ocfg: OptimConfig, peak_lr: float) -> optax.GradientTransformation:
    """``make_optimizer`` with the schedule's peak at 1, then scaled by ``peak_lr``, an injected hyperparameter:
    its value lives in the state, so the update of any member's optimizer is the same function."""
    unit = make_optimizer(dataclasses.replace(ocfg, lr=1.0))
    return optax.chain(unit, optax.inject_hyperparams(optax.scale)(step_size=peak_lr))


# Optimizers whose statistics span a whole leaf (Adafactor's block RMS and factoring, 8-bit Adam's quantization
# blocks): zero rank padding changes them, so a padded member would not train as its own run does.
WHOLE_LEAF_OPTIMIZERS = ("adafactor", "adam8bit")


def check_optimizer(members: list[Member], ocfg: OptimConfig) -> None:
    """ConfigError when members of different ranks would be padded under an optimizer that padding changes."""
    ranks = {(m.lora.r, tuple(sorted(m.lora.rank_pattern.items()))) for m in members}
    if len(ranks) > 1 and ocfg.name in WHOLE_LEAF_OPTIMIZERS:
        raise ConfigError(f"optim.name {ocfg.name!r} computes statistics over whole leaves, which padding members "
                          f"of different ranks ({sorted({m.lora.r for m in members})}) to one shape would change; "
                          "run members of one rank per parallel sweep, use adamw, sgd or lion, or run without "
                          "--parallel")


def init_states(s: Stack, members: list[Member], ocfg: OptimConfig, loss_scale: float | None = None) -> dict:
    """The members' train states (``loop.init_state`` each, with its own lr and seed), stacked."""
    check_optimizer(members, ocfg)
    states, host = [], jax.tree.map(np.asarray, s.trainable)
    for k, m in enumerate(members):
        trainable = jax.tree.map(lambda x: jnp.asarray(x[k]), host)
        states.append(loop.init_state(trainable, member_optimizer(ocfg, m.lr), m.seed, loss_scale))
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def train_step(cfg: ModelConfig, step_cfg: loop.StepConfig, optimizer, state: dict, consts: dict, base: dict,
               batches: dict, group: int | None = None, spmd_axis_name=None):
    """One update of every member on the same ``batches``; metrics come back per member ([K] arrays).

    ``group`` members are vmapped together at a time (``jax.lax.map`` over groups), all of them when None. All at
    once suits accelerators, where a small model's step is latency-bound; on a CPU the step is bound by memory
    traffic, and one member at a time keeps each op's working set at a single run's size (measured on 2 cores, 8
    members of the demo model: 0.29 s per step one at a time, 0.40 s all vmapped; README "Parallel sweeps").
    """
    def member(member_state, member_consts):
        return loop.train_step(cfg, step_cfg, optimizer, member_state, combine(member_consts, base), batches)

    if group is None:
        return jax.vmap(member, spmd_axis_name=spmd_axis_name)(state, consts)
    return jax.lax.map(lambda args: member(*args), (state, consts), batch_size=group)


def default_group() -> int | None:
    """Members vmapped together per :func:`train_step` on this backend: one on CPU, all elsewhere."""
    return 1 if jax.default_backend() == "cpu" else None


def per_member(fn, trainable: dict, consts: dict, base: dict):
    """``fn(params)`` for every member's params, vmapped: each output gets a leading member axis (evaluation)."""
    return jax.vmap(lambda t, c: fn(combine(t, combine(c, base))))(trainable, consts)


def jit_train_step(cfg: ModelConfig, step_cfg: loop.StepConfig, optimizer, mesh=None, state=None, consts=None,
                   base=None, rules=None, group: int | None = None):
    """:func:`train_step` under ``jax.jit`` with the state donated; ``optimizer`` is any member's
    (:func:`member_optimizer`). With a ``mesh`` every input and output gets a NamedSharding: a stacked leaf shards
    like one member's leaf, with the ``member`` rule's mesh axes prefixed for its leading axis (which needs all
    members vmapped at once: ``group`` is then ignored)."""
    if mesh is None:
        return jax.jit(partial(train_step, cfg, step_cfg, optimizer, group=group), donate_argnums=(0,))
    rules = rules or parallel.DEFAULT_RULES
    member_axes = _member_axes(mesh, rules, jax.tree.leaves(consts)[0].shape[0])
    # Inside the vmapped step the member dim is sharded over member_axes, so each member's activations may use only
    # the other mesh axes (a mesh axis can shard one dim of an array, and vmap adds the member dim to every one).
    activations = parallel.activation_sharding(mesh, rules)
    activations = NamedSharding(mesh, PartitionSpec(*(_without(e, member_axes) for e in activations.spec)))
    step_cfg = dataclasses.replace(step_cfg, activation_sharding=activations)
    fn = partial(train_step, cfg, step_cfg, optimizer, group=None if member_axes else group,
                 spmd_axis_name=member_axes or None)
    state_sh = _prefixed(parallel.state_shardings(_one_member(state), mesh, rules), member_axes)
    consts_sh = _prefixed(parallel.param_shardings(_one_member(consts), mesh, rules), member_axes)
    base_sh = parallel.param_shardings(base, mesh, rules)
    batch_sh = parallel.batch_sharding(mesh, 3, rules, accumulation_axis=True)
    metrics_sh = dict.fromkeys(loop.metric_names(state, step_cfg.objective),
                               NamedSharding(mesh, PartitionSpec(member_axes or None)))
    return jax.jit(fn, in_shardings=(state_sh, consts_sh, base_sh, batch_sh), out_shardings=(state_sh, metrics_sh),
                   donate_argnums=(0,))


def shard(tree: dict, mesh, rules=None) -> dict:
    """Place a stacked tree (trainable, consts or states) on ``mesh``, sharded as :func:`jit_train_step` expects."""
    rules = rules or parallel.DEFAULT_RULES
    member_axes = _member_axes(mesh, rules, jax.tree.leaves(tree)[0].shape[0])
    one = _one_member(tree)
    shardings = (parallel.state_shardings(one, mesh, rules) if "opt_state" in tree
                 else parallel.param_shardings(one, mesh, rules))
    return jax.device_put(tree, _prefixed(shardings, member_axes))


def _one_member(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), tree)


def _member_axes(mesh, rules, n_members: int) -> tuple[str, ...]:
    """Mesh axes of the member axis per the rules table; none when they don't divide the member count."""
    entry = parallel.logical_spec(("member",), (n_members,), mesh, rules)[0]
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def _prefixed(shardings, member_axes: tuple[str, ...]):
    """Each sharding with a leading member dim; mesh axes taken by the member dim are freed in the others."""
    def prefix(s: NamedSharding) -> NamedSharding:
        inner = [_without(entry, member_axes) for entry in s.spec]
        return NamedSharding(s.mesh, PartitionSpec(member_axes or None, *inner))

    return jax.tree.map(prefix, shardings, is_leaf=lambda x: isinstance(x, NamedSharding))


def _without(entry, axes: tuple[str, ...]):
    if entry is None or not axes:
        return entry
    kept = tuple(a for a in ((entry,) if isinstance(entry, str) else entry) if a not in axes)
    return (kept[0] if len(kept) == 1 else kept) if kept else None
