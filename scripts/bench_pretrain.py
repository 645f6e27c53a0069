"""Benchmark: the pretraining recipe's throughput at three model sizes, against transformers + PyTorch.

    python scripts/bench_pretrain.py [--sizes s,m,l] [--steps 12] [--work ~/.cache/jaxft/pretrain_stdlib]

The corpus and tokenizer are ``examples/pretrain_stdlib/run.py``'s (the standard library's source, a byte-level
BPE of 8192 ids); each size is the example's run config (``task: pretrain``, concatenated rows of 256 tokens,
16 rows a step, float32) with the model's width and depth changed (``bench_train.PRETRAIN_SIZES``), run for
``--steps`` steps by ``jaxft train``'s function in a fresh process: tokens/s is the recipe's own (the median step
after the first, data streaming included), and MFU its ``summary.json``'s (model FLOPs per token over a measured
float32 matmul peak). The reference, in a fresh process per size, is ``scripts/bench_train.py``'s full-training
step of transformers' ``LlamaForCausalLM`` with the same shapes and batch (its default ``sdpa`` attention, AdamW,
random ids: the cost does not depend on the ids), so the ratio is jaxft's tokens/s over PyTorch's, measured in the
same run. Both MFU columns divide by one peak, the best float32 matmul either stack reached in the run (the
recipe's start-up measurement and PyTorch's), so they compare as the tokens/s do. Prints a table and writes
``bench/results/pretrain_sizes.json`` with the CPU model.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import bench_train  # noqa: E402  (the reference's worker, CPU record and pinning)

from jaxft.files import cache_root, write_text_atomic  # noqa: E402

RESULT = "PRETRAIN_RESULT "


def example_module():
    """``examples/pretrain_stdlib/run.py`` as a module: its corpus, tokenizer and run config."""
    spec = importlib.util.spec_from_file_location("pretrain_stdlib", ROOT / "examples" / "pretrain_stdlib" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def size_overrides(size: str) -> list[str]:
    """``--set`` overrides that give the example's config the model of ``size``."""
    model = bench_train.CONFIGS[bench_train.PRETRAIN_SIZES[size]]["model"]
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    return [f"model.{key}={model[key]}" for key in keys]


def recipe_worker(args) -> None:
    """One size's recipe run in this (fresh) process; prints its summary's numbers."""
    example = example_module()
    work = Path(args.work)
    tokenizer_size = len(example.load_tokenizer(work / "tokenizer"))
    sets = [*size_overrides(args.size), f"train.steps={args.steps}", f"output_dir={work / f'bench-{args.size}'}",
            "train.eval_every=0", f"train.log_every={args.steps}", "optim.warmup_steps=1"]
    cfg = example.run_config(work, tokenizer_size, sets).replace(eval_data=None)
    summary = example.sft.run(cfg, overwrite=True)
    keys = ("trainable_params", "tokens_per_s", "mfu", "flops_per_token", "peak_flops", "peak_flops_source",
            "final_loss", "step_time_s")
    print(RESULT + json.dumps({k: summary.get(k) for k in keys}), flush=True)


def spawn_recipe(args, size: str) -> dict:
    command = [sys.executable, __file__, "--worker", "--size", size, "--steps", str(args.steps), "--work",
               str(args.work)]
    env = {**bench_train.jax_env(), "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT,
                          preexec_fn=bench_train.pinned(args.threads))
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode or not lines:
        raise SystemExit(f"recipe worker for size {size} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len(RESULT):])


def spawn_reference(args, size: str) -> dict:
    """transformers' full-training step at ``size``'s shapes, by bench_train's torch worker."""
    ns = argparse.Namespace(config=bench_train.PRETRAIN_SIZES[size], steps=args.steps, warmup=2,
                            threads=args.threads, loss_chunk=0, baseline=None)
    return bench_train.spawn(ns, "torch", "full")


def row(size: str, jaxft: dict, torch: dict, peak_flops: float) -> dict:
    """One size's numbers. Both MFUs divide by one peak, the machine's (so their ratio is the speed ratio); the
    recipe's own MFU over the peak it measured at its start is kept beside them."""
    flops = jaxft["flops_per_token"]
    return {"size": size, "params": jaxft["trainable_params"], "flops_per_token": flops,
            "jaxft_tokens_per_s": jaxft["tokens_per_s"], "jaxft_mfu": jaxft["tokens_per_s"] * flops / peak_flops,
            "jaxft_summary_mfu": jaxft["mfu"], "jaxft_summary_peak_flops": jaxft["peak_flops"],
            "torch_tokens_per_s": torch["tokens_per_s"], "torch_mfu": torch["tokens_per_s"] * flops / peak_flops,
            "ratio": jaxft["tokens_per_s"] / torch["tokens_per_s"], "jaxft_final_loss": jaxft["final_loss"]}


def print_table(rows: list[dict]) -> None:
    print("| size | params | jaxft tokens/s | jaxft MFU | PyTorch tokens/s | PyTorch MFU | jaxft / PyTorch |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['params'] / 1e6:.1f}M | {r['jaxft_tokens_per_s']:.0f} | {r['jaxft_mfu']:.1%} | "
              f"{r['torch_tokens_per_s']:.0f} | {r['torch_mfu']:.1%} | {r['ratio']:.2f} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="s,m,l",
                        help=f"comma-separated subset of {sorted(bench_train.PRETRAIN_SIZES)}")
    parser.add_argument("--steps", type=int, default=12, help="steps per run (timed: all after the first)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default=str(cache_root() / "pretrain_stdlib"),
                        help="the example's corpus and tokenizer (made when absent)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "pretrain_sizes.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.work = Path(args.work).expanduser()
    if args.worker:
        recipe_worker(args)
        return 0
    sizes = args.sizes.split(",")
    unknown = set(sizes) - set(bench_train.PRETRAIN_SIZES)
    if unknown:
        parser.error(f"--sizes {sorted(unknown)} unknown; choose from {sorted(bench_train.PRETRAIN_SIZES)}")
    if not (args.work / "tokenizer" / "tokenizer.json").exists():
        example_module().prepare(args.work, 8192, 0.05)
    load = os.getloadavg()
    peak_args = argparse.Namespace(config=bench_train.PRETRAIN_SIZES[sizes[0]], threads=args.threads)
    torch_peak = bench_train.spawn_peak(peak_args, "torch") * 1e9
    runs = {size: (spawn_recipe(args, size), spawn_reference(args, size)) for size in sizes}
    peak = max([torch_peak, *(jaxft["peak_flops"] for jaxft, _ in runs.values())])  # the best matmul either reached
    rows = [row(size, jaxft, torch, peak) for size, (jaxft, torch) in runs.items()]
    print_table(rows)
    report = {"benchmark": "pretraining recipe by model size", "steps": args.steps, "threads": args.threads,
              "peak_flops": peak, "torch_matmul_peak_flops": torch_peak, "rows": rows, "cpu": bench_train.cpu_info(),
              "load_average_1_5_15": {"start": load, "end": os.getloadavg()},
              "versions": bench_train.versions("torch"), "command": " ".join(["python", *sys.argv])}
    write_text_atomic(Path(args.out), json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
