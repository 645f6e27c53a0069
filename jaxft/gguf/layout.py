"""How a Llama-family checkpoint is laid out in a GGUF file, for reading and writing alike.

llama.cpp's converter (``convert_hf_to_gguf.py``) names tensors by architecture (``blk.3.attn_q.weight`` for
``model.layers.3.self_attn.q_proj.weight``), writes Mistral as the ``llama`` architecture, and, for that
architecture only, permutes the rows of the query and key projections: HF's rotary embedding rotates the two
halves of each head (``rotate_half``), llama.cpp's rotates adjacent pairs, so each head's rows are interleaved
from ``[first half | second half]`` to ``[x0, x_{d/2}, x1, x_{d/2+1}, ...]``. Qwen2 is written unpermuted (its
llama.cpp graph uses the half-rotation, "NEOX" rope).

The tensor names come from the ``gguf`` package (llama.cpp's own tables), so they follow llama.cpp's releases.
:func:`rope_divisors` is Llama 3.1's rope scaling in the form llama.cpp stores it (``rope_freqs.weight``).
:data:`PRE_TOKENIZERS` is what llama.cpp does for each byte-level pre-tokenizer name (``tokenizer.ggml.pre``):
the split regex (SmolLM's ``smollm``: each digit alone first), whether merges are skipped for whole-vocabulary
pieces, the BOS default; the reader builds a vocabulary by it and the writer names one by it.
"""
from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np

from jaxft.errors import JaxftError

# GGUF's general.architecture for each model type jaxft reads; the inverse takes Mistral as llama (same graph).
ARCHITECTURE = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
_PERMUTED = {"llama"}  # architectures whose q/k rows llama.cpp interleaves per head
# File types jaxft writes, by the name `jaxft export --gguf-type` takes: (general.file_type, type of 2-D weights).
GGUF_TYPES = {
    "f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, gguf.GGMLQuantizationType.BF16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
    "q4_0": (gguf.LlamaFileType.MOSTLY_Q4_0, gguf.GGMLQuantizationType.Q4_0),
}

# llama.cpp's split regexes (``llama-vocab.cpp`` and the models' tokenizer.json use these).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class PreTokenizer:
    """What llama.cpp does for one ``tokenizer.ggml.pre`` name of a byte-level (``gpt2``) vocabulary.

    ``split``: the regex the text is split by (None: GPT-2's own split, which ``tokenizers``' ByteLevel
    pre-tokenizer applies itself); ``ignore_merges``: a piece that is itself a vocabulary entry is that token,
    whatever the merges would make of it (``tokenizers``' ``BPE(ignore_merges=True)``, as Llama 3's
    tokenizer.json sets); ``add_bos``: whether BOS is added when ``tokenizer.ggml.add_bos_token`` is absent;
    ``clean_spaces``: llama.cpp's decoding cleanup (transformers' ``clean_up_tokenization_spaces``), recorded for
    completeness: jaxft decodes as transformers' GGUF loader does, without it; ``single_digits``: each digit is
    split off alone before ``split`` (``tokenizers``' ``Digits(individual_digits=True)``, as SmolLM's
    tokenizer.json has it; llama.cpp's regex list for ``smollm`` is a digit alone, then GPT-2's regex)."""

    split: str | None
    ignore_merges: bool = False
    add_bos: bool = False
    clean_spaces: bool = True
    single_digits: bool = False


