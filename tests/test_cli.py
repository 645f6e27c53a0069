"""The jaxft command line: a tiny end-to-end train run, and one-paragraph errors for bad input."""
import json
import subprocess
import sys

import pytest
import yaml

import jaxft
from jaxft.cli import main
from jaxft.recipes import demo


@pytest.fixture(scope="module")
def trained(tiny_run):
    """The tiny run trained once by the CLI; the tests that read its adapter need it whichever xdist worker runs
    them."""
    assert main(["train", str(tiny_run / "run.yaml"), "--set", "optim.lr=1e-3"]) == 0
    return tiny_run / "run"


def test_train_writes_metrics_curves_config_and_a_peft_adapter(trained):
    run = trained
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if line["split"] == "train"] == [1, 2, 3]
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == 1e-3
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == 2
    assert (run / "adapter" / "tokenizer_config.json").exists()


def test_export_merged_model_gives_the_adapted_logits(tiny_run, trained, tmp_path):
    import jax.numpy as jnp
    import numpy as np

    model, adapter = tiny_run / "model", trained / "adapter"
    assert main(["export", str(model), "--adapter", str(adapter), "--out", str(tmp_path / "merged"), "--merged"]) == 0
    assert main(["export", str(model), "--adapter", str(adapter), "--out", str(tmp_path / "peft")]) == 0
    cfg, base = jaxft.from_pretrained(model)
    ids = jnp.asarray([[3, 4, 5, 6, 7]])
    adapted = jaxft.forward(cfg, jaxft.load_adapter(adapter, base), ids)
    _, merged = jaxft.from_pretrained(tmp_path / "merged")
    np.testing.assert_allclose(jaxft.forward(cfg, merged, ids), adapted, atol=1e-5)
    np.testing.assert_allclose(jaxft.forward(cfg, jaxft.load_adapter(tmp_path / "peft", base), ids), adapted, atol=0)
    assert (tmp_path / "merged" / "tokenizer_config.json").exists()


