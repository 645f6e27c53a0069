"""A task and objective defined only in this file train through the ordinary recipe (``sft.run`` on the run
skeleton: run folder, data pipeline, mesh, step, eval, export), and the run sharded on 8 devices equals the run on
1 device: what a next objective (reward model, DPO, distillation) needs from jaxft is a class and a registry entry.

The runs happen in their own processes (``python tests/test_objective_run.py SPEC.json``), because the number of
devices is fixed when jax starts.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import yaml

from sft_worker import run_script

HERE = Path(__file__).resolve()


@dataclass(frozen=True)
class LogitRegression:
    """Per-token squared error between the logit of one token id and 1 on target tokens (labels != -100), 0 on the
    other real tokens; one unit per real token (segment id != 0)."""

    token: int = 3
    batch_keys: ClassVar[tuple[str, ...]] = ("input_ids", "labels", "segment_ids")

    def units(self, batches):
        import jax.numpy as jnp

        return jnp.sum(batches["segment_ids"] != 0, dtype=jnp.int32).astype(jnp.float32)

    def _squared_errors(self, cfg, params, batch, rng=None, activation_sharding=None):
        import jax.numpy as jnp

        from jaxft.models.llama import hidden_states, logits_from_hidden

        h = hidden_states(cfg, params, batch["input_ids"], segment_ids=batch["segment_ids"], rng=rng,
                          activation_sharding=activation_sharding).hidden
        target = (batch["labels"] != -100).astype(jnp.float32)
        error = jnp.square(logits_from_hidden(cfg, params, h)[..., self.token] - target)
        return jnp.where(batch["segment_ids"] != 0, error, 0.0)

    def loss_sum(self, cfg, params, batch, rng=None, activation_sharding=None):
        return self._squared_errors(cfg, params, batch, rng, activation_sharding).sum()

    def eval_sums(self, cfg, params, batch):
        return {"squared_error": self._squared_errors(cfg, params, batch).sum(), "tokens": self.units(batch)}

    def eval_metrics(self, sums):
        return {"mse": float(sums["squared_error"]) / float(sums["tokens"])}


@dataclass(frozen=True)
class LogitRegressionTask:
    """``task: {type: logit_regression}``: the run's step and evaluation use :class:`LogitRegression`."""

    token: int = 3

    def objective(self, train):
        return LogitRegression(self.token)


def worker(spec_path: str) -> None:
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")  # as conftest.py sets it for in-process tests
    from jaxft.recipes import sft
    from jaxft.recipes.config import TASK_UNION, load_run_config

    TASK_UNION.members["logit_regression"] = LogitRegressionTask  # this process's registry only
    spec = json.loads(Path(spec_path).read_text())
    summary = sft.run(load_run_config(spec["config"]))
    Path(spec["result"]).write_text(json.dumps({"summary": summary, "devices": jax.device_count()}))


def _train(root: Path, name: str, devices: int, mesh: dict) -> dict:
    config = {"model": str(root / "model"), "output_dir": str(root / name), "method": "lora",
              "task": {"type": "logit_regression", "token": 3},
              "data": {"paths": [str(root / "train.jsonl")], "max_length": 32, "batch_size": 8},
              "eval_data": {"paths": [str(root / "train.jsonl")], "max_length": 32, "batch_size": 8},
              "lora": {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]},
              "optim": {"lr": 0.01}, "mesh": mesh,
              "train": {"steps": 4, "grad_accum": 2, "log_every": 1, "eval_batches": 1}}
    return run_script(HERE, root, name, config, devices)


def _train_losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["split"] == "train"]


@pytest.mark.slow
def test_a_task_defined_here_trains_through_the_recipe_and_8_devices_equal_1(tiny_run):
    from safetensors.numpy import load_file

    one = _train(tiny_run, "one_device", 1, {"data": -1})
    eight = _train(tiny_run, "eight_devices", 8, {"data": 2, "fsdp": 2, "tensor": 2})

    assert one["eval"].keys() == {"mse"}  # the evaluation is the objective's own
    np.testing.assert_allclose(eight["eval"]["mse"], one["eval"]["mse"], rtol=1e-4)
    losses = _train_losses(tiny_run / "one_device")
    assert len(losses) == 4 and losses[-1] < losses[0]  # it learns the regression target
    np.testing.assert_allclose(_train_losses(tiny_run / "eight_devices"), losses, rtol=1e-4)
    adapter_one = load_file(tiny_run / "one_device" / "adapter" / "adapter_model.safetensors")
    adapter_eight = load_file(tiny_run / "eight_devices" / "adapter" / "adapter_model.safetensors")
    assert adapter_one.keys() == adapter_eight.keys() and any("lora_B" in k for k in adapter_one)
    for name, value in adapter_one.items():
        assert np.abs(value).max() > 0, name  # every adapter tensor trained away from zero (B starts at zero)
        np.testing.assert_allclose(adapter_eight[name], value, rtol=1e-3, atol=1e-6, err_msg=name)
    saved = yaml.safe_load((tiny_run / "one_device" / "config.yaml").read_text())
    assert saved["task"] == {"type": "logit_regression", "token": 3}


if __name__ == "__main__":
    worker(sys.argv[1])
