"""Tiny random transformers checkpoints for parity tests (torch/transformers are test-only oracles)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import transformers

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=1,
            eos_token_id=2, pad_token_id=0)
CONFIGS = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config}
MODELS = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
          "qwen2": transformers.Qwen2ForCausalLM}


# transformers' task-head classes by jaxft's head kind, e.g. ("qwen2", "qa") -> Qwen2ForQuestionAnswering
HEAD_CLASS_SUFFIXES = {"seq_cls": "ForSequenceClassification", "token_cls": "ForTokenClassification",
                       "qa": "ForQuestionAnswering"}
AUTO_HEAD_CLASSES = {"seq_cls": transformers.AutoModelForSequenceClassification,
                     "token_cls": transformers.AutoModelForTokenClassification,
                     "qa": transformers.AutoModelForQuestionAnswering}


def build(model_type: str = "llama", seed: int = 0, dtype=torch.float32, scale: float = 0.15, **overrides):
    """A random model whose every weight (norms and biases included) is non-trivial."""
    return _random(MODELS[model_type], model_type, seed, dtype, scale, **overrides)


def build_head(model_type: str, kind: str, seed: int = 0, dtype=torch.float32, scale: float = 0.15, **overrides):
    """A random task-head model (``kind``: seq_cls, token_cls, qa), every weight non-trivial as in :func:`build`;
    ``num_labels``, ``id2label``, ``problem_type`` etc. go to the config."""
    cls = getattr(transformers, MODELS[model_type].__name__.replace("ForCausalLM", HEAD_CLASS_SUFFIXES[kind]))
    return _random(cls, model_type, seed, dtype, scale, **overrides)


def _random(cls, model_type: str, seed: int, dtype, scale: float, **overrides):
    torch.manual_seed(seed)
    cfg = CONFIGS[model_type](**{**TINY, **overrides})
    cfg._attn_implementation = "eager"
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(scale * torch.randn_like(p))
    return model.to(dtype)


def save(model, folder, **kwargs):
    model.save_pretrained(folder, **kwargs)
    return folder


def torch_logits(model, ids: np.ndarray, **kwargs) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(ids)), **kwargs).logits
    return out.float().numpy()


def random_ids(shape, vocab=TINY["vocab_size"], seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab, size=shape)


def greedy_tokens(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding by a full forward pass per token, no cache: the oracle for PEFT's prompt-style methods,
    whose ``generate`` under transformers 5.25 drops (prefix tuning) or misplaces (prompt tuning) the virtual
    tokens after the first steps. ``model``'s logits end with the prompt's last token."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            seq.append(int(model(torch.as_tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]


def held_out_chats(model_dir, data_path, n: int) -> list[tuple[list[int], str, str]]:
    """(prompt ids, prompt text, reference) of the first ``n`` chats of a JSONL file, read straight from it, each
    prompt in the tokenizer's chat template with the generation prompt."""
    import jaxft
    from jaxft.data import resolve_template

    tokenizer = jaxft.load_tokenizer(model_dir)
    template = resolve_template(tokenizer, None)
    out = []
    for line in Path(data_path).read_text().splitlines()[:n]:
        messages = json.loads(line)["messages"]
        prompt = dict(messages=messages[:-1], add_generation_prompt=True, chat_template=template)
        out.append((tokenizer.apply_chat_template(**prompt), tokenizer.apply_chat_template(**prompt, tokenize=False),
                    messages[-1]["content"]))
    return out


def peft_greedy_replies(model_dir, adapter, prompts: list[list[int]], greedy) -> list[str]:
    """Greedy replies to ``prompts`` by transformers, through PEFT with ``adapter`` (None: the base alone);
    ``greedy(model, ids)`` gives the new tokens, which are cut after the first stop token and decoded without it."""
    import jaxft
    from peft import PeftModel

    tokenizer = jaxft.load_tokenizer(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager")
    stops = set(np.atleast_1d(model.config.eos_token_id).tolist()) | {tokenizer.eos_token_id}
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    replies = []
    for ids in prompts:
        tokens = greedy(model, ids)
        end = next((i for i, t in enumerate(tokens) if t in stops), len(tokens))
        replies.append(tokenizer.decode(tokens[:end], skip_special_tokens=True))
    return replies
