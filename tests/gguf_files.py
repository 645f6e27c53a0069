"""Tiny GGUF files for tests, written the way llama.cpp's ``convert_hf_to_gguf.py`` writes them.

A random transformers model (:mod:`tests.hf_oracle`) and a small trained tokenizer are saved as a HF folder, then
written with ``gguf.GGUFWriter``: llama.cpp's tensor names (``gguf.get_tensor_name_map``), its q/k row permutation
for the llama architecture (the converter's own formula, written out here rather than taken from jaxft), its
metadata keys, and the vocabulary as the converter reads it (``gguf.vocab.SentencePieceVocab`` for a
sentencepiece model, the tokenizer.json vocabulary with added tokens typed CONTROL/USER_DEFINED for byte-level BPE,
and ``gguf.vocab.SpecialVocab`` for merges, special ids, add_bos and the chat template).

Tensors are stored in a chosen type. Types ``gguf.quants`` can quantize (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0,
Q5_1) are quantized from the model's weights; for the K-quants, which it can only dequantize, the blocks are
random bytes with bounded scales (the weights then differ from the HF model's, so the oracle is transformers
loading the same GGUF). As llama.cpp does, a tensor whose rows do not fit the type's block falls back to Q8_0 or
F32, and 1-d tensors (norms, biases) stay F32.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import gguf
import numpy as np
import sentencepiece
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

import hf_oracle

Q = gguf.GGMLQuantizationType
K_QUANTS = (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
# Byte offsets of the float16 super-block scales (d, and dmin where there is one) in each K-quant block.
K_SCALE_OFFSETS = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
WORDS = "the quick brown fox jumps over a lazy dog hello world llama token answer question 42 café".split()
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}")
# Per family: the tokenizer kind, llama.cpp's pre-tokenizer name, special tokens and chat template.
TOKENIZERS = {
    "llama": dict(kind="bpe", pre="llama-bpe", template=LLAMA3_TEMPLATE,
                  specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                            "<|eot_id|>"],
                  names=dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|end_of_text|>")),
    "qwen2": dict(kind="bpe", pre="qwen2", template=CHATML_TEMPLATE,
                  specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                  names=dict(eos_token="<|im_end|>", pad_token="<|endoftext|>")),
    "mistral": dict(kind="spm", pre="default", template=MISTRAL_TEMPLATE, specials=["[INST]", "[/INST]"],
                    names={}),
}


def _corpus(n: int = 1500) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


def write_bpe_tokenizer(folder: Path, family: str, vocab_size: int = 300) -> None:
    """A byte-level BPE with the family's special tokens and chat template, saved by transformers."""
    spec = TOKENIZERS[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=spec["specials"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **spec["names"])
    fast.chat_template = spec["template"]
    fast.save_pretrained(folder)
    if family == "llama":  # Llama 3 asks for BOS in tokenizer_config.json; the converter writes add_bos_token
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))


def hand_made_bpe(split: str, ignore_merges: bool, extra_tokens: tuple[str, ...] = ()) -> Tokenizer:
    """A byte-level BPE split by the regex ``split`` whose merges split the word "abc" as ab + c although "abc" is
    itself a token: with ignore_merges (Llama 3's tokenizer.json sets it) "abc" is one token, without it two.
    ``extra_tokens`` follow "abc" in the vocabulary."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(sorted(alphabet) + ["ab", "abc", *extra_tokens])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")], ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def write_spm_tokenizer(folder: Path, family: str, vocab_size: int = 300) -> None:
    """A Llama-2/Mistral-like sentencepiece BPE (unk 0, bos 1, eos 2, byte fallback) with a chat template."""
    spec = TOKENIZERS[family]
    folder.mkdir(parents=True, exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_prefix=str(folder / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, user_defined_symbols=spec["specials"],
        character_coverage=1.0, minloglevel=2)
    (folder / "tokenizer.vocab").unlink()
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False,
              "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": spec["template"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def hf_folder(folder: Path, family: str, seed: int = 0, **overrides) -> tuple[Path, object]:
    """A tiny random model of ``family`` with its family's tokenizer, saved as a HF folder; (folder, model)."""
    if TOKENIZERS[family]["kind"] == "bpe":
        write_bpe_tokenizer(folder, family)
    else:
        write_spm_tokenizer(folder, family)
    vocab = len(transformers.AutoTokenizer.from_pretrained(folder))
    ids = _special_ids(folder)
    model = hf_oracle.build(family, seed=seed, vocab_size=vocab, intermediate_size=256, **ids, **overrides)
    model.save_pretrained(folder)
    return folder, model


