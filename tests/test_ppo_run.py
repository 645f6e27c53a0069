"""PPO through whole runs (``task: ppo``): a generation batch's advantages, returns and old values against an
independent computation, the PPO loss against float64 numpy, and runs that log TRL's metrics, export the policy
alone and resume exactly.

The oracle writes TRL's (pre-1.0) PPOTrainer steps out in numpy: log-probs and the value model from teacher-forced
forward passes over each unpadded prompt + completion (the value model built here from the base and the run's
nested value leaves), the per-token reward -kl_coef · (logp - ref_logp) plus the score at the last completion
token, GAE as TRL's reversed loop, returns = advantages + values, advantages whitened over the batch's completion
tokens with the unbiased variance.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxft.analysis import memory
from jaxft.config import ConfigError
from jaxft.data.chat import IGNORE_INDEX
from jaxft.models.heads import token_logits
from jaxft.models.llama import forward
from jaxft.parallel import MeshConfig
from jaxft.peft.methods import without_methods
from jaxft.peft.tree import combine
from jaxft.recipes import rl, sft
from jaxft.recipes.config import RunConfig, from_dict
from jaxft.recipes.skeleton import load_inputs, train_state
from jaxft.recipes.tasks import PpoTask
from jaxft.train.ppo import VALUE, VALUE_HEAD
from jaxft.train.rewards import LengthPenalty
from test_grpo_run import _config, _first_batch, resumed_from_step_2, setup  # noqa: F401  (setup: the module's fixture)

TEMPERATURE = 0.7


def _ppo_config(setup, **task) -> RunConfig:
    cfg = _config(setup)
    settings = {"num_generations": 2, "max_prompt_length": 16, "max_completion_length": 6,
                "rewards": (LengthPenalty(6, 4),), "temperature": TEMPERATURE, "num_ppo_epochs": 2, **task}
    return dataclasses.replace(cfg, task=PpoTask(**settings))


def _built(cfg):
    inputs = load_inputs(cfg)
    model_cfg, params = rl.load_model(cfg, jax.random.PRNGKey(0), inputs.mesh)
    params = rl.with_value_model(cfg, model_cfg, params, jax.random.PRNGKey(1))
    state, frozen, *_ = train_state(cfg, model_cfg, params, inputs.mesh)
    return inputs, model_cfg, state, frozen


def _value_model(params: dict) -> dict:
    """The value model's params, built directly: the base with the value model's adapters and score head."""
    base = without_methods({k: v for k, v in params.items() if k != VALUE})
    layers = {m: {**group, **params[VALUE]["layers"].get(m, {})} for m, group in base["layers"].items()}
    return {**base, "layers": layers, "score": params[VALUE]["score"]}


def _teacher_forced(model_cfg, params: dict, prompt: list, completion: list):
    """(log-probs at the temperature, reference log-probs, values) of each completion token, float64."""
    ids = jnp.asarray([prompt + completion])
    at = np.arange(len(prompt) - 1, len(prompt) + len(completion) - 1)

    def logps(p):
        logits = np.asarray(forward(model_cfg, p, ids)[0], np.float64) / TEMPERATURE
        logits -= logits.max(-1, keepdims=True)
        log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        return log_softmax[at, completion]

    policy = {k: v for k, v in params.items() if k != VALUE}
    values = np.asarray(token_logits(model_cfg.replace(head=VALUE_HEAD), _value_model(params), ids)[0, :, 0])
    return logps(policy), logps(without_methods(policy)), values[at].astype(np.float64)


def _rows(cfg, inputs, batches, first):
    """Per row: (prompt, completion, labelled mask) of the flattened batch."""
    out = []
    for r in range(batches["input_ids"].shape[0]):
        labelled = batches["labels"][r] != IGNORE_INDEX
        out.append((first[r // cfg.task.num_generations], batches["labels"][r][labelled].tolist(), labelled))
    return out


def test_a_generation_batch_against_an_independent_computation(setup):
    cfg = _ppo_config(setup, missing_eos_penalty=0.5, kl_coef=0.1, lam=0.9, gamma=0.95)
    inputs, model_cfg, state, frozen = _built(cfg)
    rollouts = rl.PpoRollouts(cfg, model_cfg, inputs, frozen, start_step=0)
    prompts = list(inputs.pipeline.iterator.samples)
    batches = {k: np.asarray(v).reshape(-1, *v.shape[2:]) for k, v in rollouts(state).items()}
    params = combine(state["trainable"], frozen)
    first = [s.ids.tolist() for s in _first_batch(cfg, inputs, prompts)]
    advantages, returns, scores, kls = [], [], [], []
    for prompt, completion, labelled in _rows(cfg, inputs, batches, first):
        logp, ref, value = _teacher_forced(model_cfg, params, prompt, completion)
        np.testing.assert_allclose(batches["old_values"][len(advantages)][labelled], value, atol=1e-5, rtol=0)
        stopped = completion[-1] in model_cfg.eos_token_ids
        score = LengthPenalty(6, 4)("", "", {}, num_tokens=len(completion)) - (0 if stopped else 0.5)
        reward = -0.1 * (logp - ref)
        reward[-1] += score
        gae, advantage = 0.0, np.zeros(len(completion))
        for t in reversed(range(len(completion))):
            following = value[t + 1] if t + 1 < len(completion) else 0.0
            gae = reward[t] + 0.95 * following - value[t] + 0.95 * 0.9 * gae
            advantage[t] = gae
        advantages.append(advantage)
        returns.append(advantage + value)
        scores.append(score)
        kls.append(np.sum(logp - ref))
    every = np.concatenate(advantages)
    whitened = (every - every.mean()) / np.sqrt(every.var(ddof=1) + 1e-8)
    got = np.concatenate([batches["advantages"][r][m] for r, (_, _, m) in enumerate(_rows(cfg, inputs, batches,
                                                                                           first))])
    np.testing.assert_allclose(got, whitened, atol=1e-4, rtol=0)
    got = np.concatenate([batches["returns"][r][m] for r, (_, _, m) in enumerate(_rows(cfg, inputs, batches, first))])
    np.testing.assert_allclose(got, np.concatenate(returns), atol=1e-4, rtol=0)
    assert rollouts.metrics["objective/scores"] == pytest.approx(np.mean(scores), abs=1e-5)
    assert rollouts.metrics["objective/kl"] == pytest.approx(np.mean(kls), abs=1e-4)
    assert np.mean(np.abs(kls)) > 1e-3  # the policy's adapters are not a no-op: the KL penalty takes part
    assert set(batches) == set(cfg.objective().batch_keys)


def test_the_ppo_loss_equals_float64_numpy(setup):
    """On a generation batch, with the policy's and the value model's adapters moved (ratios away from 1, values
    away from the old ones, some clipped): the step's loss is TRL's pg_loss + vf_coef · vf_loss, written here."""
    cfg = _ppo_config(setup, cliprange=0.1, cliprange_value=1.0, vf_coef=0.3)
    inputs, model_cfg, state, frozen = _built(cfg)
    rollouts = rl.PpoRollouts(cfg, model_cfg, inputs, frozen, start_step=0)
    batches = {k: np.asarray(v) for k, v in rollouts(state).items()}
    moved = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(3), x.shape, x.dtype),
                         state["trainable"])
    params = combine(moved, frozen)
    objective = cfg.objective()
    first = [s.ids.tolist() for s in _first_batch(cfg, inputs, list(inputs.pipeline.iterator.samples))]
    micro = {k: v[0] for k, v in batches.items()}  # the first micro-batch
    want_pg, want_vf, ratios, value_moves = [], [], [], []
    for r, (prompt, completion, labelled) in enumerate(_rows(cfg, inputs, micro, first)):
        logp, _, value = _teacher_forced(model_cfg, params, prompt, completion)
        old, advantage = micro["old_logps"][r][labelled], micro["advantages"][r][labelled]
        old_value, ret = micro["old_values"][r][labelled], micro["returns"][r][labelled]
        ratio = np.exp(logp - old)
        ratios.append(ratio)
        value_moves.append(np.abs(value - old_value))
        want_pg.append(np.maximum(-advantage * ratio, -advantage * np.clip(ratio, 0.9, 1.1)))
        clipped = np.clip(value, old_value - 1.0, old_value + 1.0)
        want_vf.append(0.5 * np.maximum((value - ret) ** 2, (clipped - ret) ** 2))
    pg, vf = np.concatenate(want_pg), np.concatenate(want_vf)
    ratios, value_moves = np.concatenate(ratios), np.concatenate(value_moves)
    assert np.any(np.abs(ratios - 1) > 0.1) and np.any(np.abs(ratios - 1) < 0.1)  # some tokens clipped, some not
    assert np.any(value_moves > 1.0) and np.any(value_moves < 1.0)
    loss, sums = objective.loss_and_sums(model_cfg, params, {k: jnp.asarray(v) for k, v in micro.items()})
    units = objective.units({k: jnp.asarray(v) for k, v in micro.items()})
    assert float(loss / units) == pytest.approx(pg.mean() + 0.3 * vf.mean(), rel=1e-6, abs=1e-6)
    metrics = objective.step_metrics(sums)
    assert float(metrics["loss/policy_avg"]) == pytest.approx(pg.mean(), rel=1e-6, abs=1e-6)
    assert float(metrics["loss/value_avg"]) == pytest.approx(vf.mean(), rel=1e-6, abs=1e-6)


def test_ppo_run_logs_trls_metrics_exports_the_policy_and_resumes_exactly(setup):
    """4 steps, each generation batch trained 2 steps, a checkpoint at step 2: the log carries TRL's PPO metrics,
    the export is the policy's adapter alone (no value leaf), and a run resumed from step 2 logs the same losses and
    rewards as the run that went on."""
    cfg = _ppo_config(setup, missing_eos_penalty=1.0)
    cfg = dataclasses.replace(cfg, eval_data=cfg.data, train=dataclasses.replace(cfg.train, save_every=2))
    summary = sft.run(cfg)
    run_dir = Path(cfg.output_dir)
    straight = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in straight if r["split"] == "train"]
    for r in train:
        assert {"loss", "loss/policy_avg", "loss/value_avg", "policy/clipfrac_avg", "val/clipfrac_avg",
                "policy/approxkl_avg", "objective/kl", "objective/scores", "objective/rlhf_reward", "reward",
                "rollout_tokens_per_s"} <= r.keys()
    assert {"reward", "completions"} <= summary["eval"].keys()
    model = memory.abstract_model(cfg)  # jaxft inspect counts the value model's adapters and head as the run does
    assert memory.param_counts(cfg, model.model_cfg, model.params)[0] == summary["trainable_params"]
    tensors = load_file(Path(summary["export"]) / "adapter_model.safetensors")
    assert tensors and all("lora_" in name and "score" not in name for name in tensors)
    assert len(tensors) == 2 * 7 * 2  # lora_A and lora_B of 7 linear modules in each of the 2 layers
    resumed, went_on = resumed_from_step_2(cfg)
    for key in ("loss", "reward", "loss/value_avg", "objective/kl"):
        assert [r[key] for r in resumed] == [r[key] for r in went_on], key


def test_one_copy_of_the_base_serves_the_policy_the_reference_and_the_value_model(setup):
    """The compiled PPO step's arguments (XLA's memory_analysis) hold the frozen base once beside the policy's and the
    value model's trainable leaves, their optimizer state and the batch: what `jaxft inspect` counts as resident."""
    cfg = _ppo_config(setup, kl_coef=0.1)
    predicted = memory.estimate(cfg, (1, 1, 1))
    compiled = memory.compiled_memory(cfg, MeshConfig(1, 1, 1), jax.devices()[:1])
    resident = predicted.frozen + predicted.trainable + predicted.optimizer + predicted.batch
    print(f"compiled arguments {compiled['argument']} bytes, estimated resident {resident}, base {predicted.frozen}")
    assert predicted.frozen > 0.3 * resident  # a second copy of the base would show
    assert compiled["argument"] == pytest.approx(resident, rel=0.02)


@pytest.mark.parametrize("task, message", [
    ({"kl_estimator": "k2"}, "kl_estimator 'k2'"),
    ({"num_ppo_epochs": 3}, "train.steps 4 is not a multiple of task.num_ppo_epochs 3"),
    ({"cliprange": 1.5}, "cliprange"),
    ({"lam": 1.5}, "lam must be in"),
    ({"missing_eos_penalty": -1}, "missing_eos_penalty must be >= 0"),
    ({"_peft": []}, "PPO's value model runs on the same base"),
    ({"_peft": [{"type": "lora", "bias": "all"}]}, "PPO's value model runs on the same base"),
])
def test_bad_ppo_settings_are_refused_by_name(setup, task, message):
    base, path, root = setup
    peft = task.pop("_peft", [{"type": "lora"}])
    with pytest.raises(ConfigError, match=message):
        from_dict(RunConfig, {"model": str(base), "output_dir": str(root / "refused"), "peft": peft,
                              "data": {"paths": [str(path)], "batch_size": 1}, "task": {"type": "ppo", **task},
                              "train": {"steps": 4}})
