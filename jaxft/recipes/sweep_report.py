"""The sweep's report: runs aggregated over seeds into rows, written as sweep.csv, sweep.md, sweep.json and two
plots (loss curves, and the headline metric over r x alpha)."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Callable

import numpy as np
from matplotlib.figure import Figure

from jaxft.recipes.grid import ALPHA_KEY, R_KEY, SEED_KEY, Axis, Run, format_value
from jaxft.recipes.plot import draw_panels
from jaxft.train.metrics import read_metrics

# (column, label in the markdown table, how to read it from a run's summary)
METRICS: tuple[tuple[str, str, Callable[[dict], float | None]], ...] = (
    ("final_loss", "final train loss", lambda s: s.get("final_loss")),
    ("eval_loss", "eval loss", lambda s: (s.get("eval") or {}).get("loss")),
    ("eval_accuracy", "eval token accuracy", lambda s: (s.get("eval") or {}).get("accuracy")),
    ("eval_exact_match", "eval exact match", lambda s: (s.get("eval") or {}).get("exact_match")),
    ("tokens_per_s", "tokens/s", lambda s: s.get("tokens_per_s")),
    ("padding", "padding share", lambda s: s.get("padding")),
)


def _mean_std(values: list) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1) of the values present; no std from a single value. A diverged
    seed's NaN stays in, so the table shows it rather than a mean over the seeds that happened to survive."""
    present = [float(v) for v in values if v is not None]
    if not present:
        return None, None
    return float(np.mean(present)), float(np.std(present, ddof=1)) if len(present) > 1 else None


