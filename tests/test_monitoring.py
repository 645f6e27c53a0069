"""Monitoring a run. Sample replies (``train.sample_every``): the replies logged at a step are the greedy replies of
the model exported at that step, as transformers + PEFT decode them (LoRA on a 3-axis mesh of 8 devices, and prompt
tuning); the log has every sampled step once, also after a resume; runs that cannot sample are refused by name.
TensorBoard: its scalars are metrics.jsonl's numbers, its text events the samples; without tensorboardX a run
that asks for it is refused, naming the extra, before it writes anything."""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from hf_oracle import greedy_tokens, held_out_chats, peft_greedy_replies
from jaxft.config import ConfigError
from jaxft.recipes import sft
from jaxft.recipes.config import load_run_config
from jaxft.recipes.multi import run_parallel
from jaxft.train.metrics import MissingExtra, read_metrics, read_samples
from sft_worker import tiny_chat_model
from test_metrics import read_tensorboard_scalars, read_tensorboard_texts

PROMPTS, NEW_TOKENS = 3, 12


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    root = tmp_path_factory.mktemp("samples")
    return tiny_chat_model(root), root


def _config(chats, name: str, *, peft: str = "[{type: lora, r: 4, lora_alpha: 8, target_modules: all-linear}]",
            steps: int = 4, extra: dict | None = None, mesh: str = "{data: -1, fsdp: 1, tensor: 1}"):
    model, root = chats
    data = {"paths": [str(root / "train.jsonl")], "max_length": 48, "batch_size": 8, "packing": True}
    config = {"model": str(model), "output_dir": str(root / name), "peft": yaml.safe_load(peft), "data": data,
              "eval_data": {**data, "packing": False}, "optim": {"lr": 0.05}, "mesh": yaml.safe_load(mesh),
              "train": {"steps": steps, "log_every": 1, "loss_chunk_size": 0, "sample_every": 2,
                        "sample_prompts": PROMPTS, "sample_max_new_tokens": NEW_TOKENS}}
    for key, value in (extra or {}).items():
        section, _, leaf = key.partition(".")
        config[section] = {**config[section], leaf: value} if leaf else value
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return load_run_config(path)


def _held_out(cfg) -> list[tuple[list[int], str, str]]:
    return held_out_chats(cfg.model, cfg.eval_data.paths[0], PROMPTS)


def _hf_replies(cfg, adapter: Path, greedy) -> list[str]:
    return peft_greedy_replies(cfg.model, adapter, [ids for ids, _, _ in _held_out(cfg)], greedy)


def _generate_greedy(model, ids: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(input_ids=torch.as_tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=0)
    return out[0, len(ids):].tolist()


def _by_step(run_dir) -> dict[int, list[dict]]:
    steps: dict[int, list[dict]] = {}
    for record in read_samples(Path(run_dir) / "samples.jsonl"):
        steps.setdefault(record["step"], []).append(record)
    return steps


@pytest.fixture(scope="module")
def lora_run(chats):
    """A 4-step LoRA run sampling at steps 2 and 4 on a 2 x 2 x 2 mesh, with TensorBoard on: (config, summary)."""
    cfg = _config(chats, "lora", mesh="{data: 2, fsdp: 2, tensor: 2}", extra={"train.tensorboard": True})
    return cfg, sft.run(cfg)


def test_lora_samples_are_the_exported_adapters_greedy_replies_on_a_3_axis_mesh(lora_run):
    cfg, summary = lora_run
    samples = _by_step(cfg.output_dir)
    assert sorted(samples) == [2, 4]
    held_out = _held_out(cfg)
    for records in samples.values():
        assert [(r["prompt"], r["reference"]) for r in records] == [(text, ref) for _, text, ref in held_out]
    want = _hf_replies(cfg, Path(summary["export"]), _generate_greedy)
    assert [r["reply"] for r in samples[4]] == want
    assert any(reply for reply in want)  # the oracle's replies are not all empty: the comparison compares text
    texts = read_tensorboard_texts(Path(cfg.output_dir) / "tensorboard")
    tag = "samples/{}/text_summary"  # tensorboardX's tag of add_text("samples/<i>", ...)
    assert sorted(texts) == sorted((tag.format(i), step) for step in samples for i in range(PROMPTS))
    for step, records in samples.items():
        for i, record in enumerate(records):
            for key in ("prompt", "reply", "reference"):
                assert f"**{key}**\n\n```\n{record[key]}\n```" in texts[(tag.format(i), step)]


def test_tensorboard_scalars_are_the_metrics_log_of_a_run(lora_run):
    """Every number metrics.jsonl holds is a TensorBoard scalar of its split and step, and the log has what a user
    watches: loss, learning rate, grad norm, real tokens/s, padding share and the eval metrics."""
    cfg, _ = lora_run
    scalars = read_tensorboard_scalars(Path(cfg.output_dir) / "tensorboard")
    records = read_metrics(Path(cfg.output_dir) / "metrics.jsonl")
    logged = {(f"{r['split']}/{key}", r["step"]): value for r in records for key, value in r.items()
              if key not in ("step", "split")}
    events = {(tag, step): value for tag, points in scalars.items() for step, value in points}
    assert events.keys() == logged.keys()
    for key, value in logged.items():
        assert events[key] == pytest.approx(np.float32(value), rel=1e-6), key
    tags = {tag for tag, _ in events}
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/padding", "eval/loss",
            "eval/perplexity", "eval/accuracy"} <= tags


