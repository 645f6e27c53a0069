"""Examples -> token ids and shifted labels, with assistant-only loss masks.

**Label convention** (the training loss relies on it): `labels[t]` is the target of the logit at position `t`,
i.e. labels are already shifted: `labels[t] = input_ids[t + 1]` when token `t + 1` carries loss, else -100.
The last token of every example has label -100, so once examples are packed into one row, the first token of
a document is never the target of the previous document's last token. The loss is plain
`cross_entropy(logits[:, t], labels[:, t])` over `labels != -100`, with no shift in the loss.

**Which tokens carry loss.** For chats, assistant turns including their end-of-turn token (`<|eot_id|>`,
`<|im_end|>`, `</s>`). The character spans of assistant turns come from the template's `{% generation %}`
blocks when it has them, else from prefix differences: the text of `messages[:k]` rendered with the generation
prompt, versus `messages[:k + 1]`. That only works when appending turns never changes how earlier turns render,
which is checked for every example. Spans become token masks exactly as transformers'
`apply_chat_template(return_assistant_tokens_mask=True)` computes them, and the ids are those of
`apply_chat_template(tokenize=True)`: the rendered text encoded without adding special tokens, since templates
write BOS themselves.

Loss strategies: `all_assistant` (every assistant turn), `last_assistant` (the final one only), and
`per_assistant_turn` (one sample per assistant turn, holding the conversation up to that turn, loss on it).
"""
from __future__ import annotations

import contextlib
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import jinja2
import numpy as np

from jaxft.config import ConfigError
from jaxft.data.config import LOSS_STRATEGIES, TRUNCATION
from jaxft.data.formats import DataError, DataReport, Example
from jaxft.hf import chat_template as chat_template_lib

IGNORE_INDEX = -100  # the label of a position without a target, as in PyTorch and Hugging Face
CHAT_TEMPLATE_FILE = "chat_template.jinja"
_PROBE = "JAXFT-PROBE-7f3a"  # assistant content that no template writes itself: what precedes it is the header

