"""HF folder round trips (through transformers) and clear errors on bad checkpoints."""
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import jaxft
from hf_oracle import build, random_ids, save, torch_logits
from jaxft.hf.safetensors_io import SafetensorsFile


def test_save_then_transformers_load_gives_same_logits(tmp_path):
    model = build("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1,
                  rope_scaling=dict(rope_type="yarn", factor=2.0, original_max_position_embeddings=32))
    ids = random_ids((2, 12))
    cfg, params = jaxft.from_pretrained(save(model, tmp_path / "in"))
    jaxft.save_pretrained(cfg, params, tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    assert type(reloaded) is type(model)
    np.testing.assert_allclose(torch_logits(reloaded, ids), torch_logits(model, ids), atol=1e-5, rtol=0)


def test_tied_llama3_round_trip_through_transformers(tmp_path):
    model = build("llama", tie_word_embeddings=True, rope_scaling=dict(
        rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))
    ids = random_ids((1, 10))
    cfg, params = jaxft.from_pretrained(save(model, tmp_path / "in"))
    assert "lm_head" not in params
    jaxft.save_pretrained(cfg, params, tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    np.testing.assert_allclose(torch_logits(reloaded, ids), torch_logits(model, ids), atol=1e-5, rtol=0)


def test_bf16_checkpoint_round_trips_bit_exactly(tmp_path):
    model = build("llama", dtype=torch.bfloat16)
    save(model, tmp_path / "in")
    cfg, params = jaxft.from_pretrained(tmp_path / "in", dtype="bfloat16")
    jaxft.save_pretrained(cfg, params, tmp_path / "out")
    a, b = SafetensorsFile(tmp_path / "in" / "model.safetensors"), SafetensorsFile(tmp_path / "out" / "model.safetensors")
    assert sorted(a.keys()) == sorted(b.keys())
    for name in a.keys():
        assert a.get(name).dtype == b.get(name).dtype
        assert a.get(name).tobytes() == b.get(name).tobytes(), name


def test_sharded_checkpoint_loads(tmp_path):
    model = build("llama")
    save(model, tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    cfg, params = jaxft.from_pretrained(tmp_path / "sharded")
    ids = random_ids((1, 8))
    np.testing.assert_allclose(np.asarray(jaxft.forward(cfg, params, jnp.asarray(ids))), torch_logits(model, ids),
                               atol=1e-4, rtol=0)
    jaxft.save_pretrained(cfg, params, tmp_path / "resharded", max_shard_bytes=40_000)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "resharded")
    np.testing.assert_allclose(torch_logits(reloaded, ids), torch_logits(model, ids), atol=1e-5, rtol=0)


def test_rope_parameters_spelling_reads_like_legacy_rope_scaling(tmp_path):
    model = build("llama", rope_scaling=dict(rope_type="linear", factor=3.0))
    folder = save(model, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    legacy = {k: v for k, v in config.items() if k != "rope_parameters"}
    legacy["rope_theta"] = 10000.0
    legacy["rope_scaling"] = {"type": "linear", "factor": 3.0}
    from jaxft.hf.config import config_from_hf
    assert config_from_hf(legacy) == config_from_hf(config)
    assert config_from_hf(config).rope.factor == 3.0


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory):
    return save(build("llama"), tmp_path_factory.mktemp("good") / "m")


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_config_key_is_named(tmp_path, good_folder):
    folder = _copy(good_folder, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    del config["hidden_size"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(jaxft.ConfigError, match="hidden_size"):
        jaxft.from_pretrained(folder)


def test_unknown_model_type_is_named(tmp_path, good_folder):
    folder = _copy(good_folder, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(jaxft.ConfigError, match="'gpt2' is not supported"):
        jaxft.from_pretrained(folder)


def test_malformed_json_names_file_and_line(tmp_path, good_folder):
    folder = _copy(good_folder, tmp_path / "m")
    (folder / "config.json").write_text('{\n  "model_type": "llama",\n  "hidden_size": 64,,\n}')
    with pytest.raises(jaxft.ConfigError, match=r"config.json: malformed JSON at line 3"):
        jaxft.from_pretrained(folder)


def test_wrong_tensor_shape_is_named(tmp_path, good_folder):
    folder = _copy(good_folder, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(jaxft.CheckpointError, match=r"mlp.gate_proj.weight' has shape \[112, 64\], expected \[96, 64\]"):
        jaxft.from_pretrained(folder)


def test_missing_tensor_is_named(tmp_path, good_folder):
    folder = _copy(good_folder, tmp_path / "m")
    from jaxft.hf.safetensors_io import write_safetensors
    st = SafetensorsFile(folder / "model.safetensors")
    tensors = {k: np.array(st.get(k)) for k in st.keys() if k != "model.layers.1.self_attn.k_proj.weight"}
    del st
    write_safetensors(folder / "model.safetensors", tensors)
    with pytest.raises(jaxft.CheckpointError, match=r"missing .*model.layers.1.self_attn.k_proj.weight"):
        jaxft.from_pretrained(folder)


def test_truncated_safetensors_is_detected(tmp_path, good_folder):
    folder = _copy(good_folder, tmp_path / "m")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(jaxft.CheckpointError, match="truncated"):
        jaxft.from_pretrained(folder)


def test_pickle_only_folder_is_refused_without_unpickling(tmp_path, good_folder):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_bytes((good_folder / "config.json").read_bytes())
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 this would run code if unpickled")
    with pytest.raises(jaxft.CheckpointError, match="only pickle checkpoints found .*pytorch_model.bin"):
        jaxft.from_pretrained(folder)


def test_folder_without_config_is_named(tmp_path):
    with pytest.raises(jaxft.CheckpointError, match="no config.json"):
        jaxft.from_pretrained(tmp_path)


def test_save_refuses_to_overwrite_unless_asked(tmp_path, good_folder):
    cfg, params = jaxft.from_pretrained(good_folder)
    out = jaxft.save_pretrained(cfg, params, tmp_path / "out")
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        jaxft.save_pretrained(cfg, params, out)
    assert (out / "model.safetensors").read_bytes() == before
    jaxft.save_pretrained(cfg, params, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders left behind