def aggregate(runs: list[Run], summaries: dict[str, dict]) -> list[dict]:
    """One row per seed group: its grid values, the seed count, mean/std of each metric, trainable params."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.group, []).append(r)
    rows = []
    for group, members in groups.items():
        first = members[0]
        row = {"config": group, **{k: v for k, v in first.values.items() if k != SEED_KEY},
               "seeds": len(members)}
        for column, _, read in METRICS:
            row[f"{column}_mean"], row[f"{column}_std"] = _mean_std([read(summaries[m.name]) for m in members])
        row["trainable_params"] = summaries[first.name]["trainable_params"]
        rows.append(row)
    return rows


def write_outputs(sweep_dir: Path, axes: tuple[Axis, ...], runs: list[Run], rows: list[dict],
                  summaries: dict[str, dict]):
    heatmap_note = write_heatmap(sweep_dir / "heatmap_r_alpha.png", axes, runs, rows)
    write_loss_curves(sweep_dir / "loss_curves.png", runs)
    with open(sweep_dir / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    (sweep_dir / "sweep.md").write_text(markdown_table(axes, rows, heatmap_note))
    (sweep_dir / "sweep.json").write_text(json.dumps(
        {"rows": rows, "runs": {r.name: {"group": r.group, "values": r.values, "summary": summaries[r.name]}
                                for r in runs}}, indent=2, default=float))


def _cell(mean, std, digits: int) -> str:
    if mean is None:
        return "–"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def markdown_table(axes: tuple[Axis, ...], rows: list[dict], heatmap_note: str) -> str:
    keys = [a.key for a in axes if a.key != SEED_KEY]
    seeds = next((len(a.items) for a in axes if a.key == SEED_KEY), 1)
    metrics = [(c, label) for c, label, _ in METRICS if any(row[f"{c}_mean"] is not None for row in rows)]
    header = ["config", *keys, *(label for _, label in metrics), "trainable params"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["config"], *(format_value(row[k]) for k in keys)]
        cells += [_cell(row[f"{c}_mean"], row[f"{c}_std"], 0 if c == "tokens_per_s" else 4) for c, _ in metrics]
        cells.append(f"{row['trainable_params']:,}")
        lines.append("| " + " | ".join(cells) + " |")
    spread = f"mean ± sample std over {seeds} seeds" if seeds > 1 else "one seed per config (no std)"
    return "\n".join([
        "# Sweep", "", *lines, "",
        f"Each cell: {spread}. Final train loss: the last logged step; eval loss and eval token accuracy "
        "(argmax = label over the target tokens, teacher-forced) on eval_data at the end; eval exact match (with "
        "--exact-match): greedy replies equal to the reference; tokens/s: real (non-padding) tokens, median of the "
        "last steps; padding share: the share of the batches' token slots that held padding.", "",
        heatmap_note, "",
    ])


def _heatmap_metric(rows: list[dict]) -> tuple[str, str]:
    for column, label, _ in METRICS[3::-1]:  # exact match, else token accuracy, else eval loss, else train loss
        if all(row[f"{column}_mean"] is not None for row in rows):
            return column, label
    return "final_loss", "final train loss"


def write_heatmap(path: Path, axes: tuple[Axis, ...], runs: list[Run], rows: list[dict]) -> str:
    """The headline metric over r (rows) x alpha as written (columns), one panel per value of the other grid
    keys; returns the sentence sweep.md gets about it (also when there is no r x alpha grid to draw)."""
    by_key = {a.key: a for a in axes}
    if R_KEY not in by_key or ALPHA_KEY not in by_key:
        return ("No heatmap_r_alpha.png: the grid has no " + " and no ".join(
            k for k in (R_KEY, ALPHA_KEY) if k not in by_key) + " dimension.")
    column, label = _heatmap_metric(rows)
    others = [a.key for a in axes if a.key not in (R_KEY, ALPHA_KEY, SEED_KEY)]
    group_row = {row["config"]: row for row in rows}
    panels: dict[tuple, np.ndarray] = {}
    r_items, a_items = by_key[R_KEY].items, by_key[ALPHA_KEY].items
    for r in runs:
        grid = panels.setdefault(tuple(r.items[k] for k in others), np.full((len(r_items), len(a_items)), np.nan))
        value = group_row[r.group][f"{column}_mean"]
        grid[r_items.index(r.items[R_KEY]), a_items.index(r.items[ALPHA_KEY])] = np.nan if value is None else value
    fig = Figure(figsize=((2.5 + 1.2 * len(a_items)) * len(panels), 1.5 + 0.8 * len(r_items)), layout="constrained")
    for ax, (other, grid) in zip(np.atleast_1d(fig.subplots(1, len(panels))), panels.items()):
        image = ax.imshow(grid, cmap="viridis", aspect="auto")
        ax.set(xticks=range(len(a_items)), xticklabels=a_items, yticks=range(len(r_items)), yticklabels=r_items,
               xlabel="lora_alpha", ylabel="r", title=", ".join(f"{k}={v}" for k, v in zip(others, other)) or label)
        for (i, j), value in np.ndenumerate(grid):
            ax.text(j, i, "–" if np.isnan(value) else f"{value:.3g}", ha="center", va="center", color="w")
        fig.colorbar(image, ax=ax, label=label)
    fig.savefig(path, dpi=100)
    return f"heatmap_r_alpha.png: {label} (mean over seeds) over r x lora_alpha."


def write_loss_curves(path: Path, runs: list[Run]):
    """Train loss against step, one curve per config: the mean over its seeds at the steps all of them logged."""
    curves: dict[str, list[dict[int, float]]] = {}
    for r in runs:
        records = read_metrics(Path(r.config.output_dir) / "metrics.jsonl")
        curves.setdefault(r.group, []).append({m["step"]: m["loss"] for m in records
                                               if m["split"] == "train" and "loss" in m})
    lines = {}
    for group, seed_curves in curves.items():
        steps = sorted(set.intersection(*(set(c) for c in seed_curves)))
        lines[group] = (steps, [float(np.mean([c[s] for c in seed_curves])) for s in steps])
    draw_panels(path, {"train loss (mean over seeds)": lines})
