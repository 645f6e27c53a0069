"""Benchmark: LoRA / QLoRA / full fine-tuning train steps in jaxft vs PyTorch + PEFT (+ bitsandbytes), in one run.

Every measurement runs in its own subprocess (so peak RSS and threads are that stack's own): a fresh process
builds the model, compiles (jaxft) or takes a first eager step (torch), takes ``--warmup`` more steps, then times
``--steps`` steps. Runs alternate (jaxft, torch), (torch, jaxft), ... ``--pairs`` times; the reported ratio is the
median of the per-pair ratios jaxft tokens/s / reference tokens/s, so machine load drifting hits both sides.

Workloads (``--config``):

* ``bench-32m``: Llama-style, vocab 8192, hidden 512, intermediate 1408, 8 layers, 8 heads / 4 KV heads, untied
  embeddings, float32, batch 8 x 256 random ids, 2 threads, full logits (``CausalLM(chunk_size=0)``: [2048, 8192]
  float32 logits are 64 MiB, and chunking them would only add a recomputation of the lm_head matmul, ~6% of the
  step's FLOPs; PyTorch materializes them too). ``lora``: r=16, alpha=32 on all 7 linears per block,
  AdamW on the adapters; ``qlora``: the same on an NF4 + double-quant base (bitsandbytes on the reference side);
  ``full``: AdamW on every parameter.
* ``1b``: Llama-3.2-1B shapes (tied embeddings, llama3 RoPE), bfloat16, batch 4 x 2048, chunked cross-entropy
  (1024 tokens: full logits would be 4 GiB): for a GPU or TPU.

FLOPs per token: full training (and the 6N-MFU column) is jaxft's model FLOPs (``jaxft.train.flops``: PaLM's
6 per non-embedding weight plus attention scores and values, 12 * layers * heads * head_dim * T, forward + backward,
no causal discount); LoRA counts matmuls only, a frozen base linear 4 per weight (forward + input gradient), a
trained one 6, plus the same attention.
MFU is achieved FLOP/s over the peak of a 2048^2 float32 matmul measured in this run on the same stack (JAX for
jaxft, PyTorch for the reference; best of the runs), so each side is judged against what its own matmul reaches on
this CPU. The CPU model (``lscpu``, else ``/proc/cpuinfo``) is recorded with the results: the jaxft / PyTorch
ratio depends on it (XLA:CPU and PyTorch's oneDNN/MKL kernels are tuned differently per microarchitecture). The
reference uses PyTorch's default attention, ``sdpa`` (``scaled_dot_product_attention``).

    python scripts/bench_train.py --workloads lora,qlora,full --pairs 3
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIGS = {
    "bench-32m": dict(model=dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                                 num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False,
                                 rms_norm_eps=1e-5, max_position_embeddings=2048),
                      dtype="float32", batch=8, seq=256, loss_chunk=0),
    "1b": dict(model=dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                          num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                          rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072),
               rope=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                         original_max_position_embeddings=8192),
               dtype="bfloat16", batch=4, seq=2048, loss_chunk=1024),
}
CONFIGS["tiny"] = dict(model=dict(CONFIGS["bench-32m"]["model"], vocab_size=256, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2), dtype="float32", batch=2, seq=32, loss_chunk=0)  # smoke tests
# The pretraining example's model (examples/pretrain_stdlib/pretrain-cpu.yaml: vocab 8192, tied embeddings, 16 rows
# of 256 tokens) at three widths and depths: scripts/bench_pretrain.py's sizes and their PyTorch reference.
PRETRAIN_SIZES = {"s": "pretrain-s", "m": "pretrain-m", "l": "pretrain-l"}
for _name, (_hidden, _intermediate, _layers, _heads) in {"pretrain-s": (128, 352, 2, 2), "pretrain-m": (256, 704, 4, 4),
                                                        "pretrain-l": (512, 1408, 8, 8)}.items():
    CONFIGS[_name] = dict(model=dict(vocab_size=8192, hidden_size=_hidden, intermediate_size=_intermediate,
                                     num_hidden_layers=_layers, num_attention_heads=_heads,
                                     num_key_value_heads=_heads, tie_word_embeddings=True, rms_norm_eps=1e-6,
                                     max_position_embeddings=256),
                          dtype="float32", batch=16, seq=256, loss_chunk=1024)
WORKLOADS = ("lora", "qlora", "full")
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0)
LR = 2e-4
RESULT = "BENCH_RESULT "
REFERENCE_ATTENTION = "sdpa"  # transformers' default: what a PyTorch user trains with
CPU_FLAGS_OF_NOTE = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")
CPU_FIELDS = {"Model name": "model_name", "Vendor ID": "vendor", "CPU family": "family", "Model": "model",
              "Stepping": "stepping", "Hypervisor vendor": "hypervisor", "Flags": "flags"}
CPUINFO_FIELDS = {"model name": "model_name", "vendor_id": "vendor", "cpu family": "family", "model": "model",
                  "stepping": "stepping", "flags": "flags"}


# ------------------------------------------------------------------------------------------------ shared helpers

def random_batch(config: dict, seed: int = 0):
    """[B, T] int64 ids; the same ids on both sides."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.integers(0, config["model"]["vocab_size"], size=(config["batch"], config["seq"]), dtype=np.int64)


