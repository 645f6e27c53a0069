"""LoRA tree behaviour that needs no PEFT model: init, masking, training steps, unmerge, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxft
from hf_oracle import random_ids

CFG = jaxft.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def base():
    return jaxft.init_params(CFG, jax.random.PRNGKey(0))


def test_default_init_leaves_logits_unchanged(base):
    params = jaxft.lora.add(CFG, base, jaxft.LoraConfig(r=4, target_modules="all-linear"), jax.random.PRNGKey(1))
    ids = jnp.asarray(random_ids((1, 6), vocab=64))
    np.testing.assert_array_equal(jaxft.forward(CFG, params, ids), jaxft.forward(CFG, base, ids))
    a = params["layers"]["q_proj"]["lora"]["a"]
    assert a.shape == (3, 32, 4) and float(jnp.max(jnp.abs(a))) <= 1 / np.sqrt(32)
    assert float(jnp.max(jnp.abs(params["layers"]["q_proj"]["lora"]["b"]))) == 0.0


def test_base_tree_is_not_modified(base):
    before = jax.tree.map(np.asarray, base)
    jaxft.lora.add(CFG, base, jaxft.LoraConfig(r=4), jax.random.PRNGKey(1))
    assert jax.tree.structure(before) == jax.tree.structure(base)


def _train_steps(params, n=3):
    trainable, frozen = jaxft.split(params, jaxft.Trainable())
    opt = optax.adamw(1e-2, weight_decay=0.1)
    state = opt.init(trainable)
    ids = jnp.asarray(random_ids((2, 8), vocab=64))

    @jax.jit
    def step(trainable, state):
        def loss(t):
            logits = jaxft.forward(CFG, jaxft.combine(t, frozen), ids[:, :-1])
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1))
        grads = jax.grad(loss)(trainable)
        updates, state = opt.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state, grads

    for _ in range(n):
        trainable, state, grads = step(trainable, state)
    return jaxft.combine(trainable, frozen), state, grads


def test_training_changes_only_adapter_leaves(base):
    lcfg = jaxft.LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    params = jaxft.lora.add(CFG, base, lcfg, jax.random.PRNGKey(2))
    trained, state, _ = _train_steps(params)
    flat_before = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    changed = {jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_flatten_with_path(trained)[0]
               if not np.array_equal(np.asarray(x), np.asarray(flat_before[p]))}
    assert changed == {"['layers']['q_proj']['lora']['a']", "['layers']['q_proj']['lora']['b']",
                       "['layers']['down_proj']['lora']['a']", "['layers']['down_proj']['lora']['b']"}
    n_state = sum(x.size for x in jax.tree.leaves(state))
    n_trainable = sum(x.size for x in jax.tree.leaves(jaxft.split(params, jaxft.Trainable())[0]))
    assert n_state == 2 * n_trainable + 1  # Adam's mu and nu for adapters only, plus the step count


def test_rank_padding_gets_zero_gradient_and_stays_zero(base):
    lcfg = jaxft.LoraConfig(r=4, target_modules=["v_proj"], rank_pattern={"layers.0.self_attn.v_proj": 2},
                            layers_to_transform=[0, 2], init_lora_weights=False)
    params = jaxft.lora.add(CFG, base, lcfg, jax.random.PRNGKey(3))
    mask = np.asarray(params["layers"]["v_proj"]["lora"]["mask"])
    np.testing.assert_array_equal(mask.sum(-1), [2, 0, 4])
    trained, _, grads = _train_steps(params)
    for leaf in ("a", "b"):
        g = np.asarray(grads["layers"]["v_proj"]["lora"][leaf])
        w = np.asarray(trained["layers"]["v_proj"]["lora"][leaf])
        pad = (mask == 0)[:, None, :] if leaf == "a" else (mask == 0)[:, :, None]
        pad = np.broadcast_to(pad, g.shape)
        assert np.all(g[pad] == 0) and np.all(w[pad] == 0)
        assert np.any(g[~pad] != 0)
    assert jaxft.peft.methods.trainable_count(params, jaxft.Trainable()) == (2 + 4) * (32 + 16)


def test_unmerge_restores_base_weights(base):
    lcfg = jaxft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    params = jaxft.lora.add(CFG, base, lcfg, jax.random.PRNGKey(4))
    merged = jaxft.merge(params)
    restored = jaxft.unmerge(merged, jaxft.peft.methods.adapter_tree(params))
    for m in ("q_proj", "down_proj"):
        np.testing.assert_allclose(restored["layers"][m]["kernel"], base["layers"][m]["kernel"], atol=1e-6)
    ids = jnp.asarray(random_ids((1, 5), vocab=64))
    np.testing.assert_allclose(jaxft.forward(CFG, restored, ids), jaxft.forward(CFG, params, ids), atol=1e-5)


def test_dropout_only_in_training(base):
    lcfg = jaxft.LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.5, init_lora_weights=False)
    params = jaxft.lora.add(CFG, base, lcfg, jax.random.PRNGKey(5))
    ids = jnp.asarray(random_ids((1, 6), vocab=64))
    eval_a, eval_b = jaxft.forward(CFG, params, ids), jaxft.forward(CFG, params, ids)
    np.testing.assert_array_equal(eval_a, eval_b)
    train = jaxft.forward(CFG, params, ids, rng=jax.random.PRNGKey(0))
    assert float(jnp.max(jnp.abs(train - eval_a))) > 1e-4


@pytest.mark.parametrize("kwargs,match", [
    (dict(r=0), "r must be a positive integer"),
    (dict(lora_dropout=1.0), "lora_dropout"),
    (dict(bias="some"), "bias must be one of"),
    (dict(task_type="SEQ_2_SEQ_LM"), "decoder-only"),
])
def test_bad_lora_config_is_rejected(kwargs, match):
    with pytest.raises(jaxft.ConfigError, match=match):
        jaxft.LoraConfig(**kwargs)


def test_unknown_target_module_is_named(base):
    with pytest.raises(jaxft.ConfigError, match=r"\['qkv_proj'\] match no module"):
        jaxft.lora.add(CFG, base, jaxft.LoraConfig(target_modules=["q_proj", "qkv_proj"]), jax.random.PRNGKey(0))


def test_adapter_for_a_different_base_shape_is_rejected(tmp_path, base):
    params = jaxft.lora.add(CFG, base, jaxft.LoraConfig(r=4), jax.random.PRNGKey(0))
    jaxft.save_adapter(params, jaxft.LoraConfig(r=4), tmp_path / "a")
    other = jaxft.init_params(CFG.replace(hidden_size=48, num_attention_heads=4), jax.random.PRNGKey(0))
    with pytest.raises(jaxft.CheckpointError, match="different base"):
        jaxft.load_adapter(tmp_path / "a", other)


def test_adapter_config_r_that_disagrees_with_the_tensors_is_named(tmp_path, base):
    import json

    params = jaxft.lora.add(CFG, base, jaxft.LoraConfig(r=4), jax.random.PRNGKey(0))
    folder = jaxft.save_adapter(params, jaxft.LoraConfig(r=4), tmp_path / "a")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))  # what a mismatched export wrote
    with pytest.raises(jaxft.CheckpointError) as info:
        jaxft.load_adapter(folder, base)
    message = str(info.value)
    assert f"{folder / 'adapter_config.json'} says r = 8" in message and "has rank 4" in message
    assert "different base" not in message


def test_dora_file_without_magnitudes_is_rejected(tmp_path, base):
    from jaxft.hf.safetensors_io import SafetensorsFile, write_safetensors
    lcfg = jaxft.LoraConfig(r=4, use_dora=True)
    params = jaxft.lora.add(CFG, base, lcfg, jax.random.PRNGKey(0))
    folder = jaxft.save_adapter(params, lcfg, tmp_path / "a")
    st = SafetensorsFile(folder / "adapter_model.safetensors")
    kept = {k: np.array(st.get(k)) for k in st.keys() if "magnitude" not in k}
    write_safetensors(folder / "adapter_model.safetensors", kept)
    with pytest.raises(jaxft.CheckpointError, match="DoRA adapter file without magnitude"):
        jaxft.load_adapter(folder, base)


def test_summary_reports_trainable_share(base):
    params = jaxft.lora.add(CFG, base, jaxft.LoraConfig(r=4), jax.random.PRNGKey(0))
    text = jaxft.peft.methods.summary(params, jaxft.Trainable())
    assert f"trainable params: {jaxft.peft.methods.trainable_count(params, jaxft.Trainable()):,}" in text


def test_resized_vocabulary_keeps_old_logits_and_trains_only_the_new_rows(base):
    cfg, grown = jaxft.lora.resize_embeddings(CFG, base, CFG.vocab_size + 2)
    ids = jnp.asarray(random_ids((1, 6), vocab=64))
    np.testing.assert_allclose(jaxft.forward(cfg, grown, ids)[..., :64], jaxft.forward(CFG, base, ids), atol=1e-6)
    lcfg = jaxft.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[64, 65])
    params = jaxft.lora.add(cfg, grown, lcfg, jax.random.PRNGKey(0))
    trainable, _ = jaxft.split(params, jaxft.Trainable())
    assert trainable["embed_tokens"]["trainable_tokens"]["rows"].shape == (2, 32)
    assert trainable["embed_tokens"]["embedding"] is None
    with pytest.raises(jaxft.ConfigError, match="resize the embeddings first"):
        jaxft.lora.add(CFG, base, lcfg, jax.random.PRNGKey(0))
