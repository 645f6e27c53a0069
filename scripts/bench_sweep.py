"""Benchmark: K LoRA configurations in one compiled program (``run_parallel``) vs K sequential runs, in one run.

Workloads (``--workload``):

* ``demo``: the QLoRA demo (``jaxft demo``'s NF4 base, task and run config) swept over K configs, r in
  {4, 8, 16, 32} x lora_alpha in {r, 2r} (K = 8). Wall time of ``run_parallel`` against the K ``sft.run`` calls one
  after another, each including loading, compilation, training, evaluation and export. The parallel program goes
  first, so whatever warms up in the process (imports, file caches) favours the sequential runs.
* ``bench-32m``: the model of ``scripts/bench_train.py`` (vocab 8192, hidden 512, intermediate 1408, 8 layers, 8/4
  heads, float32, random 8 x 256 batches; NF4 base with ``--method qlora``): one step of K stacked adapters against
  K single-adapter steps, compile time and median step time after a warmup step.
* ``demo-step``: the same step comparison on the demo's NF4 base with random 32 x 64 batches.

All use ``jaxft.train.multi.default_group()`` members vmapped together (one at a time on CPU, all elsewhere) unless
``--group`` says otherwise (0 = all members vmapped at once).

The machine's load average (1 minute) is recorded before and after each phase: timings on a shared machine are
only comparable when it stays well under the core count.

    python scripts/bench_sweep.py --workload demo --steps 300
    python scripts/bench_sweep.py --workload bench-32m --members 4
    python scripts/bench_sweep.py --workload demo-step --steps 20 --group 1
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_train import CONFIGS, timed_steps  # scripts/ is on sys.path when a script in it runs

ROOT = Path(__file__).resolve().parents[1]
GRID = [(r, alpha) for r in (4, 8, 16, 32) for alpha in (r, 2 * r)]
BENCH_32M = CONFIGS["bench-32m"]["model"]


def load() -> float:
    return round(os.getloadavg()[0], 2)


def timed(fn):
    """(result, seconds, load average before, after)."""
    before, start = load(), time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start, before, load()


# ------------------------------------------------------------------------------------------------------ demo

def demo_configs(tmp: Path, steps: int, k: int):
    """The demo's QLoRA run config, once per grid point; builds and caches the demo base if needed."""
    from jaxft.data.config import DataConfig
    from jaxft.peft.lora import LoraConfig
    from jaxft.recipes import demo
    from jaxft.recipes.config import RunConfig, TrainConfig
    from jaxft.train.optim import OptimConfig

    dcfg = demo.DemoConfig()
    base = demo.base_dir(dcfg)
    if not (base / "config.json").exists():
        demo.build_base(base, dcfg)
    rng = np.random.default_rng(dcfg.seed + 1)
    test = demo.problems(rng, dcfg.n_eval, dcfg)
    train = demo.problems(rng, dcfg.n_train, dcfg, exclude=frozenset(test))
    demo.write_jsonl(tmp / "train.jsonl", [demo.chat(p) for p in train])
    demo.write_jsonl(tmp / "eval.jsonl", [demo.chat(p) for p in test])
    eval_data = DataConfig(paths=(str(tmp / "eval.jsonl"),), max_length=64, batch_size=dcfg.batch_size, seed=dcfg.seed)
    template = RunConfig(
        model=str(base), output_dir="", method="qlora", data=eval_data.replace(paths=(str(tmp / "train.jsonl"),)),
        eval_data=eval_data, lora=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
        optim=OptimConfig(lr=3e-3, schedule="cosine", warmup_steps=10, total_steps=steps, min_lr_ratio=0.1),
        train=TrainConfig(steps=steps, log_every=10, eval_batches=2, loss_chunk_size=0))
    return [template.replace(output_dir=str(tmp / "{mode}" / f"r{r}-a{alpha}"),
                             lora=template.lora.replace(r=r, lora_alpha=alpha)) for r, alpha in GRID[:k]]


