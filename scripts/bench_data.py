"""Benchmark: chat SFT data preparation in jaxft vs TRL on the same generated conversations, in one run.

Both sides turn multi-turn conversations into token ids with assistant masks using TRL's
`llama3_training.jinja`, then pack them best-fit-decreasing into rows of `--max-length` tokens:

* TRL: `datasets.Dataset.map(tokenizer.apply_chat_template(..., return_assistant_tokens_mask=True))`
  then `trl.pack_dataset(strategy="bfd")`, as `SFTTrainer` prepares data.
* jaxft: `jaxft.data.tokenize_examples` (ids + shifted labels) then `best_fit_decreasing` and the packed
  `[rows, T]` arrays of an epoch (`rows_to_batch`).

After a small warm-up of each, runs alternate (TRL, jaxft) `--pairs` times; the reported speedup is the
median of the per-pair time ratios (TRL time / jaxft time), so machine load drifting affects both sides.
The tokenizer is a ByteLevel BPE trained here (no network). Prints a markdown table and writes
`bench/results/data.json`.

    python scripts/bench_data.py --records 2000 --pairs 3
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORDS = ("the quick brown fox jumps over a lazy dog while llamas graze on the hill and answer every question "
         "about tokens training data packing masks templates models gradients batches").split()
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def _sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize() + "."


def make_conversations(count: int, seed: int = 0) -> list[list[dict]]:
    """Multi-turn chats: optional system prompt, 1-4 user/assistant exchanges of varied length."""
    rng = random.Random(seed)
    chats = []
    for _ in range(count):
        chat = [{"role": "system", "content": _sentence(rng, 5, 15)}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 4)):
            chat.append({"role": "user", "content": _sentence(rng, 5, 40)})
            chat.append({"role": "assistant", "content": " ".join(_sentence(rng, 5, 30)
                                                                  for _ in range(rng.randint(1, 4)))})
        chats.append(chat)
    return chats


def build_tokenizer(folder: Path) -> None:
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    rng = random.Random(1)
    backend.train_from_iterator([_sentence(rng, 5, 30) for _ in range(5000)], trainer=trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>",
                                                eos_token="<|eot_id|>", pad_token="<|end_of_text|>")
    fast.save_pretrained(folder)


def run_trl(hf_tokenizer, template: str, chats: list, max_length: int) -> tuple[int, int]:
    import datasets
    from trl import pack_dataset

    def tokenize(example):
        out = hf_tokenizer.apply_chat_template(example["messages"], chat_template=template, tokenize=True,
                                               return_dict=True, return_assistant_tokens_mask=True)
        return {"input_ids": out["input_ids"], "assistant_masks": out["assistant_masks"]}

    dataset = datasets.Dataset.from_list([{"messages": chat} for chat in chats])
    dataset = dataset.map(tokenize, remove_columns=["messages"])
    packed = pack_dataset(dataset, max_length, strategy="bfd")
    return len(packed), sum(len(ids) for ids in packed["input_ids"])


def run_jaxft(tokenizer, template: str, chats: list, max_length: int) -> tuple[int, int]:
    from jaxft.data import Example, best_fit_decreasing, tokenize_examples
    from jaxft.data.packing import rows_to_batch

    examples = [Example(f"chat{i}", messages=chat) for i, chat in enumerate(chats)]
    samples = tokenize_examples(examples, tokenizer, template, max_length=max_length)
    rows = best_fit_decreasing([len(s.input_ids) for s in samples], max_length)
    batch = rows_to_batch(samples, rows, max_length, pad_id=0)
    return len(rows), int((batch["segment_ids"] > 0).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--out", default="bench/results/data.json")
    args = parser.parse_args()

    import datasets
    import transformers
    import trl

    from jaxft.hf.tokenizer import load_tokenizer

    datasets.disable_progress_bars()
    datasets.disable_caching()
    template = (Path(trl.__file__).parent / "chat_templates" / "llama3_training.jinja").read_text()
    chats = make_conversations(args.records)
    with tempfile.TemporaryDirectory() as tmp:
        build_tokenizer(Path(tmp))
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp)
        tokenizer = load_tokenizer(tmp)

    # Warm-up outside the timings: template compilation, lazy imports, first-call allocations.
    run_trl(hf_tokenizer, template, chats[:50], args.max_length)
    run_jaxft(tokenizer, template, chats[:50], args.max_length)
    runs = {"trl": [], "jaxft": []}
    results = {}
    for _ in range(args.pairs):
        for name, fn, tok in (("trl", run_trl, hf_tokenizer), ("jaxft", run_jaxft, tokenizer)):
            start = time.perf_counter()
            rows, tokens = fn(tok, template, chats, args.max_length)
            runs[name].append(time.perf_counter() - start)
            results[name] = {"rows": rows, "tokens": tokens}
    if results["trl"]["tokens"] != results["jaxft"]["tokens"]:
        raise SystemExit(f"token counts differ: {results}; the two sides did not process the same data")
    ratios = [t / j for t, j in zip(runs["trl"], runs["jaxft"])]
    table = {}
    for name in runs:
        seconds = statistics.median(runs[name])
        table[name] = {"median_s": seconds, "records_per_s": args.records / seconds,
                       "tokens_per_s": results[name]["tokens"] / seconds, "rows": results[name]["rows"],
                       "packing_efficiency": results[name]["tokens"] / (results[name]["rows"] * args.max_length),
                       "runs_s": runs[name]}
    report = {"benchmark": "chat SFT tokenize + assistant mask + BFD pack", "records": args.records,
              "max_length": args.max_length, "template": "trl/chat_templates/llama3_training.jinja",
              "pairs": args.pairs, "speedup_median": statistics.median(ratios), "speedup_per_pair": ratios,
              "results": table, "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
              "versions": {"transformers": transformers.__version__, "trl": trl.__version__,
                           "datasets": datasets.__version__}, "command": " ".join(["python", *sys.argv])}
    print("| stack | median s | records/s | tokens/s | rows | packing efficiency |\n|---|---|---|---|---|---|")
    for name, row in table.items():
        print(f"| {name} | {row['median_s']:.3f} | {row['records_per_s']:.0f} | {row['tokens_per_s']:.0f} | "
              f"{row['rows']} | {row['packing_efficiency']:.4f} |")
    print(f"\njaxft / TRL throughput (median of {args.pairs} alternating pairs): {report['speedup_median']:.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
