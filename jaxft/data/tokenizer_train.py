"""Train a tokenizer on a corpus and save it as a Hugging Face tokenizer folder (``jaxft tokenizer train``).

Three model types:

| model_type | trained by                       | text handling                                                   |
|------------|----------------------------------|-----------------------------------------------------------------|
| `unigram`  | sentencepiece's trainer          | Gemma style: spaces as "▁", no dummy prefix, digits split, bytes |
| `bpe`      | sentencepiece                    | the same, with BPE merges                                       |
| `byte_bpe` | `tokenizers`' `BpeTrainer`       | GPT-2 style: bytes as printable characters, no unknown token    |

The documents come from :func:`jaxft.data.text_sources.read_documents` (files, globs, JSONL / parquet, datasets
folders, ``hf:`` names) or from any iterable of strings; sentencepiece reads them through its sentence iterator and
writes its model into memory, so nothing is written but the output folder. Sentencepiece is given the documents
line by line (it skips sentences over ``max_sentence_length`` bytes, so long lines are cut), with the identity
normalizer, whitespace kept as written and no dummy prefix (as Gemma's): how it encodes then matches the
`tokenizers` backend saved beside it. (With the prefix, sentencepiece adds "▁" even before a leading space, which
a Metaspace pre-tokenizer never does, and runs of indentation would encode differently.) A BPE model matches
exactly; a unigram model can split differently where two segmentations' scores tie in float32, which sentencepiece
sums in and `tokenizers` (float64) does not, a rare, equally likely choice.

The folder holds ``tokenizer.json`` (the backend: for sentencepiece models made by
:func:`jaxft.hf.sentencepiece_conversion.backend_from_model`), ``tokenizer_config.json`` (with the special tokens
and ``added_tokens_decoder``, as :meth:`jaxft.Tokenizer.save` writes it), ``special_tokens_map.json``, the chat
template as ``chat_template.jinja``, and for sentencepiece models ``tokenizer.model`` (the scores, which the
GGUF export and sentencepiece itself read). BOS / EOS are added by the post-processor in ``tokenizer.json``, which
is what transformers 5 follows, and the config's ``add_bos_token`` / ``add_eos_token`` say the same. The special
tokens (named and extra) are added tokens matched in the text before the model runs; a built-in chat template's
``<|...|>`` markers become extra special tokens, so each is one id. The folder is written atomically and an
existing one is replaced only with ``overwrite``.
"""
from __future__ import annotations

import io
import json
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import sentencepiece
from tokenizers import AddedToken, Tokenizer as BackendTokenizer, decoders, pre_tokenizers, processors, trainers
from tokenizers.models import BPE

from jaxft.data.chat import BUILTIN_TEMPLATES
from jaxft.data.formats import DataError
from jaxft.data.text_config import DOCUMENT_UNITS
from jaxft.data.text_sources import expand_source, read_documents
from jaxft.errors import JaxftError
from jaxft.files import atomic_dir, check_output_dir
from jaxft.hf import sentencepiece_conversion
from jaxft.hf.tokenizer import SENTENCEPIECE_MODEL, SPECIAL_TOKENS_MAP, Tokenizer

SENTENCEPIECE_TYPES = ("unigram", "bpe")
MODEL_TYPES = (*SENTENCEPIECE_TYPES, "byte_bpe")
# The named special tokens a model type gets unless told otherwise: Llama's for sentencepiece (which needs an
# unknown piece), GPT-2's for byte-level BPE (every byte has a token, so no unknown; one token ends and begins).
DEFAULT_SPECIAL_TOKENS = {
    "unigram": sentencepiece_conversion.DEFAULT_TOKENS,
    "bpe": sentencepiece_conversion.DEFAULT_TOKENS,
    "byte_bpe": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"},
}
_BYTES = 256  # byte pieces: sentencepiece's byte fallback, or byte-level BPE's initial alphabet
_SENTENCE_CHARS = 2048  # a line is cut into pieces this long: at most 8 KiB of UTF-8, under _SENTENCE_BYTES
_SENTENCE_BYTES = 8192  # sentencepiece's max_sentence_length (it drops longer sentences)
_TEMPLATE_MARKER = re.compile(r"<\|\w+\|>")  # chatml's <|im_start|>, Llama 3's <|eot_id|>, ...


class TokenizerTrainError(JaxftError, ValueError):
    """Tokenizer training settings or input are unusable; the message names the setting (and its flag)."""


