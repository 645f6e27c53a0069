"""jaxft.hf.tokenizer / chat_template against transformers (and TRL's templates) as oracles.

Every tokenizer is built here (no hub): a ByteLevel BPE like Llama 3 trained with `tokenizers`, and a
Llama-2-style sentencepiece BPE trained with `sentencepiece`. transformers loads the same folders and
must agree with us on ids, offsets, decoding, rendered chats and assistant masks.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest

from jaxft.hf import chat_template
from jaxft.hf.tokenizer import TokenizerError, load_tokenizer

import sentencepiece  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

TRL_TEMPLATES = Path(trl.__file__).parent / "chat_templates"
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>"]
WORDS = "the quick brown fox jumps over a lazy dog hello world llama token café naïve über 東京 🦙 42 2024".split()

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
RAISING_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' and not loop.first %}"
    "{{ raise_exception('System message must come first') }}{% endif %}"
    "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
)
CHAT = [
    {"role": "system", "content": "You are a helpful llama."},
    {"role": "user", "content": "hello world, café?"},
    {"role": "assistant", "content": "the quick brown fox 🦙"},
    {"role": "user", "content": "  über 東京 <|eot_id|> twice\n"},
    {"role": "assistant", "content": "a lazy dog 42", "tool_calls": None},
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city <b>now</b>",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
TEXTS = [
    "hello world",
    " hello  world",
    "  leading and trailing  ",
    "café über naïve 東京 🦙",
    "line\nbreaks\n\n\ttabs",
    "<|begin_of_text|>special<|eot_id|> tokens in text",
    "<s>hello</s> world <unk>",
    "<|im_start|>user\nhi<|im_end|>",
    "",
]


def _corpus(n: int = 3000) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15))) for _ in range(n)] + TEXTS


def _write_bpe(folder: Path) -> None:
    """A Llama-3-like ByteLevel BPE, saved by transformers itself."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=LLAMA3_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A",
                pair="<|begin_of_text|> $A $B:1",
                special_tokens=[("<|begin_of_text|>", bos)],
            ),
        ]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|end_of_text|>"
    )
    fast.chat_template = LLAMA3_TEMPLATE
    fast.save_pretrained(folder)


def _write_sentencepiece(folder: Path) -> None:
    """A Llama-2-like sentencepiece BPE (unk=0, bos=1, eos=2, byte fallback, no normalization)."""
    folder.mkdir()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=400,
        model_type="bpe",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        user_defined_symbols=QWEN_SPECIALS,
        character_coverage=1.0,
        minloglevel=2,
    )
    (folder / "tokenizer.vocab").unlink()
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    _write_bpe(root / "bpe")
    _write_sentencepiece(root / "spm")
    return {"bpe": root / "bpe", "spm": root / "spm"}


@pytest.fixture(scope="module")
def pairs(folders):
    """(ours, transformers') for each tokenizer kind, loaded once."""
    return {
        kind: (load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(path))
        for kind, path in folders.items()
    }


def _trl_template(name: str) -> str:
    return (TRL_TEMPLATES / f"{name}.jinja").read_text()


# ----- plain encoding ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bpe", "spm"])
def test_encode_decode_match_autotokenizer(pairs, kind):
    ours, ref = pairs[kind]
    assert (len(ours), ours.vocab_size) == (len(ref), len(ref))
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(ours, name) == getattr(ref, name), name
        assert getattr(ours, name + "_id") == getattr(ref, name + "_id"), name
    assert ours.special_token_ids >= set(ref.all_special_ids)
    for add_special in (True, False):
        expected = [ref.encode(text, add_special_tokens=add_special) for text in TEXTS]
        assert [ours.encode(text, add_special_tokens=add_special) for text in TEXTS] == expected
        assert ours.encode_batch(TEXTS, add_special_tokens=add_special) == expected
    for ids in (ref.encode(text) for text in TEXTS):
        assert ours.decode(ids) == ref.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    assert ours.convert_tokens_to_ids(["<|im_start|>", "no-such-token"]) == ref.convert_tokens_to_ids(
        ["<|im_start|>", "no-such-token"]
    )


