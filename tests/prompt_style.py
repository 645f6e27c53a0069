"""The checks every prompt-style method (prefix, prompt and P-tuning) passes against PEFT, written once: a test file
imports these test functions, so pytest collects them there with that file's module-scoped ``case`` fixture (a
:class:`Case` with non-trivial, random non-zero values copied from PEFT's prompt encoder into jaxft's params).

PEFT's prompt and P-tuning return logits for the P virtual positions too; the real tokens' are the last T."""
from typing import Callable, NamedTuple

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
from jaxft.ops import nf4
from jaxft.ops.linear import dense_kernel
from jaxft.peft.prefix import prompt_inputs
from jaxft.peft.tree import combine, split

forward_jit = jax.jit(forward, static_argnums=0, static_argnames="hooks")


class Case(NamedTuple):
    pm: peft.PeftModel        # PEFT's model with the method
    cfg: jaxft.ModelConfig
    base: dict                # the base model's params
    params: dict              # the base with the same adapter values in jaxft's layout
    pcfg: object              # jaxft's adapter config
    grad_pairs: Callable      # (jaxft grads of the trained leaves, PEFT's prompt encoder) -> [(ours, torch grad)]


def as_jax(t):
    return jnp.asarray(t.detach().numpy())


def randomized(pm):
    """``pm`` with every prompt-encoder weight drawn N(0, 0.25): non-trivial, and large enough to move the logits."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in pm.prompt_encoder["default"].parameters():
            p.copy_(0.5 * torch.randn_like(p))
    return pm


def _ours(case, ids, **kwargs):
    params, hooks = prompt_inputs(case.cfg, case.params)
    return np.asarray(forward_jit(case.cfg, params, ids, hooks=hooks, **kwargs))


def _peft_logits(model, ids):
    with torch.no_grad():
        logits = model(torch.as_tensor(ids)).logits.numpy()
    return logits[:, logits.shape[1] - ids.shape[1]:]


def test_logits_match_peft(case):
    ids = random_ids((2, 9), seed=2)
    ref = _peft_logits(case.pm, ids)
    assert np.abs(ref - _peft_logits(case.pm.get_base_model(), ids)).max() > 1e-2  # the method changes the output
    np.testing.assert_allclose(_ours(case, ids), ref, atol=1e-4, rtol=0)


def test_packed_segments_each_see_the_virtual_tokens(case):
    """A packed row [doc 1 | doc 2 | padding] gives each document the logits PEFT gives it alone."""
    docs = [random_ids(5, seed=3), random_ids(6, seed=4)]
    row = np.concatenate([*docs, np.zeros(2, int)])[None]
    ours = _ours(case, row, segment_ids=np.asarray([[1] * 5 + [2] * 6 + [0] * 2]))
    start = 0
    for doc in docs:
        np.testing.assert_allclose(ours[0, start:start + len(doc)], _peft_logits(case.pm, doc[None])[0], atol=1e-4,
                                   rtol=0)
        start += len(doc)


def test_greedy_generation_matches_peft_greedy(case):
    """Batched prompts of unequal length (left padded, KV cache) give the tokens of a greedy loop over PEFT's
    forward pass on each prompt alone (hf_oracle.greedy_tokens: PEFT's own generate misplaces the virtual tokens
    under transformers 5.25)."""
    prompts = [random_ids(4, seed=5).tolist(), random_ids(8, seed=6).tolist()]
    params, hooks = prompt_inputs(case.cfg, case.params)
    ours = jaxft.generate(case.cfg, params, prompts, max_new_tokens=6, stop_token_ids=[], hooks=hooks)
    assert ours == [greedy_tokens(case.pm, prompt, 6) for prompt in prompts]


def test_gradients_match_peft_autograd(case):
    cfg, params, pcfg = case.cfg, case.params, case.pcfg
    ids, labels = random_ids((2, 8), seed=7), random_ids((2, 8), seed=8)
    case.pm.zero_grad()
    logits = case.pm(torch.as_tensor(ids)).logits
    logp = torch.log_softmax(logits[:, logits.shape[1] - ids.shape[1]:], -1)
    logp.gather(-1, torch.as_tensor(labels)[..., None]).sum().backward()
    trained, frozen = split(params, pcfg.trainable(cfg, params))

    def loss(trained):
        prefixed, hooks = prompt_inputs(cfg, combine(trained, frozen))
        logits = forward(cfg, prefixed, ids, hooks=hooks)
        return jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], -1).sum()

    grads = jax.grad(loss)(trained)
    for ours, ref in case.grad_pairs(grads, case.pm.prompt_encoder["default"]):
        ref = ref.numpy()
        assert np.abs(ref).max() > 1e-3
        np.testing.assert_allclose(np.asarray(ours), ref, atol=2e-4 * np.abs(ref).max(), rtol=0)


def test_only_its_leaves_train(case):
    """The config trains exactly the leaves it added to the base."""
    def paths(tree):
        return {jax.tree_util.keystr(path, simple=True, separator="/") for path, leaf in
                jax.tree_util.tree_leaves_with_path(tree) if leaf is not None}

    trained, _ = split(case.params, case.pcfg.trainable(case.cfg, case.params))
    assert paths(trained) == paths(case.params) - paths(case.base) == set(case.pcfg.trainable(case.cfg,
                                                                                               case.params).paths)


def test_saved_adapter_loads_in_peft_and_back(case, tmp_path):
    """save_adapter's folder loads with PeftModel.from_pretrained (equal logits); a folder PEFT saved loads into
    jaxft (equal logits), and its config gives the hooks."""
    cfg, pcfg = case.cfg, case.pcfg
    ids = random_ids((2, 7), seed=10)
    ours = _ours(case, ids)
    base_dir = save(case.pm.get_base_model(), tmp_path / "base")
    jaxft.save_adapter(case.params, pcfg, tmp_path / "ours", cfg=cfg, base_model_name_or_path=str(base_dir))
    loaded = peft.PeftModel.from_pretrained(build(cfg.model_type), tmp_path / "ours")
    np.testing.assert_allclose(ours, _peft_logits(loaded, ids), atol=1e-4, rtol=0)
    case.pm.save_pretrained(tmp_path / "peft")
    _, base = jaxft.from_pretrained(base_dir)
    back = jaxft.load_adapter(tmp_path / "peft", base, cfg)
    acfg = read_adapter_config(tmp_path / "peft")
    assert type(acfg) is type(pcfg)
    back, hooks = prompt_inputs(cfg, back)
    again = np.asarray(forward_jit(cfg, back, ids, hooks=hooks))
    np.testing.assert_allclose(again, ours, atol=1e-5, rtol=0)


def test_merge_is_refused(case):
    with pytest.raises(ConfigError, match="cannot merge"):
        jaxft.merge(case.params)


def test_nf4_base_gives_its_dequantized_base_logits(case, tmp_path):
    """On an NF4 base the method's logits (and its prefix, computed through the quantized layers for prompt and
    P-tuning) are those of the dense base holding the dequantized weights."""
    _, quantized = jaxft.from_pretrained(save(case.pm.get_base_model(), tmp_path / "base"), quant="nf4")
    adapter = {k: v for k, v in case.params.items() if k not in case.base}
    adapter["layers"] = {**quantized["layers"], **{k: v for k, v in case.params["layers"].items()
                                                   if k not in case.base["layers"]}}
    on_nf4 = {**quantized, **adapter}
    dense = jax.tree.map(lambda x: dense_kernel(x, jnp.float32) if isinstance(x, nf4.QuantizedTensor) else x, on_nf4,
                         is_leaf=lambda x: isinstance(x, nf4.QuantizedTensor))
    ids = random_ids((2, 7), seed=11)
    np.testing.assert_allclose(_ours(case._replace(params=on_nf4), ids), _ours(case._replace(params=dense), ids),
                               atol=1e-5, rtol=0)