@dataclass(frozen=True)
class TokenizerTrainConfig:
    """What to train. Named tokens left None take the model type's default (:data:`DEFAULT_SPECIAL_TOKENS`;
    no pad token by default, as Llama and GPT-2 have none). ``add_bos_token`` None: True for sentencepiece models
    (Llama), False for byte_bpe (GPT-2). ``max_documents`` / ``max_characters`` stop reading the corpus there;
    ``max_sentences`` lets sentencepiece keep a seeded random sample of that many lines (its input_sentence_size)
    of those read. ``skip_bad_files``: a file that cannot be read (not UTF-8, bad JSON) is skipped from its first
    bad document on, with a warning, instead of stopping the training. ``byte_fallback`` and ``character_coverage``
    are sentencepiece's (byte_bpe covers every byte)."""

    vocab_size: int = 32000
    model_type: str = "unigram"
    bos_token: str | None = None
    eos_token: str | None = None
    unk_token: str | None = None
    pad_token: str | None = None
    extra_special_tokens: tuple[str, ...] = ()
    add_bos_token: bool | None = None
    add_eos_token: bool = False
    byte_fallback: bool = True
    character_coverage: float = 0.9995
    max_documents: int | None = None
    max_characters: int | None = None
    max_sentences: int | None = None
    chat_template: str | None = None
    text_field: str = "text"
    document: str = "file"
    skip_bad_files: bool = False
    seed: int = 0
    threads: int | None = None  # sentencepiece's training threads (None: every core)

    def __post_init__(self):
        object.__setattr__(self, "extra_special_tokens", tuple(self.extra_special_tokens))
        if self.model_type not in MODEL_TYPES:
            raise TokenizerTrainError(f"model_type (--model-type) must be one of {list(MODEL_TYPES)}, got "
                                      f"{self.model_type!r}")
        if self.chat_template is not None and self.chat_template not in BUILTIN_TEMPLATES:
            raise TokenizerTrainError(f"chat_template (--chat-template) must be a built-in template, one of "
                                      f"{sorted(BUILTIN_TEMPLATES)}, got {self.chat_template!r}")
        if self.document not in DOCUMENT_UNITS:
            raise TokenizerTrainError(f"document (--document) must be one of {list(DOCUMENT_UNITS)}, got "
                                      f"{self.document!r}")
        for name in ("max_documents", "max_characters", "max_sentences", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise TokenizerTrainError(f"{name} (--{name.replace('_', '-')}) must be >= 1 (or unset: no limit), "
                                          f"got {getattr(self, name)}")
        if not 0.0 < self.character_coverage <= 1.0:
            raise TokenizerTrainError(f"character_coverage (--character-coverage) must be in (0, 1], got "
                                      f"{self.character_coverage}")
        if self.model_type == "byte_bpe" and self.max_sentences is not None:
            raise TokenizerTrainError("max_sentences (--max-sentences) samples sentencepiece's input; byte_bpe "
                                      "counts words as it reads: bound it with --max-documents / --max-characters")
        self._check_tokens()

    def _check_tokens(self):
        named = self.special_tokens()
        if self.sentencepiece and "unk_token" not in named:
            raise TokenizerTrainError("unk_token (--unk-token): sentencepiece models need an unknown token")
        if self.sentencepiece and len(set(named.values())) < len(named):
            raise TokenizerTrainError(f"sentencepiece needs distinct bos/eos/unk/pad tokens, got {named}")
        clash = sorted(set(named.values()) & set(self.extra_special_tokens))
        if clash or any(not token for token in [*named.values(), *self.extra_special_tokens]):
            raise TokenizerTrainError(f"extra_special_tokens (--extra-special-token) must be non-empty and "
                                      f"differ from the named tokens {named}; got {list(self.extra_special_tokens)}")
        reserved = len(self.all_special_tokens()) + (_BYTES if self.byte_fallback or not self.sentencepiece else 0)
        if self.vocab_size <= reserved:
            raise TokenizerTrainError(f"vocab_size (--vocab-size) {self.vocab_size} leaves no room for learned "
                                      f"tokens: {reserved} ids are special tokens and byte pieces; use more")

    @property
    def sentencepiece(self) -> bool:
        return self.model_type in SENTENCEPIECE_TYPES

    def special_tokens(self) -> dict[str, str]:
        """The named special tokens (bos_token, eos_token, unk_token, pad_token) this tokenizer has."""
        named = dict(DEFAULT_SPECIAL_TOKENS[self.model_type])
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            if getattr(self, name) is not None:
                named[name] = getattr(self, name)
        return named

    def all_special_tokens(self) -> list[str]:
        """Named tokens, then the extra ones and the chat template's markers, each once, in id order."""
        template = BUILTIN_TEMPLATES.get(self.chat_template, "")
        tokens = [*self.special_tokens().values(), *self.extra_special_tokens, *_TEMPLATE_MARKER.findall(template)]
        return list(dict.fromkeys(tokens))

    def extra_tokens(self) -> list[str]:
        """The special tokens without a name: the extra ones and the chat template's markers."""
        named = set(self.special_tokens().values())
        return [token for token in self.all_special_tokens() if token not in named]

    def adds_bos(self) -> bool:
        return self.sentencepiece if self.add_bos_token is None else self.add_bos_token


def corpus_texts(sources: Sequence[str], cfg: TokenizerTrainConfig) -> Iterator[str]:
    """The documents' texts of ``sources`` in order; every spec is checked before the first is read, so a missing
    one is an error naming it before any training."""
    if not sources:
        raise TokenizerTrainError("no sources: name at least one text / JSONL / parquet file, glob, folder or hf:NAME")
    items = [item for spec in sources for item in expand_source(spec)]
    return (text for item in items for text in _item_texts(item, cfg))


def _item_texts(item: str, cfg: TokenizerTrainConfig) -> Iterator[str]:
    """One file's (dataset's) texts; with ``skip_bad_files`` a DataError (not UTF-8, bad JSON, a record without
    the text field) ends the file with a warning naming it, instead of the training."""
    try:
        for doc in read_documents(item, text_field=cfg.text_field, document=cfg.document):
            yield doc.text
    except DataError as err:
        if not cfg.skip_bad_files:
            raise TokenizerTrainError(f"{err} (skip_bad_files / --skip-bad-files skips such a file)") from err
        warnings.warn(f"tokenizer training skips the rest of the file: {err}", stacklevel=1)


def _budgeted(texts: Iterable[str], cfg: TokenizerTrainConfig) -> Iterator[str]:
    """``texts`` up to ``max_documents`` documents and ``max_characters`` characters (the last one cut)."""
    chars = 0
    for number, text in enumerate(texts):
        if not isinstance(text, str):
            raise TokenizerTrainError(f"document {number} of the training texts is a {type(text).__name__}, "
                                      "expected a string")
        if cfg.max_documents is not None and number >= cfg.max_documents:
            return
        if cfg.max_characters is not None:
            text = text[:cfg.max_characters - chars]
            chars += len(text)
        yield text
        if cfg.max_characters is not None and chars >= cfg.max_characters:
            return


def _sentences(texts: Iterable[str]) -> Iterator[str]:
    """Non-empty lines, long ones cut into pieces sentencepiece keeps (it drops sentences over its byte limit)."""
    for text in texts:
        for line in text.splitlines():
            for start in range(0, len(line), _SENTENCE_CHARS):
                yield line[start:start + _SENTENCE_CHARS]


def _train_sentencepiece(texts: Iterable[str], cfg: TokenizerTrainConfig) -> bytes:
    """The serialized sentencepiece model, trained in memory."""
    named = cfg.special_tokens()
    ids = {name: i for i, name in enumerate(named)}  # unk, bos, eos[, pad] in that order (ids 0..)
    model = io.BytesIO()
    sentencepiece.set_random_generator_seed(cfg.seed)
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=_sentences(texts), model_writer=model, model_type=cfg.model_type,
            vocab_size=cfg.vocab_size, character_coverage=cfg.character_coverage, byte_fallback=cfg.byte_fallback,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            split_digits=True, allow_whitespace_only_pieces=True, max_sentence_length=_SENTENCE_BYTES,
            input_sentence_size=cfg.max_sentences or 0, shuffle_input_sentence=True,
            unk_id=ids["unk_token"], bos_id=ids.get("bos_token", -1), eos_id=ids.get("eos_token", -1),
            pad_id=ids.get("pad_token", -1), unk_piece=named["unk_token"], bos_piece=named.get("bos_token", "<s>"),
            eos_piece=named.get("eos_token", "</s>"), pad_piece=named.get("pad_token", "<pad>"),
            user_defined_symbols=cfg.extra_tokens(), num_threads=cfg.threads or os.cpu_count(),
            minloglevel=2)
    except RuntimeError as err:
        raise _sentencepiece_error(err, cfg) from err
    return model.getvalue()


