"""What a training run reports: a progress bar, a JSONL log, optional TensorBoard events, and loss/lr curves.

Everything a run logs goes to ``run_dir/metrics.jsonl``, one JSON object per line: ``{"step", "split", ...}`` with
``split`` ``"train"`` or ``"eval"``. The file is appended to, never rewritten, so a resumed run continues the same
log; the curves drawn at the end read it back, so they cover the steps before the resume too.

Sample replies (``train.sample_every``, :mod:`jaxft.recipes.samples`) go to ``run_dir/samples.jsonl``, one
``{"step", "prompt", "reply", "reference"}`` object per prompt, and to TensorBoard as text. A resumed run first drops
the samples of steps after the checkpoint it continues from (the run replays those steps), so no step is there twice.

Only process 0 of a multi-host run logs (every process computes the same global metrics, and N copies of one
log would race on a shared filesystem); the others get a logger whose methods do nothing.
"""
from __future__ import annotations

import json
import math
import statistics
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import numpy as np
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from jaxft.data.formats import DataError
from jaxft.errors import JaxftError
from jaxft.files import write_text_atomic

SAMPLES_FILE = "samples.jsonl"
_POSTFIX = {"loss": "loss", "tokens_per_s": "tok/s", "lr": "lr"}
# The train metrics that curves.png draws in a panel of their own, by panel: TRL's names for the DPO family and KTO
# (jaxft.train.preference, pairwise, kto) and the reward model's; an RL run's mean reward (jaxft.recipes.rl)
OBJECTIVE_CURVES = {"preference": ("rewards/accuracies", "rewards/margins", "accuracy", "margin"),
                    "reward": ("reward",)}


def perplexity(loss: float) -> float:
    """exp(mean token cross-entropy in nats); ``inf`` rather than an OverflowError for a diverged loss."""
    loss = float(loss)
    return math.exp(loss) if loss < 709.0 else math.inf  # exp(709.8) is the largest finite float64


def evaluate(eval_step: Callable[[Any], dict], batches: Iterable[Any], eval_metrics: Callable[[dict], Any]):
    """``eval_metrics`` of the sums ``eval_step(batch)`` gives, added over ``batches`` (an objective's
    ``eval_sums`` and ``eval_metrics``, :mod:`jaxft.train.objectives`).

    Sums, not per-batch means: the metrics weigh every token equally however the loss mask spreads tokens over
    batches; a mean of per-batch means would overweight short batches. The sums stay on the device until the end:
    one host sync per evaluation, not per batch.
    """
    sums = None
    for batch in batches:
        batch_sums = eval_step(batch)
        sums = batch_sums if sums is None else jax.tree.map(lambda a, b: a + b, sums, batch_sums)
    if sums is None:
        raise DataError("evaluate", "no batches", "the held-out split gave no batches to evaluate")
    return eval_metrics(sums)


class Throughput:
    """Step time and tokens/s, each the median over the last ``window`` steps, and the padding share.

    ``tokens`` are real tokens (padding slots are not work done for the user); given the batch's ``slots`` too,
    ``padding`` is the share of all slots ticked so far that held padding (warm-up steps included).

    The first ``warmup`` steps are left out: they include compilation, and would dominate a short window. A median
    rather than a mean keeps one slow step (a checkpoint save, an eval, a host hiccup) from moving the numbers.

    Call :meth:`tick` once per step after something has waited for that step's results (logging its loss does),
    so the time between ticks is the step's time rather than its dispatch time. ``clock`` is injectable for tests.
    """

    def __init__(self, window: int = 20, warmup: int = 1, clock: Callable[[], float] = time.perf_counter):
        if window < 1:
            raise ValueError(f"Throughput: window must be >= 1 step, got {window}")
        self._clock = clock
        self._warmup_left = warmup
        self._step_times: deque[float] = deque(maxlen=window)
        self._rates: deque[float] = deque(maxlen=window)
        self._last = clock()
        self._tokens = self._slots = 0

    @property
    def padding(self) -> float | None:
        """Share of the token slots ticked so far that held padding; None before any step with ``slots``."""
        return 1.0 - self._tokens / self._slots if self._slots else None

    def tick(self, tokens: int, slots: int | None = None) -> dict[str, float]:
        """Records one finished step of ``tokens`` real tokens in ``slots`` token slots; returns
        ``{"step_time_s", "tokens_per_s"}`` (with ``slots``, also ``"padding"``); times are left out while warming
        up."""
        now = self._clock()
        elapsed, self._last = now - self._last, now
        if slots is not None:
            self._tokens, self._slots = self._tokens + int(tokens), self._slots + int(slots)
        out = {} if slots is None else {"padding": self.padding}
        if self._warmup_left > 0:
            self._warmup_left -= 1
            return out
        self._step_times.append(elapsed)
        self._rates.append(tokens / elapsed if elapsed > 0 else math.inf)
        return {"step_time_s": statistics.median(self._step_times), "tokens_per_s": statistics.median(self._rates),
                **out}


