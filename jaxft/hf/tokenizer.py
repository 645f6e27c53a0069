"""Load Hugging Face tokenizer folders without transformers.

`load_tokenizer(folder)` returns a `Tokenizer` that produces the same ids, offsets, decoded text and
chat-template output as `transformers.AutoTokenizer.from_pretrained(folder)` (transformers 5), for
Llama-family checkpoints:

* `tokenizer.json` is loaded with the `tokenizers` library as-is. transformers 5 ignores the
  `add_bos_token`/`add_eos_token` flags of `tokenizer_config.json` in that case: the post-processor
  stored in `tokenizer.json` decides whether BOS/EOS are added, so we do the same.
* A folder with only a sentencepiece `tokenizer.model` is converted the way transformers 5's
  `LlamaTokenizer` converts it (`jaxft.hf.sentencepiece_conversion`).

Named special tokens are registered as added tokens, as transformers does, so "<s>" in a text encodes
as the BOS id rather than as characters. Nothing from the folder is unpickled or executed; chat
templates render in a Jinja sandbox (`jaxft.hf.chat_template`).
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Encoding
from tokenizers import Tokenizer as BackendTokenizer

from jaxft.errors import JaxftError
from jaxft.hf import chat_template as chat_template_lib
from jaxft.hf import sentencepiece_conversion

__all__ = ["Tokenizer", "TokenizerError", "load_tokenizer"]

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"
LEGACY_CHAT_TEMPLATE_JSON = "chat_template.json"

# The named special tokens transformers 5 exposes to chat templates (`tokenizer.special_tokens_map`).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# A template name that is safe as a file name; a `chat_template=` argument of this shape is a name, not source.
_TEMPLATE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
_ADDED_TOKEN_FIELDS = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")


class TokenizerError(JaxftError, ValueError):
    """A tokenizer folder or a chat-template request is unusable; the message names the file and problem."""


def _read_json(path: Path) -> Any:
    """Parse a JSON file, reporting malformed content with its file, line and column."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise TokenizerError(f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}") from err


