"""A sentencepiece `tokenizer.model` as a `tokenizers` backend, converted the way transformers 5's
`LlamaTokenizer` converts it: a byte-fallback BPE whose merges are derived from the piece ranks, a `Metaspace`
pre-tokenizer (prefix space on the first piece only unless `legacy: true`) and a post-processor built from
`add_bos_token`/`add_eos_token`. Encoding with sentencepiece itself would differ from AutoTokenizer on leading
spaces and on special tokens written in the text.

A model that cannot be read is a ValueError naming the file; :mod:`jaxft.hf.tokenizer` reports it as a
TokenizerError. The protobuf wire format is read and written here by hand (just the fields a BPE ``ModelProto``
needs), so that reading and writing tokenizer.model needs no protobuf package: :func:`bpe_model_proto` writes one
from pieces, as :func:`jaxft.gguf.convert.gguf_to_hf` does for a GGUF file's sentencepiece vocabulary.

A freshly trained model (:mod:`jaxft.data.tokenizer_train`) is saved with a ``tokenizer.json`` from
:func:`backend_from_model`: the same BPE conversion for a BPE model, and a `tokenizers` Unigram with the pieces'
scores for a unigram one, so that its ids are sentencepiece's own.
"""
from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import sentencepiece
from tokenizers import AddedToken, decoders, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.models import BPE, Unigram

# transformers' `LlamaTokenizer.__init__` defaults, used when a sentencepiece folder's config doesn't name them.
DEFAULT_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}


