"""PEFT's adapter format: ``adapter_config.json`` + ``adapter_model.safetensors`` with PEFT's tensor names.

Names (torch layout): ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` [r, in],
``...lora_B.weight`` [out, r], ``...lora_magnitude_vector`` [out] (DoRA), ``base_model.model.model.embed_tokens.
lora_embedding_A`` [r, vocab] / ``lora_embedding_B`` [hidden, r], and fully trained modules
(``modules_to_save``, biases) under their module's name. Only real ranks are written, never rank padding.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.config import ConfigError, ModelConfig
from jaxft.files import atomic_dir
from jaxft.hf.config import read_json
from jaxft.hf.names import module_name
from jaxft.hf.safetensors_io import CheckpointError, SafetensorsFile, write_safetensors
from jaxft.ops.registry import REGISTRY
from jaxft.peft import lora
from jaxft.peft.tree import leaf_paths

PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


@dataclass(frozen=True)
class Entry:
    """One tensor of the adapter file and where it lives in the tree."""

    name: str
    path: tuple[str, ...]  # leaf path in the param tree
    layer: int | None  # index on the stacked axis
    rank: int | None  # real rank for LoRA's a / b (drops padding)
    transpose: bool


def _ranks(p: dict) -> list[int]:
    """Each layer's real rank of a ``lora`` namespace."""
    a = p["a"]
    if "mask" in p:
        return [int(x) for x in np.asarray(p["mask"]).sum(-1).reshape(-1)]
    return [a.shape[-1]] * (a.shape[0] if a.ndim == 3 else 1)


def _lora_entries(path: tuple, p: dict, stacked: bool) -> list[Entry]:
    """A linear group's ``lora`` namespace (``path`` is the group's): A, B and DoRA's magnitude, per layer."""
    out = []
    for layer, r in zip(range(p["a"].shape[0]) if stacked else [None], _ranks(p)):
        if r == 0:
            continue
        key = PREFIX + module_name(path, layer)
        out.append(Entry(f"{key}.lora_A.weight", path + ("lora", "a"), layer, r, True))
        out.append(Entry(f"{key}.lora_B.weight", path + ("lora", "b"), layer, r, True))
        if "magnitude" in p:
            out.append(Entry(f"{key}.lora_magnitude_vector", path + ("lora", "magnitude"), layer, None, False))
    return out


def _embedding_entries(path: tuple, group: dict) -> list[Entry]:
    out, key = [], PREFIX + module_name(path, None)
    if "trainable_tokens" in group:
        out.append(Entry(f"{key}.token_adapter.trainable_tokens_delta", path + ("trainable_tokens", "rows"), None,
                         None, False))
    if "lora" in group:
        out.append(Entry(f"{key}.lora_embedding_A", path + ("lora", "a"), None, None, True))
        out.append(Entry(f"{key}.lora_embedding_B", path + ("lora", "b"), None, None, True))
    return out


def entries(params: dict, lcfg: lora.LoraConfig) -> list[Entry]:
    """Every tensor the adapter file holds for this tree (with ``lcfg``'s adapters added): the adapters, then the
    leaves ``lcfg`` trains whole (``modules_to_save``, biases)."""
    _check_methods(params)
    out = []
    groups = [(("layers", k), v) for k, v in params["layers"].items()]
    groups += [((k,), v) for k, v in params.items() if k != "layers"]
    for path, group in groups:
        if "embedding" in group:
            out += _embedding_entries(path, group)
        elif "lora" in group:
            out += _lora_entries(path, group["lora"], stacked=path[0] == "layers")
    n_layers = params["layers"]["q_proj"]["kernel"].shape[0]
    for whole in sorted(lora.trainable(lora.structure_config(params), params, lcfg).paths):
        path = tuple(whole.split("/"))
        group = _get(params, path[:-1])
        leaf = "bias" if path[-1] == "bias" else "weight"
        if leaf == "bias" and "lora" in group:
            leaf = "base_layer.bias"  # PEFT's name for the bias of a LoRA-wrapped layer
        for layer in (range(n_layers) if path[0] == "layers" else [None]):
            out.append(Entry(f"{PREFIX}{module_name(path[:-1], layer)}.{leaf}", path, layer, None,
                             path[-1] == "kernel"))
    return out


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _is_lora(e: Entry) -> bool:
    return "lora" in e.path


