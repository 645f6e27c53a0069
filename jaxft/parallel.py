"""Meshes, logical axes and the one rules table that maps them onto mesh axes.

Every param dimension has a logical name (``embed``, ``mlp``, ``heads``, ``kv_heads``, ``vocab``, ``layer``,
``lora_rank``, …), declared where the param is created: the model declares its own leaves
(:data:`jaxft.models.llama.PARAM_AXES`), each method the leaves it adds, in terms of the group's model axes
(``Method.axes`` in :mod:`jaxft.ops.registry`), and an NF4 kernel how its children follow the kernel's axes (:func:`jaxft.ops.nf4.child_axes`).
:func:`logical_axes` assembles them; a leaf nobody declared is an error, never silently replicated.
:data:`DEFAULT_RULES` maps logical names to mesh axes
(``data``, ``fsdp``, ``tensor``). Changing parallelism means changing the rules or the mesh shape, never the model.
A dimension that a mesh axis does not divide is replicated along that axis instead (e.g. 2 KV heads on a
4-way tensor axis), so any mesh shape is valid for any model; XLA inserts the collectives.

A logical name may appear in the table more than once: later entries are fallbacks, tried only for dimensions that
the first pass over the leaf left unsharded, on mesh axes no other dimension of that leaf took. They keep FSDP
sharding small leaves whose only large dimension is a tensor-parallel one: a LoRA B matrix is [rank, heads], and
without the fallback a (1, 8, 1) mesh would replicate it on every device.

Why not flax's logical-axis rules (``flax.linen.partitioning.logical_to_mesh_axes``)? They map names without the
array's shape: a mesh axis that does not divide a dimension (2 KV heads on 4-way tensor) gives an invalid sharding
instead of replication, a size-1 mesh axis still claims its dimension (so the fallback above never fires: a LoRA B
on a (1, 8, 1) mesh stays on ``tensor``, i.e. replicated), and fallbacks go by rule order rather than dimension
order (checked with flax 0.12.8). :func:`_spec` keeps those three behaviours, so it stays.
"""
from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from jaxft.config import ConfigError
from jaxft.errors import JaxftError
from jaxft.models.llama import PARAM_AXES
from jaxft.ops import nf4
from jaxft.ops.registry import REGISTRY
from jaxft.peft.tree import NESTED_MODELS, path_names

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("layer", None),
    ("lora_rank", None),
    ("kron_factor", None),  # the sides of LoKr's Kronecker factors (small; replicated)
    ("norm", None),
    ("trainable_tokens", None),  # the embedding rows trained in full (LoRA's trainable_token_indices)
    ("member", None),  # the leading axis of K adapters trained together (jaxft sweep --parallel)
    ("mlp", "fsdp"),
    ("heads", "fsdp"),
    ("kv_heads", "fsdp"),
    ("vocab", "fsdp"),
)

class ParamAxesError(JaxftError, ValueError):
    """A param leaf whose logical axes nobody declared, or whose declaration does not fit its shape."""


@dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; one size may be -1 (= all remaining devices)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def shape(self, n_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        if sizes.count(-1) > 1:
            raise ConfigError(f"mesh: at most one axis may be -1, got data={self.data} fsdp={self.fsdp} "
                              f"tensor={self.tensor}")
        known = int(np.prod([s for s in sizes if s != -1]))
        if any(s == 0 or s < -1 for s in sizes) or n_devices % known:
            raise ConfigError(f"mesh data={self.data} fsdp={self.fsdp} tensor={self.tensor} does not fit "
                              f"{n_devices} devices")
        sizes = [n_devices // known if s == -1 else s for s in sizes]
        if int(np.prod(sizes)) != n_devices:
            raise ConfigError(f"mesh {tuple(sizes)} uses {int(np.prod(sizes))} devices, but there are {n_devices}")
        return tuple(sizes)


def make_mesh(cfg: MeshConfig = MeshConfig(), devices=None) -> jax.sharding.Mesh:
    """A (data, fsdp, tensor) mesh with explicit Auto axis types (the default differs across jax versions)."""
    devices = jax.devices() if devices is None else devices
    return jax.make_mesh(cfg.shape(len(devices)), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _declared_axes(keys: tuple[str, ...]) -> tuple[str | None, ...]:
    """The axes the model or a method declares for the leaf at ``keys`` (a nested model's, as the model's)."""
    if len(keys) > 1 and keys[0] in NESTED_MODELS:
        keys = keys[1:]
    group, leaf = keys[:-1], keys[-1]
    declared = PARAM_AXES.get(group, {})
    if group and group[-1] in REGISTRY:  # a method's namespace: it declares its leaves from the model's group
        declared = REGISTRY[group[-1]].axes(PARAM_AXES.get(group[:-1], {}))
    if leaf in declared:
        return declared[leaf]
    raise ParamAxesError(
        f"param {'/'.join(keys)}: no logical axes are declared for it, so it cannot be sharded on purpose; declare "
        "them where the leaf is created: in jaxft.models.llama.PARAM_AXES for a model param, or in the axes method "
        "of the registered method that adds it (jaxft.ops.registry.Method.axes)")


def _check_fits(keys: tuple[str, ...], axes: tuple, shape: tuple[int, ...]) -> None:
    if len(axes) != len(shape):
        raise ParamAxesError(f"param {'/'.join(keys)}: its declared logical axes {axes} name {len(axes)} dims, but "
                             f"it has shape {tuple(shape)}; fix the declaration (or the code that made the leaf) so "
                             "that there is one axis name per dim")


def _is_quantized(x) -> bool:
    return isinstance(x, nf4.QuantizedTensor)


def logical_axes(params: dict) -> dict:
    """The declared logical axes of every leaf of ``params`` (the model's tree or any part of it: a split half,
    one member's adapters, abstract shapes), as a tree of its structure: a tuple of axis names per array, and per
    quantized kernel a dict of them per child (:func:`jaxft.ops.nf4.child_axes`). Undeclared leaves and
    declarations of the wrong length raise :class:`ParamAxesError` naming the leaf."""
    def leaf(path, x):
        keys = path_names(path)
        axes = _declared_axes(keys)
        _check_fits(keys, axes, x.shape)
        if not _is_quantized(x):
            return axes
        children = nf4.child_axes(x, axes)
        for name, child in children.items():
            _check_fits(keys + (name,), child, getattr(x, name).shape)
        return children

    return jax.tree_util.tree_map_with_path(leaf, params, is_leaf=_is_quantized)


def rule_table(rules) -> dict[str, list]:
    """Logical name -> its mesh-axis targets in order of preference (first entry first, then fallbacks)."""
    table: dict[str, list] = {}
    for name, target in rules:
        table.setdefault(name, []).append(target)
    return table


def _spec(axes, shape, rules: dict, mesh) -> PartitionSpec:
    """PartitionSpec from logical axes: each dim takes its first rule's mesh axes if they divide it and no other
    dim of the leaf took them; dims left unsharded then try their fallback rules the same way; the rest replicate."""
    used, out = set(), [None] * len(axes)
    for preference in range(max((len(rules.get(name, ())) for name in axes), default=0)):
        for i, (name, size) in enumerate(zip(axes, shape)):
            choices = rules.get(name, ())
            if out[i] is not None or preference >= len(choices):
                continue
            target = choices[preference]
            targets = (target,) if isinstance(target, str) else tuple(target or ())
            targets = tuple(t for t in targets if t not in used and mesh.shape[t] > 1)
            if targets and size % int(np.prod([mesh.shape[t] for t in targets])) == 0:
                used.update(targets)
                out[i] = targets[0] if len(targets) == 1 else targets
    return PartitionSpec(*out)


def logical_spec(axes, shape, mesh, rules=DEFAULT_RULES) -> PartitionSpec:
    """The PartitionSpec the rules table gives an array of logical ``axes`` and ``shape`` on ``mesh``."""
    return _spec(axes, shape, rule_table(rules), mesh)


def param_shardings(params: dict, mesh, rules=DEFAULT_RULES) -> dict:
    """A tree of NamedShardings matching ``params`` (``None`` leaves stay ``None``), from the declared axes
    (:func:`logical_axes`); a quantized kernel gets one per child."""
    rules = rule_table(rules)

    def leaf(x, axes):
        if _is_quantized(x):
            return dataclasses.replace(x, **{
                name: NamedSharding(mesh, _spec(child, getattr(x, name).shape, rules, mesh))
                for name, child in axes.items()})
        return NamedSharding(mesh, _spec(axes, x.shape, rules, mesh))

    return jax.tree.map(leaf, params, logical_axes(params), is_leaf=_is_quantized)


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def state_shardings(state: dict, mesh, rules=DEFAULT_RULES) -> dict:
    """Shardings for a train state {step, trainable, opt_state, rng, (loss_scale, good_steps)}.

    Optimizer moments that mirror a param (same dict-key path suffix and shape, as optax's states do) shard
    like that param; anything else (step counts, quantized moments' blocks) is replicated. Optimizer state that
    lives in host memory (``OptimConfig.offload_state``) keeps its memory kind.
    """
    trainable = param_shardings(state["trainable"], mesh, rules)
    by_path = {path_names(p): (s, x.shape) for (p, s), x in zip(
        jax.tree_util.tree_flatten_with_path(trainable)[0], jax.tree.leaves(state["trainable"]))}

    def opt_leaf(path, x):
        keys = tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
        match = by_path.get(keys)
        sharding = match[0] if match is not None and match[1] == x.shape else replicated(mesh)
        kind = getattr(getattr(x, "sharding", None), "memory_kind", None)  # an array's, or a ShapeDtypeStruct's
        return sharding if kind in (None, "device") else sharding.with_memory_kind(kind)  # offloaded state stays

    scalars = {k: replicated(mesh) for k in state if k not in ("trainable", "opt_state")}
    return {**scalars, "trainable": trainable,
            "opt_state": jax.tree_util.tree_map_with_path(opt_leaf, state["opt_state"])}


def activation_sharding(mesh, rules=DEFAULT_RULES) -> NamedSharding:
    """Sharding of the [B, T, D] residual stream at layer boundaries: batch like the batch, the rest whole."""
    return batch_sharding(mesh, 3, rules)


def batch_sharding(mesh, ndim: int = 2, rules=DEFAULT_RULES, accumulation_axis: bool = False) -> NamedSharding:
    """Sharding of a [B, T, ...] batch (or [A, B, T, ...] with a leading micro-batch axis)."""
    batch = rule_table(rules)["batch"][0]
    spec = ((None,) if accumulation_axis else ()) + (batch,) + (None,) * (ndim - 1 - accumulation_axis)
    return NamedSharding(mesh, PartitionSpec(*spec))


def shard_params(params: dict, mesh, rules=DEFAULT_RULES) -> dict:
    """Place ``params`` on ``mesh`` per the rules table."""
    return jax.device_put(params, param_shardings(params, mesh, rules))


JAXFT_ENV = ("JAXFT_COORDINATOR", "JAXFT_NUM_PROCESSES", "JAXFT_PROCESS_ID")
# The variables jax's own cluster detection reads (jax/_src/clusters): SLURM's as SlurmCluster requires them,
# Open MPI's launcher URI, GKE TPU slices' host list and multislice TPU's slice count.
_SLURM_ENV = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """``jax.distributed.initialize`` from arguments, else from the JAXFT_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID
    environment, else with no arguments when :func:`cluster_environment` finds a multi-process cluster (jax then
    reads the cluster's own variables). Does nothing when none of these applies or when jax is initialized
    already; returns whether it initialized. Call it before anything touches the devices."""
    if jax.distributed.is_initialized():
        return False
    if coordinator_address is None and num_processes is None and process_id is None:
        settings = distributed_env()
        if settings is None:
            if cluster_environment() is None:
                return False
            settings = (None, None, None)
        coordinator_address, num_processes, process_id = settings
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    return True


def distributed_env() -> tuple[str, int, int] | None:
    """(coordinator, process count, process id) from the JAXFT_* variables, or ``None`` when none is set; a partial
    or malformed set is a ConfigError naming the variable."""
    env = {name: os.environ.get(name, "").strip() for name in JAXFT_ENV}
    if not any(env.values()):
        return None
    how = ("a multi-process run needs all three on every host: JAXFT_COORDINATOR=host:port of process 0 (the same "
           "on every host), JAXFT_NUM_PROCESSES=N and JAXFT_PROCESS_ID=0..N-1 (this process's own index); unset all "
           "three for a single-process run")
    for name, value in env.items():
        if not value:
            given = [f"{k}={v!r}" for k, v in env.items() if v]
            raise ConfigError(f"environment: {name} is not set, but {' and '.join(given)} "
                              f"{'is' if len(given) == 1 else 'are'}; {how}")
    host, _, port = env["JAXFT_COORDINATOR"].rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"environment: JAXFT_COORDINATOR={env['JAXFT_COORDINATOR']!r} is not host:port (e.g. "
                          f"10.0.0.1:8476); {how}")
    count, index = (_whole(name, env[name], how) for name in JAXFT_ENV[1:])
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"environment: JAXFT_PROCESS_ID={index} with JAXFT_NUM_PROCESSES={count}; the process "
                          f"count must be >= 1 and the id in 0..{count - 1}; {how}")
    return env["JAXFT_COORDINATOR"], count, index


def _whole(name: str, value: str, how: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment: {name}={value!r} is not a whole number; {how}") from None


def cluster_environment() -> str | None:
    """The multi-process cluster this process runs in, judged by the environment variables jax's own detection
    (``jax.distributed.initialize()`` with no arguments) reads: SLURM with more than one task, Open MPI with more
    than one rank, a TPU slice of several hosts (GKE's host list) or of several slices, or a Cloud TPU VM (libtpu
    installed and TPU chips attached: jax reads the slice's hosts from the VM's metadata server, one process on a
    single-host VM); ``None`` otherwise, so a single process elsewhere never starts the distributed runtime."""
    env = os.environ
    if all(k in env for k in _SLURM_ENV) and _count(env["SLURM_NTASKS"]) > 1:
        return "SLURM"
    if "OMPI_MCA_orte_hnp_uri" in env and _count(env.get("OMPI_COMM_WORLD_SIZE")) > 1:
        return "Open MPI"
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    if len([h for h in hosts.split(",") if h.strip()]) > 1 or _count(env.get("MEGASCALE_NUM_SLICES")) > 1:
        return "TPU slice"
    if importlib.util.find_spec("libtpu") is not None and (glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")):
        return "Cloud TPU VM"
    return None


def _count(value: str | None) -> int:
    """A process count from a launcher's variable; anything unreadable counts as one process."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return 1


def process_summary() -> str:
    """``process i/n, L local devices, G global devices (platform)``: what a multi-process run prints at start."""
    return (f"process {jax.process_index()}/{jax.process_count()}, {jax.local_device_count()} local devices, "
            f"{jax.device_count()} global devices ({jax.devices()[0].platform})")
