"""Prompt-style methods under a sliding window, against PEFT + transformers: sequences longer than the window, on
Mistral (every layer windowed) and Qwen2 (a full layer under a windowed one). transformers' mask shows the query at
real position t virtual token j (of 0..P-1: prompt tuning's input positions, prefix tuning's past cache) only while
t + P - j < window, so the windowed layers stop seeing the virtual tokens as a sequence outgrows the window."""
from functools import partial

import jax
import numpy as np
import peft
import pytest
import torch

import jaxft
from hf_oracle import build, greedy_tokens, random_ids, save
from jaxft.models import llama
from jaxft.ops.blockwise_attention import blockwise_attention
from jaxft.peft.prefix import PrefixTuningConfig, from_flat, prompt_inputs
from jaxft.peft.prompt import PROMPT, PromptTuningConfig
from prompt_style import as_jax, randomized

WINDOW = 4
# prompt tuning's virtual tokens outnumber the window, so they also lose sight of each other in windowed layers
VIRTUAL_TOKENS = {"prompt": 5, "prefix": 3}
WINDOWED = {"mistral": dict(sliding_window=WINDOW),
            "qwen2": dict(sliding_window=WINDOW, use_sliding_window=True, max_window_layers=1)}
SLIDING_LAYERS = {"mistral": (True, True), "qwen2": (False, True)}
forward_jit = jax.jit(llama.forward, static_argnums=0, static_argnames="hooks")


@pytest.fixture(scope="module", params=[(family, method) for method in ("prompt", "prefix")
                                        for family in ("mistral", "qwen2")], ids="-".join)
def case(request, tmp_path_factory):
    """(PEFT's model, cfg, jaxft params holding the same random non-zero virtual tokens / prefix)."""
    family, method = request.param
    model = build(family, **WINDOWED[family])
    cfg, base = jaxft.from_pretrained(save(model, tmp_path_factory.mktemp(family) / "m"))
    assert cfg.sliding_window == WINDOW and cfg.sliding_layers == SLIDING_LAYERS[family]
    p = VIRTUAL_TOKENS[method]
    peft_cfg, pcfg = {"prompt": (peft.PromptTuningConfig, PromptTuningConfig),
                      "prefix": (peft.PrefixTuningConfig, PrefixTuningConfig)}[method]
    pm = randomized(peft.get_peft_model(model, peft_cfg(task_type="CAUSAL_LM", num_virtual_tokens=p)))
    trained = as_jax(pm.prompt_encoder["default"].embedding.weight)
    params = pcfg(num_virtual_tokens=p).add(cfg, base, jax.random.PRNGKey(0))
    if method == "prompt":
        return pm, cfg, {**params, PROMPT: {"embedding": trained}}
    return pm, cfg, {**params, "layers": {**params["layers"], "prefix": from_flat(cfg, trained)}}


def _ours(cfg, params, ids, **kwargs):
    params, hooks = prompt_inputs(cfg, params)
    return np.asarray(forward_jit(cfg, params, ids, hooks=hooks, **kwargs))


def _peft_logits(model, ids):
    """The real tokens' logits (PEFT's prompt tuning also returns the P virtual positions', first)."""
    with torch.no_grad():
        logits = model(torch.as_tensor(ids)).logits.numpy()
    return logits[:, logits.shape[1] - ids.shape[1]:]


def test_logits_past_the_window_match_peft(case):
    pm, cfg, params = case
    ids = random_ids((2, 12), seed=2)
    ref = _peft_logits(pm, ids)
    assert np.abs(ref - _peft_logits(pm.get_base_model(), ids)).max() > 1e-2
    np.testing.assert_allclose(_ours(cfg, params, ids), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("attention", ["plain", "blockwise"])
def test_packed_documents_longer_than_the_window_match_peft_on_each(case, attention, monkeypatch):
    """Each document of a packed row counts its own positions from 0, so the window over the virtual tokens applies
    per document; blockwise attention in tiles small enough that a row spans several."""
    pm, cfg, params = case
    if attention == "blockwise":
        monkeypatch.setattr(llama, "platform_attention", partial(blockwise_attention, block_q=4, block_k=4))
    docs = [random_ids(7, seed=3), random_ids(9, seed=4)]
    row = np.concatenate([*docs, np.zeros(2, int)])[None]
    ours = _ours(cfg.replace(attention=attention), params, row,
                 segment_ids=np.asarray([[1] * 7 + [2] * 9 + [0] * 2]))
    start = 0
    for doc in docs:
        np.testing.assert_allclose(ours[0, start:start + len(doc)], _peft_logits(pm, doc[None])[0], atol=1e-4,
                                   rtol=0)
        start += len(doc)


def test_greedy_generation_past_the_window_matches_peft(case):
    """Left-padded prompts of unequal length (KV cache) generating well past the window give the tokens of a greedy
    loop over PEFT's forward pass on each prompt alone (hf_oracle.greedy_tokens: PEFT's own generate misplaces or
    drops the virtual tokens under transformers 5.25), which the virtual tokens change."""
    pm, cfg, params = case
    prompts = [random_ids(3, seed=5).tolist(), random_ids(6, seed=6).tolist()]
    prefixed, hooks = prompt_inputs(cfg, params)
    ours = jaxft.generate(cfg, prefixed, prompts, max_new_tokens=8, stop_token_ids=[], hooks=hooks)
    assert ours == [greedy_tokens(pm, prompt, 8) for prompt in prompts]
    assert ours != [greedy_tokens(pm.get_base_model(), prompt, 8) for prompt in prompts]
