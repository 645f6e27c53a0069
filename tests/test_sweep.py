"""jaxft sweep: grid syntax, a tiny end-to-end sweep checked against its own run folders, and eval token accuracy."""
import csv
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

import jaxft
from jaxft.config import ConfigError
from jaxft.data.chat import IGNORE_INDEX
from jaxft.recipes import demo, sft, sweep
from jaxft.recipes.config import DEFAULT_LORA, load_run_config, read_run_tree
from jaxft.recipes.grid import expand, parse_grid
from jaxft.recipes.sweep_report import write_heatmap
from jaxft.train.objectives import CausalLM
from sft_worker import tiny_chat_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    """A 2-layer random model with the demo's tokenizer, 16 demo chats, and a LoRA run config of 3 steps."""
    root = tmp_path_factory.mktemp("sweep")
    model = tiny_chat_model(root)
    demo.write_jsonl(root / "eval.jsonl", [demo.chat((i, 5, 6, 7)) for i in range(10)])
    data = {"max_length": 32, "batch_size": 8}
    config = {"model": str(model), "output_dir": str(root / "sweep"), "method": "lora",
              "data": {"paths": [str(root / "train.jsonl")], **data},
              "eval_data": {"paths": [str(root / "eval.jsonl")], **data},
              "lora": {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]},
              "optim": {"lr": 1e-2},
              "train": {"steps": 3, "log_every": 1, "eval_batches": 1, "loss_chunk_size": 0}}
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    return root


def test_grid_items_become_axes_with_aliases_and_seeds_last():
    axes = parse_grid(["seeds=3", "lora.r=4,8", "lr=1e-4,3e-4", "alpha=2r,2*r,r"])
    assert [(a.key, a.items) for a in axes] == [
        ("lora.r", ("4", "8")), ("optim.lr", ("1e-4", "3e-4")), ("lora.lora_alpha", ("2r", "2*r", "r")),
        ("train.seed", ("0", "1", "2"))]


def test_list_values_keep_their_commas():
    (axis,) = parse_grid(["lora.target_modules=[q_proj,v_proj],all-linear"])
    assert axis.items == ("[q_proj,v_proj]", "all-linear")


def test_alpha_rule_is_resolved_against_each_points_r(tiny_config, tmp_path):
    base = yaml.safe_load((tiny_config / "run.yaml").read_text())
    runs = expand(base, parse_grid(["r=4,8", "alpha=2r,32", "seeds=2"]), tmp_path, "run.yaml")
    assert [r.name for r in runs][:4] == ["r4-a8-s0", "r4-a8-s1", "r4-a32-s0", "r4-a32-s1"]
    assert [(r.config.lora.r, r.config.lora.lora_alpha, r.config.train.seed) for r in runs[4:6]] == [
        (8, 16, 0), (8, 16, 1)]
    assert runs[0].group == "r4-a8" and runs[0].items["lora.lora_alpha"] == "2r"
    assert runs[0].config.output_dir == str(tmp_path / "r4-a8-s0")


def test_alpha_rule_without_an_r_axis_uses_the_configs_r(tiny_config, tmp_path):
    base = yaml.safe_load((tiny_config / "run.yaml").read_text())
    (run,) = expand(base, parse_grid(["alpha=1.5r"]), tmp_path, "run.yaml")
    assert run.config.lora.lora_alpha == 3 and run.name == "a3"


@pytest.mark.parametrize("item, says", [
    ("lora.r", "expected KEY=V1,V2"),
    ("=4,8", "expected KEY=V1,V2"),
    ("lora.r=4,,8", "expected KEY=V1,V2"),
    ("lora.r=", "expected KEY=V1,V2"),
    ("seeds=0", "seeds takes one whole number"),
    ("seeds=a", "seeds takes one whole number"),
    ("lora.r=2r", "cannot be derived from itself"),
    ("output_dir=a,b", "choose that with --out"),
    ("lora.r=[4", "is not plain YAML"),
])
def test_bad_grid_syntax_quotes_the_item(item, says):
    with pytest.raises(ConfigError, match=says) as info:
        parse_grid([item])
    assert repr(item) in str(info.value) or item in str(info.value)