def generate_merges(vocab: Mapping[str, int], scores: Mapping[str, float] | None = None) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece vocabulary, ranked like transformers' `generate_merges`.

    A piece that splits into two vocabulary pieces yields a merge ranked by the piece's own id, ties
    broken by the split's lengths; this is how transformers 5 turns an SPM-BPE model into a `tokenizers` BPE.
    With `scores` (a GGUF's piece scores) the merge of the highest-scoring piece comes first instead, ties
    going to the longer split, as transformers ranks them for a GGUF vocabulary.
    """
    merges = []
    for piece, rank in (scores if scores is not None else vocab).items():
        splits = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        splits.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        merges.extend((left, right, rank) for left, right in splits)
    merges.sort(key=lambda merge: (merge[2], len(merge[0]), len(merge[1])), reverse=scores is not None)
    return [(left, right) for left, right, _ in merges]


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _protobuf_fields(data: bytes) -> Iterable[tuple[int, int, Any]]:
    """Yield `(field, wire_type, value)` of one protobuf message (just enough wire format for ModelProto)."""
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _read_varint(data, pos)
        elif wire_type == 1:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire_type == 2:
            length, pos = _read_varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
        elif wire_type == 5:
            value, pos = data[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"tokenizer.model: unsupported protobuf wire type {wire_type} (a damaged or non-"
                             "SentencePiece file?)")
        yield field, wire_type, value


_SPM_NORMAL, _SPM_CONTROL, _SPM_USER_DEFINED = 1, 3, 4  # ModelProto.SentencePiece.Type (2: UNKNOWN)
_SPM_UNIGRAM, _SPM_BPE = 1, 2  # TrainerSpec.model_type


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # a negative int32 (pad_id -1) is written as protobuf does: 64-bit two's complement
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, value: bytes | float | int) -> bytes:
    """One protobuf field: bytes length-delimited, floats as 32-bit floats, ints, enums and bools as varints."""
    if isinstance(value, bytes):
        return _varint(number << 3 | 2) + _varint(len(value)) + value
    if isinstance(value, float):
        return _varint(number << 3 | 5) + struct.pack("<f", value)
    return _varint(number << 3) + _varint(int(value))


def bpe_model_proto(pieces: Sequence[tuple[str, float, int]], *, unk_id: int, bos_id: int, eos_id: int,
                    pad_id: int = -1, add_dummy_prefix: bool = True) -> bytes:
    """A serialized sentencepiece ``ModelProto`` of a byte-fallback BPE: ``pieces`` as (piece, score, type) with
    sentencepiece's type numbers, the text taken as given (identity normalizer, whitespace kept), spaces as "▁"
    and, with ``add_dummy_prefix``, one in front of the text."""
    out = b"".join(_field(1, _field(1, piece.encode("utf-8")) + _field(2, float(score)) + _field(3, kind))
                   for piece, score, kind in pieces)
    trainer = b"".join(_field(number, value) for number, value in (
        (3, _SPM_BPE), (4, len(pieces)), (35, True), (40, unk_id), (41, bos_id), (42, eos_id), (43, pad_id)))
    normalizer = _field(1, b"identity") + _field(3, add_dummy_prefix) + _field(4, False) + _field(5, True)
    return out + _field(2, trainer) + _field(3, normalizer)


def piece_types(serialized_model: bytes) -> list[int]:
    """Piece types from a serialized `ModelProto` (`pieces` is field 1, a piece's `type` its field 3).

    The sentencepiece Python API can tell control pieces apart but not user-defined ones, which
    transformers turns into (non-special) added tokens, so we read the types from the proto.
    """
    types = []
    for field, wire_type, piece in _protobuf_fields(serialized_model):
        if field == 1 and wire_type == 2:
            piece_type = _SPM_NORMAL
            for piece_field, _, value in _protobuf_fields(piece):
                if piece_field == 3:
                    piece_type = value
            types.append(piece_type)
    return types


def backend_from_pieces(vocab: dict[str, int], merges: list[tuple[str, str]], add_prefix_space: bool,
                        legacy: bool = False, unk_token: str | None = None) -> BackendTokenizer:
    """A sentencepiece-style byte-fallback BPE over ``vocab`` (pieces spelled with "▁" for spaces), as transformers
    5's `LlamaTokenizer` builds it: a `Metaspace` pre-tokenizer adding the prefix space to the first piece only
    (every piece with ``legacy``, none without ``add_prefix_space``), and the matching decoder. A character
    without a piece or byte pieces becomes ``unk_token`` (consecutive ones fused), or is dropped without one."""
    backend = BackendTokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None,
                                   unk_token=unk_token))
    return _with_metaspace(backend, add_prefix_space, legacy)


def _with_metaspace(backend: BackendTokenizer, add_prefix_space: bool, legacy: bool = False) -> BackendTokenizer:
    """Spaces as "▁" in and out, with sentencepiece's dummy prefix (see :func:`backend_from_pieces`)."""
    if not add_prefix_space:
        prepend_scheme = "never"
    else:
        prepend_scheme = "always" if legacy else "first"
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend_scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def backend_from_model(model_proto: bytes) -> BackendTokenizer:
    """The `tokenizers` backend that encodes as sentencepiece does, for a model with the identity normalizer
    (whitespace kept as written): a BPE model as :func:`convert` makes it, a unigram model as a `tokenizers` Unigram
    with the pieces' scores (the Viterbi search sentencepiece runs; transformers' BPE conversion would change a
    unigram model's ids), byte fallback when the model has the byte pieces. Only a model without the dummy prefix
    encodes every text alike: sentencepiece adds "▁" even to a text that starts with a space, a Metaspace
    pre-tokenizer does not."""
    processor = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
    pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
    spec = _proto_submessages(model_proto)
    add_prefix_space = spec["normalizer"].get(3, 1) == 1  # NormalizerSpec.add_dummy_prefix, default true
    if spec["trainer"].get(3, _SPM_UNIGRAM) == _SPM_BPE:  # TrainerSpec.model_type
        vocab = {piece: i for i, piece in enumerate(pieces)}
        unk = processor.id_to_piece(processor.unk_id())
        return backend_from_pieces(vocab, generate_merges(vocab), add_prefix_space, unk_token=unk)
    unigram = Unigram([(piece, processor.get_score(i)) for i, piece in enumerate(pieces)], processor.unk_id(),
                      "<0x00>" in pieces)
    return _with_metaspace(BackendTokenizer(unigram), add_prefix_space)


def _proto_submessages(model_proto: bytes) -> dict[str, dict[int, Any]]:
    """The scalar fields of a ModelProto's trainer spec (its field 2) and normalizer spec (field 3) by number."""
    found: dict[str, dict[int, Any]] = {"trainer": {}, "normalizer": {}}
    for field, wire_type, value in _protobuf_fields(model_proto):
        if field in (2, 3) and wire_type == 2:
            found["trainer" if field == 2 else "normalizer"].update(
                (number, item) for number, kind, item in _protobuf_fields(value) if kind == 0)
    return found


def convert(model_path: Path, config: dict) -> tuple[BackendTokenizer, list[AddedToken]]:
    """Convert `tokenizer.model` as transformers 5's `LlamaTokenizer` does; also return its control/user tokens."""
    try:
        processor = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
        types = piece_types(processor.serialized_model_proto())
    except (RuntimeError, OSError, ValueError, IndexError) as err:
        raise ValueError(f"{model_path}: not a valid sentencepiece model ({err})") from err
    pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    add_prefix_space = config.get("add_prefix_space")
    add_prefix_space = True if add_prefix_space is None else add_prefix_space
    backend = backend_from_pieces(vocab, generate_merges(vocab), add_prefix_space, config.get("legacy", False))
    spm_tokens = [
        AddedToken(piece, normalized=False, special=piece_type == _SPM_CONTROL)
        for piece, piece_type in zip(pieces, types)
        if piece_type in (_SPM_CONTROL, _SPM_USER_DEFINED)
    ]
    return backend, spm_tokens


def bos_eos_post_processor(backend: BackendTokenizer, config: dict, named: Mapping[str, str]):
    """The post-processor transformers builds from `add_bos_token`/`add_eos_token` (both default to False)."""
    bos, eos = named.get("bos_token"), named.get("eos_token")
    prefix = [bos] if config.get("add_bos_token", False) and bos is not None else []
    suffix = [eos] if config.get("add_eos_token", False) and eos is not None else []
    single = " ".join([f"{t}:0" for t in prefix] + ["$A:0"] + [f"{t}:0" for t in suffix])
    pair = " ".join([single] + [f"{t}:1" for t in prefix] + ["$B:1"] + [f"{t}:1" for t in suffix])
    special = [(t, backend.token_to_id(t)) for t in dict.fromkeys(prefix + suffix)]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)
