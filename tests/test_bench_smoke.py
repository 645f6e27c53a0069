"""The train benchmark's accounting and its jaxft worker on a tiny config (timings are never asserted)."""
import argparse
import importlib.util
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_train.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lora_flops_are_four_per_frozen_weight_plus_six_per_adapter_weight(bench):
    flops = bench.flops_per_token(bench.CONFIGS["bench-32m"], "lora")
    assert flops["base_params"] == 8 * 2_949_120 + 512 * 8192
    assert flops["model"] == 4 * flops["base_params"] + 6 * flops["adapter_params"] + flops["attention"]
    assert 4 * flops["base_params"] / 1e6 == pytest.approx(111.1, abs=0.1)


def test_jaxft_worker_trains_the_tiny_qlora_workload(bench):
    args = argparse.Namespace(steps=1, warmup=0, loss_chunk=1024)
    result = bench.run_jaxft(bench.CONFIGS["tiny"], "qlora", args)
    assert math.isfinite(result["final_loss"]) and len(result["step_times_s"]) == 1
    assert result["nf4_bytes_per_param"] <= 0.52
