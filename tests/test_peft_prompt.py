"""Prompt tuning and P-tuning (jaxft.peft.prompt) against PEFT's PromptTuningConfig / PromptEncoderConfig (the
checks of prompt_style.py, on each family), and their inits and config checks."""
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest

import jaxft
from hf_oracle import build, save
from jaxft.config import ConfigError
from jaxft.ops.linear import embedding_table
from jaxft.peft.prompt import ENCODER, MLP_LAYERS, PROMPT, PromptEncoderConfig, PromptTuningConfig
from prompt_style import (Case, as_jax, randomized, test_gradients_match_peft_autograd,  # noqa: F401 (collected
                          test_greedy_generation_matches_peft_greedy, test_logits_match_peft,  # here, with this
                          test_merge_is_refused, test_nf4_base_gives_its_dequantized_base_logits,  # file's
                          test_only_its_leaves_train,  # case)
                          test_packed_segments_each_see_the_virtual_tokens, test_saved_adapter_loads_in_peft_and_back)

P = 3
H = 24   # P-tuning's encoder width
MLP_HEAD = (0, 2, 4)  # PEFT's linears in mlp_head, one per name of MLP_LAYERS


def _case(family, kind, tmp_path_factory):
    model = build(family)
    cfg, base = jaxft.from_pretrained(save(model, tmp_path_factory.mktemp(family) / "m"))
    if kind == "prompt":
        pcfg = PromptTuningConfig(num_virtual_tokens=P)
        peft_cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)
    else:
        pcfg = PromptEncoderConfig(num_virtual_tokens=P, encoder_hidden_size=H)
        peft_cfg = peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, encoder_hidden_size=H)
    pm = randomized(peft.get_peft_model(model, peft_cfg))
    encoder = pm.prompt_encoder["default"]
    params = pcfg.add(cfg, base, jax.random.PRNGKey(0))
    if kind == "prompt":
        params[PROMPT] = {"embedding": as_jax(encoder.embedding.weight)}
        return Case(pm, cfg, base, params, pcfg, _prompt_grads)
    linears = [encoder.mlp_head[i] for i in MLP_HEAD]
    params[ENCODER] = {"embedding": as_jax(encoder.embedding.weight),
                       "mlp": {name: {"kernel": as_jax(lin.weight).T, "bias": as_jax(lin.bias)}
                               for name, lin in zip(MLP_LAYERS, linears)}}
    return Case(pm, cfg, base, params, pcfg, _encoder_grads)


def _prompt_grads(grads, encoder):
    return [(grads[PROMPT]["embedding"], encoder.embedding.weight.grad)]


def _encoder_grads(grads, encoder):
    return [(grads[ENCODER]["embedding"], encoder.embedding.weight.grad)] + [
        (grads[ENCODER]["mlp"][name]["kernel"], encoder.mlp_head[i].weight.grad.T)
        for name, i in zip(MLP_LAYERS, MLP_HEAD)]


@pytest.fixture(scope="module", params=[("llama", "prompt"), ("mistral", "prompt"), ("qwen2", "prompt"),
                                        ("llama", "p_tuning"), ("qwen2", "p_tuning")],
                ids=lambda p: "-".join(p))
def case(request, tmp_path_factory):
    return _case(*request.param, tmp_path_factory)


def test_inits_follow_peft(tmp_path):
    """SAMPLE_VOCAB copies vocabulary rows; TEXT copies the text's rows, cut or repeated to P as PEFT does."""
    cfg, params = jaxft.from_pretrained(save(build("llama"), tmp_path / "m"))
    table = np.asarray(embedding_table(params["embed_tokens"]))
    text = dict(prompt_tuning_init="TEXT", prompt_tuning_init_text="a text", tokenizer_name_or_path="tok")
    for ids, expected in (([5, 9], [5, 9, 5]), ([4, 8, 12, 16], [4, 8, 12])):
        added = PromptTuningConfig(num_virtual_tokens=P, **text).add(cfg, params, jax.random.PRNGKey(0), text_ids=ids)
        np.testing.assert_array_equal(np.asarray(added[PROMPT]["embedding"]), table[expected])
    sampled = np.asarray(PromptTuningConfig(num_virtual_tokens=P, prompt_tuning_init="SAMPLE_VOCAB").add(
        cfg, params, jax.random.PRNGKey(1))[PROMPT]["embedding"])
    assert all(np.any(np.all(table == row, axis=1)) for row in sampled)
    drawn = PromptTuningConfig(num_virtual_tokens=50).add(cfg, params, jax.random.PRNGKey(2))[PROMPT]["embedding"]
    assert 0.8 < float(jnp.std(drawn)) < 1.2
    with pytest.raises(ConfigError, match="token ids"):
        PromptTuningConfig(num_virtual_tokens=P, **text).add(cfg, params, jax.random.PRNGKey(0))


@pytest.mark.parametrize("make,message", [
    (lambda: PromptTuningConfig(num_virtual_tokens=0), "num_virtual_tokens"),
    (lambda: PromptTuningConfig(prompt_tuning_init="ZEROS"), "prompt_tuning_init"),
    (lambda: PromptTuningConfig(prompt_tuning_init="TEXT"), "prompt_tuning_init_text"),
    (lambda: PromptEncoderConfig(encoder_reparameterization_type="LSTM"), "LSTM"),
    (lambda: PromptEncoderConfig(task_type="SEQ_CLS"), "task_type")])
def test_bad_config_is_refused(make, message):
    with pytest.raises(ConfigError, match=message):
        make()
