"""(IA)³ parity with PEFT on llama, mistral and qwen2: logits, gradients, adapter files both ways, merge; an NF4
base; a whole run with ``peft: [{type: ia3}]`` that trains only the vectors and exports a PEFT adapter."""
import copy
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

import jaxft
from hf_oracle import build, random_ids, save
from jaxft.config import ConfigError, from_dict
from jaxft.hf.peft_format import adapter_tensors
from jaxft.ops.linear import dense_kernel
from jaxft.peft.ia3 import IA3Config
from jaxft.peft.methods import adapter_tree, trainable_count
from jaxft.recipes import sft
from jaxft.recipes.config import RunConfig
from sft_worker import make_base

CASES = {  # family, PEFT's IA3Config arguments (targets None: PEFT's default for the family)
    "llama": ("llama", {}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),  # q_proj and v_proj have biases: the output scaling covers them
    "explicit": ("qwen2", dict(target_modules=["k_proj", "up_proj", "o_proj"], feedforward_modules=["up_proj"])),
}


def _ids():
    return random_ids((2, 10), seed=3)


def _labels():
    return random_ids((2, 10), seed=4)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    """PEFT's model with random (not identity) vectors, its saved adapter loaded into jaxft."""
    model_type, kwargs = CASES[request.param]
    torch.manual_seed(1)
    pm = peft.get_peft_model(build(model_type, seed=0),
                             peft.IA3Config(init_ia3_weights=False, task_type="CAUSAL_LM", **kwargs))
    root = tmp_path_factory.mktemp(request.param)
    save(build(model_type, seed=0), root / "base")
    pm.save_pretrained(root / "adapter")
    cfg, base_params = jaxft.from_pretrained(root / "base")
    params = jaxft.load_adapter(root / "adapter", base_params, cfg)
    acfg = IA3Config.from_peft(pm.peft_config["default"].to_dict(), "peft")
    return request.param, pm, cfg, base_params, params, acfg, root


def test_logits_equal_peft_and_differ_from_the_base(case):
    name, pm, cfg, base_params, params, acfg, _ = case
    ids = _ids()
    with torch.no_grad():
        ref = pm(torch.as_tensor(ids)).logits.numpy()
    base = np.asarray(jaxft.forward(cfg, base_params, jnp.asarray(ids)))
    assert np.max(np.abs(ref - base)) > 1e-2, "the vectors must visibly change the logits"
    np.testing.assert_allclose(np.asarray(jaxft.forward(cfg, params, jnp.asarray(ids))), ref, atol=1e-4, rtol=0)


def test_targets_and_trainable_count_equal_peft(case):
    name, pm, cfg, base_params, params, acfg, _ = case
    assert trainable_count(params, acfg.trainable(cfg, params)) == pm.get_nb_trainable_parameters()[0]
    ours = jaxft.peft_format.adapter_tensors(params, acfg, cfg)
    theirs = peft.get_peft_model_state_dict(pm)
    assert sorted(ours) == sorted(theirs)
    for k, v in theirs.items():
        np.testing.assert_array_equal(ours[k], v.numpy(), err_msg=k)


def test_gradients_equal_peft_autograd(case):
    name, pm, cfg, base_params, params, acfg, _ = case
    trainable, frozen = jaxft.split(params, acfg.trainable(cfg, params))
    ids, labels = jnp.asarray(_ids()), jnp.asarray(_labels())

    def loss(trainable):
        logits = jaxft.forward(cfg, jaxft.combine(trainable, frozen), ids)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], axis=-1))

    ours = adapter_tensors(jaxft.combine(jax.grad(loss)(trainable), frozen), acfg, cfg)
    pm.zero_grad()
    logits = pm(torch.as_tensor(_ids())).logits
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                      torch.as_tensor(_labels()).reshape(-1)).backward()
    ref = {n.replace(".default", ""): p.grad.numpy() for n, p in pm.named_parameters() if p.requires_grad}
    assert sorted(ours) == sorted(ref)
    for k, g in ours.items():
        np.testing.assert_allclose(g, ref[k], atol=1e-5, rtol=1e-4, err_msg=k)


def test_saved_adapter_loads_in_peft_with_equal_logits(case, tmp_path):
    name, pm, cfg, base_params, params, acfg, _ = case
    jaxft.save_adapter(params, acfg, tmp_path / "ours", cfg=cfg)
    reloaded = peft.PeftModel.from_pretrained(build(CASES[name][0], seed=0), tmp_path / "ours")
    ids = torch.as_tensor(_ids())
    with torch.no_grad():
        np.testing.assert_allclose(reloaded(ids).logits.numpy(), pm(ids).logits.numpy(), atol=1e-5, rtol=0)


