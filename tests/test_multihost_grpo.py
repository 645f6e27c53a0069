"""GRPO over two processes: two real ``jaxft train`` processes on 127.0.0.1 (gloo CPU collectives, 2 CPU devices
each) against one process with 4 devices and the same global batch, and a reward that fails on one process's
record stopping both.

Why every record holds the same prompt: a row's sampling key is its position in the global batch (the sampler
splits the step's key per row), and the two runs order their prompts differently (each process shuffles its own
share with its process index in the seed; one process shuffles all records), so distinct prompts would meet
different keys and draw different completions. With one prompt (and one answer) every order is the same global
batch: the runs must draw the same completions, score the same rewards and take the same steps, which exercises
what only a multi-process run does: each process scoring its own rows of the sampled batch (taken back from the
mesh), rewards gathered over the processes for the group advantages and the metrics, and one step over both.
The held-out prompts are distinct: greedy completions do not depend on their row, so the evaluation (each process
its share of the prompts) must score what the one process scores over all of them.
"""
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from process_pair import TIMEOUT_S, cpu_env, pair_outcomes, run_pair, train_args
from sft_worker import tiny_chat_model

pytestmark = pytest.mark.slow
PROMPTS_PER_PROCESS, STEPS = 2, 3
METRICS = ("loss", "reward", "reward_std", "rewards/format/mean", "rewards/length_penalty/mean",
           "completions/mean_length", "completions/clipped_ratio", "kl", "clip_ratio/region_mean")


def _write_config(root: Path, name: str, data: Path, batch_size: int, rewards: list[dict], eval_data: Path) -> Path:
    config = {"model": str(root / "model"), "output_dir": str(root / name),
              # B != 0 (init_lora_weights false): the policy is not the reference, so the KL term is real
              # from step 1
              "peft": [{"type": "lora", "r": 2, "lora_alpha": 4, "target_modules": "all-linear",
                        "init_lora_weights": False}],
              "task": {"type": "grpo", "num_generations": 4, "max_prompt_length": 8, "max_completion_length": 6,
                       "rewards": rewards, "beta": 0.04},
              "data": {"paths": [str(data)], "batch_size": batch_size},
              "eval_data": {"paths": [str(eval_data)], "batch_size": batch_size},
              "optim": {"lr": 1e-2},
              "train": {"steps": STEPS, "log_every": 1, "loss_chunk_size": 0, "eval_batches": 1}}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _write_prompts(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _train_records(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["split"] == "train"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost-grpo")
    tiny_chat_model(root)
    return root


@pytest.fixture(scope="module")
def runs(root):
    data = _write_prompts(root / "same-prompt.jsonl",
                          [{"prompt": "increment 1 2 3", "answer": "2 3 4"}] * (2 * PROMPTS_PER_PROCESS))
    # varied rewards, so the advantages (and the loss) are not zero: a completion holding "2", and its length
    rewards = [{"type": "format", "pattern": "2", "mode": "search"},
               {"type": "length_penalty", "max_completion_len": 6, "soft_punish_cache": 4}]
    # greedy completions do not depend on their rows' order: distinct eval prompts, each process scoring its share
    # (these four get different format rewards from the trained policy: the mean tells a wrong share)
    held_out = _write_prompts(root / "held-out.jsonl", [{"prompt": f"increment {i} {i + 1} 3", "answer": "x"}
                                                        for i in range(2, 2 + 2 * PROMPTS_PER_PROCESS)])
    one = _write_config(root, "one", data, 2 * PROMPTS_PER_PROCESS, rewards, held_out)
    done = subprocess.run(train_args(one), env=cpu_env(root, 4), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    two = run_pair(root, train_args(_write_config(root, "two", data, PROMPTS_PER_PROCESS, rewards, held_out)),
                   devices=2)
    return {"one": _train_records(root / "one"), "two": _train_records(root / "two"), "outputs": two,
            "summaries": [json.loads((root / name / "summary.json").read_text()) for name in ("one", "two")]}


def test_two_grpo_processes_take_the_steps_of_one_process_with_the_same_global_batch(runs):
    one, two = runs["one"], runs["two"]
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, STEPS + 1))
    for key in METRICS:
        print(key, [r[key] for r in one], [r[key] for r in two])
        # the same programs over the same devices; only the cross-process sums run over gloo: float32 rounding
        np.testing.assert_allclose([r[key] for r in two], [r[key] for r in one], atol=1e-5, rtol=1e-5, err_msg=key)
    assert len({r["reward"] for r in one}) > 1 or one[0]["reward_std"] > 0  # the rewards vary: a real gradient
    assert all(r["kl"] > 0 for r in one)
    (out0, err0), (out1, err1) = runs["outputs"]
    assert "process 0/2, 2 local devices, 4 global devices" in err0 and out1 == ""
    one_summary, summary = runs["summaries"]
    assert summary["final_loss"] == pytest.approx(two[-1]["loss"]) and out0.rstrip().endswith("}")
    # the eval prompts split between the processes (each scores its share) and together are the one process's
    want = one_summary["eval"]
    assert summary["eval"]["completions"] == want["completions"] == 2 * PROMPTS_PER_PROCESS
    print("eval, 1 process:", want, "2 processes:", summary["eval"])
    for key in ("reward", "rewards/format/mean", "rewards/length_penalty/mean"):
        assert summary["eval"][key] == pytest.approx(want[key], abs=1e-6), key


def test_a_reward_failing_on_one_process_stops_both_and_names_the_record(root):
    records = [{"prompt": "increment 1 2 3", "answer": "2 3 4"}] * (2 * PROMPTS_PER_PROCESS - 1)
    # line 4 has no answer to compare with
    data = _write_prompts(root / "one-without-answer.jsonl", [*records, {"prompt": "increment 4 3 2"}])
    config = _write_config(root, "fails", data, PROMPTS_PER_PROCESS, [{"type": "exact_match"}], data)
    outcomes = pair_outcomes(root, train_args(config), devices=2)  # a hang raises TimeoutExpired
    assert all(code != 0 for code, _, _ in outcomes), outcomes
    errors = [err for _, _, err in outcomes]
    print(*errors, sep="\n---\n")
    named = [e for e in errors if f"{data}:4" in e]
    assert len(named) == 1 and "has no 'answer' field" in named[0]  # the process that took line 4
    other = next(e for e in errors if e is not named[0])
    assert "another process's rewards failed" in other
