"""Hugging Face model folders (config.json + safetensors, sharded or not) <-> (ModelConfig, param tree).

Only safetensors are read: a folder holding only pickle files (``pytorch_model.bin``, ``*.pt``) is refused,
never unpickled. Saving writes a folder transformers loads unchanged, atomically, and never replaces an
existing folder unless asked to.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxft.config import ConfigError, HeadConfig, ModelConfig, QuantConfig
from jaxft.files import atomic_dir
from jaxft.hf.bnb import BNB_SUFFIXES, from_bnb
from jaxft.hf.config import config_from_hf, config_to_hf, read_json
from jaxft.hf.names import (EMBED_WEIGHT, LM_HEAD_WEIGHT, NORM_WEIGHT, canonical_name, layer_name, saved_name,
                            tensor_name)
from jaxft.hf.safetensors_io import CheckpointError, SafetensorsFile, write_safetensors
from jaxft.models.llama import (LAYER_NORMS, LINEAR_MODULES, axis_sizes, has_bias, init_params, linear_shapes,
                                param_axes)
from jaxft.ops import nf4

INDEX_FILE = "model.safetensors.index.json"
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class HFCheckpoint:
    """The tensors of a HF folder, across shards, by their canonical HF names (:mod:`jaxft.hf.names`: the decoder
    under ``model.``, whichever prefix the folder stores it under)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder}: not a directory")
        index = self.folder / INDEX_FILE
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no 'weight_map' object")
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
            weight_map = None
        if not files:
            pickles = sorted(p.name for pat in PICKLE_PATTERNS for p in self.folder.glob(pat))
            if pickles:
                raise CheckpointError(
                    f"{self.folder}: only pickle checkpoints found ({', '.join(pickles)}). jaxft never unpickles "
                    "(it can run arbitrary code); convert them to safetensors first, e.g. with transformers: "
                    "model.save_pretrained(out, safe_serialization=True)")
            raise CheckpointError(f"{self.folder}: no *.safetensors weights found")
        self.files = {}
        for name in files:
            if not (self.folder / name).exists():
                raise CheckpointError(f"{index}: lists shard {name!r}, which is missing from {self.folder}")
            self.files[name] = SafetensorsFile(self.folder / name)
        self.location, self.stored = {}, {}  # canonical name -> its file, and its name in that file
        for f in self.files.values():
            for stored in f.keys():
                name = canonical_name(stored)
                if self.stored.get(name, stored) != stored:
                    raise CheckpointError(f"{self.folder}: tensors {self.stored[name]!r} and {stored!r} are one "
                                          "tensor under transformers' two decoder prefixes; keep one of them")
                self.location[name], self.stored[name] = f, stored
        if weight_map is not None:
            absent = sorted(k for k in weight_map if canonical_name(k) not in self.location)
            if absent:
                raise CheckpointError(f"{index}: tensors {absent[:5]} are listed but not in their shard files")

    def keys(self) -> list[str]:
        return list(self.location)

    def __contains__(self, name: str) -> bool:
        return name in self.location

    def shape(self, name: str) -> tuple[int, ...]:
        return self.location[name].shape(self.stored[name])

    def get(self, name: str) -> np.ndarray:
        return self.location[name].get(self.stored[name])


