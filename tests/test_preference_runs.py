"""Preference tasks through whole runs (``task: reward | dpo | orpo | simpo | kto``): each trains on its data and
reports its metrics, and the runs that compare with the adapters-off reference start where the policy equals it
(LoRA's B starts at zero): DPO's sigmoid loss is exactly log 2 at the first step (Levanter / marin's check), KTO's
is 1/2 (each example's 1 - σ(0))."""
from __future__ import annotations

import itertools
import json
import math
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxft.config import ConfigError
from jaxft.data.config import DataConfig
from jaxft.peft.bitfit import BitFit
from jaxft.peft.lora import LoraConfig
from jaxft.recipes import demo, sft
from jaxft.recipes.config import RunConfig, TrainConfig
from jaxft.recipes.tasks import DpoTask, KtoTask, OrpoTask, RewardTask, SimpoTask
from jaxft.train.metrics import read_metrics
from jaxft.train.optim import OptimConfig
from jaxft.train.preference import DPO
from sft_worker import make_base, train_losses

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import preference  # noqa: E402  (the example's pairs: the right answer against the model's wrong one)

RUN_NUMBERS = itertools.count()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("preference")
    rng = np.random.default_rng(0)
    problems = [tuple(int(d) for d in rng.integers(0, 10, 4)) for _ in range(24)]
    echoes = [(demo.words(p), True) for p in problems]  # a model that repeats the digits: wrong in every one
    pairs = preference.on_policy_pairs(problems, echoes)
    files = {"pairs": preference.write_jsonl(root / "pairs.jsonl", pairs),
             "kto": preference.write_jsonl(root / "kto.jsonl", [r for p in pairs for r in preference.unpaired(p)])}
    return make_base(root / "base"), files, root


def _run(setup, task, records="pairs", peft=(LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),)):
    base, files, root = setup
    data = DataConfig(paths=(str(files[records]),), max_length=24, batch_size=8)
    cfg = RunConfig(model=str(base), output_dir=str(root / f"run-{next(RUN_NUMBERS)}"), task=task, peft=tuple(peft),
                    data=data, eval_data=data, optim=OptimConfig(lr=1e-2, max_grad_norm=1.0),
                    train=TrainConfig(steps=4, log_every=1, eval_batches=8, loss_chunk_size=0))
    summary = sft.run(cfg)
    return summary, train_losses(Path(cfg.output_dir))


def test_dpo_starts_at_log_2_against_the_adapters_off_reference_and_reports_trls_metrics(setup):
    summary, losses = _run(setup, DpoTask(beta=0.1))
    assert losses[1] == pytest.approx(math.log(2), abs=1e-6)
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= summary["eval"].keys()
    assert summary["eval"]["pairs"] == 24  # every pair of the eval file, once
    assert json.loads((Path(summary["export"]) / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"


def test_dpo_run_logs_trls_step_metrics_and_draws_them(setup):
    """Every train record of metrics.jsonl holds the step's DPO metrics (TRL's names), and curves.png has the
    preference panel beside loss and learning rate: 3 panels of 5 inches at 100 dpi."""
    summary, _ = _run(setup, DpoTask(beta=0.1))
    out = Path(summary["export"]).parent
    train = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for record in train:
        assert set(DPO.step_metric_keys) <= record.keys() and 0 <= record["rewards/accuracies"] <= 1
    # the adapters start as the reference (B = 0): margin 0 up to float32 rounding of the two passes
    assert train[0]["rewards/margins"] == pytest.approx(0, abs=1e-6) and train[-1]["rewards/margins"] > 1e-3
    width, height = struct.unpack(">II", (out / "curves.png").read_bytes()[16:24])  # the PNG header's IHDR size
    assert (width, height) == (1500, 400)


def test_kto_starts_at_one_half(setup):
    summary, losses = _run(setup, KtoTask(beta=0.1), records="kto")
    assert losses[1] == pytest.approx(0.5, abs=1e-6)
    assert {"kl", "rewards/chosen", "rewards/rejected"} <= summary["eval"].keys()


@pytest.mark.parametrize("task", [OrpoTask(beta=0.1), SimpoTask()], ids=["orpo", "simpo"])
def test_reference_free_objectives_train_and_report(setup, task):
    summary, losses = _run(setup, task)
    assert all(np.isfinite(list(losses.values()))) and losses[4] < losses[1]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins"} <= summary["eval"].keys()


def test_reward_model_trains_a_score_head_saved_with_the_adapter(setup):
    summary, losses = _run(setup, RewardTask())
    assert {"accuracy", "margin"} <= summary["eval"].keys()
    config = json.loads((Path(summary["export"]) / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]


def test_a_reference_task_without_adapters_is_refused(setup):
    base, files, root = setup
    with pytest.raises(ConfigError, match="full fine-tuning .* has no adapters to switch off"):
        RunConfig(model=str(base), output_dir=str(root / "refused"), task=DpoTask(), peft=(),
                  data=DataConfig(paths=(str(files["pairs"]),)))


@pytest.mark.parametrize("peft", [(LoraConfig(bias="all"),), (LoraConfig(modules_to_save=("lm_head",)),),
                                  (LoraConfig(), BitFit())], ids=["bias", "modules_to_save", "bitfit"])
def test_an_adapters_off_reference_with_base_leaves_trained_in_place_is_refused(setup, peft):
    """Switching the adapters off would leave trained biases or saved modules in the reference, which would then
    move with the policy; the initial weights, precomputed, are a fixed reference whatever trains."""
    base, files, root = setup
    common = dict(model=str(base), output_dir=str(root / "refused"), peft=peft,
                  data=DataConfig(paths=(str(files["kto"]),)))
    with pytest.raises(ConfigError, match="base's own leaves .*precompute_reference"):
        RunConfig(task=KtoTask(), **common)
    assert RunConfig(task=KtoTask(precompute_reference=True), **common).task.precomputed_reference
