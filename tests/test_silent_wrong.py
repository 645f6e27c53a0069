"""No silent wrong results (#13 section 2): token ids without an embedding row, weights that overflow the load
dtype, and runs whose every update the non-finite guard drops are refused before anything is trained or exported.

The CLI cases that fit the bad-input table are in tests/test_bad_input.py; these need the Python API, a mesh or
a training run. The chat template that ignores add_generation_prompt is tested in tests/test_data_chat.py.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy as safetensors_numpy
import torch
import transformers

import jaxft
from jaxft.cli import main
from jaxft.data import DataConfig, DataError, build_iterator
from jaxft.hf.safetensors_io import CheckpointError
from jaxft.recipes import demo
from jaxft.recipes.config import TrainConfig
from jaxft.train.metrics import SkipGuard, TrainingDiverged


HOT = "model.layers.1.mlp.down_proj.weight"


def oversized_tokenizer_model(model: Path, out: Path) -> Path:
    """``model`` with one token added to its tokenizer (``frobnicate``) and its weights and config.json unchanged:
    the tokenizer now has one id more than the embedding has rows."""
    from tokenizers import Tokenizer

    shutil.copytree(model, out)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.add_tokens(["frobnicate"]) == 1
    tok.save(str(out / "tokenizer.json"))
    return out


def oov_chats(path: Path) -> Path:
    """Four chats whose assistant turns use the added token."""
    demo.write_jsonl(path, [[{"role": "user", "content": f"increment {i} 2"},
                             {"role": "assistant", "content": f"frobnicate {i + 1} 3"}] for i in range(4)])
    return path


def overflowing_model(model: Path, out: Path, dtype=torch.bfloat16, scale=1e7) -> Path:
    """``model`` saved by transformers in ``dtype``, with ``HOT`` scaled past float16's range."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    with torch.no_grad():
        hf.get_parameter(HOT).mul_(scale)
    hf.to(dtype).save_pretrained(out)
    for f in model.glob("tokenizer*"):
        shutil.copy(f, out / f.name)
    return out


def overflowing_copy(model: Path, out: Path, scale=1e7) -> Path:
    """``model`` (float32) copied with ``HOT`` scaled past float16's range, by the safetensors library alone."""
    shutil.copytree(model, out)
    tensors = safetensors_numpy.load_file(out / "model.safetensors")
    tensors[HOT] *= scale
    safetensors_numpy.save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_build_iterator_refuses_token_ids_beyond_vocab_size_naming_record_id_and_fix(tiny_run, tmp_path):
    big = oversized_tokenizer_model(tiny_run / "model", tmp_path / "big")
    data = oov_chats(tmp_path / "oov.jsonl")
    vocab_size = json.loads((big / "config.json").read_text())["vocab_size"]
    added = transformers.AutoTokenizer.from_pretrained(big).convert_tokens_to_ids("frobnicate")  # the oracle
    assert added >= vocab_size
    config = DataConfig(paths=(str(data),), max_length=32, batch_size=2, dedup=None)
    with pytest.raises(DataError) as err:
        build_iterator(config, jaxft.load_tokenizer(big), vocab_size=vocab_size)
    message = str(err.value)
    assert message.startswith(f"{data}:1: token id beyond the model's vocabulary: token id {added} ('frobnicate')")
    assert f"vocab_size {vocab_size}" in message and "4 of 4 samples" in message
    assert "resize_token_embeddings(len(tokenizer))" in message
    # the same data through the model's own tokenizer maps the word to [UNK], which fits
    build_iterator(config, jaxft.load_tokenizer(tiny_run / "model"), vocab_size=vocab_size)


def test_build_iterator_refuses_a_pad_id_beyond_vocab_size(tiny_run, tmp_path):
    big = oversized_tokenizer_model(tiny_run / "model", tmp_path / "big")
    tok_config = json.loads((big / "tokenizer_config.json").read_text())
    (big / "tokenizer_config.json").write_text(json.dumps({**tok_config, "pad_token": "frobnicate"}))
    vocab_size = json.loads((big / "config.json").read_text())["vocab_size"]
    config = DataConfig(paths=(str(tiny_run / "train.jsonl"),), max_length=32, batch_size=2)
    with pytest.raises(DataError, match=rf"pad token 'frobnicate'.*id {vocab_size} has no embedding row"):
        build_iterator(config, jaxft.load_tokenizer(big), vocab_size=vocab_size)


