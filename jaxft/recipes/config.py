"""One YAML file describes a whole run: :class:`RunConfig` and its loader with ``--set`` overrides."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from jaxft.config import (ABSENT, ATTENTION_IMPLEMENTATIONS, PATH_FIELD, REMAT_POLICIES, ConfigError, ModelConfig,
                          QuantConfig, from_dict, to_dict)
from jaxft.data.config import DataConfig
from jaxft.files import write_text_atomic
from jaxft.parallel import MeshConfig
from jaxft.peft.lora import LoraConfig
from jaxft.train.objectives import CausalLM
from jaxft.train.optim import OptimConfig

METHODS = ("lora", "qlora", "full")


@dataclass(frozen=True)
class TrainConfig:
    """Loop settings: length, accumulation, cadence of logging / eval / checkpoints, memory knobs."""

    steps: int = 100
    grad_accum: int = 1
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end (when there is eval data)
    eval_batches: int = 8
    save_every: int = 0  # 0: checkpoint only at the end
    keep_last: int = 3
    loss_chunk_size: int = 1024
    remat: str = "none"
    attention: str = "plain"  # "blockwise": memory linear in sequence length (cuDNN's fused kernel on GPU)
    tensorboard: bool = False
    max_skipped_steps: int = 25  # stop after this many updates in a row dropped for non-finite gradients

    def __post_init__(self):
        for name in ("steps", "grad_accum", "log_every", "eval_batches", "keep_last", "max_skipped_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "save_every", "loss_chunk_size"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"train.remat {self.remat!r} is unknown; expected one of {REMAT_POLICIES}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ConfigError(f"train.attention {self.attention!r} is unknown; expected one of "
                              f"{ATTENTION_IMPLEMENTATIONS}")

    def apply(self, model_cfg: ModelConfig) -> ModelConfig:
        """The model config with this run's memory knobs: the remat policy and the attention implementation."""
        return model_cfg.replace(remat=self.remat, attention=self.attention)


@dataclass(frozen=True)
class RunConfig:
    """A fine-tuning run: base model folder, method, adapters, quantization, optimizer, data, mesh, loop."""

    model: str = field(metadata=PATH_FIELD)
    output_dir: str = field(metadata=PATH_FIELD)
    data: DataConfig
    method: str = "lora"
    dtype: str = "float32"
    compute_dtype: str | None = None
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    quant: QuantConfig = field(default_factory=QuantConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval_data: DataConfig | None = None
    mesh: MeshConfig = field(default_factory=MeshConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"method {self.method!r} is unknown; expected one of {METHODS}")
        # The schedule ends where training ends: a total left out follows train.steps, a different one is refused.
        # 0 is how run folders written before this rule recorded "not set"; they still load and resume.
        if self.optim.total_steps in (None, 0):
            object.__setattr__(self, "optim", dataclasses.replace(self.optim, total_steps=self.train.steps))
        elif self.optim.total_steps != self.train.steps:
            raise ConfigError(f"optim.total_steps is {self.optim.total_steps} but train.steps is {self.train.steps}: "
                              "the learning-rate schedule would end at another step than training; leave "
                              "optim.total_steps out (it follows train.steps) or make the two equal")

    def replace(self, **changes) -> "RunConfig":
        if "train" in changes and "optim" not in changes and self.optim.total_steps == self.train.steps:
            changes["optim"] = dataclasses.replace(self.optim, total_steps=None)  # it keeps following train.steps
        return dataclasses.replace(self, **changes)

    def objective(self) -> CausalLM:
        """What this run trains: next-token cross-entropy (the sft task), chunked per train.loss_chunk_size."""
        return CausalLM(chunk_size=self.train.loss_chunk_size)


def lookup(tree: dict, dotted: str):
    """The value at ``lora.r`` in a nested dict, or ``ABSENT``."""
    for k in dotted.split("."):
        if not isinstance(tree, dict) or k not in tree:
            return ABSENT
        tree = tree[k]
    return tree


def _set(tree: dict, dotted: str, raw: str, source: str):
    if "=" in dotted:
        raise ConfigError(f"{source}: bad override {dotted!r}")
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: --set {dotted}: {k!r} is not a section")
    try:
        node[keys[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or e
        raise ConfigError(f"{source}: {dotted}={raw}: the value is not plain YAML ({problem}); quote strings, write "
                          "lists as [a, b]; tags such as !!python/... are refused") from None


def apply_overrides(tree: dict, overrides: list[str], source: str = "--set", origins: dict | None = None) -> dict:
    """``["lora.r=8", "optim.lr=1e-4"]`` applied to a nested dict; values are parsed as YAML scalars. ``origins``
    (when given) records each key's override and the value it replaced, so that errors blame ``--set lora.r=abc``
    rather than the file (:func:`jaxft.config.from_dict`)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{source}: {item!r} is not key=value (e.g. lora.r=8)")
        before = lookup(tree, key.strip())
        _set(tree, key.strip(), value, source)
        if origins is not None:
            origins[key.strip()] = (f"{source} {item}", before)
    return tree


def read_yaml(path: str | Path) -> dict:
    """``yaml.safe_load`` of a config file; syntax errors and unsafe tags name the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', None) or e} "
                          "(only plain YAML is accepted; tags such as !!python/... are refused)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections, got {type(data).__name__}")
    return data


def read_run_tree(path: str | Path, overrides: list[str] = (), origins: dict | None = None) -> dict:
    """A YAML run config as a dict with ``--set`` overrides applied. The sections the file leaves out are first
    filled in with the run's defaults, so that ``--set lora.r=8`` changes r alone: without that, the lora section
    would be built from LoraConfig's own defaults (alpha 8, q/v only) instead of the run's (alpha 32, all-linear)."""
    tree = read_yaml(path)
    for f in dataclasses.fields(RunConfig):
        if f.name not in tree and f.default_factory is not dataclasses.MISSING:
            tree[f.name] = to_dict(f.default_factory())
    return apply_overrides(tree, list(overrides), origins=origins)


def load_run_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config, apply ``--set`` overrides, and build the typed config; a bad value is blamed on
    the ``--set`` that gave it, or on the file."""
    origins = {}
    tree = read_run_tree(path, overrides, origins)
    return from_dict(RunConfig, tree, source=str(path), origins=origins)


def dump_run_config(cfg: RunConfig, path: str | Path):
    """The resolved config, saved next to the run's outputs (loads back with :func:`load_run_config`); written
    whole or not at all, since a resume compares against it.

    ``optim.total_steps`` is written as null: it always equals ``train.steps`` (``RunConfig`` refuses anything
    else), and a written number would make ``--set train.steps=N`` on the saved file a mismatch."""
    tree = to_dict(cfg)
    tree["optim"]["total_steps"] = None
    write_text_atomic(path, yaml.safe_dump(tree, sort_keys=False))


def covered(key: str, keys) -> bool:
    """Whether ``section.key`` is one of ``keys`` or lies under one of them (``mesh`` covers ``mesh.fsdp``)."""
    return any(key == k or key.startswith(k + ".") for k in keys)


def flat_keys(tree: dict, prefix: str = "") -> dict:
    """A nested config dict as ``{"section.key": value}``; an empty or ``None`` section stays one key."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flat_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(old: RunConfig, new: RunConfig) -> dict[str, list]:
    """``{"section.key": [old value, new value]}`` for every key whose value differs, in key order."""
    a, b = flat_keys(to_dict(old)), flat_keys(to_dict(new))
    return {k: [a.get(k), b.get(k)] for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}
