"""A fine-tuning method defined only in this file: a trained per-output-channel scale on one linear module
(``y = (x @ W + b) * c``). It is a :class:`~jaxft.ops.registry.Method` and a ``peft:`` entry type, nothing more,
and with that it composes with LoRA in the forward pass, merges and unmerges, declares its sharding axes and what
trains, trains through ``sft.run`` on 1 and 8 devices alike, resumes from a checkpoint, and exports a merged model
that transformers loads: the registry is the only place a method needs.

The runs happen in their own processes (``python tests/test_method_registry.py SPEC.json``), because the number of
devices is fixed when jax starts.
"""
from __future__ import annotations

import json
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxft
from jaxft.ops.linear import base_linear, linear
from jaxft.ops.registry import REGISTRY, Method, register
from jaxft.peft.methods import adapter_tree, trainable_count
from jaxft.peft.tree import leaf_paths
from jaxft.recipes.config import PEFT_UNION

from sft_worker import run_script

HERE = Path(__file__).resolve()
NAME = "channel_scale"


class ChannelScale(Method):
    """``{"scale": [*lead, out]}`` beside a kernel [*lead, in, out]: every output channel times its own factor."""

    name = NAME
    trained = frozenset({"scale"})

    def axes(self, base):
        *lead, _, fan_out = base["kernel"]
        return {"scale": (*lead, fan_out)}

    def linear(self, p, group, x, rng, inner):
        y = base_linear(group, x) if inner is None else inner(x)
        return y * p["scale"].astype(y.dtype)

    def merge(self, p, group):
        return _scaled(group, p["scale"])

    def unmerge(self, p, group):
        return _scaled(group, 1 / p["scale"])


def _scaled(group: dict, factor) -> dict:
    """The group's kernel columns and bias entries times ``factor`` [*lead, out]."""
    out = {**group, "kernel": group["kernel"] * factor[..., None, :]}
    if "bias" in group:
        out["bias"] = group["bias"] * factor
    return out


@dataclass(frozen=True)
class ChannelScaleConfig:
    """``peft: [{type: channel_scale, target: v_proj}]``: factors ``init`` plus N(0, ``jitter``) noise."""

    target: str = "v_proj"
    init: float = 1.0
    jitter: float = 0.0

    def add(self, cfg, params, rng):
        group = params["layers"][self.target]
        *lead, _, fan_out = group["kernel"].shape
        scale = (self.init + self.jitter * jax.random.normal(rng, (*lead, fan_out))).astype(group["kernel"].dtype)
        return {**params, "layers": {**params["layers"], self.target: {**group, NAME: {"scale": scale}}}}

    def trainable(self, cfg, params):
        return jaxft.Trainable()  # its one leaf trains by the method's own declaration


def register_channel_scale():
    register(ChannelScale())
    PEFT_UNION.members[NAME] = ChannelScaleConfig


@pytest.fixture
def channel_scale():
    """The method registered for one test, and taken out of the (process-wide) registries after it."""
    register_channel_scale()
    yield
    del REGISTRY[NAME], PEFT_UNION.members[NAME]


# ----------------------------------------------------------------------------------------------- in process

CFG = jaxft.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, qkv_bias=True)
IDS = np.array([[5, 9, 2, 33, 17, 4, 61, 8], [1, 2, 3, 4, 5, 6, 7, 8]])


def _base() -> dict:
    """Random params with non-zero v_proj biases (init_params starts biases at zero)."""
    params = jaxft.init_params(CFG, jax.random.PRNGKey(0))
    bias = params["layers"]["v_proj"]["bias"]
    params["layers"]["v_proj"]["bias"] = 0.1 * jax.random.normal(jax.random.PRNGKey(1), bias.shape)
    return params


def _with_lora_and_scale() -> dict:
    """LoRA on v_proj with a non-zero B (added first, so the innermost), then the channel scale around 1."""
    params = jaxft.LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj"]).add(CFG, _base(), jax.random.PRNGKey(2))
    lora = params["layers"]["v_proj"]["lora"]
    lora["b"] = 0.3 * jax.random.normal(jax.random.PRNGKey(3), lora["b"].shape)
    return ChannelScaleConfig(jitter=0.2).add(CFG, params, jax.random.PRNGKey(4))


def _layer(group: dict, i: int) -> dict:
    return jax.tree.map(lambda leaf: leaf[i], group)


def test_v_proj_output_is_the_base_output_times_the_channel_scale(channel_scale):
    params = ChannelScaleConfig(jitter=0.2).add(CFG, _base(), jax.random.PRNGKey(4))
    group = params["layers"]["v_proj"]
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(5), (2, 3, CFG.hidden_size)))
    for i in range(CFG.num_hidden_layers):
        w, b, c = (np.asarray(leaf[i], np.float64) for leaf in (group["kernel"], group["bias"], group[NAME]["scale"]))
        np.testing.assert_allclose(linear(_layer(group, i), x), (x @ w + b) * c, rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(group[NAME]["scale"]) - 1).min() > 0  # every factor differs from 1


