"""``jaxft plot``: runs are labelled by the settings that tell them apart, every eval metric gets a panel beside the
train loss, and the command refuses folders that are no runs and files it would overwrite."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import pytest

from jaxft.cli import main
from jaxft.data.config import DataConfig
from jaxft.peft.lora import LoraConfig
from jaxft.recipes.config import RunConfig, TrainConfig, dump_run_config
from jaxft.recipes.plot import run_curves, run_labels
from jaxft.train.optim import OptimConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(root: Path, name: str, r: int = 8, lr: float = 1e-3, seed: int = 0, steps: int = 4) -> Path:
    """A run folder as `jaxft train` leaves it, as far as plotting reads it: config.yaml and metrics.jsonl (loss
    falling from 3 by r / 8 per step, an eval at the end with a count among its metrics)."""
    out = root / name
    out.mkdir(parents=True)
    cfg = RunConfig(model=str(root / "model"), output_dir=str(out), data=DataConfig(paths=(str(root / "d.jsonl"),)),
                    lora=LoraConfig(r=r, lora_alpha=2 * r), optim=OptimConfig(lr=lr),
                    train=TrainConfig(steps=steps, seed=seed))
    dump_run_config(cfg, out / "config.yaml")
    records = [{"step": s, "split": "train", "loss": 3.0 - s * r / 8, "lr": lr} for s in range(1, steps + 1)]
    records.append({"step": steps, "split": "eval", "loss": 2.0, "perplexity": 7.389, "accuracy": 0.25,
                    "tokens": 120})
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return out


def test_labels_name_the_settings_that_differ_between_the_runs(tmp_path):
    runs = [_run(tmp_path, "a", r=8, lr=1e-3), _run(tmp_path, "b", r=16, lr=1e-3), _run(tmp_path, "c", r=8, lr=3e-4)]
    assert run_labels(runs) == ["lora.lora_alpha=16, lora.r=8, optim.lr=0.001",
                                "lora.lora_alpha=32, lora.r=16, optim.lr=0.001",
                                "lora.lora_alpha=16, lora.r=8, optim.lr=0.0003"]


def test_runs_that_no_setting_tells_apart_are_labelled_by_their_folders(tmp_path):
    runs = [_run(tmp_path, "first"), _run(tmp_path, "again"), _run(tmp_path, "seed1", seed=1)]
    assert run_labels(runs) == ["first: train.seed=0", "again: train.seed=0", "seed1: train.seed=1"]
    assert run_labels(runs[:1]) == ["first"]


def test_curves_are_the_train_loss_and_the_float_eval_metrics(tmp_path):
    curves = run_curves(_run(tmp_path, "a", r=8, steps=3))
    assert curves == {"train loss": ([1, 2, 3], [2.0, 1.0, 0.0]), "eval loss": ([3], [2.0]),
                      "eval perplexity": ([3], [7.389]), "eval accuracy": ([3], [0.25])}


def test_plot_command_writes_one_panel_per_curve_and_refuses_to_overwrite(tmp_path, capsys):
    runs = [str(_run(tmp_path, "a", r=8)), str(_run(tmp_path, "b", r=16))]
    out = tmp_path / "curves.png"
    assert main(["plot", *runs, "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    height, width, _ = matplotlib.image.imread(out).shape
    assert (width, height) == (4 * 600, 450)  # train loss, eval accuracy, loss, perplexity: 6 x 4.5 in at 100 dpi
    assert main(["plot", *runs, "--out", str(out)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main(["plot", *runs[:1], "--out", str(out), "--overwrite"]) == 0
    assert matplotlib.image.imread(out).shape[:2] == (450, 2400)


@pytest.mark.parametrize("missing", ["metrics.jsonl", "config.yaml"])
def test_a_folder_that_is_no_run_is_refused_by_name(tmp_path, capsys, missing):
    run = _run(tmp_path, "a")
    (run / missing).unlink()
    assert main(["plot", str(run), "--out", str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err
    assert f"{run}: no {missing} there" in err
    assert not (tmp_path / "c.png").exists()
