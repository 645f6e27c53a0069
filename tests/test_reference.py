"""A precomputed reference (``task.precompute_reference``, ``task.reference_model``; jaxft.train.reference and
jaxft.recipes.reference): a separate reference model's DPO loss, rewards and gradient norm are TRL's
``DPOTrainer(model, ref_model=...)``'s; runs with precomputed log-probs train as runs with the live adapters-off
reference; full fine-tuning starts at DPO's log 2; the cache in the run folder is reused on resume and recomputed
when the data it was computed on changes; bad settings are refused naming their key; and the step then holds no
reference pass."""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxft
from jaxft.analysis.memory import abstract_model
from jaxft.config import ConfigError, from_dict
from jaxft.data.chat import IGNORE_INDEX, Sample
from jaxft.data.config import DataConfig
from jaxft.data.formats import DataError
from jaxft.peft.lora import LoraConfig
from jaxft.peft.tree import split
from jaxft.recipes import sft, skeleton
from jaxft.recipes.config import RunConfig, TrainConfig
from jaxft.recipes.tasks import DpoTask, KtoTask
from jaxft.train.loop import StepConfig, init_state, jit_train_step
from jaxft.train.objectives import batch_structs
from jaxft.train.optim import OptimConfig, make_optimizer
from jaxft.train.preference import DPO
from jaxft.train.reference import per_token, reference_totals
from sft_worker import train_losses
from test_dpo import BETA, RECORDS, _trl
from test_dpo import setup as dpo_setup  # noqa: F401  (a fixture: TRL's trainers and the packed batch)
from test_preference_runs import setup  # noqa: F401  (a fixture: a tiny base and the example's pairs)

RUN_NUMBERS = itertools.count()
LORA = (LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),)


def _config(setup, task, *, records="pairs", peft=LORA, steps=2, name=None, eval_path=None) -> RunConfig:
    base, files, root = setup
    data = DataConfig(paths=(str(files[records]),), max_length=24, batch_size=8)
    eval_data = DataConfig(paths=(str(eval_path or files[records]),), max_length=24, batch_size=8)
    return RunConfig(model=str(base), output_dir=str(root / (name or f"reference-run-{next(RUN_NUMBERS)}")),
                     task=task, peft=tuple(peft), data=data, eval_data=eval_data,
                     optim=OptimConfig(lr=1e-2, max_grad_norm=1.0),
                     train=TrainConfig(steps=steps, log_every=1, eval_batches=8, loss_chunk_size=0, save_every=2))


def _first_step(cfg: RunConfig) -> tuple[dict, dict]:
    """The first train record of metrics.jsonl and the run's final (= step 1) evaluation."""
    summary = sft.run(cfg)
    records = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in records if r["split"] == "train" and r["step"] == 1), summary["eval"]


def _samples_of(batch: dict) -> list[Sample]:
    """The packed batch's pairs as packing units (prompt + chosen, then prompt + rejected)."""
    samples = []
    for ids, labels, segments in zip(*(np.asarray(batch[k]) for k in ("input_ids", "labels", "segment_ids"))):
        for k in range(1, int(segments.max()) + 1, 2):
            pair = (segments == k) | (segments == k + 1)
            samples.append(Sample(ids[pair], labels[pair], f"pair {len(samples)}",
                                  documents=(int(np.sum(segments == k)), int(np.sum(segments == k + 1)))))
    return samples


def _ref_logps_of(batch: dict, samples: list[Sample], totals: list[np.ndarray]) -> jax.Array:
    """The packed batch's ``ref_logps``: each row's units' per-token arrays, in the order _samples_of took them."""
    out, units = np.zeros(batch["segment_ids"].shape, np.float32), iter(zip(samples, totals))
    for row, segments in enumerate(np.asarray(batch["segment_ids"])):
        at = 0
        for _ in range(0, int(segments.max()), 2):
            sample, total = next(units)
            out[row, at:at + len(sample.input_ids)] = per_token(sample, total)
            at += len(sample.input_ids)
    return jnp.asarray(out)


