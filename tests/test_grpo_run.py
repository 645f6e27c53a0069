"""GRPO through whole runs (``task: grpo``): the rollouts a step trains on, against an independent computation, and
runs that log TRL's metrics, evaluate, export, and resume exactly.

The oracle for a generation batch (:class:`jaxft.recipes.rl.Rollouts`): the completions decoded by the tokenizer,
rewards recomputed by a reward written here, TRL's group normalization written in numpy ((r - mean) / (std + 1e-4),
unbiased std), and the old log-probs against a teacher-forced forward pass of the policy over each unpadded prompt
+ completion.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.config import ConfigError
from jaxft.data.chat import IGNORE_INDEX
from jaxft.data.config import DataConfig
from jaxft.models.llama import forward
from jaxft.parallel import MeshConfig
from jaxft.peft.lora import LoraConfig
from jaxft.peft.tree import combine
from jaxft.recipes import demo, rl, sft
from jaxft.recipes.config import RunConfig, TrainConfig, from_dict
from jaxft.recipes.skeleton import load_inputs, load_model, train_state
from jaxft.recipes.tasks import GrpoTask
from jaxft.train.optim import OptimConfig
from jaxft.train.rewards import LengthPenalty
from sft_worker import make_base

RUN_NUMBERS = itertools.count()
G = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    rng = np.random.default_rng(0)
    problems = [tuple(int(d) for d in rng.integers(0, 10, 3)) for _ in range(12)]
    records = [{"prompt": [{"role": "user", "content": f"reverse {demo.words(p)}"}],
                "answer": demo.words(p[::-1])} for p in problems]
    path = root / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return make_base(root / "base"), path, root


def _config(setup, init_lora_weights=False, **task) -> RunConfig:
    base, path, root = setup
    data = DataConfig(paths=(str(path),), batch_size=4, template="chatml")
    # by default B != 0 (init_lora_weights False; PEFT's "gaussian" draws A only) so the policy differs from the base
    # (a real adapter), and the completions vary
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=init_lora_weights)
    return RunConfig(model=str(base), output_dir=str(root / f"run-{next(RUN_NUMBERS)}"), peft=(lora,), data=data,
                     task=GrpoTask(**{"num_generations": G, "max_prompt_length": 16, "max_completion_length": 6,
                                      "rewards": (LengthPenalty(6, 4),), **task}),
                     optim=OptimConfig(lr=1e-2, max_grad_norm=1.0), mesh=MeshConfig(data=4, tensor=2),
                     train=TrainConfig(steps=4, log_every=1, eval_batches=2, loss_chunk_size=0, grad_accum=2))


def test_a_generation_batch_against_an_independent_computation(setup):
    cfg = _config(setup)
    inputs = load_inputs(cfg)
    model_cfg, params = load_model(cfg, jax.random.PRNGKey(0), inputs.mesh)
    state, frozen, *_ = train_state(cfg, model_cfg, params, inputs.mesh)
    rollouts = rl.Rollouts(cfg, model_cfg, inputs, frozen, start_step=0)
    prompts = list(inputs.pipeline.iterator.samples)  # the iterator's first batch, recomputed below
    batches = {k: np.asarray(v).reshape(-1, *v.shape[2:]) for k, v in rollouts(state).items()}
    first = [s.ids.tolist() for s in _first_batch(cfg, inputs, prompts)]
    policy = combine(state["trainable"], frozen)
    lengths, tokenizer = [], inputs.tokenizer
    for r, row in enumerate(batches["input_ids"]):
        real = batches["segment_ids"][r] > 0
        labelled = batches["labels"][r] != IGNORE_INDEX
        prompt = first[r // G]
        completion = batches["labels"][r][labelled].tolist()
        assert row[real].tolist() == prompt + completion
        logits = forward(model_cfg, policy, jnp.asarray([prompt + completion]))[0]
        logps = np.asarray(jax.nn.log_softmax(logits, -1))
        want = [logps[len(prompt) + j - 1, t] for j, t in enumerate(completion)]
        np.testing.assert_allclose(batches["old_logps"][r][labelled], want, atol=1e-5, rtol=0)
        lengths.append(len(completion))
        stopped = completion[-1] in model_cfg.eos_token_ids
        assert stopped or len(completion) == 6
        assert tokenizer.decode(completion[:len(completion) - stopped], skip_special_tokens=True) is not None
    rewards = np.array([LengthPenalty(6, 4)("", "", {}, num_tokens=n) for n in lengths]).reshape(-1, G)
    want = ((rewards - rewards.mean(1, keepdims=True)) / (rewards.std(1, ddof=1, keepdims=True) + 1e-4)).ravel()
    for r in range(len(lengths)):
        labelled = batches["labels"][r] != IGNORE_INDEX
        np.testing.assert_allclose(batches["advantages"][r][labelled], want[r], atol=1e-5, rtol=0)
    assert rollouts.metrics["reward"] == pytest.approx(rewards.mean(), abs=1e-6)
    assert rollouts.metrics["completions/mean_length"] == pytest.approx(np.mean(lengths))


def _first_batch(cfg, inputs, samples):
    """The prompts a fresh iterator of the same data and seed hands out first."""
    from jaxft.data.prompts import PromptIterator
    return next(PromptIterator(samples, batch_size=cfg.data.batch_size, seed=cfg.data.seed))


def test_grpo_run_logs_trls_metrics_evaluates_and_exports(setup):
    """With LoRA's no-op init the first step's policy is the adapters-off reference and the policy that sampled:
    KL 0 and no clipped token (the sampler's log-probs are the step's own); later steps move away."""
    cfg = _config(setup, init_lora_weights=True, beta=0.04)  # PEFT's default: B = 0, a no-op
    cfg = dataclasses.replace(cfg, eval_data=cfg.data)
    summary = sft.run(cfg)
    records = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for r in train:
        assert {"loss", "reward", "reward_std", "rewards/length_penalty/mean", "completions/mean_length",
                "completions/clipped_ratio", "rollout_tokens_per_s", "kl", "clip_ratio/region_mean"} <= r.keys()
        assert -1 <= r["reward"] <= 0
    assert train[0]["kl"] == pytest.approx(0, abs=1e-6) and train[0]["clip_ratio/region_mean"] == 0
    assert train[-1]["kl"] > 1e-6
    assert {"reward", "rewards/length_penalty/mean", "completions"} <= summary["eval"].keys()
    assert summary["eval"]["completions"] == 8  # eval_batches 2 x batch_size 4 prompts, one greedy completion each
    assert (Path(summary["export"]) / "adapter_config.json").is_file()


def test_resumed_run_draws_the_same_rollouts_and_losses(setup):
    """Stopped after its step-2 checkpoint and resumed: the same prompts, sampling keys and so the same rollouts,
    rewards and losses as the run that went on (each generation batch trained 2 steps: num_iterations 2)."""
    cfg = _config(setup, num_iterations=2)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, save_every=2))
    sft.run(cfg)
    resumed, went_on = resumed_from_step_2(cfg)
    for key in ("loss", "reward", "completions/mean_length", "rewards/length_penalty/mean"):
        assert [r[key] for r in resumed] == [r[key] for r in went_on], key


def resumed_from_step_2(cfg) -> tuple[list[dict], list[dict]]:
    """Resume a finished 4-step run as if it had stopped after saving step 2: the train records of steps 3 and 4
    the resumed run logs, and those the run logged going on."""
    run_dir = Path(cfg.output_dir)
    straight = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(run_dir / "checkpoints" / "4")
    sft.run(cfg, resume=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    resumed = [r for r in records[len(straight):] if r["split"] == "train"]
    assert [r["step"] for r in resumed] == [3, 4]
    return resumed, [r for r in straight if r["split"] == "train" and r["step"] in (3, 4)]


@pytest.mark.parametrize("task, message", [
    ({"num_generations": 1}, "num_generations must be >= 2"),
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"top_p": 0.0}, "top_p"),
    ({"scale_rewards": "rank"}, "scale_rewards 'rank'"),
    ({"loss_type": "ppo"}, "loss_type"),
    ({"rewards": [{"type": "format", "pattern": "(unclosed"}]}, "not a regular expression"),
    ({"rewards": [{"type": "exact"}]}, "unknown reward type 'exact'"),
    ({"rewards": [{"type": "exact_match"}], "reward_weights": [1, 2]}, "weights"),
    ({"num_iterations": 3}, "train.steps 4 is not a multiple of task.num_iterations 3"),
    ({"num_generations": 3}, "do not split into train.grad_accum 2"),
    ({"rewards": [{"type": "length_penalty", "max_completion_len": 300, "soft_punish_cache": 10}]},
     "completions stop at max_completion_length 256"),
    ({"beta": 0.04, "_peft": []}, "set task.beta: 0"),
])
def test_bad_grpo_settings_are_refused_by_name(setup, task, message):
    base, path, root = setup
    peft = task.pop("_peft", [{"type": "lora"}])
    with pytest.raises(ConfigError, match=message):
        from_dict(RunConfig, {"model": str(base), "output_dir": str(root / "refused"), "peft": peft,
                              "data": {"paths": [str(path)], "batch_size": 1}, "task": {"type": "grpo", **task},
                              "train": {"steps": 4, "grad_accum": 2}})