# From llama.cpp's src/llama-vocab.cpp, ``llama_vocab::impl::load``: a BPE vocabulary starts with
# ignore_merges=false, add_bos=false, clean_spaces=true, and the ``tokenizer_pre == ...`` chain changes them per
# name: llama3 / llama-v3 / llama-bpe set ignore_merges and add_bos; tekken too, and clears clean_spaces; qwen2 and
# deepseek-r1-qwen clear clean_spaces; smollm (``LLAMA_VOCAB_PRE_TYPE_SMOLLM``) clears clean_spaces; smaug-bpe
# (Llama 3's regex, ``LLAMA_VOCAB_PRE_TYPE_SMAUG``) and gpt-2 / default change nothing. The writer names a tokenizer
# by the first name whose split, single_digits and ignore_merges match it. (transformers' GGUF loader applies
# GPT-2's split alone for smollm; SmolLM2's vocabulary has no token joining an ASCII digit to anything, so there
# only runs of whitespace before a digit tokenize differently.)
PRE_TOKENIZERS = {
    "default": PreTokenizer(None), "gpt-2": PreTokenizer(None),
    "llama-bpe": PreTokenizer(LLAMA3_SPLIT, ignore_merges=True, add_bos=True),
    "llama3": PreTokenizer(LLAMA3_SPLIT, ignore_merges=True, add_bos=True),
    "llama-v3": PreTokenizer(LLAMA3_SPLIT, ignore_merges=True, add_bos=True),
    "smaug-bpe": PreTokenizer(LLAMA3_SPLIT),
    "qwen2": PreTokenizer(QWEN2_SPLIT, clean_spaces=False),
    "deepseek-r1-qwen": PreTokenizer(QWEN2_SPLIT, clean_spaces=False),
    "tekken": PreTokenizer(TEKKEN_SPLIT, ignore_merges=True, add_bos=True, clean_spaces=False),
    "smollm": PreTokenizer(None, clean_spaces=False, single_digits=True),
}
# llama.cpp's default for a sentencepiece (``llama``) vocabulary without tokenizer.ggml.add_bos_token (the
# ``type == LLAMA_VOCAB_TYPE_SPM`` branch of the same function: add_bos = true, add_eos = false).
SENTENCEPIECE_ADD_BOS = True


ROPE_FREQS = "rope_freqs.weight"  # where llama.cpp's converter stores Llama 3.1's rope scaling


def rope_divisors(cfg) -> np.ndarray:
    """What llama.cpp stores as ``rope_freqs.weight`` for a model whose rope is scaled (``cfg``: a ModelConfig with
    the llama3 rope type): each frequency's divisor, default inverse frequencies / scaled ones."""
    from jaxft.config import RopeConfig
    from jaxft.ops.rope import static_inv_freq

    return static_inv_freq(cfg.replace(rope=RopeConfig()))[0] / static_inv_freq(cfg)[0]


class GgufError(JaxftError, ValueError):
    """A GGUF file jaxft cannot read or write as asked; the message names the file and what was expected."""


def tensor_name_map(architecture: str, num_layers: int) -> gguf.TensorNameMap:
    """llama.cpp's map from HF tensor names to GGUF ones for ``architecture`` (``"llama"`` or ``"qwen2"``)."""
    arch = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}[architecture]
    return gguf.get_tensor_name_map(arch, num_layers)


def gguf_tensor_name(names: gguf.TensorNameMap, hf_name: str) -> str:
    """The GGUF name of the HF tensor ``hf_name`` (``.weight`` / ``.bias`` kept), e.g. ``blk.0.attn_q.weight``."""
    name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise GgufError(f"no GGUF name for the tensor {hf_name!r}")
    return name


def needs_qk_permutation(architecture: str, hf_name: str) -> bool:
    """Whether llama.cpp stores ``hf_name``'s rows interleaved per head (llama-architecture q/k projections)."""
    return architecture in _PERMUTED and hf_name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                                           "self_attn.q_proj.bias", "self_attn.k_proj.bias"))


def to_gguf_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """HF's q/k rows (``num_heads`` heads of ``[first half | second half]``) in llama.cpp's interleaved order."""
    head_dim = weight.shape[0] // num_heads
    return (weight.reshape(num_heads, 2, head_dim // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape))


def from_gguf_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """The inverse of :func:`to_gguf_rows`: llama.cpp's interleaved q/k rows back in HF's order."""
    head_dim = weight.shape[0] // num_heads
    return (weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape))