def test_with_lora_inside_v_proj_output_is_the_lora_output_times_the_scale(channel_scale):
    group = _with_lora_and_scale()["layers"]["v_proj"]
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(5), (2, 3, CFG.hidden_size)), np.float64)
    for i in range(CFG.num_hidden_layers):
        lora = {k: np.asarray(v[i], np.float64) for k, v in group["lora"].items()}
        w, b = np.asarray(group["kernel"][i], np.float64), np.asarray(group["bias"][i], np.float64)
        by_hand = (x @ w + b + lora["scale"] * (x @ lora["a"]) @ lora["b"]) * np.asarray(group[NAME]["scale"][i])
        np.testing.assert_allclose(linear(_layer(group, i), x.astype(np.float32)), by_hand, rtol=1e-5, atol=1e-6)


def test_merge_folds_lora_and_the_scale_into_v_proj_and_unmerge_takes_them_out(channel_scale):
    params = _with_lora_and_scale()
    group = params["layers"]["v_proj"]
    merged = jaxft.merge(params)

    assert not any(name in path.split("/") for path in leaf_paths(merged) for name in REGISTRY)
    lora = {k: np.asarray(v, np.float64) for k, v in group["lora"].items()}
    c = np.asarray(group[NAME]["scale"], np.float64)
    kernel = (np.asarray(group["kernel"]) + lora["scale"][:, None, None] * lora["a"] @ lora["b"]) * c[:, None, :]
    np.testing.assert_allclose(merged["layers"]["v_proj"]["kernel"], kernel, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(merged["layers"]["v_proj"]["bias"], np.asarray(group["bias"]) * c, rtol=1e-6)
    np.testing.assert_allclose(jaxft.forward(CFG, merged, IDS), jaxft.forward(CFG, params, IDS),
                               rtol=1e-4, atol=1e-5)

    restored = jaxft.unmerge(merged, adapter_tree(params))
    for leaf in ("kernel", "bias"):
        np.testing.assert_allclose(restored["layers"]["v_proj"][leaf], group[leaf], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(restored["layers"]["v_proj"][NAME]["scale"], group[NAME]["scale"])


def test_the_scale_declares_the_axes_of_the_kernel_columns_and_shards_by_them(channel_scale):
    from jaxft.parallel import MeshConfig, logical_axes, make_mesh, shard_params

    params = _with_lora_and_scale()
    axes = logical_axes(params)["layers"]["v_proj"]
    assert axes[NAME] == {"scale": ("layer", "kv_heads")} == {"scale": (axes["kernel"][0], axes["kernel"][-1])}
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharded = shard_params(params, mesh)
    assert sharded["layers"]["v_proj"][NAME]["scale"].sharding.spec == \
        sharded["layers"]["v_proj"]["bias"].sharding.spec  # the same axes as the kernel's columns
    np.testing.assert_allclose(jax.jit(jaxft.forward, static_argnums=0)(CFG, sharded, IDS),
                               jaxft.forward(CFG, params, IDS), rtol=1e-5, atol=1e-6)


def test_split_trains_the_scale_and_the_lora_factors_only(channel_scale):
    params = _with_lora_and_scale()
    trained, _ = jaxft.split(params, jaxft.Trainable())
    assert set(leaf_paths(trained)) == {f"layers/v_proj/{NAME}/scale", "layers/v_proj/lora/a", "layers/v_proj/lora/b"}
    layers, fan_out = CFG.num_hidden_layers, CFG.num_key_value_heads * CFG.head_dim
    n_lora = layers * 2 * (CFG.hidden_size + fan_out)
    assert trainable_count(params, jaxft.Trainable()) == layers * fan_out + n_lora


def test_a_method_after_the_first_draws_its_own_dropout_key(channel_scale):
    """LoRA (first in v_proj) trains with the layer's key itself; the scale after it gets a different one, so two
    methods with dropout never share masks."""
    seen = {}

    class KeyProbe(ChannelScale):
        def linear(self, p, group, x, rng, inner):
            seen["key"] = rng
            return super().linear(p, group, x, rng, inner)

    register(KeyProbe())  # replaces ChannelScale under the same name; the fixture removes it afterwards
    group = jax.tree.map(lambda a: a[0], _with_lora_and_scale()["layers"]["v_proj"])
    rng = jax.random.PRNGKey(7)
    linear(group, jnp.ones((2, 3, CFG.hidden_size)), rng)
    assert not np.array_equal(seen["key"], rng)
    np.testing.assert_array_equal(seen["key"], jax.random.fold_in(rng, 1))


def test_save_adapter_refuses_a_method_without_a_peft_format_naming_it_and_the_way_out(channel_scale, tmp_path):
    lcfg = jaxft.LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj"])
    with pytest.raises(jaxft.ConfigError, match=rf"method '{NAME}' has no PEFT adapter format.*jaxft\.merge"):
        jaxft.save_adapter(_with_lora_and_scale(), lcfg, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_gradients_through_lora_inside_the_scale_are_autodiff_of_the_direct_computation(channel_scale):
    """LoRA keeps its fused hand-written backward pass inside the outer method; the gradients of a, b and the
    scale equal jax's autodiff of the computation written out."""
    group = _layer(_with_lora_and_scale()["layers"]["v_proj"], 0)
    x = jax.random.normal(jax.random.PRNGKey(5), (2, 3, CFG.hidden_size))
    weights = jax.random.normal(jax.random.PRNGKey(6), (2, 3, group["kernel"].shape[-1]))
    trained = {"a": group["lora"]["a"], "b": group["lora"]["b"], "scale": group[NAME]["scale"]}

    def through_jaxft(t):
        g = {**group, "lora": {**group["lora"], "a": t["a"], "b": t["b"]}, NAME: {"scale": t["scale"]}}
        return jnp.sum(linear(g, x) * weights)

    def by_hand(t):
        y = x @ group["kernel"] + group["bias"] + group["lora"]["scale"] * (x @ t["a"]) @ t["b"]
        return jnp.sum(y * t["scale"] * weights)

    ours, reference = jax.grad(through_jaxft)(trained), jax.grad(by_hand)(trained)
    for leaf in trained:
        assert np.abs(np.asarray(reference[leaf])).max() > 0, leaf
        np.testing.assert_allclose(ours[leaf], reference[leaf], rtol=1e-5, atol=1e-6, err_msg=leaf)


def test_memory_estimate_of_a_run_with_the_method_is_within_20_percent_of_the_compiled_step(channel_scale, tmp_path):
    from jaxft.analysis import memory
    from jaxft.config import from_dict
    from jaxft.hf.config import config_to_hf
    from jaxft.parallel import MeshConfig
    from jaxft.recipes.config import RunConfig

    model_cfg = jaxft.ModelConfig(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                  num_attention_heads=4)
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(model_cfg, "float32")))
    cfg = from_dict(RunConfig, {"model": str(tmp_path), "output_dir": str(tmp_path / "run"),
                                "peft": [{"type": NAME, "target": "v_proj"}],
                                "data": {"paths": ["train.jsonl"], "max_length": 256, "batch_size": 8}})
    _, abstract, _ = memory.abstract_model(cfg)
    assert memory.param_counts(cfg, model_cfg, abstract)[0] == 4 * 256  # layers x v_proj's outputs
    predicted = memory.estimate(cfg, (2, 2, 2)).total
    compiled = memory.compiled_memory(cfg, MeshConfig(2, 2, 2), jax.devices())
    print(f"channel scale on v_proj, mesh (2, 2, 2): estimate / compiled = {predicted / compiled['peak']:.3f}")
    assert 0.8 <= predicted / compiled["peak"] <= 1.2


# ------------------------------------------------------------------------------------------------- runs


def worker(spec_path: str) -> None:
    jax.config.update("jax_default_matmul_precision", "highest")  # as conftest.py sets it for in-process tests
    from jaxft.recipes import sft
    from jaxft.recipes.config import load_run_config

    register_channel_scale()  # this process's registries only
    spec = json.loads(Path(spec_path).read_text())
    summary = sft.run(load_run_config(spec["config"]), resume=spec["resume"])
    Path(spec["result"]).write_text(json.dumps({"summary": summary, "devices": jax.device_count()}))


STEPS = 4


def _train(root: Path, name: str, devices: int, mesh: dict, resume: bool = False) -> dict:
    config = {"model": str(root / "model"), "output_dir": str(root / name),
              "peft": [{"type": NAME, "target": "v_proj"}],
              "data": {"paths": [str(root / "train.jsonl")], "max_length": 32, "batch_size": 8},
              "optim": {"lr": 0.05}, "mesh": mesh,
              "train": {"steps": STEPS, "save_every": 2, "log_every": 1, "loss_chunk_size": 0}}
    return run_script(HERE, root, name, config, devices, resume)


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def _tensors(model_dir: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(model_dir / "model.safetensors")


def _trained_scale(run: Path) -> np.ndarray:
    """The scale in the run's last checkpoint, read with orbax alone (the checkpoint's ``state`` item is a nested
    dict of the train state's arrays)."""
    import orbax.checkpoint as ocp

    with warnings.catch_warnings():  # "sharding info not provided": the saved one serves, the array is read whole
        warnings.simplefilter("ignore", UserWarning)
        state = ocp.PyTreeCheckpointer().restore(run / "checkpoints" / str(STEPS) / "state")
    return np.asarray(state["trainable"]["layers"]["v_proj"][NAME]["scale"])


@pytest.fixture(scope="module")
def runs(tiny_run):
    """The run on 1 device (checkpoints at steps 2 and 4), its twin on 8, and a copy of the first resumed from
    step 2; (folder, the resumed run's records written by the resume)."""
    _train(tiny_run, "one_device", 1, {"data": -1})
    _train(tiny_run, "eight_devices", 8, {"data": 2, "fsdp": 2, "tensor": 2})
    shutil.copytree(tiny_run / "one_device", tiny_run / "resumed")
    shutil.rmtree(tiny_run / "resumed" / "checkpoints" / str(STEPS))  # as if it had stopped after saving step 2
    logged = len(_records(tiny_run / "resumed"))
    _train(tiny_run, "resumed", 1, {"data": -1}, resume=True)
    return tiny_run, _records(tiny_run / "resumed")[logged:]


@pytest.mark.slow
def test_the_method_trains_and_8_devices_equal_1(runs):
    root, _ = runs
    losses, eight = _losses(_records(root / "one_device")), _losses(_records(root / "eight_devices"))
    assert sorted(losses) == list(range(1, STEPS + 1)) and losses[STEPS] < losses[1]
    np.testing.assert_allclose([eight[s] for s in losses], list(losses.values()), rtol=1e-4)
    scale = _trained_scale(root / "one_device")
    assert scale.shape == (2, 16) and np.abs(scale - 1).min() > 1e-3  # every factor trained away from 1
    np.testing.assert_allclose(_trained_scale(root / "eight_devices"), scale, rtol=1e-4)
    assert json.loads((root / "one_device" / "summary.json").read_text())["trainable_params"] == scale.size
    exported, exported_eight = _tensors(root / "one_device" / "model"), _tensors(root / "eight_devices" / "model")
    assert exported.keys() == exported_eight.keys()
    for name, value in exported.items():
        np.testing.assert_allclose(exported_eight[name], value, rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.slow
def test_a_run_resumed_from_a_checkpoint_equals_the_uninterrupted_run(runs):
    root, resumed = runs
    assert [(r["split"], r["step"]) for r in resumed] == [("resume", 2), ("train", 3), ("train", 4)]
    uninterrupted = _losses(_records(root / "one_device"))
    np.testing.assert_allclose([r["loss"] for r in resumed[1:]], [uninterrupted[3], uninterrupted[4]],
                               atol=1e-6, rtol=0)
    np.testing.assert_allclose(_trained_scale(root / "resumed"), _trained_scale(root / "one_device"),
                               rtol=1e-6)
    exported, exported_resumed = _tensors(root / "one_device" / "model"), _tensors(root / "resumed" / "model")
    for name, value in exported.items():
        np.testing.assert_allclose(exported_resumed[name], value, rtol=1e-6, atol=1e-7, err_msg=name)


@pytest.mark.slow
def test_the_export_is_the_merged_model_and_transformers_gives_the_trained_logits(runs, channel_scale):
    """The export is the base with v_proj's rows (HF's [out, in] layout) times the checkpoint's trained scale, and
    transformers' logits of it are jaxft's logits of the base with that scale as the method's leaf."""
    import torch
    import transformers

    root, _ = runs
    scale = _trained_scale(root / "one_device")
    base, exported = _tensors(root / "model"), _tensors(root / "one_device" / "model")
    assert exported.keys() == base.keys()
    v_proj = {f"model.layers.{i}.self_attn.v_proj.weight": i for i in range(2)}
    for name, value in base.items():
        expected = value * scale[v_proj[name]][:, None] if name in v_proj else value
        np.testing.assert_allclose(exported[name], expected, rtol=1e-6, atol=1e-7, err_msg=name)

    model_cfg, params = jaxft.from_pretrained(root / "model")
    params = ChannelScaleConfig().add(model_cfg, params, jax.random.PRNGKey(0))
    params["layers"]["v_proj"][NAME]["scale"] = jnp.asarray(scale)
    ids = IDS % model_cfg.vocab_size
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "one_device" / "model").eval()
    with torch.no_grad():
        theirs = model(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(theirs, jaxft.forward(model_cfg, params, ids), rtol=1e-4, atol=1e-4)


if __name__ == "__main__":
    worker(sys.argv[1])
