"""Benchmark: the pretraining data path (read, clean, tokenize and pack) against datasets + transformers, in one run.

    python scripts/bench_pretrain_data.py [--work ~/.cache/jaxft/pretrain_stdlib] [--max-length 1024] [--pairs 3]

The corpus is ``examples/pretrain_stdlib/run.py``'s train split (the standard library's source as JSONL, made when
absent) and its byte-level BPE. Measured, each in this process:

* rows: one pass of ``jaxft.data.text_stream.TextStream`` (``concat`` rows of ``--max-length`` tokens, exact dedup
  and the default filters) against the reference a Hugging Face user runs by default, ``run_clm.py``'s recipe:
  ``datasets.load_dataset("json", streaming=True)``, a batched ``map`` of the fast tokenizer (EOS appended, as
  jaxft does) and ``group_texts`` into blocks of the same length. Runs alternate ``--pairs`` times; the ratio is the
  median of the per-pair ratios of tokens/s;
* the Python heap's peak (tracemalloc) of a pass of each, in a separate pass (tracing slows Python down);
* cleaning alone (``TextCleaner`` over the documents, MB of text per second) with exact dedup and the default
  filters, with every filter and PII scrubbing on, and with near (MinHash) dedup;
* reading alone: the corpus as one plain text file read with ``document: line`` (MB/s and peak heap).

Prints a table and writes ``bench/results/pretrain_data.json`` with the CPU model.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import bench_pretrain  # noqa: E402  (the example's corpus)
import bench_train  # noqa: E402  (CPU record)

from jaxft.data.formats import DataReport  # noqa: E402
from jaxft.data.text_cleaning import TextCleaner  # noqa: E402
from jaxft.data.text_config import TextDataConfig  # noqa: E402
from jaxft.data.text_sources import read_documents  # noqa: E402
from jaxft.data.text_stream import TextStream  # noqa: E402
from jaxft.files import cache_root, write_text_atomic  # noqa: E402
from jaxft.hf.tokenizer import load_tokenizer  # noqa: E402

CLEANING = {"exact, default filters": {},
            "all filters + PII": dict(scrub_pii=True, max_symbol_fraction=0.1, min_alpha_word_fraction=0.8,
                                      max_repeated_word_run=10, max_duplicate_line_fraction=0.3),
            "near dedup": dict(dedup="near")}


def jaxft_pass(corpus: Path, tokenizer, max_length: int) -> int:
    """Tokens of one pass of the stream's rows (the last batch's padding not counted)."""
    stream = TextStream(TextDataConfig(paths=(str(corpus),), max_length=max_length, batch_size=8), tokenizer)
    return sum(int((rows["segment_ids"] > 0).sum()) for rows in stream.pass_rows())


def reference_pass(corpus: Path, hf_tokenizer, max_length: int) -> int:
    """Tokens of one pass of run_clm.py's recipe: stream, tokenize (+ EOS), concatenate, cut into blocks."""
    import datasets

    def tokenize(batch):
        return {"input_ids": [ids + [hf_tokenizer.eos_token_id] for ids in hf_tokenizer(batch["text"])["input_ids"]]}

    def group_texts(batch):
        joined = list(itertools.chain.from_iterable(batch["input_ids"]))
        usable = len(joined) // max_length * max_length
        return {"input_ids": [joined[i:i + max_length] for i in range(0, usable, max_length)]}

    stream = datasets.load_dataset("json", data_files=str(corpus), split="train", streaming=True)
    stream = stream.map(tokenize, batched=True, remove_columns=["text", "path"]).map(group_texts, batched=True)
    return sum(len(row["input_ids"]) for row in stream)


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def peak_heap(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def rows_benchmark(corpus: Path, tokenizer, hf_tokenizer, max_length: int, pairs: int) -> dict:
    sides = {"jaxft": lambda: jaxft_pass(corpus, tokenizer, max_length),
             "reference": lambda: reference_pass(corpus, hf_tokenizer, max_length)}
    runs = {name: [] for name in sides}
    for pair in range(pairs):
        for name in (sides if pair % 2 == 0 else list(sides)[::-1]):
            seconds, tokens = timed(sides[name])
            runs[name].append({"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds})
    ratios = [j["tokens_per_s"] / r["tokens_per_s"] for j, r in zip(runs["jaxft"], runs["reference"])]
    return {"runs": runs, "ratio_median": statistics.median(ratios),
            "peak_heap_bytes": {name: peak_heap(fn) for name, fn in sides.items()}}


def cleaning_benchmark(corpus: Path) -> dict:
    documents = list(read_documents(str(corpus)))
    megabytes = sum(len(d.text.encode()) for d in documents) / 1e6
    out = {}
    for name, settings in CLEANING.items():
        cleaner = TextCleaner(TextDataConfig(paths=(str(corpus),), **settings), DataReport())
        seconds, kept = timed(lambda: sum(cleaner(d) is not None for d in documents))
        out[name] = {"mb_per_s": megabytes / seconds, "kept": kept, "documents": len(documents)}
    return out


def reading_benchmark(corpus: Path, work: Path) -> dict:
    text_file = work / "corpus" / "train.txt"
    if not text_file.exists():
        write_text_atomic(text_file, "".join(d.text for d in read_documents(str(corpus))))

    def read():
        return sum(1 for _ in read_documents(str(text_file), document="line"))

    seconds, lines = timed(read)
    return {"mb_per_s": text_file.stat().st_size / 1e6 / seconds, "lines": lines,
            "file_bytes": text_file.stat().st_size, "peak_heap_bytes": peak_heap(read)}


def print_table(report: dict) -> None:
    rows, runs = report["rows"], report["rows"]["runs"]
    speed = {name: statistics.median(r["tokens_per_s"] for r in side) for name, side in runs.items()}
    print("| stage | jaxft | datasets + transformers (run_clm) | jaxft / reference |\n|---|---|---|---|")
    print(f"| rows, tokens/s | {speed['jaxft']:,.0f} | {speed['reference']:,.0f} | {rows['ratio_median']:.2f} |")
    heap = rows["peak_heap_bytes"]
    print(f"| rows, peak Python heap MB | {heap['jaxft'] / 1e6:.1f} | {heap['reference'] / 1e6:.1f} | |")
    for name, result in report["cleaning"].items():
        print(f"| cleaning ({name}), MB/s | {result['mb_per_s']:.1f} | | |")
    reading = report["reading"]
    print(f"| reading lines of a {reading['file_bytes'] / 1e6:.0f} MB file, MB/s (peak heap kB) | "
          f"{reading['mb_per_s']:.0f} ({reading['peak_heap_bytes'] / 1e3:.0f}) | | |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=str(cache_root() / "pretrain_stdlib"))
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "pretrain_data.json"))
    args = parser.parse_args(argv)
    work = Path(args.work).expanduser()
    if not (work / "tokenizer" / "tokenizer.json").exists():
        bench_pretrain.example_module().prepare(work, 8192, 0.05)
    import transformers

    corpus, tokenizer = work / "corpus" / "train.jsonl", load_tokenizer(work / "tokenizer")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(work / "tokenizer")
    load = os.getloadavg()
    report = {"benchmark": "pretraining data path", "corpus": str(corpus), "corpus_bytes": corpus.stat().st_size,
              "max_length": args.max_length, "pairs": args.pairs,
              "rows": rows_benchmark(corpus, tokenizer, hf_tokenizer, args.max_length, args.pairs),
              "cleaning": cleaning_benchmark(corpus), "reading": reading_benchmark(corpus, work),
              "cpu": bench_train.cpu_info(), "load_average_1_5_15": {"start": load, "end": os.getloadavg()},
              "command": " ".join(["python", *sys.argv])}
    print_table(report)
    write_text_atomic(Path(args.out), json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
