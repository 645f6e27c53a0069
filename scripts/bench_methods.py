"""Benchmark: every PEFT method on the demo task, with the same NF4 base, data, batch and steps.

The demo (``jaxft demo``): a tiny Llama-style base pretrained on ``increment 3 1 9 4 =`` lines, stored in NF4, is
fine-tuned to answer the same problems as ChatML chats; held-out problems are scored by greedy exact match. Each
method starts from ``configs/demo-cpu.yaml`` (QLoRA: its ``quant`` and optimizer, with ``peft: [{type: <method>}]``
in place of the LoRA shorthand) and trains at the learning rate its users use: 3e-3 for LoRA, DoRA, LoHa and LoKr
(the demo's), 1e-2 for IA3 and LN-tuning (a handful of scaling vectors), 3e-2 for the prompt-style methods (prompt,
P- and prefix tuning: only virtual tokens move).

BitFit is left out: it trains the base's biases, and Llama's linears have none.

Per method: trainable params (summary.json, PEFT's count) and their share of base + trainable; the median train
step time of metrics.jsonl after its first logged window; XLA's ``memory_analysis()`` peak of the compiled step
and the wall time of that ``lower().compile()`` (``jaxft inspect --compile``'s function); eval loss (the held-out
chats' answer tokens) and greedy exact match, before (the NF4 base) and after training. Prints a markdown table
and writes JSON and a plot of exact match against trainable params.

    python scripts/bench_methods.py                      # all methods, 300 steps
    python scripts/bench_methods.py --methods lora,ia3 --steps 20 --out /tmp/methods.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_train import cpu_info, cpu_label  # scripts/ is on sys.path when a script in it runs

ROOT = Path(__file__).resolve().parents[1]
RUN_CONFIG = ROOT / "configs" / "demo-cpu.yaml"
ALL_LINEAR = {"r": 8, "target_modules": "all-linear"}
VIRTUAL_TOKENS = {"num_virtual_tokens": 20}
# name -> (peft entry, learning rate)
METHODS = {
    "lora": ({"type": "lora", **ALL_LINEAR, "lora_alpha": 16}, 3e-3),
    "dora": ({"type": "lora", **ALL_LINEAR, "lora_alpha": 16, "use_dora": True}, 3e-3),
    "loha": ({"type": "loha", **ALL_LINEAR, "alpha": 16}, 3e-3),
    "lokr": ({"type": "lokr", **ALL_LINEAR, "alpha": 16}, 3e-3),
    "ia3": ({"type": "ia3"}, 1e-2),  # PEFT's Llama targets: k_proj, v_proj, down_proj (feed-forward)
    "ln_tuning": ({"type": "ln_tuning"}, 1e-2),
    "prompt_tuning": ({"type": "prompt_tuning", **VIRTUAL_TOKENS}, 3e-2),
    "p_tuning": ({"type": "p_tuning", **VIRTUAL_TOKENS}, 3e-2),
    "prefix_tuning": ({"type": "prefix_tuning", **VIRTUAL_TOKENS}, 3e-2),
}
LEFT_OUT = {"bitfit": "trains the base's biases; the demo base is Llama, whose linears have no biases"}


def run_config(method: str, data_dir: Path, out_dir: Path, steps: int):
    """configs/demo-cpu.yaml with ``method``'s peft entry and learning rate, on the demo base and data here."""
    from jaxft.config import from_dict
    from jaxft.recipes import demo
    from jaxft.recipes.config import RunConfig, read_run_tree

    entry, lr = METHODS[method]
    tree = read_run_tree(RUN_CONFIG)
    for shorthand in ("method", "lora"):
        tree.pop(shorthand)
    tree.update(model=str(demo.base_dir()), output_dir=str(out_dir / method), peft=[dict(entry)])
    tree["data"]["paths"] = [str(data_dir / "train.jsonl")]
    tree["eval_data"]["paths"] = [str(data_dir / "eval.jsonl")]
    tree["optim"]["lr"] = lr
    tree["train"]["steps"] = steps
    # the demo warms up for 10 of its 300 steps; a shorter run (a smoke test) keeps that share
    tree["optim"]["warmup_steps"] = min(tree["optim"]["warmup_steps"], steps // 30)
    return from_dict(RunConfig, tree, source=f"{RUN_CONFIG} with peft {method}")


def median_step_time(metrics_path: Path) -> float | None:
    """Median of the logged step times after the first logged window (which still holds warm-up noise)."""
    from jaxft.train.metrics import read_metrics

    times = [r["step_time_s"] for r in read_metrics(metrics_path) if r["split"] == "train" and "step_time_s" in r]
    times = times[1:] or times
    return statistics.median(times) if times else None


def measure(method: str, data_dir: Path, out_dir: Path, steps: int, base: dict) -> dict:
    """Compile (timed, with its memory analysis), train, and score one method."""
    import jax

    from jaxft.analysis.memory import compiled_memory
    from jaxft.hf.peft_format import load_adapter
    from jaxft.parallel import MeshConfig
    from jaxft.recipes import demo, sft

    cfg = run_config(method, data_dir, out_dir, steps)
    start = time.perf_counter()
    memory = compiled_memory(cfg, MeshConfig(1, 1, 1), jax.devices()[:1])
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    summary = sft.run(cfg, overwrite=True)
    train_s = time.perf_counter() - start
    params = load_adapter(summary["export"], base["params"], base["model_cfg"])  # prefix shapes need the heads
    after, _ = demo.exact_match(base["model_cfg"], params, base["tokenizer"], base["test"])
    trainable = summary["trainable_params"]
    return {"method": method, "peft": METHODS[method][0], "lr": METHODS[method][1], "trainable_params": trainable,
            "trainable_pct": 100 * trainable / (trainable + base["n_params"]),
            "step_time_s": median_step_time(Path(cfg.output_dir) / "metrics.jsonl"),
            "peak_bytes": memory["peak"], "memory_analysis": memory, "compile_s": compile_s, "train_s": train_s,
            "final_loss": summary["final_loss"], "eval_loss": summary["eval"]["loss"],
            "exact_match": after}


def demo_task(data_dir: Path) -> dict:
    """The demo's NF4 base (built and cached on first use), its held-out problems, and the chats on disk."""
    import jax

    from jaxft.hf.checkpoint import from_pretrained
    from jaxft.hf.tokenizer import load_tokenizer
    from jaxft.ops import nf4
    from jaxft.recipes import demo

    dcfg = demo.DemoConfig()
    if not (demo.base_dir(dcfg) / "config.json").exists():
        demo.build_base(demo.base_dir(dcfg), dcfg)
    test, train = demo.held_out_split(dcfg)
    demo.write_jsonl(data_dir / "train.jsonl", [demo.chat(p) for p in train])
    demo.write_jsonl(data_dir / "eval.jsonl", [demo.chat(p) for p in test])
    model_cfg, params = from_pretrained(demo.base_dir(dcfg), quant="nf4")
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nf4.QuantizedTensor))
    return {"model_cfg": model_cfg, "params": params, "tokenizer": load_tokenizer(demo.base_dir(dcfg)),
            "test": test, "n_params": sum(math.prod(x.shape) for x in leaves)}