def _read_optional_json_object(path: Path) -> dict:
    if not path.is_file():
        return {}
    value = _read_json(path)
    if not isinstance(value, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _token_content(value: Any) -> str | None:
    """Special tokens are stored as plain strings or as serialized AddedTokens (`{"content": ...}`)."""
    if isinstance(value, Mapping):
        return value.get("content")
    return value if isinstance(value, str) else None


def _named_special_tokens(config: dict, special_tokens_map: dict, defaults: Mapping[str, str]) -> dict[str, str]:
    """bos/eos/... by name, with transformers' precedence: special_tokens_map.json > tokenizer_config.json > defaults.

    transformers only reads `special_tokens_map.json` for configs without `added_tokens_decoder` (older saves).
    """
    sources = [config, special_tokens_map] if "added_tokens_decoder" not in config else [config]
    named = dict(defaults)
    for source in sources:
        for name in SPECIAL_TOKEN_NAMES:
            if name in source:
                content = _token_content(source[name])
                if content is None:
                    named.pop(name, None)
                else:
                    named[name] = content
    return {name: named[name] for name in SPECIAL_TOKEN_NAMES if name in named}


def _extra_special_tokens(config: dict) -> list[str]:
    """Unnamed special tokens: `extra_special_tokens` (v5) or `additional_special_tokens` (v4), list or dict."""
    value = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    if isinstance(value, Mapping):
        value = list(value.values())
    return [content for content in map(_token_content, value) if content is not None]


def _special_added_token(content: str) -> AddedToken:
    return AddedToken(content, special=True, normalized=False)


def _register_added_tokens(backend: BackendTokenizer, config: dict, special_tokens: Iterable[AddedToken]) -> None:
    """Make `added_tokens_decoder` entries, then `special_tokens`, added tokens of the backend.

    Added tokens are matched before the model runs, so "<s>" in a text becomes the BOS id even when
    `tokenizer.json` only has it in the plain vocabulary; transformers registers them the same way.
    """
    present = {token.content for token in backend.get_added_tokens_decoder().values()}
    to_add = []
    for entry in config.get("added_tokens_decoder", {}).values():
        if isinstance(entry, Mapping) and entry.get("content") not in present:
            to_add.append(AddedToken(**{key: entry[key] for key in _ADDED_TOKEN_FIELDS if key in entry}))
    to_add.extend(special_tokens)
    unique: dict[str, AddedToken] = {}
    for token in to_add:
        if token.content not in present:
            unique.setdefault(token.content, token)
    if unique:
        backend.add_tokens(list(unique.values()))


def _templates_from_files(folder: Path) -> dict[str, str]:
    templates = {}
    if (folder / CHAT_TEMPLATE_FILE).is_file():
        templates["default"] = (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    template_dir = folder / CHAT_TEMPLATE_DIR
    if template_dir.is_dir():
        for path in sorted(template_dir.glob("*.jinja")):
            templates[path.name.removesuffix(".jinja")] = path.read_text(encoding="utf-8")
    return templates


def _templates_from_config(config: dict, path: Path) -> dict[str, str]:
    """The legacy `chat_template` field: one template, or a list of `{"name", "template"}` entries."""
    value = config.get("chat_template")
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list) and all(isinstance(e, Mapping) and {"name", "template"} <= e.keys() for e in value):
        return {entry["name"]: entry["template"] for entry in value}
    raise TokenizerError(f'{path}: "chat_template" must be a string or a list of {{"name", "template"}} objects')


def _load_chat_templates(folder: Path, config: dict) -> dict[str, str]:
    """Chat templates by name ("default" is the default), in transformers 5's precedence.

    Template files (`chat_template.jinja`, `additional_chat_templates/*.jinja`) replace the config's
    `chat_template` field entirely, as in `AutoTokenizer`. `chat_template.json` is only read by
    transformers' processors; we fall back to it when the tokenizer itself has no template.
    """
    templates = _templates_from_files(folder) or _templates_from_config(config, folder / TOKENIZER_CONFIG)
    legacy_json = folder / LEGACY_CHAT_TEMPLATE_JSON
    if not templates and legacy_json.is_file():
        value = _read_json(legacy_json)
        if not isinstance(value, dict) or not isinstance(value.get("chat_template"), str):
            raise TokenizerError(f'{legacy_json}: expected an object with a string "chat_template"')
        templates = {"default": value["chat_template"]}
    return templates


def _assistant_mask(encoding, num_tokens: int, spans: Sequence[tuple[int, int]]) -> list[int]:
    """Token mask of the generation spans, computed exactly as transformers' `apply_chat_template` does.

    A span covers the tokens holding its first and last characters. If the first character has no
    token (e.g. it was truncated) the remaining spans are skipped; if the last one has none - or is
    token 0, a quirk of transformers' truthiness test - the span runs to the end of the sequence.
    """
    mask = [0] * num_tokens
    for start_char, end_char in spans:
        start = encoding.char_to_token(start_char)
        end = encoding.char_to_token(end_char - 1)
        if start is None:
            break
        for index in range(start, end + 1 if end else num_tokens):
            mask[index] = 1
    return mask


class Tokenizer:
    """A loaded tokenizer: encoding via `tokenizers`, chat templates via `jaxft.hf.chat_template`.

    Build it with `load_tokenizer`; the constructor takes already-validated parts.
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        special_tokens: Mapping[str, str],
        extra_special_tokens: Sequence[str],
        chat_templates: Mapping[str, str],
        config: Mapping[str, Any],
        sentencepiece_model: bytes | None = None,
    ):
        self._backend = backend
        self._special_tokens = dict(special_tokens)
        self._extra_special_tokens = list(extra_special_tokens)
        self.chat_templates: dict[str, str] = dict(chat_templates)
        self._config = dict(config)
        self._sentencepiece_model = sentencepiece_model

    # ----- special tokens -------------------------------------------------------------------------------------
    @property
    def special_tokens_map(self) -> dict[str, str]:
        """Named special tokens; chat templates see these as variables (`bos_token`, ...)."""
        return dict(self._special_tokens)

    def _token_id(self, name: str) -> int | None:
        token = self._special_tokens.get(name)
        return None if token is None else self._backend.token_to_id(token)  # always registered, see load_tokenizer

    bos_token = property(lambda self: self._special_tokens.get("bos_token"))
    eos_token = property(lambda self: self._special_tokens.get("eos_token"))
    pad_token = property(lambda self: self._special_tokens.get("pad_token"))
    unk_token = property(lambda self: self._special_tokens.get("unk_token"))
    bos_token_id = property(lambda self: self._token_id("bos_token"))
    eos_token_id = property(lambda self: self._token_id("eos_token"))
    pad_token_id = property(lambda self: self._token_id("pad_token"))
    unk_token_id = property(lambda self: self._token_id("unk_token"))

    @property
    def special_token_ids(self) -> frozenset[int]:
        """transformers' `all_special_ids` (named and extra special tokens) plus added tokens flagged special."""
        added = {i for i, token in self._backend.get_added_tokens_decoder().items() if token.special}
        listed = {self._backend.token_to_id(t) for t in [*self._special_tokens.values(), *self._extra_special_tokens]}
        return frozenset((added | listed) - {None})

    # ----- vocabulary -----------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (transformers' `len(tokenizer)`)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def get_vocab(self) -> dict[str, int]:
        """Token string -> id, added tokens included (transformers' `get_vocab`)."""
        return self._backend.get_vocab(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | None | list[int | None]:
        """Token string(s) to id(s); unknown tokens map to the unk id (None without an unk token)."""
        if isinstance(tokens, str):
            token_id = self._backend.token_to_id(tokens)
            return token_id if token_id is not None else self.unk_token_id
        return [self.convert_tokens_to_ids(token) for token in tokens]

    # ----- encoding -------------------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Encode many texts in parallel (the Rust batch API releases the GIL)."""
        encodings = self._backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [encoding.ids for encoding in encodings]

    def encode_with_offsets(
        self, text: str, add_special_tokens: bool = False
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and each token's `[start, end)` character offsets in `text`, for turning char spans into masks.

        Special tokens added by the post-processor get `(0, 0)`; byte-level tokens that split a
        character share that character's offsets.
        """
        encoding = self._backend.encode(text, add_special_tokens=add_special_tokens)
        return encoding.ids, list(encoding.offsets)

    def encode_windows(
        self,
        text: str | Sequence[str],
        pair: str | Sequence[str] | None = None,
        *,
        is_pretokenized: bool = False,
        max_length: int | None = None,
        stride: int = 0,
        strategy: str = "longest_first",
        direction: str = "right",
    ) -> list[Encoding]:
        """transformers' `tokenizer(text, pair, is_split_into_words=is_pretokenized, truncation=strategy,
        max_length=..., stride=..., return_overflowing_tokens=True)` (`truncation_side=direction`), with special
        tokens, as the backend's `Encoding`s (ids, offsets, `word_ids`, `sequence_ids`): the encoding, then its
        overflowing windows. No truncation when `max_length` is None.

        `tokenizers` panics (not a Python error) when `stride` is not below the room the truncated sequence
        gets; callers check that first (`num_special_tokens_to_add`).
        """
        if max_length is not None:
            self._backend.enable_truncation(max_length, stride=stride, strategy=strategy, direction=direction)
        try:
            encoding = self._backend.encode(text, pair, is_pretokenized=is_pretokenized, add_special_tokens=True)
        finally:
            self._backend.no_truncation()  # the backend is shared: leave it as load_tokenizer set it
        return [encoding, *encoding.overflowing]

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        """How many special tokens the post-processor adds to one text (or a pair), as in transformers."""
        return self._backend.num_special_tokens_to_add(pair)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ----- chat templates -------------------------------------------------------------------------------------
    @property
    def chat_template(self) -> str | None:
        """The default chat template, if any (named ones are in `chat_templates`)."""
        return self.chat_templates.get("default")

    def get_chat_template(self, chat_template: str | None = None, tools: list | None = None) -> str:
        """Resolve a template name, template source or `None` (the default) to template source.

        As in transformers, `tools` selects a "tool_use" template when one exists. Unlike transformers,
        an unknown *name* (a string without Jinja syntax) is an error instead of being rendered as text.
        """
        if chat_template is None:
            if tools is not None and "tool_use" in self.chat_templates:
                return self.chat_templates["tool_use"]
            if "default" in self.chat_templates:
                return self.chat_templates["default"]
            if self.chat_templates:
                raise TokenizerError(
                    "This tokenizer has several chat templates and no default; pass one of "
                    f"{sorted(self.chat_templates)} as chat_template="
                )
            raise TokenizerError(
                "This tokenizer has no chat template (no chat_template.jinja, additional_chat_templates/, "
                "chat_template.json or tokenizer_config.json 'chat_template'); pass chat_template="
            )
        if chat_template in self.chat_templates:
            return self.chat_templates[chat_template]
        if _TEMPLATE_NAME.fullmatch(chat_template):
            raise TokenizerError(
                f"No chat template named {chat_template!r}; available: {sorted(self.chat_templates) or 'none'}"
            )
        return chat_template

    def _render(self, template: str, messages: list[dict], **kwargs: Any) -> chat_template_lib.RenderedChat:
        if not messages:
            raise TokenizerError("Cannot apply a chat template to an empty conversation.")
        return chat_template_lib.render(template, messages, special_tokens=self._special_tokens, **kwargs)

    def render_chat(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool = False,
        chat_template: str | None = None,
        tools: list[dict] | None = None,
        **template_kwargs: Any,
    ) -> chat_template_lib.RenderedChat:
        """Render with this tokenizer's template and special tokens; returns text and generation spans."""
        template = self.get_chat_template(chat_template, tools)
        return self._render(
            template, messages, add_generation_prompt=add_generation_prompt, tools=tools, **template_kwargs
        )

    def apply_chat_template(
        self,
        messages: list[dict],
        tokenize: bool = True,
        add_generation_prompt: bool = False,
        chat_template: str | None = None,
        tools: list[dict] | None = None,
        return_assistant_tokens_mask: bool = False,
        **template_kwargs: Any,
    ) -> str | list[int] | dict[str, list[int]]:
        """Same results as transformers' `apply_chat_template` for these arguments (single conversation).

        The rendered text is encoded with `add_special_tokens=False`: templates write BOS themselves.
        With `return_assistant_tokens_mask=True` returns `{"input_ids", "assistant_masks"}`, where the
        mask marks tokens inside the template's `{% generation %}` blocks.
        """
        if return_assistant_tokens_mask and not tokenize:
            raise ValueError("return_assistant_tokens_mask=True requires tokenize=True")
        template = self.get_chat_template(chat_template, tools)
        if return_assistant_tokens_mask and not chat_template_lib.has_generation_blocks(template):
            warnings.warn("return_assistant_tokens_mask=True but the chat template has no {% generation %} block")
        text, spans = self._render(
            template, messages, add_generation_prompt=add_generation_prompt, tools=tools, **template_kwargs
        )
        if not tokenize:
            return text
        encoding = self._backend.encode(text, add_special_tokens=False)
        if not return_assistant_tokens_mask:
            return encoding.ids
        return {"input_ids": encoding.ids, "assistant_masks": _assistant_mask(encoding, len(encoding.ids), spans)}

    # ----- saving ---------------------------------------------------------------------------------------------
    def _saved_config(self) -> dict:
        """tokenizer_config.json contents: the loaded config with current tokens; templates go to .jinja files."""
        config = {key: value for key, value in self._config.items() if key != "chat_template"}
        config.update(self._special_tokens)
        if self._extra_special_tokens:
            config.pop("additional_special_tokens", None)
            config["extra_special_tokens"] = list(self._extra_special_tokens)
        config["added_tokens_decoder"] = {
            str(index): {field: getattr(token, field) for field in _ADDED_TOKEN_FIELDS}
            for index, token in sorted(self._backend.get_added_tokens_decoder().items())
        }
        default_class = "LlamaTokenizer" if self._sentencepiece_model is not None else "TokenizersBackend"
        config.setdefault("tokenizer_class", default_class)
        return config

    def _save_chat_templates(self, out: Path) -> None:
        for name, template in self.chat_templates.items():
            if name == "default":
                (out / CHAT_TEMPLATE_FILE).write_text(template, encoding="utf-8")
                continue
            if not _TEMPLATE_NAME.fullmatch(name):
                raise TokenizerError(f"Chat template name {name!r} is not usable as a file name")
            (out / CHAT_TEMPLATE_DIR).mkdir(exist_ok=True)
            (out / CHAT_TEMPLATE_DIR / f"{name}.jinja").write_text(template, encoding="utf-8")

    def save(self, out_dir: str | Path) -> Path:
        """Write the tokenizer so that both `load_tokenizer` and `AutoTokenizer.from_pretrained` reload it.

        A sentencepiece tokenizer is saved as its original `tokenizer.model` (transformers converts it
        again on load); others as `tokenizer.json`. Templates use transformers 5's file layout.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self._sentencepiece_model is not None:
            (out / SENTENCEPIECE_MODEL).write_bytes(self._sentencepiece_model)
        else:
            (out / TOKENIZER_JSON).write_text(self._backend.to_str(), encoding="utf-8")
        config_text = json.dumps(self._saved_config(), indent=2, ensure_ascii=False)
        (out / TOKENIZER_CONFIG).write_text(config_text + "\n", encoding="utf-8")
        if (out / CHAT_TEMPLATE_DIR).is_dir():
            shutil.rmtree(out / CHAT_TEMPLATE_DIR)  # stale named templates would otherwise be picked up on load
        self._save_chat_templates(out)
        return out


def tokenizer_folder(model: str | Path, adapter: str | Path | None = None) -> str | Path:
    """The folder to load a model-with-adapter's tokenizer from: an adapter saved with its tokenizer (a run's export
    is) wins over the model's, since fine-tuning may have added tokens."""
    return adapter if adapter and (Path(adapter) / TOKENIZER_CONFIG).exists() else model


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a Hugging Face tokenizer folder (`tokenizer.json` preferred, else sentencepiece `tokenizer.model`), or
    the tokenizer a GGUF file's metadata describes (`*.gguf`, `jaxft.gguf.tokenizer`).

    Raises:
        TokenizerError: the folder or its tokenizer files are missing, or a file is malformed.
        jaxft.gguf.layout.GgufError: a GGUF file's tokenizer metadata is missing or of a kind jaxft does not read.
    """
    from jaxft.gguf.read import is_gguf

    if is_gguf(path):
        from jaxft.gguf.tokenizer import tokenizer_from_gguf

        return tokenizer_from_gguf(path)
    folder = Path(path)
    if not folder.is_dir():
        raise TokenizerError(f"{folder}: tokenizer folder does not exist")
    config = _read_optional_json_object(folder / TOKENIZER_CONFIG)
    special_tokens_map = _read_optional_json_object(folder / SPECIAL_TOKENS_MAP)
    sentencepiece_model = None
    if (folder / TOKENIZER_JSON).is_file():
        try:
            backend = BackendTokenizer.from_file(str(folder / TOKENIZER_JSON))
        except Exception as err:  # tokenizers raises a bare Exception for malformed files
            raise TokenizerError(f"{folder / TOKENIZER_JSON}: cannot be loaded ({err})") from err
        spm_tokens: list[AddedToken] = []
        defaults = {}
    elif (folder / SENTENCEPIECE_MODEL).is_file():
        try:
            backend, spm_tokens = sentencepiece_conversion.convert(folder / SENTENCEPIECE_MODEL, config)
        except ValueError as err:
            raise TokenizerError(str(err)) from err
        sentencepiece_model = (folder / SENTENCEPIECE_MODEL).read_bytes()
        defaults = sentencepiece_conversion.DEFAULT_TOKENS
    else:
        raise TokenizerError(f"{folder}: no {TOKENIZER_JSON} or {SENTENCEPIECE_MODEL} found")
    # transformers' encode() neither pads nor truncates unless asked, whatever tokenizer.json says.
    padding = backend.padding
    backend.no_padding()
    backend.no_truncation()
    named = _named_special_tokens(config, special_tokens_map, defaults)
    if padding is not None:
        named.setdefault("pad_token", padding["pad_token"])
    # Like transformers, the sentencepiece model's control/user-defined pieces are the extra special
    # tokens unless the config lists its own.
    extra = [_special_added_token(content) for content in _extra_special_tokens(config)] or spm_tokens
    _register_added_tokens(backend, config, [*map(_special_added_token, named.values()), *extra])
    if sentencepiece_model is not None:
        backend.post_processor = sentencepiece_conversion.bos_eos_post_processor(backend, config, named)
    return Tokenizer(
        backend,
        special_tokens=named,
        extra_special_tokens=[token.content for token in extra],
        chat_templates=_load_chat_templates(folder, config),
        config=config,
        sentencepiece_model=sentencepiece_model,
    )
