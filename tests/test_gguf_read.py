"""Reading GGUF files (jaxft.gguf.read, jaxft.gguf.tokenizer, jaxft convert) against transformers' own GGUF loader.

Tiny GGUF files are written here as llama.cpp's converter writes them (tests/gguf_files.py). The oracle is
transformers loading the same file (``from_pretrained(dir, gguf_file=name)``): its logits, its tokenizer's ids
and chat-template ids. For the types ``gguf.quants`` can quantize, the tensors are the HF model's weights
quantized; for the K-quants (Q2_K-Q6_K), which it only dequantizes, the down projections (whose 256-wide rows fit a
K-quant block; the others fall back to Q8_0, as llama.cpp does) are random blocks, and transformers' loader reads
them with the same ``gguf.quants.dequantize`` jaxft uses, so there the logits cover the reading, layout and model;
the dequantized values themselves are checked against transformers' separate torch dequantizers
(``integrations/gguf/dequant.py``: Q8_0, Q4_0, Q4_1 and every K-quant).
"""
from __future__ import annotations

import json
import shutil

import gguf
import jax
import numpy as np
import pytest
import tokenizers
import torch
import transformers

import jaxft
from jaxft.cli import main as cli
from jaxft.gguf.convert import gguf_to_hf
from jaxft.gguf.layout import PRE_TOKENIZERS, GgufError
from jaxft.ops import nf4

import gguf_files
from gguf_files import Q

FAMILIES = ("llama", "mistral", "qwen2")
TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
TEXTS = ["hello world", " hello  world", "  leading and trailing  ", "café über naïve 東京 🦙",
         "line\nbreaks\n\n\ttabs",
         "<|begin_of_text|>special<|eot_id|> tokens <|start_header_id|>", "<s>hello</s> world <unk>",
         "<|im_start|>user\nhi<|im_end|><|endoftext|>", "[INST] the fox [/INST]", "", "42 2024 123456"]
CHAT = [{"role": "user", "content": "hello world, café?"}, {"role": "assistant", "content": "the quick brown fox"},
        {"role": "user", "content": "  a lazy dog 42\n"}]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    """Per family: a HF folder with its tokenizer, and the folder the GGUF files are written into."""
    root = tmp_path_factory.mktemp("gguf")
    return {family: gguf_files.hf_folder(root / family / "hf", family, seed=i)[0]
            for i, family in enumerate(FAMILIES)}


def _gguf(folders, family: str, qtype: str, **kwargs):
    """The family's model written as ``<family>-<qtype>.gguf`` beside its folder (once per module)."""
    path = folders[family].parent / f"{family}-{qtype}.gguf"
    if kwargs or not path.exists():
        gguf_files.write_gguf(folders[family], path, getattr(Q, qtype), **kwargs)
    return path


def _transformers_logits(path, ids) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.numpy()


def _ids(vocab: int) -> np.ndarray:
    return np.random.default_rng(0).integers(3, vocab, (2, 11))


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_gguf_loader(folders, family, qtype):
    path = _gguf(folders, family, qtype)
    cfg, params = jaxft.from_pretrained(path)
    ids = _ids(cfg.vocab_size)
    ours = np.asarray(jaxft.forward(cfg, params, ids))
    np.testing.assert_allclose(ours, _transformers_logits(path, ids), atol=1e-4, rtol=0)


def test_types_written_are_the_types_read(folders):
    """The files hold what the tests claim: the K-quant file's down projections are Q4_K, its other matrices Q8_0."""
    from jaxft.gguf.read import GgufCheckpoint

    ckpt = GgufCheckpoint(_gguf(folders, "llama", "Q4_K"))
    assert ckpt.gguf_type("model.layers.1.mlp.down_proj.weight") == Q.Q4_K
    assert ckpt.gguf_type("model.layers.1.self_attn.q_proj.weight") == Q.Q8_0
    assert ckpt.gguf_type("model.norm.weight") == Q.F32


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_dequantized_values_match_an_independent_dequantizer(folders, qtype):
    """transformers' own torch dequantizers (integrations/gguf/dequant.py, written apart from gguf-py's numpy ones)
    give the values jaxft reads, for the types they cover; this checks the K-quant blocks beyond the shared
    gguf.quants path of the logit tests."""
    from transformers.integrations.gguf.dequant import dequantize as torch_dequantize

    from jaxft.gguf.read import GgufCheckpoint

    ckpt = GgufCheckpoint(_gguf(folders, "llama", qtype))
    name = "model.layers.1.mlp.down_proj.weight"  # 256-wide rows: every type's blocks fit, and it is not permuted
    assert ckpt.gguf_type(name) == getattr(Q, qtype)
    raw = torch.from_numpy(np.array(ckpt.tensors[ckpt.gguf_names[name]].data, np.uint8).reshape(-1))
    expected = torch_dequantize(raw, int(getattr(Q, qtype))).numpy().reshape(ckpt.shape(name))
    np.testing.assert_allclose(ckpt.get(name), expected, rtol=1e-6, atol=1e-7)