def table(report: dict) -> str:
    """The results as a markdown table, the base's score first."""
    lines = ["| method | lr | trainable params | % of total | step ms (median) | peak MiB (compiled step) "
             "| compile s | eval loss | exact match |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| base (NF4), before | - | 0 | 0 | - | - | - | {report['before_eval_loss']:.3f} "
             f"| {100 * report['before_exact_match']:.1f}% |"]
    for row in report["methods"]:
        step = "-" if row["step_time_s"] is None else f"{1000 * row['step_time_s']:.0f}"
        lines.append(f"| {row['method']} | {row['lr']:g} | {row['trainable_params']:,} | {row['trainable_pct']:.2f}% "
                     f"| {step} | {row['peak_bytes'] / 2**20:.1f} | {row['compile_s']:.1f} | {row['eval_loss']:.3f} "
                     f"| {100 * row['exact_match']:.1f}% |")
    return "\n".join(lines)


def plot(report: dict, png: Path) -> None:
    """Exact match against trainable params (log x), one labelled point per method; the base as a dashed line."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    rows = sorted(report["methods"], key=lambda row: row["trainable_params"])
    for i, row in enumerate(rows):  # neighbours' labels alternate above and below: close points stay readable
        ax.scatter(row["trainable_params"], 100 * row["exact_match"])
        ax.annotate(row["method"], (row["trainable_params"], 100 * row["exact_match"]),
                    textcoords="offset points", xytext=(3, 5 if i % 2 == 0 else -13), fontsize=8)
    ax.axhline(100 * report["before_exact_match"], linestyle="--", color="gray", label="NF4 base, before")
    ax.set(xscale="log", xlabel="trainable params", ylabel="exact match, held-out (%)", ylim=(-8, 106),
           title=f"PEFT methods on the demo task ({report['steps']} steps, NF4 base)")
    ax.legend(loc="center left")
    fig.savefig(png, dpi=100)


def run(methods: list[str], steps: int) -> dict:
    from jaxft.recipes import demo
    from jaxft.recipes.scoring import data_metrics

    load_start = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        data_dir.mkdir()
        base = demo_task(data_dir)
        before, _ = demo.exact_match(base["model_cfg"], base["params"], base["tokenizer"], base["test"])
        eval_data = run_config(methods[0], data_dir, Path(tmp), steps).eval_data  # every method's is the same
        before_loss = data_metrics(base["model_cfg"], base["params"], base["tokenizer"], eval_data)["loss"]
        for method in methods:
            print(f"{method}:", file=sys.stderr, flush=True)
            rows.append(measure(method, data_dir, Path(tmp) / "runs", steps, base))
    return {"benchmark": "PEFT methods on the demo task", "steps": steps, "n_eval": len(base["test"]),
            "base_params": base["n_params"], "before_exact_match": before, "before_eval_loss": before_loss, "methods": rows, "left_out": LEFT_OUT,
            "run_config": str(RUN_CONFIG.relative_to(ROOT)),
            "load_average_1_5_15": {"start": load_start, "end": os.getloadavg()},
            "machine": {"cpus": os.cpu_count(), "cpu": cpu_info(), "python": platform.python_version(),
                        "platform": platform.platform()},
            "command": " ".join(["python", *sys.argv])}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="train steps of every method (the demo's: 300)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {list(METHODS)}")
    parser.add_argument("--out", default="bench/results/methods.json", help="JSON path; the plot goes beside it "
                                                                           "with .png")
    args = parser.parse_args(argv)
    args.methods = args.methods.split(",")
    for method in args.methods:
        if method in LEFT_OUT:
            parser.error(f"--methods {method}: left out: it {LEFT_OUT[method]}")
        if method not in METHODS:
            parser.error(f"--methods {method!r} unknown; choose from {list(METHODS)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    report = run(args.methods, args.steps)
    print(f"\nCPU: {cpu_label(report['machine']['cpu'])}; {report['steps']} steps, exact match on "
          f"{report['n_eval']} held-out problems\n")
    print(table(report))
    for method, why in LEFT_OUT.items():
        print(f"\n{method} left out: it {why}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
