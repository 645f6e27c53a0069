"""Benchmark: what the command line's persistent compilation cache (``jaxft.compile_cache``) saves.

Two measurements, each without the cache (``--no-compile-cache``) and with it (a fresh cache folder):

* ``train``: ``jaxft train`` of the demo config (``configs/demo-cpu.yaml``: the demo's NF4 base, QLoRA r 8, its
  data), run twice; the wall time of the second, identical run (a fresh process each: imports, loading, compiling,
  training, evaluation, export). With the cache the first run fills it and the second loads every program.
* ``sweep``: ``jaxft sweep`` of the same config over ``seeds=2`` in one process; the second seed's time is the time
  between the two runs' summary.json files (its load, compilation, training, evaluation and export). The runs'
  jitted functions are built per run, so without the cache the second seed compiles everything again.

Every run is a subprocess of this script, so nothing stays warm in between but the OS's file cache; the machine's
1-minute load average is recorded before and after each, since timings on a shared machine are only comparable
while it stays under the core count. Builds the demo base first if it is not cached (``jaxft demo`` does the same).

    python scripts/bench_compile_cache.py --steps 300
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load() -> float:
    return round(os.getloadavg()[0], 2)


def demo_config(tmp: Path, steps: int) -> Path:
    """configs/demo-cpu.yaml with the cached demo base, the demo's data written into ``tmp`` and ``steps``."""
    from jaxft.recipes import demo

    dcfg = demo.DemoConfig()
    base = demo.base_dir(dcfg)
    if not (base / "config.json").exists():
        demo.build_base(base, dcfg)
    test, train = demo.held_out_split(dcfg)
    demo.write_jsonl(tmp / "train.jsonl", [demo.chat(p) for p in train])
    demo.write_jsonl(tmp / "eval.jsonl", [demo.chat(p) for p in test])
    config = yaml.safe_load((ROOT / "configs" / "demo-cpu.yaml").read_text())
    config.update(model=str(base), output_dir=str(tmp / "run"))
    config["data"]["paths"], config["eval_data"]["paths"] = [str(tmp / "train.jsonl")], [str(tmp / "eval.jsonl")]
    config["train"]["steps"] = steps
    path = tmp / "demo.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def jaxft(*args: str, cache: Path | None) -> dict:
    """``jaxft ARGS`` in a fresh process with the cache at ``cache`` (None: off): wall seconds and load average."""
    flags = ["--compile-cache", str(cache)] if cache else ["--no-compile-cache"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    before, start = load(), time.perf_counter()
    subprocess.run([sys.executable, "-m", "jaxft", *args, *flags], check=True, env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return {"wall_s": round(time.perf_counter() - start, 2), "load_before": before, "load_after": load()}


def bench_train(config: Path, cache: Path | None) -> dict:
    first = jaxft("train", str(config), "--overwrite", cache=cache)
    second = jaxft("train", str(config), "--overwrite", cache=cache)
    return {"first": first, "second": second}


def bench_sweep(config: Path, out: Path, cache: Path | None) -> dict:
    sweep = jaxft("sweep", str(config), "--grid", "seeds=2", "--out", str(out), "--overwrite", cache=cache)
    done = sorted((out / name / "summary.json").stat().st_mtime for name in os.listdir(out)
                  if (out / name / "summary.json").is_file())
    return {"sweep": sweep, "second_seed_s": round(done[1] - done[0], 2)}


def table(result: dict) -> str:
    rows = [("second identical `jaxft train`", "train", lambda r: r["second"]["wall_s"]),
            ("first `jaxft train` (cache empty)", "train", lambda r: r["first"]["wall_s"]),
            ("sweep's second seed", "sweep", lambda r: r["second_seed_s"]),
            ("whole sweep, 2 seeds", "sweep", lambda r: r["sweep"]["wall_s"])]
    lines = ["| wall time (s) | no cache | cache | saved |", "|---|---|---|---|"]
    for label, key, read in rows:
        off, on = read(result[key]["off"]), read(result[key]["on"])
        lines.append(f"| {label} | {off:.1f} | {on:.1f} | {off - on:.1f} ({100 * (off - on) / off:.0f}%) |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="train.steps of the demo config (default: its 300)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "compile_cache.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = demo_config(tmp, args.steps)
        result = {"train": {"off": bench_train(config, None), "on": bench_train(config, tmp / "xla-train")},
                  "sweep": {"off": bench_sweep(config, tmp / "sweep-off", None),
                            "on": bench_sweep(config, tmp / "sweep-on", tmp / "xla-sweep")}}
    import jax

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else None
    result["setup"] = {"steps": args.steps, "config": "configs/demo-cpu.yaml", "cpu": cpu, "cpus": os.cpu_count(),
                       "jax": jax.__version__, "python": platform.python_version()}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