def test_repeated_grid_key_is_an_error():
    with pytest.raises(ConfigError, match=r"lora.r \(or an alias of it\) appears 2 times"):
        parse_grid(["r=4", "lora.r=8"])


def test_values_that_give_the_same_run_are_an_error(tiny_config, tmp_path):
    base = yaml.safe_load((tiny_config / "run.yaml").read_text())
    with pytest.raises(ConfigError, match=r"give the same run \(r8-a16\)"):
        expand(base, parse_grid(["r=8", "alpha=2r,16"]), tmp_path, "run.yaml")
    with pytest.raises(ConfigError, match="4 given more than once"):
        parse_grid(["r=4,8,4"])


def test_an_override_into_a_section_the_file_leaves_out_keeps_the_runs_defaults(tiny_config, tmp_path):
    """A config without `lora:` trains the run default (RunConfig().lora: r=16, alpha=32, all-linear); `--set
    lora.r=8` and a grid over r change r alone, and alpha=2r is derived from the r the run trains."""
    config = yaml.safe_load((tiny_config / "run.yaml").read_text())
    del config["lora"]
    (tmp_path / "no-lora.yaml").write_text(yaml.safe_dump(config))
    default = DEFAULT_LORA
    cfg = load_run_config(tmp_path / "no-lora.yaml", ["lora.r=8"])
    assert cfg.lora == default.replace(r=8)
    tree = read_run_tree(tmp_path / "no-lora.yaml")
    runs = expand(tree, parse_grid(["r=4,8", "alpha=2r"]), tmp_path, "no-lora.yaml")
    assert [r.config.lora for r in runs] == [default.replace(r=4, lora_alpha=8), default.replace(r=8, lora_alpha=16)]


@pytest.mark.parametrize("grid, says", [
    (["train.steps=2.5"], "--grid train.steps=2.5: expected a whole number, got 2.5"),
    (["train.steps=ten"], "--grid train.steps=ten: expected a whole number, got 'ten'"),
    (["r=4,eight", "alpha=2r"], "is derived from lora.r, which is 'eight' here"),
])
def test_grid_values_of_the_wrong_type_are_refused_before_training(tiny_config, tmp_path, grid, says):
    tree = read_run_tree(tiny_config / "run.yaml")
    with pytest.raises(ConfigError, match=says):
        expand(tree, parse_grid(grid), tmp_path, "run.yaml")


def test_whole_number_fields_take_yaml_exponents_and_whole_floats(tiny_config):
    cfg = load_run_config(tiny_config / "run.yaml", ["train.steps=1e3", "optim.warmup_steps=20.0"])
    assert (cfg.train.steps, cfg.optim.warmup_steps) == (1000, 20)
    assert type(cfg.train.steps) is int and type(cfg.optim.warmup_steps) is int


def test_unknown_grid_key_is_named(tiny_config, tmp_path):
    base = yaml.safe_load((tiny_config / "run.yaml").read_text())
    with pytest.raises(ConfigError, match=r"--grid lora.rank=4: unknown key\(s\) \['lora.rank'\] for LoraConfig"):
        expand(base, parse_grid(["lora.rank=4,8"]), tmp_path, "run.yaml")


READ = {"final_loss": lambda s: s["final_loss"], "eval_loss": lambda s: s["eval"]["loss"],
        "eval_accuracy": lambda s: s["eval"]["accuracy"], "tokens_per_s": lambda s: s["tokens_per_s"],
        "padding": lambda s: s["padding"]}


