"""GRPO on the demo task: from a weakly fine-tuned checkpoint, with the task's exact reward (the right answer, and
a stop), does online RL raise the mean reward and greedy exact match on held-out problems?

    python examples/grpo.py [--out jaxft-grpo] [--steps N]

1. the demo's cached base (built on first use) is fine-tuned weakly with LoRA on the demo's chats
   (``--sft-steps``) and merged into ``OUT/weak``, as ``examples/preference.py`` does;
2. prompts: the training problems as ``{"prompt": [user turn], "answer": the right reply}`` records;
3. ``configs/grpo-demo.yaml`` trains QLoRA on ``OUT/weak`` with GRPO (``--steps``): each step samples 8
   completions of each of 16 prompts with the params being trained, scores them by exact match, and takes the
   clipped policy-gradient step on the group-normalized advantages;
4. greedy exact match on the held-out problems (disjoint from training) before and after (also evaluated every 20
   steps by the run itself), the reward curve (``bench/results/grpo.png``) and a table
   (``bench/results/grpo.json``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from jaxft.recipes import demo, sft
from jaxft.recipes.config import load_run_config
from jaxft.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "examples"))
from bench_train import cpu_info  # noqa: E402  (the benchmarks' record of the CPU the numbers come from)
from preference import exact_match, problems, weak_checkpoint, write_jsonl  # noqa: E402  (its weak checkpoint)


def prompt_records(ps) -> list[dict]:
    """One GRPO prompt per problem: the user turn, and the reply the exact-match reward compares with."""
    return [{"prompt": demo.chat(p)[:1], "answer": demo.words(demo.answer(p))} for p in ps]


def plot_rewards(metrics: Path, png: Path):
    """Mean reward per step of the sampled completions (and its 10-step moving mean), and the held-out problems'
    greedy exact match at each evaluation."""
    records = read_metrics(metrics)
    steps, rewards = zip(*[(r["step"], r["reward"]) for r in records if r["split"] == "train" and "reward" in r])
    evals = [(r["step"], r["reward"]) for r in records if r["split"] == "eval"]
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    ax.plot(steps, rewards, alpha=0.35, label="sampled completions (temperature 0.3): mean reward")
    if len(rewards) >= 10:
        smooth = np.convolve(rewards, np.ones(10) / 10, mode="valid")
        ax.plot(steps[9:], smooth, label="the same, 10-step moving mean")
    ax.plot(*zip(*evals), marker="o", label="held-out problems: greedy exact match")
    ax.set(xlabel="step", ylabel="reward = exact match", title="GRPO on the demo task", ylim=(0, 1))
    ax.legend(loc="upper left")
    fig.savefig(png, dpi=100)


def arguments(argv, doc: str, name: str) -> argparse.Namespace:
    """The RL demos' command line (``name``: grpo or ppo)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--out", default=f"jaxft-{name}", help=f"data and run folder (default: ./jaxft-{name})")
    parser.add_argument("--steps", type=int, help=f"{name.upper()} steps (default: the config's)")
    parser.add_argument("--sft-steps", type=int, default=140,
                        help="the weak fine-tune's steps (default 140: about half the held-out problems right)")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / f"{name}.json"))
    return parser.parse_args(argv)


def prepared(out: Path, sft_steps: int) -> tuple[list, list, Path, Path]:
    """(held-out problems, RL problems, data folder, weak checkpoint): the demo base (built on first use), the weak
    checkpoint fine-tuned from it, and the RL and held-out prompts in ``out/data``."""
    cfg = demo.DemoConfig()
    if not (demo.base_dir() / "config.json").exists():
        demo.build_base(demo.base_dir(), cfg)
    test, sft_problems, rl_problems = problems(cfg, 2000)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    demo.write_jsonl(data / "sft.jsonl", [demo.chat(p) for p in sft_problems])
    weak = weak_checkpoint(out, data / "sft.jsonl", sft_steps)
    write_jsonl(data / "prompts.jsonl", prompt_records(rl_problems))
    write_jsonl(data / "eval-prompts.jsonl", prompt_records(test))
    return test, rl_problems, data, weak


def main(argv=None) -> int:
    args = arguments(argv, __doc__, "grpo")
    out = Path(args.out)
    test, _, data, weak = prepared(out, args.sft_steps)
    before = exact_match(weak, test)
    run_dir = out / "runs" / "grpo"
    sets = [f"model={weak}", f"output_dir={run_dir}", f"data.paths=[{data / 'prompts.jsonl'}]",
            f"eval_data={{paths: [{data / 'eval-prompts.jsonl'}], batch_size: 20}}", "train.eval_every=20",
            f"train.eval_batches={len(test) // 20}", "train.log_every=1"] + (
        [f"train.steps={args.steps}"] if args.steps else [])
    run_cfg = load_run_config(ROOT / "configs" / "grpo-demo.yaml", sets)
    start = time.perf_counter()
    summary = sft.run(run_cfg, overwrite=True)
    seconds = round(time.perf_counter() - start, 1)
    after = exact_match(weak, test, summary["export"])
    train = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]
    first, last = train[0], train[-1]
    row = {"method": "grpo (exact-match reward)", "steps": run_cfg.train.steps, "seconds": seconds,
           "reward_first_step": first["reward"], "reward_last_step": last["reward"],
           "reward_last_10_steps": float(np.mean([r["reward"] for r in train[-10:]])),
           "eval_exact_match_in_run": summary["eval"]["reward"],
           "exact_match_before": before, "exact_match_after": after,
           "rollout_tokens_per_s": last.get("rollout_tokens_per_s"), "train_tokens_per_s": last.get(
               "train_tokens_per_s"), "tokens_per_s": last.get("tokens_per_s")}
    print(f"| method | steps | seconds | mean reward, step 1 -> {row['steps']} | greedy exact match "
          f"({len(test)} held-out) |\n|---|---|---|---|---|\n| {row['method']} | {row['steps']} | {seconds} | "
          f"{first['reward']:.3f} -> {last['reward']:.3f} | {before:.3f} -> {after:.3f} |")
    plot_rewards(run_dir / "metrics.jsonl", Path(args.json).with_suffix(".png"))
    Path(args.json).write_text(json.dumps({"cpu": cpu_info(), "rows": [row]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
