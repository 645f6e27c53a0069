"""The per-device memory estimate against XLA's memory_analysis() of the compiled step, and `jaxft inspect`."""
import json

import jax
import numpy as np
import pytest
import yaml

import jaxft
from jaxft import parallel
from jaxft.cli import main
from jaxft.config import ModelConfig, from_dict
from jaxft.hf.config import config_to_hf
from jaxft.parallel import MeshConfig
from jaxft.peft import lora
from jaxft.peft.methods import trainable_count
from jaxft.peft.tree import Trainable, split
from jaxft.analysis import memory as estimate
from jaxft.recipes import skeleton
from jaxft.recipes.config import RunConfig

# Big enough that real buffers (activations [8 x 256 tokens], [B, H, T, T] scores, 4M params) dominate the totals.
MEDIUM = ModelConfig(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                     num_attention_heads=4)
# Vocab 100 and the 12 K/V columns don't divide 8 devices: those dims stay whole.
TINY = ModelConfig(vocab_size=100, hidden_size=32, intermediate_size=72, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=6)


def _run_config(model_dir, method="lora", **sections) -> RunConfig:
    tree = {"model": str(model_dir), "output_dir": str(model_dir / "run"), "method": method,
            "data": {"paths": ["train.jsonl"], "max_length": 256, "batch_size": 8},
            "lora": {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
            "train": {"loss_chunk_size": 1024}}
    for key, value in sections.items():
        tree[key] = {**tree.get(key, {}), **value}
    return from_dict(RunConfig, tree)


def _tiny_config(model_dir, method="lora", **sections) -> RunConfig:
    return _run_config(model_dir, method, data={"max_length": 16}, **sections)


@pytest.fixture(scope="module")
def medium_dir(tmp_path_factory):
    """Only config.json: neither the estimate nor the compiled step reads weights."""
    folder = tmp_path_factory.mktemp("medium")
    (folder / "config.json").write_text(json.dumps(config_to_hf(MEDIUM, "float32")))
    return folder


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    (folder / "config.json").write_text(json.dumps(config_to_hf(TINY, "float32")))
    return folder


def _zeros(abstract):
    """Host arrays of the abstract tree's shapes: a concrete tree to place on devices without init or a file."""
    return jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract)


@pytest.mark.slow
@pytest.mark.parametrize("method, remat, attention, mesh", [
    ("lora", "none", "plain", (1, 1, 1)),
    ("qlora", "full", "plain", (1, 8, 1)),
    ("full", "none", "plain", (8, 1, 1)),
    ("lora", "full", "blockwise", (2, 4, 1)),
])
def test_estimate_is_within_20_percent_of_the_compiled_step(medium_dir, method, remat, attention, mesh):
    cfg = _run_config(medium_dir, method, train={"remat": remat, "attention": attention})
    predicted = estimate.estimate(cfg, mesh).total
    compiled = estimate.compiled_memory(cfg, MeshConfig(*mesh), jax.devices()[:int(np.prod(mesh))])
    print(f"{method} remat={remat} {attention} mesh={mesh}: estimate / compiled = {predicted / compiled['peak']:.3f}")
    assert 0.8 <= predicted / compiled["peak"] <= 1.2


def test_run_config_attention_reaches_the_model(tiny_dir):
    model_cfg, _, _ = estimate.abstract_model(_tiny_config(tiny_dir, train={"attention": "blockwise"}))
    assert model_cfg.attention == "blockwise"
    with pytest.raises(jaxft.ConfigError, match="train.attention 'flash' is unknown"):
        _tiny_config(tiny_dir, train={"attention": "flash"})


def test_param_bytes_are_what_each_device_holds(tiny_dir):
    cfg = _tiny_config(tiny_dir, "qlora", quant={"blocksize": 32})
    model_cfg, abstract, _ = estimate.abstract_model(cfg)
    mesh = parallel.make_mesh(MeshConfig(1, 8, 1), jax.devices()[:8])
    parts = split(_zeros(abstract), skeleton.trainable_spec(cfg, model_cfg, abstract))
    held = [sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(parallel.shard_params(part, mesh)))
            for part in parts]
    predicted = estimate.estimate(cfg, (1, 8, 1))
    assert [predicted.trainable, predicted.frozen] == held


def test_param_counts_leave_out_rank_padding(tiny_dir):
    cfg = _tiny_config(tiny_dir, lora={"r": 4, "rank_pattern": {"q_proj": 8}, "layers_to_transform": [0, 2],
                                       "target_modules": ["q_proj", "v_proj"]})
    model_cfg, abstract, _ = estimate.abstract_model(cfg)
    base = _zeros(jax.eval_shape(lambda: jaxft.init_params(model_cfg, jax.random.PRNGKey(0))))
    params = lora.add(model_cfg, base, cfg.lora, jax.random.PRNGKey(0))
    n_frozen = sum(x.size for x in jax.tree.leaves(split(params, Trainable())[1]))
    assert estimate.param_counts(cfg, model_cfg, abstract) == (trainable_count(params, Trainable()),
                                                               trainable_count(params, Trainable()) + n_frozen)


@pytest.mark.slow
def test_estimate_with_lora_on_some_linears_is_within_20_percent(medium_dir):
    """PEFT's default targets (q, v): the frozen linears keep no input for a kernel gradient nobody takes."""
    cfg = _run_config(medium_dir, "lora", lora={"target_modules": ["q_proj", "v_proj"]})
    predicted = estimate.estimate(cfg, (1, 1, 1)).total
    compiled = estimate.compiled_memory(cfg, MeshConfig(1, 1, 1), jax.devices()[:1])
    print(f"LoRA on q, v: estimate / compiled = {predicted / compiled['peak']:.3f}")
    assert 0.8 <= predicted / compiled["peak"] <= 1.2


