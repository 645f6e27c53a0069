"""The jitted sampler (jaxft.models.sample) against teacher-forced forward passes (jaxft's and transformers') over
the sampled tokens, against transformers' greedy generate, and sharded over 8 devices against one."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxft
from hf_oracle import build, random_ids, save
from jaxft.models.generate import left_pad
from jaxft.models.hooks import Hooks
from jaxft.models.sample import sample
from jaxft.parallel import MeshConfig, batch_sharding, make_mesh, shard_params
from jaxft.peft.prefix import PrefixTuningConfig, prompt_inputs

PROMPTS = [random_ids(4, seed=1).tolist(), random_ids(7, seed=2).tolist(), random_ids(5, seed=3).tolist()]
NEW = 6


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    model = build("llama")
    cfg, params = jaxft.from_pretrained(save(model, tmp_path_factory.mktemp("sample") / "m"))
    return model, cfg, params


def _rollout(cfg, params, prompts=PROMPTS, seed=0, groups=2, **settings):
    ids, mask = left_pad(prompts, pad_id=0)
    return sample(cfg, params, ids, mask, jax.random.PRNGKey(seed), num_generations=groups, max_new_tokens=NEW,
                  **{"stop_ids": (), **settings})


def _full_rows(prompts, rollout, groups):
    """[prompt | completion] of every rollout row, right padded, with the mask of real tokens."""
    tokens, mask = np.asarray(rollout.tokens), np.asarray(rollout.mask)
    rows = [prompts[r // groups] + tokens[r, :mask[r].sum()].tolist() for r in range(len(tokens))]
    width = max(map(len, rows))
    return (np.array([row + [0] * (width - len(row)) for row in rows]),
            np.array([[1] * len(row) + [0] * (width - len(row)) for row in rows]))


def _sampled_logps(logits, prompts, rollout, groups, temperature):
    """The teacher-forced log-prob of each sampled token under log_softmax(logits / temperature); 0 off the mask."""
    logps = jax.nn.log_softmax(jnp.asarray(logits) / (temperature or 1.0), axis=-1)
    tokens, mask = np.asarray(rollout.tokens), np.asarray(rollout.mask)
    out = np.zeros(tokens.shape, np.float32)
    for r in range(len(tokens)):
        start = len(prompts[r // groups]) - 1  # the logits that predict the first completion token
        for j in range(mask[r].sum()):
            out[r, j] = logps[r, start + j, tokens[r, j]]
    return out


def _check_teacher_forced(model, cfg, params, rollout, temperature):
    """The rollout's log-probs are those of one full forward pass, jaxft's and transformers', over its tokens."""
    assert rollout.logprobs.dtype == jnp.float32 and np.asarray(rollout.mask).all()
    ids, real = _full_rows(PROMPTS, rollout, 2)
    ours = jaxft.forward(cfg, params, ids, segment_ids=real)
    with torch.no_grad():
        theirs = model(torch.as_tensor(ids), attention_mask=torch.as_tensor(real)).logits.numpy()
    for logits in (ours, theirs):
        expected = _sampled_logps(logits, PROMPTS, rollout, 2, temperature)
        np.testing.assert_allclose(np.asarray(rollout.logprobs), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 10, 0.9)])
def test_logprobs_equal_teacher_forced_jaxft_and_transformers(llama, temperature, top_k, top_p):
    """top-k / top-p truncate what is drawn, never the log-probs: those stay log_softmax(logits / temperature)."""
    model, cfg, params = llama
    rollout = _rollout(cfg, params, temperature=temperature, top_k=top_k, top_p=top_p)
    _check_teacher_forced(model, cfg, params, rollout, temperature)


def test_greedy_rows_equal_generate_and_transformers_greedy_generate(llama):
    model, cfg, params = llama
    rollout = _rollout(cfg, params, temperature=0.0)
    tokens = np.asarray(rollout.tokens)
    ids, mask = left_pad(PROMPTS, pad_id=0)
    with torch.no_grad():
        ref = model.generate(torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask),
                             max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
    ref = ref[:, ids.shape[1]:].numpy()
    np.testing.assert_array_equal(tokens[0::2], ref)
    np.testing.assert_array_equal(tokens[1::2], ref)
    assert jaxft.generate(cfg, params, PROMPTS, max_new_tokens=NEW, stop_token_ids=[]) == ref.tolist()
    _check_teacher_forced(model, cfg, params, rollout, 0.0)  # greedy: log-probs under log_softmax(logits)


def test_groups_differ_repeat_from_the_same_key_and_stop_at_stop_tokens(llama):
    _, cfg, params = llama
    free = _rollout(cfg, params, seed=4, groups=3)
    tokens = np.asarray(free.tokens)
    for b in range(len(PROMPTS)):
        group = {tuple(row) for row in tokens[3 * b:3 * b + 3]}
        assert len(group) == 3, f"prompt {b}'s completions repeat"
    np.testing.assert_array_equal(np.asarray(_rollout(cfg, params, seed=4, groups=3).tokens), tokens)
    assert not np.array_equal(np.asarray(_rollout(cfg, params, seed=5, groups=3).tokens), tokens)
    assert not np.asarray(free.stopped).any()

    stops, pad = (int(tokens[0, 2]), int(tokens[4, 4])), 7
    cut = _rollout(cfg, params, seed=4, groups=3, stop_ids=stops, pad_id=pad)
    for r, row in enumerate(tokens.tolist()):       # each row is the free row up to its first stop token
        hits = [j for j, t in enumerate(row) if t in stops]
        n = hits[0] + 1 if hits else NEW
        assert np.asarray(cut.tokens)[r].tolist() == row[:n] + [pad] * (NEW - n), r
        assert np.asarray(cut.mask)[r].tolist() == [1] * n + [0] * (NEW - n), r
        np.testing.assert_allclose(np.asarray(cut.logprobs)[r], np.where(np.arange(NEW) < n, free.logprobs[r], 0),
                                   atol=1e-6, rtol=0)
        assert bool(cut.stopped[r]) == bool(hits), r
    assert 0 < int(np.asarray(cut.stopped).sum()) < len(tokens)