def head_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The task head's leaves (``kernel`` [D, N], ``bias`` [N] when it has one) with their param-tree shapes."""
    sizes = axis_sizes(cfg)
    return {leaf: tuple(sizes[axis] for axis in axes) for leaf, axes in param_axes(cfg)[cfg.head.group].items()}


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name of this architecture with its torch-layout shape."""
    d = cfg.hidden_size
    out = {EMBED_WEIGHT: (cfg.vocab_size, d), NORM_WEIGHT: (d,)}
    if cfg.head is not None:  # a task head replaces the LM head
        out.update({tensor_name((cfg.head.group,), leaf): shape[::-1] for leaf, shape in head_shapes(cfg).items()})
    elif not cfg.tie_word_embeddings:
        out[LM_HEAD_WEIGHT] = (cfg.vocab_size, d)
    shapes = linear_shapes(cfg)
    for i in range(cfg.num_hidden_layers):
        for norm in LAYER_NORMS:
            out[layer_name(i, norm, "scale")] = (d,)
        for m in LINEAR_MODULES:
            fan_in, fan_out = shapes[m]
            out[layer_name(i, m, "kernel")] = (fan_out, fan_in)
            if has_bias(cfg, m):
                out[layer_name(i, m, "bias")] = (fan_out,)
    return out


def check_tensors(ckpt: HFCheckpoint, cfg: ModelConfig, prequantized: bool = False):
    """Missing, unexpected or mis-shaped tensors -> one error listing them.

    In a bitsandbytes 4-bit checkpoint a linear ``weight`` is packed bytes with its quantization state beside
    it; its logical shape is checked when the state is read.
    """
    expected = expected_tensors(cfg)
    if prequantized:
        packed = {layer_name(i, m, "kernel") for i in range(cfg.num_hidden_layers) for m in LINEAR_MODULES}
        expected.update({k + suffix: None for k in packed for suffix in BNB_SUFFIXES if k + suffix in ckpt})
        expected.update(dict.fromkeys(packed))
    missing = sorted(k for k in expected if k not in ckpt)
    if missing:
        raise CheckpointError(f"{ckpt.folder}: {len(missing)} tensor(s) missing from the checkpoint, e.g. "
                              f"{missing[:5]}")
    extra = sorted(k for k in ckpt.keys() if k not in expected and not k.endswith(IGNORED_SUFFIXES)
                   and not (cfg.tie_word_embeddings and k == LM_HEAD_WEIGHT))
    if extra:
        raise CheckpointError(f"{ckpt.folder}: unexpected tensor(s) for a {cfg.model_type} model: {extra[:5]}")
    for name, shape in expected.items():
        if shape is not None and ckpt.shape(name) != shape:
            raise CheckpointError(f"{ckpt.folder}: tensor {name!r} has shape {list(ckpt.shape(name))}, "
                                  f"expected {list(shape)} from config.json")


def cast_checked(array: np.ndarray, dtype, name: str, folder, whole=None) -> np.ndarray:
    """``array`` as ``dtype``; a finite value beyond ``dtype``'s range (it would become inf, e.g. a bf16 or f32
    weight above 65504 loaded as float16) is a CheckpointError naming the tensor and its largest magnitude.

    Only casts to a narrower range are checked, with one pass over the cast block's bits; values that were
    already inf/nan in the file are left as they are. When ``array`` is a block of a tensor, ``whole()`` reads the
    tensor, so that the error reports its largest value rather than the block's.
    """
    dtype = np.dtype(dtype)
    with np.errstate(over="ignore"):
        out = np.asarray(array, dtype)
    floats = jnp.issubdtype(dtype, jnp.floating) and jnp.issubdtype(array.dtype, jnp.floating)
    if not floats or ml_dtypes.finfo(dtype).max >= ml_dtypes.finfo(array.dtype).max or _all_finite(out):
        return out
    limit = float(ml_dtypes.finfo(dtype).max)
    if _largest_finite(array) <= limit:
        return out
    largest = _largest_finite(whole() if whole else array)
    raise CheckpointError(f"{folder}: tensor {name!r} holds values up to {largest:.6g} in magnitude, beyond "
                          f"{dtype.name}'s largest finite value {limit:.6g}: loaded as "
                          f"{dtype.name} they would become inf (and training would skip every step). Load it in "
                          "bfloat16 or float32 (run config: dtype: bfloat16; Python: dtype=\"bfloat16\")")


def _all_finite(x: np.ndarray) -> bool:
    """``np.isfinite(x).all()`` from the bits, 3x faster for float16 (a float is inf/nan when its exponent bits
    are all ones); 8-bit floats, whose encodings differ, take numpy's path."""
    uint = {2: np.uint16, 4: np.uint32, 8: np.uint64}.get(x.dtype.itemsize)
    if uint is None or x.size == 0:
        return bool(np.isfinite(x).all())
    info = ml_dtypes.finfo(x.dtype)
    exponent = ((1 << info.nexp) - 1) << info.nmant
    magnitude = np.ascontiguousarray(x).view(uint) & uint((1 << (8 * x.dtype.itemsize - 1)) - 1)
    return bool(magnitude.max() < exponent)


def _largest_finite(array: np.ndarray) -> float:
    source = np.asarray(array, np.float64)
    finite = source[np.isfinite(source)]
    return float(np.abs(finite).max()) if finite.size else 0.0


