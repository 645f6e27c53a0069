"""Pretraining from scratch on CPU, offline: the Python standard library's own source files as the corpus.

    python examples/pretrain_stdlib/run.py [--work ~/.cache/jaxft/pretrain_stdlib] [--steps N]

1. corpus: every UTF-8 ``.py`` file of the standard library (``sysconfig.get_paths()["stdlib"]``) outside
   site-packages and the test suites (folders named ``test``, ``tests``, ``idle_test``), one document per file,
   code and docstrings as they are; a file is held out when the SHA-1 of its relative path falls in the first
   ``--held-out`` share of hash space, so the split is the same on every machine with the same Python. Written as
   ``WORK/corpus/{train,heldout}.jsonl``, the files in a seeded random order (the stream reads a source in order);
2. tokenizer: a byte-level BPE of ``--vocab`` ids trained on the train split (``jaxft tokenizer train``'s
   function), saved as a HF folder;
3. pretraining: ``examples/pretrain_stdlib/pretrain-cpu.yaml`` (a 4-layer Llama from random init, concatenated
   rows of 256 tokens, warmup + cosine), evaluated on the held-out files;
4. the baseline: a unigram model of the train split's tokens (add-one smoothing), scored on the same held-out
   rows as the model (the first ``train.eval_batches`` batches of the eval stream), so both perplexities are per
   token of one tokenizer over one set of targets;
5. completions of a few code prompts by the exported model (temperature 0.7, top-p 0.95, seed 0).

Prints a table (held-out perplexity vs the unigram's, tokens/s, MFU, train time) and writes it, with the CPU, the
loss curve and the completions, to ``bench/results/pretrain_stdlib.json``. Everything large stays in ``WORK``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

from jaxft.data.text_stream import build_text_pipeline
from jaxft.data.tokenizer_train import TokenizerTrainConfig, train_tokenizer_from_sources
from jaxft.files import cache_root, write_text_atomic
from jaxft.hf.checkpoint import from_pretrained
from jaxft.hf.tokenizer import load_tokenizer
from jaxft.models.generate import generate
from jaxft.recipes import sft
from jaxft.recipes.config import load_run_config
from jaxft.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
from bench_train import cpu_info, peak_rss_bytes  # noqa: E402  (the benchmarks' CPU record and peak RSS)

CONFIG = Path(__file__).resolve().parent / "pretrain-cpu.yaml"
TEST_FOLDERS = {"test", "tests", "idle_test", "site-packages"}
PROMPTS = ("import os\nimport sys\n\n\ndef ", "class Error(Exception):\n    ", "    def __init__(self, ",
           '    """Return the ')
SAMPLING = {"temperature": 0.7, "top_p": 0.95}


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files outside site-packages and the test suites, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if not TEST_FOLDERS & set(p.relative_to(root).parts[:-1]))


def held_out(path: Path, share: float) -> bool:
    """Whether ``path`` (relative to the stdlib) is a held-out file: a hash split, independent of file order."""
    digest = hashlib.sha1(path.as_posix().encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < share


def write_corpus(folder: Path, share: float) -> dict:
    """``train.jsonl`` and ``heldout.jsonl`` (one record per file, its path and text); files that are not UTF-8 are
    left out and counted. Returns the split's sizes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    splits, skipped = {"train": [], "heldout": []}, 0
    for path in stdlib_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            skipped += 1
            continue
        relative = path.relative_to(root)
        splits["heldout" if held_out(relative, share) else "train"].append({"path": relative.as_posix(), "text": text})
    sizes = {"stdlib": str(root), "not_utf8": skipped}
    folder.mkdir(parents=True, exist_ok=True)
    for name, records in splits.items():
        # the stream reads a source in order: files in path order would make each stretch of steps one package
        # (all the codec tables of encodings/ in a row), so the files are shuffled here, once, with a fixed seed
        records = [records[i] for i in np.random.default_rng(0).permutation(len(records))]
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        write_text_atomic(folder / f"{name}.jsonl", lines)
        sizes[name] = {"files": len(records), "characters": sum(len(r["text"]) for r in records)}
    return sizes


def unigram_perplexity(train_ids: np.ndarray, vocab_size: int, targets: np.ndarray) -> float:
    """exp of the mean negative log-probability of ``targets`` under the add-one-smoothed token frequencies of
    ``train_ids``: what a model that ignores context reaches."""
    counts = np.bincount(train_ids, minlength=vocab_size).astype(np.float64) + 1.0
    log_probs = np.log(counts / counts.sum())
    return float(math.exp(-log_probs[targets].mean()))


def stream_targets(data_cfg, tokenizer, batches: int | None = None) -> np.ndarray:
    """The target tokens (labels) of the first ``batches`` batches of a text data section's stream (all of one pass
    when None): exactly the tokens a model is scored on."""
    iterator = build_text_pipeline(data_cfg, tokenizer).iterator
    n = iterator.batches_per_epoch if batches is None else iterator.batches_up_to(batches)
    labels = np.concatenate([next(iterator)["labels"].ravel() for _ in range(n)])
    return labels[labels >= 0]


def completions(export: str, tokenizer, max_new_tokens: int) -> list[dict]:
    """Completions of :data:`PROMPTS` by the exported model (as the training rows began: BOS where the tokenizer
    adds one), sampled at :data:`SAMPLING` from seed 0: greedy decoding of a small model loops on one line."""
    model_cfg, params = from_pretrained(export)
    prompts = [tokenizer.encode(p, add_special_tokens=True) for p in PROMPTS]
    new = generate(model_cfg, params, prompts, max_new_tokens=max_new_tokens, stop_token_ids=[], seed=0, **SAMPLING)
    return [{"prompt": p, "completion": tokenizer.decode(ids)} for p, ids in zip(PROMPTS, new)]


def curves(metrics_path: Path) -> dict:
    """The run's train loss and held-out perplexity by step, from its metrics log."""
    records = read_metrics(metrics_path)
    return {"loss_curve": [{"step": r["step"], "loss": r["loss"]} for r in records if r["split"] == "train"],
            "heldout_curve": [{"step": r["step"], "perplexity": r["perplexity"]} for r in records
                              if r["split"] == "eval"]}


