"""``jaxft eval`` on preference data (``jaxft.recipes.preference_scores``), through ``jaxft.cli.main``, against
transformers / PEFT forwards computed here: a reward model's metrics and ``--scores`` (a saved HF
``LlamaForSequenceClassification`` folder, and a PEFT SEQ_CLS adapter with its ``score``) equal
``AutoModelForSequenceClassification``'s logits on each record's prompt + completion + EOS; a DPO policy's metrics
and scores equal β · (log-prob with the adapter − log-prob with it disabled) summed over the completion's tokens."""
from __future__ import annotations

import json

import numpy as np
import peft
import pytest
import torch
import transformers

from hf_oracle import build, build_head, save
from jaxft.cli import main
from jaxft.data.chat import CHATML_TEMPLATE
from test_pairwise import CHOSEN, PROMPTS, REJECTED, tokenizer_folder  # noqa: F401  (a fixture)

BETA = 0.3
LONG_PROMPT = "the quick brown fox jumps over a lazy dog hello world "  # 11 tokens: fills --max-length 10
SINGLES = [{"prompt": "hello ", "completion": "the quick fox"}, {"text": "yes no yes"},
           {"messages": [{"role": "user", "content": "question"}, {"role": "assistant", "content": "yes"}]},
           {"prompt": "a ", "completion": "lazy dog"}]


def _write_jsonl(path, records, blank_after=1):
    """JSONL with a blank line after record ``blank_after``: the records' line numbers are not their indices."""
    lines = [json.dumps(r) for r in records]
    path.write_text("\n".join(lines[:blank_after + 1] + [""] + lines[blank_after + 1:]) + "\n")
    return path


def _lines(records, blank_after=1) -> list[int]:
    return [i + 1 + (i > blank_after) for i in range(len(records))]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_folder):  # noqa: F811
    root = tmp_path_factory.mktemp("eval_preference")
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_folder)
    reward = build_head("llama", "seq_cls", num_labels=1, scale=0.3)
    save(reward, root / "reward")
    tok.save_pretrained(root / "reward")
    causal = build("llama", seed=1)
    save(causal, root / "base")
    tok.save_pretrained(root / "base")
    pairs = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in zip(PROMPTS, CHOSEN, REJECTED)]
    pairs.insert(3, {"prompt": LONG_PROMPT, "chosen": "yes", "rejected": "no"})  # dropped: its prompt fills a row
    return dict(root=root, tok=tok, reward=reward, pairs=pairs,
                pairs_file=_write_jsonl(root / "pairs.jsonl", pairs),
                singles_file=_write_jsonl(root / "singles.jsonl", SINGLES))


def _chat_ids(tok, messages: list[dict], **kwargs) -> list[int]:
    ids = tok.apply_chat_template(messages, chat_template=CHATML_TEMPLATE, tokenize=True, **kwargs)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _text_ids(tok, record: dict) -> tuple[list[int], int]:
    """(prompt + completion ids, the prompt's token count) as the preference data tokenizes a record: strings with
    EOS after the completion; a chat rendered whole, its prompt the turns before the last with the generation
    prompt."""
    if "messages" in record:
        return _chat_ids(tok, record["messages"]), len(_chat_ids(tok, record["messages"][:-1],
                                                                 add_generation_prompt=True))
    prompt = record.get("prompt", "")
    completion = record.get("completion", record.get("text"))
    return tok(prompt + completion + tok.eos_token)["input_ids"], len(tok(prompt)["input_ids"])


def _reward(model, ids: list[int]) -> float:
    with torch.no_grad():
        return float(model(input_ids=torch.tensor([ids])).logits[0, 0])


def _completion_logp(model, ids: list[int], prompt_length: int) -> float:
    """Sum of log p(token) over the completion's tokens (every token after the prompt; a text record's first token
    has nothing before it to be predicted from)."""
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    return float(sum(logp[t - 1, ids[t]] for t in range(max(prompt_length, 1), len(ids))))


