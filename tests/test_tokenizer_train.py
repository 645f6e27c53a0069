"""Tokenizer training (jaxft.data.tokenizer_train, `jaxft tokenizer train`): the saved folder encodes as
transformers' AutoTokenizer, jaxft.load_tokenizer and the trainer's own model (sentencepiece / tokenizers) do."""
import dataclasses
import json
import random

import pytest
import sentencepiece
import tokenizers
import transformers

import jaxft
from jaxft import cli
from jaxft.data.tokenizer_train import (TokenizerTrainConfig, TokenizerTrainError, train_tokenizer,
                                        train_tokenizer_from_sources)

WORDS = ("the model reads tokens and writes text while training runs on many devices with data from files "
         "alpha beta gamma delta epsilon zeta theta lambda sigma omega learning rate schedule warmup decay batch "
         "size shard mesh kernel bias weight gradient loss value function return import class def self").split()
HELD_OUT = [
    "The gradient of the loss, 12345 times 678: 3.14159!",
    "  two leading spaces,\ta tab, and    a run of spaces\n\nthen new lines",
    "unicode: naïve café Ωmega Москва 東京 😀 — done",
    "def train(self, batch):\n    return self.loss(batch) * 2",
]
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is a mesh?"},
        {"role": "assistant", "content": "devices in a grid 2x4"}]


def _corpus(n: int = 1500) -> list[str]:
    rng = random.Random(0)
    docs = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14)))
        code = f"    {rng.choice(WORDS)}_{i % 97} = {rng.randint(0, 999)}  # {rng.choice(WORDS)}"
        docs.append(f"{words.capitalize()}.\n{code}\nÉtude über die Straße {i}")
    return docs


@pytest.fixture(scope="module")
def corpus():
    return _corpus()


@pytest.fixture(scope="module", params=["unigram", "bpe", "byte_bpe"])
def trained(request, corpus, tmp_path_factory):
    cfg = TokenizerTrainConfig(vocab_size=400, model_type=request.param, chat_template="chatml", threads=1)
    out = train_tokenizer(corpus, tmp_path_factory.mktemp(request.param) / "tok", cfg)
    return cfg, out


def test_ids_match_transformers_jaxft_and_the_trainers_model(trained):
    cfg, out = trained
    hf = transformers.AutoTokenizer.from_pretrained(out)
    ours = jaxft.load_tokenizer(out)
    if cfg.sentencepiece:
        own = sentencepiece.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
        encode_own = own.encode
    else:
        own = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
        encode_own = lambda text: own.encode(text, add_special_tokens=False).ids  # noqa: E731
    bos = [hf.bos_token_id] if cfg.sentencepiece else []  # Llama adds BOS, GPT-2 nothing
    for text in HELD_OUT:
        ids = hf(text)["input_ids"]
        assert ids == ours.encode(text) == bos + encode_own(text), text
        assert hf.decode(ids, skip_special_tokens=True) == ours.decode(ids, skip_special_tokens=True) == text
    # Special tokens written in the text are one id each (sentencepiece's own encoder does not read control
    # tokens from text, so this is transformers against jaxft).
    text = "a<|im_start|>user b</s> <s>c<|im_end|>\n" + hf.eos_token
    assert hf(text)["input_ids"] == ours.encode(text)
    assert hf.convert_tokens_to_ids("<|im_start|>") in hf(text)["input_ids"]
    assert hf.eos_token_id in hf(text)["input_ids"]


