"""Preference tuning on the demo task: from a weakly fine-tuned checkpoint, DPO (sigmoid and IPO), ORPO and SimPO
raise greedy exact match on held-out problems.

    python examples/preference.py [--out jaxft-preference] [--steps N]

1. the demo's cached base (``jaxft demo`` builds it; built here on first use) is fine-tuned weakly with LoRA on the
   demo's chats (``--sft-steps``) and merged into ``OUT/weak`` (the checkpoint to improve, and the reference);
2. preference pairs are built from the demo generator: the prompt ``increment 3 1 9 4``, the chosen reply the right
   answer ``4 2 0 5``, the rejected one a wrong answer (one digit off, or a digit left unincremented);
3. each method trains LoRA on ``OUT/weak`` from its config in ``configs/`` (``--steps`` each), and its greedy exact
   match on held-out problems (disjoint from training) is compared with the weak checkpoint's.

Prints a table (method, steps, seconds, exact match before -> after) and writes it as JSON to
``bench/results/preference.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from jaxft.hf.checkpoint import from_pretrained
from jaxft.hf.peft_format import load_adapter
from jaxft.hf.tokenizer import load_tokenizer
from jaxft.peft.methods import merge
from jaxft.recipes import demo, sft
from jaxft.recipes.config import load_run_config
from jaxft.recipes.skeleton import write_export

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from bench_train import cpu_info  # noqa: E402  (the benchmarks' record of the CPU the numbers come from)

CONFIGS = {"dpo (sigmoid)": ("dpo-demo.yaml", []), "dpo (ipo)": ("dpo-demo.yaml", ["task.loss_type=ipo"]),
           "orpo": ("orpo-demo.yaml", []), "simpo": ("simpo-demo.yaml", []), "kto": ("kto-demo.yaml", [])}


def wrong_answer(rng: np.random.Generator, digits) -> str:
    """A near miss: one digit of the right answer off by one, or one digit left as it was."""
    right = list(demo.answer(digits))
    i = int(rng.integers(len(right)))
    right[i] = (right[i] + 1) % 10 if rng.random() < 0.5 else digits[i]
    return demo.words(right)


def pair(rng: np.random.Generator, digits) -> dict:
    prompt = [{"role": "user", "content": f"increment {demo.words(digits)}"}]
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": demo.words(demo.answer(digits))}],
            "rejected": [{"role": "assistant", "content": wrong_answer(rng, digits)}]}


def unpaired(record: dict) -> list[dict]:
    """KTO's form of a pair: the chosen reply desirable, the rejected one not."""
    return [{"prompt": record["prompt"], "completion": record["chosen"], "label": True},
            {"prompt": record["prompt"], "completion": record["rejected"], "label": False}]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_data(folder: Path, cfg: demo.DemoConfig, n_pairs: int) -> tuple[list, Path]:
    """(held-out problems, SFT chats file); beside it pairs.jsonl, kto.jsonl (the same pairs unpaired) and
    eval-pairs.jsonl (pairs of the held-out problems, which appear in no training file)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed + 2)
    test = demo.problems(rng, cfg.n_eval, cfg)
    train = demo.problems(rng, cfg.n_train + n_pairs, cfg, exclude=frozenset(test))
    demo.write_jsonl(folder / "sft.jsonl", [demo.chat(p) for p in train[:cfg.n_train]])
    pairs = [pair(rng, p) for p in train[cfg.n_train:]]
    write_jsonl(folder / "pairs.jsonl", pairs)
    write_jsonl(folder / "kto.jsonl", [r for record in pairs for r in unpaired(record)])
    write_jsonl(folder / "eval-pairs.jsonl", [pair(rng, p) for p in test])
    return test, folder / "sft.jsonl"


def weak_checkpoint(out: Path, chats: Path, steps: int) -> Path:
    """The demo base after a short LoRA fine-tune on the chats, merged into a model folder (with the tokenizer)."""
    base = demo.base_dir()
    cfg = load_run_config(ROOT / "configs" / "demo-cpu.yaml", [
        f"model={base}", f"output_dir={out / 'sft'}", "method=lora", f"train.steps={steps}",
        f"data.paths=[{chats}]", "eval_data=null"])
    summary = sft.run(cfg, overwrite=True)
    model_cfg, params = from_pretrained(base)
    params = load_adapter(summary["export"], params)
    return write_export(out / "weak", merge(params), load_tokenizer(base), model_cfg=model_cfg, overwrite=True,
                        chat_template=load_tokenizer(base).chat_template)


def exact_match(folder: Path, test, adapter: str | None = None) -> float:
    """Greedy exact match of the model in ``folder`` (with ``adapter``) on its NF4 base, as the QLoRA runs train."""
    model_cfg, params = from_pretrained(folder, quant="nf4")
    if adapter:
        params = load_adapter(adapter, params)
    return demo.exact_match(model_cfg, params, load_tokenizer(folder), test)[0]


def train(config: str, sets: list[str], weak: Path, data: Path, run_dir: Path, steps: int | None) -> tuple:
    """(summary, seconds, steps) of one run of a ``configs/`` file on the weak checkpoint and this script's data."""
    sets = [*sets, f"model={weak}", f"output_dir={run_dir}", f"data.paths=[{data}]"] + (
        [f"train.steps={steps}"] if steps else [])
    cfg = load_run_config(ROOT / "configs" / config, sets)
    start = time.perf_counter()
    summary = sft.run(cfg, overwrite=True)
    return summary, round(time.perf_counter() - start, 1), cfg.train.steps


