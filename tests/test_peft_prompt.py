"""Prompt tuning and P-tuning (jaxft.peft.prompt) against PEFT's PromptTuningConfig / PromptEncoderConfig: logits,
packed rows, greedy generation and gradients with non-trivial (random, non-zero) virtual tokens; inits; merge
refused."""
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
from jaxft.ops.linear import embedding_table
from jaxft.peft.prefix import with_prefix
from jaxft.peft.prompt import ENCODER, MLP_LAYERS, PROMPT, PromptEncoderConfig, PromptTuningConfig
from jaxft.peft.tree import combine, split

P = 3
H = 24   # P-tuning's encoder width
forward_jit = jax.jit(forward, static_argnums=0, static_argnames="hooks")


def _np(t):
    return jnp.asarray(t.detach().numpy())


def _case(family, kind, tmp_path_factory):
    model = build(family)
    cfg, params = jaxft.from_pretrained(save(model, tmp_path_factory.mktemp(family) / "m"))
    torch.manual_seed(1)
    if kind == "prompt":
        pcfg = PromptTuningConfig(num_virtual_tokens=P)
        peft_cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)
    else:
        pcfg = PromptEncoderConfig(num_virtual_tokens=P, encoder_hidden_size=H)
        peft_cfg = peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, encoder_hidden_size=H)
    pm = peft.get_peft_model(model, peft_cfg)
    encoder = pm.prompt_encoder["default"]
    with torch.no_grad():
        for p in encoder.parameters():
            p.copy_(0.5 * torch.randn_like(p))
    params = pcfg.add(cfg, params, jax.random.PRNGKey(0))
    if kind == "prompt":
        params[PROMPT] = {"embedding": _np(encoder.embedding.weight)}
    else:
        linears = [encoder.mlp_head[i] for i in (0, 2, 4)]
        params[ENCODER] = {"embedding": _np(encoder.embedding.weight),
                           "mlp": {name: {"kernel": _np(lin.weight).T, "bias": _np(lin.bias)}
                                   for name, lin in zip(MLP_LAYERS, linears)}}
    return pm, cfg, params, pcfg


@pytest.fixture(scope="module", params=[("llama", "prompt"), ("mistral", "prompt"), ("qwen2", "prompt"),
                                        ("llama", "p_tuning"), ("qwen2", "p_tuning")],
                ids=lambda p: "-".join(p))
def case(request, tmp_path_factory):
    return _case(*request.param, tmp_path_factory)


def test_logits_match_peft(case):
    """PEFT returns logits for the P virtual positions too; the real tokens' are the ones that count."""
    pm, cfg, params, pcfg = case
    ids = random_ids((2, 9), seed=2)
    with torch.no_grad():
        ref = pm(torch.as_tensor(ids)).logits.numpy()[:, P:]
        base = pm.get_base_model()(torch.as_tensor(ids)).logits.numpy()
    ours = forward_jit(cfg, with_prefix(cfg, params), ids, hooks=pcfg.hooks(cfg))
    assert np.abs(ref - base).max() > 1e-2  # the virtual tokens really change the output
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)


def test_packed_segments_each_see_the_virtual_tokens(case):
    pm, cfg, params, pcfg = case
    docs = [random_ids(5, seed=3), random_ids(6, seed=4)]
    row = np.concatenate([*docs, np.zeros(2, int)])[None]
    segments = np.asarray([[1] * 5 + [2] * 6 + [0] * 2])
    ours = np.asarray(forward_jit(cfg, with_prefix(cfg, params), row, segment_ids=segments, hooks=pcfg.hooks(cfg)))
    start = 0
    for doc in docs:
        with torch.no_grad():
            ref = pm(torch.as_tensor(doc[None])).logits.numpy()[0, P:]
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
    logp = torch.log_softmax(pm(torch.as_tensor(ids)).logits[:, P:], -1)
    logp.gather(-1, torch.as_tensor(labels)[..., None]).sum().backward()
    trained, frozen = split(params, pcfg.trainable(cfg, params))

    def loss(trained):
        logits = forward(cfg, with_prefix(cfg, combine(trained, frozen)), ids, hooks=pcfg.hooks(cfg))
        return jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], -1).sum()

    grads = jax.grad(loss)(trained)
    encoder = pm.prompt_encoder["default"]
    if isinstance(pcfg, PromptTuningConfig):
        pairs = [(grads[PROMPT]["embedding"], encoder.embedding.weight.grad)]
    else:
        pairs = [(grads[ENCODER]["embedding"], encoder.embedding.weight.grad)] + [
            (grads[ENCODER]["mlp"][name]["kernel"], encoder.mlp_head[i].weight.grad.T)
            for name, i in zip(MLP_LAYERS, (0, 2, 4))]
    for ours, ref in pairs:
        ref = ref.numpy()
        assert np.abs(ref).max() > 1e-3
        np.testing.assert_allclose(np.asarray(ours), ref, atol=2e-4 * np.abs(ref).max(), rtol=0)
    trained_leaves = [leaf for leaf in jax.tree.leaves(trained) if leaf is not None]
    assert len(trained_leaves) == len(jax.tree.leaves(params.get(PROMPT, params.get(ENCODER))))


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