def test_rows_sharded_over_data_equal_one_device(llama):
    """Prompts split over data x fsdp, the params' embed axis over fsdp: the same rollout as on one device, its
    rows split at least over the data axis."""
    _, cfg, params = llama
    prompts = [random_ids(3 + b % 4, seed=10 + b).tolist() for b in range(8)]
    ids, mask = left_pad(prompts, pad_id=0)
    settings = dict(num_generations=2, max_new_tokens=NEW, temperature=0.8, top_k=20, stop_ids=(5, 6))
    one = sample(cfg, params, ids, mask, jax.random.PRNGKey(3), **settings)
    mesh = make_mesh(MeshConfig(data=4, fsdp=2))
    put = lambda x: jax.device_put(x, batch_sharding(mesh))  # noqa: E731
    sharded = sample(cfg, shard_params(params, mesh), put(ids), put(mask), jax.random.PRNGKey(3), **settings)
    for field in ("tokens", "mask", "stopped"):
        np.testing.assert_array_equal(np.asarray(getattr(sharded, field)), np.asarray(getattr(one, field)), field)
    np.testing.assert_allclose(np.asarray(sharded.logprobs), np.asarray(one.logprobs), atol=1e-5, rtol=0)
    assert sharded.tokens.addressable_shards[0].data.shape[0] <= 16 // 4, sharded.tokens.sharding


def _prefix_tuned(cfg, params):
    prefixed = PrefixTuningConfig(num_virtual_tokens=3).add(cfg, params, jax.random.PRNGKey(8))  # N(0, 1): non-zero
    return prompt_inputs(cfg, prefixed)


def _batch_prefixed(cfg, params, rows):
    """A batch-shaped prefix [L, rows, 2, KVH, hd] under ``layers/batch_prefix`` and the hook that feeds it."""
    shape = (cfg.num_hidden_layers, rows, 2, cfg.num_key_value_heads, cfg.head_dim)
    prefix = {name: jax.random.normal(jax.random.PRNGKey(i), shape) for i, name in enumerate(("k", "v"))}
    hooks = Hooks(prefix=lambda lp: (lp["batch_prefix"]["k"], lp["batch_prefix"]["v"]))
    return {**params, "layers": {**params["layers"], "batch_prefix": prefix}}, hooks


def test_logprobs_with_prompt_style_hooks_equal_teacher_forced(llama):
    _, cfg, params = llama
    prefixed, hooks = _prefix_tuned(cfg, params)
    assert hooks.prefix is not None and hooks.position_offset == 3
    rollout = _rollout(cfg, prefixed, temperature=0.9, top_p=0.8, hooks=hooks)
    ids, real = _full_rows(PROMPTS, rollout, 2)
    logits = jaxft.forward(cfg, prefixed, ids, segment_ids=real, hooks=hooks)
    np.testing.assert_allclose(np.asarray(rollout.logprobs), _sampled_logps(logits, PROMPTS, rollout, 2, 0.9),
                               atol=1e-5, rtol=0)

    per_prompt, hooks = _batch_prefixed(cfg, params, len(PROMPTS))  # one prefix per prompt, shared by its rows
    rollout = _rollout(cfg, per_prompt, temperature=1.0, hooks=hooks)
    per_row = jax.tree.map(lambda x: jnp.repeat(x, 2, axis=1), per_prompt["layers"]["batch_prefix"])
    ids, real = _full_rows(PROMPTS, rollout, 2)
    logits = jaxft.forward(cfg, {**params, "layers": {**params["layers"], "batch_prefix": per_row}}, ids,
                           segment_ids=real, hooks=hooks)
    np.testing.assert_allclose(np.asarray(rollout.logprobs), _sampled_logps(logits, PROMPTS, rollout, 2, 1.0),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("prompt_mask, settings, says", [
    (None, dict(num_generations=0), "num_generations must be positive, got 0"),
    (None, dict(max_new_tokens=0), "max_new_tokens must be positive, got 0"),
    (None, dict(temperature=-1.0), r"temperature=-1.0 \(>= 0\)"),
    (np.ones((3, 4), np.int32), {}, r"prompt_mask must be integers of shape \[B, P\].*\[3, 7\]; got shape \[3, 4\]"),
])
def test_bad_settings_and_shapes_are_refused_naming_them(llama, prompt_mask, settings, says):
    _, cfg, params = llama
    ids, mask = left_pad(PROMPTS, pad_id=0)
    with pytest.raises(jaxft.JaxftError, match=says):
        sample(cfg, params, ids, mask if prompt_mask is None else prompt_mask, jax.random.PRNGKey(0),
               **{"max_new_tokens": 2, **settings})
