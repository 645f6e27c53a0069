"""(IA)³ parity with PEFT on llama, mistral and qwen2: logits, gradients, adapter files both ways, merge; an NF4
base; a whole run with ``peft: [{type: ia3}]`` that trains only the vectors and exports a PEFT adapter."""
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
from jaxft.peft.ia3 import IA3Config
from jaxft.peft.methods import adapter_tree
# The checks every method shares, collected here with this file's cases.
from peft_parity import (test_file_tensors_and_trainable_count_equal_peft,  # noqa: F401
                         test_gradients_equal_peft_autograd, test_logits_equal_peft_and_differ_from_the_base,
                         test_nf4_base_forward_equals_the_dequantized_base,
                         test_saved_adapter_loads_in_peft_with_equal_logits)

CASES = {  # family, PEFT's IA3Config arguments (targets None: PEFT's default for the family)
    "llama": ("llama", {}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),  # q_proj and v_proj have biases: the output scaling covers them
    "explicit": ("qwen2", dict(target_modules=["k_proj", "up_proj", "o_proj"], feedforward_modules=["up_proj"])),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    """PEFT's model with random (not identity) vectors, its saved adapter loaded into jaxft."""
    model_type, kwargs = CASES[request.param]
    torch.manual_seed(1)
    pm = peft.get_peft_model(build(model_type, seed=0),
                             peft.IA3Config(init_ia3_weights=False, task_type="CAUSAL_LM", **kwargs))
    root = tmp_path_factory.mktemp(request.param)
    return peft_parity.load_case(pm, model_type, root, IA3Config)


def test_merge_equals_peft_merge_and_unload_and_unmerges(case):
    model_type, pm, cfg, base_params, params, acfg, _ = case
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
    ids = jnp.asarray(peft_parity.ids())
    np.testing.assert_allclose(np.asarray(jaxft.forward(cfg, merged, ids)),
                               np.asarray(jaxft.forward(cfg, params, ids)), atol=1e-4, rtol=0)
    back = jaxft.unmerge(merged, adapter_tree(params))
    for module in ("k_proj", "v_proj", "down_proj"):
        np.testing.assert_allclose(np.asarray(back["layers"][module]["kernel"]),
                                   np.asarray(base_params["layers"][module]["kernel"]), atol=1e-5, rtol=0)


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
    summary, base = peft_parity.run_with(tmp_path, {"type": "ia3"}, IA3Config())
    params = peft_parity.check_exported_adapter(summary, base, "IA3")
    vectors = params["layers"]["v_proj"]["ia3"]["output"]
    assert float(jnp.max(jnp.abs(vectors - 1.0))) > 1e-3, "the vectors trained"


def test_an_adapter_written_with_the_model_config_names_its_resolved_targets(tmp_path):
    """PEFT writes the family's default targets resolved; so does jaxft when it has the model's config, and the
    folder then loads without it (a Qwen2 IA3 adapter: q_proj, v_proj, down_proj, not Llama's k_proj)."""
    from hf_oracle import save

    save(build("qwen2", seed=0), tmp_path / "base")
    cfg, base = jaxft.from_pretrained(tmp_path / "base")
    acfg = IA3Config(init_ia3_weights=False)
    params = acfg.add(cfg, base, jax.random.PRNGKey(0))
    jaxft.save_adapter(params, acfg, tmp_path / "adapter", cfg=cfg)
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(written["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    assert written["feedforward_modules"] == ["down_proj"]
    loaded = jaxft.load_adapter(tmp_path / "adapter", base)  # no cfg: the file says what it targets
    for want, got in zip(jax.tree.leaves(adapter_tree(params)), jax.tree.leaves(adapter_tree(loaded))):
        np.testing.assert_array_equal(np.asarray(want), np.asarray(got))
