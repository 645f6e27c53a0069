"""GGUF export (`jaxft export --gguf`, `jaxft.gguf.write.save_gguf`) against readers jaxft does not share code with:
transformers' GGUF loader (logits of the model it builds from the file, ids of the tokenizer it builds from the
metadata) and gguf's own GGUFReader (metadata and tensor types as llama.cpp's converter chooses them).

Every model is a tiny random transformers checkpoint (2 layers, hidden 64) with a tiny tokenizer of its family: a
Llama-3-style byte-level BPE (llama), a sentencepiece BPE with byte fallback (mistral, as Mistral v0.1 ships), a
Qwen2-style byte-level BPE with NFC and ChatML (qwen2), and a LoRA adapter with random A and B on all linear
layers, so the merged weights differ from the base's everywhere.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import os
import random
import shutil
from pathlib import Path

import gguf
import jax
import ml_dtypes
import numpy as np
import pytest
import sentencepiece
import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

import jaxft
from jaxft.cli import main
from jaxft.gguf.layout import (ARCHITECTURE, PRE_TOKENIZERS, GgufError, from_gguf_rows, gguf_tensor_name,
                               tensor_name_map)
from jaxft.hf.names import layer_name
from jaxft.gguf.write import save_gguf
from tests import gguf_files, hf_oracle

LORA = dict(r=4, lora_alpha=1, target_modules="all-linear", init_lora_weights=False)  # random A and B
WORDS = "the quick brown fox jumps over a lazy dog hello world llama token cafe 42 2024 can't we'll".split()
TEXTS = ["hello world", " the  quick brown fox\n\njumps", "llama 2024: we'll see, can't we?", "café 東京 🦙",
         "<|im_start|>user\nhi<|im_end|>", ""]
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world, the fox?"},
        {"role": "assistant", "content": "a lazy dog 42"}, {"role": "user", "content": "and the llama"}]
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + "
    "m['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
MISTRAL_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + "
                    "' [/INST]' }}{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")


def _corpus(n: int = 400) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


def _byte_level_bpe(folder: Path, split: str, specials: list[str], bos: str | None, eos: str, pad: str,
                    template: str, nfc: bool = False, ignore_merges: bool = False):
    """A byte-level BPE of about 300 tokens whose pre-tokenizer splits by ``split`` (Llama 3's or Qwen2's regex),
    saved by transformers itself; Llama 3's sets ``ignore_merges``, as Meta's tokenizer.json does."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.model.ignore_merges = ignore_merges
    steps = [processors.ByteLevel(trim_offsets=False)]
    if bos is not None:
        steps.append(processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B:1",
                                                   special_tokens=[(bos, tok.token_to_id(bos))]))
    tok.post_processor = processors.Sequence(steps)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad)
    fast.chat_template = template
    fast.save_pretrained(folder)


