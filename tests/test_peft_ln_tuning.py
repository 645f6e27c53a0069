"""LN-tuning parity with PEFT on llama, mistral and qwen2: logits, gradients, adapter files both ways, merge; the
base stays the reference with the method off; an NF4 base; a whole run with ``peft: [{type: ln_tuning}]`` that
trains only the norms' copies and exports a PEFT adapter."""
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
from jaxft.peft.ln_tuning import LNTuningConfig
from jaxft.peft.methods import adapter_tree, trainable_count, without_methods
from jaxft.recipes import sft
from jaxft.recipes.config import RunConfig
from sft_worker import make_base

CASES = {  # family, PEFT's LNTuningConfig arguments (targets None: PEFT's default for the family)
    "llama": ("llama", {}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),  # post_attention_layernorm only
    "explicit": ("llama", dict(target_modules=["input_layernorm"])),
}


def _ids():
    return random_ids((2, 10), seed=3)


def _labels():
    return random_ids((2, 10), seed=4)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    """PEFT's model with its norm copies moved off the base norms, its saved adapter loaded into jaxft."""
    model_type, kwargs = CASES[request.param]
    torch.manual_seed(1)
    pm = peft.get_peft_model(build(model_type, seed=0), peft.LNTuningConfig(task_type="CAUSAL_LM", **kwargs))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "ln_tuning_layers" in name:
                p.add_(0.3 * torch.randn_like(p))
    root = tmp_path_factory.mktemp(request.param)
    save(build(model_type, seed=0), root / "base")
    pm.save_pretrained(root / "adapter")
    cfg, base_params = jaxft.from_pretrained(root / "base")
    params = jaxft.load_adapter(root / "adapter", base_params, cfg)
    acfg = LNTuningConfig.from_peft(pm.peft_config["default"].to_dict(), "peft")
    return request.param, pm, cfg, base_params, params, acfg, root


def test_logits_equal_peft_and_differ_from_the_base(case):
    name, pm, cfg, base_params, params, acfg, _ = case
    ids = _ids()
    with torch.no_grad():
        ref = pm(torch.as_tensor(ids)).logits.numpy()
    base = np.asarray(jaxft.forward(cfg, base_params, jnp.asarray(ids)))
    assert np.max(np.abs(ref - base)) > 1e-2, "the trained norms must visibly change the logits"
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


def test_merge_equals_peft_merge_and_unload_and_unmerge_is_refused(case):
    name, pm, cfg, base_params, params, acfg, _ = case
    merged = jaxft.merge(params)
    assert "ln_tuning" not in json.dumps(jax.tree_util.tree_map(lambda x: None, merged))
    theirs = copy.deepcopy(pm).merge_and_unload()
    state = theirs.state_dict()
    np.testing.assert_array_equal(np.asarray(merged["norm"]["scale"]), state["model.norm.weight"].numpy())
    for norm in ("input_layernorm", "post_attention_layernorm"):
        np.testing.assert_array_equal(np.asarray(merged["layers"][norm]["scale"][1]),
                                      state[f"model.layers.1.{norm}.weight"].numpy())
    ids = _ids()
    with torch.no_grad():
        ref = theirs(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(jaxft.forward(cfg, merged, jnp.asarray(ids))), ref, atol=1e-4, rtol=0)
    with pytest.raises(ConfigError, match="cannot unmerge LN-tuning"):
        jaxft.unmerge(merged, adapter_tree(params))


def test_with_the_method_off_the_model_is_the_base(case):
    """The base norms stay as loaded: the reference policy of a preference objective is the base model."""
    name, pm, cfg, base_params, params, acfg, _ = case
    ids = jnp.asarray(_ids())
    np.testing.assert_array_equal(np.asarray(jaxft.forward(cfg, without_methods(params), ids)),
                                  np.asarray(jaxft.forward(cfg, base_params, ids)))


def test_nf4_base_forward_equals_the_dequantized_base(case):
    """On a 4-bit base the trained norms act beside the dequantized kernels: the same logits as on those, dense."""
    name, pm, cfg, base_params, params, acfg, root = case
    _, quantized = jaxft.from_pretrained(root / "base", quant="nf4")
    on_nf4 = jaxft.load_adapter(root / "adapter", quantized, cfg)
    dense = jax.tree.map(lambda x: dense_kernel(x, jnp.float32) if isinstance(x, jaxft.nf4.QuantizedTensor) else x,
                         on_nf4, is_leaf=lambda x: isinstance(x, jaxft.nf4.QuantizedTensor))
    ids = jnp.asarray(_ids())
    np.testing.assert_allclose(np.asarray(jaxft.forward(cfg, on_nf4, ids)),
                               np.asarray(jaxft.forward(cfg, dense, ids)), atol=1e-4, rtol=0)


def test_defaults_copy_the_norms_and_bad_configs_are_refused():
    cfg = jaxft.ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                            num_attention_heads=2)
    params = jaxft.init_params(cfg, jax.random.PRNGKey(0))
    added = LNTuningConfig().add(cfg, params, jax.random.PRNGKey(1))
    for group in (added["layers"]["input_layernorm"], added["layers"]["post_attention_layernorm"], added["norm"]):
        np.testing.assert_array_equal(np.asarray(group["ln_tuning"]["scale"]), np.asarray(group["scale"]))
    qwen2 = LNTuningConfig().add(cfg.replace(model_type="qwen2"), params, jax.random.PRNGKey(1))
    assert [k for k, g in qwen2["layers"].items() if "ln_tuning" in g] == ["post_attention_layernorm"]
    with pytest.raises(ConfigError, match="norm layers only"):
        LNTuningConfig(target_modules=["q_proj"]).add(cfg, params, jax.random.PRNGKey(1))
    with pytest.raises(ConfigError, match="in layers \\[1\\] only"):
        LNTuningConfig(target_modules=r"model\.layers\.1\.input_layernorm").add(cfg, params, jax.random.PRNGKey(1))
    with pytest.raises(ConfigError, match="exclude_modules"):
        LNTuningConfig.from_peft({"peft_type": "LN_TUNING", "exclude_modules": ["norm"]}, "adapter_config.json")


def test_a_run_trains_only_the_norm_copies_and_exports_an_adapter_peft_loads(tmp_path):
    base = make_base(tmp_path / "base")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"reverse {i} {i + 1} =", "completion": f" {i + 1} {i} ."}) + "\n"
                            for i in range(32)))
    cfg = from_dict(RunConfig, {"model": str(base), "output_dir": str(tmp_path / "run"), "peft": [{"type": "ln_tuning"}],
                                "data": {"paths": [str(data)], "max_length": 24, "batch_size": 8},
                                "optim": {"lr": 5e-2}, "train": {"steps": 4, "log_every": 1}})
    assert cfg.peft == (LNTuningConfig(),)
    summary = sft.run(cfg)
    adapter = Path(summary["export"])
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LN_TUNING"
    model_cfg, base_params = jaxft.from_pretrained(base)
    params = jaxft.load_adapter(adapter, base_params, model_cfg)
    trained = params["layers"]["input_layernorm"]
    assert float(jnp.max(jnp.abs(trained["ln_tuning"]["scale"] - trained["scale"]))) > 1e-3, "the norms trained"
    assert summary["trainable_params"] == sum(x.size for x in jax.tree.leaves(adapter_tree(params)))
    hf = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), adapter)
    ids = random_ids((2, 8), model_cfg.vocab_size, seed=5)
    with torch.no_grad():
        theirs = hf(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(jaxft.forward(model_cfg, params, jnp.asarray(ids))), theirs, atol=1e-4)
