"""Adapter folders of the methods whose default targets depend on the model family (IA3, LN-tuning): written with the
model's cfg they name the family's targets, so PEFT and jaxft (without the cfg) load them with equal logits; saved
without the cfg they are refused, since a param tree's shapes do not tell a Qwen2 from a Llama."""
import json

import jax
import numpy as np
import peft
import pytest

import jaxft
from hf_oracle import build, random_ids, save, torch_logits
from jaxft.peft.ia3 import IA3Config
from jaxft.peft.ln_tuning import LNTuningConfig

CONFIGS = {"ia3": (IA3Config(), ["down_proj", "q_proj", "v_proj"]),
           "ln_tuning": (LNTuningConfig(), ["post_attention_layernorm"])}  # PEFT's Qwen2 defaults


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    folder = save(build("qwen2", seed=0), tmp_path_factory.mktemp("qwen2"))
    return jaxft.from_pretrained(folder)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_folder_names_the_family_targets_and_loads_in_peft_and_jaxft(qwen2, tmp_path, name):
    cfg, base = qwen2
    acfg, targets = CONFIGS[name]
    params = acfg.add(cfg, base, jax.random.PRNGKey(0))
    trained, frozen = jaxft.split(params, acfg.trainable(cfg, params))
    keys = iter(jax.random.split(jax.random.PRNGKey(1), len(jax.tree.leaves(trained))))
    trained = jax.tree.map(lambda x: x + 0.2 * jax.random.normal(next(keys), x.shape), trained)  # non-trivial
    params = jaxft.combine(trained, frozen)
    with pytest.raises(jaxft.ConfigError, match="pass the model's config"):
        jaxft.save_adapter(params, acfg, tmp_path / "without-cfg")
    jaxft.save_adapter(params, acfg, tmp_path / "adapter", cfg=cfg)
    assert sorted(json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"]) == targets
    ids = random_ids((2, 7), seed=2)
    ours = np.asarray(jaxft.forward(cfg, params, ids))
    assert np.max(np.abs(ours - np.asarray(jaxft.forward(cfg, base, ids)))) > 1e-3
    reloaded = peft.PeftModel.from_pretrained(build("qwen2", seed=0), tmp_path / "adapter").eval()
    np.testing.assert_allclose(torch_logits(reloaded, ids), ours, atol=1e-4, rtol=0)
    loaded = jaxft.load_adapter(tmp_path / "adapter", base)  # no cfg: the folder names its targets
    np.testing.assert_allclose(np.asarray(jaxft.forward(cfg, loaded, ids)), ours, atol=1e-6, rtol=0)