def test_special_tokens_and_chat_template_as_transformers_reads_them(trained):
    cfg, out = trained
    hf = transformers.AutoTokenizer.from_pretrained(out)
    ours = jaxft.load_tokenizer(out)
    assert hf.bos_token == ours.bos_token == cfg.special_tokens()["bos_token"]
    assert hf.eos_token == ours.eos_token == cfg.special_tokens()["eos_token"]
    assert hf.unk_token == ours.unk_token == cfg.special_tokens().get("unk_token")
    assert len(hf) == len(ours) == cfg.vocab_size
    text = hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text == ours.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nbe brief<|im_end|>\n")
    ids = hf.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ids == ours.apply_chat_template(CHAT, add_generation_prompt=True)
    assert ids.count(hf.convert_tokens_to_ids("<|im_start|>")) == 4
    saved = json.loads((out / "special_tokens_map.json").read_text())
    assert saved["additional_special_tokens"] == ["<|im_start|>", "<|im_end|>"]


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_byte_fallback_round_trips_unseen_characters(corpus, tmp_path, model_type):
    unseen = "Ω 😀 ጀ 東京"  # none of these characters is in the corpus
    with_bytes = train_tokenizer(corpus, tmp_path / "bytes", TokenizerTrainConfig(vocab_size=400,
                                                                                   model_type=model_type))
    hf = transformers.AutoTokenizer.from_pretrained(with_bytes)
    ids = hf(unseen, add_special_tokens=False)["input_ids"]
    assert hf.unk_token_id not in ids
    assert "<0xF0>" in hf.convert_ids_to_tokens(ids)  # the emoji's first UTF-8 byte
    assert hf.decode(ids) == jaxft.load_tokenizer(with_bytes).decode(ids) == unseen
    own = sentencepiece.SentencePieceProcessor(model_file=str(with_bytes / "tokenizer.model"))
    assert own.encode(unseen) == ids and own.decode(ids) == unseen
    no_bytes = train_tokenizer(corpus, tmp_path / "unk", TokenizerTrainConfig(
        vocab_size=150, model_type=model_type, byte_fallback=False))
    hf = transformers.AutoTokenizer.from_pretrained(no_bytes)
    ids = hf(unseen, add_special_tokens=False)["input_ids"]
    own = sentencepiece.SentencePieceProcessor(model_file=str(no_bytes / "tokenizer.model"))
    assert hf.unk_token_id in ids and ids == own.encode(unseen)


@pytest.mark.parametrize("model_type", ["unigram", "bpe", "byte_bpe"])
def test_same_settings_give_identical_files(corpus, tmp_path, model_type):
    cfg = TokenizerTrainConfig(vocab_size=350, model_type=model_type, seed=3, max_sentences=2000)\
        if model_type != "byte_bpe" else TokenizerTrainConfig(vocab_size=350, model_type=model_type, seed=3)
    first = train_tokenizer(corpus, tmp_path / "a", cfg)
    second = train_tokenizer(corpus, tmp_path / "b", cfg)
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= set(names)
    assert ("tokenizer.model" in names) == cfg.sentencepiece
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_cli_trains_from_jsonl_with_a_document_budget(corpus, tmp_path):
    """--max-documents reads the first N records: the same folder as the API on those N texts."""
    source = tmp_path / "corpus.jsonl"
    source.write_text("".join(json.dumps({"body": text}) + "\n" for text in corpus))
    args = ["tokenizer", "train", str(source), "--out", str(tmp_path / "cli"), "--vocab-size", "330",
            "--model-type", "bpe", "--text-field", "body", "--max-documents", "600", "--extra-special-token",
            "<|tool|>", "--threads", "1", "--add-eos-token", "--no-add-bos-token"]
    assert cli.main(args) == 0
    api = train_tokenizer(corpus[:600], tmp_path / "api", TokenizerTrainConfig(
        vocab_size=330, model_type="bpe", extra_special_tokens=("<|tool|>",), threads=1, add_eos_token=True,
        add_bos_token=False))
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        assert (tmp_path / "cli" / name).read_bytes() == (api / name).read_bytes(), name
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "cli")
    assert len(hf("x<|tool|>y", add_special_tokens=False)["input_ids"]) == 3
    own = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "cli" / "tokenizer.model"))
    for text in HELD_OUT:  # EOS added, BOS not, as the flags say
        ids = hf(text)["input_ids"]
        assert ids == jaxft.load_tokenizer(tmp_path / "cli").encode(text) == own.encode(text) + [hf.eos_token_id]


