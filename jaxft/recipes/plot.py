"""Comparing runs: ``jaxft plot RUN_DIR [RUN_DIR ...] --out curves.png`` draws the train loss and every eval metric
of several run folders on one figure, one line per run, each labelled by the config keys whose values differ between
the runs (``lora.r=8, optim.lr=0.001``), read from their config.yaml files (the canonical form every run writes, so
the same setting has the same key in every run). The sweep's loss curves are drawn by the same :func:`draw_panels`.

An eval metric is a float an eval record holds: counts (the tokens or chats scored) are integers in metrics.jsonl
and are no curve.
"""
from __future__ import annotations

from pathlib import Path

import yaml
from matplotlib.figure import Figure

from jaxft.data.formats import DataError
from jaxft.files import atomic_file
from jaxft.recipes.config import flat_keys
from jaxft.train.metrics import read_metrics

# Keys that differ between any two runs without saying anything about what they train.
NOT_A_SETTING = ("output_dir",)

Curve = tuple[list[int], list[float]]  # (steps, values)


def run_labels(run_dirs: list[str | Path]) -> list[str]:
    """One label per run: ``key=value`` for each config.yaml key whose value differs between the runs, in key
    order; led by the run's folder name when that does not tell the runs apart (one run, or equal configs)."""
    configs = [flat_keys(yaml.safe_load(_run_file(d, "config.yaml").read_text()) or {}) for d in run_dirs]
    keys = sorted({k for c in configs for k in c} - set(NOT_A_SETTING))
    differing = [k for k in keys if any(c.get(k) != configs[0].get(k) for c in configs)]
    labels = [", ".join(f"{k}={_label_value(c.get(k))}" for k in differing) for c in configs]
    if len(set(labels)) < len(labels) or not differing:  # no setting tells them apart (one run, or equal configs)
        return [f"{Path(d).name}: {label}" if label else Path(d).name for d, label in zip(run_dirs, labels)]
    return labels


def _label_value(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "+".join(map(_label_value, value))
    return "none" if value is None else str(value)


def _run_file(run_dir: str | Path, name: str) -> Path:
    path = Path(run_dir) / name
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {name} there; jaxft plot reads run folders (the output_dir of "
                                "`jaxft train`, which holds config.yaml and metrics.jsonl)")
    return path


def run_curves(run_dir: str | Path) -> dict[str, Curve]:
    """A run's curves by panel title: ``train loss`` and ``eval <metric>`` for every float metric of its eval
    records, each against step."""
    records = read_metrics(_run_file(run_dir, "metrics.jsonl"))
    curves: dict[str, Curve] = {}
    for record in records:
        split = record["split"]
        for key, value in record.items():
            if (split, key) == ("train", "loss") or (split == "eval" and isinstance(value, float)):
                steps, values = curves.setdefault(f"{split} {key}", ([], []))
                steps.append(record["step"])
                values.append(value)
    return curves


def draw_panels(path: str | Path, panels: dict[str, dict[str, Curve]]) -> Figure:
    """One panel per title, one line per label in it (a single point gets a marker), saved as a PNG at ``path``
    (atomically). A bare Agg :class:`~matplotlib.figure.Figure`: no display, no pyplot state."""
    fig = Figure(figsize=(6 * len(panels), 4.5), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, lines) in zip(axes, panels.items()):
        for label, (steps, values) in lines.items():
            ax.plot(steps, values, marker="o" if len(steps) == 1 else None, label=label)
        ax.set(xlabel="step", ylabel=title, title=title)
        ax.legend(fontsize="small")
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    return fig


def plot_runs(run_dirs: list[str | Path], out: str | Path, overwrite: bool = False) -> Path:
    """The train loss and eval metrics of ``run_dirs`` on one figure at ``out`` (a PNG); an existing ``out`` is
    replaced only with ``overwrite``."""
    if not run_dirs:
        raise ValueError("jaxft plot needs at least one run folder")
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists; pass --overwrite to replace it, or choose another --out")
    labels = run_labels(run_dirs)
    panels: dict[str, dict[str, Curve]] = {}
    for label, run_dir in zip(labels, run_dirs):
        for title, curve in run_curves(run_dir).items():
            panels.setdefault(title, {})[label] = curve
    if not panels:
        raise DataError(", ".join(map(str, run_dirs)), "metrics.jsonl", "no train loss or eval metric logged yet; "
                        "plot runs that have trained at least one logged step")
    ordered = dict(sorted(panels.items(), key=lambda item: (item[0] != "train loss", item[0])))
    out.parent.mkdir(parents=True, exist_ok=True)
    draw_panels(out, ordered)
    return out
