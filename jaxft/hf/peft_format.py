"""PEFT's adapter format: ``adapter_config.json`` + ``adapter_model.safetensors`` with PEFT's tensor names.

Each registered method names its own tensors (``Method.peft_tensors``), after the module's PEFT name: LoRA's are
(torch layout) ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` [r, in], ``...lora_B.weight``
[out, r], ``...lora_magnitude_vector`` [out] (DoRA), ``base_model.model.model.embed_tokens.lora_embedding_A``
[r, vocab] / ``lora_embedding_B`` [hidden, r]. Fully trained modules (``modules_to_save``, biases) are written
under their module's name. Only real ranks are written, never rank padding. A method without a PEFT format is
refused with the way out (merge it and save the full model). Every function takes any adapter config (``acfg``,
:mod:`jaxft.peft.adapters`); loading picks its class by the folder's ``peft_type``.

Module names are those of the model PEFT wraps, as PEFT writes them: a task head (``SEQ_CLS``, ``TOKEN_CLS``,
``QUESTION_ANS``) is ``base_model.model.score.weight`` / ``qa_outputs.weight``, the decoder of Llama's and Qwen2's
question-answering classes is ``base_model.model.transformer.layers...``, and a ``FEATURE_EXTRACTION`` adapter
wraps the bare decoder (``AutoModel``): ``base_model.model.layers...``. Loading reads any of these spellings.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.config import PEFT_TASK_TYPES, ConfigError, HeadConfig, ModelConfig, from_dict, to_dict
from jaxft.files import atomic_dir
from jaxft.hf.config import read_json
from jaxft.hf.names import BASE_PREFIX, canonical_name, module_name, saved_name
from jaxft.hf.safetensors_io import CheckpointError, SafetensorsFile, write_safetensors
from jaxft.ops.registry import methods_in
from jaxft.peft import lora
from jaxft.peft.adapters import ADAPTER_CONFIGS

PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
HEAD_FILE = "head_config.json"  # jaxft's: the task head's facts PEFT's files do not hold


@dataclass(frozen=True)
class Entry:
    """One tensor of the adapter file and where it lives in the tree."""

    name: str
    path: tuple[str, ...]  # leaf path in the param tree
    layer: int | None  # index on the stacked axis
    transpose: bool
    rank: int | None = None  # the real entries of rank_axis (LoRA's rank without padding)
    rank_axis: int | None = None

    def real(self, x: np.ndarray) -> tuple:
        """The index of the entries of ``x`` (the leaf's slice for ``layer``) that the file holds."""
        index = [slice(None)] * x.ndim
        if self.rank is not None:
            index[self.rank_axis] = slice(0, self.rank)
        return tuple(index)


def _peft_module(cfg: ModelConfig, acfg, group: tuple, layer: int | None) -> str:
    """A module's name in the adapter file: its name inside the model PEFT wraps, with PEFT's prefix."""
    name = saved_name(cfg, module_name(group, layer))
    if acfg.task_type != "FEATURE_EXTRACTION":
        return PREFIX + name
    if not name.startswith(BASE_PREFIX):
        raise ConfigError(f"a FEATURE_EXTRACTION adapter wraps the bare decoder (transformers' AutoModel), which has "
                          f"no {name}: leave it out of target_modules and modules_to_save")
    return PREFIX + name[len(BASE_PREFIX):]


def _canonical(name: str, acfg) -> str:
    """A tensor name of an adapter file in the spelling :func:`_peft_module` gives a Llama causal LM, whichever
    class the adapter was saved from (``transformer.`` of the QA classes, the bare decoder of FEATURE_EXTRACTION)."""
    name = name[len(PREFIX):] if name.startswith(PREFIX) else name
    if acfg.task_type == "FEATURE_EXTRACTION" and not name.startswith(BASE_PREFIX):
        name = BASE_PREFIX + name
    return PREFIX + canonical_name(name)


def _method_entries(cfg: ModelConfig, acfg, path: tuple, group: dict) -> list[Entry]:
    """The tensors every method in the group declares (``Method.peft_tensors``), under the module's PEFT name."""
    out = []
    for method in methods_in(group):
        for t in method.peft_tensors(group[method.name], group, stacked=path[0] == "layers"):
            out.append(Entry(f"{_peft_module(cfg, acfg, path, t.layer)}.{t.suffix}", path + (method.name, t.leaf),
                             t.layer, t.transpose, t.rank, t.rank_axis))
    return out


def entries(params: dict, acfg, cfg: ModelConfig | None = None) -> list[Entry]:
    """Every tensor the adapter file holds for this tree (with ``acfg``'s adapters added): the methods' tensors,
    then the leaves ``acfg`` trains whole (``modules_to_save``, biases). ``cfg`` names the modules as its
    transformers class does; without it they are named from the tree's shapes (as Llama's)."""
    cfg = cfg or lora.structure_config(params)
    out = []
    groups = [(("layers", k), v) for k, v in params["layers"].items()]
    groups += [((k,), v) for k, v in params.items() if k != "layers"]
    for path, group in groups:
        out += _method_entries(cfg, acfg, path, group)
    n_layers = params["layers"]["q_proj"]["kernel"].shape[0]
    for whole in sorted(acfg.trainable(lora.structure_config(params), params).paths):
        path = tuple(whole.split("/"))
        group = _get(params, path[:-1])
        leaf = "bias" if path[-1] == "bias" else "weight"
        if leaf == "bias" and methods_in(group):
            leaf = "base_layer.bias"  # PEFT's name for the bias of a layer its tuner wraps
        for layer in (range(n_layers) if path[0] == "layers" else [None]):
            out.append(Entry(f"{_peft_module(cfg, acfg, path[:-1], layer)}.{leaf}", path, layer,
                             path[-1] == "kernel"))
    return out


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _extract(params: dict, e: Entry) -> np.ndarray:
    x = np.asarray(_get(params, e.path))
    if e.layer is not None:
        x = x[e.layer]
    x = x[e.real(x)]
    return np.ascontiguousarray(x.T if e.transpose else x)


def adapter_tensors(params: dict, acfg, cfg: ModelConfig | None = None) -> dict[str, np.ndarray]:
    """The adapter file's tensors by name; ``cfg`` is needed for a question-answering head, whose decoder's name
    depends on the family (Llama, Qwen2: ``transformer.``; Mistral: ``model.``)."""
    if cfg is None and "qa_outputs" in params:
        raise ConfigError("saving an adapter of a question-answering model needs its ModelConfig (cfg=...): "
                          "transformers names the decoder of Llama's and Qwen2's QA class 'transformer', Mistral's "
                          "'model'")
    if hasattr(acfg, "saved_tensors"):  # a prompt-style adapter: whole tensors, no module's
        return {name: np.asarray(x) for name, x in
                acfg.saved_tensors(cfg or lora.structure_config(params), params).items()}
    return {e.name: _extract(params, e) for e in entries(params, acfg, cfg)}


def save_adapter(params: dict, acfg, out_dir, *, cfg: ModelConfig | None = None,
                 base_model_name_or_path: str | None = None, overwrite: bool = False) -> Path:
    """Write a PEFT adapter folder (atomically; an existing folder needs ``overwrite``). ``cfg``: the model's
    config, needed for a question-answering head (:func:`adapter_tensors`)."""
    tensors = adapter_tensors(params, acfg, cfg)
    with atomic_dir(out_dir, overwrite) as tmp:
        write_adapter(tensors, acfg, tmp, base_model_name_or_path, cfg)
    return Path(out_dir)


def write_adapter(tensors: dict, acfg, folder: Path, base_model_name_or_path: str | None = None,
                  cfg: ModelConfig | None = None):
    """adapter_config.json + adapter_model.safetensors of :func:`adapter_tensors`' ``tensors`` into an existing
    ``folder`` (one that :func:`~jaxft.files.atomic_dir` publishes together with a tokenizer), and the task head's
    facts PEFT's files do not hold (label names, problem type) in ``head_config.json`` (:func:`adapter_head`).
    A config whose default targets depend on the model family (IA3, LN-tuning: ``resolved``) is written with them
    resolved, as PEFT writes it, so the folder loads without knowing the family: that needs the model's ``cfg``
    (a param tree's shapes do not tell a Qwen2 from a Llama)."""
    if hasattr(acfg, "resolved"):
        if cfg is None and acfg.target_modules is None:
            raise ConfigError(f"a {acfg.peft_type} adapter without target_modules targets the model family's "
                              "defaults (PEFT's), which the folder must name; pass the model's config: "
                              "jaxft.save_adapter(params, acfg, out_dir, cfg=cfg), with the cfg jaxft.from_pretrained "
                              "returned, or give target_modules")
        acfg = acfg if cfg is None else acfg.resolved(cfg)
    (folder / CONFIG_FILE).write_text(json.dumps(acfg.peft_config(base_model_name_or_path), indent=2))
    write_safetensors(folder / WEIGHTS_FILE, tensors, {"format": "pt"})
    if cfg is not None and cfg.head is not None:
        (folder / HEAD_FILE).write_text(json.dumps(to_dict(cfg.head), indent=2))


def adapter_config_from_peft(d: dict, source: str):
    """The adapter config of an adapter_config.json dict ``d``, of the class its ``peft_type`` names (PEFT's default:
    LORA); ``source`` names the file in errors."""
    peft_type = d.get("peft_type") or "LORA"
    if peft_type not in ADAPTER_CONFIGS:
        raise CheckpointError(f"{source}: peft_type {peft_type!r} is not one jaxft loads; known: "
                              f"{sorted(ADAPTER_CONFIGS)}")
    return ADAPTER_CONFIGS[peft_type].from_peft(d, source)


def read_adapter_config(folder: Path):
    """The adapter config of a PEFT adapter folder."""
    return adapter_config_from_peft(read_json(folder / CONFIG_FILE), str(folder / CONFIG_FILE))


def _shape_problem(folder: Path, e: Entry, found: tuple, expected: tuple) -> str:
    """Which file is wrong: a rank that differs from adapter_config.json's r while the other dimension fits is the
    config's disagreement with the tensors (an adapter saved with an edited or mismatched config); any other
    difference is a tensor that does not fit this base model."""
    rank_axis = None if e.rank is None else (1 - e.rank_axis if e.transpose else e.rank_axis)  # in the file
    if (rank_axis is not None and len(found) == len(expected) == 2 and found[1 - rank_axis] == expected[1 - rank_axis]
            and found[rank_axis] != expected[rank_axis]):
        return (f"{folder / CONFIG_FILE} says r = {e.rank} for {e.name.rsplit('.', 2)[0]} (its r, or rank_pattern "
                f"for that module), but the tensor {e.name!r} in {WEIGHTS_FILE} has rank {found[rank_axis]}: the "
                f"config and the tensors disagree; set r (or that module's rank_pattern) to {found[rank_axis]} in "
                f"{CONFIG_FILE}, or export the adapter again")
    return (f"{folder / WEIGHTS_FILE}: tensor {e.name!r} has shape {list(found)}, but this base model needs "
            f"{list(expected)}: was the adapter trained on a different base?")


def adapter_head(path) -> HeadConfig | None:
    """The task head an adapter folder brings (PEFT's SEQ_CLS, TOKEN_CLS or QUESTION_ANS save it whole, under
    ``modules_to_save``): what to load the base with before attaching it. jaxft writes the head's facts beside the
    adapter (``head_config.json``: label names, problem type); an adapter PEFT saved has only the head's weights, so
    its size is read off them. None for an adapter of a causal LM or of features."""
    folder = Path(path)
    acfg = read_adapter_config(folder)
    kind = next((k for k, task_type in PEFT_TASK_TYPES.items() if task_type == acfg.task_type), None)
    if kind is None:
        return None
    if (folder / HEAD_FILE).is_file():
        head = from_dict(HeadConfig, read_json(folder / HEAD_FILE), source=str(folder / HEAD_FILE))
        if head.kind != kind:
            raise ConfigError(f"{folder / HEAD_FILE}: a {head.kind!r} head, but {CONFIG_FILE} says task_type "
                              f"{acfg.task_type} (a {kind!r} head)")
        return head
    group = HeadConfig(kind, 2).group
    weights = SafetensorsFile(folder / WEIGHTS_FILE)
    names = [n for n in weights.keys() if n.endswith(f".{group}.weight")]
    if not names:
        raise CheckpointError(f"{folder / WEIGHTS_FILE}: task_type {acfg.task_type} but no {group}.weight (the "
                              "head PEFT saves with such an adapter)")
    return HeadConfig(kind, weights.shape(names[0])[0])


def _load_saved(weights: Path, st: SafetensorsFile, acfg, cfg: ModelConfig, base_params: dict) -> dict:
    """``base_params`` with a prompt-style adapter (``acfg.saved_shapes`` names its whole tensors) from ``st``."""
    tensors = {}
    for name, expected in acfg.saved_shapes(cfg).items():
        if name not in st.keys():
            raise CheckpointError(f"{weights}: no tensor {name!r} (a {acfg.peft_type} adapter holds {name!r} "
                                  f"{list(expected)}); found {sorted(st.keys())[:5]}")
        tensors[name] = np.asarray(st.get(name))
        if tensors[name].shape != tuple(expected):
            raise CheckpointError(f"{weights}: {name} has shape {list(tensors[name].shape)}, this model's "
                                  f"{acfg.peft_type} adapter of {acfg.num_virtual_tokens} virtual tokens needs "
                                  f"{list(expected)}; was it trained on another model?")
    return acfg.with_saved(cfg, base_params, tensors)


def load_adapter(path, base_params: dict, cfg: ModelConfig | None = None) -> dict:
    """``base_params`` with the adapter of a PEFT folder attached (values from the file, shapes checked)."""
    folder = Path(path)
    if not (folder / CONFIG_FILE).exists():
        raise CheckpointError(f"{folder}: no {CONFIG_FILE} (is this a PEFT adapter folder?)")
    acfg = read_adapter_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.exists():
        found = sorted(p.name for p in folder.iterdir())
        raise CheckpointError(f"{folder}: no {WEIGHTS_FILE} (found {found}; pickle adapter files are never loaded)")
    st = SafetensorsFile(weights)
    if hasattr(acfg, "with_saved"):
        if cfg is None:  # the tree's shapes do not tell the attention heads its [P, L*2*KVH*hd] tensor splits into
            raise ConfigError(f"{folder}: a {acfg.peft_type} adapter's tensors are laid out by the model's attention "
                              "heads; pass the model's config: jaxft.load_adapter(path, params, cfg), with the cfg "
                              "jaxft.from_pretrained returned")
        return _load_saved(weights, st, acfg, cfg, base_params)
    params = acfg.add(cfg or lora.structure_config(base_params), base_params, jax.random.PRNGKey(0))
    wanted = entries(params, acfg, cfg)
    in_file = {_canonical(name, acfg): name for name in st.keys()}
    missing = [e.name for e in wanted if _canonical(e.name, acfg) not in in_file]
    if missing:
        hint = " (a DoRA adapter file without magnitude vectors?)" if any("magnitude" in m for m in missing) else ""
        raise CheckpointError(f"{weights}: {len(missing)} tensor(s) missing{hint}, e.g. {missing[:3]}")
    updates: dict[tuple, list] = {}
    for e in wanted:
        value = np.asarray(st.get(in_file[_canonical(e.name, acfg)]))
        expected = _extract(params, e).shape
        if value.shape != expected:
            raise CheckpointError(_shape_problem(folder, e, value.shape, expected))
        updates.setdefault(e.path, []).append((e, value.T if e.transpose else value))
    for path, items in updates.items():
        array = np.array(_get(params, path))
        for e, value in items:
            target = array if e.layer is None else array[e.layer]
            target[e.real(target)] = value
        _get(params, path[:-1])[path[-1]] = jnp.asarray(array)
    return params