def table(row: dict) -> str:
    return ("| params | steps x tokens | train s | real tokens/s | MFU | held-out ppl | unigram ppl | peak RSS GiB |\n"
            "|---|---|---|---|---|---|---|---|\n"
            f"| {row['params'] / 1e6:.1f}M | {row['steps']} x {row['tokens_per_step']} | {row['train_seconds']} | "
            f"{row['tokens_per_s']:.0f} | {row['mfu']:.1%} | {row['heldout_perplexity']:.1f} | "
            f"{row['unigram_perplexity']:.1f} | {row['peak_rss_bytes'] / 2 ** 30:.2f} |")


def arguments(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=str(cache_root() / "pretrain_stdlib"),
                        help="corpus, tokenizer and run (default: ~/.cache/jaxft/pretrain_stdlib)")
    parser.add_argument("--steps", type=int, help="train steps (default: the config's)")
    parser.add_argument("--vocab", type=int, default=8192, help="tokenizer vocabulary size (default 8192)")
    parser.add_argument("--held-out", type=float, default=0.05, help="share of files held out (default 0.05)")
    parser.add_argument("--new-tokens", type=int, default=48, help="tokens per sample completion (default 48)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="more overrides of examples/pretrain_stdlib/pretrain-cpu.yaml, as jaxft train --set")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "pretrain_stdlib.json"))
    return parser.parse_args(argv)


def prepare(work: Path, vocab: int, share: float) -> tuple[dict, float]:
    """(corpus sizes, tokenizer training seconds): the corpus and tokenizer in ``work``, made afresh."""
    corpus = write_corpus(work / "corpus", share)
    start = time.perf_counter()
    train_tokenizer_from_sources([str(work / "corpus" / "train.jsonl")], work / "tokenizer",
                                 TokenizerTrainConfig(vocab_size=vocab, model_type="byte_bpe"), overwrite=True)
    return corpus, round(time.perf_counter() - start, 1)


def run_config(work: Path, vocab_size: int, sets: list[str]):
    """The example's run config with this machine's paths and the tokenizer's vocabulary size."""
    return load_run_config(CONFIG, [f"tokenizer={work / 'tokenizer'}", f"output_dir={work / 'run'}",
                                    f"data.paths=[{work / 'corpus' / 'train.jsonl'}]",
                                    f"eval_data.paths=[{work / 'corpus' / 'heldout.jsonl'}]",
                                    f"model.vocab_size={vocab_size}", *sets])


def main(argv=None) -> int:
    args = arguments(argv)
    work = Path(args.work).expanduser()
    corpus, tokenizer_seconds = prepare(work, args.vocab, args.held_out)
    tokenizer = load_tokenizer(work / "tokenizer")
    cfg = run_config(work, len(tokenizer), [*args.set, *([f"train.steps={args.steps}"] if args.steps else [])])
    start = time.perf_counter()
    summary = sft.run(cfg, overwrite=True)
    seconds = round(time.perf_counter() - start, 1)
    targets = stream_targets(cfg.eval_data, tokenizer, cfg.train.eval_batches)
    unigram = unigram_perplexity(stream_targets(cfg.data, tokenizer), cfg.model.vocab_size, targets)
    row = {"params": summary["trainable_params"], "steps": cfg.train.steps,
           "tokens_per_step": cfg.data.batch_size * cfg.data.max_length * cfg.train.grad_accum,
           "train_seconds": seconds, "tokens_per_s": summary["tokens_per_s"], "mfu": summary["mfu"],
           "peak_flops_source": summary["peak_flops_source"], "final_train_loss": summary["final_loss"],
           "heldout_perplexity": summary["eval"]["perplexity"], "heldout_tokens": int(targets.size),
           "unigram_perplexity": unigram, "tokenizer_seconds": tokenizer_seconds, "corpus": corpus,
           "peak_rss_bytes": peak_rss_bytes(),
           **curves(work / "run" / "metrics.jsonl"),
           "sampling": SAMPLING, "completions": completions(summary["export"], tokenizer, args.new_tokens)}
    print(table(row))
    for sample in row["completions"]:
        print(json.dumps(sample))
    write_text_atomic(Path(args.json), json.dumps({"cpu": cpu_info(), "rows": [row]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