def test_eval_reports_loss_perplexity_and_token_accuracy_of_model_plus_adapter(tiny_run, trained, capsys):
    import numpy as np

    from jaxft.data import DataConfig, build_iterator

    model, adapter, data = tiny_run / "model", trained / "adapter", tiny_run / "train.jsonl"
    assert main(["eval", str(model), "--adapter", str(adapter), "--data", str(data), "--max-length", "32",
                 "--batch-size", "4", "--exact-match", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    cfg, params = jaxft.from_pretrained(model)
    params = jaxft.load_adapter(adapter, params)
    iterator = build_iterator(DataConfig(paths=(str(data),), max_length=32, batch_size=4, dedup=None),
                              jaxft.load_tokenizer(adapter)).iterator
    losses, hits = [], []
    for _ in range(iterator.batches_per_epoch):  # the oracle: full logits in numpy, one epoch
        batch = next(iterator)
        logits = np.asarray(jaxft.forward(cfg, params, batch["input_ids"], positions=batch["positions"],
                                          segment_ids=batch["segment_ids"]), np.float64)
        target = batch["labels"] != -100
        log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        picked = np.take_along_axis(log_probs, np.where(target, batch["labels"], 0)[..., None], -1)[..., 0]
        losses += list(-picked[target])
        hits += list((logits.argmax(-1) == batch["labels"])[target])
    assert result["tokens"] == len(losses) and len(losses) % 10 == 0  # every chat of the file, each as long
    np.testing.assert_allclose(result["loss"], np.mean(losses), rtol=1e-5)
    np.testing.assert_allclose(result["perplexity"], np.exp(np.mean(losses)), rtol=1e-5)
    assert result["accuracy"] == np.mean(hits)
    want, _ = demo.exact_match(cfg, params, jaxft.load_tokenizer(adapter), [(i, 2, 3, 4) for i in range(3)])
    assert (result["exact_match"], result["exact_match_chats"]) == (want, 3)


def test_sweep_command_prints_the_table_and_writes_the_plots(tiny_run, capsys):
    out = tiny_run / "sweep"
    eval_data = f"eval_data={{paths: [{tiny_run / 'train.jsonl'}], max_length: 32, batch_size: 8}}"
    assert main(["sweep", str(tiny_run / "run.yaml"), "--grid", "r=2", "alpha=2r", "--set", "train.steps=2",
                 "--set", eval_data, "--out", str(out), "--exact-match", "2"]) == 0
    printed = capsys.readouterr().out
    assert "| r2-a4 | 2 | 4 |" in printed and "| eval exact match |" in printed
    summary = json.loads((out / "r2-a4" / "summary.json").read_text())
    cfg, params = jaxft.from_pretrained(tiny_run / "model")
    params = jaxft.load_adapter(out / "r2-a4" / "adapter", params)
    tokenizer = jaxft.load_tokenizer(out / "r2-a4" / "adapter")
    want, _ = demo.exact_match(cfg, params, tokenizer, [(0, 2, 3, 4), (1, 2, 3, 4)])
    assert (summary["eval"]["exact_match"], summary["eval"]["exact_match_chats"]) == (want, 2)
    assert "heatmap_r_alpha.png: eval exact match (mean over seeds)" in (out / "sweep.md").read_text()
    for name in ("sweep.csv", "sweep.md", "sweep.json", "sweep.yaml", "r2-a4/summary.json"):
        assert (out / name).exists(), name
    for name in ("loss_curves.png", "heatmap_r_alpha.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith(f"jaxft {argv[0]}: error:")
    return err


def test_existing_output_dir_is_never_overwritten(tiny_run, capsys):
    taken = tiny_run / "taken-run"
    taken.mkdir(exist_ok=True)
    (taken / "keep.txt").write_text("mine")
    assert "already exists" in _error(["train", str(tiny_run / "run.yaml"), "--set", f"output_dir={taken}"], capsys)
    assert (taken / "keep.txt").read_text() == "mine"


def test_batch_that_does_not_split_over_the_mesh_is_explained(tiny_run, capsys):
    err = _error(["train", str(tiny_run / "run.yaml"), "--set", "data.batch_size=4", "--set",
                  f"output_dir={tiny_run / 'other'}"], capsys)
    assert "do not split over the mesh" in err


@pytest.mark.parametrize("flag, value", [("--exact-match", "-3"), ("--batch-size", "0"), ("--max-length", "x")])
def test_bad_counts_are_refused_by_the_argument_parser(tiny_run, capsys, flag, value):
    with pytest.raises(SystemExit) as info:
        main(["eval", str(tiny_run / "model"), "--data", str(tiny_run / "train.jsonl"), flag, value])
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"argument {flag}:" in err and "Traceback" not in err


def test_debug_shows_the_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "jaxft", "--debug", "train", str(tmp_path / "nope.yaml")],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_every_subcommand_explains_itself():
    for command in ("train", "sweep", "eval", "demo", "generate", "export", "convert", "inspect"):
        result = subprocess.run([sys.executable, "-m", "jaxft", command, "--help"], capture_output=True, text=True)
        assert result.returncode == 0 and len(result.stdout.split()) > 20, command


def _patched_cli(patch: str, argv: list[str]) -> subprocess.CompletedProcess:
    """The real command line in a fresh interpreter, with ``load_run_config`` replaced by ``patch`` (a lambda)."""
    code = ("import sys; import jaxft.recipes.config as c; from jaxft.config import ConfigError; "
            f"c.load_run_config = {patch}; from jaxft.cli import main; sys.exit(main({argv!r}))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_a_bug_keeps_its_traceback_and_a_domain_error_is_one_paragraph(tmp_path):
    argv = ["train", str(tmp_path / "run.yaml")]
    bug = _patched_cli("lambda *a: {}['no such key']", argv)  # a KeyError inside jaxft is a bug, not bad input
    assert bug.returncode == 1
    assert "Traceback (most recent call last)" in bug.stderr and "KeyError: 'no such key'" in bug.stderr
    bad = _patched_cli("lambda *a: (_ for _ in ()).throw(ConfigError('run.yaml: lora.r: expected a whole number'))",
                       argv)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.splitlines() == ["jaxft train: error: run.yaml: lora.r: expected a whole number",
                                       "(run with --debug for the full traceback)"]


def test_generate_seed_repeats_a_sample_and_other_seeds_differ(tiny_run, capsys):
    def sample(seed):
        assert main(["generate", str(tiny_run / "model"), "--prompt", "increment 1 2", "--temperature", "1.5",
                     "--max-new-tokens", "24", "--seed", str(seed)]) == 0
        return capsys.readouterr().out

    first = sample(1)
    assert sample(1) == first
    assert sample(2) != first and sample(3) != first


def test_generate_chat_template_wraps_the_prompt_in_that_template(tiny_run, tmp_path, capsys):
    import jax.numpy as jnp
    import numpy as np

    from jaxft.data.chat import CHATML_TEMPLATE, LLAMA3_TEMPLATE

    (tmp_path / "t.jinja").write_text(LLAMA3_TEMPLATE)
    cfg, params = jaxft.from_pretrained(tiny_run / "model")
    tok = jaxft.load_tokenizer(tiny_run / "model")
    for flag, template in (("llama3", LLAMA3_TEMPLATE), (str(tmp_path / "t.jinja"), LLAMA3_TEMPLATE),
                           ("chatml", CHATML_TEMPLATE)):
        assert main(["generate", str(tiny_run / "model"), "--prompt", "increment 1 2", "--chat-template", flag,
                     "--max-new-tokens", "5"]) == 0
        ids = tok.apply_chat_template([{"role": "user", "content": "increment 1 2"}], add_generation_prompt=True,
                                      chat_template=template)
        want = []  # greedy by hand over full forward passes: the independent oracle
        for _ in range(5):
            want.append(int(np.argmax(np.asarray(jaxft.forward(cfg, params, jnp.asarray([ids + want])))[0, -1])))
            if want[-1] == tok.eos_token_id:
                break
        assert capsys.readouterr().out == f"increment 1 2\t{tok.decode(want, skip_special_tokens=True)}\n", flag
