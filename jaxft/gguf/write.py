"""A merged Llama-family model, with its tokenizer and chat template, as one GGUF file for llama.cpp and Ollama.

:func:`save_gguf` writes what llama.cpp's ``convert_hf_to_gguf.py`` writes for the same HF folder (its
``LlamaModel`` for Llama and Mistral, ``Qwen2Model`` for Qwen2), without going through a folder;
:func:`save_merged_gguf` is ``jaxft export --gguf`` itself (merge, the adapter's or the model's tokenizer), which
the CLI and programs share, so a program need not go through the CLI (and its compilation cache settings):

* **Metadata**: ``general.*``, the ``{arch}.*`` hyperparameters (context and embedding length, blocks, heads,
  RMSNorm epsilon, RoPE base and dimensions, vocabulary size), ``general.file_type``; linear RoPE scaling as
  ``rope.scaling.*``; Llama 3's frequency scaling as the ``rope_freqs.weight`` tensor of per-frequency divisors
  (what llama.cpp's graph reads for it), with ``rope.scaling.original_context_length`` for readers (jaxft's).
* **Tensors**: HF names mapped by :mod:`jaxft.gguf.layout`, llama-architecture q/k rows interleaved per head.
  1-D tensors (norms, biases, ``rope_freqs``) are F32; 2-D weights take the file type's own type, and fall back to
  F16 where a row does not divide into the type's blocks (as the converter does on ``QuantError``). The converter
  has no Q4_0 output type: Q4_0 files follow ``llama-quantize`` instead, which keeps the output projection (or the
  tied embedding table, which serves as it) at higher precision: Q6_K when rows divide into 256-blocks, else Q8_0.
  The ``gguf`` package has no Q6_K quantizer, so jaxft writes Q8_0 there in both cases.
* **Tokenizer**: a byte-level BPE ``tokenizer.json`` becomes the ``gpt2`` vocabulary (tokens, token types, merges
  and ``tokenizer.ggml.pre`` naming the pre-tokenizer's split rule and ``ignore_merges``, recognized from the
  tokenizer.json itself rather than llama.cpp's hash of one model's token ids; a combination llama.cpp has no
  name for is refused); a sentencepiece ``tokenizer.model`` the ``llama`` vocabulary
  (pieces, scores, types). Added tokens are CONTROL when special, USER_DEFINED otherwise; ids the model has beyond
  the tokenizer are ``[PAD{i}]`` (UNUSED). bos/eos/unk/pad ids, whether bos/eos are added (read off the tokenizer's
  own output, so a folder that leaves ``add_bos_token`` unset is written as it really behaves) and the chat
  templates go along.

What GGUF readers cannot express is refused by name before anything is written: task heads, biases other than
Qwen2's q/k/v ones, RoPE scalings other than linear and llama3, tokenizers other than byte-level BPE and
sentencepiece, adapters left unmerged. A sliding window (Mistral v0.1's) is dropped, as llama.cpp's converter drops
it: the file attends fully, which is the same within the window. The file is written beside its destination and
renamed into place (:func:`jaxft.files.atomic_file`). It is streamed: the header (metadata and every tensor's
name, shape and type, decided from shapes) first, then each tensor converted, quantized and written in turn, so
beyond the model itself only one tensor's float32 copy and quantized bytes are held.
"""
from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import gguf
import numpy as np
import sentencepiece

from jaxft.config import ModelConfig
from jaxft.files import atomic_file
from jaxft.gguf.layout import (ARCHITECTURE, GGUF_TYPES, PRE_TOKENIZERS, ROPE_FREQS, GgufError, gguf_tensor_name,
                               needs_qk_permutation, rope_divisors, tensor_name_map, to_gguf_rows)
from jaxft.hf import sentencepiece_conversion
from jaxft.hf.checkpoint import to_hf_tensors
from jaxft.hf.tokenizer import (SENTENCEPIECE_MODEL, TOKENIZER_CONFIG, TOKENIZER_JSON, Tokenizer, load_tokenizer,
                                tokenizer_folder)
from jaxft.peft.methods import merge
from jaxft.ops.rope import original_context_length

Q = gguf.GGMLQuantizationType
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_PROBE_TEXT = "hello world"  # encoded with and without special tokens to see what the tokenizer adds


