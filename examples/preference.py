"""Preference tuning on the demo task: from a weakly fine-tuned checkpoint, on pairs of the right answer against
the checkpoint's own wrong answers, which methods raise greedy exact match on held-out problems?

    python examples/preference.py [--out jaxft-preference] [--steps N]

1. the demo's cached base (``jaxft demo`` builds it; built here on first use) is fine-tuned weakly with LoRA on the
   demo's chats (``--sft-steps``) and merged into ``OUT/weak`` (the checkpoint to improve, and the reference);
2. on-policy pairs: the weak checkpoint answers ``--pairs`` training problems greedily, and each wrong answer
   becomes the rejected reply of a pair whose chosen reply is the right one (the pairs a user makes by sampling a
   model and checking its answers): ``pairs.jsonl``, the same unpaired for KTO (``kto.jsonl``), the chosen replies
   alone as chats (``chosen.jsonl``), and pairs made so from the held-out problems (``eval-pairs.jsonl``, scored
   by the reward model only);
3. each method trains LoRA on ``OUT/weak`` from its config in ``configs/`` (``--steps`` each), beside a control
   with the same steps, learning rate and batch: SFT on the chosen replies alone; greedy exact match on the
   held-out problems (disjoint from training) is compared with the weak checkpoint's.

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

SFT_CONTROL = ["method=qlora", "data.max_length=24", "data.batch_size=16", "optim.lr=3e-4", "train.steps=100",
               "eval_data=null"]  # demo-cpu.yaml set as the preference configs train
METHODS = {  # name: (config, --set overrides, data file)
    "sft on the chosen replies": ("demo-cpu.yaml", SFT_CONTROL, "chosen.jsonl"),
    "dpo (sigmoid)": ("dpo-demo.yaml", ["task.loss_type=sigmoid"], "pairs.jsonl"),
    "dpo (sigmoid + sft: RPO)": ("dpo-demo.yaml", [], "pairs.jsonl"),
    "dpo (ipo, beta 1)": ("dpo-demo.yaml", ["task.loss_type=ipo", "task.beta=1.0"], "pairs.jsonl"),
    "dpo (ipo + sft, beta 1)": ("dpo-demo.yaml", ["task.loss_type=[ipo, sft]", "task.beta=1.0"], "pairs.jsonl"),
    "orpo": ("orpo-demo.yaml", [], "pairs.jsonl"),
    "simpo": ("simpo-demo.yaml", [], "pairs.jsonl"),
    "simpo + nll (CPO-SimPO)": ("simpo-demo.yaml", ["task.nll_weight=1.0"], "pairs.jsonl"),
    "kto": ("kto-demo.yaml", [], "kto.jsonl"),
}


def on_policy_pairs(problems, replies) -> list[dict]:
    """A pair per problem the model answered wrong (and not with nothing: an empty completion has no token to
    score; nor with the right text left unfinished, which would pair the right answer with itself): the right
    answer chosen, the model's own answer rejected."""
    out = []
    for p, (text, finished) in zip(problems, replies):
        right = demo.words(demo.answer(p))
        if text and text != right:
            out.append({"prompt": [{"role": "user", "content": f"increment {demo.words(p)}"}],
                        "chosen": [{"role": "assistant", "content": right}],
                        "rejected": [{"role": "assistant", "content": text}]})
    return out


def unpaired(record: dict) -> list[dict]:
    """KTO's form of a pair: the chosen reply desirable, the rejected one not."""
    return [{"prompt": record["prompt"], "completion": record["chosen"], "label": True},
            {"prompt": record["prompt"], "completion": record["rejected"], "label": False}]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def problems(cfg: demo.DemoConfig, n_pairs: int) -> tuple[list, list, list]:
    """(held-out problems, SFT problems, problems to make pairs of): disjoint."""
    rng = np.random.default_rng(cfg.seed + 2)
    test = demo.problems(rng, cfg.n_eval, cfg)
    train = demo.problems(rng, cfg.n_train + n_pairs, cfg, exclude=frozenset(test))
    return test, train[:cfg.n_train], train[cfg.n_train:]


def write_pairs(folder: Path, weak: Path, pair_problems, test) -> dict:
    """pairs.jsonl, kto.jsonl, chosen.jsonl and eval-pairs.jsonl from the weak checkpoint's greedy answers (module
    docstring); returns how many pairs each split got."""
    model_cfg, params = from_pretrained(weak, quant="nf4")
    tokenizer = load_tokenizer(weak)
    pairs, held_out = (on_policy_pairs(ps, demo.greedy_replies(model_cfg, params, tokenizer, ps))
                       for ps in (pair_problems, test))
    write_jsonl(folder / "pairs.jsonl", pairs)
    write_jsonl(folder / "kto.jsonl", [r for record in pairs for r in unpaired(record)])
    write_jsonl(folder / "chosen.jsonl", [{"messages": r["prompt"] + r["chosen"]} for r in pairs])
    write_jsonl(folder / "eval-pairs.jsonl", held_out)
    return {"train_pairs": len(pairs), "eval_pairs": len(held_out)}


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


def method_run(name: str, weak: Path, data: Path, out: Path, steps: int | None, test) -> dict:
    config, sets, records = METHODS[name]
    run_dir = out / "runs" / "".join(c if c.isalnum() else "-" for c in name)
    summary, seconds, steps = train(config, sets, weak, data / records, run_dir, steps)
    return {"method": name, "steps": steps, "seconds": seconds,
            "exact_match_after": exact_match(weak, test, summary["export"])}


def reward_run(weak: Path, data: Path, out: Path, steps: int | None) -> dict:
    """A reward model on the same pairs: how often it scores the right answer above the weak checkpoint's wrong one
    on the held-out problems."""
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
    parser.add_argument("--pairs", type=int, default=2000,
                        help="training problems the weak checkpoint answers; its wrong answers make the pairs (2000)")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "preference.json"))
    args = parser.parse_args(argv)
    out, cfg = Path(args.out), demo.DemoConfig()
    if not (demo.base_dir() / "config.json").exists():
        demo.build_base(demo.base_dir(), cfg)
    test, sft_problems, pair_problems = problems(cfg, args.pairs)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    demo.write_jsonl(data / "sft.jsonl", [demo.chat(p) for p in sft_problems])
    weak = weak_checkpoint(out, data / "sft.jsonl", args.sft_steps)
    counts = write_pairs(data, weak, pair_problems, test)
    print(f"pairs: {counts['train_pairs']} of {len(pair_problems)} training problems answered wrong by the weak "
          f"checkpoint, {counts['eval_pairs']} of {len(test)} held-out")
    before = exact_match(weak, test)
    rows = [{**method_run(name, weak, data, out, args.steps, test), "exact_match_before": before}
            for name in METHODS]
    print(f"| method | steps | seconds | exact match ({len(test)} held-out problems) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['steps']} | {r['seconds']} | {before:.3f} -> {r['exact_match_after']:.3f} |")
    reward = reward_run(weak, data, out, args.steps)
    print(f"reward model: held-out pair accuracy {reward['accuracy']:.3f} ({reward['steps']} steps, "
          f"{reward['seconds']} s)")
    Path(args.json).write_text(json.dumps({"cpu": cpu_info(), **counts, "rows": rows + [reward]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
