"""Chat tokenization and assistant-only loss masks against transformers' `apply_chat_template` as the oracle.

Tokenizers are built here: a small ByteLevel BPE trained with `tokenizers`, saved by transformers twice (Llama 3
and Mistral special tokens) and loaded by both transformers and `jaxft.hf.load_tokenizer`. The templates are
TRL's shipped training templates and a hand-marked Mistral [INST] template.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from jaxft.data import DataError, DataReport, Example, save_chat_template, tokenize_examples
from jaxft.data.chat import ALPACA_TEMPLATE, BUILTIN_TEMPLATES, IGNORE_INDEX as IGNORE, resolve_template
from jaxft.hf.tokenizer import load_tokenizer

import transformers  # noqa: E402
import trl  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

TRL_TEMPLATES = Path(trl.__file__).parent / "chat_templates"
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<|im_start|>", "<|im_end|>", "[INST]", "[/INST]", "<s>", "</s>"]
WORDS = "the quick brown fox jumps over a lazy dog hello world llama café naïve 東京 🦙 42 answer question".split()

# Mistral-7B-Instruct-style template, and the same template with {% generation %} around assistant output.
MISTRAL_ORIGINAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
MISTRAL_MARKED = MISTRAL_ORIGINAL.replace(
    "{{ message['content'] + eos_token }}", "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}")

GENERAL_CHATS = [
    [{"role": "system", "content": "You are a helpful llama."},
     {"role": "user", "content": "hello world, café?"},
     {"role": "assistant", "content": "the quick brown fox 🦙"},
     {"role": "user", "content": "  über 東京 twice\n"},
     {"role": "assistant", "content": " a lazy dog 42 "},
     {"role": "user", "content": "and then?"},
     {"role": "assistant", "content": "jumps over\nthe answer"}],
    [{"role": "user", "content": "question"}, {"role": "assistant", "content": "answer"}],
    [{"role": "user", "content": "naïve?"}, {"role": "assistant", "content": "東京 🦙🦙"},
     {"role": "user", "content": "hello"}, {"role": "assistant", "content": "world world world"}],
]
ALTERNATING_CHATS = [chat[1:] for chat in GENERAL_CHATS[:1]] + GENERAL_CHATS[1:]
STRATEGIES = ("all_assistant", "last_assistant", "per_assistant_turn")


def _trl(name: str) -> str:
    return (TRL_TEMPLATES / name).read_text()


def _corpus() -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(2000)]


def build_tokenizer_folders(root: Path) -> dict[str, Path]:
    """One trained ByteLevel BPE, saved with Llama 3 ("llama3") and Mistral ("mistral") special tokens."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(_corpus(), trainer=trainer)
    names = {"llama3": dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|end_of_text|>"),
             "mistral": dict(bos_token="<s>", eos_token="</s>")}
    folders = {}
    for name, tokens in names.items():
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **tokens)
        fast.save_pretrained(root / name)
        folders[name] = root / name
    return folders


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    return build_tokenizer_folders(tmp_path_factory.mktemp("data_tokenizers"))


@pytest.fixture(scope="module")
def toks(folders):
    """(jaxft, transformers) tokenizers per folder."""
    return {name: (load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(path))
            for name, path in folders.items()}


def _last_run(mask: list[int]) -> np.ndarray:
    """Keep only the last contiguous run of ones (the last assistant turn)."""
    mask = np.asarray(mask, bool)
    out = np.zeros_like(mask)
    ones = np.flatnonzero(mask)
    if len(ones):
        end = ones[-1]
        start = end
        while start > 0 and mask[start - 1]:
            start -= 1
        out[start:end + 1] = True
    return out