def _sentencepiece(folder: Path):
    """A Llama-2 / Mistral-v0.1-style sentencepiece BPE: unk, bos, eos, byte fallback, two user-defined pieces."""
    folder.mkdir(parents=True, exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_prefix=str(folder / "tokenizer"), vocab_size=300, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, character_coverage=1.0,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"], minloglevel=2)
    (folder / "tokenizer.vocab").unlink()
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False,
              "chat_template": MISTRAL_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


TOKENIZERS = {
    "llama": lambda d: _byte_level_bpe(d, PRE_TOKENIZERS["llama-bpe"].split, [
        "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>", LLAMA3_TEMPLATE, ignore_merges=True),
    "qwen2": lambda d: _byte_level_bpe(d, PRE_TOKENIZERS["qwen2"].split, [
        "<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|endoftext|>", CHATML_TEMPLATE,
        nfc=True),
    "mistral": _sentencepiece,
}
PRE = {"llama": "llama-bpe", "qwen2": "qwen2", "mistral": "default"}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """model type -> (base folder with its tokenizer, LoRA adapter folder). The model has 4 ids more than the
    tokenizer, as padded vocabularies do (Llama 3, Qwen2)."""
    root = tmp_path_factory.mktemp("gguf_models")
    out = {}
    for seed, (model_type, write_tokenizer) in enumerate(TOKENIZERS.items()):
        base = root / model_type
        write_tokenizer(base)
        tok = jaxft.load_tokenizer(base)
        window = {"sliding_window": None} if model_type == "mistral" else {}   # written without one: see refusals
        model = hf_oracle.build(model_type, seed=seed, scale=0.1, vocab_size=tok.vocab_size + 4,
                                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id, **window)
        hf_oracle.save(model, base)
        cfg, params = jaxft.from_pretrained(base)
        lcfg = jaxft.LoraConfig(**LORA)
        jaxft.save_adapter(jaxft.lora.add(cfg, params, lcfg, jax.random.PRNGKey(1)), lcfg, root / f"{model_type}-lora")
        out[model_type] = (base, root / f"{model_type}-lora")
    return out


def _merged(folder: Path, adapter: Path):
    cfg, params = jaxft.from_pretrained(folder)
    return cfg, jaxft.merge(jaxft.load_adapter(adapter, params, cfg))


def _ids(vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(2, 12))


def _gguf_logits(path: Path, ids: np.ndarray) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.numpy()


def _export(base: Path, adapter: Path | None, out: Path, gguf_type: str) -> Path:
    args = ["export", str(base), "--gguf", str(out), "--gguf-type", gguf_type]
    assert main(args + (["--adapter", str(adapter)] if adapter else [])) == 0
    return out


def _relative(got: np.ndarray, want: np.ndarray) -> float:
    """||got - want|| / ||want|| over all logits."""
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _roundtrip(hf_weight: np.ndarray, qtype) -> np.ndarray:
    """A weight (HF layout, rows = output features) as a file of type ``qtype`` stores it, read back in float32.
    F16 / BF16 by numpy / ml_dtypes rounding; Q8_0 / Q4_0 by gguf's quantizer (the only one in Python)."""
    q = gguf.GGMLQuantizationType
    if qtype == q.F32:
        return hf_weight
    if qtype in (q.F16, q.BF16):
        return hf_weight.astype(np.float16 if qtype == q.F16 else ml_dtypes.bfloat16).astype(np.float32)
    return gguf.quants.dequantize(gguf.quants.quantize(hf_weight, qtype), qtype)


def _as_stored(cfg, params: dict, types: dict) -> dict:
    """``params`` with every 2-D weight replaced by what a file with these tensor types holds."""
    names = tensor_name_map(ARCHITECTURE[cfg.model_type], cfg.num_hidden_layers)
    out = jax.tree.map(np.asarray, params)
    out["embed_tokens"]["embedding"] = _roundtrip(out["embed_tokens"]["embedding"], types["token_embd.weight"])
    if "lm_head" in out:
        out["lm_head"]["kernel"] = _roundtrip(out["lm_head"]["kernel"].T, types["output.weight"]).T
    for module, group in out["layers"].items():
        if "kernel" in group:
            group["kernel"] = np.stack([_roundtrip(k.T, types[gguf_tensor_name(
                names, layer_name(i, module, "kernel"))]).T for i, k in enumerate(group["kernel"])])
    return out


# The issue's bounds against the merged model (||delta|| / ||logits||); q4_0 gets none: on these random weights its
# measured error (about 0.3) bounds nothing useful; scripts/bench_gguf.py measures it on a trained model.
BOUNDS = {"f32": 1e-5, "f16": 1e-3, "bf16": 1e-2, "q8_0": 0.05, "q4_0": None}


@pytest.mark.parametrize("model_type", sorted(TOKENIZERS))
@pytest.mark.parametrize("gguf_type", sorted(BOUNDS))
def test_transformers_runs_the_exported_file_as_the_merged_model(models_dir, model_type, gguf_type, tmp_path):
    base, adapter = models_dir[model_type]
    path = _export(base, adapter, tmp_path / f"{model_type}-{gguf_type}.gguf", gguf_type)
    cfg, merged = _merged(base, adapter)
    ids = _ids(cfg.vocab_size)
    got = _gguf_logits(path, ids)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    # Exactly the merged weights in the file's types, run by transformers as jaxft runs them.
    assert _relative(got, np.asarray(jaxft.forward(cfg, _as_stored(cfg, merged, types), ids))) < 1e-5
    want = np.asarray(jaxft.forward(cfg, merged, ids))
    if BOUNDS[gguf_type] is not None:
        assert _relative(got, want) < BOUNDS[gguf_type]
    base_cfg, base_params = jaxft.from_pretrained(base)   # the adapter matters: the base is far from the file
    assert _relative(np.asarray(jaxft.forward(base_cfg, base_params, ids)), want) > 0.1


@pytest.mark.parametrize("model_type", sorted(TOKENIZERS))
def test_metadata_and_tensor_types_are_llama_cpps(models_dir, model_type, tmp_path):
    base, adapter = models_dir[model_type]
    path = _export(base, adapter, tmp_path / "m.gguf", "q8_0")
    cfg, merged = _merged(base, adapter)
    reader = gguf.GGUFReader(path)
    arch = {"mistral": "llama"}.get(model_type, model_type)
    tok = jaxft.load_tokenizer(base)
    expected = {
        "general.architecture": arch, f"{arch}.block_count": 2, f"{arch}.context_length": 64,
        f"{arch}.embedding_length": 64, f"{arch}.feed_forward_length": 112, f"{arch}.attention.head_count": 4,
        f"{arch}.attention.head_count_kv": 2, f"{arch}.rope.dimension_count": 16, f"{arch}.vocab_size": cfg.vocab_size,
        "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q8_0), "tokenizer.ggml.pre": PRE[model_type],
        "tokenizer.ggml.model": "llama" if model_type == "mistral" else "gpt2",
        "tokenizer.ggml.eos_token_id": tok.eos_token_id, "tokenizer.ggml.add_bos_token": model_type != "qwen2",
        "tokenizer.ggml.add_eos_token": False, "tokenizer.chat_template": tok.chat_template,
    }
    got = {key: reader.fields[key].contents() for key in expected}
    assert got == expected
    assert np.isclose(reader.fields[f"{arch}.attention.layer_norm_rms_epsilon"].contents(), 1e-5)
    assert np.isclose(reader.fields[f"{arch}.rope.freq_base"].contents(), cfg.rope_theta)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == cfg.vocab_size and tokens[-1] == f"[PAD{cfg.vocab_size - 1}]"
    if model_type == "llama":
        assert reader.fields["tokenizer.ggml.bos_token_id"].contents() == tok.bos_token_id
        token_types = reader.fields["tokenizer.ggml.token_type"].contents()
        assert token_types[tok.bos_token_id] == gguf.TokenType.CONTROL and token_types[-1] == gguf.TokenType.UNUSED
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["output_norm.weight"] == types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert types["token_embd.weight"] == types["blk.1.ffn_up.weight"] == gguf.GGMLQuantizationType.Q8_0
    # ffn_down's rows are intermediate_size = 112 long, not a whole number of 32-blocks: the converter's F16
    assert types["blk.1.ffn_down.weight"] == gguf.GGMLQuantizationType.F16
    if model_type == "qwen2":
        assert types["blk.0.attn_q.bias"] == gguf.GGMLQuantizationType.F32
    # The q rows as stored: interleaved per head for the llama architecture, as they are for qwen2.
    q = gguf.quants.dequantize(next(t for t in reader.tensors if t.name == "blk.1.attn_q.weight").data,
                               gguf.GGMLQuantizationType.Q8_0)
    q = from_gguf_rows(q, 4) if arch == "llama" else q
    np.testing.assert_allclose(q, np.asarray(merged["layers"]["q_proj"]["kernel"][1]).T, atol=0.02)


@pytest.mark.parametrize("model_type", sorted(TOKENIZERS))
def test_transformers_tokenizer_from_the_file_gives_jaxfts_ids(models_dir, model_type, tmp_path):
    base, adapter = models_dir[model_type]
    path = _export(base, adapter, tmp_path / "t.gguf", "q4_0")
    ours = jaxft.load_tokenizer(base)
    theirs = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS + _corpus(20):
        assert theirs.encode(text) == ours.encode(text), text
    text = ours.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert theirs.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False) == text
    assert theirs.encode(text, add_special_tokens=False) == ours.apply_chat_template(CHAT, add_generation_prompt=True)


def test_q4_0_keeps_the_output_projection_at_q8_0(models_dir, tmp_path):
    base, adapter = models_dir["llama"]
    path = _export(base, adapter, tmp_path / "q.gguf", "q4_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    q = gguf.GGMLQuantizationType
    assert types["blk.0.attn_k.weight"] == types["token_embd.weight"] == q.Q4_0
    assert types["output.weight"] == q.Q8_0   # llama-quantize: Q6_K (rows of 256-blocks), else Q8_0
    assert types["blk.0.ffn_down.weight"] == q.F16   # rows of 112: no whole number of 32-blocks


def test_tied_embeddings_serve_as_the_output(models_dir, tmp_path):
    """No output.weight: llama.cpp (and transformers) read the embedding table as the LM head; q4_0 keeps it at Q8_0."""
    base, _ = models_dir["qwen2"]
    cfg, params = jaxft.from_pretrained(base)
    cfg, params = cfg.replace(tie_word_embeddings=True), {k: v for k, v in params.items() if k != "lm_head"}
    tok = jaxft.load_tokenizer(base)
    ids = _ids(cfg.vocab_size, seed=2)
    path = save_gguf(cfg, params, tok, tmp_path / "tied-f32.gguf", gguf_type="f32")
    assert _relative(_gguf_logits(path, ids), np.asarray(jaxft.forward(cfg, params, ids))) < 1e-5
    path = save_gguf(cfg, params, tok, tmp_path / "tied-q4.gguf", gguf_type="q4_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert "output.weight" not in types and types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0


def test_a_plain_model_folder_converts_without_an_adapter(models_dir, tmp_path):
    base, _ = models_dir["qwen2"]
    path = _export(base, None, tmp_path / "plain.gguf", "f32")
    cfg, params = jaxft.from_pretrained(base)
    ids = _ids(cfg.vocab_size, seed=1)
    np.testing.assert_allclose(_gguf_logits(path, ids), np.asarray(jaxft.forward(cfg, params, ids)), atol=2e-5)


def _llama3_rope_model(tmp_path):
    """A tiny Llama with Llama 3's rope scaling (original context 16) and a Llama 3 tokenizer: folder, cfg, params."""
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16, "rope_theta": 10000.0}
    folder = hf_oracle.save(hf_oracle.build("llama", vocab_size=300, rope_parameters=rope), tmp_path / "m")
    _byte_level_bpe(folder, PRE_TOKENIZERS["llama-bpe"].split, ["<|eot_id|>"], None, "<|eot_id|>", "<|eot_id|>",
                    LLAMA3_TEMPLATE, ignore_merges=True)
    cfg, params = jaxft.from_pretrained(folder)
    return folder, cfg, params


def test_llama3_rope_scaling_is_written_as_llama_cpps_frequency_factors(tmp_path):
    folder, cfg, params = _llama3_rope_model(tmp_path)
    assert cfg.rope.rope_type == "llama3"
    save_gguf(cfg, params, jaxft.load_tokenizer(folder), tmp_path / "r.gguf")
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "r.gguf").tensors}
    # transformers' own llama3 inverse frequencies: llama.cpp divides the unscaled ones by the stored factors.
    hf_config = transformers.AutoConfig.from_pretrained(folder)
    inv_freq, _ = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    unscaled = 1.0 / (10000.0 ** (np.arange(0, 16, 2) / 16))
    assert tensors["rope_freqs.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    np.testing.assert_allclose(unscaled / np.asarray(tensors["rope_freqs.weight"].data), inv_freq.numpy(), rtol=1e-6)
    # Read back (original context 16, not Llama 3.1's 8192): the same rope, and transformers' logits of the folder.
    read_cfg, read_params = jaxft.from_pretrained(tmp_path / "r.gguf")
    assert read_cfg.rope == cfg.rope
    ids = _ids(cfg.vocab_size, seed=3)
    with torch.no_grad():
        want = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(
            torch.as_tensor(ids)).logits.numpy()
    assert _relative(np.asarray(jaxft.forward(read_cfg, read_params, ids)), want) < 1e-3


def test_llama3_rope_without_original_context_reads_back(tmp_path):
    """A llama3 rope with no original_max_position_embeddings (its divisors made with max_position_embeddings, as
    transformers does) is written with that length, and jaxft reads its own file back as the same model."""
    folder, cfg, params = _llama3_rope_model(tmp_path)
    cfg = cfg.replace(rope=dataclasses.replace(cfg.rope, original_max_position_embeddings=None))
    save_gguf(cfg, params, jaxft.load_tokenizer(folder), tmp_path / "r.gguf", gguf_type="f32")
    field = gguf.GGUFReader(tmp_path / "r.gguf").fields["llama.rope.scaling.original_context_length"]
    assert field.contents() == cfg.max_position_embeddings != 8192
    read_cfg, read_params = jaxft.from_pretrained(tmp_path / "r.gguf")
    assert read_cfg.rope == dataclasses.replace(cfg.rope, original_max_position_embeddings=cfg.max_position_embeddings)
    ids = _ids(cfg.vocab_size, seed=3)
    np.testing.assert_allclose(np.asarray(jaxft.forward(read_cfg, read_params, ids)),
                               np.asarray(jaxft.forward(cfg, params, ids)), rtol=1e-5, atol=1e-5)


def _open_files_under(folder: Path) -> list[str]:
    fds = Path("/proc/self/fd")
    return [target for target in (os.path.realpath(fds / fd) for fd in os.listdir(fds))
            if target.startswith(str(folder.resolve()))]


def test_a_tensor_of_another_size_than_announced_is_an_error_and_the_file_is_closed(models_dir, tmp_path, monkeypatch):
    """A tensor whose converted bytes differ from its header entry (injected here: one byte short) is a GgufError
    naming it, whatever ``python -O`` does to gguf's own assert; the half-written file is closed and removed."""
    import jaxft.gguf.write as write

    cfg, params = jaxft.from_pretrained(models_dir["llama"][0])
    real = write._stored
    monkeypatch.setattr(write, "_stored", lambda cfg, hf_name, tensor, qtype: (
        real(cfg, hf_name, tensor, qtype)[:-1] if hf_name == "lm_head.weight" else real(cfg, hf_name, tensor, qtype)))
    with pytest.raises(GgufError, match=r"x\.gguf: tensor 'output\.weight' \(F16\) came out as \d+ bytes"):
        save_gguf(cfg, params, jaxft.load_tokenizer(models_dir["llama"][0]), tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == [] and _open_files_under(tmp_path) == []


def test_refusals_name_what_gguf_cannot_hold(models_dir, tmp_path):
    base, adapter = models_dir["llama"]
    cfg, params = jaxft.from_pretrained(base)
    tok = jaxft.load_tokenizer(base)
    head_cfg = cfg.replace(head=jaxft.HeadConfig("seq_cls", num_labels=2))
    with pytest.raises(GgufError, match="'seq_cls' task head"):
        save_gguf(head_cfg, params, tok, tmp_path / "h.gguf")
    with pytest.raises(GgufError, match="mlp_bias"):
        save_gguf(cfg.replace(mlp_bias=True), params, tok, tmp_path / "b.gguf")
    with pytest.raises(GgufError, match="q5_1"):
        save_gguf(cfg, params, tok, tmp_path / "t.gguf", gguf_type="q5_1")
    with pytest.raises(GgufError, match="vocab_size=10"):
        save_gguf(cfg.replace(vocab_size=10), params, tok, tmp_path / "v.gguf")
    with pytest.raises(GgufError, match="'yarn'"):
        save_gguf(cfg.replace(rope=jaxft.config.RopeConfig("yarn", factor=2.0)), params, tok, tmp_path / "y.gguf")
    lcfg = jaxft.LoraConfig(**LORA)
    with pytest.raises(jaxft.config.ConfigError, match="jaxft.merge"):
        save_gguf(cfg, jaxft.lora.add(cfg, params, lcfg, jax.random.PRNGKey(0)), tok, tmp_path / "a.gguf")
    assert not list(tmp_path.iterdir())   # nothing written, not even a temporary file
    assert main(["export", str(base), "--out", str(tmp_path / "folder")]) == 2   # --out needs --adapter
    (tmp_path / "x.gguf").write_text("mine")
    assert main(["export", str(base), "--adapter", str(adapter), "--gguf", str(tmp_path / "x.gguf")]) == 2
    assert (tmp_path / "x.gguf").read_text() == "mine"
    assert main(["export", str(base), "--adapter", str(adapter), "--gguf", str(tmp_path / "x.gguf"),
                 "--overwrite"]) == 0
    assert gguf.GGUFReader(tmp_path / "x.gguf").fields["general.architecture"].contents() == "llama"
    windowed = cfg.replace(model_type="mistral", sliding_window=8, sliding_layers=(True, True))
    with pytest.warns(UserWarning, match="sliding_window=8 is dropped"):
        save_gguf(windowed, params, tok, tmp_path / "w.gguf")


def test_single_digit_split_then_gpt2_split_is_named_smollm():
    """SmolLM's pre-tokenizer as ``tokenizers`` serializes it (each digit alone, then GPT-2's ByteLevel split) is
    what llama.cpp calls ``smollm``; the reader's side is tests/test_gguf_read.py."""
    from jaxft.gguf.write import bpe_pre_tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    assert bpe_pre_tokenizer(json.loads(tok.to_str())["pre_tokenizer"], False) == "smollm"
    with pytest.raises(GgufError, match=r"model.ignore_merges is true, .* \(smollm\) with ignore_merges false"):
        bpe_pre_tokenizer(json.loads(tok.to_str())["pre_tokenizer"], True)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=False),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    with pytest.raises(GgufError, match="none that llama.cpp knows by name"):
        bpe_pre_tokenizer(json.loads(tok.to_str())["pre_tokenizer"], False)


def _hand_made_bpe_folder(folder: Path, split: str, ignore_merges: bool) -> Path:
    """:func:`tests.gguf_files.hand_made_bpe` (whose ids ``ignore_merges`` changes) saved by transformers."""
    tok = gguf_files.hand_made_bpe(split, ignore_merges, extra_tokens=("<|eot_id|>",))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eot_id|>").save_pretrained(folder)
    return folder


def test_ignore_merges_is_named_by_the_pre_tokenizer_or_refused(models_dir, tmp_path):
    """Llama 3's split with ignore_merges is ``llama-bpe``, without it ``smaug-bpe`` (llama.cpp: same split, merges
    kept); the file reads back with the ids of the tokenizer.json loaded by ``tokenizers`` itself. Qwen2's split
    with ignore_merges has no llama.cpp name and is refused."""
    cfg, params = jaxft.from_pretrained(models_dir["llama"][0])
    text = "abc xabc abc. ab"
    for ignore_merges, name in ((True, "llama-bpe"), (False, "smaug-bpe")):
        folder = _hand_made_bpe_folder(tmp_path / name, PRE_TOKENIZERS["llama-bpe"].split, ignore_merges)
        path = save_gguf(cfg, params, jaxft.load_tokenizer(folder), tmp_path / f"{name}.gguf", gguf_type="f32")
        assert gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == name
        oracle = Tokenizer.from_file(str(folder / "tokenizer.json"))
        assert jaxft.load_tokenizer(path).encode(text, add_special_tokens=False) == oracle.encode(text).ids
    folder = _hand_made_bpe_folder(tmp_path / "qwen", PRE_TOKENIZERS["qwen2"].split, True)
    with pytest.raises(GgufError, match="tokenizer.json: model.ignore_merges is true"):
        save_gguf(cfg, params, jaxft.load_tokenizer(folder), tmp_path / "q.gguf")
    assert not (tmp_path / "q.gguf").exists()


def _tokenizer_fields(path: Path) -> dict:
    fields = gguf.GGUFReader(path).fields
    return {key: field.contents() for key, field in fields.items() if key.startswith("tokenizer.")}


def test_a_sentencepiece_folder_with_tokenizer_json_exports_its_tokenizer_model(models_dir, tmp_path):
    """Hub Llama-2 / Mistral folders hold tokenizer.json beside tokenizer.model: the vocabulary is written from the
    latter, as llama.cpp's converter does, the same as from a folder with tokenizer.model alone."""
    base, adapter = models_dir["mistral"]
    folder = shutil.copytree(base, tmp_path / "saved")
    transformers.AutoTokenizer.from_pretrained(folder).save_pretrained(folder)   # transformers' tokenizer.json
    assert (folder / "tokenizer.json").is_file() and (folder / "tokenizer.model").is_file()
    path = _export(folder, adapter, tmp_path / "saved.gguf", "q8_0")
    fields = _tokenizer_fields(path)
    processor = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    pieces = range(processor.get_piece_size())
    assert fields["tokenizer.ggml.model"] == "llama"
    assert fields["tokenizer.ggml.tokens"][:len(pieces)] == [processor.id_to_piece(i) for i in pieces]
    added = {int(i) for i in json.loads((folder / "tokenizer_config.json").read_text()).get("added_tokens_decoder", {})}
    added |= {token["id"] for token in json.loads((folder / "tokenizer.json").read_text())["added_tokens"]}
    assert [fields["tokenizer.ggml.scores"][i] for i in pieces if i not in added] == pytest.approx(
        [processor.get_score(i) for i in pieces if i not in added])
    theirs = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    from_model, from_json = jaxft.load_tokenizer(base), jaxft.load_tokenizer(folder)
    for text in TEXTS + _corpus(20):
        assert theirs.encode(text) == from_model.encode(text), text
        # transformers' tokenizer.json does not split the model's user-defined pieces (<|im_...|>) out first
        if "<|im_" not in text:
            assert theirs.encode(text) == from_json.encode(text), text


def test_convert_then_export_gives_back_the_sentencepiece_vocabulary(models_dir, tmp_path):
    """``jaxft convert`` of a llama-vocabulary GGUF, then ``jaxft export --gguf`` of the folder: the same tokenizer
    metadata (pieces, scores, types, special ids) and the same ids; the folder's tokenizer.model is one that
    sentencepiece itself loads, with the file's pieces and scores."""
    base, adapter = models_dir["mistral"]
    first = _export(base, adapter, tmp_path / "first.gguf", "f32")
    assert main(["convert", str(first), "--out", str(tmp_path / "folder")]) == 0
    processor = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "folder" / "tokenizer.model"))
    fields = _tokenizer_fields(first)
    assert [processor.id_to_piece(i) for i in range(processor.get_piece_size())] == fields["tokenizer.ggml.tokens"]
    assert [processor.get_score(i) for i in range(processor.get_piece_size())] == fields["tokenizer.ggml.scores"]
    second = _export(tmp_path / "folder", None, tmp_path / "second.gguf", "f32")
    assert _tokenizer_fields(second) == fields
    first_tok, second_tok = jaxft.load_tokenizer(first), jaxft.load_tokenizer(second)
    for text in TEXTS + _corpus(20):
        assert second_tok.encode(text) == first_tok.encode(text), text