class TrainingDiverged(JaxftError, RuntimeError):
    """The non-finite guard skipped too many updates: the run stopped rather than export an untrained result."""


class SkipGuard:
    """Stops a run whose updates the train step's non-finite guard keeps dropping (``metrics["skipped"]``).

    A few skipped steps in a row are normal (fp16 loss scaling halves its scale on each); ``limit`` in a row mean
    the run diverged or its inputs hold inf/nan, and every later update would be dropped too, so
    :meth:`check` raises :class:`TrainingDiverged` at the ``limit``-th, naming the step, its loss and grad norm.
    :meth:`finish` (after the loop, before any export) also raises when no step of the run applied an update,
    however short the run: an unchanged adapter must not look like a trained one.

    ``check(step, metrics)`` reads a step's flag only when the next step has been dispatched (one step late), so
    it never stalls the device's queue; the error therefore comes one step after the limit is hit. With ``names``
    (parallel runs) the metrics hold one value per member and the error names the member.
    """

    def __init__(self, limit: int, names: list[str] | None = None):
        if limit < 1:
            raise ValueError(f"SkipGuard: limit must be >= 1 step, got {limit}")
        self.limit, self.names = limit, names
        self._pending: tuple[int, dict] | None = None
        self._in_a_row = self._applied = self._host = None
        self._steps = 0

    def check(self, step: int, metrics: dict) -> None:
        pending, self._pending = self._pending, (int(step), metrics)
        if pending is not None:
            self._count(*pending)

    def finish(self) -> None:
        if self._pending is not None:
            self._count(*self._pending)
            self._pending = None
        if self._steps and not self._applied.all():
            k = int(np.argmin(self._applied))
            raise TrainingDiverged(f"{self._who(k)}every one of the {self._steps} step(s) this run took was skipped "
                                   f"because its gradients were not finite ({self._last(k)}); no update was "
                                   f"applied, so nothing trained is exported. {_DIVERGED_FIX}")

    def _count(self, step: int, metrics: dict) -> None:
        host = jax.device_get({k: metrics[k] for k in ("skipped", "loss", "grad_norm")})
        skipped = np.atleast_1d(np.asarray(host["skipped"])).astype(bool)
        if self._in_a_row is None:
            self._in_a_row, self._applied = np.zeros(skipped.shape, int), np.zeros(skipped.shape, bool)
        self._in_a_row = np.where(skipped, self._in_a_row + 1, 0)
        self._applied |= ~skipped
        self._steps += 1
        self._host = (step, host)
        if (self._in_a_row >= self.limit).any():
            k = int(np.argmax(self._in_a_row >= self.limit))
            raise TrainingDiverged(f"{self._who(k)}step {step}: {self.limit} steps in a row were skipped "
                                   f"(train.max_skipped_steps {self.limit}) because their gradients were not "
                                   f"finite ({self._last(k)}); the run stopped before exporting. {_DIVERGED_FIX}")

    def _who(self, k: int) -> str:
        return f"{self.names[k]}: " if self.names else ""

    def _last(self, k: int) -> str:
        step, host = self._host
        value = lambda key: float(np.atleast_1d(np.asarray(host[key]))[k])  # noqa: E731
        return f"at step {step}: loss {value('loss'):.4g}, grad norm {value('grad_norm'):.4g}"


_DIVERGED_FIX = ("Check the base weights and the data for inf/nan (a float16 dtype overflows beyond 65504), lower "
                 "optim.lr or set optim.max_grad_norm; raise train.max_skipped_steps only if that many skips in a "
                 "row are expected")