def cpu_info(lscpu_text: str | None = None, cpuinfo_text: str | None = None) -> dict:
    """The CPU the numbers were measured on: model name, vendor, family / model / stepping (which name the
    microarchitecture where a VM hides the marketing name), hypervisor, and the SIMD / matrix flags that decide
    matmul speed. From ``lscpu``, else ``/proc/cpuinfo``; texts can be passed in (tests)."""
    if lscpu_text is None and cpuinfo_text is None:
        try:
            lscpu_text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True,
                                        env={**os.environ, "LC_ALL": "C"}).stdout
        except (OSError, subprocess.CalledProcessError):
            cpuinfo_text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    text, fields, source = ((lscpu_text, CPU_FIELDS, "lscpu") if lscpu_text is not None
                            else (cpuinfo_text, CPUINFO_FIELDS, "/proc/cpuinfo"))
    info = {"source": source}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        name = fields.get(key.strip())
        if name and name not in info:  # /proc/cpuinfo repeats every field per CPU: the first one is kept
            info[name] = value.strip()
    flags = set(info.pop("flags", "").split())
    info["flags_of_note"] = [f for f in CPU_FLAGS_OF_NOTE if f in flags]
    info["cpus"] = os.cpu_count()
    return info


def cpu_label(info: dict) -> str:
    """One line naming the CPU, e.g. ``AMD EPYC (family 25, model 17; KVM guest; avx512f ...), 2 CPUs``."""
    details = [f"family {info.get('family', '?')}, model {info.get('model', '?')}"]
    if info.get("hypervisor"):
        details.append(f"{info['hypervisor']} guest")
    details.append(" ".join(info.get("flags_of_note", [])) or "no AVX2")
    return f"{info.get('model_name', 'unknown CPU')} ({'; '.join(details)}), {info.get('cpus')} CPUs"


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def timed_steps(step, n_warmup: int, n_steps: int) -> tuple[float, list[float]]:
    """(seconds of the first call, per-step seconds of the timed steps); ``step()`` must block until done."""
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    for _ in range(n_warmup):
        step()
    times = []
    for _ in range(n_steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return first, times


def model_config(config: dict):
    """The workload's jaxft ModelConfig."""
    from jaxft import ModelConfig, RopeConfig

    rope = RopeConfig(**config["rope"]) if "rope" in config else RopeConfig()
    return ModelConfig(**config["model"], rope=rope, dtype=config["dtype"])


def flops_per_token(config: dict, workload: str) -> dict:
    """Matmul FLOPs per token of one train step: full training is jaxft's model FLOPs (``jaxft.train.flops``, PaLM's
    6N + attention); LoRA counts 4 per frozen weight, 6 per trained one."""
    from jaxft.train import flops

    cfg = model_config(config)
    m = config["model"]
    d, f, layers = m["hidden_size"], m["intermediate_size"], m["num_hidden_layers"]
    hd = m.get("head_dim") or d // m["num_attention_heads"]
    q, kv = m["num_attention_heads"] * hd, m["num_key_value_heads"] * hd
    shapes = [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]
    base = layers * sum(i * o for i, o in shapes) + d * m["vocab_size"]  # lm_head (tied or not) is a matmul
    adapter = layers * sum(LORA["r"] * (i + o) for i, o in shapes)
    attention = flops.attention_flops_per_token(cfg, config["seq"])
    six_n = flops.flops_per_token(cfg, config["seq"])
    if workload == "full":
        model = six_n
    else:
        model = 4 * base + 6 * adapter + attention
    return {"model": model, "6N": six_n, "base_params": base, "adapter_params": adapter,
            "attention": attention}


# ------------------------------------------------------------------------------------------------ jaxft worker

def jax_env() -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=true").strip()
    env.setdefault("JAX_PLATFORMS", "")
    return env


def pinned(threads: int):
    """A subprocess ``preexec_fn`` that limits the worker to ``threads`` CPUs. XLA:CPU has no thread-count flag; it
    sizes its thread pool from the CPUs the process may run on, so both stacks get the same CPUs this way."""
    return lambda: os.sched_setaffinity(0, range(min(threads, os.cpu_count())))


def jaxft_model(config: dict, workload: str):
    """(cfg, params) with adapters / NF4 base as the workload asks."""
    import jax

    from jaxft import QuantConfig
    from jaxft.models.llama import init_params
    from jaxft.peft import lora
    from jaxft.recipes.skeleton import build_params

    cfg = model_config(config)
    base = init_params(cfg, jax.random.PRNGKey(0), dtype=config["dtype"])
    quant = QuantConfig(quant_type="nf4", blocksize=64, double_quant=True) if workload == "qlora" else None
    peft = (lora.LoraConfig(**LORA, target_modules=LINEARS),) if workload in ("lora", "qlora") else ()
    return cfg, build_params(cfg, base, jax.random.PRNGKey(1), quant=quant, peft=peft)


def nf4_bytes_per_param(params: dict) -> float | None:
    from jaxft import nf4

    kernels = [params["layers"][name]["kernel"] for name in LINEARS]
    if not isinstance(kernels[0], nf4.QuantizedTensor):
        return None
    count = sum(k.lead_shape[0] * k.matrix_shape[0] * k.matrix_shape[1] for k in kernels)
    return sum(nf4.nbytes(k) for k in kernels) / count


def run_jaxft(config: dict, workload: str, args) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxft.data.chat import IGNORE_INDEX
    from jaxft.peft.tree import Trainable, split
    from jaxft.train.loop import StepConfig, init_state, jit_train_step
    from jaxft.train.objectives import CausalLM
    from jaxft.train.optim import OptimConfig, make_optimizer

    cfg, params = jaxft_model(config, workload)
    trainable, frozen = split(params, Trainable(everything=workload == "full"))
    optimizer = make_optimizer(OptimConfig(lr=LR))
    state = init_state(trainable, optimizer)
    ids = jnp.asarray(random_batch(config), jnp.int32)
    labels = jnp.concatenate([ids[:, 1:], jnp.full_like(ids[:, :1], IGNORE_INDEX)], axis=1)
    batches = {"input_ids": ids[None], "labels": labels[None]}
    step_fn = jit_train_step(cfg, StepConfig(objective=CausalLM(chunk_size=args.loss_chunk)), optimizer)
    start = time.perf_counter()
    compiled = step_fn.lower(state, frozen, batches).compile()
    compile_s = time.perf_counter() - start
    holder = {"state": state}

    def step():
        holder["state"], metrics = compiled(holder["state"], frozen, batches)
        holder["loss"] = float(metrics["loss"])

    first, times = timed_steps(step, args.warmup, args.steps)
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    import jaxft

    return {"jaxft_path": str(Path(jaxft.__file__).parent), "compile_s": compile_s, "first_step_s": first, "step_times_s": times, "final_loss": holder["loss"],
            "device": device.device_kind, "peak_device_bytes": stats.get("peak_bytes_in_use"),
            "nf4_bytes_per_param": nf4_bytes_per_param(params)}


PEAK_N = 2048


def run_peak(_config: dict, _workload: str, args) -> dict:
    """GFLOP/s of a 2048^2 float32 matmul in JAX (best of 10), the jaxft side's MFU denominator: the peak a
    pretraining run measures on hardware jaxft.train.flops has no table entry for."""
    import jax

    from jaxft.train.flops import measure_matmul_peak

    return {"matmul_gflops": measure_matmul_peak(PEAK_N, repeats=10) / 1e9, "device": jax.devices()[0].device_kind}


def run_peak_torch(_config: dict, _workload: str, args) -> dict:
    """GFLOP/s of the same float32 matmul in PyTorch with the reference's thread count (best of 10)."""
    import torch

    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(PEAK_N, PEAK_N, generator=generator).to(device) for _ in range(2))

    def matmul():
        torch.matmul(a, b)
        if device == "cuda":
            torch.cuda.synchronize()

    matmul()
    best = min(_seconds(matmul) for _ in range(10))
    return {"matmul_gflops": 2 * PEAK_N ** 3 / best / 1e9, "device": device, "threads": torch.get_num_threads()}


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------------ torch worker

