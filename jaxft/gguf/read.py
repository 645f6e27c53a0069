"""Reading a GGUF file of a Llama, Mistral or Qwen2 model into jaxft's loading pipeline.

A GGUF holds what a Hugging Face folder splits over config.json, safetensors and the tokenizer files, under
llama.cpp's names. :class:`GgufCheckpoint` presents it the way :class:`jaxft.hf.checkpoint.HFCheckpoint`
presents a folder -- the config as the ``config.json`` dict it stands for (:meth:`GgufCheckpoint.hf_config`), the
tensors by their HF names in torch layout, as float32 -- so :func:`jaxft.from_pretrained` loads it through the same
code as a folder: dtypes, NF4 quantization one layer at a time, meshes. Each tensor is dequantized when it is
asked for (``gguf.quants.dequantize``, llama.cpp's own reference dequantizers) from the memory-mapped file, and
its q/k rows are put back in HF's order (:func:`jaxft.gguf.layout.from_gguf_rows`).

Mistral is written as the ``llama`` architecture and loads as a Llama model: the same graph (llama.cpp keeps no
sliding window for it). Llama 3.1's rope scaling is not metadata but a ``rope_freqs`` tensor of per-frequency
divisors; it is read as transformers' ``llama3`` rope type with Llama 3.1-3.3's constants and the largest divisor as
its factor (and the original context length ``{arch}.rope.scaling.original_context_length`` where the file has
it, 8192 otherwise), and the file's divisors must be the ones that rope gives (else a GgufError). A tensor type outside
:data:`SUPPORTED_TYPES` is refused.
"""
from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np

from jaxft.gguf.layout import (ARCHITECTURE, ROPE_FREQS, GgufError, from_gguf_rows, gguf_tensor_name,
                               needs_qk_permutation, rope_divisors, tensor_name_map)

Q = gguf.GGMLQuantizationType
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
                   Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
READ_ARCHITECTURES = sorted(set(ARCHITECTURE.values()))  # GGUF architectures jaxft reads: llama, qwen2
# The model_type each GGUF architecture loads as (Mistral files say llama and are read as Llama).
MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2"}
# llama.cpp's rope scaling types (``{arch}.rope.scaling.type``) by transformers' names.
ROPE_SCALING = {"linear": "linear", "yarn": "yarn"}
# The llama3 rope constants of every Llama 3.1-3.3 checkpoint (their config.json's rope_scaling but for factor);
# a file that has {arch}.rope.scaling.original_context_length (jaxft's exports) gives that one instead of 8192.
LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def is_gguf(path) -> bool:
    """Whether ``path`` names a GGUF file (by its suffix, as llama.cpp and transformers tell them apart)."""
    return str(path).lower().endswith(".gguf")


def open_reader(path) -> gguf.GGUFReader:
    """``gguf.GGUFReader`` on ``path`` (memory-mapped); a missing, damaged or truncated file is a GgufError."""
    path = Path(path)
    if not path.is_file():
        raise GgufError(f"{path}: GGUF file not found")
    try:
        return gguf.GGUFReader(path, "r")
    except (ValueError, IndexError, KeyError, TypeError, OSError) as e:  # the reader's errors on a damaged file
        raise GgufError(f"{path}: not a readable GGUF file, or truncated ({type(e).__name__}: {e})") from None


def field_value(reader: gguf.GGUFReader, path, key: str, default=...):
    """The metadata value ``key`` (strings decoded, arrays as lists); a missing key without ``default`` is a
    GgufError naming the file and the key."""
    field = reader.fields.get(key)
    if field is None:
        if default is ...:
            raise GgufError(f"{path}: metadata key {key!r} is missing")
        return default
    return field.contents()


def architecture(reader: gguf.GGUFReader, path) -> str:
    """``general.architecture``, checked to be one jaxft reads."""
    arch = field_value(reader, path, "general.architecture")
    if arch not in READ_ARCHITECTURES:
        raise GgufError(f"{path}: general.architecture is {arch!r}; jaxft reads GGUF files of the architectures "
                        f"{READ_ARCHITECTURES} (Llama, Mistral, Qwen2)")
    return arch