def _oracle(hf_tok, template: str, messages: list[dict], strategy: str) -> list[tuple[list[int], list[int]]]:
    """(ids, shifted labels) per sample, from transformers' ids and assistant masks."""
    if strategy == "per_assistant_turn":
        convs = [messages[:k + 1] for k, m in enumerate(messages) if m["role"] == "assistant"]
    else:
        convs = [messages]
    samples = []
    for conv in convs:
        out = hf_tok.apply_chat_template(conv, chat_template=template, tokenize=True, return_dict=True,
                                         return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), np.asarray(out["assistant_masks"], bool)
        if strategy != "all_assistant":
            mask = _last_run(mask)
        labels = [ids[t + 1] if mask[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]
        samples.append((ids, labels))
    return samples


def _ours(tok, template, chats, strategy, **kwargs):
    examples = [Example(f"chat{i}", messages=chat) for i, chat in enumerate(chats)]
    samples = tokenize_examples(examples, tok, template, loss=strategy, max_length=4096, **kwargs)
    return [(s.input_ids.tolist(), s.labels.tolist()) for s in samples]


CASES = {
    "llama3_training": ("llama3", lambda: _trl("llama3_training.jinja"), GENERAL_CHATS),
    "qwen2_5_training": ("llama3", lambda: _trl("qwen2_5_training.jinja"), GENERAL_CHATS),
    "mistral_marked": ("mistral", lambda: MISTRAL_MARKED, ALTERNATING_CHATS),
}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_ids_and_labels_match_transformers_assistant_masks(toks, case, strategy):
    folder, template, chats = CASES[case]
    ours, theirs = toks[folder]
    expected = [sample for chat in chats for sample in _oracle(theirs, template(), chat, strategy)]
    assert _ours(ours, template(), chats, strategy) == expected


def test_hand_marked_mistral_renders_the_original_text(toks):
    ours, _ = toks["mistral"]
    for chat in ALTERNATING_CHATS:
        assert ours.apply_chat_template(chat, tokenize=False, chat_template=MISTRAL_MARKED) == \
            ours.apply_chat_template(chat, tokenize=False, chat_template=MISTRAL_ORIGINAL)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_unmarked_template_masks_from_prefixes_equal_the_marked_template(toks, strategy):
    ours, _ = toks["mistral"]
    assert _ours(ours, MISTRAL_ORIGINAL, ALTERNATING_CHATS, strategy) == \
        _ours(ours, MISTRAL_MARKED, ALTERNATING_CHATS, strategy)


def test_loss_covers_the_end_of_turn_token(toks):
    ours, _ = toks["llama3"]
    (ids, labels), = _ours(ours, _trl("llama3_training.jinja"), GENERAL_CHATS[1:2], "all_assistant")
    eot = ours.convert_tokens_to_ids("<|eot_id|>")
    assert labels[-2] == eot == ids[-1]


def test_no_double_bos(toks):
    ours, _ = toks["llama3"]
    (ids, _), = _ours(ours, _trl("llama3_training.jinja"), GENERAL_CHATS[1:2], "all_assistant")
    assert ids[0] == ours.bos_token_id and ids[1] != ours.bos_token_id


def test_user_and_system_tokens_carry_no_loss(toks):
    ours, _ = toks["llama3"]
    (ids, labels), = _ours(ours, _trl("llama3_training.jinja"), GENERAL_CHATS[:1], "all_assistant")
    text_of_targets = ours.decode([label for label in labels if label != IGNORE])
    assert "helpful llama" not in text_of_targets and "café?" not in text_of_targets
    assert "the quick brown fox" in text_of_targets and "jumps over" in text_of_targets


def test_train_on_inputs_puts_loss_on_every_next_token(toks):
    ours, _ = toks["llama3"]
    (ids, labels), = _ours(ours, _trl("llama3_training.jinja"), GENERAL_CHATS[:1], "all_assistant",
                           train_on_inputs=True)
    assert labels == ids[1:] + [IGNORE]


def test_template_that_rewrites_history_is_rejected_with_a_hint(toks):
    ours, _ = toks["llama3"]
    chat = [{"role": "user", "content": "hello"},
            {"role": "assistant", "content": "world", "reasoning_content": "think about it"},
            {"role": "user", "content": "again"}, {"role": "assistant", "content": "done"}]
    with pytest.raises(DataError, match=r"chat0: template rewrites history.*\{% generation %\}"):
        _ours(ours, _trl("qwen3.jinja"), [chat], "all_assistant")


def test_fully_masked_example_is_an_error_naming_its_source(toks):
    ours, _ = toks["llama3"]
    with pytest.raises(DataError, match="chat0: no loss tokens"):
        tokenize_examples([Example("chat0", messages=GENERAL_CHATS[0])], ours, _trl("llama3_training.jinja"),
                          max_length=12, truncation="right")


def test_fully_masked_examples_are_counted_when_skipping(toks):
    ours, _ = toks["llama3"]
    report = DataReport()
    examples = [Example(f"chat{i}", messages=GENERAL_CHATS[0]) for i in range(3)]
    samples = tokenize_examples(examples, ours, _trl("llama3_training.jinja"), max_length=12,
                                skip_bad_records=True, report=report)
    assert samples == [] and report.dropped["no loss tokens"] == 3


def test_left_truncation_keeps_the_last_tokens(toks):
    ours, _ = toks["llama3"]
    (full_ids, full_labels), = _ours(ours, _trl("llama3_training.jinja"), GENERAL_CHATS[:1], "all_assistant")
    sample, = tokenize_examples([Example("c", messages=GENERAL_CHATS[0])], ours, _trl("llama3_training.jinja"),
                                max_length=20, truncation="left")
    assert sample.input_ids.tolist() == full_ids[-20:] and sample.labels.tolist() == full_labels[-20:]


@pytest.mark.parametrize("name,trl_name", [("llama3", "llama3_training.jinja"), ("chatml", "qwen2_5_training.jinja")])
def test_builtin_templates_match_trl_training_templates(toks, name, trl_name):
    ours, _ = toks["llama3"]
    chats = GENERAL_CHATS[:1]  # starts with a system message, so Qwen's default system prompt is not used
    assert _ours(ours, BUILTIN_TEMPLATES[name], chats, "all_assistant") == _ours(ours, _trl(trl_name), chats,
                                                                               "all_assistant")


def test_builtin_mistral_matches_the_marked_original_without_system(toks):
    ours, _ = toks["mistral"]
    for chat in ALTERNATING_CHATS:
        spaced = [{**m, "content": " " + m["content"]} if m["role"] == "assistant" else m for m in chat]
        assert _ours(ours, BUILTIN_TEMPLATES["mistral"], [chat], "all_assistant") == \
            _ours(ours, MISTRAL_MARKED, [spaced], "all_assistant")


def test_builtin_alpaca_renders_the_alpaca_prompt(toks):
    ours, _ = toks["mistral"]
    chat = [{"role": "user", "content": "Add 2 and 2."}, {"role": "assistant", "content": "4"}]
    text = ours.apply_chat_template(chat, tokenize=False, chat_template=ALPACA_TEMPLATE)
    assert text == ("<s>Below is an instruction that describes a task. Write a response that appropriately "
                    "completes the request.\n\n### Instruction:\nAdd 2 and 2.\n\n### Response:\n4</s>")


def test_tokenizer_without_template_asks_for_one(toks):
    from jaxft.data.chat import TemplateError

    ours, _ = toks["mistral"]
    with pytest.raises(TemplateError, match="no chat template.*data.template") as info:
        resolve_template(ours, None)
    assert "--template: one of" in str(info.value.naming("--template"))  # jaxft eval names its flag
    with pytest.raises(TemplateError, match="data.template 'nope' is not a built-in") as info:
        resolve_template(ours, "nope")
    assert str(info.value.naming("--chat-template")).startswith("--chat-template 'nope' is not a built-in")


def test_saved_template_is_what_transformers_loads(toks, tmp_path):
    ours, _ = toks["mistral"]
    ours.save(tmp_path)
    save_chat_template(MISTRAL_MARKED, tmp_path)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path).chat_template == MISTRAL_MARKED
    assert load_tokenizer(tmp_path).chat_template == MISTRAL_MARKED


