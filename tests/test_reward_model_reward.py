"""A reward model as a reward of RL runs (``rewards: [{type: reward_model, path: ...}]``,
:class:`jaxft.train.rewards.RewardModelScore`), against transformers: its scores of prompts and completions equal
``LlamaForSequenceClassification``'s logits on the text its own tokenizer (another vocabulary than the policy's)
makes of them, as a reward run's data are made (a string prompt + completion + EOS; a chat prompt with the completion
as its assistant turn, rendered by the chat template); a GRPO generation batch is scored so; a ``task: reward`` run's
adapter export scores as transformers + PEFT score it; folders that hold no reward model are refused by key.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers
from peft import PeftModel

from hf_oracle import build_head, save
from jaxft.config import ConfigError, from_dict
from jaxft.data.chat import IGNORE_INDEX
from jaxft.data.config import DataConfig
from jaxft.data.prompts import PromptIterator
from jaxft.parallel import MeshConfig
from jaxft.peft.lora import LoraConfig
from jaxft.recipes import demo, rl, sft
from jaxft.recipes.config import RunConfig, TrainConfig
from jaxft.recipes.skeleton import load_inputs, load_model, train_state
from jaxft.recipes.tasks import GrpoTask, RewardTask, check_reward_models
from jaxft.train.optim import OptimConfig
from jaxft.train.rewards import LengthPenalty, RewardError, RewardModelScore, WeightedRewards
from sft_worker import make_base

RUN_NUMBERS = itertools.count()
G = 4
CHAT = [{"role": "user", "content": "reverse 1 2 3"}]
# (prompt as the record holds it, completion): strings and chats in one batch
SCORED = [("reverse 4 5 6 =", " 6 5 4"), (CHAT, "3 2 1"), ("reverse 7 =", " 7 7 7 7"), (CHAT, "1 2"),
          ("reverse 0 1 =", " unknown words")]
LORA = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="gaussian")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The policy's base (the demo's tokenizer) and a reward model on another base with a tokenizer of its own:
    trained on other text, so the same words have other ids; it keeps the demo's ChatML template."""
    root = tmp_path_factory.mktemp("reward_model_reward")
    base = make_base(root / "base")
    reward = root / "reward"
    reward.mkdir()
    demo.build_tokenizer(reward, ["9 9 9 8 8 7 = reverse 6 5 4 3 2 1 0 0 0"])
    tok = transformers.AutoTokenizer.from_pretrained(reward)
    model = build_head("llama", "seq_cls", num_labels=1, scale=0.3, vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    save(model, reward)
    rng = np.random.default_rng(0)
    problems = [tuple(int(d) for d in rng.integers(0, 10, 3)) for _ in range(8)]
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"reverse {demo.words(p)}"}]})
                               + "\n" for p in problems))
    return dict(root=root, base=base, reward=reward, tok=tok, model=model, prompts=prompts)