def save_gguf(cfg: ModelConfig, params: dict, tokenizer: Tokenizer, path, gguf_type: str = "f16",
              overwrite: bool = False, sentencepiece_model=None) -> Path:
    """Write ``params`` (dense, adapters merged: ``jaxft.merge(params)``) with ``tokenizer`` as the GGUF file
    ``path``, its 2-D weights in ``gguf_type`` (f32, f16, bf16, q8_0, q4_0). An existing file needs ``overwrite``.
    ``sentencepiece_model``: the ``tokenizer.model`` of the folder ``tokenizer`` came from, if it has one: the
    vocabulary is then written from it, as llama.cpp's converter does (:func:`sentencepiece_model_of`)."""
    path = Path(path)
    if gguf_type not in GGUF_TYPES:
        raise GgufError(f"gguf_type {gguf_type!r} is not supported; expected one of {sorted(GGUF_TYPES)}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists; pass overwrite=True (--overwrite) to replace it")
    if path.is_dir():
        raise GgufError(f"{path}: is a folder; a GGUF export is one file, e.g. {path / 'model.gguf'}")
    check_expressible(cfg)
    arch = ARCHITECTURE[cfg.model_type]
    writer = gguf.GGUFWriter(path=None, arch=arch)
    _write_hparams(writer, cfg, path.stem, GGUF_TYPES[gguf_type][0])
    write_vocab(writer, cfg, tokenizer, sentencepiece_model)
    hf_tensors = to_hf_tensors(cfg, params)  # views of params where their dtype is float32: no copy
    plan = tensor_plan(cfg, hf_tensors, gguf_type)
    for name, _, shape, qtype in plan:
        info_shape, dtype, nbytes = _tensor_info(shape, qtype)
        writer.add_tensor_info(name, info_shape, dtype, nbytes, raw_dtype=qtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        try:  # closed on an error too: atomic_file then removes the half-written file
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            _write_tensors(writer, cfg, hf_tensors, plan, path)
        finally:
            writer.close()
    return path


def save_merged_gguf(cfg: ModelConfig, params: dict, path, model, adapter=None, gguf_type: str = "f16",
                     overwrite: bool = False) -> Path:
    """``jaxft export MODEL [--adapter DIR] --gguf FILE`` as a function: ``params`` (the model folder ``model``'s,
    with the adapter folder ``adapter``'s loaded onto them, if any) merged and written by :func:`save_gguf`, with
    the adapter's tokenizer when it was saved with one, else the model's (:func:`tokenizer_folder`). A run's
    adapter holds the tokenizer as tokenizer.json only: the model's tokenizer.model then gives the pieces' scores
    (:func:`write_vocab` checks that its pieces have the tokenizer's ids)."""
    folder = tokenizer_folder(model, adapter)
    return save_gguf(cfg, merge(params), load_tokenizer(folder), path, gguf_type=gguf_type, overwrite=overwrite,
                     sentencepiece_model=sentencepiece_model_of(folder, model))


def _write_tensors(writer: gguf.GGUFWriter, cfg: ModelConfig, hf_tensors: dict, plan: list[tuple], path: Path):
    """Each tensor of ``plan`` converted and written in turn (one held at a time), each of the size its header
    entry announced: checked here, as gguf checks it only with an ``assert`` (gone under ``python -O``)."""
    for name, hf_name, shape, qtype in plan:
        source = rope_divisors(cfg) if hf_name is None else hf_tensors[hf_name]
        data = _stored(cfg, hf_name, source, qtype)
        announced = _tensor_info(shape, qtype)[2]
        if data.nbytes != announced:
            raise GgufError(f"{path}: tensor {name!r} ({qtype.name}) came out as {data.nbytes} bytes, but its header "
                            f"entry announced {announced}; nothing was written")
        writer.write_tensor_data(data)


def check_expressible(cfg: ModelConfig):
    """Refuse, by name, a model whose GGUF would lose part of it or be read differently by llama.cpp."""
    if cfg.head is not None:
        raise GgufError(f"a {cfg.head.kind!r} task head has no place in a GGUF file (llama.cpp runs causal language "
                        "models); export it as a Hugging Face folder with --out instead")
    if cfg.model_type not in ARCHITECTURE:
        raise GgufError(f"model_type {cfg.model_type!r} has no GGUF architecture here; expected one of "
                        f"{sorted(ARCHITECTURE)}")
    biases = [name for name, on in (("attention q/k/v", cfg.qkv_bias and cfg.model_type != "qwen2"),
                                    ("attention output (o_bias)", cfg.o_bias), ("MLP (mlp_bias)", cfg.mlp_bias)) if on]
    if biases:
        raise GgufError(f"{cfg.model_type} with {' and '.join(biases)} biases: GGUF readers load this architecture "
                        "without them (only Qwen2's q/k/v biases are read), so the file would run a different model")
    if cfg.rope.rope_type not in SUPPORTED_ROPE_TYPES:
        raise GgufError(f"rope_type {cfg.rope.rope_type!r} is not written to GGUF by jaxft; supported: "
                        f"{SUPPORTED_ROPE_TYPES}")
    if any(cfg.sliding_layers):
        warnings.warn(f"sliding_window={cfg.sliding_window} is dropped in the GGUF file, as llama.cpp's converter "
                      "drops it: the file attends to the whole context, the same as the model within the window",
                      stacklevel=3)


def _write_hparams(writer: gguf.GGUFWriter, cfg: ModelConfig, name: str, file_type: gguf.LlamaFileType):
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:  # llama.cpp derives it otherwise
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    writer.add_file_type(file_type)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(cfg.head_dim)
    if cfg.rope.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(cfg.rope.factor)
    if cfg.rope.rope_type == "llama3":
        # llama.cpp runs llama3 rope from rope_freqs alone; the reader needs the constant its divisors were made of
        # (always written: a reader without it assumes Llama 3.1's 8192)
        writer.add_rope_scaling_orig_ctx_len(original_context_length(cfg))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def tensor_type(gguf_name: str, shape: tuple[int, ...], gguf_type: str, has_output: bool) -> Q:
    """The type llama.cpp gives this tensor in a file of ``gguf_type`` (before the block-size fallback)."""
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight"):
        return Q.F32
    is_output = gguf_name == "output.weight" or (not has_output and gguf_name == "token_embd.weight")
    if gguf_type == "q4_0" and is_output:  # llama-quantize: Q6_K, or Q8_0; gguf has no Q6_K quantizer
        return Q.Q8_0
    return GGUF_TYPES[gguf_type][1]


def tensor_plan(cfg: ModelConfig, hf_tensors: dict[str, np.ndarray], gguf_type: str) -> list[tuple]:
    """``(gguf name, HF name, shape, type)`` of every tensor in file order (HF name None: ``rope_freqs``): the
    type llama.cpp gives it (:func:`tensor_type`), F16 where its rows do not divide into the type's blocks (the
    converter's fallback on ``QuantError``). Decided from shapes alone, so the header is written before any
    tensor is converted."""
    names = tensor_name_map(ARCHITECTURE[cfg.model_type], cfg.num_hidden_layers)
    entries = [(ROPE_FREQS, None, (cfg.head_dim // 2,))] if cfg.rope.rope_type == "llama3" else []
    entries += [(gguf_tensor_name(names, hf_name), hf_name, tuple(tensor.shape))
                for hf_name, tensor in hf_tensors.items()]
    has_output = any(name == "output.weight" for name, _, _ in entries)
    plan = []
    for name, hf_name, shape in entries:
        qtype = tensor_type(name, shape, gguf_type, has_output)
        if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            qtype = Q.F16
        plan.append((name, hf_name, shape, qtype))
    return plan


def _tensor_info(shape: tuple[int, ...], qtype: Q) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, bytes) a tensor is announced with, as ``gguf.quants.quantize`` will give it: float arrays
    for F32/F16, bytes otherwise."""
    if qtype in (Q.F32, Q.F16):
        dtype = np.dtype(np.float32 if qtype == Q.F32 else np.float16)
        return shape, dtype, int(np.prod(shape)) * dtype.itemsize
    byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
    return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape))


def _stored(cfg: ModelConfig, hf_name: str | None, tensor, qtype: Q) -> np.ndarray:
    """One tensor as the file stores it: float32, q/k rows interleaved for llama, quantized to ``qtype``."""
    data = np.asarray(tensor, dtype=np.float32)
    if hf_name is not None and needs_qk_permutation(ARCHITECTURE[cfg.model_type], hf_name):
        heads = cfg.num_attention_heads if ".q_proj." in hf_name else cfg.num_key_value_heads
        data = to_gguf_rows(data, heads)
    return gguf.quants.quantize(data, qtype)


# ----- tokenizer ----------------------------------------------------------------------------------------------


def sentencepiece_model_of(*folders) -> Path | None:
    """The ``tokenizer.model`` of the first of ``folders`` (None entries skipped) that has one. llama.cpp's
    converter writes a sentencepiece model's vocabulary from it when a folder has one (tokenizer.json is its
    fallback), so real Llama-2 / Mistral folders, which hold both, export with their pieces' scores;
    :func:`write_vocab` ignores it beside a byte-level tokenizer.json (some Llama 3 repos ship a tiktoken-format
    tokenizer.model, which the converter's sentencepiece attempt fails on before it falls back)."""
    for folder in folders:
        if folder is not None and (Path(folder) / SENTENCEPIECE_MODEL).is_file():
            return Path(folder) / SENTENCEPIECE_MODEL
    return None


def write_vocab(writer: gguf.GGUFWriter, cfg: ModelConfig, tokenizer: Tokenizer, sentencepiece_model=None):
    """The tokenizer as llama.cpp's converter writes it from the HF folder that ``tokenizer.save`` makes, with
    ``sentencepiece_model`` (a tokenizer.model of the same pieces) in it if given; a byte-level BPE tokenizer is
    written from its tokenizer.json whatever ``sentencepiece_model`` is."""
    too_large = tokenizer.vocab_size - cfg.vocab_size
    if too_large > 0:
        raise GgufError(f"the tokenizer has {tokenizer.vocab_size} tokens, {too_large} beyond the model's "
                        f"vocab_size={cfg.vocab_size}; resize the embeddings first")
    with tempfile.TemporaryDirectory() as folder:
        folder = tokenizer.save(folder)
        config = json.loads((folder / TOKENIZER_CONFIG).read_text(encoding="utf-8"))
        added = {int(i): token for i, token in config.get("added_tokens_decoder", {}).items()}
        if isinstance(config.get("add_prefix_space"), bool):  # the converter passes it on when the folder sets it
            writer.add_add_space_prefix(config["add_prefix_space"])
        spec = json.loads((folder / TOKENIZER_JSON).read_text(encoding="utf-8")) if (
            folder / TOKENIZER_JSON).is_file() else None
        if sentencepiece_model is not None and not (spec is not None and is_byte_level_bpe(spec)):
            _write_sentencepiece_vocab(writer, cfg, Path(sentencepiece_model), added, tokenizer)
        elif spec is not None:
            _write_bpe_vocab(writer, cfg, folder, added)
        else:
            _write_sentencepiece_vocab(writer, cfg, folder / SENTENCEPIECE_MODEL, added)
    _write_special_tokens(writer, cfg, tokenizer)


def _looks_special(text: str) -> bool:
    """llama.cpp's rule for added tokens some models forget to flag special (``<|...|>``, ``<pad>``, ...)."""
    return text in ("<pad>", "<mask>") or (text.startswith("<|") and text.endswith("|>")) or (
        text.startswith("<unused") and text.endswith(">"))


def _added_token_entry(token: dict) -> tuple[str, int]:
    """An added token's text and type: CONTROL if special, else USER_DEFINED with sentencepiece's ▁ as spaces."""
    if token.get("special") or _looks_special(token["content"]):
        return token["content"], gguf.TokenType.CONTROL
    return token["content"].replace("\u2581", " "), gguf.TokenType.USER_DEFINED


def is_byte_level_bpe(spec: dict) -> bool:
    """Whether a tokenizer.json (parsed) is a byte-level BPE, what GGUF's ``gpt2`` vocabulary holds."""
    model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
    return model.get("type") == "BPE" and not model.get("byte_fallback") and decoder.get("type") == "ByteLevel"


def _write_bpe_vocab(writer: gguf.GGUFWriter, cfg: ModelConfig, folder: Path, added: dict[int, dict]):
    spec = json.loads((folder / TOKENIZER_JSON).read_text(encoding="utf-8"))
    model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
    if not is_byte_level_bpe(spec):
        raise GgufError(f"tokenizer.json: a {model.get('type')} model with a {decoder.get('type')} decoder; GGUF's "
                        "gpt2 vocabulary holds byte-level BPE only (a sentencepiece tokenizer.model is written as "
                        "the llama vocabulary)")
    normalizer = (spec.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):  # llama.cpp tokenizes text as given; NFC text is its own NFC form
        raise GgufError(f"tokenizer.json: the {normalizer} normalizer has no GGUF equivalent")
    by_id = {i: token for token, i in model["vocab"].items()}
    tokens, types = [], []
    for i in range(cfg.vocab_size):
        if i in added:
            text, kind = _added_token_entry(added[i])
        elif i in by_id:
            text, kind = by_id[i], gguf.TokenType.NORMAL
        else:
            text, kind = f"[PAD{i}]", gguf.TokenType.UNUSED
        tokens.append(text)
        types.append(kind)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(bpe_pre_tokenizer(spec.get("pre_tokenizer"), bool(model.get("ignore_merges"))))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(gguf.SpecialVocab(folder, load_merges=True).merges)


def _split_of(pre: dict | None) -> tuple[str | None, bool]:
    """(regex, single_digits) of a byte-level pre-tokenizer that llama.cpp can name: the regex is None for GPT-2's
    built-in split, else the pattern of a Split followed by a regex-free ByteLevel; single_digits when a
    ``Digits(individual_digits=True)`` comes first (SmolLM's). Anything else is a GgufError."""
    steps = (pre or {}).get("pretokenizers", [pre]) if (pre or {}).get("type") == "Sequence" else [pre]
    single_digits = bool(steps and (steps[0] or {}).get("type") == "Digits" and steps[0].get("individual_digits"))
    rest = steps[1:] if single_digits else steps
    if len(rest) == 1 and (rest[0] or {}).get("type") == "ByteLevel" and rest[0].get("use_regex", True) and (
            not rest[0].get("add_prefix_space")):
        regex = None
    elif len(rest) == 2 and (rest[0] or {}).get("type") == "Split" and (rest[1] or {}).get("type") == "ByteLevel" and (
            not rest[1].get("use_regex", True)) and rest[0].get("behavior") == "Isolated" and (
            not rest[0].get("invert")):
        regex = (rest[0].get("pattern") or {}).get("Regex")
    else:
        regex = ""  # a shape llama.cpp has no name for: matches no entry's split (None or a non-empty regex)
    if any(regex == known.split and single_digits == known.single_digits for known in PRE_TOKENIZERS.values()):
        return regex, single_digits
    raise GgufError(f"tokenizer.json: pre-tokenizer {json.dumps(pre)[:300]} is none that llama.cpp knows by name "
                    f"(GPT-2's byte-level split, alone or after single digits as smollm, or a Split by the regex of "
                    f"one of {sorted(PRE_TOKENIZERS)})")


def bpe_pre_tokenizer(pre: dict | None, ignore_merges: bool) -> str:
    """``tokenizer.ggml.pre`` for a byte-level pre-tokenizer and its BPE model's ``ignore_merges``: the first name
    in :data:`jaxft.gguf.layout.PRE_TOKENIZERS` that llama.cpp splits and merges the same way (GPT-2's split is
    ``gpt-2``, after single digits ``smollm``, Llama 3's ``llama-bpe`` with ignore_merges, ``smaug-bpe`` without)."""
    regex, single_digits = _split_of(pre)
    same_split = {name: known for name, known in PRE_TOKENIZERS.items()
                  if known.split == regex and known.single_digits == single_digits}
    for name, known in same_split.items():
        if name != "default" and known.ignore_merges == ignore_merges:
            return name
    raise GgufError(f"tokenizer.json: model.ignore_merges is {str(ignore_merges).lower()}, but llama.cpp tokenizes "
                    f"this pre-tokenizer's split ({', '.join(sorted(same_split))}) with ignore_merges "
                    f"{str(not ignore_merges).lower()}: the GGUF file would give other token ids")


def _write_sentencepiece_vocab(writer: gguf.GGUFWriter, cfg: ModelConfig, model_path: Path, added: dict[int, dict],
                               tokenizer: Tokenizer | None = None):
    """Pieces, scores and types of ``model_path``; with ``tokenizer`` (loaded from a tokenizer.json beside it) each
    piece must have its id there, else the file would not be the tokenizer's vocabulary."""
    try:
        processor = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
    except (RuntimeError, OSError) as err:  # e.g. a tiktoken-format tokenizer.model (some Llama 3 repos ship one)
        raise GgufError(f"{model_path}: not a sentencepiece model ({err}); a tokenizer.model is read for the llama "
                        "vocabulary unless the tokenizer.json beside it is a byte-level BPE") from err
    if tokenizer is not None:
        _check_same_vocabulary(processor, model_path, tokenizer, added)
    tokens = [f"[PAD{i}]" for i in range(cfg.vocab_size)]
    scores = [-10000.0] * cfg.vocab_size
    types = [gguf.TokenType.UNUSED] * cfg.vocab_size
    # sentencepiece numbers its piece types as GGUF does. Its user-defined pieces stay USER_DEFINED (llama.cpp's
    # converter, asking through the Python API, which cannot tell them, writes NORMAL): sentencepiece, transformers
    # and llama.cpp (for USER_DEFINED) all match them whole in the text.
    piece_types = sentencepiece_conversion.piece_types(processor.serialized_model_proto())
    for i in range(processor.get_piece_size()):
        tokens[i], scores[i], types[i] = processor.id_to_piece(i), processor.get_score(i), piece_types[i]
    for i, token in added.items():
        tokens[i], types[i] = _added_token_entry(token)
        scores[i] = -1000.0
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)


def _check_same_vocabulary(processor: sentencepiece.SentencePieceProcessor, model_path: Path, tokenizer: Tokenizer,
                           added: dict[int, dict]):
    """Both ways: each piece of ``model_path`` has its own id in ``tokenizer``, and each id of ``tokenizer`` is a
    piece or an added token (else it would be written as an unused ``[PAD{i}]`` and its text lost)."""
    moved = next((i for i in range(processor.get_piece_size())
                  if tokenizer.convert_tokens_to_ids(processor.id_to_piece(i)) != i), None)
    if moved is not None:
        raise GgufError(f"{model_path}: piece {moved} ({processor.id_to_piece(moved)!r}) has id "
                        f"{tokenizer.convert_tokens_to_ids(processor.id_to_piece(moved))} in the tokenizer.json "
                        "exported with it; the two are not the same vocabulary")
    extra = next((i for i in range(processor.get_piece_size(), tokenizer.vocab_size) if i not in added), None)
    if extra is not None:
        raise GgufError(f"{model_path}: has {processor.get_piece_size()} pieces, but the tokenizer.json exported "
                        f"with it has {tokenizer.vocab_size} tokens, and id {extra} ({tokenizer.decode([extra])!r}) "
                        "is neither a piece nor an added token; the two are not the same vocabulary")


def _write_special_tokens(writer: gguf.GGUFWriter, cfg: ModelConfig, tokenizer: Tokenizer):
    """Special ids (the tokenizer's, else the model config's), whether bos/eos are added, the chat templates."""
    ids = {"bos": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else cfg.bos_token_id,
           "eos": tokenizer.eos_token_id if tokenizer.eos_token_id is not None else (cfg.eos_token_ids or [None])[0],
           "unk": tokenizer.unk_token_id,
           "pad": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else cfg.pad_token_id}
    for kind, token_id in ids.items():
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    add_bos, add_eos = added_bos_eos(tokenizer, ids["bos"], ids["eos"])
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    if tokenizer.chat_templates:
        templates = tokenizer.chat_templates
        writer.add_chat_template(templates["default"] if list(templates) == ["default"] else
                                 [{"name": name, "template": text} for name, text in templates.items()])


def added_bos_eos(tokenizer: Tokenizer, bos: int | None, eos: int | None) -> tuple[bool, bool]:
    """Whether encoding adds bos in front and eos behind, read off the tokenizer's output; GGUF can say nothing
    else, so a tokenizer that adds other tokens is refused."""
    plain, full = tokenizer.encode(_PROBE_TEXT, add_special_tokens=False), tokenizer.encode(_PROBE_TEXT)
    start = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), None)
    prefix, suffix = (None, None) if start is None else (full[:start], full[start + len(plain):])
    if prefix not in ([], [bos]) or suffix not in ([], [eos]):
        raise GgufError(f"the tokenizer encodes {_PROBE_TEXT!r} as {full} ({plain} without special tokens); GGUF can "
                        f"only say that bos ({bos}) is added in front and eos ({eos}) behind")
    return prefix == [bos] and bos is not None, suffix == [eos] and eos is not None