def preference_run(name: str, weak: Path, data: Path, out: Path, steps: int | None, test) -> dict:
    config, sets = CONFIGS[name]
    records = data / ("kto.jsonl" if name == "kto" else "pairs.jsonl")
    run_dir = out / "runs" / name.replace(" ", "").replace("(", "-").replace(")", "")
    summary, seconds, steps = train(config, sets, weak, records, run_dir, steps)
    return {"method": name, "steps": steps, "seconds": seconds,
            "exact_match_after": exact_match(weak, test, summary["export"])}


def reward_run(weak: Path, data: Path, out: Path, steps: int | None) -> dict:
    """A reward model on the same pairs: how often it scores the right answer above the near miss (held out)."""
    summary, seconds, steps = train("reward-demo.yaml", [f"eval_data={{paths: [{data / 'eval-pairs.jsonl'}], "
                                                         "max_length: 24, batch_size: 16}"],
                                    weak, data / "pairs.jsonl", out / "runs" / "reward", steps)
    return {"method": "reward model", "steps": steps, "seconds": seconds, "accuracy": summary["eval"]["accuracy"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="jaxft-preference", help="data and run folder (default: ./jaxft-preference)")
    parser.add_argument("--steps", type=int, help="train steps of every preference run (default: each config's)")
    parser.add_argument("--sft-steps", type=int, default=140,
                        help="the weak fine-tune's steps (default 140: about half the held-out problems right)")
    parser.add_argument("--pairs", type=int, default=2000, help="preference pairs to train on (default 2000)")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "preference.json"))
    args = parser.parse_args(argv)
    out, cfg = Path(args.out), demo.DemoConfig()
    if not (demo.base_dir() / "config.json").exists():
        demo.build_base(demo.base_dir(), cfg)
    test, chats = write_data(out / "data", cfg, args.pairs)
    weak = weak_checkpoint(out, chats, args.sft_steps)
    before = exact_match(weak, test)
    rows = [{**preference_run(name, weak, out / "data", out, args.steps, test), "exact_match_before": before}
            for name in CONFIGS]
    print(f"| method | steps | seconds | exact match ({len(test)} held-out problems) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['steps']} | {r['seconds']} | {before:.3f} -> {r['exact_match_after']:.3f} |")
    reward = reward_run(weak, out / "data", out, args.steps)
    print(f"reward model: held-out pair accuracy {reward['accuracy']:.3f} ({reward['steps']} steps, "
          f"{reward['seconds']} s)")
    Path(args.json).write_text(json.dumps({"cpu": cpu_info(), "rows": rows + [reward]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