def _expected_rows(sweep_dir, metrics=tuple(READ)):
    """The oracle: mean and sample std per config recomputed with numpy from the runs' own summary.json files."""
    groups = {}
    for summary_path in sorted(sweep_dir.glob("*/summary.json")):
        group = summary_path.parent.name.rsplit("-s", 1)[0]
        groups.setdefault(group, []).append(json.loads(summary_path.read_text()))
    expected = {}
    for group, summaries in groups.items():
        columns = {metric: [READ[metric](s) for s in summaries] for metric in metrics}
        expected[group] = {**{f"{k}_mean": np.mean(v) for k, v in columns.items()},
                           **{f"{k}_std": np.std(v, ddof=1) for k, v in columns.items()},
                           "trainable_params": summaries[0]["trainable_params"], "seeds": len(summaries)}
    return expected


@pytest.fixture(scope="module")
def finished_sweep(tiny_config):
    """2 r x 2 alpha x 2 seeds."""
    sweep.run(tiny_config / "run.yaml", ["lora.r=2,4", "alpha=r,2r", "seeds=2"], log=lambda *_: None)
    return tiny_config / "sweep"


def test_sweep_table_matches_the_run_summaries(finished_sweep):
    out = finished_sweep
    expected = _expected_rows(out)
    assert sorted(expected) == ["r2-a2", "r2-a4", "r4-a4", "r4-a8"]
    with open(out / "sweep.csv") as f:
        rows = {row["config"]: row for row in csv.DictReader(f)}
    assert sorted(rows) == sorted(expected)
    for group, want in expected.items():
        for key, value in want.items():
            np.testing.assert_allclose(float(rows[group][key]), value, rtol=1e-12, err_msg=f"{group} {key}")
    assert rows["r4-a8"]["lora.r"] == "4" and rows["r4-a8"]["lora.lora_alpha"] == "8"
    assert expected["r4-a8"]["trainable_params"] == 2 * expected["r2-a2"]["trainable_params"]


def test_sweep_markdown_shows_mean_and_std(finished_sweep):
    out = finished_sweep
    md = (out / "sweep.md").read_text()
    want = _expected_rows(out)["r2-a4"]
    line = next(line for line in md.splitlines() if line.startswith("| r2-a4 |"))
    assert f"{want['eval_loss_mean']:.4f} ± {want['eval_loss_std']:.4f}" in line
    assert f"{want['eval_accuracy_mean']:.4f} ± {want['eval_accuracy_std']:.4f}" in line
    assert "mean ± sample std over 2 seeds" in md and "heatmap_r_alpha.png: eval token accuracy" in md