def _special_ids(folder: Path) -> dict:
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}


def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` (convert_hf_to_gguf.py), HF rotate-half rows -> interleaved pairs."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def llama3_rope_factors(hf: dict, rope: dict) -> np.ndarray:
    """llama.cpp's ``LlamaModel.generate_extra_tensors``: Llama 3.1's rope scaling as per-frequency divisors."""
    base, dim = rope.get("rope_theta", hf.get("rope_theta", 10000.0)), hf["hidden_size"] // hf["num_attention_heads"]
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_context_len = rope["original_max_position_embeddings"]
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_context_len / high:
            factors.append(1)
        elif wavelen > old_context_len / low:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, np.float32)


def k_quant_blocks(shape: tuple[int, ...], qtype, seed: int, largest: float = 0.3) -> np.ndarray:
    """Random K-quant blocks for a float tensor of ``shape`` whose dequantized values reach about ``largest``."""
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = int(np.prod(shape[:-1])), shape[-1]
    data = np.random.default_rng(seed).integers(0, 256, (rows, cols // block_elems, block_bytes), dtype=np.uint8)

    def set_scales(value: float):
        for offset in K_SCALE_OFFSETS[qtype]:
            data[..., offset:offset + 2] = np.frombuffer(np.float16(value).tobytes(), np.uint8)

    set_scales(1.0)  # values are linear in the scales: measure at 1, then scale to `largest`
    set_scales(largest / float(np.abs(gguf.quants.dequantize(data.reshape(rows, -1), qtype)).max()))
    return data.reshape(*shape[:-1], cols // block_elems * block_bytes)


def random_blocks(shape: tuple[int, ...], qtype, seed: int) -> np.ndarray:
    """Random bytes shaped as ``qtype``'s blocks for a tensor of ``shape``."""
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (*shape[:-1], shape[-1] // block_elems * block_bytes), dtype=np.uint8)


def stored(array: np.ndarray, qtype, seed: int) -> tuple[np.ndarray, object]:
    """(data, raw_dtype) for ``GGUFWriter.add_tensor``: ``array`` in ``qtype``, or in the type llama.cpp falls back
    to when its rows do not fit ``qtype``'s blocks (Q8_0, else F32); 1-d tensors stay F32."""
    if array.ndim == 1 or qtype == Q.F32:
        return array.astype(np.float32), None
    if qtype == Q.F16:
        return array.astype(np.float16), None
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if array.shape[-1] % block:
        return stored(array, Q.Q8_0 if array.shape[-1] % 32 == 0 else Q.F32, seed)
    if qtype in K_QUANTS:
        return k_quant_blocks(array.shape, qtype, seed), qtype
    return gguf.quants.quantize(array.astype(np.float32), qtype), qtype


def write_gguf(folder: Path, path: Path, qtype=Q.F32, *, arch: str | None = None, omit: tuple[str, ...] = (),
               types: dict[str, object] | None = None, extra_tensor: str | None = None, pre: str | None = None,
               edit_tokens=None) -> Path:
    """Write the HF folder ``folder`` (from :func:`hf_folder`) as the GGUF file ``path``, weights in ``qtype``.

    For error tests: ``arch`` overrides general.architecture, ``omit`` leaves out metadata keys (by their key
    suffix, e.g. ``"block_count"``), ``types`` stores the named GGUF tensors as the given type (random blocks), and
    ``extra_tensor`` adds a tensor of that name, ``pre`` replaces the family's ``tokenizer.ggml.pre``,
    ``edit_tokens`` (a function of the token list) changes a sentencepiece vocabulary's tokens in place."""
    hf = json.loads((folder / "config.json").read_text())
    family = hf["model_type"]
    arch = arch or ARCH[family]
    writer = gguf.GGUFWriter(path, arch)
    _write_metadata(writer, hf, f"tiny {family}", omit)
    _write_vocab(writer, folder, family, pre, omit, edit_tokens)
    _write_tensors(writer, folder, hf, ARCH[family], Q(qtype), types or {})
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(hf, rope))
    if extra_tensor:
        writer.add_tensor(extra_tensor, np.ones(4, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _write_metadata(writer: gguf.GGUFWriter, hf: dict, name: str, omit: tuple[str, ...]):
    """The hyperparameters as llama.cpp's ``TextModel.set_gguf_parameters`` writes them."""
    writer.add_name(name)
    values = {"context_length": hf["max_position_embeddings"], "embedding_length": hf["hidden_size"],
              "block_count": hf["num_hidden_layers"], "feed_forward_length": hf["intermediate_size"],
              "head_count": hf["num_attention_heads"], "head_count_kv": hf["num_key_value_heads"],
              "rope_freq_base": hf.get("rope_theta") or hf.get("rope_parameters", {}).get("rope_theta", 10000.0),
              "layer_norm_rms_eps": hf["rms_norm_eps"]}
    if ARCH[hf["model_type"]] == "llama":
        values.update(vocab_size=hf["vocab_size"], rope_dimension_count=hf["hidden_size"] // hf["num_attention_heads"])
    for key, value in values.items():
        if key not in omit:
            getattr(writer, f"add_{key}")(value)


def _write_vocab(writer: gguf.GGUFWriter, folder: Path, family: str, pre: str | None, omit: tuple[str, ...],
                 edit_tokens=None):
    """The tokenizer as llama.cpp's converter writes it; for sentencepiece, ``"token_scores"`` in ``omit`` writes
    the merges of transformers' conversion of tokenizer.model instead of the scores (llama.cpp reads either)."""
    spec = TOKENIZERS[family]
    if spec["kind"] == "spm":
        vocab = gguf.vocab.SentencePieceVocab(folder)
        tokens, scores, types = (list(column) for column in zip(*vocab.all_tokens()))
        if edit_tokens is not None:
            edit_tokens(tokens)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(list(tokens))
        if "token_scores" in omit:
            backend = transformers.AutoTokenizer.from_pretrained(folder).backend_tokenizer
            merges = json.loads(backend.to_str())["model"]["merges"]
            writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
        else:
            writer.add_token_scores(list(scores))
        writer.add_token_types(list(types))
        special = gguf.vocab.SpecialVocab(folder, n_vocab=len(tokens))
    else:
        tok = transformers.AutoTokenizer.from_pretrained(folder)
        reverse = {i: t for t, i in tok.get_vocab().items()}
        added = tok.added_tokens_decoder
        types = [gguf.TokenType.NORMAL if i not in added else
                 gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED
                 for i in range(len(reverse))]
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre or spec["pre"])
        writer.add_token_list([reverse[i] for i in range(len(reverse))])
        writer.add_token_types(types)
        special = gguf.vocab.SpecialVocab(folder, load_merges=True)
    special.add_to_gguf(writer)


def _write_tensors(writer: gguf.GGUFWriter, folder: Path, hf: dict, arch: str, qtype, types: dict):
    from safetensors.numpy import load_file

    tensors = load_file(folder / "model.safetensors")
    names = gguf.get_tensor_name_map({v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch],
                                     hf["num_hidden_layers"])
    for i, (hf_name, array) in enumerate(sorted(tensors.items())):
        array = array.astype(np.float32)
        if arch == "llama" and ("q_proj" in hf_name or "k_proj" in hf_name):
            heads = hf["num_attention_heads"] if "q_proj" in hf_name else hf["num_key_value_heads"]
            array = llama_cpp_permute(array, heads)
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name in types:  # random blocks of a type gguf.quants may not quantize to
            data, raw = random_blocks(array.shape, types[name], seed=i), types[name]
        else:
            data, raw = stored(array, qtype, seed=i)
        writer.add_tensor(name, data, raw_dtype=raw)
