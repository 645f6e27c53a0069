"""Run reporting: the JSONL log, the curves PNG, TensorBoard events, process-0-only logging, throughput, eval."""
import json
import math
import struct
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.errors import JaxftError
from jaxft.train.metrics import (MetricsLogger, Throughput, evaluate, perplexity, read_metrics, read_samples,
                                 write_curves)
from jaxft.train.objectives import CausalLM

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def log_run(run_dir, steps=4, **kwargs):
    with MetricsLogger(run_dir, total_steps=steps, **kwargs) as logger:
        for step in range(1, steps + 1):
            logger.log(step, {"loss": jnp.float32(3.0 / step), "lr": 1e-3 * step, "grad_norm": np.float32(0.5)})
        logger.log_eval(steps, {"loss": jnp.float32(1.5), "perplexity": perplexity(1.5)})


def jsonl_records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_each_logged_step_is_one_json_line_with_its_metrics_as_floats(tmp_path):
    log_run(tmp_path, steps=2, enabled=True)
    assert jsonl_records(tmp_path)[:2] == [
        {"step": 1, "split": "train", "loss": 3.0, "lr": 1e-3, "grad_norm": 0.5},
        {"step": 2, "split": "train", "loss": 1.5, "lr": 2e-3, "grad_norm": 0.5},
    ]


def test_eval_metrics_are_logged_as_an_eval_line(tmp_path):
    log_run(tmp_path, steps=2, enabled=True)
    assert jsonl_records(tmp_path)[-1] == {"step": 2, "split": "eval", "loss": 1.5, "perplexity": math.exp(1.5)}


def test_log_every_writes_multiples_of_it_and_the_last_step(tmp_path):
    log_run(tmp_path, steps=7, log_every=3, enabled=True)
    assert [r["step"] for r in jsonl_records(tmp_path) if r["split"] == "train"] == [3, 6, 7]