def _scalar(value: Any) -> int | float:
    """A JSON number from a Python, numpy or jax scalar (reading a jax scalar waits for its computation)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else float(value)


def read_metrics(jsonl_path: str | Path) -> list[dict]:
    """The records of a metrics log. For a step logged twice (a run resumed from an earlier checkpoint replays the
    steps after it), the later record wins. A last line cut short (the run was killed mid-write, or the disk was
    full) is left out; a bad line before it is an error naming it."""
    latest: dict[tuple[str, int], dict] = {}
    for record in _json_lines(jsonl_path):
        latest[(record["split"], record["step"])] = record
    return sorted(latest.values(), key=lambda r: (r["step"], r["split"]))


def write_curves(jsonl_path: str | Path, png_path: str | Path) -> Figure:
    """Draws train and eval loss, and the learning rate, against step from a metrics log into a PNG; for a
    preference run (train records with :data:`OBJECTIVE_CURVES`) also its reward accuracy and margin, for an RL run
    its mean reward.

    Uses a bare :class:`~matplotlib.figure.Figure` (Agg canvas) rather than pyplot, so it needs no display and
    does not change the backend of a notebook or script that imported jaxft.
    """
    records = read_metrics(jsonl_path)

    def series(split: str, key: str) -> tuple[list[int], list[float]]:
        points = [(r["step"], r[key]) for r in records if r["split"] == split and key in r]
        return [s for s, _ in points], [v for _, v in points]

    # an objective's own train metrics (DPO and its kin, the reward model, RL's reward) get a third panel; a task's
    # eval-only accuracy (SFT's token accuracy) is no reason for one
    logged = {k for r in records if r["split"] == "train" for k in r}
    title, keys = next(((t, [k for k in ks if k in logged]) for t, ks in OBJECTIVE_CURVES.items()
                        if logged & set(ks)), (None, []))
    fig = Figure(figsize=(15 if keys else 10, 4), layout="constrained")
    loss_ax, lr_ax, *objective_ax = fig.subplots(1, 3 if keys else 2)
    loss_ax.plot(*series("train", "loss"), label="train")
    loss_ax.plot(*series("eval", "loss"), marker="o", label="eval")
    loss_ax.set(xlabel="step", ylabel="loss", title="loss")
    loss_ax.legend()
    lr_ax.plot(*series("train", "lr"))
    lr_ax.set(xlabel="step", ylabel="learning rate", title="learning rate")
    for ax in objective_ax:
        for key in keys:
            line, = ax.plot(*series("train", key), label=f"train {key}")
            ax.plot(*series("eval", key), marker="o", linestyle="none", color=line.get_color(), label=f"eval {key}")
        ax.set(xlabel="step", title=title)
        ax.legend()
    fig.savefig(png_path, dpi=100)
    return fig


class MetricsLogger:
    """The run's reporting: call :meth:`log` after every train step, :meth:`log_eval` after each evaluation, and
    :meth:`close` at the end (which draws ``curves.png``).

    ``log_every`` thins what is written *and* what is read from the device: converting a jax scalar to a float
    waits for the step, so logging every step would stall the dispatch queue. The bar still advances every step.
    ``start_step`` is the step a resumed run starts from, so the bar and ETA count only what is left.
    ``enabled=None`` means "this is process 0".
    """

    def __init__(self, run_dir: str | Path, total_steps: int, *, tensorboard: bool = False, log_every: int = 1,
                 start_step: int = 0, enabled: bool | None = None):
        if log_every < 1:
            raise ValueError(f"MetricsLogger: log_every must be >= 1 step, got {log_every}")
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.run_dir = Path(run_dir)
        self.jsonl_path = self.run_dir / "metrics.jsonl"
        self.curves_path = self.run_dir / "curves.png"
        self.samples_path = self.run_dir / SAMPLES_FILE
        self.total_steps = total_steps
        self.log_every = log_every
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._tensorboard = _summary_writer(self.run_dir / "tensorboard") if tensorboard else None
        self._jsonl = open(self.jsonl_path, "a")
        _drop_samples_after(self.samples_path, start_step)
        self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Records train metrics of ``step`` (loss, lr, grad norm, tokens/s, step time, ...) on logging steps."""
        if not self.enabled:
            return
        step = int(step)
        self._bar.update(step - self._bar.n)
        if step % self.log_every and step != self.total_steps:
            return
        record = self._write(step, "train", metrics)
        self._bar.set_postfix({short: f"{record[key]:.4g}" for key, short in _POSTFIX.items() if key in record})

    def log_eval(self, step: int, metrics: dict[str, Any]) -> None:
        """Records held-out metrics (e.g. :func:`evaluate`'s) at ``step``, always: evaluations are already rare."""
        if not self.enabled:
            return
        record = self._write(int(step), "eval", metrics)
        self._bar.write(f"eval @ step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in record.items()
                                                           if k not in ("step", "split")))

    def log_samples(self, step: int, samples: list[dict[str, str]]) -> None:
        """Records the sample replies of ``step`` (``{"prompt", "reply", "reference"}`` each) in samples.jsonl and,
        with TensorBoard on, as one text event per prompt (``samples/<i>``)."""
        if not self.enabled:
            return
        step = int(step)
        with open(self.samples_path, "a") as f:
            f.writelines(json.dumps({"step": step, **sample}) + "\n" for sample in samples)
        if self._tensorboard is not None:
            for i, sample in enumerate(samples):
                self._tensorboard.add_text(f"samples/{i}", sample_markdown(sample), step)

    def log_resume(self, step: int, changes: dict[str, list]) -> None:
        """Records that the run was resumed from ``step``, with the config keys this resume changed
        (``{"section.key": [old, new]}``), as a ``"resume"`` record: the log says which steps ran under which config."""
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": int(step), "split": "resume", "changes": changes}) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        """Flushes everything and draws loss and learning-rate curves over the whole log into ``curves.png``."""
        if not self.enabled:
            return
        self._bar.close()
        self._jsonl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        write_curves(self.jsonl_path, self.curves_path)

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _write(self, step: int, split: str, metrics: dict[str, Any]) -> dict:
        record = {"step": step, "split": split, **{k: _scalar(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()  # a killed run keeps every line it logged
        if self._tensorboard is not None:
            for key, value in record.items():
                if key not in ("step", "split"):
                    self._tensorboard.add_scalar(f"{split}/{key}", value, step)
        return record


def sample_markdown(sample: dict[str, str]) -> str:
    """One sample as TensorBoard's text plugin shows it (Markdown): prompt, reply and reference as code blocks, so
    a template's markup is shown rather than rendered."""
    return "\n\n".join(f"**{key}**\n\n```\n{sample[key]}\n```" for key in ("prompt", "reply", "reference"))