def _hf_ids(tok, prompt, completion: str) -> list[int]:
    """transformers' tokens of a reward run's record {prompt, completion}: TRL's RewardTrainer data."""
    if isinstance(prompt, str):
        return tok(prompt + completion + tok.eos_token)["input_ids"]
    ids = tok.apply_chat_template(prompt + [{"role": "assistant", "content": completion}], tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _hf_scores(model, tok, pairs) -> np.ndarray:
    with torch.no_grad():
        return np.array([float(model(input_ids=torch.tensor([_hf_ids(tok, p, c)])).logits[0, 0]) for p, c in pairs])


def _score(reward, pairs) -> tuple[np.ndarray, dict]:
    n = len(pairs)
    return WeightedRewards((reward,))(["decoded"] * n, [c for _, c in pairs], [{}] * n, [True] * n, [3] * n,
                                      prompt_sources=[p for p, _ in pairs])


def test_scores_are_transformers_logits_of_the_text_its_own_tokenizer_makes(setup):
    total, columns = _score(RewardModelScore(str(setup["reward"]), batch_size=2), SCORED)  # 5 rows: 2 + 2 + 1
    want = _hf_scores(setup["model"], setup["tok"], SCORED)
    np.testing.assert_allclose(columns["reward_model"], want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(total, want, atol=1e-5, rtol=0)
    assert np.ptp(want) > 1e-2  # the rows score differently: a real head, not a constant


def test_folders_without_a_reward_model_are_refused_by_key(setup, tmp_path):
    two_labels = save(build_head("llama", "seq_cls", num_labels=2), tmp_path / "two_labels")
    for path, says in ((tmp_path / "missing", "is no folder"), (setup["base"], r"no task head \(a causal LM\)"),
                       (two_labels, "a seq_cls head with 2 labels"), (setup["root"], "neither adapter_config.json")):
        with pytest.raises(ConfigError, match=rf"task\.rewards\[1\]\.path .*{says}.*num_labels 1"):
            check_reward_models(GrpoTask(rewards=(LengthPenalty(6, 4), RewardModelScore(str(path)))).rewards)
    missing = _grpo_config(setup, task=GrpoTask(num_generations=G, rewards=(RewardModelScore(str(tmp_path / "x")),)))
    with pytest.raises(ConfigError, match=r"task\.rewards\[0\]\.path .*is no folder"):
        sft.run(missing)  # a run refuses it before it writes anything
    assert not Path(missing.output_dir).exists()
    task = from_dict(GrpoTask, {"rewards": [{"type": "reward_model", "path": str(setup["reward"]), "batch_size": 4}]})
    assert task.rewards == (RewardModelScore(str(setup["reward"]), batch_size=4),)
    with pytest.raises(ConfigError, match="batch_size"):
        RewardModelScore(str(setup["reward"]), batch_size=0)


@dataclasses.dataclass(frozen=True)
class _Batch:
    values: tuple
    name: str = "batch"

    def score_batch(self, prompts, completions, records, **_):
        return np.array(self.values)


def test_a_batch_function_that_gives_no_finite_number_names_the_record():
    call = lambda fn: WeightedRewards((fn,))(["p"] * 3, ["a", "b", "c"], [{}] * 3, [True] * 3, [1] * 3, [7, 8, 9])
    with pytest.raises(RewardError, match=r"reward 'batch' returned nan for record 8 \(completion 'b'\)"):
        call(_Batch((1.0, float("nan"), 2.0)))
    with pytest.raises(RewardError, match=r"shape \[2\] for a batch of 3 completions, from record 7"):
        call(_Batch((1.0, 2.0)))
    total, columns = call(_Batch((1, 2, 3)))
    np.testing.assert_array_equal(columns["batch"], [1, 2, 3])


def _grpo_config(setup, **overrides) -> RunConfig:
    data = DataConfig(paths=(str(setup["prompts"]),), batch_size=4, template="chatml")
    task = overrides.pop("task", None) or GrpoTask(num_generations=G, max_prompt_length=16, max_completion_length=6,
                                                   rewards=(RewardModelScore(str(setup["reward"]), batch_size=4),))
    return RunConfig(model=str(setup["base"]), output_dir=str(setup["root"] / f"run-{next(RUN_NUMBERS)}"),
                     peft=(LORA,), data=data, task=task, optim=OptimConfig(lr=1e-2, max_grad_norm=1.0),
                     mesh=MeshConfig(data=4, tensor=2),
                     train=TrainConfig(steps=2, log_every=1, loss_chunk_size=0, grad_accum=2), **overrides)


def test_a_generation_batch_is_scored_by_the_reward_model_as_transformers_scores_it(setup):
    cfg = _grpo_config(setup)
    inputs = load_inputs(cfg)
    model_cfg, params = load_model(cfg, jax.random.PRNGKey(0), inputs.mesh)
    state, frozen, *_ = train_state(cfg, model_cfg, params, inputs.mesh)
    rollouts = rl.Rollouts(cfg, model_cfg, inputs, frozen, start_step=0)
    first = next(PromptIterator(list(inputs.pipeline.iterator.samples), batch_size=4, seed=cfg.data.seed))
    batches = {k: np.asarray(v).reshape(-1, *v.shape[2:]) for k, v in rollouts(state).items()}
    pairs = []
    for r in range(len(batches["labels"])):
        completion = batches["labels"][r][batches["labels"][r] != IGNORE_INDEX].tolist()
        stopped = completion[-1] in model_cfg.eos_token_ids
        text = inputs.tokenizer.decode(completion[:len(completion) - stopped], skip_special_tokens=True)
        pairs.append((first[r // G].record.prompt, text))
    rewards = _hf_scores(setup["model"], setup["tok"], pairs)
    assert rollouts.metrics["rewards/reward_model/mean"] == pytest.approx(rewards.mean(), abs=1e-5)
    grouped = rewards.reshape(-1, G)
    want = ((grouped - grouped.mean(1, keepdims=True)) / (grouped.std(1, ddof=1, keepdims=True) + 1e-4)).ravel()
    for r in range(len(pairs)):
        labelled = batches["labels"][r] != IGNORE_INDEX
        np.testing.assert_allclose(batches["advantages"][r][labelled], want[r], atol=1e-3, rtol=0)


def test_a_grpo_run_logs_the_reward_models_mean(setup):
    cfg = _grpo_config(setup)
    sft.run(cfg)
    train = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        assert np.isfinite(r["rewards/reward_model/mean"]) and r["reward"] == pytest.approx(
            r["rewards/reward_model/mean"], abs=1e-6)


def test_a_reward_runs_adapter_export_scores_as_transformers_with_peft(setup):
    base, root = setup["base"], setup["root"]
    pairs = [{"prompt": f"reverse {demo.words(p)} =", "chosen": f" {demo.words(p[::-1])}",
              "rejected": f" {demo.words(p)}"} for p in ((1, 2, 3), (4, 5, 6), (7, 8, 9), (0, 1, 2))]
    path = root / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    cfg = RunConfig(model=str(base), output_dir=str(root / "reward-run"), task=RewardTask(), peft=(LORA,),
                    data=DataConfig(paths=(str(path),), max_length=16, batch_size=4),
                    optim=OptimConfig(lr=1e-2), mesh=MeshConfig(data=4, tensor=2),
                    train=TrainConfig(steps=2, loss_chunk_size=0))
    export = Path(sft.run(cfg)["export"])
    assert export.name == "adapter"
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(base, num_labels=1).eval()
    model = PeftModel.from_pretrained(hf, export).eval()
    scored = [(r["prompt"], r["chosen"]) for r in pairs] + [(CHAT, "3 2 1")]
    want = _hf_scores(model, transformers.AutoTokenizer.from_pretrained(export), scored)
    _, columns = _score(RewardModelScore(str(export)), scored)
    np.testing.assert_allclose(columns["reward_model"], want, atol=1e-5, rtol=0)