def test_a_separate_reference_model_gives_trls_loss_rewards_and_grad_norm(dpo_setup):  # noqa: F811
    """TRL's DPOTrainer(policy with a non-zero PEFT adapter, ref_model=another random model) against one jaxft step
    whose reference is that model's log-probs precomputed per unit (one unit per row, as a run precomputes them)."""
    expected = _trl(dpo_setup["trainers"]["separate"], dpo_setup["inputs"], ("sigmoid",), None)
    ref_cfg, ref_params = jaxft.from_pretrained(dpo_setup["root"] / "reference")
    batch = dpo_setup["batch"]
    samples = _samples_of(batch)
    totals = reference_totals(ref_cfg, ref_params, samples, rows=2, row_length=batch["input_ids"].shape[1],
                              pad_id=0, chunk_size=16)
    assert len(samples) == len(RECORDS) and all(t.shape == (2,) for t in totals)
    batch = {**batch, "ref_logps": _ref_logps_of(batch, samples, totals)}
    objective = DPO(beta=BETA, chunk_size=16, precomputed_reference=True)
    assert "ref_logps" in objective.batch_keys and objective.float_keys == {"ref_logps": ()}
    trainable, frozen = jaxft.split(dpo_setup["params"], jaxft.Trainable())
    opt = optax.sgd(0.0)
    _, metrics = jit_train_step(dpo_setup["cfg"], StepConfig(objective=objective), opt)(
        init_state(jax.tree.map(jnp.copy, trainable), opt), frozen, jax.tree.map(lambda x: x[None], batch))
    evaluated = objective.eval_metrics(objective.eval_sums(dpo_setup["cfg"], dpo_setup["params"], batch))
    assert abs(expected["chosen"] - expected["rejected"]) > 1e-3
    np.testing.assert_allclose([metrics["loss"], evaluated["rewards/chosen"], evaluated["rewards/rejected"]],
                               [expected["loss"], expected["chosen"], expected["rejected"]], atol=1e-5, rtol=0)
    np.testing.assert_allclose(metrics["grad_norm"], expected["grad_norm"], atol=1e-4, rtol=0)


def test_per_token_places_each_documents_total_at_its_last_labelled_token():
    sample = Sample(np.arange(7), np.array([IGNORE_INDEX, 5, 6, IGNORE_INDEX, IGNORE_INDEX, 9, IGNORE_INDEX]), "x",
                    documents=(4, 3))
    np.testing.assert_array_equal(per_token(sample, np.array([-1.5, -2.0], np.float32)), [0, 0, -1.5, 0, 0, -2, 0])


@pytest.mark.parametrize("task, records", [(DpoTask(beta=0.1), "pairs"), (KtoTask(beta=0.1), "kto")],
                         ids=["dpo", "kto"])
def test_precomputed_adapters_off_reference_trains_as_the_live_one(setup, task, records):  # noqa: F811
    """The same run with the adapters-off reference in each step and precomputed before training: the same first
    step (loss, grad norm) and the same evaluation."""
    precomputed = type(task)(**{**task.__dict__, "precompute_reference": True})
    live_train, live_eval = _first_step(_config(setup, task, records=records, steps=1))
    cfg = _config(setup, precomputed, records=records, steps=1)
    train, evaluated = _first_step(cfg)
    assert (Path(cfg.output_dir) / "reference" / "process0.json").is_file()
    for key in ("loss", "grad_norm"):
        assert train[key] == pytest.approx(live_train[key], abs=1e-6), key
    assert evaluated.keys() == live_eval.keys()
    for key, value in live_eval.items():
        assert evaluated[key] == pytest.approx(value, abs=1e-6), key


def test_full_fine_tuning_with_a_precomputed_reference_starts_at_log_2(setup):  # noqa: F811
    """peft: [] is allowed with precompute_reference: the reference is the initial weights, which the policy is at
    step 0, so DPO's sigmoid loss is log 2 (Levanter / marin's check, TRL's precompute_ref_log_probs)."""
    cfg = _config(setup, DpoTask(beta=0.1, precompute_reference=True), peft=(), steps=1)
    sft.run(cfg)
    assert train_losses(Path(cfg.output_dir))[1] == pytest.approx(math.log(2), abs=1e-6)


@pytest.fixture(scope="module")
def reference_folder(setup):  # noqa: F811
    """A different random model with the base's tokenizer: the separate reference."""
    base, _, root = setup
    folder = root / "other-reference"
    base_cfg, _ = jaxft.from_pretrained(base)
    jaxft.save_pretrained(base_cfg, jaxft.init_params(base_cfg, jax.random.PRNGKey(7)), folder)
    return folder