def _eval(capsys, *argv) -> dict:
    assert main(["eval", *map(str, argv), "--max-length", "10", "--batch-size", "2"]) == 0
    return json.loads(capsys.readouterr().out)


def _read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _check_reward_run(setup, capsys, model, reward_model, *extra):
    tok, root = setup["tok"], setup["root"]
    out = root / f"scores-{len(list(root.glob('scores-*')))}.jsonl"
    result = _eval(capsys, model, *extra, "--data", setup["pairs_file"], "--scores", out)
    kept = [r for r in setup["pairs"] if r["prompt"] != LONG_PROMPT]
    chosen = np.array([_reward(reward_model, _text_ids(tok, {"prompt": r["prompt"], "completion": r["chosen"]})[0])
                       for r in kept])
    rejected = np.array([_reward(reward_model, _text_ids(tok, {"prompt": r["prompt"],
                                                               "completion": r["rejected"]})[0]) for r in kept])
    lines = [n for n, r in zip(_lines(setup["pairs"]), setup["pairs"]) if r["prompt"] != LONG_PROMPT]
    written = _read(out)
    assert [w["line"] for w in written] == lines
    np.testing.assert_allclose([w["chosen"] for w in written], chosen, atol=1e-5, rtol=0)
    np.testing.assert_allclose([w["rejected"] for w in written], rejected, atol=1e-5, rtol=0)
    assert result["task"] == "reward" and result["pairs"] == result["records"] == len(kept)
    assert result["dropped_records"] == 1 and "prompt fills max_length" in result["data_report"]
    np.testing.assert_allclose([result["accuracy"], result["margin"]],
                               [np.mean(chosen > rejected), np.mean(chosen - rejected)], atol=1e-5, rtol=0)

    singles = root / f"singles-{out.stem}.jsonl"
    result = _eval(capsys, model, *extra, "--task", "reward", "--template", "chatml", "--data", setup["singles_file"],
                   "--scores", singles)
    want = [_reward(reward_model, _text_ids(tok, r)[0]) for r in SINGLES]
    written = _read(singles)
    assert [w["line"] for w in written] == _lines(SINGLES)
    np.testing.assert_allclose([w["score"] for w in written], want, atol=1e-5, rtol=0)
    assert result["records"] == len(SINGLES) and result["mean_score"] == pytest.approx(np.mean(want), abs=1e-5)


def test_reward_model_folder_scores_pairs_and_single_completions_as_transformers(setup, capsys):
    _check_reward_run(setup, capsys, setup["root"] / "reward", setup["reward"])


def test_peft_adapter_with_a_score_head_scores_as_peft(setup, capsys):
    root = setup["root"]
    model = transformers.AutoModelForSequenceClassification.from_pretrained(root / "base", num_labels=1,
                                                                            attn_implementation="eager")
    adapter = peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                         target_modules="all-linear"))
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(0.2 * torch.randn_like(p))
    adapter.eval().save_pretrained(root / "reward_adapter")
    assert "score" in json.loads((root / "reward_adapter" / "adapter_config.json").read_text())["modules_to_save"]
    _check_reward_run(setup, capsys, root / "base", adapter, "--adapter", root / "reward_adapter")


@pytest.fixture(scope="module")
def dpo_adapter(setup):
    root = setup["root"]
    policy = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(
        root / "base", attn_implementation="eager"), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    torch.manual_seed(6)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn_like(p))
    policy.eval().save_pretrained(root / "dpo_adapter")
    return policy, root / "dpo_adapter"


def _implicit_reward(policy, tok, record: dict) -> tuple[float, float]:
    """(β · (log-prob with the adapter − without), log-prob with it) of the record's completion."""
    ids, prompt_length = _text_ids(tok, record)
    on = _completion_logp(policy, ids, prompt_length)
    with policy.disable_adapter():
        off = _completion_logp(policy, ids, prompt_length)
    return BETA * (on - off), on


