"""Hyperparameter sweeps: a grid over run-config keys, run after run, summarized over seeds in a table and two plots.

``jaxft sweep config.yaml --grid lora.r=4,8,16 lora.lora_alpha=2r optim.lr=1e-4,3e-4 seeds=3``:

- ``KEY=V1,V2,...`` is one grid dimension; values are YAML scalars (``1e-4``, ``true``, ``[q_proj, v_proj]``).
  ``r``, ``alpha``, ``lr`` and ``dropout`` are short for ``lora.r``, ``lora.lora_alpha``, ``optim.lr`` and
  ``lora.lora_dropout``.
- A value ``2r`` / ``2*r`` / ``r`` is derived from each point's ``lora.r`` (``alpha=r,2r`` is a dimension of two
  rules).
- ``seeds=N`` runs every point with ``train.seed`` = 0 .. N-1; results are mean ± sample std over the seeds.

Each run trains with :func:`jaxft.recipes.sft.run` into ``<sweep dir>/<name>`` (``r8-a16-lr0.0001-s0``), so every
run folder is an ordinary run folder; with ``parallel`` the runs train together in one compiled program
(:func:`jaxft.recipes.multi.run_parallel`: members may differ only in LoRA shape, lr and seed). The sweep folder
gets ``sweep.yaml`` (what was asked, and every run's overrides), ``sweep.csv``, ``sweep.md``, ``sweep.json``,
``loss_curves.png`` and ``heatmap_r_alpha.png``. In a multi-host sweep every process trains every run together
and computes the same table; process 0 alone writes the shared folders.
"""
from __future__ import annotations

import copy
import csv
import itertools
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jax
import numpy as np
import yaml
from jax.experimental import multihost_utils
from matplotlib.figure import Figure

from jaxft.config import ConfigError, from_dict, to_dict
from jaxft.files import occupied, write_text_atomic
from jaxft.hf.tokenizer import load_tokenizer
from jaxft.recipes import sft
from jaxft.recipes.config import RunConfig, apply_overrides, lookup, read_run_tree
from jaxft.recipes.multi import check_members, run_parallel
from jaxft.recipes.scoring import chat_exact_match, load_trained
from jaxft.train.metrics import read_metrics

ALIASES = {"r": "lora.r", "alpha": "lora.lora_alpha", "lr": "optim.lr", "dropout": "lora.lora_dropout"}
SHORT_NAMES = {"lora.r": "r", "lora.lora_alpha": "a", "optim.lr": "lr", "lora.lora_dropout": "do", "train.seed": "s"}
SEED_KEY, R_KEY, ALPHA_KEY = "train.seed", "lora.r", "lora.lora_alpha"
GRID_FORM = ("expected KEY=V1,V2,... with YAML values (lora.r=4,8,16 or optim.lr=1e-4,3e-4), a rule derived from "
             "each point's lora.r (lora.lora_alpha=2r, alpha=2*r, alpha=r), or seeds=N")
_RULE = re.compile(r"^(?:(\d+(?:\.\d+)?)\s*\*?\s*)?r$")
_EXPONENT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")  # YAML 1.1 reads 1e-4 (no dot) as a string
# (column, label in the markdown table, how to read it from a run's summary)
METRICS: tuple[tuple[str, str, Callable[[dict], float | None]], ...] = (
    ("final_loss", "final train loss", lambda s: s.get("final_loss")),
    ("eval_loss", "eval loss", lambda s: (s.get("eval") or {}).get("loss")),
    ("eval_accuracy", "eval token accuracy", lambda s: (s.get("eval") or {}).get("accuracy")),
    ("eval_exact_match", "eval exact match", lambda s: (s.get("eval") or {}).get("exact_match")),
    ("tokens_per_s", "tokens/s", lambda s: s.get("tokens_per_s")),
    ("padding", "padding share", lambda s: s.get("padding")),
)


@dataclass(frozen=True)
class Axis:
    """One grid dimension: a dotted RunConfig key and its values as written (``"8"``, ``"1e-4"``, ``"2r"``)."""

    key: str
    items: tuple[str, ...]