def test_a_resumed_run_reuses_the_cache_and_trains_as_an_uninterrupted_one(setup, reference_folder, capfd):  # noqa
    task = DpoTask(beta=0.1, reference_model=str(reference_folder))
    whole = _config(setup, task, steps=4)
    sft.run(whole)
    assert "cached at" in capfd.readouterr().err
    half = _config(setup, task, steps=2, name="reference-resumed")
    sft.run(half)
    cache = Path(half.output_dir) / "reference" / "process0.safetensors"
    written = cache.stat().st_mtime_ns
    capfd.readouterr()
    sft.run(_config(setup, task, steps=4, name="reference-resumed"), resume=True)
    assert "reused from" in capfd.readouterr().err and cache.stat().st_mtime_ns == written
    resumed, uninterrupted = train_losses(Path(half.output_dir)), train_losses(Path(whole.output_dir))
    assert resumed[1] != pytest.approx(math.log(2), abs=1e-3)  # the reference is not the policy's base
    for step in range(1, 5):
        assert resumed[step] == pytest.approx(uninterrupted[step], abs=1e-6), step


def test_changed_data_recomputes_the_cache_or_is_refused_by_the_resume(setup, tmp_path, capfd):  # noqa: F811
    """Other eval data (a change a resume may make) gets its log-probs computed again; a changed train file is the
    resume's DataError (the checkpoint's data position belongs to the old data)."""
    _, files, _ = setup
    cfg = _config(setup, DpoTask(beta=0.1, precompute_reference=True), steps=2, name="reference-changed")
    sft.run(cfg)
    fingerprint = json.loads((Path(cfg.output_dir) / "reference" / "process0.json").read_text())
    other = tmp_path / "other.jsonl"
    other.write_text("".join(files["pairs"].read_text().splitlines(keepends=True)[:12]))
    capfd.readouterr()
    longer = _config(setup, cfg.task, steps=4, name="reference-changed", eval_path=other)
    sft.run(longer, resume=True)
    assert "cached at" in capfd.readouterr().err
    changed = json.loads((Path(cfg.output_dir) / "reference" / "process0.json").read_text())
    assert changed["data"]["eval"] != fingerprint["data"]["eval"] and changed["data"]["train"] == fingerprint[
        "data"]["train"]
    train_copy = tmp_path / "train.jsonl"
    train_copy.write_text(files["pairs"].read_text())
    files["pairs"].write_text(other.read_text())  # the train file changed in place: the config stays the same
    try:
        with pytest.raises(DataError, match="does not match this data"):
            sft.run(_config(setup, cfg.task, steps=6, name="reference-changed", eval_path=other), resume=True)
    finally:
        files["pairs"].write_text(train_copy.read_text())


def test_bad_reference_settings_are_refused_naming_the_key(setup, tmp_path):  # noqa: F811
    base, files, root = setup
    with pytest.raises(ConfigError, match="reference_model .*no config.json"):
        DpoTask(reference_model=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="reference_model .*no config.json"):
        KtoTask(reference_model=str(tmp_path))
    tree = {"model": str(base), "output_dir": str(root / "refused"), "data": {"paths": [str(files["pairs"])]}}
    for kind in ("orpo", "simpo", "reward"):
        with pytest.raises(ConfigError, match="precompute_reference"):
            from_dict(RunConfig, {**tree, "task": {"type": kind, "precompute_reference": True}})
    with pytest.raises(ConfigError, match="precompute_reference.*reference_model"):
        from_dict(RunConfig, {**tree, "task": {"type": "kto"}, "peft": []})


def _step_flops(cfg: RunConfig) -> float:
    model_cfg, params, _ = abstract_model(cfg)
    trainable, frozen = split(params, skeleton.trainable_spec(cfg, model_cfg, params))
    optimizer = make_optimizer(cfg.optim)
    state = jax.eval_shape(lambda t: init_state(t, optimizer), trainable)
    step = jit_train_step(model_cfg, skeleton.step_config(cfg), optimizer)
    batch = batch_structs(cfg.objective(), (1, cfg.data.batch_size, cfg.row_length))
    return step.lower(state, frozen, batch).compile().cost_analysis()["flops"]


def test_a_precomputed_reference_takes_no_reference_pass_in_the_step(setup):  # noqa: F811
    """The step's compiled FLOPs: forward + backward (about 3 forwards) instead of 4 with the live reference."""
    live = _config(setup, DpoTask(beta=0.1))
    precomputed = _config(setup, DpoTask(beta=0.1, precompute_reference=True))
    assert "ref_logps" in batch_structs(precomputed.objective(), (1, 8, 48))
    ratio = _step_flops(precomputed) / _step_flops(live)
    assert 0.65 < ratio < 0.85, ratio
