"""LN-tuning parity with PEFT on llama, mistral and qwen2: logits, gradients, adapter files both ways, merge; the
base stays the reference with the method off; an NF4 base; a whole run with ``peft: [{type: ln_tuning}]`` that
trains only the norms' copies and exports a PEFT adapter."""
import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

import jaxft
import peft_parity
from hf_oracle import build
from jaxft.config import ConfigError
from jaxft.peft.ln_tuning import LNTuningConfig
from jaxft.peft.methods import adapter_tree, without_methods
# The checks every method shares, collected here with this file's cases.
from peft_parity import (test_file_tensors_and_trainable_count_equal_peft,  # noqa: F401
                         test_gradients_equal_peft_autograd, test_logits_equal_peft_and_differ_from_the_base,
                         test_nf4_base_forward_equals_the_dequantized_base,
                         test_saved_adapter_loads_in_peft_with_equal_logits)

CASES = {  # family, PEFT's LNTuningConfig arguments (targets None: PEFT's default for the family)
    "llama": ("llama", {}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),  # post_attention_layernorm only
    "explicit": ("llama", dict(target_modules=["input_layernorm"])),
}


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
    return peft_parity.load_case(pm, model_type, root, LNTuningConfig)


def test_merge_equals_peft_merge_and_unload_and_unmerge_is_refused(case):
    model_type, pm, cfg, base_params, params, acfg, _ = case
    merged = jaxft.merge(params)
    assert "ln_tuning" not in json.dumps(jax.tree_util.tree_map(lambda x: None, merged))
    theirs = copy.deepcopy(pm).merge_and_unload()
    state = theirs.state_dict()
    np.testing.assert_array_equal(np.asarray(merged["norm"]["scale"]), state["model.norm.weight"].numpy())
    for norm in ("input_layernorm", "post_attention_layernorm"):
        np.testing.assert_array_equal(np.asarray(merged["layers"][norm]["scale"][1]),
                                      state[f"model.layers.1.{norm}.weight"].numpy())
    ids = peft_parity.ids()
    with torch.no_grad():
        ref = theirs(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(jaxft.forward(cfg, merged, jnp.asarray(ids))), ref, atol=1e-4, rtol=0)
    with pytest.raises(ConfigError, match="cannot unmerge LN-tuning"):
        jaxft.unmerge(merged, adapter_tree(params))


def test_with_the_method_off_the_model_is_the_base(case):
    """The base norms stay as loaded: the reference policy of a preference objective is the base model."""
    model_type, pm, cfg, base_params, params, acfg, _ = case
    ids = jnp.asarray(peft_parity.ids())
    np.testing.assert_array_equal(np.asarray(jaxft.forward(cfg, without_methods(params), ids)),
                                  np.asarray(jaxft.forward(cfg, base_params, ids)))


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
    summary, base = peft_parity.run_with(tmp_path, {"type": "ln_tuning"}, LNTuningConfig())
    params = peft_parity.check_exported_adapter(summary, base, "LN_TUNING")
    trained = params["layers"]["input_layernorm"]
    assert float(jnp.max(jnp.abs(trained["ln_tuning"]["scale"] - trained["scale"]))) > 1e-3, "the norms trained"