def _tiktoken_model(path: Path):
    """A tokenizer.model in tiktoken's format (base64 token, rank per line), as some Llama 3 repos ship beside their
    tokenizer.json: not a sentencepiece model."""
    path.write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))


def test_a_byte_level_folder_exports_its_tokenizer_json_whatever_tokenizer_model_is_beside_it(models_dir, tmp_path):
    """Llama 3's byte-level tokenizer.json beside a tiktoken-format tokenizer.model, or beside a stray sentencepiece
    one (Mistral's), exports the same tokenizer metadata as the folder without it (llama.cpp's converter falls back
    to tokenizer.json where sentencepiece cannot read the file)."""
    base = models_dir["llama"][0]
    plain = _tokenizer_fields(_export(base, None, tmp_path / "plain.gguf", "f32"))
    assert plain["tokenizer.ggml.model"] == "gpt2"
    for name, write_model in (("tiktoken", _tiktoken_model),
                              ("stray", lambda path: shutil.copy(models_dir["mistral"][0] / "tokenizer.model", path))):
        folder = shutil.copytree(base, tmp_path / name)
        write_model(folder / "tokenizer.model")
        assert _tokenizer_fields(_export(folder, None, tmp_path / f"{name}.gguf", "f32")) == plain


def test_a_tokenizer_model_sentencepiece_cannot_read_is_named(models_dir, tmp_path, capsys):
    """Beside a sentencepiece tokenizer.json (transformers' conversion of Mistral's), a tokenizer.model that is not
    a sentencepiece model is an error naming it (exit 2, no traceback), and nothing is written."""
    folder = shutil.copytree(models_dir["mistral"][0], tmp_path / "saved")
    transformers.AutoTokenizer.from_pretrained(folder).save_pretrained(folder)
    _tiktoken_model(folder / "tokenizer.model")
    assert main(["export", str(folder), "--gguf", str(tmp_path / "m.gguf")]) == 2
    assert f"{folder / 'tokenizer.model'}: not a sentencepiece model" in capsys.readouterr().err
    assert not (tmp_path / "m.gguf").exists()