def test_plain_text_gets_the_tokenizers_special_tokens_then_eos_and_loss_on_every_next_token(toks):
    ours, _ = toks["llama3"]
    sample, = tokenize_examples([Example("t", text="hello world")], ours)
    ids = sample.input_ids.tolist()
    assert ids == ours.encode("hello world", add_special_tokens=True) + [ours.eos_token_id]
    assert sample.labels.tolist() == ids[1:] + [IGNORE]


def test_prompt_completion_puts_loss_on_the_completion_and_eos_only(toks):
    ours, _ = toks["llama3"]
    sample, = tokenize_examples([Example("p", prompt="question", completion=" answer")], ours)
    prompt = ours.encode("question")
    targets = [label for label in sample.labels.tolist() if label != IGNORE]
    assert targets == ours.encode(" answer", add_special_tokens=False) + [ours.eos_token_id]
    assert sample.input_ids.tolist()[:len(prompt)] == prompt


def test_over_length_samples_are_dropped_and_counted_with_truncation_drop(toks):
    ours, _ = toks["llama3"]
    report = DataReport()
    samples = tokenize_examples([Example("long", text="hello world " * 20), Example("short", text="hi")], ours,
                                max_length=10, truncation="drop", report=report)
    assert [s.source for s in samples] == ["short"] and report.dropped["over-length sample (dropped)"] == 1