@pytest.mark.slow
@pytest.mark.parametrize("task", [{"type": "classify", "num_labels": 4, "problem_type": "multi_label_classification"},
                                  {"type": "qa"}])
def test_estimate_of_a_task_head_run_is_within_20_percent(medium_dir, task):
    """A head in place of lm_head (N logits per token, no vocabulary), and float multi-label targets in the batch."""
    cfg = _run_config(medium_dir, "lora", task=task)
    predicted = estimate.estimate(cfg, (1, 1, 1)).total
    compiled = estimate.compiled_memory(cfg, MeshConfig(1, 1, 1), jax.devices()[:1])
    print(f"task {task['type']}: estimate / compiled = {predicted / compiled['peak']:.3f}")
    assert 0.8 <= predicted / compiled["peak"] <= 1.2


@pytest.mark.slow
def test_a_dpo_step_holds_one_copy_of_the_base_and_is_estimated_within_20_percent(medium_dir):
    """The adapters-off reference is the same frozen base, its forward outside the gradient: the compiled DPO step
    (rows of 2 x 128 tokens: a pair per row) needs no more than the SFT step on rows of 256 tokens, far less than
    another copy of the weights would add."""
    sft = _run_config(medium_dir, "lora")
    dpo = _run_config(medium_dir, "lora", task={"type": "dpo"}, data={"max_length": 128})
    assert dpo.row_length == sft.row_length == 256
    compiled = {c: estimate.compiled_memory(cfg, MeshConfig(1, 1, 1), jax.devices()[:1])["peak"]
                for c, cfg in (("sft", sft), ("dpo", dpo))}
    base = estimate.estimate(dpo, (1, 1, 1)).frozen
    print(f"compiled peak: DPO {compiled['dpo'] / 2**20:.2f} MiB, SFT {compiled['sft'] / 2**20:.2f} MiB, "
          f"the frozen base {base / 2**20:.2f} MiB")
    assert compiled["dpo"] - compiled["sft"] < 0.1 * base
    assert 0.8 <= estimate.estimate(dpo, (1, 1, 1)).total / compiled["dpo"] <= 1.2


@pytest.mark.slow
@pytest.mark.parametrize("heads, kv_heads, mesh", [(4, 2, (1, 1, 4)), (8, 2, (1, 1, 8))])
def test_estimate_with_kv_heads_that_do_not_split_over_tensor_is_within_20_percent(tmp_path, heads, kv_heads, mesh):
    """Grouped-query attention whose K/V heads don't divide the tensor axis (TinyLlama's 4 on 8 ways): the query
    heads, and with them the attention scores, still split."""
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(
        MEDIUM.replace(num_attention_heads=heads, num_key_value_heads=kv_heads), "float32")))
    cfg = _run_config(tmp_path, "lora")
    predicted = estimate.estimate(cfg, mesh).total
    compiled = estimate.compiled_memory(cfg, MeshConfig(*mesh), jax.devices()[:int(np.prod(mesh))])
    print(f"heads {heads}, kv {kv_heads}, mesh {mesh}: estimate / compiled = {predicted / compiled['peak']:.3f}")
    assert 0.8 <= predicted / compiled["peak"] <= 1.2


@pytest.mark.slow
def test_estimate_with_offloaded_optimizer_state_is_within_20_percent_of_the_compiled_step(medium_dir):
    """The compiled step takes the optimizer state in host memory, as the run holds it."""
    cfg = _run_config(medium_dir, "lora", optim={"offload_state": True})
    predicted = estimate.estimate(cfg, (1, 8, 1)).total
    compiled = estimate.compiled_memory(cfg, MeshConfig(1, 8, 1), jax.devices()[:8])
    print(f"offloaded optimizer state: estimate / compiled = {predicted / compiled['peak']:.3f}")
    assert 0.8 <= predicted / compiled["peak"] <= 1.2


def test_offloaded_optimizer_state_counts_as_host_memory(tiny_dir):
    on_device = estimate.estimate(_tiny_config(tiny_dir), (1, 1, 1))
    offloaded = estimate.estimate(_tiny_config(tiny_dir, optim={"offload_state": True}), (1, 1, 1))
    assert (offloaded.optimizer, offloaded.optimizer_host) == (0, on_device.optimizer)
    # AdamW: two f32 moments per trainable f32 value, and a step count
    assert 0 < on_device.optimizer - 2 * on_device.trainable <= 8


def test_inspect_prints_counts_and_a_memory_table_per_mesh(tiny_dir, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": str(tiny_dir), "output_dir": str(tmp_path / "run"), "method": "qlora",
                                      "data": {"paths": ["train.jsonl"], "max_length": 16, "batch_size": 8},
                                      "quant": {"blocksize": 32}, "mesh": {"data": 1, "fsdp": 1, "tensor": 1}}))
    assert main(["inspect", str(config), "--mesh", "1,8,1"]) == 0
    out = capsys.readouterr().out
    assert "trainable params:" in out and "trainable%" in out
    header, *rows = out.splitlines()[1:]
    assert header.split()[1:] == ["device", "mesh", "1,1,1", "mesh", "1,8,1"]
    labels = ["frozen weights", "trainable", "grads", "optimizer state", "batch", "activations", "optimizer update",
              "total (peak)"]
    assert [row[:len(label)] for row, label in zip(rows, labels)] == labels
    assert all(row.count("MiB") == 2 for row in rows)


def test_inspect_rejects_a_malformed_mesh(tiny_dir, capsys):
    with pytest.raises(SystemExit):
        main(["inspect", "run.yaml", "--mesh", "1,8"])
    assert "expected three positive sizes" in capsys.readouterr().err
