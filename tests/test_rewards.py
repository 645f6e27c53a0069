"""Reward functions of online RL (jaxft.train.rewards) against their oracles: TRL's ``think_format_reward`` and
``get_soft_overlong_punishment`` where jaxft ships the same function, direct computation for exact match and the
weighted combination, and transformers' ``AutoModelForSequenceClassification`` logits for the reward model's scores
of right-padded [prompt | completion] rows."""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from trl.rewards import get_soft_overlong_punishment, think_format_reward

import jaxft
from hf_oracle import build_head, random_ids, save
from jaxft.config import ConfigError
from jaxft.train.rewards import (ExactMatch, LengthPenalty, RegexFormat, RewardError, WeightedRewards,
                                 reward_model_scores)

THINK_PATTERN = r"^<think>(?!.*<think>)(.*?)</think>.*$"  # trl/rewards/format_rewards.py's pattern
THINK_COMPLETIONS = ["<think>\nreasoning\n</think>\nanswer", "<think>\nreasoning\nanswer", "<think></think>",
                     "x<think>a</think>b", "<think>a</think><think>b</think>", "<think>a\n</think>\n\n",
                     "", "</think><think>"]


def test_regex_format_with_trls_pattern_is_trls_think_format_reward():
    reward = RegexFormat(THINK_PATTERN, name="think_format")
    ours = [reward("p", c, {}) for c in THINK_COMPLETIONS]
    assert ours == think_format_reward([[{"content": c}] for c in THINK_COMPLETIONS])
    assert 0.0 in ours and 1.0 in ours


def test_regex_format_search_finds_the_pattern_anywhere():
    pattern = r"answer:\s*\d+"
    completions = ["so the answer: 42", "answer:7 done", "no answer here", "Answer: 3", "answer:\n9"]
    for mode, match in (("search", re.search), ("fullmatch", re.fullmatch)):
        reward = RegexFormat(pattern, mode=mode)
        assert [reward("p", c, {}) for c in completions] == [
            float(match(pattern, c, re.DOTALL) is not None) for c in completions]


def test_a_bad_pattern_or_mode_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"reward 'format': pattern '\(unclosed' is not a regular expression"):
        RegexFormat("(unclosed")
    with pytest.raises(ConfigError, match="mode 'match' is unknown"):
        RegexFormat("a", mode="match")


@pytest.mark.parametrize("max_len,cache", [(10, 4), (10, 0), (6, 6), (1, 1)])
def test_length_penalty_is_trls_soft_overlong_punishment(max_len, cache):
    lengths = list(range(0, max_len + 4))
    ours = [LengthPenalty(max_len, cache)("p", "c", {}, num_tokens=n) for n in lengths]
    trl = get_soft_overlong_punishment(max_completion_len=max_len, soft_punish_cache=cache)([[7] * n for n in lengths])
    np.testing.assert_allclose(ours, trl, rtol=0, atol=1e-12)


def test_a_bad_length_penalty_is_refused():
    with pytest.raises(ConfigError, match="0 <= soft_punish_cache <= max_completion_len, got 4 and 5"):
        LengthPenalty(4, 5)


def test_exact_match_is_the_demo_rule_stripped_text_of_a_completion_that_stopped():
    reward = ExactMatch()
    cases = [("four five six", True, "four five six", 1.0), ("  four five six \n", True, "four five six", 1.0),
             ("four five six", False, "four five six", 0.0), ("four five", True, "four five six", 0.0),
             ("Four five six", True, "four five six", 0.0), ("42", True, 42, 1.0), ("", True, " ", 1.0)]
    for completion, stopped, answer, expected in cases:
        assert reward("p", completion, {"answer": answer}, stopped=stopped, num_tokens=3) == expected, completion
    assert ExactMatch(answer_key="solution")("p", "x", {"solution": "x"}, stopped=True) == 1.0


def _batch():
    records = [{"answer": "one two"}, {"answer": "three"}, {"answer": "four"}]
    completions = ["one two", "<b>three</b>", "four four four"]
    return dict(prompts=["q0", "q1", "q2"], completions=completions, records=records, stopped=[True, True, False],
                num_tokens=[3, 5, 9])