# Built-in templates for tokenizers without one. Assistant output (with its end-of-turn token) sits in
# {% generation %} blocks, so masks never depend on prefix rendering.
LLAMA3_TEMPLATE = (
    "{% for message in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endgeneration %}{% else %}{{ '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{% set system = messages[0]['content'] + '\n\n' if loop.index0 == 1 and messages[0]['role'] == 'system' else '' %}"
    "{{ '[INST] ' + system + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{% generation %}{{ ' ' + message['content'] + eos_token }}"
    "{% endgeneration %}"
    "{% elif not (message['role'] == 'system' and loop.first) %}"
    "{{ raise_exception('The Mistral [INST] template supports user/assistant turns after one optional system message') }}"
    "{% endif %}{% endfor %}"
)
ALPACA_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% if messages[0]['role'] != 'system' %}{{ 'Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{% if loop.index0 > 0 and messages[loop.index0 - 1]['role'] == 'assistant' %}"
    "{{ '\n\n' }}{% endif %}{{ '### Instruction:\n' + message['content'] + '\n\n### Response:\n' }}"
    "{% elif message['role'] == 'assistant' %}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% endif %}{% endfor %}"
)
BUILTIN_TEMPLATES = {"llama3": LLAMA3_TEMPLATE, "chatml": CHATML_TEMPLATE, "qwen": CHATML_TEMPLATE,
                     "mistral": MISTRAL_TEMPLATE, "alpaca": ALPACA_TEMPLATE}


@dataclass(frozen=True, eq=False)
class Sample:
    """One tokenized training document: `input_ids` and shifted `labels` (int32, same length), and its source.

    `extras`: task data's further per-token arrays (first axis = the tokens; `jaxft.data.tasks`), laid out as
    `[B, T, ...]` batch arrays by `rows_to_batch`. SFT samples have none.
    `documents`: the lengths of the documents a sample is made of, when it is several that must share a row (a
    preference pair: prompt + chosen, then prompt + rejected); each gets its own segment id and positions from 0.
    None: the sample is one document.
    """

    input_ids: np.ndarray
    labels: np.ndarray
    source: str
    extras: dict[str, np.ndarray] | None = None
    documents: tuple[int, ...] | None = None


class TemplateError(ConfigError):
    """A chat-template setting is wrong or missing. The message names the setting as the command at hand spells
    it: ``data.template`` in a run config, ``--template`` for ``jaxft eval`` (:meth:`naming`)."""

    def __init__(self, message: str, setting: str = "data.template"):
        self.unnamed = message  # "{setting}" marks where the setting's name goes
        super().__init__(message.replace("{setting}", setting))

    def naming(self, setting: str) -> "TemplateError":
        return TemplateError(self.unnamed, setting)


def resolve_template(tokenizer, template: str | None) -> str:
    """Template source for `template`: None (the tokenizer's own), a built-in name, a `.jinja` path, or source."""
    if template is None:
        if tokenizer.chat_template is None:
            raise TemplateError("The tokenizer has no chat template; give {setting}: one of "
                                f"{sorted(BUILTIN_TEMPLATES)}, a .jinja file, or Jinja source")
        return tokenizer.chat_template
    if template in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[template]
    if template.endswith(".jinja"):
        path = Path(template)
        if not path.is_file():
            raise TemplateError(f"{{setting}} {template!r}: no such .jinja file")
        return path.read_text(encoding="utf-8")
    if "{" in template:
        return template
    if template in tokenizer.chat_templates:
        return tokenizer.chat_templates[template]
    raise TemplateError(f"{{setting}} {template!r} is not a built-in ({sorted(BUILTIN_TEMPLATES)}), a .jinja path, "
                        f"Jinja source, or one of the tokenizer's templates ({sorted(tokenizer.chat_templates)})")


def save_chat_template(template: str, out_dir: str | Path) -> Path:
    """Write the template a run trained with as `chat_template.jinja`, where transformers and
    `jaxft.hf.tokenizer.load_tokenizer` look for it, so the exported adapter chats the way it was trained."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / CHAT_TEMPLATE_FILE
    path.write_text(template, encoding="utf-8")
    return path


def check_token_ids(samples: Sequence[Sample], vocab_size: int, tokenizer) -> None:
    """DataError naming a sample that holds a token id the model has no embedding row for (id >= vocab_size).

    A tokenizer larger than the model's ``vocab_size`` (added tokens, another model's tokenizer) gives such ids;
    JAX's embedding gather then reads NaN, and training goes on with a NaN loss. Not a bad record but a
    tokenizer/model mismatch, so ``skip_bad_records`` does not drop it. One max per sample: O(tokens).
    """
    highest = [int(s.input_ids.max()) if len(s.input_ids) else -1 for s in samples]
    if not highest or max(highest) < vocab_size:
        return
    worst = int(np.argmax(highest))
    n_bad = sum(h >= vocab_size for h in highest)
    raise token_id_error(samples[worst].source, highest[worst], vocab_size, tokenizer,
                         f"{n_bad} of {len(samples)} samples hold such ids")


def token_id_error(location: str, token_id: int, vocab_size: int, tokenizer, extent: str) -> DataError:
    """The DataError for a token id the model has no embedding row for, found at ``location``; ``extent`` says how
    much of the data holds such ids."""
    return DataError(location, "token id beyond the model's vocabulary",
                     f"token id {token_id} ({tokenizer.decode([token_id])!r}) has no embedding row: "
                     f"the model's config.json says vocab_size {vocab_size} (ids 0..{vocab_size - 1}) while the "
                     f"tokenizer has {len(tokenizer)} tokens; {extent}. "
                     "Use the model's own tokenizer, or resize the embeddings to the tokenizer first (transformers: "
                     "model.resize_token_embeddings(len(tokenizer)); model.save_pretrained(folder)) and use "
                     "that folder as the model")


def checked_pad_id(tokenizer, vocab_size: int | None) -> int:
    """The id batches pad with (the tokenizer's pad token, else 0); a DataError when the model has no embedding
    row for it, since padding would then embed as NaN."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if vocab_size is not None and pad_id >= vocab_size:
        raise DataError(f"the tokenizer's pad token {tokenizer.pad_token!r}", "pad id beyond the model's vocabulary",
                        f"id {pad_id} has no embedding row (the model's config.json says vocab_size {vocab_size}); "
                        "padding would embed as NaN. Use the model's own tokenizer, or resize the embeddings to "
                        "the tokenizer first (transformers: model.resize_token_embeddings(len(tokenizer)))")
    return pad_id


# ----- spans -------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _template_errors():
    """A template's syntax error or its own ``raise_exception(...)`` as a TemplateError naming the setting."""
    try:
        yield
    except jinja2.TemplateError as e:
        raise TemplateError(f"the chat template of {{setting}} failed: {type(e).__name__}: {e}. Fix the template "
                            "or give another one with {setting}") from None


class _Renderer:
    """Renders conversations with one template and the tokenizer's special tokens; finds assistant spans."""

    def __init__(self, tokenizer, template: str):
        self.template = template
        self.special_tokens = tokenizer.special_tokens_map
        with _template_errors():
            self.marked = chat_template_lib.has_generation_blocks(template)

    def render(self, messages, tools, add_generation_prompt=False):
        with _template_errors():
            return chat_template_lib.render(self.template, messages, add_generation_prompt=add_generation_prompt,
                                            tools=tools, special_tokens=self.special_tokens)

    def check_generation_prompt(self, examples: Sequence[Example]) -> None:
        """DataError when an unmarked template ignores ``add_generation_prompt`` yet writes a role header before
        assistant content.

        Prefix spans start where ``messages[:k]`` rendered with the generation prompt ends. A template that
        ignores the flag renders nothing more there, so the span would begin with the header it writes for the
        assistant turn (``<|im_start|>assistant\n``) and the header would silently become a training target.
        Refused rather than masked: the same template renders prompts for generation without that header, so a
        model trained with it masked would be prompted in a state it never saw, while transformers and TRL
        compute assistant masks only from ``{% generation %}`` markers. Templates that write no header (Mistral's
        ``[INST] ... [/INST]`` answer follows directly) need no generation prompt and pass. Checked once, on the
        first example with an assistant turn after other turns: it is a property of the template, so
        ``skip_bad_records`` does not apply.
        """
        example = next((e for e in examples if any(m["role"] == "assistant" for m in e.messages[1:])), None)
        if self.marked or example is None:
            return
        messages, tools = example.messages, example.tools
        k = next(k for k, m in enumerate(messages) if k and m["role"] == "assistant")
        plain = self.render(messages[:k], tools).text
        if self.render(messages[:k], tools, add_generation_prompt=True).text != plain:
            return  # the flag is honoured; the prefix checks of turn_spans cover the rest
        probe = self.render(messages[:k] + [{**messages[k], "content": _PROBE}], tools).text
        at = probe.find(_PROBE, len(plain))
        header = probe[len(plain):at] if at >= 0 and probe.startswith(plain) else ""
        if header.strip():
            raise DataError(example.source, "template ignores add_generation_prompt",
                            f"messages[:{k}] render the same with and without add_generation_prompt, yet the "
                            f"assistant turn after them starts with {header!r} before its content, so that role "
                            "header would be trained on as assistant output (and prompts rendered for generation "
                            "would lack it). Make the template write it when add_generation_prompt is true (end it "
                            f"with {{% if add_generation_prompt %}}{{{{ {header!r} }}}}{{% endif %}}), or mark "
                            "assistant output with {% generation %}...{% endgeneration %}, or use a built-in "
                            f"template: data.template (jaxft eval: --template) one of {sorted(BUILTIN_TEMPLATES)}")

    def _checked_prefix(self, prefix: str, text: str, what: str, source: str) -> None:
        if text.startswith(prefix):
            return
        at = next((i for i, (a, b) in enumerate(zip(prefix, text)) if a != b), min(len(prefix), len(text)))
        raise DataError(source, "template rewrites history",
                        f"{what} is not a prefix of the longer conversation's rendering (first difference "
                        f"at character {at}: {prefix[at:at + 30]!r} vs {text[at:at + 30]!r}); the chat template "
                        "changes earlier turns (dates, dropped reasoning, moved system prompt), so assistant tokens "
                        "cannot be found from prefixes. Use a template with {% generation %} markers around "
                        "assistant output (data.template = a marked .jinja file or a built-in)")

    def turn_spans(self, messages: list[dict], tools, source: str,
                   last_only: bool = False) -> tuple[str, list[tuple[int, int]]]:
        """Rendered text and one span per assistant turn (per generation block, for marked templates).

        With `last_only`, an unmarked template renders and checks the prefixes of the last assistant turn only.
        """
        text, spans = self.render(messages, tools)
        if self.marked:
            return text, list(spans)
        turns = [k for k, message in enumerate(messages) if message["role"] == "assistant"]
        spans = []
        for k in turns[-1:] if last_only else turns:
            before = self.render(messages[:k], tools, add_generation_prompt=True).text if k else ""
            through = self.render(messages[: k + 1], tools).text
            self._checked_prefix(before, through, f"messages[:{k}] with the generation prompt", source)
            self._checked_prefix(through, text, f"messages[:{k + 1}]", source)
            spans.append((len(before), len(through)))
        return text, spans

    def units(self, example: Example, strategy: str) -> list[tuple[str, list[tuple[int, int]]]]:
        """The `(text, loss spans)` samples one conversation yields under `strategy`."""
        messages, tools = example.messages, example.tools
        if strategy == "all_assistant":
            return [self.turn_spans(messages, tools, example.source)]
        if strategy == "last_assistant":
            text, spans = self.turn_spans(messages, tools, example.source, last_only=True)
            return [(text, spans[-1:])]
        units = []
        for k, message in enumerate(messages):
            if message["role"] == "assistant":
                text, spans = self.turn_spans(messages[: k + 1], tools, example.source, last_only=True)
                units.append((text, spans[-1:]))
        return units


def spans_to_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """Token mask of character spans, as transformers computes `assistant_masks` from `char_to_token`.

    A span covers the tokens holding its first and last characters. When the first character has no token
    the remaining spans are skipped; when the last has none (or is token 0) the span runs to the end.
    """
    mask = np.zeros(len(offsets), dtype=bool)
    starts = [start for start, _ in offsets]
    ends = [end for _, end in offsets]

    def char_to_token(char: int) -> int | None:
        index = bisect_right(ends, char)
        return index if index < len(offsets) and starts[index] <= char else None

    for start_char, end_char in spans:
        start, end = char_to_token(start_char), char_to_token(end_char - 1)
        if start is None:
            break
        mask[start: end + 1 if end else len(offsets)] = True
    return mask


# ----- samples -----------------------------------------------------------------------------------------------------

def make_sample(ids, loss_mask: np.ndarray, source: str, max_length: int, truncation: str) -> Sample:
    """Truncate to `max_length` (`right`/`left`; anything else raises), then shift the labels.

    `labels[t] = ids[t + 1]` where token `t + 1` carries loss, else -100; the last label is always -100.
    """
    ids = np.asarray(ids, dtype=np.int32)
    if len(ids) > max_length:
        if truncation not in ("right", "left"):
            raise DataError(source, "over-length sample",
                            f"{len(ids)} tokens > max_length {max_length}; raise data.max_length or set "
                            "data.truncation to 'right', 'left' or 'drop'")
        keep = slice(None, max_length) if truncation == "right" else slice(len(ids) - max_length, None)
        ids, loss_mask = ids[keep], loss_mask[keep]
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int32)
    labels[:-1] = np.where(loss_mask[1:], ids[1:], IGNORE_INDEX)
    if not (labels != IGNORE_INDEX).any():
        raise DataError(source, "no loss tokens",
                        f"every label is -100 ({len(ids)} tokens, truncation={truncation!r}); the assistant "
                        "turns were truncated away or the template marks no assistant tokens")
    return Sample(ids, labels, source)


