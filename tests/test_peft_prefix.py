"""Prefix tuning (jaxft.peft.prefix) against PEFT's PrefixTuningConfig: logits, packed rows, greedy generation and
gradients, with and without the reparameterizing MLP, on non-trivial (random, non-zero) prefixes."""
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

import jaxft
from hf_oracle import build, greedy_tokens, random_ids, save
from jaxft.config import ConfigError
from jaxft.hf.peft_format import read_adapter_config
from jaxft.models.llama import forward
from jaxft.peft.prefix import ENCODER, PrefixTuningConfig, from_flat, to_flat, with_prefix
from jaxft.peft.tree import combine, split

P = 3
forward_jit = jax.jit(forward, static_argnums=0, static_argnames="hooks")


def _peft_model(family, projection, tmp_path_factory):
    model = build(family)
    cfg, params = jaxft.from_pretrained(save(model, tmp_path_factory.mktemp(family) / "m"))
    torch.manual_seed(1)
    pm = peft.get_peft_model(model, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                                           prefix_projection=projection, encoder_hidden_size=24))
    encoder = pm.prompt_encoder["default"]
    with torch.no_grad():
        for p in encoder.parameters():  # non-trivial, larger than the init so the prefix moves the logits
            p.copy_(0.5 * torch.randn_like(p))
    pcfg = PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=projection, encoder_hidden_size=24)
    params = pcfg.add(cfg, params, jax.random.PRNGKey(0))
    return pm, cfg, _copy_prefix(pcfg, cfg, params, encoder), pcfg


def _copy_prefix(pcfg, cfg, params, encoder):
    """params with PEFT's prefix encoder's values in jaxft's layout."""
    if not pcfg.prefix_projection:
        return {**params, "layers": {**params["layers"], "prefix": from_flat(cfg, _np(encoder.embedding.weight))}}
    first, _, last = encoder.transform
    params[ENCODER] = {"embedding": _np(encoder.embedding.weight),
                       "hidden": {"kernel": _np(first.weight).T, "bias": _np(first.bias)},
                       "out": {"kernel": _np(last.weight).T, "bias": _np(last.bias)}}
    return params


def _np(t):
    return jnp.asarray(t.detach().numpy())


@pytest.fixture(scope="module", params=[("llama", False), ("mistral", False), ("qwen2", False), ("llama", True)],
                ids=["llama", "mistral", "qwen2", "llama-projection"])
def case(request, tmp_path_factory):
    return _peft_model(*request.param, tmp_path_factory)


def test_logits_match_peft(case):
    pm, cfg, params, pcfg = case
    ids = random_ids((2, 9), seed=2)
    with torch.no_grad():
        ref = pm(torch.as_tensor(ids)).logits.numpy()
        base = pm.get_base_model()(torch.as_tensor(ids)).logits.numpy()
    ours = forward_jit(cfg, with_prefix(cfg, params), ids, hooks=pcfg.hooks(cfg))
    assert np.abs(ref - base).max() > 1e-2  # the prefix really changes the output
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)


def test_packed_segments_each_see_the_prefix(case):
    """A packed row [doc 1 | doc 2 | padding] gives each document the logits PEFT gives it alone."""
    pm, cfg, params, pcfg = case
    docs = [random_ids(5, seed=3), random_ids(6, seed=4)]
    row = np.concatenate([*docs, np.zeros(2, int)])[None]
    segments = np.asarray([[1] * 5 + [2] * 6 + [0] * 2])
    ours = np.asarray(forward_jit(cfg, with_prefix(cfg, params), row, segment_ids=segments, hooks=pcfg.hooks(cfg)))
    start = 0
    for doc in docs:
        with torch.no_grad():
            ref = pm(torch.as_tensor(doc[None])).logits.numpy()[0]
        np.testing.assert_allclose(ours[0, start:start + len(doc)], ref, atol=1e-4, rtol=0)
        start += len(doc)