def _sentencepiece_error(err: RuntimeError, cfg: TokenizerTrainConfig) -> TokenizerTrainError:
    message = str(err)
    if "ocabulary size" in message or "vocab_size" in message:
        return TokenizerTrainError(f"vocab_size (--vocab-size) {cfg.vocab_size} does not suit this corpus for "
                                   f"{cfg.model_type}: sentencepiece says {message.strip()}")
    if "empty" in message.lower() or "no sentence" in message.lower():
        return TokenizerTrainError(f"the corpus has no text to train on (sentencepiece: {message.strip()})")
    return TokenizerTrainError(f"sentencepiece could not train the {cfg.model_type} model: {message.strip()}")


def _train_byte_bpe(texts: Iterable[str], cfg: TokenizerTrainConfig) -> BackendTokenizer:
    """A GPT-2 style byte-level BPE: every byte a token from the start, merges learned over the GPT-2 words."""
    backend = BackendTokenizer(BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, special_tokens=cfg.all_special_tokens(),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer)
    if backend.get_vocab_size() <= len(cfg.all_special_tokens()) + _BYTES:
        raise TokenizerTrainError("the corpus has no text to train on: byte_bpe learned no merges")
    return backend


def _finish(backend: BackendTokenizer, cfg: TokenizerTrainConfig) -> Tokenizer:
    """The backend with its special tokens and post-processor, as a jaxft Tokenizer ready to save."""
    named = cfg.special_tokens()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in cfg.all_special_tokens()])
    config = {"tokenizer_class": "TokenizersBackend", "add_bos_token": cfg.adds_bos(),
              "add_eos_token": cfg.add_eos_token, "clean_up_tokenization_spaces": False}
    bos_eos = sentencepiece_conversion.bos_eos_post_processor(backend, config, named)
    backend.post_processor = bos_eos if cfg.sentencepiece else processors.Sequence(
        [processors.ByteLevel(trim_offsets=False), bos_eos])
    templates = {"default": BUILTIN_TEMPLATES[cfg.chat_template]} if cfg.chat_template else {}
    return Tokenizer(backend, special_tokens=named, extra_special_tokens=cfg.extra_tokens(),
                     chat_templates=templates, config=config)