def test_weighted_rewards_add_the_columns_with_their_weights():
    functions = (ExactMatch(), RegexFormat(r"<b>.*</b>", mode="search"), LengthPenalty(8, 4))
    total, columns = WeightedRewards(functions, weights=(1.0, 0.5, 2.0))(**_batch())
    expected = {"exact_match": [1.0, 0.0, 0.0], "format": [0.0, 1.0, 0.0], "length_penalty": [0.0, -0.25, -1.0]}
    assert list(columns) == ["exact_match", "format", "length_penalty"]
    for name, values in expected.items():
        np.testing.assert_array_equal(columns[name], values)
    np.testing.assert_allclose(total, [1.0, 0.5 - 0.5, -2.0])
    np.testing.assert_array_equal(WeightedRewards(functions)(**_batch())[0], [1.0, 0.75, -1.0])


def _named(name, fn):
    """A copy of ``fn`` carrying ``name``, as a user's reward function does."""
    def named(*args, **kwargs):
        return fn(*args, **kwargs)

    named.name = name
    return named


def _failing(prompt, completion, record, **_):
    raise ZeroDivisionError("division by zero")


@pytest.mark.parametrize("value,what", [(math.nan, "returned nan"), (math.inf, "returned inf"),
                                        ("1.0", r"returned '1.0' \(str\)"), (True, r"returned True \(bool\)"),
                                        (None, r"returned None \(NoneType\)"),
                                        (np.float32(np.nan), r"returned np.float32\(nan\)")])
def test_a_bad_reward_value_names_the_function_the_record_and_the_value(value, what):
    def bad_on_the_third(prompt, completion, record, **_):
        return value if prompt == "q2" else 0.5

    rewards = WeightedRewards((ExactMatch(), _named("checker", bad_on_the_third)))
    with pytest.raises(RewardError, match=rf"reward 'checker' {what} for record 12 \(completion 'four four four'\)"):
        rewards(**_batch(), record_indices=[10, 11, 12])


def test_a_reward_function_that_raises_names_itself_and_the_record():
    with pytest.raises(RewardError, match=r"reward 'flaky' failed on record 0 .*ZeroDivisionError: division by zero"):
        WeightedRewards((_named("flaky", _failing),))(**_batch())
    batch = _batch()
    batch["records"][1] = {"solution": "three"}
    with pytest.raises(RewardError, match=r"'exact_match' failed on record 1 .*no 'answer' field.*\['solution'\]"):
        WeightedRewards((ExactMatch(),))(**batch)


def test_a_bad_combination_is_refused():
    with pytest.raises(ConfigError, match="repeat"):
        WeightedRewards((RegexFormat("a"), RegexFormat("b")))
    with pytest.raises(ConfigError, match="each with a name"):
        WeightedRewards((lambda prompt, completion, record, **_: 1.0,))
    with pytest.raises(ConfigError, match=r"weights \(1.0,\) must be 2 finite numbers"):
        WeightedRewards((ExactMatch(), RegexFormat("a")), weights=(1.0,))
    with pytest.raises(ConfigError, match="must be 1 finite numbers"):
        WeightedRewards((ExactMatch(),), weights=(math.nan,))
    with pytest.raises(RewardError, match="one prompt, record, stopped flag and token count per completion"):
        WeightedRewards((ExactMatch(),))(**{**_batch(), "stopped": [True]})


LENGTHS = [9, 4, 13, 1, 7]  # [prompt | completion] tokens of each row; the rows are right padded to 16


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    folder = save(build_head("llama", "seq_cls", num_labels=1, scale=0.3), tmp_path_factory.mktemp("reward_model"))
    cfg, params = jaxft.from_pretrained(folder)
    return transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval(), cfg, params


def test_reward_model_scores_are_transformers_sequence_classification_logits(reward_model):
    model, cfg, params = reward_model
    ids = random_ids((len(LENGTHS), 16), seed=3)
    present = np.arange(16)[None, :] < np.array(LENGTHS)[:, None]
    batch = {"input_ids": jnp.asarray(np.where(present, ids, 0), jnp.int32),
             "segment_ids": jnp.asarray(present, jnp.int32),
             "positions": jnp.asarray(np.where(present, np.arange(16), 0), jnp.int32)}
    score = jax.jit(reward_model_scores, static_argnums=0, static_argnames="batch_size")
    scores = score(cfg, params, batch, batch_size=2)  # 5 rows: two batches of 2 and the remainder
    with torch.no_grad():
        expected = [float(model(torch.as_tensor(ids[i:i + 1, :n])).logits[0, 0]) for i, n in enumerate(LENGTHS)]
    np.testing.assert_allclose(np.asarray(scores), expected, rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda p: jnp.sum(reward_model_scores(cfg, p, batch, batch_size=5)))(params)
    assert all(not np.any(np.asarray(g)) for g in jax.tree_util.tree_leaves(grads))
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        reward_model_scores(cfg, params, batch, batch_size=0)
