"""Adapters on embed_tokens / lm_head: save_pretrained never drops them, and modules_to_save on a tied lm_head
trains (and saves) a full copy of the head, as PEFT does."""
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import jaxft
from hf_oracle import build, random_ids, save, torch_logits
from jaxft.config import ConfigError

HEAD_CASES = {
    "embed_lora": (dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]), {}),
    "embed_lora_tied": (dict(r=4, lora_alpha=8, target_modules=["embed_tokens"]), dict(tie_word_embeddings=True)),
    "lm_head_lora": (dict(r=3, lora_alpha=6, target_modules=["lm_head", "v_proj"]), {}),
    "trainable_tokens": (dict(r=2, lora_alpha=4, target_modules=["q_proj"], trainable_token_indices=[5, 7]), {}),
}


def _ids():
    return random_ids((2, 10), seed=3)


@pytest.mark.parametrize("name", sorted(HEAD_CASES))
def test_save_pretrained_refuses_head_adapters_and_merged_equals_peft_merge(name, tmp_path):
    lora_kwargs, model_kwargs = HEAD_CASES[name]
    save(build("llama", **model_kwargs), tmp_path / "base")
    torch.manual_seed(1)
    pm = peft.get_peft_model(build("llama", **model_kwargs),
                             peft.LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", **lora_kwargs))
    pm.save_pretrained(tmp_path / "adapter")
    cfg, base = jaxft.from_pretrained(tmp_path / "base")
    params = jaxft.load_adapter(tmp_path / "adapter", base)
    group = "embed_tokens" if "embed" in name or "tokens" in name else "lm_head"
    with pytest.raises(ConfigError, match=rf"adapters on [^;]*{group}.*jaxft\.merge"):
        jaxft.save_pretrained(cfg, params, tmp_path / "unmerged")
    assert not (tmp_path / "unmerged").exists()

    jaxft.save_pretrained(cfg, jaxft.merge(params), tmp_path / "merged")
    ours = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager")
    ref = pm.merge_and_unload()
    base_logits = torch_logits(build("llama", **model_kwargs), _ids())
    assert np.max(np.abs(torch_logits(ref, _ids()) - base_logits)) > 1e-2, "the adapter must change the logits"
    np.testing.assert_allclose(torch_logits(ours, _ids()), torch_logits(ref, _ids()), atol=1e-4, rtol=0)


def _train_a_little(cfg, params, spec=jaxft.Trainable(), steps=3, lr=2.0):
    """A few plain gradient steps, so the copied head and the LoRA weights hold trained, non-trivial values."""
    trainable, frozen = jaxft.split(params, spec)
    ids = jnp.asarray(random_ids((2, 10), seed=5))

    def loss(t):
        logits = jaxft.forward(cfg, jaxft.combine(t, frozen), ids[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], axis=-1))

    for _ in range(steps):
        trainable = jax.tree.map(lambda t, g: t - lr * g, trainable, jax.grad(loss)(trainable))
    return jaxft.combine(trainable, frozen)


def _tied_model_with(module: str, folder):
    """A tied tiny Llama saved to ``folder/base``, loaded by jaxft with LoRA on q_proj and ``module`` in
    modules_to_save; its trainable count must equal PEFT's for the same config."""
    lora_kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=[module])
    save(build("llama", tie_word_embeddings=True), folder / "base")
    pm = peft.get_peft_model(build("llama", tie_word_embeddings=True),
                             peft.LoraConfig(task_type="CAUSAL_LM", **lora_kwargs))
    cfg, base = jaxft.from_pretrained(folder / "base")
    assert cfg.tie_word_embeddings and "lm_head" not in base
    lcfg = jaxft.LoraConfig(**lora_kwargs)
    params = jaxft.lora.add(cfg, base, lcfg, jax.random.PRNGKey(0))
    ours = jaxft.peft.methods.trainable_count(params, lcfg.trainable(cfg, params))
    assert ours == pm.get_nb_trainable_parameters()[0]
    return cfg, base, lcfg, params


def test_modules_to_save_lm_head_on_tied_model_matches_peft(tmp_path):
    cfg, base, lcfg, params = _tied_model_with("lm_head", tmp_path)   # trains 8,192 head + 1,024 LoRA

    params = _train_a_little(cfg, params, lcfg.trainable(cfg, params))
    embedding = np.asarray(base["embed_tokens"]["embedding"])
    np.testing.assert_array_equal(np.asarray(params["embed_tokens"]["embedding"]), embedding)  # input side frozen
    assert np.max(np.abs(np.asarray(params["lm_head"]["kernel"]) - embedding.T)) > 1e-2, "the head copy trained"
    ours = np.asarray(jaxft.forward(cfg, params, jnp.asarray(_ids())))

    jaxft.save_adapter(params, lcfg, tmp_path / "adapter")
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    np.testing.assert_array_equal(saved["base_model.model.lm_head.weight"], np.asarray(params["lm_head"]["kernel"]).T)
    reloaded = peft.PeftModel.from_pretrained(build("llama", tie_word_embeddings=True), tmp_path / "adapter")
    np.testing.assert_allclose(torch_logits(reloaded, _ids()), ours, atol=1e-4, rtol=0)
    again = jaxft.load_adapter(tmp_path / "adapter", base)
    np.testing.assert_allclose(np.asarray(jaxft.forward(cfg, again, jnp.asarray(_ids()))), ours, atol=1e-5, rtol=0)

    jaxft.save_pretrained(cfg, jaxft.merge(params), tmp_path / "merged")   # written untied, with its own head
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager")
    assert not merged.config.tie_word_embeddings
    np.testing.assert_allclose(torch_logits(merged, _ids()), ours, atol=1e-4, rtol=0)


def test_modules_to_save_embed_tokens_on_tied_model_keeps_the_head_on_the_base_weight(tmp_path):
    """PEFT trains a copy of embed_tokens while the tied lm_head keeps the original weight."""
    cfg, base, lcfg, params = _tied_model_with("embed_tokens", tmp_path)

    params = _train_a_little(cfg, params, lcfg.trainable(cfg, params))
    embedding = np.asarray(base["embed_tokens"]["embedding"])
    assert np.max(np.abs(np.asarray(params["embed_tokens"]["embedding"]) - embedding)) > 1e-2, "embedding trained"
    np.testing.assert_array_equal(np.asarray(params["lm_head"]["kernel"]), embedding.T)   # the head stays the base's
    ours = np.asarray(jaxft.forward(cfg, params, jnp.asarray(_ids())))
    jaxft.save_adapter(params, lcfg, tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(build("llama", tie_word_embeddings=True), tmp_path / "adapter")
    np.testing.assert_allclose(torch_logits(reloaded, _ids()), ours, atol=1e-4, rtol=0)
    again = jaxft.load_adapter(tmp_path / "adapter", base)
    np.testing.assert_allclose(np.asarray(jaxft.forward(cfg, again, jnp.asarray(_ids()))), ours, atol=1e-5, rtol=0)