def _stacked(ckpt: HFCheckpoint, cfg: ModelConfig, module: str, leaf: str, dtype) -> np.ndarray:
    """One [L, ...] array filled layer by layer (kernels transposed to [in, out])."""
    first = ckpt.get(layer_name(0, module, leaf))
    shape = first.shape[::-1] if leaf == "kernel" else first.shape
    out = np.empty((cfg.num_hidden_layers, *shape), dtype)
    for i in range(cfg.num_hidden_layers):
        name = layer_name(i, module, leaf)
        t = cast_checked(ckpt.get(name), dtype, name, ckpt.folder)
        out[i] = t.T if leaf == "kernel" else t
    return out


def _quantized_stack(ckpt: HFCheckpoint, cfg: ModelConfig, module: str, quant: QuantConfig | None,
                     prequantized: bool) -> nf4.QuantizedTensor:
    """One stacked 4-bit kernel, built layer by layer so only one layer's float weight is ever in memory."""
    fan_in, fan_out = linear_shapes(cfg)[module]
    layers = []
    for i in range(cfg.num_hidden_layers):
        name = layer_name(i, module, "kernel")
        if prequantized:
            try:
                q = from_bnb({"weight" + k[len(name):]: np.asarray(ckpt.get(k))
                                  for k in [name] + [name + s for s in BNB_SUFFIXES] if k in ckpt})
            except ValueError as e:  # a quant state jaxft cannot read: name the file and tensor
                raise CheckpointError(f"{ckpt.folder}: quantized tensor {name!r}: {e}") from None
            if tuple(q.shape) != (fan_in, fan_out):
                raise CheckpointError(f"{ckpt.folder}: quantized tensor {name!r} has shape {list(q.shape[::-1])}, "
                                      f"expected {[fan_out, fan_in]} from config.json")
        else:
            q = nf4.quantize(jnp.asarray(ckpt.get(name)).T, blocksize=quant.blocksize,
                             double_quant=quant.double_quant, quant_type=quant.quant_type)
        layers.append(q)
    return nf4.stack(layers)


def _outer_groups(cfg: ModelConfig, read, new_head: dict | None) -> dict:
    """The groups outside the layer stack, each leaf from ``read(hf_name, transposed)``: embeddings, final norm and
    the output group: the LM head (unless tied), or the task head, read from the folder unless ``new_head`` is
    given (a head that a causal-LM folder does not hold)."""
    groups = {"embed_tokens": {"embedding": read(EMBED_WEIGHT, False)}, "norm": {"scale": read(NORM_WEIGHT, False)}}
    if cfg.head is not None:
        group = cfg.head.group
        groups[group] = new_head if new_head is not None else {
            leaf: read(tensor_name((group,), leaf), leaf == "kernel") for leaf in head_shapes(cfg)}
    elif not cfg.tie_word_embeddings:
        groups["lm_head"] = {"kernel": read(LM_HEAD_WEIGHT, True)}
    return groups


def load_params(ckpt: HFCheckpoint, cfg: ModelConfig, dtype, quant: QuantConfig | None = None,
                prequantized: bool = False, new_head: dict | None = None) -> dict:
    """The param tree; with ``quant`` (or a 4-bit checkpoint) linear kernels are 4-bit, the rest (a task head
    included) in ``dtype``. ``new_head``: the task head's group, when the folder holds none (a causal LM)."""
    dtype = jnp.dtype(dtype)
    layers = {norm: {"scale": jnp.asarray(_stacked(ckpt, cfg, norm, "scale", dtype))}
              for norm in LAYER_NORMS}
    for m in LINEAR_MODULES:
        if quant is not None or prequantized:
            layers[m] = {"kernel": _quantized_stack(ckpt, cfg, m, quant, prequantized)}
        else:
            layers[m] = {"kernel": jnp.asarray(_stacked(ckpt, cfg, m, "kernel", dtype))}
        if has_bias(cfg, m):
            layers[m]["bias"] = jnp.asarray(_stacked(ckpt, cfg, m, "bias", dtype))

    def whole(name: str, transposed: bool) -> jax.Array:
        t = jnp.asarray(cast_checked(ckpt.get(name), dtype, name, ckpt.folder))
        return t.T if transposed else t

    return {"layers": layers, **_outer_groups(cfg, whole, new_head)}


def _prequantized(hf: dict, source: str) -> bool:
    """True for a transformers-saved bitsandbytes 4-bit checkpoint; other quantization methods are errors."""
    qc = hf.get("quantization_config")
    if not qc:
        return False
    if qc.get("quant_method") == "bitsandbytes" and qc.get("load_in_4bit", qc.get("_load_in_4bit")):
        return True
    raise ConfigError(f"{source}: quantization_config {qc.get('quant_method')!r} "
                      f"(load_in_8bit={qc.get('load_in_8bit')}) is not supported; jaxft reads bitsandbytes 4-bit")


