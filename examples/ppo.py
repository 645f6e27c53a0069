"""PPO on the demo task with a learned reward: from a weakly fine-tuned checkpoint, with a reward model trained on
its own wrong answers, does PPO raise greedy exact match on held-out problems?

    python examples/ppo.py [--out jaxft-ppo] [--steps N]

1. the weak checkpoint and the on-policy pairs of ``examples/preference.py`` (the demo base after a short LoRA
   fine-tune; the right answer against the checkpoint's wrong one), and its reward model (``configs/reward-demo.yaml``:
   a one-label score head, Bradley-Terry on the pairs);
2. prompts: the training problems as ``{"prompt": [user turn], "answer": the right reply}`` records;
3. ``configs/ppo-demo.yaml`` trains QLoRA on ``OUT/weak`` with PPO (``--steps``): each generation batch samples one
   completion per prompt with the params being trained, the reward model scores it, a value model (its own LoRA and
   score head over the same NF4 base) gives GAE advantages, and 4 clipped steps train policy and value model;
   exact match is logged beside the reward (weight 0), never rewarded;
4. greedy exact match on the held-out problems before and after (also every 20 steps by the run itself), for TRL's
   default ``kl_coef`` 0.05 and for 0.2, the curves (``bench/results/ppo.png``) and a table
   (``bench/results/ppo.json``).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from jaxft.recipes import sft
from jaxft.recipes.config import load_run_config
from jaxft.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "examples"))
from bench_train import cpu_info  # noqa: E402  (the benchmarks' record of the CPU the numbers come from)
from grpo import arguments, prepared  # noqa: E402  (the GRPO demo's command line, checkpoint and prompts)
from preference import exact_match, reward_run, write_pairs  # noqa: E402  (its pairs and reward model)

EXACT = "rewards/exact_match/mean"
SCORE = "rewards/reward_model/mean"
KL_COEFS = (0.05, 0.2)  # TRL's default, and a stronger pull to the weak checkpoint


def plot(runs: dict[float, Path], png: Path):
    """Per KL coefficient: left, the reward model's mean score of the sampled completions; right, the held-out
    problems' greedy exact match at each evaluation (not rewarded)."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    score, exact = fig.subplots(1, 2)
    for kl_coef, metrics in runs.items():
        records = read_metrics(metrics)
        train = [r for r in records if r["split"] == "train"]
        score.plot([r["step"] for r in train], [r[SCORE] for r in train], label=f"kl_coef {kl_coef}")
        exact.plot(*zip(*[(r["step"], r[EXACT]) for r in records if r["split"] == "eval"]), marker="o",
                   label=f"kl_coef {kl_coef}")
    score.set(xlabel="step", ylabel="reward model score", title="PPO: the reward (sampled, temperature 0.3)")
    exact.set(xlabel="step", ylabel="greedy exact match, held-out", title="PPO: exact match (not rewarded)",
              ylim=(0, 1))
    score.legend(loc="upper left")
    exact.legend(loc="lower left")
    fig.savefig(png, dpi=100)


def ppo_run(kl_coef: float, weak: Path, out: Path, n_test: int, steps: int | None) -> tuple[dict, Path]:
    """(table row, metrics file) of ``configs/ppo-demo.yaml`` with ``kl_coef`` on the prepared data."""
    data, run_dir = out / "data", out / "runs" / f"ppo-kl{kl_coef}"
    sets = [f"model={weak}", f"output_dir={run_dir}", f"data.paths=[{data / 'prompts.jsonl'}]",
            f"task.rewards=[{{type: reward_model, path: {out / 'runs' / 'reward' / 'adapter'}, batch_size: 64}}, "
            "{type: exact_match}]", f"task.kl_coef={kl_coef}",
            f"eval_data={{paths: [{data / 'eval-prompts.jsonl'}], batch_size: 20}}", "train.eval_every=20",
            f"train.eval_batches={n_test // 20}", "train.log_every=1"] + (
        [f"train.steps={steps}", f"train.save_every={steps}"] if steps else [])
    run_cfg = load_run_config(ROOT / "configs" / "ppo-demo.yaml", sets)
    start = time.perf_counter()
    summary = sft.run(run_cfg, overwrite=True)
    seconds = round(time.perf_counter() - start, 1)
    train = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]
    fresh = train[::run_cfg.task.num_ppo_epochs]  # each generation batch's first step (its metrics)
    row = {"method": f"ppo (reward model, kl_coef {kl_coef})", "steps": run_cfg.train.steps, "seconds": seconds,
           "score_first_batch": fresh[0][SCORE],
           "score_last_10_batches": float(np.mean([r[SCORE] for r in fresh[-10:]])),
           "kl_last_batch": fresh[-1]["objective/kl"], "eval_score_in_run": summary["eval"]["reward"],
           "eval_exact_match_in_run": summary["eval"][EXACT], "export": summary["export"],
           "rollout_tokens_per_s": train[-1].get("rollout_tokens_per_s"),
           "tokens_per_s": train[-1].get("tokens_per_s")}
    return row, run_dir / "metrics.jsonl"


def main(argv=None) -> int:
    args = arguments(argv, __doc__, "ppo")
    out = Path(args.out)
    test, rl_problems, data, weak = prepared(out, args.sft_steps)
    write_pairs(data, weak, rl_problems, test)
    reward = reward_run(weak, data, out, None)
    print(f"reward model: held-out pair accuracy {reward['accuracy']:.3f} ({reward['seconds']} s)")
    before = exact_match(weak, test)
    rows, runs = [], {}
    for kl_coef in KL_COEFS:
        row, runs[kl_coef] = ppo_run(kl_coef, weak, out, len(test), args.steps)
        rows.append({**row, "exact_match_before": before, "exact_match_after": exact_match(weak, test, row["export"])})
    print(f"| method | steps | seconds | reward model score, first batch -> last 10 | greedy exact match "
          f"({len(test)} held-out) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['steps']} | {r['seconds']} | {r['score_first_batch']:.3f} -> "
              f"{r['score_last_10_batches']:.3f} | {before:.3f} -> {r['exact_match_after']:.3f} |")
    plot(runs, Path(args.json).with_suffix(".png"))
    Path(args.json).write_text(json.dumps({"cpu": cpu_info(), "reward_model": reward, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
