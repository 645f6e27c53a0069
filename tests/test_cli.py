"""The jaxft command line: a tiny end-to-end train run, and one-paragraph errors for bad input."""
import json
import subprocess
import sys

import jax
import pytest
import yaml

import jaxft
from jaxft.cli import main
from jaxft.recipes import demo


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model, tok_dir = root / "model", root / "tokenizer"
    tok_dir.mkdir()
    demo.build_tokenizer(tok_dir, ["increment 1 2 3 4 = 2 3 4 5 ."])
    cfg = jaxft.ModelConfig(vocab_size=len(jaxft.load_tokenizer(tok_dir)), hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    jaxft.save_pretrained(cfg, jaxft.init_params(cfg, jax.random.PRNGKey(0)), model)
    for f in tok_dir.iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    demo.write_jsonl(root / "train.jsonl", [demo.chat((i, 2, 3, 4)) for i in range(10)])
    config = {"model": str(model), "output_dir": str(root / "run"), "method": "lora",
              "data": {"paths": [str(root / "train.jsonl")], "max_length": 32, "batch_size": 8},
              "lora": {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]},
              "train": {"steps": 3, "log_every": 1, "loss_chunk_size": 0}}
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    return root


def test_train_writes_metrics_curves_config_and_a_peft_adapter(tiny_run, capsys):
    assert main(["train", str(tiny_run / "run.yaml"), "--set", "optim.lr=1e-3"]) == 0
    run = tiny_run / "run"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if line["split"] == "train"] == [1, 2, 3]
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == 1e-3
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == 2
    assert (run / "adapter" / "tokenizer_config.json").exists()


def test_export_merged_model_gives_the_adapted_logits(tiny_run, tmp_path):
    import jax.numpy as jnp
    import numpy as np

    model, adapter = tiny_run / "model", tiny_run / "run" / "adapter"
    assert main(["export", str(model), "--adapter", str(adapter), "--out", str(tmp_path / "merged"), "--merged"]) == 0
    assert main(["export", str(model), "--adapter", str(adapter), "--out", str(tmp_path / "peft")]) == 0
    cfg, base = jaxft.from_pretrained(model)
    ids = jnp.asarray([[3, 4, 5, 6, 7]])
    adapted = jaxft.forward(cfg, jaxft.load_adapter(adapter, base), ids)
    _, merged = jaxft.from_pretrained(tmp_path / "merged")
    np.testing.assert_allclose(jaxft.forward(cfg, merged, ids), adapted, atol=1e-5)
    np.testing.assert_allclose(jaxft.forward(cfg, jaxft.load_adapter(tmp_path / "peft", base), ids), adapted, atol=0)
    assert (tmp_path / "merged" / "tokenizer_config.json").exists()


def _error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith(f"jaxft {argv[0]}: error:")
    return err


def test_existing_output_dir_is_never_overwritten(tiny_run, capsys):
    (tiny_run / "run").mkdir(exist_ok=True)
    (tiny_run / "run" / "keep.txt").write_text("mine")
    assert "already exists" in _error(["train", str(tiny_run / "run.yaml")], capsys)
    assert (tiny_run / "run" / "keep.txt").read_text() == "mine"


def test_batch_that_does_not_split_over_the_mesh_is_explained(tiny_run, capsys):
    err = _error(["train", str(tiny_run / "run.yaml"), "--set", "data.batch_size=4", "--set",
                  f"output_dir={tiny_run / 'other'}"], capsys)
    assert "do not split over the mesh" in err


def test_missing_config_file(tmp_path, capsys):
    assert "config file not found" in _error(["train", str(tmp_path / "nope.yaml")], capsys)


def test_unknown_key_names_key_and_file(tiny_run, tmp_path, capsys):
    config = yaml.safe_load((tiny_run / "run.yaml").read_text())
    config["lora"]["rank"] = 8
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    err = _error(["train", str(tmp_path / "bad.yaml")], capsys)
    assert "unknown key(s) ['rank']" in err and "bad.yaml" in err


def test_python_yaml_tags_are_refused(tmp_path, capsys):
    (tmp_path / "evil.yaml").write_text("model: !!python/object/apply:os.system ['echo pwned']\n")
    assert "not valid YAML at line 1" in _error(["train", str(tmp_path / "evil.yaml")], capsys)


def test_bad_set_syntax(tiny_run, capsys):
    assert "is not key=value" in _error(["train", str(tiny_run / "run.yaml"), "--set", "lora.r"], capsys)


def test_model_folder_without_config_json(tmp_path, capsys):
    assert "no config.json" in _error(["generate", str(tmp_path), "--prompt", "hi"], capsys)


def test_debug_shows_the_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "jaxft", "--debug", "train", str(tmp_path / "nope.yaml")],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_every_subcommand_explains_itself():
    for command in ("train", "demo", "generate", "export", "inspect"):
        result = subprocess.run([sys.executable, "-m", "jaxft", command, "--help"], capture_output=True, text=True)
        assert result.returncode == 0 and len(result.stdout.split()) > 20, command
