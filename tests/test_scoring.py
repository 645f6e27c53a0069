"""Exact match of greedy chat replies, checked against the demo's own scorer on a model with known replies; the
held-out chat prompts it and the sample replies share."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.errors import JaxftError
import jaxft
from jaxft.data import DataConfig, resolve_template
from jaxft.models.llama import hidden_states
from jaxft.recipes import demo
from jaxft.recipes.scoring import chat_exact_match, chat_prompts


@pytest.fixture(scope="module")
def bigram_model(tmp_path_factory):
    """The demo's tokenizer and a model whose layers add nothing (o_proj and down_proj are zero), so its next token
    depends on the current token only; its head makes it answer every chat prompt (which ends in a newline) with
    "5" and then the end-of-turn token."""
    folder = tmp_path_factory.mktemp("bigram")
    demo.build_tokenizer(folder, [demo.raw_text((d, d, d, d)) for d in range(10)])
    tokenizer = jaxft.load_tokenizer(folder)
    cfg = jaxft.ModelConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, eos_token_ids=(2,))
    params = jaxft.init_params(cfg, jax.random.PRNGKey(0))
    for name in ("o_proj", "down_proj"):
        params["layers"][name]["kernel"] = jnp.zeros_like(params["layers"][name]["kernel"])
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    newline, five = tokenizer.encode("\n5", add_special_tokens=False)
    head = np.zeros((cfg.hidden_size, cfg.vocab_size), np.float32)
    for token, next_token in ((newline, five), (five, end)):
        h = np.asarray(hidden_states(cfg, params, jnp.asarray([[token]]))[0])[0, 0]
        head[:, next_token] += 10 * h / np.linalg.norm(h)
    params["lm_head"]["kernel"] = jnp.asarray(head)
    return cfg, params, tokenizer


def test_exact_match_equals_the_demo_scorer(bigram_model, tmp_path):
    cfg, params, tokenizer = bigram_model
    problems = [(4,), (3,), (4, 1), (4,), (2, 2)]  # (4,) -> "5" is right; the others want other answers
    demo.write_jsonl(tmp_path / "eval.jsonl", [demo.chat(p) for p in problems])
    want, _ = demo.exact_match(cfg, params, tokenizer, problems)
    got = chat_exact_match(cfg, params, tokenizer, DataConfig(paths=(str(tmp_path / "eval.jsonl"),)), limit=100)
    assert got == {"exact_match": want, "exact_match_chats": 5} and want == 2 / 5


def test_exact_match_scores_only_the_first_chats(bigram_model, tmp_path):
    cfg, params, tokenizer = bigram_model
    demo.write_jsonl(tmp_path / "eval.jsonl", [demo.chat(p) for p in [(4,), (3,), (4,)]])
    got = chat_exact_match(cfg, params, tokenizer, DataConfig(paths=(str(tmp_path / "eval.jsonl"),)), limit=2)
    assert got == {"exact_match": 0.5, "exact_match_chats": 2}


def test_exact_match_needs_chats(bigram_model, tmp_path):
    cfg, params, tokenizer = bigram_model
    (tmp_path / "text.jsonl").write_text('{"text": "increment 1 =\\n2 ."}\n')
    with pytest.raises(JaxftError, match="no chat holds an assistant turn"):
        chat_exact_match(cfg, params, tokenizer, DataConfig(paths=(str(tmp_path / "text.jsonl"),)), limit=10)


def test_exact_match_needs_a_positive_number_of_chats(bigram_model, tmp_path):
    cfg, params, tokenizer = bigram_model
    with pytest.raises(ValueError, match="must be >= 1, got -3"):
        chat_exact_match(cfg, params, tokenizer, DataConfig(paths=(str(tmp_path / "eval.jsonl"),)), limit=-3)


def test_chat_prompts_cut_each_chat_before_its_last_assistant_turn(bigram_model, tmp_path):
    _, _, tokenizer = bigram_model
    first = [{"role": "user", "content": "increment 1"}, {"role": "assistant", "content": " 2 "}]
    trailing_user = [*first, {"role": "user", "content": "increment 2"}]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n"
                                                  for m in (trailing_user, first + first)))
    template = resolve_template(tokenizer, None)
    prompts = chat_prompts(DataConfig(paths=(str(tmp_path / "chats.jsonl"),)), tokenizer, template, limit=5)
    render = dict(add_generation_prompt=True, chat_template=template)
    want = [(first[:1], "2"), (first + first[:1], "2")]
    assert [(p.text, p.ids, p.reference) for p in prompts] == [
        (tokenizer.apply_chat_template(m, tokenize=False, **render), tokenizer.apply_chat_template(m, **render), ref)
        for m, ref in want]


def test_chat_prompts_read_no_further_than_the_chats_they_take(bigram_model, tmp_path):
    """The first chats are taken as the file is read: a bad record after them is never reached, one before the
    limit is an error naming its line."""
    _, _, tokenizer = bigram_model
    chats = [[{"role": "user", "content": f"increment {d}"}, {"role": "assistant", "content": str(d + 1)}]
             for d in range(2)]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats) + '{"messages": [\n')
    data, template = DataConfig(paths=(str(path),)), resolve_template(tokenizer, None)
    assert [p.reference for p in chat_prompts(data, tokenizer, template, limit=2)] == ["1", "2"]
    with pytest.raises(JaxftError, match="chats.jsonl:3"):
        chat_prompts(data, tokenizer, template, limit=3)