def _extract(params: dict, e: Entry) -> np.ndarray:
    x = np.asarray(_get(params, e.path).astype(jnp.float32) if _is_lora(e) else _get(params, e.path))
    if e.layer is not None:
        x = x[e.layer]
    if e.rank is not None and e.path[-1] == "a":
        x = x[:, :e.rank]
    elif e.rank is not None and e.path[-1] == "b":
        x = x[:e.rank]
    return np.ascontiguousarray(x.T if e.transpose else x)


def adapter_tensors(params: dict, lcfg: lora.LoraConfig) -> dict[str, np.ndarray]:
    return {e.name: _extract(params, e) for e in entries(params, lcfg)}


def _check_methods(params: dict) -> None:
    """PEFT's LoRA format holds LoRA and trainable tokens; a tree carrying any other method has no file here."""
    found = {name for path in leaf_paths(params) for name in path.split("/") if name in REGISTRY}
    other = found - {"lora", "trainable_tokens"}
    if other:
        raise ConfigError(f"the params carry method(s) {sorted(other)}, which PEFT's LoRA adapter format cannot "
                          "hold; merge them (jaxft.merge) and save the full model instead")


def peft_config_dict(lcfg: lora.LoraConfig, base_model_name_or_path: str | None = None) -> dict:
    d = dataclasses.asdict(lcfg)
    for k in ("target_modules", "modules_to_save", "layers_to_transform", "trainable_token_indices"):
        if isinstance(d[k], tuple):
            d[k] = list(d[k])
    d.update(peft_type="LORA", base_model_name_or_path=base_model_name_or_path, fan_in_fan_out=False,
             layers_pattern=None, lora_bias=False, revision=None)
    return d


def save_adapter(params: dict, lcfg: lora.LoraConfig, out_dir, *, base_model_name_or_path: str | None = None,
                 overwrite: bool = False) -> Path:
    """Write a PEFT adapter folder (atomically; an existing folder needs ``overwrite``)."""
    tensors = adapter_tensors(params, lcfg)
    with atomic_dir(out_dir, overwrite) as tmp:
        write_adapter(tensors, lcfg, tmp, base_model_name_or_path)
    return Path(out_dir)


def write_adapter(tensors: dict, lcfg: lora.LoraConfig, folder: Path, base_model_name_or_path: str | None = None):
    """adapter_config.json + adapter_model.safetensors of :func:`adapter_tensors`' ``tensors`` into an existing
    ``folder`` (one that :func:`~jaxft.files.atomic_dir` publishes together with a tokenizer)."""
    (folder / CONFIG_FILE).write_text(json.dumps(peft_config_dict(lcfg, base_model_name_or_path), indent=2))
    write_safetensors(folder / WEIGHTS_FILE, tensors, {"format": "pt"})


def lora_config_from_peft(d: dict, source: str) -> lora.LoraConfig:
    """The fields jaxft models; features it doesn't implement are errors, PEFT bookkeeping fields are ignored."""
    if d.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"{source}: peft_type {d.get('peft_type')!r}: only LORA adapters load here")
    unsupported = {"fan_in_fan_out": False, "lora_bias": False, "layer_replication": None, "exclude_modules": None,
                   "target_parameters": None, "use_qalora": False}
    for key, default in unsupported.items():
        if d.get(key, default) not in (default, [], {}):
            raise ConfigError(f"{source}: {key}={d[key]!r} is not supported by jaxft")
    if d.get("layers_pattern") not in (None, "layers", ["layers"]):
        raise ConfigError(f"{source}: layers_pattern {d['layers_pattern']!r}: Llama-family layers are 'layers'")
    names = {f.name for f in dataclasses.fields(lora.LoraConfig)}
    kwargs = {k: v for k, v in d.items() if k in names}
    kwargs["task_type"] = kwargs.get("task_type") or "CAUSAL_LM"
    return lora.LoraConfig(**{k: v for k, v in kwargs.items() if v is not None or k == "target_modules"})


