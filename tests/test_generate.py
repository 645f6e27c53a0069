"""KV-cache decoding against full forward passes and against transformers' generate / logits warpers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import jaxft
from hf_oracle import build, random_ids, save
from jaxft.models.generate import left_pad
from jaxft.models.sample import forward_cached, init_cache, process_logits


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    model = build("mistral", sliding_window=5)
    cfg, params = jaxft.from_pretrained(save(model, tmp_path_factory.mktemp("gen") / "m"))
    return model, cfg, params


def test_cached_logits_equal_full_forward_at_every_step(mistral):
    _, cfg, params = mistral
    prompts = [random_ids(5, seed=1).tolist(), random_ids(9, seed=2).tolist()]
    continuation = random_ids((2, 6), seed=3)
    ids, mask = left_pad(prompts, pad_id=0)
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    full = [np.asarray(jaxft.forward(cfg, params, jnp.asarray([p + continuation[row].tolist()])))[0]
            for row, p in enumerate(prompts)]
    cache = init_cache(cfg, 2, ids.shape[1] + continuation.shape[1])
    _, cache = forward_cached(cfg, params, jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(mask), cache)
    step_fn = jax.jit(forward_cached, static_argnums=0)
    for step in range(continuation.shape[1]):
        token = continuation[:, step:step + 1]
        pos = positions[:, -1:] + step + 1
        logits, cache = step_fn(cfg, params, jnp.asarray(token), jnp.asarray(pos), jnp.ones((2, 1), jnp.int32), cache)
        for row, prompt in enumerate(prompts):
            np.testing.assert_allclose(np.asarray(logits)[row, 0], full[row][len(prompt) + step], atol=1e-5, rtol=0)


def test_greedy_batched_unequal_prompts_match_transformers_generate(mistral):
    model, cfg, params = mistral
    prompts = [random_ids(4, seed=4).tolist(), random_ids(11, seed=5).tolist(), random_ids(7, seed=6).tolist()]
    ours = jaxft.generate(cfg, params, prompts, max_new_tokens=12, stop_token_ids=[])
    ids, mask = left_pad(prompts, pad_id=0)
    with torch.no_grad():
        ref = model.generate(torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask),
                             max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours == ref[:, ids.shape[1]:].tolist()


def test_generation_stops_at_stop_token(mistral):
    _, cfg, params = mistral
    prompt = random_ids(6, seed=7).tolist()
    free = jaxft.generate(cfg, params, [prompt], max_new_tokens=10, stop_token_ids=[])[0]
    stop = free[3]
    stopped = jaxft.generate(cfg, params, [prompt], max_new_tokens=10, stop_token_ids=[stop])[0]
    assert stopped == free[:free.index(stop) + 1]


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.8),
                                                     (1.3, 10, 0.6)])
def test_filtered_distribution_equals_transformers_warpers(temperature, top_k, top_p):
    logits = np.random.default_rng(0).normal(size=(3, 50)).astype(np.float32) * 3
    logits[0, :4] = logits[0, 4]  # ties at the top-k boundary
    processors = transformers.LogitsProcessorList()
    if temperature != 1.0:
        processors.append(transformers.TemperatureLogitsWarper(temperature))
    if top_k:
        processors.append(transformers.TopKLogitsWarper(top_k))
    if top_p < 1.0:
        processors.append(transformers.TopPLogitsWarper(top_p))
    ref = processors(None, torch.as_tensor(logits)).numpy()
    ours = np.asarray(process_logits(jnp.asarray(logits), temperature, top_k, top_p))
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
    np.testing.assert_allclose(ours[~np.isinf(ours)], ref[~np.isinf(ref)], rtol=1e-6)


def test_sampling_follows_the_filtered_distribution(mistral):
    _, cfg, params = mistral
    prompt = random_ids(5, seed=8).tolist()
    rows = jaxft.generate(cfg, params, [prompt] * 40, max_new_tokens=1, temperature=1.0, top_k=3,
                          stop_token_ids=[], rng=jax.random.PRNGKey(1))
    samples = [row[0] for row in rows]
    top3 = np.argsort(np.asarray(jaxft.forward(cfg, params, jnp.asarray([prompt])))[0, -1])[-3:]
    assert set(samples) <= set(top3.tolist()) and len(set(samples)) > 1


def test_bad_generation_arguments_are_rejected(mistral):
    _, cfg, params = mistral
    with pytest.raises(ValueError, match="non-empty"):
        jaxft.generate(cfg, params, [[]], max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        jaxft.generate(cfg, params, [[3, 4]], max_new_tokens=2, temperature=1.0, top_p=0.0)


def test_prompts_as_numpy_jax_arrays_and_lists_give_transformers_greedy_tokens(mistral):
    model, cfg, params = mistral
    batch = random_ids((2, 6), seed=9)  # [B, T], equal lengths: no padding on either side
    with torch.no_grad():
        ref = model.generate(torch.as_tensor(batch, dtype=torch.long), max_new_tokens=5, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[:, 6:].tolist()
    forms = {"2-D numpy": batch, "2-D jax": jnp.asarray(batch), "list of lists": batch.tolist(),
             "list of 1-D arrays": [np.asarray(row) for row in batch]}
    for name, prompts in forms.items():
        assert jaxft.generate(cfg, params, prompts, max_new_tokens=5, stop_token_ids=[]) == ref, name
    for name, one in {"1-D numpy": batch[0], "1-D jax": jnp.asarray(batch[0]), "list": batch[0].tolist(),
                      "numpy ints": list(batch[0])}.items():
        assert jaxft.generate(cfg, params, one, max_new_tokens=5, stop_token_ids=[]) == ref[:1], name


@pytest.mark.parametrize("prompts, says", [
    (np.zeros((2, 3, 4), np.int32), r"shape \[2, 3, 4\]"),
    (np.zeros((2, 3), np.float32), "dtype float32"),
    ([[1, 2], "hello"], "prompt 1 is str 'hello'"),
    ([[1, 2.5]], "prompt 0 is list"),
    ("hello", "prompt_ids is a str"),
])
def test_prompts_of_other_shapes_are_refused_naming_the_accepted_ones(mistral, prompts, says):
    _, cfg, params = mistral
    with pytest.raises(jaxft.JaxftError, match=says) as info:
        jaxft.generate(cfg, params, prompts, max_new_tokens=2)
    assert "one prompt [T] or a batch [B, T]" in str(info.value)


def test_token_ids_outside_the_vocabulary_are_refused(mistral):
    _, cfg, params = mistral
    with pytest.raises(jaxft.JaxftError, match=rf"token id {cfg.vocab_size} at position 2.*vocab_size "
                                               rf"{cfg.vocab_size}"):
        jaxft.generate(cfg, params, [[1, 2], [3, 4, cfg.vocab_size]], max_new_tokens=2)
    with pytest.raises(jaxft.JaxftError, match="token id -1"):
        jaxft.generate(cfg, params, np.asarray([-1, 3]), max_new_tokens=2)


def test_the_same_seed_gives_the_same_sample_and_other_seeds_differ(mistral):
    _, cfg, params = mistral
    prompt = random_ids(5, seed=10).tolist()

    def sample(**seed):
        return jaxft.generate(cfg, params, [prompt] * 3, max_new_tokens=12, temperature=1.0, stop_token_ids=[], **seed)

    first = sample(seed=7)
    assert sample(seed=7) == first
    assert sample(seed=8) != first and sample(seed=9) != first
    assert sample() == sample(rng=jax.random.PRNGKey(0))  # no seed: seed 0, as before seeds existed
    with pytest.raises(jaxft.JaxftError, match="seed or rng"):
        sample(seed=1, rng=jax.random.PRNGKey(1))


def test_forward_names_the_shapes_it_takes(mistral):
    _, cfg, params = mistral
    ids = random_ids((2, 5), seed=11)
    with pytest.raises(jaxft.JaxftError, match=r"input_ids must be integer token ids of shape \[B, T\].*got shape "
                                               r"\[5\]"):
        jaxft.forward(cfg, params, ids[0])
    with pytest.raises(jaxft.JaxftError, match=r"input_ids .*got shape \[2, 5\] of float32"):
        jaxft.forward(cfg, params, ids.astype(np.float32))
    with pytest.raises(jaxft.JaxftError, match=r"positions must be integers of shape \[B, T\], the shape of "
                                               r"input_ids \[2, 5\]; got shape \[5\]"):
        jaxft.forward(cfg, params, ids, positions=np.arange(5))
    with pytest.raises(jaxft.JaxftError, match=r"segment_ids must be .* got shape \[2, 4\]"):
        jaxft.forward(cfg, params, ids, segment_ids=np.ones((2, 4), np.int32))
    np.testing.assert_array_equal(jaxft.forward(cfg, params, ids.tolist()), jaxft.forward(cfg, params, ids))