@pytest.mark.parametrize("kind", ["bpe", "spm"])
def test_offsets_match_autotokenizer(pairs, kind):
    ours, ref = pairs[kind]
    for text in TEXTS:
        expected = ref(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = ours.encode_with_offsets(text)
        assert ids == expected["input_ids"]
        assert offsets == [tuple(span) for span in expected["offset_mapping"]]


def test_sentencepiece_differs_from_raw_sentencepiece_like_transformers(pairs, folders):
    """transformers 5 converts tokenizer.model to a BPE; its prefix-space rule differs from sentencepiece's own."""
    ours, _ = pairs["spm"]
    raw = sentencepiece.SentencePieceProcessor(model_file=str(folders["spm"] / "tokenizer.model"))
    assert ours.encode("hello world") == [1, *raw.encode("hello world")]
    assert ours.encode(" hello") != [1, *raw.encode(" hello")]


# ----- chat templates ---------------------------------------------------------------------------------------------

TEMPLATE_CASES = {
    "llama3_style": (LLAMA3_TEMPLATE, {}),
    "trl_llama3_training": (_trl_template("llama3_training"), {}),
    "trl_qwen2_5_training": (_trl_template("qwen2_5_training"), {}),
    "trl_qwen2_5_training_tools": (_trl_template("qwen2_5_training"), {"tools": TOOLS}),
    "trl_llama3_1_tools": (_trl_template("llama3_1"), {"tools": TOOLS, "date_string": "01 Jan 2025"}),
    "raise_exception": (RAISING_TEMPLATE, {}),
}


@pytest.mark.parametrize("case", sorted(TEMPLATE_CASES))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_matches_transformers(pairs, case, add_generation_prompt):
    ours, ref = pairs["bpe"]
    template, kwargs = TEMPLATE_CASES[case]
    args = dict(chat_template=template, add_generation_prompt=add_generation_prompt, **kwargs)
    text = ours.apply_chat_template(CHAT, tokenize=False, **args)
    assert text == ref.apply_chat_template(CHAT, tokenize=False, **args)
    assert ours.apply_chat_template(CHAT, **args) == ref.apply_chat_template(CHAT, return_dict=False, **args)
    assert ours.apply_chat_template(CHAT, **args) == ours.encode(text, add_special_tokens=False)


def test_default_template_has_single_bos(pairs):
    ours, ref = pairs["bpe"]
    ids = ours.apply_chat_template(CHAT[:2])
    assert ids == ref.apply_chat_template(CHAT[:2], return_dict=False)
    assert ids[:2] != [ours.bos_token_id] * 2


def test_raise_exception_propagates(pairs):
    ours, ref = pairs["bpe"]
    bad_chat = [CHAT[1], CHAT[0]]
    with pytest.raises(jinja2.TemplateError, match="System message must come first"):
        ref.apply_chat_template(bad_chat, chat_template=RAISING_TEMPLATE, tokenize=False)
    with pytest.raises(jinja2.TemplateError, match="System message must come first"):
        ours.apply_chat_template(bad_chat, chat_template=RAISING_TEMPLATE, tokenize=False)


@pytest.mark.parametrize("kind", ["bpe", "spm"])
@pytest.mark.parametrize("template", ["llama3_training", "qwen2_5_training", "qwen3_training"])
def test_assistant_masks_match_transformers(pairs, kind, template):
    ours, ref = pairs[kind]
    source = _trl_template(template)
    expected = ref.apply_chat_template(CHAT, chat_template=source, return_assistant_tokens_mask=True)
    got = ours.apply_chat_template(CHAT, chat_template=source, return_assistant_tokens_mask=True)
    assert got == {"input_ids": expected["input_ids"], "assistant_masks": expected["assistant_masks"]}
    assert any(got["assistant_masks"]) and not all(got["assistant_masks"])


def test_render_reports_generation_spans():
    """The data pipeline calls render() directly: spans must cover exactly the assistant outputs."""
    text, spans = chat_template.render(
        _trl_template("llama3_training"), CHAT, special_tokens={"bos_token": "<|begin_of_text|>"}
    )
    assert text.startswith("<|begin_of_text|><|start_header_id|>system")
    assert [text[start:end] for start, end in spans] == [
        "the quick brown fox 🦙<|eot_id|>",
        "a lazy dog 42<|eot_id|>",
    ]
    assert chat_template.render("{{ x }}|{{ 'a<b>' | tojson }}", [], x=1, special_tokens={}) == ('1|"a<b>"', [])


def test_template_cannot_escape_sandbox():
    with pytest.raises(jinja2.exceptions.SecurityError):
        chat_template.render("{{ messages.__class__.__mro__ }}", CHAT)


# ----- chat template sources --------------------------------------------------------------------------------------


def _folder_with_templates(bpe: Path, folder: Path, config_extra: dict, files: dict[str, str]) -> Path:
    """A copy of the BPE tokenizer folder with the given config entries and template files."""
    folder.mkdir()
    (folder / "tokenizer.json").write_text((bpe / "tokenizer.json").read_text())
    config = json.loads((bpe / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, **config_extra}))
    for rel, text in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    return folder