def test_resumed_run_appends_and_its_replayed_steps_replace_the_old_ones(tmp_path):
    with MetricsLogger(tmp_path, total_steps=3, enabled=True) as logger:
        for step in (1, 2):
            logger.log(step, {"loss": 9.0})
    with MetricsLogger(tmp_path, total_steps=3, start_step=1, enabled=True) as logger:
        for step in (2, 3):
            logger.log(step, {"loss": 1.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [(1, 9.0), (2, 1.0),
                                                                                             (3, 1.0)]


def test_close_writes_a_png_of_the_curves(tmp_path):
    log_run(tmp_path, enabled=True)
    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == PNG_SIGNATURE
    assert struct.unpack(">II", png[16:24]) == (1000, 400)  # IHDR width, height: 10x4 inches at 100 dpi


def test_curves_have_a_loss_axis_with_train_and_eval_and_an_lr_axis(tmp_path):
    log_run(tmp_path, enabled=True)
    loss_ax, lr_ax = write_curves(tmp_path / "metrics.jsonl", tmp_path / "again.png").axes
    assert [line.get_label() for line in loss_ax.get_lines()] == ["train", "eval"]
    assert list(lr_ax.get_lines()[0].get_ydata()) == pytest.approx([1e-3, 2e-3, 3e-3, 4e-3])


def test_disabled_logger_of_a_non_zero_process_writes_nothing(tmp_path):
    log_run(tmp_path / "run", enabled=False, tensorboard=True)
    assert not (tmp_path / "run").exists()


def tensorboard_events(log_dir):
    """Every Event proto of the event files under ``log_dir``, decoded from their TFRecord framing (length, crc,
    payload, crc) with tensorboardX's own proto."""
    from tensorboardX.proto.event_pb2 import Event

    for path in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            yield Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4


def read_tensorboard_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    scalars: dict[str, list[tuple[int, float]]] = {}
    for event in tensorboard_events(log_dir):
        for value in event.summary.value:
            if value.HasField("simple_value"):
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def read_tensorboard_texts(log_dir) -> dict[tuple[str, int], str]:
    """(tag, step) -> text of the text events (the text plugin's string tensors)."""
    return {(value.tag, event.step): value.tensor.string_val[0].decode() for event in tensorboard_events(log_dir)
            for value in event.summary.value if value.metadata.plugin_data.plugin_name == "text"}


def test_tensorboard_events_hold_the_logged_scalars(tmp_path):
    log_run(tmp_path, steps=2, enabled=True, tensorboard=True)
    scalars = read_tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars["train/loss"] == [(1, 3.0), (2, 1.5)]
    assert scalars["eval/perplexity"] == [(2, pytest.approx(math.exp(1.5)))]


def test_tensorboard_without_tensorboardx_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "tensorboardX", None)  # makes `import tensorboardX` fail
    with pytest.raises(ImportError, match=r"train.tensorboard.*pip install 'jaxft\[tensorboard\]'"):
        MetricsLogger(tmp_path, total_steps=1, tensorboard=True, enabled=True)


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_throughput_skips_the_compile_step_and_reports_medians():
    clock = FakeClock()
    throughput = Throughput(window=3, clock=clock)
    reports = []
    for step_time in (30.0, 1.0, 2.0, 10.0):  # compile, then a fast, a normal and a checkpointing step
        clock.now += step_time
        reports.append(throughput.tick(tokens=1000))
    assert reports == [{}, {"step_time_s": 1.0, "tokens_per_s": 1000.0},
                       {"step_time_s": 1.5, "tokens_per_s": 750.0},
                       {"step_time_s": 2.0, "tokens_per_s": 500.0}]


def test_throughput_forgets_steps_older_than_the_window():
    clock = FakeClock()
    throughput = Throughput(window=2, warmup=0, clock=clock)
    for step_time in (1.0, 1.0, 4.0, 4.0):
        clock.now += step_time
        report = throughput.tick(tokens=400)
    assert report == {"step_time_s": 4.0, "tokens_per_s": 100.0}


def test_evaluate_weights_every_token_equally_across_batches():
    batches = [{"loss_sum": jnp.float32(s), "n_targets": jnp.int32(n)} for s, n in ((10.0, 10), (0.0, 0), (2.0, 1))]
    result = evaluate(lambda batch: batch, batches, CausalLM().eval_metrics)  # a mean of batch means gives 1.5
    assert result == {"loss": pytest.approx(12 / 11), "perplexity": pytest.approx(math.exp(12 / 11)), "tokens": 11}


def test_evaluate_on_a_split_without_loss_tokens_is_an_error():
    with pytest.raises(JaxftError, match="no loss tokens"):
        evaluate(lambda batch: batch, [{"loss_sum": jnp.float32(0.0), "n_targets": jnp.int32(0)}],
                 CausalLM().eval_metrics)


def test_perplexity_of_a_diverged_loss_is_inf():
    assert perplexity(1e4) == math.inf


def test_throughput_reports_the_padding_share_of_all_steps_so_far():
    clock = FakeClock()
    throughput = Throughput(window=2, warmup=1, clock=clock)
    reports = []
    for tokens, slots in ((300, 400), (100, 400), (400, 400)):
        clock.now += 2.0
        reports.append(throughput.tick(tokens, slots))
    assert [r["padding"] for r in reports] == [0.25, 0.5, 1 - 800 / 1200]   # warm-up step included
    assert reports[1]["tokens_per_s"] == 50.0 and throughput.padding == 1 - 800 / 1200
    assert Throughput().padding is None and "padding" not in Throughput(warmup=0).tick(10)


def test_read_metrics_leaves_out_a_last_line_cut_short_and_names_a_bad_line_before_it(tmp_path):
    from jaxft.data.formats import DataError

    good = [{"step": 1, "split": "train", "loss": 2.0}, {"step": 2, "split": "train", "loss": 1.5}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in good) + '{"step": 3, "split": "tr')   # killed mid-write
    assert read_metrics(path) == good
    path.write_text('{"step": 1, "spl\n' + json.dumps(good[1]) + "\n")
    with pytest.raises(DataError, match=r"metrics.jsonl:1: not a JSON record"):
        read_metrics(path)


def test_read_samples_leaves_out_a_last_line_cut_short_and_names_a_bad_line_before_it_by_its_line(tmp_path):
    from jaxft.data.formats import DataError

    good = [{"step": 2, "prompt": "p", "reply": "r", "reference": "x"}] * 2
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n\n" for r in good) + '{"step": 4, "pro')   # killed mid-write
    assert read_samples(path) == good
    path.write_text("\n" + '{"step": 2, "pro\n' + json.dumps(good[1]) + "\n")
    with pytest.raises(DataError, match=r"samples.jsonl:2: not a JSON record"):   # the file's own line number
        read_samples(path)
