"""Multi-host runs from the command line: two real ``jaxft train`` processes on 127.0.0.1 (gloo CPU collectives,
one CPU device each) train one LoRA run on a global mesh of 2 devices, and resume it, exactly as one process with
2 devices trains the same global batches; a half-set JAXFT_* environment is refused before anything runs.

The data has one unpacked batch per epoch (10 chats; each of the 2 processes feeds 5 rows, the single process 10),
so every global batch holds every record and the two runs see the same batches (as in tests/test_multihost.py).
"""
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from jaxft import parallel
from jaxft.cli import main
from process_pair import TIMEOUT_S, cpu_env, run_pair, train_args
from sft_worker import tiny_chat_model

N_RECORDS = 10  # tiny_chat_model's train.jsonl
FIRST_STEPS, ALL_STEPS = 2, 4


def _write_config(root: Path, name: str, batch_size: int, steps: int) -> Path:
    config = {"model": str(root / "model"), "output_dir": str(root / name), "method": "lora",
              "data": {"paths": [str(root / "train.jsonl")], "max_length": 32, "batch_size": batch_size,
                       "packing": False},
              "lora": {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]},
              "optim": {"lr": 1e-2}, "train": {"steps": steps, "log_every": 1, "loss_chunk_size": 0}}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost-cli")
    tiny_chat_model(root)
    single = {}
    for steps in (FIRST_STEPS, ALL_STEPS):  # one process, 2 devices, the whole global batch
        config = _write_config(root, f"one-{steps}", N_RECORDS, steps)
        subprocess.run(train_args(config), env=cpu_env(root, 2), check=True, capture_output=True, timeout=TIMEOUT_S)
        single[steps] = root / f"one-{steps}"
    pair_config = _write_config(root, "two", N_RECORDS // 2, FIRST_STEPS)  # data.batch_size is per process
    first = run_pair(root, train_args(pair_config))
    first_adapter = load_file(root / "two" / "adapter" / "adapter_model.safetensors")
    first_metrics = (root / "two" / "metrics.jsonl").read_text()
    resumed = run_pair(root, train_args(pair_config, "--resume", "--set", f"train.steps={ALL_STEPS}"))
    sweep_config = yaml.safe_load(pair_config.read_text())
    sweep_config["eval_data"] = {**sweep_config["data"], "paths": [str(root / "train.jsonl")]}
    (root / "sweep.yaml").write_text(yaml.safe_dump(sweep_config))
    sweep = run_pair(root, [sys.executable, "-m", "jaxft", "sweep", str(root / "sweep.yaml"), "--grid", "lora.r=2",
                             "--exact-match", "2", "--out", str(root / "sweep")])
    eval_argv = ["eval", str(root / "model"), "--adapter", str(root / "two" / "adapter"), "--data",
                 str(root / "train.jsonl"), "--max-length", "32", "--batch-size", "4"]
    evaluated = run_pair(root, [sys.executable, "-m", "jaxft", *eval_argv])
    return {"single": single, "two": root / "two", "first": first, "resumed": resumed, "sweep": sweep,
            "sweep_dir": root / "sweep", "first_adapter": first_adapter, "first_metrics": first_metrics,
            "eval": evaluated, "eval_argv": eval_argv}


def _adapter(run_dir: Path) -> dict:
    return load_file(Path(run_dir) / "adapter" / "adapter_model.safetensors")


def _assert_same_tensors(got: dict, want: dict):
    assert sorted(got) == sorted(want) and len(want) == 8  # A and B of q and v in 2 layers
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-5, rtol=0, err_msg=name)


def _train_steps(metrics_text: str) -> list[int]:
    """The train records' steps in file order (a replayed or doubly written step would show twice)."""
    records = [json.loads(line) for line in metrics_text.splitlines()]
    return [r["step"] for r in records if r["split"] == "train"]


def _losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