def bench_demo(args) -> dict:
    from jaxft.recipes import sft
    from jaxft.recipes.multi import run_parallel

    with tempfile.TemporaryDirectory() as tmp:
        cfgs = demo_configs(Path(tmp), args.steps, args.members)

        def mode(name):
            return [c.replace(output_dir=c.output_dir.format(mode=name)) for c in cfgs]

        parallel, t_par, load_par0, load_par1 = timed(lambda: run_parallel(mode("parallel")))
        sequential, t_seq, load_seq0, load_seq1 = timed(lambda: [sft.run(c) for c in mode("sequential")])
    members = [{"r": c.lora.r, "lora_alpha": c.lora.lora_alpha,
                "final_loss": {"parallel": p["final_loss"], "sequential": s["final_loss"]},
                "eval_loss": {"parallel": p["eval"]["loss"], "sequential": s["eval"]["loss"]}}
               for c, p, s in zip(cfgs, parallel, sequential)]
    return {"workload": "demo", "method": "qlora", "members": members, "steps": args.steps,
            "parallel_s": t_par, "sequential_s": t_seq, "ratio": t_par / t_seq,
            "max_final_loss_diff": max(abs(m["final_loss"]["parallel"] - m["final_loss"]["sequential"])
                                       for m in members),
            "load_avg_1m": {"parallel": [load_par0, load_par1], "sequential": [load_seq0, load_seq1]}}


# ------------------------------------------------------------------------------------ step timing: bench-32m, demo

def _step_setup(args):
    """(model config, base, one [1, B, T] batch of random ids, members) of a step-timing workload."""
    import jax
    import jax.numpy as jnp

    import jaxft
    from jaxft.ops import nf4
    from jaxft.train import multi

    if args.workload == "demo-step":
        from jaxft.hf.checkpoint import from_pretrained
        from jaxft.recipes import demo

        dcfg = demo.DemoConfig()
        base_dir = demo.base_dir(dcfg)
        if not (base_dir / "config.json").exists():
            demo.build_base(base_dir, dcfg)
        cfg, base = from_pretrained(base_dir, quant="nf4" if args.method == "qlora" else None)
        shape, lr = (1, dcfg.batch_size, 64), 3e-3
    else:
        cfg = jaxft.ModelConfig(**BENCH_32M)
        base = jaxft.init_params(cfg, jax.random.PRNGKey(0))
        if args.method == "qlora":
            for group in base["layers"].values():
                if "kernel" in group:
                    group["kernel"] = nf4.quantize(group["kernel"])
        shape, lr = (1, 8, 256), 2e-4
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, shape)
    batch = {"input_ids": jnp.asarray(ids, jnp.int32), "labels": jnp.asarray(np.roll(ids, -1, -1), jnp.int32)}
    members = [multi.Member(jaxft.LoraConfig(r=r, lora_alpha=a, target_modules="all-linear"), lr=lr, seed=k)
               for k, (r, a) in enumerate(GRID[:args.members])]
    return cfg, base, batch, members


def _time_steps(step, state, n_steps: int):
    """(compile + first step seconds, median seconds of ``n_steps`` steps after one more warmup step)."""
    import jax

    def one():
        nonlocal state
        state, metrics = step(state)
        jax.block_until_ready(metrics)

    first, times = timed_steps(one, 1, n_steps)
    return first, statistics.median(times)