@dataclass(frozen=True)
class Run:
    """One point of the grid: its folder name, the name of its seed group, and its overrides."""

    name: str
    group: str
    items: dict[str, str]      # key -> value as written (a rule stays "2r": the heatmap's column label)
    values: dict[str, object]  # key -> the value the run gets (a rule resolved against the point's r)
    config: RunConfig


def parse_grid(specs: list[str]) -> tuple[Axis, ...]:
    """``["lora.r=4,8", "alpha=2r", "seeds=2"]`` -> axes; the seed axis, when there is one, comes last."""
    if not specs:
        raise ConfigError(f"--grid: no grid given; {GRID_FORM}")
    axes = [_parse_axis(spec) for spec in specs]
    keys = [a.key for a in axes]
    for key in keys:
        if keys.count(key) > 1:
            form = "seeds=N or train.seed=V1,V2,..." if key == SEED_KEY else f"{key}=V1,V2,..."
            raise ConfigError(f"--grid: {key} (or an alias of it) appears {keys.count(key)} times; give all its "
                              f"values in one item ({form})")
    return tuple(sorted(axes, key=lambda a: a.key == SEED_KEY))


def _parse_axis(spec: str) -> Axis:
    key, sep, text = spec.partition("=")
    key = ALIASES.get(key.strip(), key.strip())
    items = _split_top_level(text.strip())
    if not sep or not key or not all(items):
        raise ConfigError(f"--grid {spec!r}: {GRID_FORM}")
    if key == "seeds":
        if len(items) != 1 or not items[0].isdigit() or int(items[0]) < 1:
            raise ConfigError(f"--grid {spec!r}: seeds takes one whole number >= 1 (seeds=3 runs train.seed 0, 1, 2)")
        return Axis(SEED_KEY, tuple(str(i) for i in range(int(items[0]))))
    if key == "output_dir":
        raise ConfigError(f"--grid {spec!r}: every run gets its own folder inside the sweep folder; choose that "
                          "with --out")
    repeated = sorted({item for item in items if items.count(item) > 1})
    if repeated:
        raise ConfigError(f"--grid {spec!r}: {', '.join(repeated)} given more than once; list each value once")
    for item in items:
        if _RULE.match(item) and key == R_KEY:
            raise ConfigError(f"--grid {spec!r}: lora.r cannot be derived from itself; give numbers (lora.r=4,8)")
        if not _RULE.match(item):
            _yaml_value(item, spec)
    return Axis(key, tuple(items))


def _split_top_level(text: str) -> list[str]:
    """Splits on commas outside brackets, so a list value (``[q_proj,v_proj]``) stays one item."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(text[start:i].strip())
            start = i + 1
    return items + [text[start:].strip()]


def _yaml_value(item: str, spec: str):
    try:
        return yaml.safe_load(item)
    except yaml.YAMLError as e:
        raise ConfigError(f"--grid {spec!r}: value {item!r} is not plain YAML ({getattr(e, 'problem', e)}); "
                          f"{GRID_FORM}") from None


def _resolve(item: str, r) -> object:
    """A written value -> the value a run gets; ``2r`` with r = 8 -> 16 (an int when it is whole)."""
    rule = _RULE.match(item)
    if not rule:
        value = yaml.safe_load(item)
        return float(value) if isinstance(value, str) and _EXPONENT.match(value) else value
    value = float(rule.group(1) or 1) * r
    return int(value) if value == int(value) else value


def _format_value(value) -> str:
    text = "+".join(map(str, value)) if isinstance(value, (list, tuple)) else (
        f"{value:g}" if isinstance(value, float) else str(value))
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", text)


def _short_names(keys: list[str]) -> dict[str, str]:
    """Folder-name prefix per key: a known short name, else the last key part, else (ambiguous) the whole key."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: SHORT_NAMES.get(k, part if last.count(part) == 1 else k) for k, part in zip(keys, last)}


