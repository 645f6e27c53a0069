"""Hyperparameter sweeps: a grid over run-config keys, run after run, summarized over seeds in a table and two plots.

``jaxft sweep config.yaml --grid lora.r=4,8,16 lora.lora_alpha=2r optim.lr=1e-4,3e-4 seeds=3``.

The grid language (``KEY=V1,V2,...``, ``alpha=2r``, ``seeds=N``) is :mod:`jaxft.recipes.grid`'s; results are mean
± sample std over the seeds (:mod:`jaxft.recipes.sweep_report`).

Each run trains with :func:`jaxft.recipes.sft.run` into ``<sweep dir>/<name>`` (``r8-a16-lr0.0001-s0``), so every
run folder is an ordinary run folder; with ``parallel`` the runs train together in one compiled program
(:func:`jaxft.recipes.multi.run_parallel`: members may differ only in LoRA shape, lr and seed). The sweep folder
gets ``sweep.yaml`` (what was asked, and every run's overrides), ``sweep.csv``, ``sweep.md``, ``sweep.json``,
``loss_curves.png`` and ``heatmap_r_alpha.png``. In a multi-host sweep every process trains every run together
and computes the same table; process 0 alone writes the shared folders.
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import jax
import yaml
from jax.experimental import multihost_utils

from jaxft.config import ConfigError, from_dict, to_dict
from jaxft.files import occupied, write_text_atomic
from jaxft.hf.tokenizer import load_tokenizer
from jaxft.recipes import sft
from jaxft.recipes.config import RunConfig, read_run_tree
from jaxft.recipes.grid import Run, expand, parse_grid
from jaxft.recipes.multi import check_members, run_parallel
from jaxft.recipes.scoring import chat_exact_match, load_trained
from jaxft.recipes.skeleton import check_model_folder
from jaxft.recipes.sweep_report import aggregate, write_outputs


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
        check_model_folder(r.config)
    if exact_match and base.eval_data is None:
        raise ConfigError(f"--exact-match scores replies to eval_data's chats, but {config_path} has no eval_data")
    if exact_match and base.head is not None:
        raise ConfigError(f"--exact-match scores generated chat replies, but {config_path} trains a {base.head.kind} "
                          "head; its runs' evaluations already report the head's metrics (a QA run: exact match)")
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