@pytest.mark.parametrize("source_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("sharded", [False, True], ids=["whole", "sharded"])
def test_float16_load_of_weights_beyond_its_range_names_the_tensor_and_its_largest_value(tiny_run, tmp_path,
                                                                                         source_dtype, sharded):
    hot = overflowing_model(tiny_run / "model", tmp_path / "hot", source_dtype)
    weight = safetensors_numpy.load_file(hot / "model.safetensors")[HOT] if source_dtype == torch.float32 else \
        transformers.AutoModelForCausalLM.from_pretrained(hot, dtype=torch.float32).get_parameter(HOT).detach().numpy()
    largest = float(np.abs(weight).max())
    assert torch.isinf(torch.from_numpy(weight).to(torch.float16)).any()  # what loading it as float16 gives
    mesh = jaxft.parallel.make_mesh(jaxft.parallel.MeshConfig(2, 2, 2)) if sharded else None
    with pytest.raises(CheckpointError) as err:
        jaxft.from_pretrained(hot, dtype="float16", mesh=mesh)
    assert f"tensor {HOT!r} holds values up to {largest:.6g} in magnitude, beyond float16's largest finite " \
           "value 65504" in str(err.value)
    assert "bfloat16 or float32" in str(err.value)
    _, params = jaxft.from_pretrained(hot, dtype="bfloat16", mesh=mesh)  # the suggested fix loads
    kernel = np.asarray(params["layers"]["down_proj"]["kernel"][1], np.float32)
    np.testing.assert_allclose(kernel, weight.T, rtol=2 ** -8)


def test_float16_load_within_range_and_inf_already_in_the_file_are_not_refused(tiny_run, tmp_path):
    """Only finite values that the cast turns into inf are an overflow; a checkpoint that holds inf itself loads
    as it is (the training guard deals with what that does)."""
    tensors = safetensors_numpy.load_file(tiny_run / "model" / "model.safetensors")
    _, params = jaxft.from_pretrained(tiny_run / "model", dtype="float16")
    np.testing.assert_array_equal(np.asarray(params["layers"]["down_proj"]["kernel"][1]),
                                  tensors[HOT].T.astype(np.float16))
    inf_base = _base_with_inf(tiny_run / "model", tmp_path / "inf")
    _, params = jaxft.from_pretrained(inf_base, dtype="float16")
    assert np.isinf(np.asarray(params["layers"]["q_proj"]["kernel"][0])).sum() == 1


def _base_with_inf(model: Path, out: Path) -> Path:
    """``model`` with one inf in layer 0's q_proj: every forward pass, so every gradient, is non-finite."""
    shutil.copytree(model, out)
    tensors = safetensors_numpy.load_file(out / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.weight"][0, 0] = np.inf
    safetensors_numpy.save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _train_records(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]


def test_training_that_explodes_stops_after_max_skipped_steps_naming_step_loss_and_grad_norm(tiny_run, tmp_path,
                                                                                              capsys):
    """lr 1e38: the first update sends lora_b to ~1e38, the activations overflow, every later gradient is NaN.
    (lr 1e30 is not enough: the huge q and v saturate softmax, and RMSNorm scales them back.)"""
    out = tmp_path / "run"
    code = main(["train", str(tiny_run / "run.yaml"), "--set", "optim.lr=1e38", "--set", "train.steps=10",
                 "--set", "train.max_skipped_steps=3", "--set", f"output_dir={out}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    records = _train_records(out)
    assert [r["skipped"] for r in records[:4]] == [0, 1, 1, 1]  # the log itself, independent of the guard
    assert all(not np.isfinite(r["grad_norm"]) for r in records[1:4])
    loss, grad_norm = records[3]["loss"], records[3]["grad_norm"]
    assert "step 4: 3 steps in a row were skipped (train.max_skipped_steps 3)" in err
    assert f"at step 4: loss {loss:.4g}, grad norm {grad_norm:.4g}" in err
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()


def test_run_whose_every_step_was_skipped_is_an_error_even_below_the_limit(tiny_run, tmp_path):
    base = _base_with_inf(tiny_run / "model", tmp_path / "inf-base")
    cfg = jaxft.recipes.config.load_run_config(tiny_run / "run.yaml", [f"model={base}",
                                                                        f"output_dir={tmp_path / 'run'}"])
    assert cfg.train.steps == 3 < TrainConfig().max_skipped_steps == 25
    with pytest.raises(TrainingDiverged, match=r"every one of the 3 step\(s\) this run took was skipped .*"
                                               r"at step 3: loss nan, grad norm nan"):
        jaxft.recipes.sft.run(cfg)
    assert [r["skipped"] for r in _train_records(tmp_path / "run")] == [1, 1, 1]
    assert not (tmp_path / "run" / "adapter").exists() and not (tmp_path / "run" / "summary.json").exists()


def test_parallel_sweep_stops_when_one_member_diverges_naming_it(tiny_run, tmp_path):
    from jaxft.recipes import multi

    base = jaxft.recipes.config.load_run_config(tiny_run / "run.yaml", ["train.steps=8", "train.max_skipped_steps=2"])
    cfgs = [base.replace(output_dir=str(tmp_path / name), optim=dataclasses.replace(base.optim, lr=lr))
            for name, lr in (("calm", 1e-3), ("wild", 1e38))]
    with pytest.raises(TrainingDiverged, match=rf"^{tmp_path / 'wild'}: step 3: 2 steps in a row were skipped"):
        multi.run_parallel(cfgs)
    assert [r["skipped"] for r in _train_records(tmp_path / "wild")] == [0, 1, 1]
    assert [r["skipped"] for r in _train_records(tmp_path / "calm")] == [0, 0, 0]
    assert not any((tmp_path / name / "adapter").exists() for name in ("calm", "wild"))


def test_skip_guard_counts_only_consecutive_skips():
    """Isolated skips (fp16 loss scaling drops a step now and then) never add up; the limit needs a run of them."""
    guard = SkipGuard(3)
    for step, skipped in enumerate([1, 1, 0, 1, 1, 0, 1, 1], 1):
        guard.check(step, {"skipped": skipped, "loss": 1.0, "grad_norm": 1.0})
    guard.finish()
    guard = SkipGuard(3)
    for step, skipped in enumerate([0, 1, 1, 1], 1):
        guard.check(step, {"skipped": skipped, "loss": float("nan"), "grad_norm": float("inf")})
    with pytest.raises(TrainingDiverged, match="step 4: 3 steps in a row.*loss nan, grad norm inf"):
        guard.finish()


def test_max_skipped_steps_must_be_at_least_one():
    with pytest.raises(jaxft.config.ConfigError, match="train.max_skipped_steps must be >= 1, got 0"):
        TrainConfig(max_skipped_steps=0)


def test_cli_eval_on_the_added_token_data_with_the_models_own_tokenizer_still_works(tiny_run, tmp_path, capsys):
    """The refusal is about ids, not words: the base's own tokenizer maps the new word to [UNK] and evaluates."""
    data = oov_chats(tmp_path / "oov.jsonl")
    assert main(["eval", str(tiny_run / "model"), "--data", str(data)]) == 0
    assert np.isfinite(json.loads(capsys.readouterr().out)["loss"])


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32, np.float64])
def test_the_bitwise_finiteness_check_agrees_with_numpy(dtype):
    from jaxft.hf.checkpoint import _all_finite

    x = np.random.default_rng(0).standard_normal(999).astype(dtype)
    top = float(ml_dtypes.finfo(dtype).max)
    for value in (np.inf, -np.inf, np.nan, top, -top, 0.0):
        y = x.copy()
        y[7] = value
        assert _all_finite(y) == bool(np.isfinite(y).all())
        assert _all_finite(y[::3]) == bool(np.isfinite(y[::3]).all())
