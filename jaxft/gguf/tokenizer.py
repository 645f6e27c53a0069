"""The tokenizer a GGUF file describes in its metadata, as a `tokenizers` tokenizer in jaxft's :class:`Tokenizer`.

llama.cpp stores no tokenizer.json: ``tokenizer.ggml.model`` says which kind, and the vocabulary, merges, scores,
token types and special-token ids are metadata arrays. Two kinds are read, built the way transformers' GGUF
loader builds them, so ``load_tokenizer("model.gguf")`` gives ``AutoTokenizer.from_pretrained(dir,
gguf_file=...)``'s ids, except where that loader departs from llama.cpp (``ignore_merges``, the BOS default; jaxft
follows llama.cpp there):

* ``gpt2``: byte-level BPE with the file's merges, its text split by the regex ``tokenizer.ggml.pre`` names
  (:data:`jaxft.gguf.layout.PRE_TOKENIZERS`; an unknown name is an error, as in llama.cpp, since another
  split would give other ids; SmolLM's ``smollm`` splits each digit off first, as llama.cpp and its tokenizer.json
  do, where transformers' loader does not), skipping the merges for a piece that is itself a token where llama.cpp
  does (``ignore_merges``: Llama 3, Tekken; transformers' GGUF loader omits it and gives other ids there);
* ``llama``: a sentencepiece-style byte-fallback BPE (:func:`jaxft.hf.sentencepiece_conversion.backend_from_pieces`)
  whose merges are the file's, or those the piece scores imply.

Tokens typed CONTROL (or UNKNOWN) become special added tokens, USER_DEFINED ones plain added tokens (all are
matched whole in the text, as llama.cpp does); bos/eos/unk/pad come from their ids; BOS/EOS are added per
``tokenizer.ggml.add_bos_token``/``add_eos_token``; without the first, BOS is added where llama.cpp adds it
by default (a sentencepiece vocabulary, and the pre-tokenizers :data:`jaxft.gguf.layout.PRE_TOKENIZERS` marks).
``tokenizer.chat_template`` is the default chat template.
"""
from __future__ import annotations

from pathlib import Path

import gguf
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.models import BPE

from jaxft.gguf.layout import PRE_TOKENIZERS, SENTENCEPIECE_ADD_BOS, GgufError, PreTokenizer
from jaxft.gguf.read import architecture, field_value, open_reader
from jaxft.hf import sentencepiece_conversion
from jaxft.hf.tokenizer import Tokenizer, _register_added_tokens

TOKENIZER_MODELS = ("gpt2", "llama")  # tokenizer.ggml.model values jaxft reads
SPECIAL_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
               "pad_token": "padding_token_id"}


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (``bytes_to_unicode``), in which byte-level vocabularies are
    spelled."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


class _Metadata:
    """The ``tokenizer.*`` metadata of one file; a missing required key is a GgufError naming file and key."""

    def __init__(self, path: Path):
        self.path = path
        self.reader = open_reader(path)
        architecture(self.reader, path)  # the vocabularies of other models need rules this module lacks

    def get(self, key: str, default=...):
        return field_value(self.reader, self.path, f"tokenizer.{key}", default)


def _pre_tokenizer(meta: _Metadata) -> PreTokenizer:
    """What ``tokenizer.ggml.pre`` names (llama.cpp's default when absent); an unknown name is a GgufError."""
    pre = meta.get("ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise GgufError(f"{meta.path}: tokenizer.ggml.pre {pre!r} is not a pre-tokenizer jaxft knows; it reads "
                        f"{sorted(PRE_TOKENIZERS)}")
    return PRE_TOKENIZERS[pre]