def read_samples(path: str | Path) -> list[dict]:
    """The records of a samples log, in order; a last line cut short (the run was killed mid-write) is left out."""
    return _json_lines(path)


def _json_lines(path: str | Path) -> list[dict]:
    """The records of a JSON-lines log that a run appends to, in order. A last line cut short (the run was killed
    mid-write, or the disk was full) is left out; a bad line before it is an error naming it."""
    numbered = [(number, line) for number, line in enumerate(Path(path).read_text().splitlines(), 1) if line.strip()]
    records = []
    for i, (number, line) in enumerate(numbered):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(numbered) - 1:
                break
            raise DataError(f"{path}:{number}", "not a JSON record", str(e)) from None
    return records


def _drop_samples_after(path: Path, step: int) -> None:
    """A run continuing from ``step`` replays the steps after it: their samples from the interrupted run go, so
    each sampled step is in the log once. Rewritten atomically, only when there is something to drop (a later step,
    or a last line cut short, which the next append would otherwise continue)."""
    if not path.exists():
        return
    text = path.read_text()
    kept = [r for r in read_samples(path) if r["step"] <= step]
    if len(kept) != len([line for line in text.splitlines() if line.strip()]) or not text.endswith("\n"):
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


def _summary_writer(log_dir: Path):
    return tensorboard_writer_class()(logdir=str(log_dir))


def tensorboard_writer_class():
    """tensorboardX's ``SummaryWriter``, imported only when asked for: it is jaxft's optional ``tensorboard``
    extra. A run calls this before it writes anything, so a missing package is refused first."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError as err:
        raise MissingExtra("train.tensorboard: true (MetricsLogger(tensorboard=True)) writes TensorBoard events "
                           "with tensorboardX, which is jaxft's optional `tensorboard` extra and is not installed: "
                           "`pip install 'jaxft[tensorboard]'` (or `pip install tensorboardX`), or set "
                           "train.tensorboard: false") from err
    return SummaryWriter


class MissingExtra(JaxftError, ImportError):
    """A setting needs a package of one of jaxft's optional extras that is not installed."""
