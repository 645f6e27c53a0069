"""Prompt tuning and P-tuning (MLP and LSTM encoders; jaxft.peft.prompt) against PEFT's PromptTuningConfig /
PromptEncoderConfig (the checks of prompt_style.py, on each family), and their inits and config checks."""
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

import jaxft
from hf_oracle import build, save
from jaxft.config import ConfigError
from jaxft.ops.linear import embedding_table
from jaxft.peft.prompt import (ENCODER, LSTM_MLP_LAYERS, MLP_LAYERS, PROMPT, PromptEncoderConfig, PromptTuningConfig,
                               encoded, lstm_outputs)
from prompt_style import (Case, as_jax, randomized, test_gradients_match_peft_autograd,  # noqa: F401 (collected
                          test_greedy_generation_matches_peft_greedy, test_logits_match_peft,  # here, with this
                          test_merge_is_refused, test_nf4_base_gives_its_dequantized_base_logits,  # file's
                          test_only_its_leaves_train,  # case)
                          test_packed_segments_each_see_the_virtual_tokens, test_saved_adapter_loads_in_peft_and_back)

P = 3
H = 24   # P-tuning's encoder width
MLP_HEAD = (0, 2, 4)  # PEFT's linears in mlp_head, one per name of MLP_LAYERS
LSTM_MLP_HEAD = (0, 2)  # with an LSTM encoder, one per name of LSTM_MLP_LAYERS


def _case(family, kind, tmp_path_factory):
    model = build(family)
    cfg, base = jaxft.from_pretrained(save(model, tmp_path_factory.mktemp(family) / "m"))
    if kind == "prompt":
        pcfg = PromptTuningConfig(num_virtual_tokens=P)
        peft_cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)
    else:  # p_tuning (MLP) or lstm (P-tuning with an LSTM encoder of 2 layers, PEFT's default)
        encoder_type = "LSTM" if kind == "lstm" else "MLP"
        pcfg = PromptEncoderConfig(num_virtual_tokens=P, encoder_hidden_size=H,
                                   encoder_reparameterization_type=encoder_type)
        peft_cfg = peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, encoder_hidden_size=H,
                                            encoder_reparameterization_type=encoder_type)
    pm = randomized(peft.get_peft_model(model, peft_cfg))
    encoder = pm.prompt_encoder["default"]
    params = pcfg.add(cfg, base, jax.random.PRNGKey(0))
    if kind == "prompt":
        params[PROMPT] = {"embedding": as_jax(encoder.embedding.weight)}
        return Case(pm, cfg, base, params, pcfg, _prompt_grads)
    if kind == "lstm":
        params[ENCODER] = {"embedding": as_jax(encoder.embedding.weight),
                           "lstm_head": {name: as_jax(w) for name, w in encoder.lstm_head.named_parameters()},
                           "lstm_mlp": _linears(encoder, LSTM_MLP_LAYERS, LSTM_MLP_HEAD)}
        return Case(pm, cfg, base, params, pcfg, _lstm_grads)
    params[ENCODER] = {"embedding": as_jax(encoder.embedding.weight),
                       "mlp": _linears(encoder, MLP_LAYERS, MLP_HEAD)}
    return Case(pm, cfg, base, params, pcfg, _encoder_grads)


def _linears(encoder, names, indices):
    return {name: {"kernel": as_jax(encoder.mlp_head[i].weight).T, "bias": as_jax(encoder.mlp_head[i].bias)}
            for name, i in zip(names, indices)}


def _prompt_grads(grads, encoder):
    return [(grads[PROMPT]["embedding"], encoder.embedding.weight.grad)]


def _encoder_grads(grads, encoder):
    return [(grads[ENCODER]["embedding"], encoder.embedding.weight.grad)] + [
        (grads[ENCODER]["mlp"][name]["kernel"], encoder.mlp_head[i].weight.grad.T)
        for name, i in zip(MLP_LAYERS, MLP_HEAD)]


def _lstm_grads(grads, encoder):
    ours = grads[ENCODER]
    return [(ours["embedding"], encoder.embedding.weight.grad)] + [
        (ours["lstm_head"][name], w.grad) for name, w in encoder.lstm_head.named_parameters()] + [
        (ours["lstm_mlp"][name]["kernel"], encoder.mlp_head[i].weight.grad.T)
        for name, i in zip(LSTM_MLP_LAYERS, LSTM_MLP_HEAD)]


@pytest.fixture(scope="module", params=[("llama", "prompt"), ("mistral", "prompt"), ("qwen2", "prompt"),
                                        ("llama", "p_tuning"), ("qwen2", "p_tuning"),
                                        ("llama", "lstm"), ("mistral", "lstm"), ("qwen2", "lstm")],
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
    (lambda: PromptEncoderConfig(encoder_reparameterization_type="GRU"), "GRU"),
    (lambda: PromptEncoderConfig(encoder_num_layers=0), "encoder_num_layers"),
    (lambda: PromptEncoderConfig(encoder_dropout=1.0), "encoder_dropout"),
    (lambda: PromptEncoderConfig(task_type="SEQ_CLS"), "task_type")])
def test_bad_config_is_refused(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_lstm_encoder_is_torchs_lstm_with_dropout_between_layers_in_training(tmp_path):
    """The LSTM encoder's layers are torch's nn.LSTM (3 layers here); with an rng (training) the rate
    ``encoder_dropout`` drops units between layers as torch's (inverted dropout, so the mean is kept), never after
    the last layer: a 1-layer encoder has no rate to apply."""
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(8, 5, num_layers=3, bidirectional=True, batch_first=True)
    x = torch.randn(1, 6, 8)
    params = {name: as_jax(w) for name, w in lstm.named_parameters()}
    with torch.no_grad():
        ref = lstm(x)[0][0].numpy()
    np.testing.assert_allclose(np.asarray(lstm_outputs(params, as_jax(x[0]))), ref, atol=1e-6, rtol=0)
    cfg, base = jaxft.from_pretrained(save(build("llama"), tmp_path / "m"))
    pcfg = PromptEncoderConfig(num_virtual_tokens=P, encoder_reparameterization_type="LSTM", encoder_dropout=0.5)
    encoder = pcfg.add(cfg, base, jax.random.PRNGKey(0))[ENCODER]
    assert float(encoder["dropout"]) == 0.5 and f"{ENCODER}/dropout" not in pcfg.trainable(cfg, base).paths
    dropped = [np.asarray(encoded(encoder, jax.random.PRNGKey(k))) for k in range(2)]
    assert np.abs(dropped[0] - dropped[1]).max() > 1e-3
    assert np.abs(dropped[0] - np.asarray(encoded(encoder))).max() > 1e-3
    one_layer = PromptEncoderConfig(num_virtual_tokens=P, encoder_reparameterization_type="LSTM",
                                    encoder_num_layers=1, encoder_dropout=0.5).add(cfg, base, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(np.asarray(encoded(one_layer[ENCODER], jax.random.PRNGKey(1))),
                                  np.asarray(encoded(one_layer[ENCODER])))


def test_text_init_naming_no_tokenizer_writes_no_adapter_config():
    """A run fills in its tokenizer; in Python a TEXT config without one cannot give PEFT's adapter_config.json."""
    pcfg = PromptTuningConfig(num_virtual_tokens=P, prompt_tuning_init="TEXT", prompt_tuning_init_text="a text")
    with pytest.raises(ConfigError, match="tokenizer_name_or_path"):
        pcfg.peft_config()