def _byte_level_backend(meta: _Metadata, tokens: list[str]) -> BackendTokenizer:
    """GPT-2-style byte-level BPE; a token the file spells outside the byte alphabet is re-spelled in it, as
    transformers does."""
    pre = _pre_tokenizer(meta)
    spelling = _byte_alphabet()
    alphabet = set(spelling.values())
    vocab = {token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8")): i
             for i, token in enumerate(tokens)}
    merges = [tuple(merge.split(" ")) for merge in meta.get("ggml.merges")]
    backend = BackendTokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                   end_of_word_suffix="", fuse_unk=False, ignore_merges=pre.ignore_merges))
    steps = [pre_tokenizers.Digits(individual_digits=True)] if pre.single_digits else []
    if pre.split is None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False))
    else:
        steps += [pre_tokenizers.Split(Regex(pre.split), behavior="isolated"),
                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    backend.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_backend(meta: _Metadata, tokens: list[str]) -> BackendTokenizer:
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = meta.get("ggml.merges", None)
    if merges is not None:
        merges = [tuple(merge.split(" ")) for merge in merges]
    else:
        merges = sentencepiece_conversion.generate_merges(vocab, dict(zip(tokens, meta.get("ggml.scores"))))
    return sentencepiece_conversion.backend_from_pieces(vocab, merges, bool(meta.get("ggml.add_space_prefix", True)))


def _added_tokens(meta: _Metadata, tokens: list[str], backend: BackendTokenizer) -> tuple[list, list]:
    """(special, plain) added tokens: CONTROL and UNKNOWN tokens (in a byte-level vocabulary only those spelled in
    its alphabet; others are llama.cpp mislabels), and USER_DEFINED ones. llama.cpp matches all three whole in a
    text; transformers registers a sentencepiece vocabulary's ``<unk>`` as a special token too."""
    types = meta.get("ggml.token_type", None) or []
    byte_level = meta.get("ggml.model") == "gpt2"
    alphabet = set(_byte_alphabet().values())
    special = [AddedToken(t, normalized=False, special=True) for t, kind in zip(tokens, types)
               if kind in (gguf.TokenType.CONTROL, gguf.TokenType.UNKNOWN) and (not byte_level or set(t) <= alphabet)]
    plain = [AddedToken(t, normalized=False, special=False) for t, kind in zip(tokens, types)
             if kind == gguf.TokenType.USER_DEFINED and backend.token_to_id(t) is not None]
    return special, plain


def tokenizer_from_gguf(path) -> Tokenizer:
    """The tokenizer of the GGUF file ``path``, with its special tokens, BOS/EOS rule and chat template."""
    meta = _Metadata(Path(path))
    kind = meta.get("ggml.model")
    if kind not in TOKENIZER_MODELS:
        raise GgufError(f"{meta.path}: tokenizer.ggml.model {kind!r} is not supported; jaxft reads "
                        f"{list(TOKENIZER_MODELS)} (byte-level BPE, sentencepiece-style BPE)")
    tokens = meta.get("ggml.tokens")
    backend = (_byte_level_backend if kind == "gpt2" else _sentencepiece_backend)(meta, tokens)
    named = {}
    for name, key in SPECIAL_IDS.items():
        token_id = meta.get(f"ggml.{key}", None)
        if token_id is not None:
            if not 0 <= token_id < len(tokens):
                raise GgufError(f"{meta.path}: tokenizer.ggml.{key} is {token_id}, outside the vocabulary of "
                                f"{len(tokens)} tokens")
            named[name] = tokens[token_id]
    special, plain = _added_tokens(meta, tokens, backend)
    _register_added_tokens(backend, {}, [*(AddedToken(t, special=True, normalized=False) for t in named.values()),
                                         *special])
    if plain:
        backend.add_tokens(plain)
    add_bos_default = SENTENCEPIECE_ADD_BOS if kind == "llama" else _pre_tokenizer(meta).add_bos
    config = {"add_bos_token": bool(meta.get("ggml.add_bos_token", add_bos_default)),
              "add_eos_token": bool(meta.get("ggml.add_eos_token", False))}
    backend.post_processor = sentencepiece_conversion.bos_eos_post_processor(backend, config, named)
    template = meta.get("chat_template", None)
    return Tokenizer(backend, special_tokens=named, extra_special_tokens=[t.content for t in special],
                     chat_templates={"default": template} if template else {}, config={})


def sentencepiece_model_from_gguf(path) -> bytes | None:
    """The ``tokenizer.model`` a sentencepiece (``llama``) vocabulary stands for, serialized: its pieces, scores
    and types as the file has them (sentencepiece numbers its types as GGUF does), the unknown token typed UNKNOWN
    as sentencepiece requires. None for a byte-level vocabulary, and for a ``llama`` one without scores (llama.cpp
    allows it when the file has merges; the folder's tokenizer.json then holds them). A folder converted from the
    file then exports back to the same vocabulary (:func:`jaxft.gguf.write.sentencepiece_model_of`)."""
    meta = _Metadata(Path(path))
    if meta.get("ggml.model") != "llama" or meta.get("ggml.scores", None) is None:
        return None
    tokens, scores = meta.get("ggml.tokens"), meta.get("ggml.scores")
    types = meta.get("ggml.token_type", None) or [gguf.TokenType.NORMAL] * len(tokens)
    ids = {key: meta.get(f"ggml.{key}_token_id", default) for key, default in
           (("unknown", 0), ("bos", 1), ("eos", 2), ("padding", -1))}
    known = {int(kind) for kind in gguf.TokenType}
    types = [gguf.TokenType.UNKNOWN if i == ids["unknown"] else  # sentencepiece allows one UNKNOWN piece
             gguf.TokenType.CONTROL if kind == gguf.TokenType.UNKNOWN else kind if kind in known else
             gguf.TokenType.NORMAL for i, kind in enumerate(types)]
    return sentencepiece_conversion.bpe_model_proto(
        list(zip(tokens, scores, (int(kind) for kind in types))), unk_id=ids["unknown"], bos_id=ids["bos"],
        eos_id=ids["eos"], pad_id=ids["padding"], add_dummy_prefix=bool(meta.get("ggml.add_space_prefix", True)))
