"""LoRA / rsLoRA / DoRA parity with PEFT: logits, gradients, trainable counts, adapter files, merge."""
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

import jaxft
from hf_oracle import build, random_ids, save
from jaxft.hf.peft_format import adapter_tensors

CASES = {
    "plain": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "rslora": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], use_rslora=True)),
    "dora": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_dora=True)),
    "all_linear": ("llama", dict(r=2, lora_alpha=4, target_modules="all-linear")),
    "embed_tokens": ("llama", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])),
    "modules_to_save": ("llama", dict(r=4, lora_alpha=8, target_modules=["k_proj"], modules_to_save=["lm_head"])),
    "patterns": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"],
                               rank_pattern={"layers.1.self_attn.q_proj": 2, "up_proj": 6},
                               alpha_pattern={"layers.0.mlp.up_proj": 3})),
    "layers_to_transform": ("llama", dict(r=4, lora_alpha=8, target_modules=["v_proj", "gate_proj"],
                                          layers_to_transform=[1])),
    "bias_all": ("qwen2", dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], bias="all")),
    "trainable_tokens": ("llama", dict(r=2, lora_alpha=4, target_modules=["q_proj"], trainable_token_indices=[5, 7])),
    "regex_lm_head": ("llama", dict(r=3, lora_alpha=6, target_modules=r".*\.(k_proj|lm_head)|lm_head")),
    "exclude_modules": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                      exclude_modules=["layers.0.self_attn.q_proj", "down_proj"])),
}


def _peft_model(model_type, lora_kwargs, seed=0):
    torch.manual_seed(seed + 1)
    base = build(model_type, seed=seed)
    config = peft.LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", **lora_kwargs)
    return base, peft.get_peft_model(build(model_type, seed=seed), config)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    model_type, lora_kwargs = CASES[request.param]
    base, pm = _peft_model(model_type, lora_kwargs)
    root = tmp_path_factory.mktemp(request.param)
    save(base, root / "base")
    pm.save_pretrained(root / "adapter")
    cfg, base_params = jaxft.from_pretrained(root / "base")
    params = jaxft.load_adapter(root / "adapter", base_params)
    lcfg = jaxft.LoraConfig.from_peft(pm.peft_config["default"].to_dict(), "peft")
    return request.param, pm, cfg, base_params, params, lcfg


def _ids():
    return random_ids((2, 10), seed=3)


def _labels():
    return random_ids((2, 10), seed=4)


def test_adapter_changes_logits_and_matches_peft(case):
    name, pm, cfg, base_params, params, lcfg = case
    ids = _ids()
    with torch.no_grad():
        ref = pm(torch.as_tensor(ids)).logits.numpy()
    base = np.asarray(jaxft.forward(cfg, base_params, jnp.asarray(ids)))
    ours = np.asarray(jaxft.forward(cfg, params, jnp.asarray(ids)))
    assert np.max(np.abs(ref - base)) > 1e-2, "the adapter must visibly change the logits"
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_trainable_count_equals_peft(case):
    name, pm, cfg, base_params, params, lcfg = case
    ours = jaxft.peft.methods.trainable_count(params, lcfg.trainable(cfg, params))
    assert ours == pm.get_nb_trainable_parameters()[0]


def _torch_grads(pm):
    ids, labels = torch.as_tensor(_ids()), torch.as_tensor(_labels())
    pm.zero_grad()
    logits = pm(ids).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="mean")
    loss.backward()
    grads = {}
    for n, p in pm.named_parameters():
        if p.requires_grad:
            grads[n.replace(".default", "").replace(".modules_to_save", "").replace("lora_magnitude_vector.weight",
                                                                                    "lora_magnitude_vector")] = p.grad
    return grads


def _jax_grads(cfg, params, spec):
    trainable, frozen = jaxft.split(params, spec)
    ids, labels = jnp.asarray(_ids()), jnp.asarray(_labels())

    def loss(trainable):
        logits = jaxft.forward(cfg, jaxft.combine(trainable, frozen), ids)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], axis=-1))

    return jaxft.combine(jax.grad(loss)(trainable), frozen)


def test_gradients_match_torch_autograd_through_peft(case):
    name, pm, cfg, base_params, params, lcfg = case
    ours = adapter_tensors(_jax_grads(cfg, params, lcfg.trainable(cfg, params)), lcfg)
    ref = _torch_grads(pm)
    assert ours, "no trainable tensors"
    for tensor_name, g in ours.items():
        match = [k for k in ref if k.endswith(tensor_name.removeprefix("base_model.model."))]
        assert match, f"{tensor_name} has no PEFT gradient"
        np.testing.assert_allclose(g, ref[match[0]].numpy(), atol=1e-5, rtol=1e-4, err_msg=tensor_name)


def test_saved_adapter_loads_in_peft_with_same_logits(case, tmp_path):
    name, pm, cfg, base_params, params, lcfg = case
    jaxft.save_adapter(params, lcfg, tmp_path / "ours")
    model_type = CASES[name][0]
    reloaded = peft.PeftModel.from_pretrained(build(model_type, seed=0), tmp_path / "ours")
    ids = torch.as_tensor(_ids())
    with torch.no_grad():
        np.testing.assert_allclose(reloaded(ids).logits.numpy(), pm(ids).logits.numpy(), atol=1e-5, rtol=0)


def test_merged_logits_equal_unmerged(case):
    name, pm, cfg, base_params, params, lcfg = case
    merged = jaxft.merge(params)
    assert not any("lora" in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(merged)[0])
    ids = jnp.asarray(_ids())
    np.testing.assert_allclose(np.asarray(jaxft.forward(cfg, merged, ids)),
                               np.asarray(jaxft.forward(cfg, params, ids)), atol=1e-4, rtol=0)