def open_checkpoint(path) -> tuple:
    """``(checkpoint, config.json dict, source)`` of a HF folder, or of a GGUF file (:mod:`jaxft.gguf.read`: its
    metadata stands for config.json, its tensors are dequantized as they are read)."""
    from jaxft.gguf.read import GgufCheckpoint, is_gguf

    if is_gguf(path):
        ckpt = GgufCheckpoint(path)
        return ckpt, ckpt.hf_config(), str(path)
    folder = Path(path)
    if not (folder / "config.json").exists():
        raise CheckpointError(f"{folder}: no config.json (is this a Hugging Face model folder, or a .gguf file?)")
    hf = read_json(folder / "config.json")
    return HFCheckpoint(folder), hf, str(folder / "config.json")


def from_pretrained(path, dtype="float32", compute_dtype: str | None = None,
                    quant: str | QuantConfig | None = None, mesh=None, rules=None, head: HeadConfig | None = None,
                    head_seed: int = 0) -> tuple[ModelConfig, dict]:
    """Load a HF folder, or a GGUF file (``*.gguf``, :mod:`jaxft.gguf.read`): ``(ModelConfig, params)`` with params
    in ``dtype`` (compute dtype defaults to it).

    A folder of a task-head class (``*ForSequenceClassification`` etc., by config.json's ``architectures``) loads
    its head (``ModelConfig.head``; ``head=`` must agree with it). A causal-LM folder with ``head=`` loads the
    decoder without ``lm_head`` and a new head as :func:`jaxft.init_params` makes it from
    ``jax.random.PRNGKey(head_seed)``, as transformers does when ``AutoModelForSequenceClassification`` loads it.

    ``quant="nf4"`` (or a :class:`QuantConfig`) stores every linear kernel in bitsandbytes' 4-bit format while
    loading, one layer at a time; embeddings, norms and ``lm_head`` (or the task head) stay in ``dtype``, as
    transformers does. A bitsandbytes 4-bit checkpoint saved by transformers loads with its quantized weights as
    they are.

    With a ``mesh`` the params come back sharded per ``rules`` (default: ``jaxft.parallel.DEFAULT_RULES``), and
    each array is built from the file slices its devices hold (:func:`load_sharded_params`), so no process reads
    the whole model. 4-bit params are the exception: they are loaded (and quantized) whole on every process, then
    placed on the mesh, and so are a GGUF file's, which are dequantized whole tensor by tensor.
    """
    ckpt, hf, source = open_checkpoint(path)
    folder_cfg = config_from_hf(hf, source=source, dtype=compute_dtype or str(jnp.dtype(dtype)))
    cfg = folder_cfg.with_head(head, source)
    prequantized = _prequantized(hf, source)
    if isinstance(quant, str):
        quant = QuantConfig(quant_type=quant)
    check_tensors(ckpt, folder_cfg, prequantized)
    new_head = None
    if folder_cfg.head is None and cfg.head is not None:  # transformers' new head on a causal LM: same init
        new_head = init_params(cfg, jax.random.PRNGKey(head_seed), dtype, groups=(cfg.head.group,))[cfg.head.group]
    if mesh is not None and quant is None and not prequantized and isinstance(ckpt, HFCheckpoint):
        return cfg, load_sharded_params(ckpt, cfg, dtype, mesh, rules, new_head)
    params = load_params(ckpt, cfg, dtype, None if prequantized else quant, prequantized, new_head)
    if mesh is not None:
        from jaxft import parallel

        params = parallel.shard_params(params, mesh, rules or parallel.DEFAULT_RULES)
    return cfg, params