def test_dpo_metrics_and_scores_are_the_implicit_rewards_of_adapter_on_vs_off(setup, dpo_adapter, capsys):
    policy, adapter = dpo_adapter
    tok, root = setup["tok"], setup["root"]
    kept = [r for r in setup["pairs"] if r["prompt"] != LONG_PROMPT]
    chosen = np.array([_implicit_reward(policy, tok, {"prompt": r["prompt"], "completion": r["chosen"]}) for r in kept])
    rejected = np.array([_implicit_reward(policy, tok, {"prompt": r["prompt"], "completion": r["rejected"]})
                         for r in kept])
    result = _eval(capsys, root / "base", "--adapter", adapter, "--task", "dpo", "--beta", BETA, "--loss-type",
                   "sigmoid", "--data", setup["pairs_file"], "--scores", root / "dpo.jsonl")
    margins = chosen[:, 0] - rejected[:, 0]
    want = {"rewards/chosen": chosen[:, 0].mean(), "rewards/rejected": rejected[:, 0].mean(),
            "rewards/margins": margins.mean(), "rewards/accuracies": np.mean(margins > 0),
            "logps/chosen": chosen[:, 1].mean(), "logps/rejected": rejected[:, 1].mean(),
            "loss": np.mean(np.logaddexp(0.0, -margins))}
    np.testing.assert_allclose([result[k] for k in want], list(want.values()), atol=1e-5, rtol=0)
    assert result["pairs"] == len(kept) and result["dropped_records"] == 1
    written = _read(root / "dpo.jsonl")
    np.testing.assert_allclose([[w["chosen"], w["rejected"]] for w in written],
                               np.stack([chosen[:, 0], rejected[:, 0]], 1), atol=1e-5, rtol=0)

    result = _eval(capsys, root / "base", "--adapter", adapter, "--task", "dpo", "--beta", BETA, "--template",
                   "chatml", "--data", setup["singles_file"], "--scores", root / "dpo_singles.jsonl")
    assert result["task"] == "dpo" and result["records"] == len(SINGLES)
    want = [_implicit_reward(policy, tok, r)[0] for r in SINGLES]
    np.testing.assert_allclose([w["score"] for w in _read(root / "dpo_singles.jsonl")], want, atol=1e-5, rtol=0)


def _error(capsys, *argv) -> str:
    assert main(["eval", *map(str, argv)]) == 2
    return capsys.readouterr().err


def test_dpo_without_an_adapter_is_refused(setup, capsys):
    err = _error(capsys, setup["root"] / "base", "--task", "dpo", "--data", setup["pairs_file"])
    assert "--task dpo compares the policy with its reference" in err and "--adapter" in err


def test_an_existing_scores_file_is_kept_without_overwrite(setup, capsys):
    taken = setup["root"] / "taken.jsonl"
    taken.write_text("mine\n")
    err = _error(capsys, setup["root"] / "reward", "--data", setup["pairs_file"], "--scores", taken)
    assert "already exists; pass --overwrite" in err and taken.read_text() == "mine\n"
    _eval(capsys, setup["root"] / "reward", "--data", setup["pairs_file"], "--scores", taken, "--overwrite")
    assert len(_read(taken)) == len(PROMPTS)


def test_pairs_need_a_one_label_head_for_the_reward_task(setup, capsys):
    err = _error(capsys, setup["root"] / "base", "--task", "reward", "--data", setup["pairs_file"])
    assert "one-label sequence-classification head" in err and "no task head" in err
    err = _error(capsys, setup["root"] / "base", "--data", setup["pairs_file"])
    assert "holds preference pairs; choose the objective" in err


def test_a_setting_the_task_does_not_have_is_refused(setup, capsys):
    err = _error(capsys, setup["root"] / "reward", "--beta", "0.5", "--data", setup["pairs_file"])
    assert "--beta is not a setting of --task reward" in err