def _chat_items(examples, tokenizer, renderer: _Renderer, strategy, train_on_inputs):
    for example in examples:
        try:
            units = renderer.units(example, strategy)
        except DataError as err:
            yield example.source, err
            continue
        for text, spans in units:
            ids, offsets = tokenizer.encode_with_offsets(text, add_special_tokens=False)
            mask = np.ones(len(ids), bool) if train_on_inputs else spans_to_mask(offsets, spans)
            yield example.source, (ids, mask)


def _text_items(examples, tokenizer):
    eos = tokenizer.eos_token_id
    for example, ids in zip(examples, tokenizer.encode_batch([e.text for e in examples], add_special_tokens=True)):
        if eos is not None and (not ids or ids[-1] != eos):
            ids = ids + [eos]
        yield example.source, (ids, np.ones(len(ids), bool))


def _completion_items(examples, tokenizer, train_on_inputs):
    """Prompt encoded with special tokens (BOS), completion without, then EOS; loss on completion + EOS."""
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    prompts = tokenizer.encode_batch([e.prompt for e in examples], add_special_tokens=True)
    completions = tokenizer.encode_batch([e.completion for e in examples], add_special_tokens=False)
    for example, prompt, completion in zip(examples, prompts, completions):
        ids = prompt + completion + eos
        mask = np.ones(len(ids), bool)
        if not train_on_inputs:
            mask[: len(prompt)] = False
        yield example.source, (ids, mask)