def test_merge_equals_peft_merge_and_unload_and_unmerges(case):
    name, pm, cfg, base_params, params, acfg, _ = case
    merged = jaxft.merge(params)
    assert "ia3" not in json.dumps(jax.tree_util.tree_map(lambda x: None, merged))
    theirs = copy.deepcopy(pm).merge_and_unload().state_dict()
    layer = 1
    for module, block in (("v_proj", "self_attn"), ("down_proj", "mlp"), ("up_proj", "mlp")):
        w = theirs[f"model.layers.{layer}.{block}.{module}.weight"].numpy()
        np.testing.assert_allclose(np.asarray(merged["layers"][module]["kernel"][layer]).T, w, atol=1e-6, rtol=0)
        bias = theirs.get(f"model.layers.{layer}.{block}.{module}.bias")
        if bias is not None:
            np.testing.assert_allclose(np.asarray(merged["layers"][module]["bias"][layer]), bias.numpy(), atol=1e-6)
    ids = jnp.asarray(_ids())
    np.testing.assert_allclose(np.asarray(jaxft.forward(cfg, merged, ids)),
                               np.asarray(jaxft.forward(cfg, params, ids)), atol=1e-4, rtol=0)
    back = jaxft.unmerge(merged, adapter_tree(params))
    for module in ("k_proj", "v_proj", "down_proj"):
        np.testing.assert_allclose(np.asarray(back["layers"][module]["kernel"]),
                                   np.asarray(base_params["layers"][module]["kernel"]), atol=1e-5, rtol=0)


def test_nf4_base_forward_equals_the_dequantized_base(case):
    """On a 4-bit base the vectors act on the dequantized kernels: the same logits as on those kernels, dense."""
    name, pm, cfg, base_params, params, acfg, root = case
    _, quantized = jaxft.from_pretrained(root / "base", quant="nf4")
    ia3_nf4 = jaxft.load_adapter(root / "adapter", quantized, cfg)
    dense = jax.tree.map(lambda x: dense_kernel(x, jnp.float32) if isinstance(x, jaxft.nf4.QuantizedTensor) else x,
                         ia3_nf4, is_leaf=lambda x: isinstance(x, jaxft.nf4.QuantizedTensor))
    ids = jnp.asarray(_ids())
    np.testing.assert_allclose(np.asarray(jaxft.forward(cfg, ia3_nf4, ids)),
                               np.asarray(jaxft.forward(cfg, dense, ids)), atol=1e-4, rtol=0)


def test_defaults_init_to_identity_and_bad_configs_are_refused():
    cfg = jaxft.ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                            num_attention_heads=2, model_type="qwen2")
    params = jaxft.init_params(cfg, jax.random.PRNGKey(0))
    added = IA3Config().add(cfg, params, jax.random.PRNGKey(1))
    assert sorted(k for k, g in added["layers"].items() if "ia3" in g) == ["down_proj", "q_proj", "v_proj"]
    assert set(added["layers"]["down_proj"]["ia3"]) == {"input"}
    assert added["layers"]["q_proj"]["ia3"]["output"].shape == (2, 16, 1)
    np.testing.assert_array_equal(np.asarray(added["layers"]["v_proj"]["ia3"]["output"]), 1.0)
    with pytest.raises(ConfigError, match="subset of target_modules"):
        IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(ConfigError, match="in layers \\[0\\]"):
        IA3Config(target_modules=r"model\.layers\.0\.self_attn\.k_proj").add(cfg, params, jax.random.PRNGKey(1))
    with pytest.raises(ConfigError, match="embed_tokens"):
        IA3Config(target_modules=["embed_tokens"], feedforward_modules=[]).add(cfg, params, jax.random.PRNGKey(1))
    with pytest.raises(ConfigError, match="exclude_modules"):
        IA3Config.from_peft({"peft_type": "IA3", "exclude_modules": ["q_proj"]}, "adapter_config.json")


def test_a_run_trains_only_the_vectors_and_exports_an_adapter_peft_loads(tmp_path):
    base = make_base(tmp_path / "base")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"reverse {i} {i + 1} =", "completion": f" {i + 1} {i} ."}) + "\n"
                            for i in range(32)))
    cfg = from_dict(RunConfig, {"model": str(base), "output_dir": str(tmp_path / "run"), "peft": [{"type": "ia3"}],
                                "data": {"paths": [str(data)], "max_length": 24, "batch_size": 8},
                                "optim": {"lr": 5e-2}, "train": {"steps": 4, "log_every": 1}})
    assert cfg.peft == (IA3Config(),)
    summary = sft.run(cfg)
    adapter = Path(summary["export"])
    assert adapter.name == "adapter" and json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "IA3"
    model_cfg, base_params = jaxft.from_pretrained(base)
    params = jaxft.load_adapter(adapter, base_params, model_cfg)
    vectors = params["layers"]["v_proj"]["ia3"]["output"]
    assert float(jnp.max(jnp.abs(vectors - 1.0))) > 1e-3, "the vectors trained"
    assert summary["trainable_params"] == sum(x.size for x in jax.tree.leaves(adapter_tree(params)))
    hf = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), adapter)
    ids = random_ids((2, 8), model_cfg.vocab_size, seed=5)
    with torch.no_grad():
        theirs = hf(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(jaxft.forward(model_cfg, params, jnp.asarray(ids))), theirs, atol=1e-4)