def train_tokenizer(texts: Iterable[str], out_dir, cfg: TokenizerTrainConfig, *, overwrite: bool = False) -> Path:
    """Train on ``texts`` (one string per document) and write the HF tokenizer folder ``out_dir``, which
    transformers' AutoTokenizer and :func:`jaxft.load_tokenizer` load; an existing non-empty ``out_dir`` needs
    ``overwrite``. Returns ``out_dir``."""
    check_output_dir(out_dir, overwrite)  # before training: a refused folder costs nothing
    texts = _budgeted(texts, cfg)
    if cfg.sentencepiece:
        model_proto = _train_sentencepiece(texts, cfg)
        backend = sentencepiece_conversion.backend_from_model(model_proto)
    else:
        model_proto, backend = None, _train_byte_bpe(texts, cfg)
    tokenizer = _finish(backend, cfg)
    with atomic_dir(out_dir, overwrite) as tmp:
        tokenizer.save(tmp)
        if model_proto is not None:
            (tmp / SENTENCEPIECE_MODEL).write_bytes(model_proto)
        special_map = {**cfg.special_tokens(), "additional_special_tokens": cfg.extra_tokens()}
        (tmp / SPECIAL_TOKENS_MAP).write_text(json.dumps(special_map, indent=2, ensure_ascii=False) + "\n",
                                              encoding="utf-8")
    return Path(out_dir)


def train_tokenizer_from_sources(sources: Sequence[str], out_dir, cfg: TokenizerTrainConfig, *,
                                 overwrite: bool = False) -> Path:
    """:func:`train_tokenizer` on the documents of source specs (``jaxft.data.text_sources``); ``cfg.text_field``
    and ``cfg.document`` say how records and plain files become documents."""
    return train_tokenizer(corpus_texts(sources, cfg), out_dir, cfg, overwrite=overwrite)