def tokenize_examples(examples: Sequence[Example], tokenizer, template: str | None = None, *,
                      loss: str = "all_assistant", train_on_inputs: bool = False, max_length: int = 2048,
                      truncation: str = "right", skip_bad_records: bool = False,
                      report: DataReport | None = None) -> list[Sample]:
    """Tokenize, mask, truncate and shift every example (chats need `template` source, see `resolve_template`).

    Examples must all be of one kind (one file's worth). Bad examples (template rewriting history,
    over-length with `truncation="error"`, no loss tokens) raise `DataError` naming their source, or with
    `skip_bad_records` are dropped and counted in `report`. `truncation="drop"` always drops and counts.
    """
    if loss not in LOSS_STRATEGIES:
        raise ValueError(f"loss strategy {loss!r} is unknown; expected one of {LOSS_STRATEGIES}")
    if truncation not in TRUNCATION:
        raise ValueError(f"truncation {truncation!r} is unknown; expected one of {TRUNCATION}")
    report = report if report is not None else DataReport()
    if not examples:
        return []
    first = examples[0]
    if first.messages is not None:
        if template is None:
            raise ValueError("Chat examples need a chat template; pass template= (see resolve_template)")
        renderer = _Renderer(tokenizer, template)
        if not train_on_inputs:
            renderer.check_generation_prompt(examples)
        items = _chat_items(examples, tokenizer, renderer, loss, train_on_inputs)
    elif first.text is not None:
        items = _text_items(examples, tokenizer)
    else:
        items = _completion_items(examples, tokenizer, train_on_inputs)
    samples: list[Sample] = []
    for source, item in items:
        try:
            if isinstance(item, DataError):
                raise item
            ids, mask = item
            if truncation == "drop" and len(ids) > max_length:
                report.drop("over-length sample (dropped)", f"{source}: {len(ids)} tokens > max_length {max_length}")
                continue
            samples.append(make_sample(ids, mask, source, max_length, truncation))
        except DataError as err:
            if not skip_bad_records:
                raise
            report.drop_error(err)
    report.kept["tokenized samples"] += len(samples)
    return samples