@pytest.mark.slow
def test_two_cli_processes_export_the_adapter_of_one_process_with_the_same_global_batch(runs):
    want = _adapter(runs["single"][FIRST_STEPS])
    _assert_same_tensors(runs["first_adapter"], want)
    diff = max(float(np.max(np.abs(runs["first_adapter"][k] - want[k]))) for k in want)
    print(f"max |adapter diff| 2 processes vs 1 after {FIRST_STEPS} steps: {diff:.2e}")
    assert any(np.abs(want[k]).max() > 1e-3 for k in want if "lora_B" in k)  # it trained: B left zero
    assert _train_steps(runs["first_metrics"]) == list(range(1, FIRST_STEPS + 1))  # one writer, no duplicates


@pytest.mark.slow
def test_resumed_pair_continues_from_its_checkpoint_and_equals_the_full_single_run(runs):
    assert _train_steps((runs["two"] / "metrics.jsonl").read_text()) == list(range(1, ALL_STEPS + 1))
    _assert_same_tensors(_adapter(runs["two"]), _adapter(runs["single"][ALL_STEPS]))
    one, two = _losses(runs["single"][ALL_STEPS]), _losses(runs["two"])
    np.testing.assert_allclose([two[s] for s in sorted(one)], [one[s] for s in sorted(one)], atol=1e-5, rtol=0)
    steps = sorted(int(p.name) for p in (runs["two"] / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [FIRST_STEPS, ALL_STEPS]
    assert yaml.safe_load((runs["two"] / "config.yaml").read_text())["train"]["steps"] == ALL_STEPS


@pytest.mark.slow
def test_only_process_0_reports_and_prints_the_summary(runs):
    for (out0, err0), (out1, err1) in (runs["first"], runs["resumed"]):
        assert "jaxft train: process 0/2, 1 local devices, 2 global devices (cpu)" in err0
        assert "process 1/2" not in err0 + err1 and "global devices" not in err1
        assert json.loads(out0)["steps"] in (FIRST_STEPS, ALL_STEPS) and out1 == ""
    assert json.loads(runs["resumed"][0][0])["final_loss"] == pytest.approx(_losses(runs["two"])[ALL_STEPS])


@pytest.mark.slow
def test_a_two_process_sweep_trains_like_one_process_and_process_0_alone_writes_the_tables(runs):
    (out0, _), (out1, err1) = runs["sweep"]
    sweep_dir = runs["sweep_dir"]
    [run_dir] = [p.parent for p in sweep_dir.glob("*/summary.json")]
    _assert_same_tensors(_adapter(run_dir), _adapter(runs["single"][FIRST_STEPS]))
    assert _train_steps((run_dir / "metrics.jsonl").read_text()) == list(range(1, FIRST_STEPS + 1))
    [row] = json.loads((sweep_dir / "sweep.json").read_text())["rows"]
    assert row["final_loss_mean"] == pytest.approx(_losses(runs["single"][FIRST_STEPS])[FIRST_STEPS], abs=1e-5)
    assert row["eval_exact_match_mean"] == json.loads((run_dir / "summary.json").read_text())["eval"]["exact_match"]
    assert out0.endswith((sweep_dir / "sweep.md").read_text() + "\n") and "sweep: run 1/1" in out0
    assert out1 == "" and "global devices" not in err1  # process 1 logs nothing
    assert len((sweep_dir / "sweep.csv").read_text().splitlines()) == 2  # header + one row, written once


@pytest.mark.slow
def test_a_two_process_eval_prints_one_json_equal_to_one_process(runs, capsys):
    (out0, err0), (out1, _) = runs["eval"]
    assert out1 == "" and "jaxft eval: process 0/2" in err0
    assert main(runs["eval_argv"]) == 0  # the oracle: this one process
    want = json.loads(capsys.readouterr().out)
    got = json.loads(out0)  # all of process 0's stdout is the JSON
    assert got.keys() == want.keys() and got["tokens"] == want["tokens"] and got["batches"] == want["batches"]
    np.testing.assert_allclose([got["loss"], got["accuracy"]], [want["loss"], want["accuracy"]], rtol=1e-6)


@pytest.mark.parametrize("env, names", [
    ({"JAXFT_COORDINATOR": "127.0.0.1:1234", "JAXFT_NUM_PROCESSES": "2"}, "JAXFT_PROCESS_ID is not set"),
    ({"JAXFT_PROCESS_ID": "0"}, "JAXFT_COORDINATOR is not set"),
    ({"JAXFT_COORDINATOR": "127.0.0.1:1234", "JAXFT_NUM_PROCESSES": "two", "JAXFT_PROCESS_ID": "0"},
     "JAXFT_NUM_PROCESSES='two' is not a whole number"),
    ({"JAXFT_COORDINATOR": "127.0.0.1", "JAXFT_NUM_PROCESSES": "2", "JAXFT_PROCESS_ID": "0"},
     "JAXFT_COORDINATOR='127.0.0.1' is not host:port"),
    ({"JAXFT_COORDINATOR": "127.0.0.1:1234", "JAXFT_NUM_PROCESSES": "2", "JAXFT_PROCESS_ID": "2"},
     "JAXFT_PROCESS_ID=2 with JAXFT_NUM_PROCESSES=2"),
])
@pytest.mark.parametrize("command", ["train", "sweep", "eval"])
def test_a_half_set_jaxft_environment_is_one_paragraph_and_exit_2(tiny_run, tmp_path, monkeypatch, capsys, env,
                                                                 names, command):
    argv = {"train": ["train", str(tiny_run / "run.yaml"), "--set", f"output_dir={tmp_path / 'fresh'}"],
            "sweep": ["sweep", str(tiny_run / "run.yaml"), "--grid", "r=2", "--out", str(tmp_path / "fresh")],
            "eval": ["eval", str(tiny_run / "model"), "--data", str(tiny_run / "train.jsonl")]}[command]
    for name in parallel.JAXFT_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert err.startswith(f"jaxft {command}: error: environment: {names}") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 2 and "unset all three for a single-process run" in err
    assert out == "" and not (tmp_path / "fresh").exists()
    assert not jax.distributed.is_initialized()


def test_initialize_distributed_never_initializes_twice(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)  # e.g. a script that initialized itself
    monkeypatch.setenv("JAXFT_COORDINATOR", "127.0.0.1:1234")
    monkeypatch.setenv("JAXFT_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAXFT_PROCESS_ID", "1")
    assert parallel.initialize_distributed() is False and calls == []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    assert parallel.initialize_distributed() is True
    assert calls == [{"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 1}]


CLUSTERS = [  # (environment, what jax's own detection finds)
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[01-02]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
      "SLURM_LOCALID": "0"}, "SlurmCluster"),
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node01", "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
      "SLURM_LOCALID": "0"}, "SlurmCluster"),  # one task: jax detects it, but it is a single process
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, None),  # an sbatch shell outside srun
    ({"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.0.0.1:34911", "OMPI_COMM_WORLD_SIZE": "2",
      "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}, "OmpiCluster"),
    ({}, None),
]


@pytest.mark.parametrize("env, jax_finds", CLUSTERS)
def test_cluster_detection_agrees_with_jax_and_initializes_only_multi_process_clusters(monkeypatch, env, jax_finds):
    from jax._src import clusters  # the oracle: jax's own detection (private, so only this test reads it)

    for name in {k for e, _ in CLUSTERS for k in e} | set(parallel.JAXFT_ENV):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    found = next((c.__name__ for c in clusters.ClusterEnv._cluster_types
                  if not c.opt_in_only_method and c.__name__ in ("SlurmCluster", "OmpiCluster") and c.is_env_present()),
                 None)
    assert found == jax_finds
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    multi_process = jax_finds is not None and int(env.get("SLURM_NTASKS", env.get("OMPI_COMM_WORLD_SIZE", 1))) > 1
    assert parallel.initialize_distributed() is multi_process
    # no arguments: jax reads the cluster's variables itself
    assert calls == ([{"coordinator_address": None, "num_processes": None, "process_id": None}] if multi_process
                     else [])