def _shape_problem(folder: Path, e: Entry, found: tuple, expected: tuple) -> str:
    """Which file is wrong: a rank that differs from adapter_config.json's r while the other dimension fits is the
    config's disagreement with the tensors (an adapter saved with an edited or mismatched config); any other
    difference is a tensor that does not fit this base model."""
    rank_axis = {"a": 0, "b": 1}.get(e.path[-1]) if e.rank else None  # PEFT: lora_A [r, in], lora_B [out, r]
    if (rank_axis is not None and len(found) == len(expected) == 2 and found[1 - rank_axis] == expected[1 - rank_axis]
            and found[rank_axis] != expected[rank_axis]):
        return (f"{folder / CONFIG_FILE} says r = {e.rank} for {e.name.rsplit('.', 2)[0]} (its r, or rank_pattern "
                f"for that module), but the tensor {e.name!r} in {WEIGHTS_FILE} has rank {found[rank_axis]}: the "
                f"config and the tensors disagree; set r (or that module's rank_pattern) to {found[rank_axis]} in "
                f"{CONFIG_FILE}, or export the adapter again")
    return (f"{folder / WEIGHTS_FILE}: tensor {e.name!r} has shape {list(found)}, but this base model needs "
            f"{list(expected)}: was the adapter trained on a different base?")


def load_adapter(path, base_params: dict, cfg: ModelConfig | None = None) -> dict:
    """``base_params`` with the adapter of a PEFT folder attached (values from the file, shapes checked)."""
    folder = Path(path)
    if not (folder / CONFIG_FILE).exists():
        raise CheckpointError(f"{folder}: no {CONFIG_FILE} (is this a PEFT adapter folder?)")
    lcfg = lora_config_from_peft(read_json(folder / CONFIG_FILE), str(folder / CONFIG_FILE))
    weights = folder / WEIGHTS_FILE
    if not weights.exists():
        found = sorted(p.name for p in folder.iterdir())
        raise CheckpointError(f"{folder}: no {WEIGHTS_FILE} (found {found}; pickle adapter files are never loaded)")
    st = SafetensorsFile(weights)
    params = lora.add(cfg or lora.structure_config(base_params), base_params, lcfg, jax.random.PRNGKey(0))
    wanted = entries(params, lcfg)
    missing = [e.name for e in wanted if e.name not in st.keys()]
    if missing:
        hint = " (a DoRA adapter file without magnitude vectors?)" if any("magnitude" in m for m in missing) else ""
        raise CheckpointError(f"{weights}: {len(missing)} tensor(s) missing{hint}, e.g. {missing[:3]}")
    updates: dict[tuple, list] = {}
    for e in wanted:
        value = np.asarray(st.get(e.name))
        expected = _extract(params, e).shape
        if value.shape != expected:
            raise CheckpointError(_shape_problem(folder, e, value.shape, expected))
        updates.setdefault(e.path, []).append((e, value.T if e.transpose else value))
    for path, items in updates.items():
        array = np.array(_get(params, path), dtype=np.float32 if "lora" in path else None)
        for e, value in items:
            target = array if e.layer is None else array[e.layer]
            if e.rank is not None and e.path[-1] == "a":
                target[:, :e.rank] = value
            elif e.rank is not None and e.path[-1] == "b":
                target[:e.rank] = value
            else:
                target[...] = value
        _get(params, path[:-1])[path[-1]] = jnp.asarray(array, _get(params, path).dtype)
    return params
