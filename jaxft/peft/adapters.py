"""Adapter configs: the methods that have a PEFT type, and the one table that names them by it.

An **adapter config** is a frozen dataclass with PEFT's config fields for one PEFT type (``LoraConfig``,
``IA3Config``, ...), registered here with :func:`register_config`, and:

    peft_type: ClassVar[str]            # PEFT's PeftType value ("LORA", "IA3", "LN_TUNING", ...)
    task_type: str = "CAUSAL_LM"        # PEFT's, checked by :func:`check_task_type`
    def add(self, cfg, params, rng) -> dict              # the tree with the method's namespaces added
    def trainable(self, cfg, params) -> Trainable        # whole leaves it trains besides its namespaces
    def peft_config(self, base_model_name_or_path) -> dict   # adapter_config.json as PEFT writes it
    @classmethod
    def from_peft(cls, d, source) -> config              # refuses what jaxft does not implement, ignores
                                                         # PEFT's bookkeeping fields
    # optional, for a method whose file holds computed tensors rather than its leaves (prompt-style methods: PEFT
    # saves the virtual tokens' embeddings or prefix, never their encoder): saved_tensors(cfg, params) -> {name:
    # array}, saved_shapes(cfg) -> {name: shape}, with_saved(cfg, params, tensors) -> params

A run's ``peft:`` entries are such configs (or jaxft-only ones without a PEFT type, such as BitFit or the task head
alone); ``jaxft.hf.peft_format`` writes and reads any adapter config's folder, picking the class by the folder's
``peft_type`` from :data:`ADAPTER_CONFIGS`. Each method module registers its config when it is imported, as it
registers its :class:`~jaxft.ops.registry.Method`.
"""
from __future__ import annotations

import dataclasses

from jaxft.config import ConfigError

TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")

ADAPTER_CONFIGS: dict[str, type] = {}  # PEFT's peft_type -> the adapter config class


def register_config(cls: type) -> type:
    """Make an adapter config class known by its ``peft_type`` (a class decorator; re-registering replaces it)."""
    peft_type = getattr(cls, "peft_type", None)
    if not isinstance(peft_type, str) or not peft_type:
        raise ConfigError(f"adapter config {cls.__name__} needs a peft_type (PEFT's PeftType value), got "
                          f"{peft_type!r}")
    ADAPTER_CONFIGS[peft_type] = cls
    return cls


def check_task_type(task_type: str, section: str):
    """PEFT's task types that jaxft's decoder-only models have; ``section`` names the config in the message."""
    if task_type not in TASK_TYPES:
        raise ConfigError(f"{section}.task_type {task_type!r} is unknown; PEFT's are {TASK_TYPES}")
    if task_type == "SEQ_2_SEQ_LM":
        raise ConfigError(f"{section}.task_type 'SEQ_2_SEQ_LM' needs an encoder-decoder model; jaxft models "
                          "decoder-only families (Llama, Mistral, Qwen2): use CAUSAL_LM")


def config_dict(acfg, base_model_name_or_path: str | None, **fixed) -> dict:
    """An adapter config's fields as adapter_config.json holds them (tuples as lists), with PEFT's bookkeeping
    (``peft_type``, the base, ``revision``) and ``fixed``: fields PEFT writes whose value jaxft does not vary."""
    d = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(acfg).items()}
    d.update(peft_type=acfg.peft_type, base_model_name_or_path=base_model_name_or_path, revision=None, **fixed)
    return d


def fields_from_peft(cls: type, d: dict, source: str, unsupported: dict) -> dict:
    """The keyword arguments of ``cls`` found in an adapter_config.json dict ``d``: a ``peft_type`` other than
    ``cls``'s, or a field of ``unsupported`` (name -> PEFT's default) set otherwise, is an error naming ``source``;
    PEFT's bookkeeping fields are dropped, and a null ``task_type`` is PEFT's default (CAUSAL_LM)."""
    if d.get("peft_type", cls.peft_type) != cls.peft_type:
        raise ConfigError(f"{source}: peft_type {d.get('peft_type')!r}, expected {cls.peft_type!r}")
    for key, default in unsupported.items():
        if d.get(key, default) not in (default, [], {}):
            raise ConfigError(f"{source}: {key}={d[key]!r} is not supported by jaxft")
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in d.items() if k in names}
    kwargs["task_type"] = kwargs.get("task_type") or "CAUSAL_LM"
    return kwargs


def is_adapter_config(method) -> bool:
    """A ``peft:`` entry with a PEFT type (its adapter exports in PEFT's format)."""
    return type(method) in ADAPTER_CONFIGS.values()