def torch_model(config: dict, workload: str, tmp: str):
    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    dtype = getattr(torch, config["dtype"])
    kwargs = dict(config["model"])
    if "rope" in config:
        kwargs["rope_scaling"] = {**config["rope"], "rope_type": "llama3"}
    hf_cfg = transformers.LlamaConfig(**kwargs)
    hf_cfg._attn_implementation = REFERENCE_ATTENTION
    model = transformers.LlamaForCausalLM(hf_cfg).to(dtype)
    if workload == "qlora":  # bitsandbytes quantizes on load
        model.save_pretrained(tmp)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            tmp, dtype=dtype, attn_implementation=REFERENCE_ATTENTION,
            quantization_config=transformers.BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype))
    if workload in ("lora", "qlora"):
        model = peft.get_peft_model(model, peft.LoraConfig(**LORA, target_modules=list(LINEARS),
                                                           task_type="CAUSAL_LM"))
    return model


def run_torch(config: dict, workload: str, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        model = torch_model(config, workload, tmp).to(device)
    model.train()  # bitsandbytes' CPU path casts to bf16 in eval mode only
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    ids = torch.as_tensor(random_batch(config), device=device)
    holder = {}

    def step():
        loss = model(input_ids=ids, labels=ids).loss  # HF shifts the labels inside
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        holder["loss"] = loss.item()

    first, times = timed_steps(step, args.warmup, args.steps)
    peak_device = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return {"compile_s": None, "first_step_s": first, "step_times_s": times, "final_loss": holder["loss"],
            "device": device, "peak_device_bytes": peak_device}


WORKERS = {"jaxft": run_jaxft, "torch": run_torch, "peak": run_peak, "peak-torch": run_peak_torch}
PEAK_STACKS = {"jaxft": "jax", "baseline": "jax", "torch": "torch"}  # whose matmul peak each stack's MFU divides by


def worker(args) -> None:
    sys.path.insert(0, args.jaxft_root)
    config = CONFIGS[args.config]
    result = WORKERS[args.worker](config, args.workload, args)
    result["peak_rss_bytes"] = peak_rss_bytes()
    print(RESULT + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------ driver

def spawn(args, stack: str, workload: str) -> dict:
    """Run one measurement in a fresh process and return its result dict (``baseline``: jaxft from another tree,
    measured by that tree's own copy of this script, since the worker calls the API of the tree it measures)."""
    root = args.baseline if stack == "baseline" else str(ROOT)
    script = Path(root) / "scripts" / Path(__file__).name if stack == "baseline" else Path(__file__)
    command = [sys.executable, str(script), "--worker", "torch" if stack == "torch" else "jaxft",
               "--workload", workload, "--config", args.config, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--threads", str(args.threads), "--loss-chunk", str(args.loss_chunk),
               "--jaxft-root", root]
    env = dict(os.environ) if stack == "torch" else jax_env()
    env["OMP_NUM_THREADS"] = str(args.threads)
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT, preexec_fn=pinned(args.threads))
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode or not lines:
        raise SystemExit(f"{stack}/{workload} worker failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    result = json.loads(lines[-1][len(RESULT):])
    tokens = CONFIGS[args.config]["batch"] * CONFIGS[args.config]["seq"]
    result["step_s_median"] = statistics.median(result["step_times_s"])
    result["step_s_p90"] = _quantile(result["step_times_s"], 0.9)
    result["tokens_per_s"] = tokens / result["step_s_median"]
    print(f"  {stack:8s} {workload:5s}: {result['tokens_per_s']:7.1f} tokens/s, step {result['step_s_median']:.3f} s, "
          f"peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB", file=sys.stderr, flush=True)
    return result


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(args, workload: str) -> dict:
    """Alternating rounds of (jaxft, reference[, baseline]) runs; the order flips every round."""
    stacks = ["jaxft"] + (["torch"] if args.reference == "torch" else []) + (["baseline"] if args.baseline else [])
    runs = {stack: [] for stack in stacks}
    for pair in range(args.pairs):
        for stack in (stacks if pair % 2 == 0 else stacks[::-1]):
            runs[stack].append(spawn(args, stack, workload))
    out = {"runs": runs, "ratios": {}}
    if args.reference == "torch":
        for stack in set(stacks) - {"torch"}:
            ratios = [j["tokens_per_s"] / t["tokens_per_s"] for j, t in zip(runs[stack], runs["torch"])]
            out["ratios"][stack] = {"per_pair": ratios, "median": statistics.median(ratios)}
    return out


def summarize(runs: list[dict], flops: dict, peak_gflops: float) -> dict:
    """The median run (by tokens/s) of one stack, with MFU."""
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in runs)
    median_run = min(runs, key=lambda r: abs(r["tokens_per_s"] - tokens_per_s))
    achieved = tokens_per_s * flops["model"] / 1e9
    return {"tokens_per_s": tokens_per_s, "step_s_median": median_run["step_s_median"],
            "step_s_p90": median_run["step_s_p90"],
            "compile_s": _median_or_none([r["compile_s"] for r in runs]),
            "first_step_s": statistics.median(r["first_step_s"] for r in runs),
            "peak_rss_gib": max(r["peak_rss_bytes"] for r in runs) / 2**30,
            "peak_device_gib": _gib(max((r["peak_device_bytes"] or 0) for r in runs)),
            "model_gflop_per_s": achieved, "mfu": achieved / peak_gflops,
            "mfu_6n": tokens_per_s * flops["6N"] / 1e9 / peak_gflops,
            "final_loss": median_run["final_loss"], "nf4_bytes_per_param": runs[0].get("nf4_bytes_per_param"),
            "matmul_peak_gflops": peak_gflops}


def _median_or_none(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _gib(n: int):
    return n / 2**30 if n else None


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(report: dict) -> None:
    load = report["load_average_1_5_15"]
    print(f"\nCPU: {cpu_label(report['machine']['cpu'])}")
    print(f"load average (1/5/15 min) {' '.join(f'{x:.2f}' for x in load['start'])} at start, "
          f"{' '.join(f'{x:.2f}' for x in load['end'])} at end")
    peaks = ", ".join(f"{stack} {gflops:.1f}" for stack, gflops in report["matmul_peak_gflops"].items())
    print(f"f32 matmul peak ({PEAK_N}^2, {report['threads']} threads), GFLOP/s: {peaks}; config {report['config']}, "
          f"{report['tokens_per_step']} tokens/step, {report['steps']} timed steps after {report['warmup']} "
          f"warm-up, {report['pairs']} alternating pairs; reference attention {report['reference_attention']}\n")
    print("| workload | stack | tokens/s | step s (median) | step s (p90) | compile s | first step s | peak RSS GiB "
          "| MFLOP/token | matmul peak GFLOP/s | MFU | 6N-MFU | tokens/s vs torch |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for workload, entry in report["workloads"].items():
        for stack, row in entry["summary"].items():
            ratio = f"{entry['ratios'][stack]['median']:.2f}x" if stack in entry["ratios"] else ""
            print(f"| {workload} | {stack} | {row['tokens_per_s']:.0f} | {row['step_s_median']:.3f} | "
                  f"{row['step_s_p90']:.3f} | {_fmt(row['compile_s'], '.1f')} | {row['first_step_s']:.1f} | "
                  f"{row['peak_rss_gib']:.2f} | {entry['flops_per_token']['model'] / 1e6:.0f} | "
                  f"{row['matmul_peak_gflops']:.1f} | {100 * row['mfu']:.1f}% | {100 * row['mfu_6n']:.1f}% | {ratio} |")
    extras = report.get("derived", {})
    for key, value in extras.items():
        print(f"\n{key}: {value:.3f}")


def derived(workloads: dict) -> dict:
    out = {}
    if "lora" in workloads and "qlora" in workloads:
        lora, qlora = workloads["lora"]["summary"]["jaxft"], workloads["qlora"]["summary"]["jaxft"]
        out["jaxft QLoRA step / LoRA step"] = qlora["step_s_median"] / lora["step_s_median"]
        out["jaxft NF4 bytes per base param"] = qlora["nf4_bytes_per_param"]
    return out


def drive(args) -> None:
    config = CONFIGS[args.config]
    load_start = os.getloadavg()  # the machine may be shared: timings mean little without it
    peak_stacks = ["jax"] + (["torch"] if args.reference == "torch" else [])
    peaks = {stack: [spawn_peak(args, stack)] for stack in peak_stacks}
    workloads = {}
    for workload in args.workloads.split(","):
        print(f"{workload}:", file=sys.stderr, flush=True)
        entry = measure(args, workload)
        for stack in peak_stacks:
            peaks[stack].append(spawn_peak(args, stack))
        entry["flops_per_token"] = flops_per_token(config, workload)
        workloads[workload] = entry
    peak = {stack: max(runs) for stack, runs in peaks.items()}
    for entry in workloads.values():
        entry["summary"] = {stack: summarize(runs, entry["flops_per_token"], peak[PEAK_STACKS[stack]])
                            for stack, runs in entry["runs"].items() if runs}
    report = {"benchmark": "train step", "config": args.config, "model": config, "lora": LORA, "lr": LR,
              "tokens_per_step": config["batch"] * config["seq"], "steps": args.steps, "warmup": args.warmup,
              "pairs": args.pairs, "threads": args.threads, "loss_chunk_size": args.loss_chunk,
              "matmul_peak_gflops": peak, "matmul_peak_runs_gflops": peaks, "workloads": workloads,
              "reference_attention": REFERENCE_ATTENTION,
              "load_average_1_5_15": {"start": load_start, "end": os.getloadavg()},
              "machine": {"cpus": os.cpu_count(), "cpu": cpu_info(), "python": platform.python_version(),
                          "platform": platform.platform()},
              "versions": versions(args.reference), "command": " ".join(["python", *sys.argv])}
    report["derived"] = derived(workloads)
    print_table(report)
    out = Path(args.out or f"bench/results/train_{args.config}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


def spawn_peak(args, stack: str = "jax") -> float:
    """The f32 matmul GFLOP/s of ``stack`` ("jax" or "torch") in a fresh process on the benchmark's CPUs."""
    return spawn_quiet(args, "peak" if stack == "jax" else "peak-torch")["matmul_gflops"]


def spawn_quiet(args, worker: str = "peak") -> dict:
    command = [sys.executable, __file__, "--worker", worker, "--config", args.config, "--threads", str(args.threads)]
    env = jax_env() if worker == "peak" else dict(os.environ)
    env["OMP_NUM_THREADS"] = str(args.threads)
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT,
                          preexec_fn=pinned(args.threads))
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode or not lines:
        raise SystemExit(f"matmul peak worker failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len(RESULT):])


def versions(reference: str) -> dict:
    from importlib.metadata import version

    names = ["jax", "jaxlib", "optax"] + (["torch", "transformers", "peft", "bitsandbytes"]
                                           if reference == "torch" else [])
    return {name: version(name) for name in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="bench-32m")
    parser.add_argument("--workloads", default="lora,qlora,full", help=f"comma-separated subset of {WORKLOADS}")
    parser.add_argument("--reference", choices=("torch", "none"), default="torch")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per run (median and p90 over them)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first (compiling) one")
    parser.add_argument("--pairs", type=int, default=3, help="alternating (jaxft, reference) run pairs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--loss-chunk", type=int, help="CausalLM.chunk_size (0 = full logits; default: the "
                                                         "config's)")
    parser.add_argument("--out", help="JSON path (default bench/results/train_<config>.json)")
    parser.add_argument("--baseline", help="also run jaxft from this other checkout (before/after comparisons)")
    parser.add_argument("--jaxft-root", default=str(ROOT), help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--workload", choices=WORKLOADS, default="lora", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loss_chunk is None:
        args.loss_chunk = CONFIGS[args.config]["loss_chunk"]
    unknown = set(args.workloads.split(",")) - set(WORKLOADS)
    if unknown:
        parser.error(f"--workloads {sorted(unknown)} unknown; choose from {WORKLOADS}")
    if args.worker:
        worker(args)
    else:
        drive(args)


if __name__ == "__main__":
    main()