def bench_step(args) -> dict:
    import jax

    import jaxft
    from jaxft.train import loop, multi
    from jaxft.train.objectives import CausalLM
    from jaxft.train.optim import OptimConfig, make_optimizer

    cfg, base, batch, members = _step_setup(args)
    chunk = 0 if args.workload == "demo-step" else 1024  # the demo trains with full logits (vocab of 31)
    step_cfg, ocfg = loop.StepConfig(objective=CausalLM(chunk_size=chunk)), OptimConfig(lr=members[0].lr)
    group = multi.default_group() if args.group is None else (args.group or None)

    def sequential():
        out = []
        for m in members:
            params = jaxft.lora.add(cfg, base, m.lora, jax.random.PRNGKey(m.seed))
            trainable, frozen = jaxft.split(params, m.lora.trainable(cfg, params))  # as the parallel run trains
            optimizer = make_optimizer(dataclasses.replace(ocfg, lr=m.lr))
            step = loop.jit_train_step(cfg, step_cfg, optimizer)
            out.append(_time_steps(lambda s: step(s, frozen, batch), loop.init_state(trainable, optimizer, m.seed),
                                   args.steps))
        return out

    def parallel():
        s = multi.stack(cfg, base, members)
        step = multi.jit_train_step(cfg, step_cfg, multi.member_optimizer(ocfg, 1.0), group=group)
        return _time_steps(lambda st: step(st, s.consts, s.base, batch), multi.init_states(s, members, ocfg),
                           args.steps)

    (par_first, par_step), _, load_par0, load_par1 = timed(parallel)
    seq, _, load_seq0, load_seq1 = timed(sequential)
    tokens = args.members * batch["input_ids"].size
    seq_step = sum(step for _, step in seq)
    return {"workload": args.workload, "method": args.method,
            "members": [dataclasses.asdict(m.lora) | {"lr": m.lr} for m in members],
            "members_vmapped_together": group or args.members,
            "tokens_per_step_all_members": tokens, "timed_steps": args.steps,
            "parallel": {"first_step_s": par_first, "step_s": par_step, "tokens_per_s": tokens / par_step},
            "sequential": {"first_step_s": sum(f for f, _ in seq), "step_s": seq_step,
                           "tokens_per_s": tokens / seq_step, "per_member_step_s": [step for _, step in seq]},
            "step_ratio": par_step / seq_step,
            "load_avg_1m": {"parallel": [load_par0, load_par1], "sequential": [load_seq0, load_seq1]}}


# --------------------------------------------------------------------------------------------------- report

def table(report: dict) -> str:
    k = len(report["members"])
    if report["workload"] == "demo":
        return "\n".join([
            f"| demo QLoRA, K = {k}, {report['steps']} steps each | wall time (incl. compile) |",
            "|---|---|",
            f"| {k} sequential `sft.run` | {report['sequential_s']:.1f} s |",
            f"| one `run_parallel` | {report['parallel_s']:.1f} s |",
            f"| ratio parallel / sequential | **{report['ratio']:.2f}x** |",
            "",
            f"max |final loss parallel - sequential| over members: {report['max_final_loss_diff']:.2e}; "
            f"load avg (1 min) before/after: {report['load_avg_1m']}"])
    par, seq = report["parallel"], report["sequential"]
    return "\n".join([
        f"| {report['workload']} {report['method']}, K = {k}, {report['members_vmapped_together']} vmapped together "
        "| compile + first step | step | tokens/s (all members) |",
        "|---|---|---|---|",
        f"| {k} sequential single-adapter steps | {seq['first_step_s']:.1f} s | {seq['step_s']:.2f} s | "
        f"{seq['tokens_per_s']:.0f} |",
        f"| one step of {k} stacked adapters | {par['first_step_s']:.1f} s | {par['step_s']:.2f} s | "
        f"{par['tokens_per_s']:.0f} |",
        f"| ratio parallel / sequential | | **{report['step_ratio']:.2f}x** | |",
        "",
        f"load avg (1 min) before/after: {report['load_avg_1m']}"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=("demo", "bench-32m", "demo-step"), default="demo")
    parser.add_argument("--members", type=int, default=8, help=f"K configs, the first K of (r, alpha) {GRID}")
    parser.add_argument("--steps", type=int, help="demo: train steps per run (default 300, the demo's); "
                                                  "bench-32m / demo-step: timed steps (default 3)")
    parser.add_argument("--method", choices=("lora", "qlora"), default="qlora", help="step workloads' base: dense or NF4")
    parser.add_argument("--group", type=int, help="members vmapped together per step (0 = all; default: "
                                                  "multi.default_group(), 1 on CPU)")
    parser.add_argument("--out", help="JSON path (default bench/results/sweep_<workload>.json)")
    args = parser.parse_args()
    if not 1 <= args.members <= len(GRID):
        parser.error(f"--members must be in [1, {len(GRID)}]")
    args.steps = args.steps or (300 if args.workload == "demo" else 3)
    import jax

    report = bench_demo(args) if args.workload == "demo" else bench_step(args)
    report.update(machine={"platform": platform.platform(), "cpus": os.cpu_count(),
                           "device": str(jax.devices()[0].device_kind), "jax": jax.__version__},
                  command=" ".join(["python scripts/bench_sweep.py", *sys.argv[1:]]))
    out = Path(args.out or ROOT / "bench" / "results" / f"sweep_{args.workload}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(table(report))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
