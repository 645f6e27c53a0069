"""The train benchmark's accounting and its jaxft worker on a tiny config (timings are never asserted)."""
import argparse
import json
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


LSCPU = """Architecture:                            x86_64
Vendor ID:                               GenuineIntel
Model name:                              Intel(R) Xeon(R) Platinum 8480+
CPU family:                              6
Model:                                   143
Stepping:                                8
Flags:                                   fpu sse2 avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile amx_int8
"""
CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
stepping\t: 1
flags\t\t: fpu avx2 fma avx512f
processor\t: 1
model name\t: another line that must not win
"""


def test_cpu_info_names_the_microarchitecture_from_lscpu_or_proc_cpuinfo(bench):
    intel = bench.cpu_info(lscpu_text=LSCPU)
    assert (intel["model_name"], intel["family"], intel["model"], intel["source"]) == (
        "Intel(R) Xeon(R) Platinum 8480+", "6", "143", "lscpu")
    assert intel["flags_of_note"] == ["avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"]
    amd = bench.cpu_info(cpuinfo_text=CPUINFO)
    assert (amd["model_name"], amd["vendor"], amd["family"], amd["model"]) == ("AMD EPYC", "AuthenticAMD", "25", "17")
    assert bench.cpu_label(amd).startswith("AMD EPYC (family 25, model 17; avx2 fma avx512f)")
    here = bench.cpu_info()
    first = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    assert here["model_name"] == first.split(":", 1)[1].strip()


@pytest.mark.slow
def test_drive_records_the_cpu_both_matmul_peaks_and_sdpa(bench, tmp_path, monkeypatch, capsys):
    out = tmp_path / "bench.json"
    monkeypatch.setattr("sys.argv", ["bench_train.py", "--config", "tiny", "--workloads", "lora", "--steps", "1",
                                     "--warmup", "0", "--pairs", "1", "--out", str(out)])
    bench.main()
    report = json.loads(out.read_text())
    assert report["reference_attention"] == "sdpa" and report["machine"]["cpu"]["model_name"]
    assert set(report["matmul_peak_gflops"]) == {"jax", "torch"} and min(report["matmul_peak_gflops"].values()) > 0
    summary = report["workloads"]["lora"]["summary"]
    for stack, peak_stack in (("jaxft", "jax"), ("torch", "torch")):
        assert summary[stack]["matmul_peak_gflops"] == report["matmul_peak_gflops"][peak_stack]
    table = capsys.readouterr().out
    assert f"CPU: {bench.cpu_label(report['machine']['cpu'])}" in table and "reference attention sdpa" in table


def test_reference_model_uses_pytorchs_default_attention(bench, tmp_path):
    model = bench.torch_model(bench.CONFIGS["tiny"], "lora", str(tmp_path))
    assert model.config._attn_implementation == "sdpa"