def _read_block(f: SafetensorsFile, name: str, index: tuple[slice, ...]) -> np.ndarray:
    """``f.get(name)[index]`` reading only those bytes: one run for a row range of whole rows, else one short run
    per row for a column range of a 2-d tensor. ``index`` holds unit-step slices, one per dimension (what
    ``jax.make_array_from_callback`` passes).

    Positioned reads (``os.pread``) rather than buffered ones, which would pull a whole buffer from the file for
    each short run.
    """
    shape, dtype = f.shape(name), f.dtype(name)
    if not shape:
        return f.get(name)
    r0, r1, _ = index[0].indices(shape[0])
    row = int(np.prod(shape[1:], dtype=np.int64))
    start = f._data_start + f._entries[name]["data_offsets"][0]
    fd = os.open(f.path, os.O_RDONLY)
    try:
        def pread(offset: int, count: int) -> np.ndarray:
            raw = os.pread(fd, count * dtype.itemsize, start + offset * dtype.itemsize)
            if len(raw) != count * dtype.itemsize:
                raise CheckpointError(f"{f.path}: could not read tensor {name!r} (file changed or truncated)")
            return np.frombuffer(raw, dtype)

        c0, c1, _ = index[1].indices(shape[1]) if len(shape) > 1 else (0, 1, 1)
        if len(shape) == 1 or (c0, c1) == (0, shape[1]):
            rows = pread(r0 * row, (r1 - r0) * row).reshape(r1 - r0, *shape[1:])
            return rows[(slice(None), *index[1:])]
        if len(shape) != 2:
            raise CheckpointError(f"{f.path}: column-range reads of {len(shape)}-d tensor {name!r} are not supported")
        return np.stack([pread(r * row + c0, c1 - c0) for r in range(r0, r1)])
    finally:
        os.close(fd)


def _tensor_reader(ckpt: HFCheckpoint, name: str, transposed: bool, dtype):
    """(shape in the param tree, read(index) -> that slice in ``dtype``); kernels are [out, in] in the file,
    [in, out] here. Each block is range-checked as it is cast (:func:`cast_checked`)."""
    f, stored = ckpt.location[name], ckpt.stored[name]
    shape = f.shape(stored)[::-1] if transposed else f.shape(stored)

    def read(index):
        block = _read_block(f, stored, tuple(index)[::-1] if transposed else tuple(index))
        block = cast_checked(block, dtype, name, ckpt.folder, whole=lambda: f.get(stored))
        return block.T if transposed else block

    return shape, read


def _stacked_reader(ckpt: HFCheckpoint, cfg: ModelConfig, module: str, leaf: str, dtype):
    """(shape [L, ...], read(index)) of a per-layer tensor stacked on a leading layer axis; only the layers in
    the index are read."""
    per_layer = [_tensor_reader(ckpt, layer_name(i, module, leaf), leaf == "kernel", dtype)
                 for i in range(cfg.num_hidden_layers)]

    def read(index):
        layers = range(cfg.num_hidden_layers)[index[0]]
        return np.stack([per_layer[i][1](index[1:]) for i in layers])

    return (cfg.num_hidden_layers, *per_layer[0][0]), read


def _array_reader(x: jax.Array, dtype):
    """(shape, read(index)) of an array already in memory."""
    block = np.asarray(x, dtype)
    return block.shape, lambda index: block[tuple(index)]


def param_readers(ckpt: HFCheckpoint, cfg: ModelConfig, dtype, new_head: dict | None = None) -> dict:
    """The param tree with a ``(shape, read(index) -> block in dtype)`` pair per leaf instead of an array
    (``new_head`` as in :func:`load_params`)."""
    layers = {norm: {"scale": _stacked_reader(ckpt, cfg, norm, "scale", dtype)}
              for norm in LAYER_NORMS}
    for m in LINEAR_MODULES:
        layers[m] = {"kernel": _stacked_reader(ckpt, cfg, m, "kernel", dtype)}
        if has_bias(cfg, m):
            layers[m]["bias"] = _stacked_reader(ckpt, cfg, m, "bias", dtype)
    if new_head is not None:
        new_head = {leaf: _array_reader(x, dtype) for leaf, x in new_head.items()}
    return {"layers": layers, **_outer_groups(cfg, lambda name, transposed: _tensor_reader(
        ckpt, name, transposed, dtype), new_head)}


def load_sharded_params(ckpt: HFCheckpoint, cfg: ModelConfig, dtype, mesh, rules=None,
                        new_head: dict | None = None) -> dict:
    """The dense param tree on ``mesh``, sharded per ``rules``: every array is assembled from the slices its
    addressable devices hold, each read from the files alone (devices holding the same slice share one read;
    ``new_head`` as in :func:`load_params`)."""
    from jaxft import parallel

    dtype = jnp.dtype(dtype)
    readers = param_readers(ckpt, cfg, dtype, new_head)
    is_reader = lambda x: isinstance(x, tuple) and len(x) == 2 and callable(x[1])  # noqa: E731
    abstract = jax.tree.map(lambda r: jax.ShapeDtypeStruct(r[0], dtype), readers, is_leaf=is_reader)
    shardings = parallel.param_shardings(abstract, mesh, rules or parallel.DEFAULT_RULES)

    def build(reader, sharding):
        shape, read = reader
        cache = {}

        def callback(index):
            key = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
            if key not in cache:
                cache[key] = np.ascontiguousarray(read(index), dtype=dtype)
            return cache[key]

        return jax.make_array_from_callback(tuple(shape), sharding, callback, dtype=dtype)

    return jax.tree.map(build, readers, shardings, is_leaf=is_reader)


