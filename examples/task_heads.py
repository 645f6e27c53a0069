"""Task heads trained with QLoRA (LoRA over the NF4 base) on the demo's cached base, each on generated data with an
exact answer:

- classify: is a digit string strictly increasing? (``configs/classify-demo.yaml``, accuracy and macro-F1)
- token_classify: tag runs of odd digits as entities, B-ODD / I-ODD, even digits O
  (``configs/token-classify-demo.yaml``, seqeval's entity-level F1)
- qa: the two digits after ``=`` in a digit string (``configs/qa-demo.yaml``, SQuAD exact match and F1)

    python examples/task_heads.py [--steps N] [--out jaxft-heads]

writes the data to ``jaxft-heads/data/``, trains each config (runs in ``jaxft-heads/runs/``), prints a table of
(task, steps, seconds, held-out metrics) and writes it as JSON to ``bench/results/task_heads.json``. The base is
the one ``jaxft demo`` pretrains and caches (built here on first use). Held-out records are disjoint from training
records.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from jaxft.recipes import demo, sft
from jaxft.recipes.config import load_run_config

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from bench_train import cpu_info  # noqa: E402  (the benchmarks' record of the CPU the numbers come from)

CONFIGS = {"classify": "classify-demo.yaml", "token_classify": "token-classify-demo.yaml", "qa": "qa-demo.yaml"}
METRICS = {"classify": ("accuracy", "macro_f1"), "token_classify": ("entity_f1", "accuracy"),
           "qa": ("exact_match", "f1")}


def digits(rng: np.random.Generator, low: int, high: int) -> list[int]:
    return rng.integers(0, 10, size=int(rng.integers(low, high + 1))).tolist()


def classify_record(rng: np.random.Generator) -> dict:
    """Half strictly increasing strings, half not (random strings, re-drawn while increasing)."""
    if rng.random() < 0.5:
        ds = sorted(rng.choice(10, size=int(rng.integers(3, 7)), replace=False).tolist())
    else:
        ds = digits(rng, 3, 6)
        while all(a < b for a, b in zip(ds, ds[1:])):
            ds = digits(rng, 3, 6)
    label = "increasing" if all(a < b for a, b in zip(ds, ds[1:])) else "other"
    return {"text": " ".join(map(str, ds)), "label": label}


def token_record(rng: np.random.Generator) -> dict:
    """Each odd digit is in an entity that spans its run of odd digits: B-ODD first, I-ODD after; even digits O."""
    ds = digits(rng, 4, 10)
    tags = ["O" if d % 2 == 0 else ("I-ODD" if i and ds[i - 1] % 2 else "B-ODD") for i, d in enumerate(ds)]
    return {"tokens": [str(d) for d in ds], "ner_tags": tags}


def qa_record(rng: np.random.Generator, index: int) -> dict:
    """A digit string with one ``=`` in it; the answer is the two digits after it."""
    ds = [str(d) for d in digits(rng, 6, 12)]
    at = int(rng.integers(1, len(ds) - 1))
    words = ds[:at] + ["="] + ds[at:]
    context = " ".join(words)
    start = len(" ".join(words[:at + 1])) + 1
    answer = " ".join(ds[at:at + 2])
    return {"id": str(index), "question": "increment", "context": context,
            "answers": {"text": [answer], "answer_start": [start]}}


def write_data(folder: Path, n_train: int = 2000, n_eval: int = 200, seed: int = 0) -> dict[str, Path]:
    """train/eval JSONL files of each task; an eval record never appears in training."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    makers = {"classify": lambda i: classify_record(rng), "token": lambda i: token_record(rng),
              "qa": lambda i: qa_record(rng, i)}
    paths = {}
    for name, make in makers.items():
        seen, rows = set(), []
        while len(rows) < n_train + n_eval:
            record = make(len(rows))
            key = json.dumps({k: v for k, v in record.items() if k != "id"}, sort_keys=True)
            if key not in seen:
                seen.add(key)
                rows.append(record)
        for split, part in (("eval", rows[:n_eval]), ("train", rows[n_eval:])):
            paths[f"{name}-{split}"] = folder / f"{name}-{split}.jsonl"
            paths[f"{name}-{split}"].write_text("".join(json.dumps(r) + "\n" for r in part))
    return paths


def train(task: str, out: Path, steps: int | None) -> dict:
    """One task's run from its config in configs/, with this script's data and output folders."""
    sets = [f"output_dir={out / 'runs' / task}", f"model={demo.base_dir()}"]
    if steps:
        sets.append(f"train.steps={steps}")
    cfg = load_run_config(ROOT / "configs" / CONFIGS[task], sets)
    data = out / "data"
    name = {"classify": "classify", "token_classify": "token", "qa": "qa"}[task]
    cfg = cfg.replace(data=cfg.data.replace(paths=(str(data / f"{name}-train.jsonl"),)),
                      eval_data=cfg.eval_data.replace(paths=(str(data / f"{name}-eval.jsonl"),)))
    start = time.perf_counter()
    summary = sft.run(cfg, overwrite=True)
    return {"task": task, "steps": cfg.train.steps, "seconds": round(time.perf_counter() - start, 1),
            **{m: summary["eval"][m] for m in METRICS[task]}, "tokens_per_s": summary["tokens_per_s"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="jaxft-heads", help="data and run folder (default: ./jaxft-heads)")
    parser.add_argument("--steps", type=int, help="train steps of every task (default: each config's)")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "task_heads.json"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    if not (demo.base_dir() / "config.json").exists():
        demo.build_base(demo.base_dir(), demo.DemoConfig())
    write_data(out / "data")
    rows = [train(task, out, args.steps) for task in CONFIGS]
    print("| task | steps | seconds | held-out metrics |\n|---|---|---|---|")
    for r in rows:
        shown = ", ".join(f"{m} {r[m]:.3f}" for m in METRICS[r["task"]])
        print(f"| {r['task']} | {r['steps']} | {r['seconds']} | {shown} |")
    Path(args.json).write_text(json.dumps({"cpu": cpu_info(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