def test_sweep_writes_both_plots_and_its_plan(finished_sweep, tiny_config):
    out = finished_sweep
    assert (out / "loss_curves.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "heatmap_r_alpha.png").read_bytes()[:8] == PNG_MAGIC
    plan = yaml.safe_load((out / "sweep.yaml").read_text())
    assert plan["runs"]["r4-a8-s1"] == {"lora.r": 4, "lora.lora_alpha": 8, "train.seed": 1}
    assert yaml.safe_load((out / "r4-a8-s1" / "config.yaml").read_text())["train"]["seed"] == 1


def test_existing_sweep_folder_needs_resume_or_overwrite(finished_sweep, tiny_config):
    with pytest.raises(FileExistsError, match="--resume to finish its missing runs, --overwrite"):
        sweep.run(tiny_config / "run.yaml", ["lora.r=2,4", "alpha=r,2r", "seeds=2"], log=lambda *_: None)


def test_resume_retrains_only_runs_without_a_summary(finished_sweep, tiny_config, tmp_path, monkeypatch):
    out = finished_sweep
    crashed = out / "r2-a2-s1"
    shutil.copytree(crashed, tmp_path / "finished")
    (crashed / "summary.json").unlink()
    trained = []

    def train_again(cfg, overwrite=False):  # stands in for the real (identical) run: this test is about which runs
        assert overwrite  # are trained; the crashed folder is replaced once the new run's inputs have passed
        trained.append(cfg.output_dir)
        shutil.rmtree(cfg.output_dir)
        shutil.copytree(tmp_path / "finished", cfg.output_dir)
        return json.loads((tmp_path / "finished" / "summary.json").read_text())

    monkeypatch.setattr(sft, "run", train_again)
    messages = []
    sweep.run(tiny_config / "run.yaml", ["lora.r=2,4", "alpha=r,2r", "seeds=2"], resume=True, log=messages.append)
    assert trained == [str(crashed)]
    assert messages[:2] == ["sweep: 7 of 8 runs finished earlier (kept)", "sweep: run 8/8: r2-a2-s1"]


def test_resume_refuses_the_folder_of_another_sweep(finished_sweep, tiny_config):
    with pytest.raises(ConfigError, match="sweep.yaml is missing or differs"):
        sweep.run(tiny_config / "run.yaml", ["lora.r=2,8"], resume=True, log=lambda *_: None)


def test_parallel_sweep_trains_the_runs_together_and_tables_them(tiny_config):
    out, messages = tiny_config / "parallel", []
    sweep.run(tiny_config / "run.yaml", ["r=2,4", "alpha=2r", "seeds=2"], out=out, parallel=True,
              log=messages.append)
    assert messages[0] == "sweep: training 4 runs together: r2-a4-s0, r2-a4-s1, r4-a8-s0, r4-a8-s1"
    with open(out / "sweep.csv") as f:
        rows = {row["config"]: row for row in csv.DictReader(f)}
    for group, want in _expected_rows(out, metrics=("final_loss", "eval_loss")).items():
        for key, value in want.items():
            np.testing.assert_allclose(float(rows[group][key]), value, rtol=1e-12, err_msg=f"{group} {key}")
    assert (out / "heatmap_r_alpha.png").read_bytes()[:8] == PNG_MAGIC


def test_grid_without_alpha_skips_the_heatmap_with_a_note(tmp_path):
    note = write_heatmap(tmp_path / "heatmap.png", parse_grid(["lr=1e-3,1e-2", "seeds=2"]), [], [])
    assert note == "No heatmap_r_alpha.png: the grid has no lora.r and no lora.lora_alpha dimension."
    assert not (tmp_path / "heatmap.png").exists()


def test_exponent_values_are_numbers_in_names_and_table(tiny_config, tmp_path):
    base = yaml.safe_load((tiny_config / "run.yaml").read_text())
    runs = expand(base, parse_grid(["lr=1e-3,3e-4"]), tmp_path, "run.yaml")
    assert [(r.name, r.values["optim.lr"], r.config.optim.lr) for r in runs] == [
        ("lr0.001", 0.001, 0.001), ("lr0.0003", 0.0003, 0.0003)]


def test_eval_sums_match_a_numpy_oracle():
    cfg = jaxft.ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2)
    params = jaxft.init_params(cfg, jax.random.PRNGKey(1))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50, (3, 11))
    logits = np.asarray(jax.jit(jaxft.forward, static_argnums=0)(cfg, params, jnp.asarray(ids)), np.float64)
    labels = np.where(rng.random((3, 11)) < 0.3, IGNORE_INDEX, rng.integers(0, 50, (3, 11)))
    labels[0, :4] = logits[0, :4].argmax(-1)  # some certain hits
    target = labels != IGNORE_INDEX
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want_loss = -np.take_along_axis(log_probs, np.where(target, labels, 0)[..., None], -1)[..., 0][target].sum()
    want_hits = ((logits.argmax(-1) == labels) & target).sum()
    batch = {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(labels)}
    for chunk_tokens in (1024, 6):  # 6 tokens over 3 rows: slices of 2 positions, the last one padded
        step = jax.jit(CausalLM(chunk_size=chunk_tokens).eval_sums, static_argnums=0)
        loss_sum, n_targets, hits = (step(cfg, params, batch)[k] for k in ("loss_sum", "n_targets", "n_correct"))
        np.testing.assert_allclose(float(loss_sum), want_loss, rtol=1e-5)
        assert int(n_targets) == target.sum() and int(hits) == want_hits >= 4
