"""#13 section 4: a config error names where the value came from (the file, a --set or a --grid item) as
section.key; path fields expand ~ and $VARS; optim.total_steps follows train.steps."""
import math
from pathlib import Path

import pytest
import yaml

from jaxft.config import ConfigError
from jaxft.recipes import sweep
from jaxft.recipes.config import load_run_config, read_run_tree
from jaxft.recipes.grid import expand, parse_grid
from jaxft.train.optim import make_schedule

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def run_yaml(tmp_path):
    config = {"model": "m", "output_dir": "out", "data": {"paths": ["d.jsonl"]},
              "lora": {"r": 4, "lora_alpha": 8}, "optim": {"schedule": "cosine", "warmup_steps": 2},
              "train": {"steps": 10}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "run.yaml"


def _error(path, sets) -> str:
    with pytest.raises(ConfigError) as info:
        load_run_config(path, sets)
    return str(info.value)


@pytest.mark.parametrize("sets, says", [
    (["lora.r=abc"], "--set lora.r=abc: expected a whole number, got 'abc'"),
    (["optim.lr=fast"], "--set optim.lr=fast: expected a number, got 'fast'"),
    (["lora.rank=4"], "--set lora.rank=4: unknown key(s) ['lora.rank'] for LoraConfig"),
    (["train.steps=0"], "--set train.steps=0: train.steps must be >= 1, got 0"),
    (["lora.r=8", "lora.lora_alpha=-1"], "--set lora.lora_alpha=-1: lora.lora_alpha must be > 0, got -1"),
    (["optim.b1=1.5"], "--set optim.b1=1.5: optim.b1 = 1.5: expected a value in [0, 1)"),
    (["eval_data={paths: [], batch_size: 2}"], "--set eval_data={paths: [], batch_size: 2}: data.paths is empty"),
])
def test_a_bad_value_given_with_set_is_blamed_on_that_set(run_yaml, sets, says):
    assert _error(run_yaml, sets).startswith(says)


def test_a_bad_value_in_the_file_is_blamed_on_the_file_even_with_other_sets(run_yaml):
    tree = yaml.safe_load(run_yaml.read_text())
    tree["lora"]["r"], tree["train"]["steps"] = "abc", 10
    run_yaml.write_text(yaml.safe_dump(tree))
    assert _error(run_yaml, ["train.steps=20"]).startswith(f"{run_yaml}: lora.r: expected a whole number")
    tree["lora"]["r"], tree["train"]["log_every"] = 4, 0
    run_yaml.write_text(yaml.safe_dump(tree))
    assert _error(run_yaml, ["train.steps=20"]).startswith(f"{run_yaml}: train.log_every must be >= 1, got 0")
    assert load_run_config(run_yaml, ["train.log_every=5"]).train.log_every == 5  # the --set repairs it


@pytest.mark.parametrize("grid, says", [
    (["lora.r=4,x"], "--grid lora.r=x: expected a whole number, got 'x' (grid point rx)"),
    (["r=4", "lora.lora_dropout=0.1,1.5"], "--grid lora.lora_dropout=1.5: lora.lora_dropout must be in [0, 1)"),
    (["optim.lr=1e-3,-1"], "--grid optim.lr=-1: optim.lr = -1: expected a learning rate > 0"),
])
def test_a_bad_grid_value_is_blamed_on_that_grid_item(run_yaml, tmp_path, grid, says):
    with pytest.raises(ConfigError) as info:
        expand(read_run_tree(run_yaml), parse_grid(grid), tmp_path, str(run_yaml))
    assert str(info.value).startswith(says)


def test_a_bad_set_under_a_sweep_is_blamed_on_the_set(run_yaml, tmp_path):
    with pytest.raises(ConfigError, match=r"^--set train.steps=-3: train.steps must be >= 1"):
        sweep.run(run_yaml, ["r=2,4"], sets=["train.steps=-3"], out=tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_path_fields_expand_home_and_environment_variables(run_yaml, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("JAXFT_TEST_DATA", "/srv/data")
    tree = yaml.safe_load(run_yaml.read_text())
    tree.update(model="~/models/base", output_dir="$HOME/runs/${JAXFT_TEST_DATA}")
    tree["data"] = {"paths": ["$JAXFT_TEST_DATA/a.jsonl", "~/b.jsonl"], "template": "~/t.jinja"}
    tree["eval_data"] = {"paths": ["${JAXFT_TEST_DATA}/e.jsonl"], "template": "chatml"}
    run_yaml.write_text(yaml.safe_dump(tree))
    cfg = load_run_config(run_yaml, ["eval_data.template=~/{{x}}"])
    home = str(tmp_path / "home")
    assert cfg.model == f"{home}/models/base" and cfg.output_dir == f"{home}/runs//srv/data"
    assert cfg.data.paths == ("/srv/data/a.jsonl", f"{home}/b.jsonl") and cfg.data.template == f"{home}/t.jinja"
    assert cfg.eval_data.paths == ("/srv/data/e.jsonl",)
    assert cfg.eval_data.template == "~/{{x}}"  # Jinja source, not a file: left as written
    assert load_run_config(run_yaml, ["model=~/other"]).model == f"{home}/other"


def test_the_shipped_demo_config_finds_its_model_under_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_run_config(ROOT / "configs" / "demo-cpu.yaml")
    assert cfg.model == f"{tmp_path}/.cache/jaxft/demo-base-increment-v2-400-0"


def test_total_steps_follows_train_steps_and_a_different_one_is_refused(run_yaml):
    cfg = load_run_config(run_yaml, ["optim.min_lr_ratio=0.1", "optim.lr=1e-3"])
    assert cfg.optim.total_steps == 10
    schedule = make_schedule(cfg.optim)  # cosine from lr at the end of warmup to lr * 0.1 at train.steps
    assert math.isclose(float(schedule(2)), 1e-3, rel_tol=1e-6)
    assert math.isclose(float(schedule(10)), 1e-4, rel_tol=1e-5)
    assert math.isclose(float(schedule(6)), 1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 4 / 8)), rel_tol=1e-5)
    assert load_run_config(run_yaml, ["train.steps=40"]).optim.total_steps == 40
    assert load_run_config(run_yaml, ["optim.total_steps=10"]).optim.total_steps == 10
    longer = cfg.replace(train=cfg.train.__class__(steps=30))
    assert longer.optim.total_steps == 30  # replace keeps it following train.steps
    says = "optim.total_steps is 25 but train.steps is 10"
    assert _error(run_yaml, ["optim.total_steps=25"]).startswith(f"--set optim.total_steps=25: {says}")
    tree = yaml.safe_load(run_yaml.read_text())
    tree["optim"]["total_steps"] = 10
    run_yaml.write_text(yaml.safe_dump(tree))
    assert _error(run_yaml, ["train.steps=20"]).startswith("--set train.steps=20: optim.total_steps is 10 but "
                                                           "train.steps is 20")


def test_a_saved_run_config_takes_more_steps_with_set(tmp_path):
    """The resolved config a run saves loads back with --set train.steps=N, and the schedule follows it."""
    from jaxft.data.config import DataConfig
    from jaxft.recipes.config import RunConfig, dump_run_config, load_run_config

    cfg = RunConfig(model=str(tmp_path), output_dir=str(tmp_path / "run"), data=DataConfig(paths=("x.jsonl",)))
    dump_run_config(cfg, tmp_path / "config.yaml")
    longer = load_run_config(tmp_path / "config.yaml", ["train.steps=250"])
    assert (longer.train.steps, longer.optim.total_steps) == (250, 250)
    assert load_run_config(tmp_path / "config.yaml") == cfg


def test_a_run_folder_from_before_total_steps_followed_train_steps_still_loads(tmp_path):
    """config.yaml files written before this rule hold the old default total_steps 0 ("not set")."""
    from jaxft.data.config import DataConfig
    from jaxft.recipes.config import RunConfig, dump_run_config, load_run_config

    dump_run_config(RunConfig(model=str(tmp_path), output_dir=str(tmp_path / "run"),
                              data=DataConfig(paths=("x.jsonl",))), tmp_path / "config.yaml")
    old = yaml.safe_load((tmp_path / "config.yaml").read_text())
    old["optim"]["total_steps"] = 0
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    cfg = load_run_config(tmp_path / "config.yaml", ["train.steps=40"])
    assert cfg.optim.total_steps == cfg.train.steps == 40