def test_a_tokenizer_model_of_another_vocabulary_is_refused_both_ways(models_dir, tmp_path):
    """Beside a sentencepiece tokenizer.json, a tokenizer.model is refused by name, nothing written, when one of its
    pieces has another id in tokenizer.json (two pieces swapped), or when tokenizer.json has a token past its
    pieces that is no added token (it would be written as an unused [PAD] id)."""
    cfg, params = jaxft.from_pretrained(models_dir["mistral"][0])
    folder = shutil.copytree(models_dir["mistral"][0], tmp_path / "saved")
    transformers.AutoTokenizer.from_pretrained(folder).save_pretrained(folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    pieces = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).get_piece_size()
    vocab = spec["model"]["vocab"]
    first, second = (next(t for t, i in vocab.items() if i == n) for n in (100, 101))
    swapped = {**vocab, first: 101, second: 100}
    grown = {**vocab, "zzqq": pieces}
    for model_vocab, error in ((swapped, r"saved/tokenizer\.model: piece 100 .* has id 101 in the tokenizer\.json"),
                               (grown, rf"saved/tokenizer\.model: has {pieces} pieces, .* id {pieces} .* neither")):
        (folder / "tokenizer.json").write_text(json.dumps({**spec, "model": {**spec["model"], "vocab": model_vocab}}))
        with pytest.raises(GgufError, match=error):
            save_gguf(cfg, params, jaxft.load_tokenizer(folder), tmp_path / "m.gguf",
                      sentencepiece_model=folder / "tokenizer.model")
        assert not (tmp_path / "m.gguf").exists()