def to_hf_tensors(cfg: ModelConfig, params: dict) -> dict[str, np.ndarray]:
    """The param tree as HF-named numpy tensors in torch layout (kernels [out, in]), by canonical names
    (:func:`write_pretrained` writes them as transformers names them)."""
    if any(isinstance(x, nf4.QuantizedTensor) for x in jax.tree.leaves(
            params, is_leaf=lambda x: isinstance(x, nf4.QuantizedTensor))):
        raise ConfigError("save_pretrained writes dense weights, but these params hold 4-bit kernels: "
                          "merge adapters with jaxft.merge (which dequantizes) first")
    _refuse_adapters(params)
    out = {EMBED_WEIGHT: np.asarray(params["embed_tokens"]["embedding"]),
           NORM_WEIGHT: np.asarray(params["norm"]["scale"])}
    if "lm_head" in params:  # also a tied model's head copied by modules_to_save (PEFT): written untied
        out[LM_HEAD_WEIGHT] = np.asarray(params["lm_head"]["kernel"]).T
    if cfg.head is not None:
        group = cfg.head.group
        out.update({tensor_name((group,), leaf): np.asarray(params[group][leaf]).T if leaf == "kernel" else
                    np.asarray(params[group][leaf]) for leaf in head_shapes(cfg)})
    for module, group in params["layers"].items():
        for leaf, stacked in group.items():
            stacked = np.asarray(stacked)
            for i in range(cfg.num_hidden_layers):
                out[layer_name(i, module, leaf)] = stacked[i].T if leaf == "kernel" else stacked[i]
    return out


def _refuse_adapters(params: dict):
    """Adapter leaves anywhere (embed_tokens, lm_head, layers) would be dropped silently by the HF layout."""
    from jaxft.peft.methods import adapter_tree
    from jaxft.peft.tree import leaf_paths

    groups = sorted({p.rsplit("/", 2)[0] for p in leaf_paths(adapter_tree(params))})
    if groups:
        raise ConfigError(f"save_pretrained: these params carry adapters on {', '.join(groups)}, which a Hugging Face "
                          "model folder has no place for; save them with jaxft.save_adapter, or fold them into the "
                          "weights first: jaxft.save_pretrained(cfg, jaxft.merge(params), out_dir)")


def _shards(tensors: dict[str, np.ndarray], max_bytes: int) -> list[dict[str, np.ndarray]]:
    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensors[name]
        size += nbytes
    return shards + [current]


def save_pretrained(cfg: ModelConfig, params: dict, out_dir, *, max_shard_bytes: int = 5 * 2**30,
                    overwrite: bool = False) -> Path:
    """Write config.json + safetensors (sharded with an index past ``max_shard_bytes``), atomically."""
    tensors = to_hf_tensors(cfg, params)
    with atomic_dir(out_dir, overwrite) as tmp:
        write_pretrained(cfg, tensors, tmp, max_shard_bytes)
    return Path(out_dir)


def write_pretrained(cfg: ModelConfig, tensors: dict[str, np.ndarray], folder: Path,
                     max_shard_bytes: int = 5 * 2**30):
    """config.json + safetensors of :func:`to_hf_tensors`' ``tensors`` into an existing ``folder`` (one that
    :func:`atomic_dir` publishes, so that other files, e.g. a tokenizer, can join them before it appears). The
    embedding's dtype is the checkpoint's ``torch_dtype``. A tree with its own head (``modules_to_save`` on a tied
    model trains a copy) is written untied."""
    if LM_HEAD_WEIGHT in tensors:
        cfg = cfg.replace(tie_word_embeddings=False)
    dtype = str(tensors[EMBED_WEIGHT].dtype)
    (folder / "config.json").write_text(json.dumps(config_to_hf(cfg, dtype), indent=2))
    tensors = {saved_name(cfg, name): t for name, t in tensors.items()}
    shards = _shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        write_safetensors(folder / "model.safetensors", shards[0], {"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(folder / name, shard, {"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.nbytes for t in tensors.values())
    (folder / INDEX_FILE).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
