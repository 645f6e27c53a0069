"""examples/pretrain_stdlib/run.py on a small stand-in for the standard library: the corpus split, the unigram
baseline (against a direct count), and the whole script with a tiny model, whose baseline must score exactly the
held-out targets the run's evaluation scored."""
from __future__ import annotations

import importlib.util
import json
import math
import sysconfig
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("pretrain_stdlib_run", ROOT / "examples" / "pretrain_stdlib" / "run.py")
run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run)

TINY_MODEL = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=2",
              "model.num_attention_heads=2", "model.num_key_value_heads=2", "data.max_length=32",
              "data.batch_size=8", "eval_data.max_length=32", "eval_data.batch_size=8", "optim.warmup_steps=1",
              "train.eval_every=0", "train.eval_batches=2", "train.log_every=1"]


@pytest.fixture
def fake_stdlib(tmp_path, monkeypatch) -> Path:
    """A stdlib folder of 60 modules, a test suite, site-packages and a file that is not UTF-8."""
    root = tmp_path / "lib"
    for i in range(60):
        module = root / ("pkg" if i % 3 else "") / f"mod{i}.py"
        module.parent.mkdir(parents=True, exist_ok=True)
        body = f'"""Module {i}."""\n\n\ndef f{i}(x):\n    """Return x plus {i}."""\n    return x + {i}\n'
        module.write_text(body * 3)
    for skipped in ("test/test_x.py", "pkg/tests/t.py", "idlelib/idle_test/t.py", "site-packages/p/q.py"):
        (root / skipped).parent.mkdir(parents=True, exist_ok=True)
        (root / skipped).write_text("never read = 1\n")
    (root / "latin.py").write_bytes("x = 'café'\n".encode("latin-1"))
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(root)})
    return root


def test_the_corpus_splits_every_utf8_module_by_its_path_hash(fake_stdlib, tmp_path):
    sizes = run.write_corpus(tmp_path / "corpus", share=0.25)
    read = {name: [json.loads(line) for line in (tmp_path / "corpus" / f"{name}.jsonl").read_text().splitlines()]
            for name in ("train", "heldout")}
    modules = {p.relative_to(fake_stdlib).as_posix() for p in fake_stdlib.rglob("mod*.py")}
    train, heldout = ({r["path"] for r in read[name]} for name in ("train", "heldout"))
    assert train | heldout == modules and not train & heldout  # no test suite, site-packages or non-UTF-8 file
    assert sizes["not_utf8"] == 1 and sizes["heldout"]["files"] == len(heldout)
    assert all(r["text"] == (fake_stdlib / r["path"]).read_text() for r in read["heldout"])
    assert 5 <= len(heldout) <= 25  # a quarter of 60, give or take the hash
    again = run.write_corpus(tmp_path / "again", share=0.25)
    assert again == sizes and (tmp_path / "again" / "heldout.jsonl").read_text() == (
        tmp_path / "corpus" / "heldout.jsonl").read_text()


def test_the_unigram_baseline_is_the_add_one_smoothed_frequency_model():
    rng = np.random.default_rng(0)
    train, targets, vocab = rng.integers(0, 20, 500), rng.integers(0, 25, 200), 25
    counts = Counter(train.tolist())
    nll = [-math.log((counts[t] + 1) / (len(train) + vocab)) for t in targets.tolist()]
    assert run.unigram_perplexity(train, vocab, targets) == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-12)


@pytest.mark.slow
def test_the_script_end_to_end_scores_the_baseline_on_the_evaluated_targets(fake_stdlib, tmp_path):
    out = tmp_path / "result.json"
    assert run.main(["--work", str(tmp_path / "work"), "--steps", "3", "--vocab", "300", "--held-out", "0.25",
                     "--new-tokens", "4", "--json", str(out), *[a for s in TINY_MODEL for a in ("--set", s)]]) == 0
    row = json.loads(out.read_text())["rows"][0]
    summary = json.loads((tmp_path / "work" / "run" / "summary.json").read_text())
    assert row["heldout_tokens"] == summary["eval"]["tokens"]  # the same targets on both sides of the comparison
    assert row["heldout_perplexity"] == summary["eval"]["perplexity"] and row["steps"] == 3
    assert row["mfu"] == summary["mfu"] and len(row["completions"]) == len(run.PROMPTS)
    assert [r["step"] for r in row["loss_curve"]] == [1, 2, 3]