def _exit_status(argv) -> int:
    """The CLI's exit status: argparse exits for a bad choice, jaxft returns 2 for a bad value."""
    try:
        return cli.main(argv)
    except SystemExit as exit_:
        return exit_.code


@pytest.mark.parametrize("args, names", [
    (["--vocab-size", "200"], ["--vocab-size", "200"]),  # under the 256 byte pieces
    (["--vocab-size", "5000"], ["--vocab-size", "5000", "<= "]),  # more than the corpus holds
    (["--model-type", "wordpiece"], ["--model-type", "wordpiece"]),
    (["--chat-template", "nope"], ["--chat-template", "nope"]),
])
def test_bad_settings_name_the_flag(corpus, tmp_path, capsys, args, names):
    source = tmp_path / "c.txt"
    source.write_text("\n".join(corpus[:300]))
    assert _exit_status(["tokenizer", "train", str(source), "--out", str(tmp_path / "t"), *args]) == 2
    err = capsys.readouterr().err
    assert all(name in err for name in names), err
    assert not (tmp_path / "t").exists()


def test_missing_source_and_existing_folder_are_refused(corpus, tmp_path, capsys):
    missing = tmp_path / "nope" / "*.txt"
    assert cli.main(["tokenizer", "train", str(missing), "--out", str(tmp_path / "t")]) == 2
    assert str(missing) in capsys.readouterr().err
    source = tmp_path / "c.txt"
    source.write_text("\n".join(corpus[:300]))
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "keep.txt").write_text("mine")
    assert cli.main(["tokenizer", "train", str(source), "--out", str(tmp_path / "t")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(["tokenizer", "train", str(source), "--out", str(tmp_path / "t"), "--vocab-size", "330",
                     "--overwrite"]) == 0
    assert not (tmp_path / "t" / "keep.txt").exists()
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "t").vocab_size == 330


def test_api_errors_name_the_setting(corpus, tmp_path):
    with pytest.raises(TokenizerTrainError, match="model_type"):
        TokenizerTrainConfig(model_type="wordpiece")
    with pytest.raises(TokenizerTrainError, match="distinct"):
        TokenizerTrainConfig(bos_token="<unk>")
    with pytest.raises(TokenizerTrainError, match="extra_special_tokens"):
        TokenizerTrainConfig(extra_special_tokens=("</s>",))
    with pytest.raises(TokenizerTrainError, match="document 1 .* int"):
        train_tokenizer(["fine", 3], tmp_path / "t", TokenizerTrainConfig(vocab_size=300, model_type="byte_bpe"))
    with pytest.raises(FileExistsError, match="overwrite"):
        (tmp_path / "full").mkdir()
        (tmp_path / "full" / "x").write_text("x")
        train_tokenizer(corpus, tmp_path / "full", TokenizerTrainConfig(vocab_size=300))


def test_a_bad_file_stops_training_unless_skipped(corpus, tmp_path):
    """A file that is not UTF-8 is an error naming it; with skip_bad_files the folder is the one the good files
    alone give (the bad file's documents before its first bad one are kept: here it has none)."""
    for i, part in enumerate((corpus[:500], corpus[500:1000])):
        (tmp_path / f"{i}.txt").write_text("\n".join(part), encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    cfg = TokenizerTrainConfig(vocab_size=330, model_type="bpe", threads=1, document="line")
    with pytest.raises(TokenizerTrainError, match="latin1.txt:1: not UTF-8.*--skip-bad-files"):
        train_tokenizer_from_sources([str(tmp_path / "*.txt")], tmp_path / "out", cfg)
    assert not (tmp_path / "out").exists()
    skipping = dataclasses.replace(cfg, skip_bad_files=True)
    with pytest.warns(UserWarning, match="skips the rest of the file: .*latin1.txt:1: not UTF-8"):
        train_tokenizer_from_sources([str(tmp_path / "*.txt")], tmp_path / "out", skipping)
    good = train_tokenizer(corpus[:1000], tmp_path / "good", cfg)
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (good / "tokenizer.json").read_bytes()
