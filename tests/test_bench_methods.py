"""The PEFT-methods benchmark: its arguments, its table, and a 2-method x 2-step run (timings are never asserted)."""
import json

import pytest


@pytest.fixture
def bench(monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "scripts"))  # it imports bench_train
    import bench_methods

    return bench_methods


def test_arguments_refuse_bitfit_saying_why_and_unknown_methods(bench, capsys):
    assert bench.parse_args(["--methods", "lora,prefix_tuning"]).methods == ["lora", "prefix_tuning"]
    assert bench.parse_args([]).steps == 300
    with pytest.raises(SystemExit):
        bench.parse_args(["--methods", "lora,bitfit"])
    assert "biases" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--methods", "vera"])
    assert "'vera' unknown" in capsys.readouterr().err


def test_table_has_the_base_then_one_row_per_method(bench):
    row = {"method": "ia3", "lr": 0.01, "trainable_params": 1234, "trainable_pct": 1.5, "step_time_s": 0.0425,
           "peak_bytes": 3 * 2**20, "compile_s": 2.25, "eval_loss": 0.5, "exact_match": 0.875}
    lines = bench.table({"before_exact_match": 0.0, "before_eval_loss": 4.25, "methods": [row, {**row, "step_time_s": None}]}).splitlines()
    assert lines[2] == "| base (NF4), before | - | 0 | 0 | - | - | - | 4.250 | 0.0% |"
    assert lines[3] == "| ia3 | 0.01 | 1,234 | 1.50% | 42 | 3.0 | 2.2 | 0.500 | 87.5% |"
    assert lines[4].split(" | ")[4] == "-"


@pytest.mark.slow
def test_two_methods_two_steps_write_json_and_plot(bench, tmp_path):
    out = tmp_path / "methods.json"
    bench.main(["--steps", "2", "--methods", "lora,ia3", "--out", str(out)])
    report = json.loads(out.read_text())
    rows = {r["method"]: r for r in report["methods"]}
    # the demo model: hidden 64, intermediate 128, 4 heads / 2 KV heads of 16, 2 layers
    linears = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)]
    assert rows["lora"]["trainable_params"] == 2 * sum(8 * (i + o) for i, o in linears)
    assert rows["ia3"]["trainable_params"] == 2 * (32 + 32 + 128)  # k, v outputs; down_proj's inputs
    assert all(r["peak_bytes"] > 0 and 0 <= r["exact_match"] <= 1 for r in rows.values())
    assert report["machine"]["cpu"]["cpus"] and out.with_suffix(".png").stat().st_size > 0
