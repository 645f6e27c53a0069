"""What a run reports: periodic evaluations score the same eval batches every time, and tokens/s counts real
(non-padding) tokens with the padding share beside it. Oracles: numpy over the batches of a fresh data pipeline."""
import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

import jaxft
from jaxft.data import DataConfig, build_iterator
from jaxft.recipes import multi, sft
from jaxft.recipes.config import TrainConfig
from sft_worker import run_config, tiny_chat_model, write_chats

EVAL_BATCHES, STEPS = 2, 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("reports")
    model = tiny_chat_model(root)
    write_chats(root / "eval.jsonl", 40, seed=1)
    cfg = run_config(model, root / "train.jsonl", root / "run", batch_size=8, packing=False, steps=STEPS,
                     lr=1e-30)  # an update far below float32 resolution: every evaluation sees the same params
    cfg = dataclasses.replace(
        cfg, eval_data=DataConfig(paths=(str(root / "eval.jsonl"),), max_length=48, batch_size=8, seed=0),
        train=TrainConfig(steps=STEPS, log_every=1, eval_every=1, eval_batches=EVAL_BATCHES, loss_chunk_size=0))
    return root, cfg


def _records(run_dir, split):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


def _numpy_eval(cfg, batches):
    """Mean target cross-entropy and target count of ``batches`` from jaxft.forward's logits, in numpy."""
    model_cfg, params = jaxft.from_pretrained(cfg.model)
    loss, n = 0.0, 0
    for b in batches:
        logits = np.asarray(jaxft.forward(model_cfg, params, jnp.asarray(b["input_ids"]), jnp.asarray(b["positions"]),
                                          jnp.asarray(b["segment_ids"])), np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        mask = b["labels"] != -100
        loss -= np.take_along_axis(logp, np.where(mask, b["labels"], 0)[..., None], -1)[..., 0][mask].sum()
        n += int(mask.sum())
    return loss / n, n


def _train_batches(cfg, n):
    it = build_iterator(cfg.data, jaxft.load_tokenizer(cfg.model)).iterator
    return [next(it) for _ in range(n)]


def test_every_evaluation_scores_the_same_first_batches(setup):
    root, cfg = setup
    summary = sft.run(cfg)
    evals = _records(root / "run", "eval")
    assert [r["step"] for r in evals] == [1, 2, 3]
    fresh = build_iterator(cfg.eval_data, jaxft.load_tokenizer(cfg.model)).iterator
    assert fresh.batches_per_epoch > EVAL_BATCHES, "the eval set must be larger than what one evaluation reads"
    loss, n_targets = _numpy_eval(cfg, [next(fresh) for _ in range(EVAL_BATCHES)])
    for r in evals:
        assert {k: r[k] for k in ("loss", "accuracy", "tokens")} == {k: evals[0][k] for k in ("loss", "accuracy",
                                                                                               "tokens")}
    assert evals[0]["tokens"] == n_targets
    np.testing.assert_allclose(evals[0]["loss"], loss, rtol=2e-6)
    assert summary["eval"]["loss"] == evals[-1]["loss"]


def test_tokens_per_s_counts_real_tokens_and_reports_padding(setup):
    root, cfg = setup
    train = _records(root / "run", "train")
    batches = _train_batches(cfg, STEPS)
    real = [int(np.count_nonzero(b["segment_ids"])) for b in batches]
    slots = [b["segment_ids"].size for b in batches]
    assert all(r < s for r, s in zip(real, slots)), "unpacked rows must hold padding for this test to mean much"
    for k, record in enumerate(train):
        np.testing.assert_allclose(record["padding"], 1 - sum(real[:k + 1]) / sum(slots[:k + 1]), rtol=1e-12)
    # step 2 is the first timed step (step 1 compiles): its median over one step is real tokens / its time
    np.testing.assert_allclose(train[1]["tokens_per_s"] * train[1]["step_time_s"], real[1], rtol=1e-9)
    summary = json.loads((root / "run" / "summary.json").read_text())
    assert summary["padding"] == train[-1]["padding"] and summary["tokens_per_s"] == train[-1]["tokens_per_s"]


def test_parallel_runs_count_real_tokens_too(setup):
    root, cfg = setup
    cfgs = [dataclasses.replace(cfg, output_dir=str(root / f"par{k}"), lora=cfg.lora.replace(r=r))
            for k, r in enumerate((2, 4))]
    cfgs = [dataclasses.replace(c, eval_data=None, train=dataclasses.replace(c.train, eval_every=0)) for c in cfgs]
    summaries = multi.run_parallel(cfgs)
    batches = _train_batches(cfg, STEPS)
    real, slots = sum(int(np.count_nonzero(b["segment_ids"])) for b in batches), sum(b["segment_ids"].size
                                                                                      for b in batches)
    for k, summary in enumerate(summaries):
        np.testing.assert_allclose(summary["padding"], 1 - real / slots, rtol=1e-12)
        record = _records(root / f"par{k}", "train")[1]
        np.testing.assert_allclose(record["tokens_per_s"] * record["step_time_s"],
                                   np.count_nonzero(batches[1]["segment_ids"]), rtol=1e-9)