def expand(base_tree: dict, axes: tuple[Axis, ...], out: Path, source: str, origins: dict | None = None) -> list[Run]:
    """Every point of the grid as a validated RunConfig with ``output_dir = out/<name>``; ``origins`` are the
    ``--set`` overrides in ``base_tree`` (a bad value is blamed on its ``--set`` or ``--grid`` item)."""
    short = _short_names([a.key for a in axes])
    origins = dict(origins or {})
    base_r = from_dict(RunConfig, copy.deepcopy(base_tree), source=source, origins=origins).lora.r
    runs = []
    for point in itertools.product(*(a.items for a in axes)):
        items = {a.key: item for a, item in zip(axes, point)}
        r = _resolve(items[R_KEY], None) if R_KEY in items else base_r
        if any(_RULE.match(item) for item in items.values()) and (
                isinstance(r, bool) or not isinstance(r, (int, float)) or r <= 0):
            raise ConfigError(f"--grid point {items}: {', '.join(i for i in items.values() if _RULE.match(i))} "
                              f"is derived from lora.r, which is {r!r} here; give lora.r positive whole numbers")
        values = {key: _resolve(item, r) for key, item in items.items()}
        parts = {key: f"{short[key]}{_format_value(v)}" for key, v in values.items()}
        group = "-".join(p for key, p in parts.items() if key != SEED_KEY) or "base"
        name = "-".join(parts.values())
        twin = next((other for other in runs if other.name == name), None)
        if twin is not None:
            raise ConfigError(f"--grid: the points {twin.items} and {items} give the same run ({name}); drop one "
                              "of the values")
        tree = apply_overrides(copy.deepcopy(base_tree), [f"{k}={json.dumps(v)}" for k, v in values.items()],
                               source=f"--grid ({name})")
        tree["output_dir"] = str(out / name)
        point = {**origins, **{k: (f"--grid {k}={item}", lookup(base_tree, k)) for k, item in items.items()}}
        try:
            config = from_dict(RunConfig, tree, source=source, origins=point)
        except ConfigError as e:
            raise ConfigError(f"{e} (grid point {name})" if str(e).startswith("--grid") else
                              f"--grid point {name}: {e}") from None
        runs.append(Run(name, group, items, values, config))
    return runs


def run(config_path: str | Path, grid: list[str], *, sets: list[str] = (), out: str | Path | None = None,
        overwrite: bool = False, resume: bool = False, parallel: bool = False, exact_match: int = 0,
        log=print) -> dict:
    """Runs the sweep (finished runs of an earlier, identical sweep are kept with ``resume``) and writes the
    table and plots; returns ``{"dir", "rows", "runs"}``. ``exact_match=N`` also scores each run's greedy replies
    to the first N chats of eval_data (:func:`jaxft.recipes.scoring.chat_exact_match`)."""
    origins = {}
    base_tree = read_run_tree(config_path, list(sets), origins)
    base = from_dict(RunConfig, copy.deepcopy(base_tree), source=str(config_path), origins=origins)
    axes = parse_grid(list(grid))
    sweep_dir = Path(out or base.output_dir)
    runs = expand(base_tree, axes, sweep_dir, str(config_path), origins)
    for r in runs:
        sft.check_model_folder(r.config)
    if exact_match and base.eval_data is None:
        raise ConfigError(f"--exact-match scores replies to eval_data's chats, but {config_path} has no eval_data")
    if parallel:  # refused before the sweep folder is written, so the corrected command needs no --overwrite
        check_members([r.config for r in runs])
    if jax.process_index() != 0:  # process 0 tells the story; the others run the same steps
        log = _quiet
    plan = {"config": str(config_path), "set": list(sets), "grid": list(grid), "exact_match": exact_match,
            "base": to_dict(base), "runs": {r.name: r.values for r in runs}}
    _prepare_sweep_dir(sweep_dir, plan, overwrite, resume)
    summaries = _train_all(runs, parallel, log)
    if exact_match:
        for i, r in enumerate(runs, start=1):
            summaries[r.name] = _with_exact_match(r, summaries[r.name], exact_match, f"{i}/{len(runs)}", log)
    rows = aggregate(runs, summaries)
    if jax.process_index() == 0:
        write_outputs(sweep_dir, axes, runs, rows, summaries)
    log(f"sweep: {len(runs)} runs, {len(rows)} configs; wrote {sweep_dir / 'sweep.md'}")
    return {"dir": str(sweep_dir), "rows": rows, "runs": [r.name for r in runs]}