def test_prompt_tuning_samples_are_the_exported_adapters_greedy_replies(chats):
    cfg = _config(chats, "prompt", peft="[{type: prompt_tuning, num_virtual_tokens: 4}]", steps=2)
    summary = sft.run(cfg)
    samples = _by_step(cfg.output_dir)
    assert sorted(samples) == [2]
    # PEFT's generate misplaces prompt tuning's virtual tokens after the first step (hf_oracle.greedy_tokens)
    want = _hf_replies(cfg, Path(summary["export"]), lambda model, ids: greedy_tokens(model, ids, NEW_TOKENS))
    assert [r["reply"] for r in samples[2]] == want


def test_a_resumed_run_replaces_the_samples_after_its_checkpoint_and_samples_each_step_once(chats):
    cfg = _config(chats, "resumed", steps=2)
    sft.run(cfg)
    path = Path(cfg.output_dir) / "samples.jsonl"
    # as if the run had gone on, sampled step 4 and been killed before its next checkpoint, mid-line
    path.write_text(path.read_text() + json.dumps({"step": 4, "prompt": "p", "reply": "stale", "reference": "r"})
                    + "\n" + '{"step": 4, "pro')
    sft.run(cfg.replace(train=dataclasses.replace(cfg.train, steps=6)), resume=True)
    samples = _by_step(cfg.output_dir)
    assert sorted(samples) == [2, 4, 6]
    assert all(len(records) == PROMPTS for records in samples.values())
    assert all(r["reply"] != "stale" for r in samples[4])


def test_sample_every_without_eval_data_is_refused_by_name(chats):
    with pytest.raises(ConfigError, match="train.sample_every 2 .* no eval_data"):
        _config(chats, "no-eval", extra={"eval_data": None})


def test_sample_every_on_a_task_that_is_not_sft_is_refused_by_name(chats):
    with pytest.raises(ConfigError, match="train.sample_every .* task 'dpo' is not SFT"):
        _config(chats, "dpo", extra={"task": {"type": "dpo"}})


def test_sample_every_in_parallel_runs_is_refused_by_name(chats):
    with pytest.raises(ConfigError, match="train.sample_every is not supported in parallel runs"):
        run_parallel([_config(chats, "parallel")])




def test_tensorboard_without_its_extra_is_refused_before_the_run_folder_is_written(chats, monkeypatch):
    cfg = _config(chats, "no-tensorboardx", extra={"train.tensorboard": True})
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # makes `import tensorboardX` fail
    with pytest.raises(MissingExtra, match=r"train.tensorboard.*pip install 'jaxft\[tensorboard\]'"):
        sft.run(cfg)
    assert not Path(cfg.output_dir).exists()