def test_greedy_generation_matches_peft_greedy(case):
    """Batched prompts of unequal length (left padded, KV cache) give the tokens of a greedy loop over PEFT's
    forward pass on each prompt alone (hf_oracle.greedy_tokens: PEFT's own generate misplaces the virtual tokens
    under transformers 5.25)."""
    pm, cfg, params, pcfg = case
    prompts = [random_ids(4, seed=5).tolist(), random_ids(8, seed=6).tolist()]
    ours = jaxft.generate(cfg, with_prefix(cfg, params), prompts, max_new_tokens=6, stop_token_ids=[],
                          hooks=pcfg.hooks(cfg))
    assert ours == [greedy_tokens(pm, prompt, 6) for prompt in prompts]


def test_gradients_match_peft_autograd(case):
    pm, cfg, params, pcfg = case
    ids, labels = random_ids((2, 8), seed=7), random_ids((2, 8), seed=8)
    pm.zero_grad()
    logp = torch.log_softmax(pm(torch.as_tensor(ids)).logits, -1)
    logp.gather(-1, torch.as_tensor(labels)[..., None]).sum().backward()
    trained, frozen = split(params, pcfg.trainable(cfg, params))

    def loss(trained):
        logits = forward(cfg, with_prefix(cfg, combine(trained, frozen)), ids, hooks=pcfg.hooks(cfg))
        return jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], -1).sum()

    grads = jax.grad(loss)(trained)
    encoder = pm.prompt_encoder["default"]
    if pcfg.prefix_projection:
        first, _, last = encoder.transform
        pairs = [(grads[ENCODER]["embedding"], encoder.embedding.weight.grad),
                 (grads[ENCODER]["hidden"]["kernel"], first.weight.grad.T), (grads[ENCODER]["out"]["bias"], last.bias.grad),
                 (grads[ENCODER]["out"]["kernel"], last.weight.grad.T)]
    else:
        pairs = [(to_flat(grads["layers"]["prefix"]), encoder.embedding.weight.grad)]
    for ours, ref in pairs:
        ref = ref.numpy()
        assert np.abs(ref).max() > 1e-3
        np.testing.assert_allclose(np.asarray(ours), ref, atol=2e-4 * np.abs(ref).max(), rtol=0)


def test_saved_adapter_loads_in_peft_and_back(case, tmp_path):
    """save_adapter's folder loads with PeftModel.from_pretrained (equal logits); a folder PEFT saved loads into
    jaxft (equal logits), and its config gives the hooks."""
    pm, cfg, params, pcfg = case
    ids = random_ids((2, 7), seed=10)
    ours = np.asarray(forward_jit(cfg, with_prefix(cfg, params), ids, hooks=pcfg.hooks(cfg)))
    base_dir = save(pm.get_base_model(), tmp_path / "base")
    jaxft.save_adapter(params, pcfg, tmp_path / "ours", cfg=cfg, base_model_name_or_path=str(base_dir))
    loaded = peft.PeftModel.from_pretrained(build(cfg.model_type), tmp_path / "ours")
    with torch.no_grad():
        ref = loaded(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ours, ref[:, ref.shape[1] - ids.shape[1]:], atol=1e-4, rtol=0)
    pm.save_pretrained(tmp_path / "peft")
    _, base = jaxft.from_pretrained(base_dir)
    back = jaxft.load_adapter(tmp_path / "peft", base, cfg)
    acfg = read_adapter_config(tmp_path / "peft")
    assert type(acfg) is type(pcfg)
    again = np.asarray(forward_jit(cfg, with_prefix(cfg, back), ids, hooks=acfg.hooks(cfg)))
    np.testing.assert_allclose(again, ours, atol=1e-5, rtol=0)


def test_merge_is_refused(case):
    _, _, params, _ = case
    with pytest.raises(ConfigError, match="cannot merge"):
        jaxft.merge(params)


def test_only_the_prefix_trains(case):
    _, cfg, params, pcfg = case
    trained, _ = split(params, pcfg.trainable(cfg, params))
    leaves = [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_leaves_with_path(trained)
              if leaf is not None]
    group = ENCODER if pcfg.prefix_projection else "prefix"
    assert leaves and all(group in leaf for leaf in leaves)


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