def _prepare_sweep_dir(sweep_dir: Path, plan: dict, overwrite: bool, resume: bool):
    plan_path = sweep_dir / "sweep.yaml"
    replace = False
    if occupied(sweep_dir):
        if resume:
            if not plan_path.exists() or yaml.safe_load(plan_path.read_text()) != json.loads(json.dumps(plan)):
                raise ConfigError(f"{sweep_dir}: --resume needs the folder of the same sweep (same config, --set, "
                                  "--grid and --exact-match), but its sweep.yaml is missing or differs; choose "
                                  "another --out, or --overwrite to replace it")
        elif overwrite:
            replace = True
        else:
            raise FileExistsError(f"{sweep_dir}: already exists and is not empty; pass --resume to finish its "
                                  "missing runs, --overwrite to replace it, or choose another --out")
    _sync("sweep: folder checked")  # by every process, before process 0 writes into it
    if jax.process_index() == 0:
        if replace:
            shutil.rmtree(sweep_dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        plan_path.write_text(yaml.safe_dump(json.loads(json.dumps(plan)), sort_keys=False))
    _sync("sweep: folder prepared")


def _sync(name: str):
    """Waits for every process of a multi-host sweep: they share its folder, which process 0 alone writes."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _quiet(*args, **kwargs):
    pass


def _train_all(runs: list[Run], parallel: bool, log) -> dict[str, dict]:
    """name -> summary; runs with a summary.json are done already, a run folder without one is a crashed run and is
    trained again from scratch (replaced, with overwrite, once the new run's inputs have passed)."""
    summaries, todo = {}, []
    for r in runs:
        done = Path(r.config.output_dir) / "summary.json"
        if done.exists():
            summaries[r.name] = json.loads(done.read_text())
        else:
            todo.append(r)
    if summaries:
        log(f"sweep: {len(summaries)} of {len(runs)} runs finished earlier (kept)")
    if parallel and todo:
        log(f"sweep: training {len(todo)} runs together: {', '.join(r.name for r in todo)}")
        results = run_parallel([r.config for r in todo], overwrite=True)
    else:
        results = []
        for i, r in enumerate(todo, start=len(summaries) + 1):
            log(f"sweep: run {i}/{len(runs)}: {r.name}")
            results.append(sft.run(r.config, overwrite=True))
    summaries.update((r.name, summary) for r, summary in zip(todo, results))  # each run wrote its summary.json
    return summaries


def _with_exact_match(r: Run, summary: dict, limit: int, progress: str, log) -> dict:
    """The summary with the run's exact match, scored now unless an earlier (resumed) sweep did; saved into the
    run's summary.json, so a sweep interrupted while scoring resumes without retraining."""
    if "exact_match" in (summary.get("eval") or {}):
        return summary
    log(f"sweep: exact match {progress}: {r.name}")
    model_cfg, params = load_trained(r.config, summary["export"])
    score = chat_exact_match(model_cfg, params, load_tokenizer(summary["export"]), r.config.eval_data, limit)
    summary = {**summary, "eval": {**(summary.get("eval") or {}), **score}}
    if jax.process_index() == 0:  # every process scored the same replies
        write_text_atomic(Path(r.config.output_dir) / "summary.json", json.dumps(summary, indent=2, default=float))
    return summary


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
        cells = [row["config"], *(_format_value(row[k]) for k in keys)]
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
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    for group, seed_curves in curves.items():
        steps = sorted(set.intersection(*(set(c) for c in seed_curves)))
        ax.plot(steps, [np.mean([c[s] for c in seed_curves]) for s in steps], label=group)
    ax.set(xlabel="step", ylabel="train loss", title="train loss (mean over seeds)")
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=100)
