"""scripts/bench_pretrain_data.py compares like with like: on one corpus its jaxft pass and its run_clm.py reference
count the same tokens (transformers' ids + EOS per document), less the reference's dropped last partial block."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import transformers

from jaxft.hf.tokenizer import load_tokenizer
from test_text_stream import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
_spec = importlib.util.spec_from_file_location("bench_pretrain_data", ROOT / "scripts" / "bench_pretrain_data.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_both_sides_of_the_rows_benchmark_count_the_same_tokens(tmp_path):
    folder = build_tokenizer(tmp_path / "tok")
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    texts = [f"the quick brown fox {i} jumps over the lazy dog " * (1 + i % 7) for i in range(40)]  # no duplicates
    corpus = tmp_path / "train.jsonl"
    corpus.write_text("".join(json.dumps({"path": f"m{i}.py", "text": t}) + "\n" for i, t in enumerate(texts)))
    total = sum(len(hf(t)["input_ids"]) + 1 for t in texts)
    assert bench.jaxft_pass(corpus, load_tokenizer(folder), 64) == total
    assert bench.reference_pass(corpus, hf, 64) == total // 64 * 64
