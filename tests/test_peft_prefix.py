"""Prefix tuning (jaxft.peft.prefix) against PEFT's PrefixTuningConfig, with and without the reparameterizing MLP
(the checks of prompt_style.py, on each family), and its own init and config checks."""
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest

import jaxft
from hf_oracle import build, save
from jaxft.config import ConfigError
from jaxft.peft.prefix import ENCODER, PrefixTuningConfig, from_flat, to_flat, with_prefix
from prompt_style import (Case, as_jax, randomized, test_gradients_match_peft_autograd,  # noqa: F401 (collected
                          test_greedy_generation_matches_peft_greedy, test_logits_match_peft,  # here, with this
                          test_merge_is_refused, test_nf4_base_gives_its_dequantized_base_logits,  # file's
                          test_only_its_leaves_train,  # case)
                          test_packed_segments_each_see_the_virtual_tokens, test_saved_adapter_loads_in_peft_and_back)

P = 3


def _case(family, projection, tmp_path_factory):
    model = build(family)
    cfg, base = jaxft.from_pretrained(save(model, tmp_path_factory.mktemp(family) / "m"))
    pm = randomized(peft.get_peft_model(model, peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=projection, encoder_hidden_size=24)))
    encoder = pm.prompt_encoder["default"]
    pcfg = PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=projection, encoder_hidden_size=24)
    params = pcfg.add(cfg, base, jax.random.PRNGKey(0))
    if projection:
        first, _, last = encoder.transform
        params[ENCODER] = {"embedding": as_jax(encoder.embedding.weight),
                           "hidden": {"kernel": as_jax(first.weight).T, "bias": as_jax(first.bias)},
                           "out": {"kernel": as_jax(last.weight).T, "bias": as_jax(last.bias)}}
    else:
        params["layers"]["prefix"] = from_flat(cfg, as_jax(encoder.embedding.weight))
    return Case(pm, cfg, base, params, pcfg, _projection_grads if projection else _prefix_grads)


def _prefix_grads(grads, encoder):
    return [(to_flat(grads["layers"]["prefix"]), encoder.embedding.weight.grad)]


def _projection_grads(grads, encoder):
    first, _, last = encoder.transform
    ours = grads[ENCODER]
    return [(ours["embedding"], encoder.embedding.weight.grad), (ours["hidden"]["kernel"], first.weight.grad.T),
            (ours["out"]["kernel"], last.weight.grad.T), (ours["out"]["bias"], last.bias.grad)]


@pytest.fixture(scope="module", params=[("llama", False), ("mistral", False), ("qwen2", False), ("llama", True)],
                ids=["llama", "mistral", "qwen2", "llama-projection"])
def case(request, tmp_path_factory):
    return _case(*request.param, tmp_path_factory)


def test_init_is_zero_or_torch_default(tmp_path):
    """init_weights="zero" zeroes the prefix (the MLP's output layer with the projection); None draws it as torch's
    nn.Embedding does, N(0, 1)."""
    cfg, base = jaxft.from_pretrained(save(build("llama"), tmp_path / "m"))
    for projection in (False, True):
        drawn, zero = (with_prefix(cfg, PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=projection,
                                                           init_weights=init).add(cfg, base, jax.random.PRNGKey(0)))
                       for init in (None, "zero"))
        assert all(np.all(np.asarray(leaf) == 0) for leaf in jax.tree.leaves(zero["layers"]["prefix"]))
        if not projection:
            assert 0.8 < float(jnp.std(drawn["layers"]["prefix"]["key"])) < 1.2


@pytest.mark.parametrize("kwargs,message", [
    ({"num_virtual_tokens": 0}, "num_virtual_tokens"), ({"encoder_hidden_size": -1}, "encoder_hidden_size"),
    ({"init_weights": "gaussian"}, "init_weights"), ({"task_type": "SEQ_CLS"}, "task_type")])
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PrefixTuningConfig(**kwargs)