def _llama3_ignoring_generation_prompt() -> str:
    """TRL's unmarked Llama 3 template with its add_generation_prompt clause cut off: it still writes
    `<|start_header_id|>assistant<|end_header_id|>` before every assistant turn, but never as a generation prompt."""
    original = _trl("llama3.jinja")
    cut = original[:original.index("{% if add_generation_prompt %}")]
    assert "add_generation_prompt" not in cut and "{% generation %}" not in cut
    return cut


def test_unmarked_template_that_honours_the_generation_prompt_gives_transformers_masks(toks):
    """The control for the refusal below: TRL's unmarked llama3.jinja (masks from prefixes) against transformers'
    assistant masks of the marked llama3_training.jinja."""
    ours, theirs = toks["llama3"]
    expected = [s for chat in GENERAL_CHATS for s in _oracle(theirs, _trl("llama3_training.jinja"), chat,
                                                              "all_assistant")]
    assert _ours(ours, _trl("llama3.jinja"), GENERAL_CHATS, "all_assistant") == expected


def test_prefix_spans_of_a_template_ignoring_the_generation_prompt_would_train_on_the_role_header(toks):
    """Why the template is refused: its prefix spans hold exactly the role header more than the correct masks."""
    from jaxft.data.chat import _Renderer, spans_to_mask

    ours, theirs = toks["llama3"]
    chat = GENERAL_CHATS[1]
    text, spans = _Renderer(ours, _llama3_ignoring_generation_prompt()).turn_spans(chat, None, "chat0")
    ids, offsets = ours.encode_with_offsets(text)
    wrong = spans_to_mask(offsets, spans)
    oracle = theirs.apply_chat_template(chat, chat_template=_trl("llama3_training.jinja"), tokenize=True,
                                        return_dict=True, return_assistant_tokens_mask=True)
    right = np.asarray(oracle["assistant_masks"], bool)
    assert ids == list(oracle["input_ids"])
    extra = [ids[t] for t in np.flatnonzero(wrong & ~right)]
    assert not (right & ~wrong).any()
    assert ours.decode(extra) == "<|start_header_id|>assistant<|end_header_id|>\n\n"


@pytest.mark.parametrize("skip_bad_records", [False, True])
def test_template_ignoring_the_generation_prompt_is_refused_naming_the_header_and_the_fix(toks, skip_bad_records):
    ours, _ = toks["llama3"]
    examples = [Example(f"data.jsonl:{i + 1}", messages=chat) for i, chat in enumerate(GENERAL_CHATS)]
    with pytest.raises(DataError, match=r"data.jsonl:1: template ignores add_generation_prompt: .* starts with "
                                        r"'<\|start_header_id\|>assistant<\|end_header_id\|>\\n\\n'.*"
                                        r"\{% if add_generation_prompt %\}.*data.template"):
        tokenize_examples(examples, ours, _llama3_ignoring_generation_prompt(), skip_bad_records=skip_bad_records)


def test_template_ignoring_the_generation_prompt_is_fine_when_training_on_inputs(toks):
    ours, _ = toks["llama3"]
    (ids, labels), = _ours(ours, _llama3_ignoring_generation_prompt(), GENERAL_CHATS[1:2], "all_assistant",
                           train_on_inputs=True)
    assert labels == ids[1:] + [IGNORE]