SOURCES = {
    "jinja_files": (
        {"chat_template": "config loses"},
        {"chat_template.jinja": "A{{ messages[0].content }}", "additional_chat_templates/tool_use.jinja": "T"},
        {"default": "A{{ messages[0].content }}", "tool_use": "T"},
    ),
    "additional_only": ({}, {"additional_chat_templates/rag.jinja": "R"}, {"rag": "R"}),
    "legacy_string": ({"chat_template": "S{{ bos_token }}"}, {}, {"default": "S{{ bos_token }}"}),
    "legacy_named_list": (
        {"chat_template": [{"name": "default", "template": "D"}, {"name": "tool_use", "template": "U"}]},
        {},
        {"default": "D", "tool_use": "U"},
    ),
}


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_chat_template_sources(folders, tmp_path, source):
    config_extra, files, expected = SOURCES[source]
    folder = _folder_with_templates(folders["bpe"], tmp_path / source, config_extra, files)
    ours = load_tokenizer(folder)
    ref = transformers.AutoTokenizer.from_pretrained(folder)
    assert ours.chat_templates == expected
    ref_templates = ref.chat_template if isinstance(ref.chat_template, dict) else {"default": ref.chat_template}
    assert ours.chat_templates == ref_templates
    assert ours.chat_template == expected.get("default")
    # transformers only resolves names when there are several templates (or one non-default one)
    for name in [None] if expected.keys() == {"default"} else expected:
        assert ours.apply_chat_template(CHAT, chat_template=name) == ref.apply_chat_template(
            CHAT, chat_template=name, return_dict=False
        )


def test_tools_select_tool_use_template(folders, tmp_path):
    _, files, _ = SOURCES["jinja_files"]
    ours = load_tokenizer(_folder_with_templates(folders["bpe"], tmp_path / "t", {}, files))
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path / "t")
    for tools in (None, TOOLS):
        expected = ref.apply_chat_template(CHAT, tokenize=False, tools=tools)
        assert ours.apply_chat_template(CHAT, tokenize=False, tools=tools) == expected
    assert ours.apply_chat_template(CHAT, tokenize=False, tools=TOOLS) == "T"


def test_legacy_chat_template_json(folders, tmp_path):
    files = {"chat_template.json": json.dumps({"chat_template": "J"})}
    folder = _folder_with_templates(folders["bpe"], tmp_path / "j", {}, files)
    assert load_tokenizer(folder).chat_template == "J"


# ----- save -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bpe", "spm"])
def test_save_round_trip(pairs, tmp_path, kind):
    ours, ref = pairs[kind]
    original = dict(ours.chat_templates)
    ours.chat_templates.update(default=LLAMA3_TEMPLATE, tool_use=_trl_template("qwen2_5_training"))
    try:
        out = ours.save(tmp_path / "saved")
    finally:
        ours.chat_templates = original
    reloaded_ref = transformers.AutoTokenizer.from_pretrained(out)
    reloaded = load_tokenizer(out)
    for text in TEXTS:
        assert reloaded_ref.encode(text) == ref.encode(text) == reloaded.encode(text)
    assert reloaded_ref.chat_template == {"default": LLAMA3_TEMPLATE, "tool_use": _trl_template("qwen2_5_training")}
    assert reloaded.chat_templates == reloaded_ref.chat_template
    for name in ("default", "tool_use"):
        expected = reloaded_ref.apply_chat_template(CHAT, chat_template=name, return_dict=False)
        assert reloaded.apply_chat_template(CHAT, chat_template=name) == expected


# ----- errors -----------------------------------------------------------------------------------------------------


def test_missing_folder(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")


def test_folder_without_tokenizer_files(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)


def test_malformed_config_names_file_and_position(folders, tmp_path):
    (tmp_path / "tokenizer.json").write_text((folders["bpe"] / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text('{\n  "bos_token": "<s>",\n  "eos_token": \n}')
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: malformed JSON at line 4, column 1"):
        load_tokenizer(tmp_path)


def test_unknown_template_name_lists_available(pairs):
    ours, _ = pairs["bpe"]
    with pytest.raises(TokenizerError, match=r"No chat template named 'chatml'; available: \['default'\]"):
        ours.apply_chat_template(CHAT, chat_template="chatml")


def test_no_template_available(folders):
    ours = load_tokenizer(folders["spm"])
    with pytest.raises(TokenizerError, match="has no chat template"):
        ours.apply_chat_template(CHAT)


def test_runtime_imports_neither_torch_nor_transformers():
    code = "import sys, jaxft.hf.tokenizer; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
