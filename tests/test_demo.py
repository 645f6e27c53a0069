"""The offline demo end to end (shortened), and its adapter reproduced by transformers + PEFT + bitsandbytes."""
import json

import numpy as np
import peft
import pytest
import torch
import transformers

from jaxft.recipes import demo


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    import os
    os.environ["JAXFT_CACHE"] = str(root / "cache")
    try:
        return root, demo.run(root / "out", demo.DemoConfig.quick(), log=lambda *a: None)
    finally:
        del os.environ["JAXFT_CACHE"]


@pytest.mark.slow
def test_quick_demo_learns_the_chat_task_and_writes_its_outputs(quick_demo):
    root, result = quick_demo
    assert result["before_exact_match"] < 0.1
    assert result["after_exact_match"] > result["before_exact_match"] + 0.3
    assert result["eval_loss"] < result["eval_loss_before"]
    out = root / "out"
    assert json.loads((out / "demo.json").read_text())["after_exact_match"] == result["after_exact_match"]
    assert (out / "run" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "run" / "adapter" / "adapter_model.safetensors").exists()
    assert len((out / "samples.txt").read_text().splitlines()) == result["n_eval"]


@pytest.mark.slow
def test_demo_adapter_in_transformers_peft_bnb_reproduces_the_exact_match(quick_demo):
    root, result = quick_demo
    base = next((root / "cache").glob("demo-base-*"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        base, dtype=torch.float32, quantization_config=transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32))
    model = peft.PeftModel.from_pretrained(model, result["adapter"])
    model.train()  # bitsandbytes' float32 path (its CPU eval kernel computes in bfloat16); no dropout here
    cfg = demo.DemoConfig.quick()
    rng = np.random.default_rng(cfg.seed + 1)
    test = demo.problems(rng, cfg.n_eval, cfg)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    hits = 0
    for p in test:
        ids = tokenizer.apply_chat_template(demo.chat(p)[:1], add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=10, do_sample=False, eos_token_id=end,
                                 pad_token_id=0)[0, ids.shape[1]:].tolist()
        text = tokenizer.decode([t for t in out if t != end]).strip()
        hits += text == demo.words(demo.answer(p)) and out[-1] == end
    assert hits / len(test) == result["after_exact_match"]