class GgufCheckpoint:
    """The tensors of a GGUF file by canonical HF names (:mod:`jaxft.hf.names`), dequantized to float32 on read,
    with the reading interface of :class:`jaxft.hf.checkpoint.HFCheckpoint` (``keys``, ``in``, ``shape``,
    ``get``; ``folder`` is the file, for error messages)."""

    def __init__(self, path: str | os.PathLike):
        self.folder = self.path = Path(path)
        self.reader = open_reader(self.path)
        self.arch = architecture(self.reader, self.path)
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.hf = self._hf_config()
        from jaxft.hf.config import config_from_hf

        cfg = config_from_hf(self.hf_config(), source=str(self.path))
        self._check_rope_freqs(cfg)
        self.gguf_names = self._gguf_names(cfg)

    def metadata(self, key: str, default=...):
        return field_value(self.reader, self.path, key, default)

    def _arch_key(self, key: str, default=...):
        return self.metadata(f"{self.arch}.{key}", default)

    def _hf_config(self) -> dict:
        """The ``config.json`` dict of the model, from the metadata as llama.cpp's converter writes it; biases and
        tied embeddings are read off the tensors present, as llama.cpp does."""
        heads = self._arch_key("attention.head_count")
        hidden = self._arch_key("embedding_length")
        tokens = self.reader.fields.get("tokenizer.ggml.tokens")  # counted, not decoded: it may hold 150k strings
        vocab = self._arch_key("vocab_size", None) or (len(tokens.data) if tokens is not None else None)
        if vocab is None:
            vocab = int(self._tensor("token_embd.weight").shape[1])
        hf = {
            "architectures": [], "model_type": MODEL_TYPE[self.arch], "vocab_size": int(vocab),
            "hidden_size": hidden, "intermediate_size": self._arch_key("feed_forward_length"),
            "num_hidden_layers": self._arch_key("block_count"), "num_attention_heads": heads,
            "num_key_value_heads": self._arch_key("attention.head_count_kv", heads),
            "head_dim": self._arch_key("attention.key_length", None) or self._arch_key(
                "rope.dimension_count", None) or hidden // heads,
            "rms_norm_eps": self._arch_key("attention.layer_norm_rms_epsilon"),
            "rope_theta": self._arch_key("rope.freq_base", 10000.0),
            "rope_scaling": self._rope_scaling(),
            "max_position_embeddings": self._arch_key("context_length", 2048),
            "tie_word_embeddings": "output.weight" not in self.tensors,
            "bos_token_id": self.metadata("tokenizer.ggml.bos_token_id", None),
            "eos_token_id": self.metadata("tokenizer.ggml.eos_token_id", None),
            "pad_token_id": self.metadata("tokenizer.ggml.padding_token_id", None),
        }
        if self.arch == "llama":
            hf["attention_bias"] = "blk.0.attn_q.bias" in self.tensors
            hf["mlp_bias"] = "blk.0.ffn_gate.bias" in self.tensors
        return hf

    def _rope_scaling(self) -> dict | None:
        if ROPE_FREQS in self.tensors:
            original = self._arch_key("rope.scaling.original_context_length",
                                      LLAMA3_ROPE["original_max_position_embeddings"])
            return {"rope_type": "llama3", "factor": float(self._dequantized(ROPE_FREQS).max()), **LLAMA3_ROPE,
                    "original_max_position_embeddings": int(original)}
        kind = self._arch_key("rope.scaling.type", "none")
        if kind == "none":
            return None
        if kind not in ROPE_SCALING:
            raise GgufError(f"{self.path}: {self.arch}.rope.scaling.type {kind!r} is not supported; jaxft reads "
                            f"{sorted(ROPE_SCALING)}")
        out = {"rope_type": ROPE_SCALING[kind], "factor": self._arch_key("rope.scaling.factor")}
        original = self._arch_key("rope.scaling.original_context_length", None)
        if original is not None:
            out["original_max_position_embeddings"] = original
        return out

    def hf_config(self) -> dict:
        """A copy of the ``config.json`` dict this file stands for, ``architectures`` naming the causal-LM class."""
        from jaxft.hf.config import ARCHITECTURES

        return {**self.hf, "architectures": [ARCHITECTURES[self.hf["model_type"]]]}

    def _check_rope_freqs(self, cfg):
        """The file's rope divisors are the ones the llama3 rope they were read as gives (:func:`rope_divisors`)."""
        if ROPE_FREQS not in self.tensors:
            return
        expected = rope_divisors(cfg)
        found = self._dequantized(ROPE_FREQS)
        if found.shape != expected.shape or not np.allclose(found, expected, rtol=1e-5, atol=0):
            raise GgufError(f"{self.path}: tensor {ROPE_FREQS!r} holds rope divisors that are not Llama 3's rope "
                            f"scaling (factor {cfg.rope.factor:g}, original context "
                            f"{cfg.rope.original_max_position_embeddings}, "
                            f"low/high frequency factors {cfg.rope.low_freq_factor:g}/{cfg.rope.high_freq_factor:g})"
                            "; jaxft reads no other kind")

    def _gguf_names(self, cfg) -> dict[str, str]:
        """HF name -> GGUF name of every tensor in the file; a tensor llama.cpp's tables do not name for a model
        of this architecture is a GgufError naming it."""
        from jaxft.hf.checkpoint import expected_tensors

        names = tensor_name_map(self.arch, cfg.num_hidden_layers)
        by_gguf = {gguf_tensor_name(names, hf): hf for hf in expected_tensors(cfg)}
        unknown = sorted(set(self.tensors) - set(by_gguf) - {ROPE_FREQS})
        if unknown:
            raise GgufError(f"{self.path}: tensor(s) {unknown[:5]} are not part of a {self.arch} model jaxft reads")
        return {hf: name for name, hf in by_gguf.items() if name in self.tensors}

    def _tensor(self, gguf_name: str):
        if gguf_name not in self.tensors:
            raise GgufError(f"{self.path}: tensor {gguf_name!r} is missing")
        return self.tensors[gguf_name]

    def keys(self) -> list[str]:
        return list(self.gguf_names)

    def __contains__(self, name: str) -> bool:
        return name in self.gguf_names

    def gguf_type(self, name: str) -> gguf.GGMLQuantizationType:
        """The stored type of the HF-named tensor ``name``."""
        return Q(int(self.tensors[self.gguf_names[name]].tensor_type))

    def shape(self, name: str) -> tuple[int, ...]:
        """The HF (torch-layout) shape: GGUF lists dimensions innermost first."""
        return tuple(int(n) for n in reversed(self.tensors[self.gguf_names[name]].shape))

    def _dequantized(self, gguf_name: str) -> np.ndarray:
        """The GGUF tensor ``gguf_name`` as float32 in numpy's (HF's) dimension order."""
        tensor = self._tensor(gguf_name)
        kind = int(tensor.tensor_type)
        if kind not in SUPPORTED_TYPES:
            label = Q(kind).name if kind in set(Q) else str(kind)
            raise GgufError(f"{self.path}: tensor {gguf_name!r} has type {label}; jaxft reads "
                            f"{', '.join(t.name for t in SUPPORTED_TYPES)}")
        try:
            out = gguf.quants.dequantize(np.asarray(tensor.data), Q(kind)).astype(np.float32, copy=False)
            return out.reshape([int(n) for n in reversed(tensor.shape)])
        except ValueError as e:  # a block array that does not hold the tensor's elements
            raise GgufError(f"{self.path}: tensor {gguf_name!r} cannot be read ({e})") from None

    def get(self, name: str) -> np.ndarray:
        """The tensor ``name`` (an HF name) as float32 in HF's layout, q/k rows in HF's order."""
        out = self._dequantized(self.gguf_names[name])
        if needs_qk_permutation(self.arch, name):
            heads = self.hf["num_attention_heads"] if "q_proj" in name else self.hf["num_key_value_heads"]
            out = from_gguf_rows(out, heads)
        return out