def test_unquantized_file_holds_the_hf_models_weights(folders):
    """q/k rows come back in HF's order: an F32 file reads as the folder's own tensors, bit for bit."""
    from jaxft.hf.checkpoint import HFCheckpoint
    from jaxft.gguf.read import GgufCheckpoint

    ours, theirs = GgufCheckpoint(_gguf(folders, "llama", "F32")), HFCheckpoint(folders["llama"])
    assert sorted(ours.keys()) == sorted(theirs.keys())
    for name in theirs.keys():
        np.testing.assert_array_equal(ours.get(name), theirs.get(name), err_msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_matches_transformers(folders, family):
    path = _gguf(folders, family, "Q8_0")
    ours = jaxft.load_tokenizer(path)
    theirs = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS:
        if family == "llama" and "<|endoftext|>" in text:
            continue  # transformers adds GPT-2's <|endoftext|> as id 300, past this model's vocabulary
        assert ours.encode(text) == theirs.encode(text), text
        assert ours.decode(ours.encode(text)) == theirs.decode(theirs.encode(text)), text
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.chat_template == theirs.chat_template is not None
    for prompt in (False, True):
        expected = theirs.apply_chat_template(CHAT, add_generation_prompt=prompt, tokenize=True, return_dict=False)
        assert ours.apply_chat_template(CHAT, add_generation_prompt=prompt) == list(expected)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_convert_writes_a_folder_transformers_loads(folders, family, tmp_path):
    path = _gguf(folders, family, "Q4_K")
    out = tmp_path / "converted"
    assert cli(["convert", str(path), "--out", str(out)]) == 0
    cfg, _ = jaxft.from_pretrained(path)
    ids = _ids(cfg.vocab_size)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        converted = model(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_array_equal(converted, _transformers_logits(path, ids))
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    gguf_tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS[:6]:
        assert tokenizer.encode(text) == gguf_tokenizer.encode(text), text
    assert (tokenizer.apply_chat_template(CHAT, tokenize=True, return_dict=False)
            == gguf_tokenizer.apply_chat_template(CHAT, tokenize=True, return_dict=False))


def test_a_sentencepiece_file_with_merges_and_no_scores_converts(folders, tmp_path):
    """A llama vocabulary with merges and no scores (llama.cpp reads it) converts to a folder without tokenizer.model
    (which needs scores) whose tokenizer gives the ids transformers' GGUF loader gives for the file with scores."""
    path = gguf_files.write_gguf(folders["mistral"], tmp_path / "merges.gguf", omit=("token_scores",))
    fields = gguf.GGUFReader(path).fields
    assert "tokenizer.ggml.scores" not in fields and "tokenizer.ggml.merges" in fields
    assert cli(["convert", str(path), "--out", str(tmp_path / "hf")]) == 0
    assert not (tmp_path / "hf" / "tokenizer.model").exists()
    scored = _gguf(folders, "mistral", "F32")
    oracle = transformers.AutoTokenizer.from_pretrained(scored.parent, gguf_file=scored.name)
    converted = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in TEXTS:
        assert converted.encode(text) == oracle.encode(text), text


def test_a_vocabulary_sentencepiece_refuses_is_named_by_convert(folders, tmp_path, capsys):
    """A llama vocabulary with a piece twice is no sentencepiece model (sentencepiece itself refuses it): convert
    says so naming the GGUF file, exit 2, and writes no folder."""
    def duplicate_a_piece(tokens):
        tokens[100] = tokens[101]

    path = gguf_files.write_gguf(folders["mistral"], tmp_path / "twice.gguf", edit_tokens=duplicate_a_piece)
    assert cli(["convert", str(path), "--out", str(tmp_path / "hf")]) == 2
    assert f"{path}: its llama vocabulary is no sentencepiece model" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_convert_refuses_an_existing_folder_without_overwrite(folders, tmp_path, capsys):
    path = _gguf(folders, "qwen2", "F16")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli(["convert", str(path), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert cli(["convert", str(path), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_nf4_from_gguf_equals_nf4_from_the_converted_folder(folders, tmp_path):
    """A GGUF base loads straight into QLoRA: the same 4-bit params, bit for bit, as from its converted folder."""
    path = _gguf(folders, "mistral", "Q5_K")
    out = gguf_to_hf(path, tmp_path / "converted")
    _, from_gguf = jaxft.from_pretrained(path, quant="nf4")
    _, from_folder = jaxft.from_pretrained(out, quant="nf4")
    is_q = lambda x: isinstance(x, nf4.QuantizedTensor)  # noqa: E731
    assert any(is_q(x) for x in jax.tree.leaves(from_gguf, is_leaf=is_q))
    assert jax.tree.structure(from_gguf) == jax.tree.structure(from_folder)
    for a, b in zip(jax.tree.leaves(from_gguf), jax.tree.leaves(from_folder)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_mesh_and_dtype_load_as_for_a_folder(folders):
    from jaxft.parallel import MeshConfig, make_mesh

    path = _gguf(folders, "qwen2", "Q6_K")
    _, dense = jaxft.from_pretrained(path, dtype="bfloat16")
    _, sharded = jaxft.from_pretrained(path, dtype="bfloat16", mesh=make_mesh(MeshConfig(2, 2, 2)))
    leaves = jax.tree.leaves(sharded)
    assert all(x.dtype == jax.numpy.bfloat16 for x in leaves)
    assert any(len(x.sharding.device_set) > 1 for x in leaves)
    for a, b in zip(jax.tree.leaves(dense), leaves):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_tied_embeddings_when_the_file_has_no_output_tensor(tmp_path):
    folder, model = gguf_files.hf_folder(tmp_path / "hf", "qwen2", tie_word_embeddings=True)
    path = gguf_files.write_gguf(folder, tmp_path / "tied.gguf", Q.Q8_0)
    cfg, params = jaxft.from_pretrained(path)
    assert cfg.tie_word_embeddings and "lm_head" not in params
    ids = _ids(cfg.vocab_size)
    np.testing.assert_allclose(np.asarray(jaxft.forward(cfg, params, ids)), _transformers_logits(path, ids),
                               atol=1e-4, rtol=0)


def test_wrong_architecture_names_the_file_and_the_supported_ones(folders, tmp_path):
    path = gguf_files.write_gguf(folders["llama"], tmp_path / "phi.gguf", arch="phi3")
    for load in (jaxft.from_pretrained, jaxft.load_tokenizer):
        with pytest.raises(GgufError, match=r"phi\.gguf.*'phi3'.*\['llama', 'qwen2'\]"):
            load(path)


def test_unsupported_tensor_type_names_the_file_tensor_and_type(folders, tmp_path):
    path = gguf_files.write_gguf(folders["llama"], tmp_path / "iq.gguf", types={"blk.1.ffn_down.weight": Q.IQ4_NL})
    with pytest.raises(GgufError, match=r"iq\.gguf: tensor 'blk\.1\.ffn_down\.weight' has type IQ4_NL"):
        jaxft.from_pretrained(path)


def test_truncated_file_is_an_error_naming_it(folders, tmp_path):
    data = _gguf(folders, "llama", "Q4_0").read_bytes()
    for cut in (len(data) - 100, len(data) // 2, 40):
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(GgufError, match=rf"cut{cut}\.gguf: not a readable GGUF file, or truncated"):
            jaxft.from_pretrained(path)


def test_missing_metadata_key_and_unknown_tensor_are_named(folders, tmp_path):
    path = gguf_files.write_gguf(folders["qwen2"], tmp_path / "nokey.gguf", omit=("block_count",))
    with pytest.raises(GgufError, match=r"nokey\.gguf: metadata key 'qwen2\.block_count' is missing"):
        jaxft.from_pretrained(path)
    path = gguf_files.write_gguf(folders["llama"], tmp_path / "extra.gguf", extra_tensor="blk.0.attn_q_norm.weight")
    with pytest.raises(GgufError, match=r"extra\.gguf: tensor\(s\) \['blk\.0\.attn_q_norm\.weight'\] are not part"):
        jaxft.from_pretrained(path)
    path = gguf_files.write_gguf(folders["llama"], tmp_path / "freqs.gguf", extra_tensor="rope_freqs.weight")
    with pytest.raises(GgufError, match=r"freqs\.gguf: tensor 'rope_freqs\.weight' holds rope divisors that are not"):
        jaxft.from_pretrained(path)


def test_llama3_rope_scaling_from_rope_freqs(tmp_path):
    """Llama 3.1's rope scaling, which llama.cpp stores only as a rope_freqs tensor, reads back as transformers'
    llama3 rope: jaxft's logits from the GGUF are the HF model's (transformers' GGUF loader drops the tensor)."""
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_theta": 10000.0}
    folder, model = gguf_files.hf_folder(tmp_path / "hf", "llama", rope_parameters=rope)
    path = gguf_files.write_gguf(folder, tmp_path / "llama31.gguf", Q.F32)
    cfg, params = jaxft.from_pretrained(path)
    assert cfg.rope.rope_type == "llama3" and cfg.rope.factor == 8.0
    ids = _ids(cfg.vocab_size)
    with torch.no_grad():
        expected = model(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(jaxft.forward(cfg, params, ids)), expected, atol=1e-4, rtol=0)
    unscaled = np.asarray(jaxft.forward(cfg.replace(rope=jaxft.RopeConfig()), params, ids))
    assert np.abs(unscaled - expected).max() > 1e-3  # the scaling changes these logits


def test_unknown_pre_tokenizer_is_an_error_naming_it(folders, tmp_path):
    """Another split than the vocabulary's merges were learned on would give other ids: refused, as in llama.cpp."""
    path = gguf_files.write_gguf(folders["qwen2"], tmp_path / "pre.gguf", pre="made-up")
    with pytest.raises(GgufError, match=r"pre\.gguf: tokenizer\.ggml\.pre 'made-up'"):
        jaxft.load_tokenizer(path)


def test_smollm_pre_tokenizer_splits_each_digit_off_as_smollm_tokenizer_json_does(folders, tmp_path):
    """SmolLM's tokenizer.json: Digits(individual_digits) then GPT-2's ByteLevel split; the oracle is the folder's
    own vocabulary and merges loaded by transformers with that pre-tokenizer (transformers' GGUF loader drops the
    digit split, so it is not the oracle here)."""
    from tokenizers import pre_tokenizers

    path = gguf_files.write_gguf(folders["qwen2"], tmp_path / "smollm.gguf", pre="smollm")
    theirs = transformers.AutoTokenizer.from_pretrained(folders["qwen2"])
    theirs.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    ours = jaxft.load_tokenizer(path)
    gpt2_split = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in [*TEXTS, "answer  42 and 2024", "x  7"]:
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False), text
    assert ours.encode("42") == [theirs.convert_tokens_to_ids("4"), theirs.convert_tokens_to_ids("2")]
    assert ours.encode("42") != gpt2_split.encode("42")  # the corpus's "42" is one token without the split


def test_a_run_config_naming_a_gguf_file_says_to_convert_it(folders, tmp_path, capsys):
    """A run's base is fingerprinted and exported by its HF files, so a GGUF base goes through jaxft convert."""
    import yaml

    path = _gguf(folders, "llama", "Q8_0")
    config = {"model": str(path), "output_dir": str(tmp_path / "run"), "method": "qlora",
              "data": {"paths": [str(tmp_path / "train.jsonl")], "max_length": 32, "batch_size": 2},
              "train": {"steps": 1}}
    (tmp_path / "train.jsonl").write_text('{"text": "hello world"}\n')
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert cli(["train", str(tmp_path / "run.yaml")]) == 2
    assert f"jaxft convert {path} --out DIR" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "run").exists()


def _vocabulary_file(path, tok: tokenizers.Tokenizer, pre: str, add_bos: bool | None = None, bos: int | None = None):
    """A GGUF file holding only the metadata of ``tok`` as a ``gpt2`` vocabulary with ``tokenizer.ggml.pre``."""
    by_id = sorted(tok.get_vocab().items(), key=lambda item: item[1])
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list([token for token, _ in by_id])
    writer.add_token_types([gguf.TokenType.NORMAL] * len(by_id))
    writer.add_token_merges(["a b"])
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    if bos is not None:
        writer.add_bos_token_id(bos)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("pre,ignore_merges", [("llama-bpe", True), ("llama3", True), ("smaug-bpe", False)])
def test_ignore_merges_follows_the_pre_tokenizer_as_in_llama_cpp(tmp_path, pre, ignore_merges):
    """The oracle: the HF tokenizer.json (ignore_merges as llama.cpp sets it for ``pre``) loaded by tokenizers."""
    text = "abc xabc abc. ab"
    hf = gguf_files.hand_made_bpe(PRE_TOKENIZERS["llama-bpe"].split, ignore_merges)
    hf.save(str(tmp_path / "tokenizer.json"))
    oracle = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert json.loads((tmp_path / "tokenizer.json").read_text())["model"]["ignore_merges"] is ignore_merges
    other = gguf_files.hand_made_bpe(PRE_TOKENIZERS["llama-bpe"].split, not ignore_merges)
    assert oracle.encode(text).ids != other.encode(text).ids   # the flag matters here
    ours = jaxft.load_tokenizer(_vocabulary_file(tmp_path / "v.gguf", hf, pre, add_bos=False))
    assert ours.encode(text) == oracle.encode(text).ids
    assert ours.decode(ours.encode(text)) == text


@pytest.mark.parametrize("pre,adds_bos", [("llama-bpe", True), ("llama-v3", True), ("smaug-bpe", False),
                                          ("qwen2", False), ("gpt-2", False)])
def test_bos_default_without_add_bos_token_is_llama_cpps(tmp_path, pre, adds_bos):
    """No tokenizer.ggml.add_bos_token: llama.cpp (llama-vocab.cpp) adds BOS for the llama3 names and tekken, not
    for the others."""
    hf = gguf_files.hand_made_bpe(PRE_TOKENIZERS["llama-bpe"].split, PRE_TOKENIZERS[pre].ignore_merges)
    bos = hf.get_vocab_size() - 1
    ours = jaxft.load_tokenizer(_vocabulary_file(tmp_path / "v.gguf", hf, pre, bos=bos))
    plain = ours.encode("abc ab", add_special_tokens=False)
    assert ours.encode("abc ab") == ([bos] if adds_bos else []) + plain


def test_sentencepiece_vocabulary_adds_bos_by_default(folders, tmp_path):
    """A llama (sentencepiece) vocabulary without add_bos_token: llama.cpp's default is to add BOS (id 1 here)."""
    folder = shutil.copytree(folders["mistral"], tmp_path / "hf")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "add_bos_token"}))
    path = gguf_files.write_gguf(folder, tmp_path / "m.gguf")
    assert "tokenizer.ggml.add_bos_token" not in gguf.GGUFReader(path).fields
    ours = jaxft.load_tokenizer(path)
    assert ours.encode("hello world") == [1] + ours.encode("hello world", add_special_tokens=False)


def test_a_converted_sentencepiece_file_exports_back_with_its_ids(folders, tmp_path):
    """A llama-vocabulary file as llama.cpp's converter writes it, converted to a folder and exported again: the
    same pieces, and transformers' GGUF tokenizer gives the same ids for both files."""
    path = _gguf(folders, "mistral", "F32")
    assert cli(["convert", str(path), "--out", str(tmp_path / "hf")]) == 0
    assert cli(["export", str(tmp_path / "hf"), "--gguf", str(tmp_path / "back.gguf"), "--gguf-type", "f32"]) == 0
    tokens = [gguf.GGUFReader(p).fields["tokenizer.ggml.tokens"].contents() for p in (path, tmp_path / "back.gguf")]
    assert tokens[0] == tokens[1]
    before = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    after = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="back.gguf")
    for text in TEXTS:
        assert after.encode(text) == before.encode(text), text
