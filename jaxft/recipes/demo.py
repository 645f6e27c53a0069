"""The offline end-to-end demo: pretrain a tiny base, quantize it to NF4, QLoRA fine-tune it on a chat task.

The task has answers that can be checked exactly: the user says ``increment 3 1 9 4`` and the assistant must
add one to every digit, modulo 10: ``4 2 0 5``. The base model is pretrained briefly on the same skill in a raw
text form (``increment 3 1 9 4 =\n4 2 0 5 .``), with a word-level tokenizer trained on that corpus, so what fine-tuning has to
teach is the chat format (ChatML turns with an end-of-turn token). Before fine-tuning the base cannot follow
the chat; after QLoRA it must. Held-out problems are disjoint from training problems (checked).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxft.config import ModelConfig
from jaxft.data.chat import CHATML_TEMPLATE, IGNORE_INDEX
from jaxft.data.config import DataConfig
from jaxft.files import atomic_dir, cache_root
from jaxft.hf.checkpoint import from_pretrained, to_hf_tensors, write_pretrained
from jaxft.hf.peft_format import load_adapter
from jaxft.hf.tokenizer import load_tokenizer
from jaxft.models.generate import generate
from jaxft.models.llama import init_params
from jaxft.peft.lora import LoraConfig
from jaxft.peft.prefix import prompt_inputs
from jaxft.peft.tree import split
from jaxft.recipes import sft
from jaxft.recipes.config import RunConfig, TrainConfig
from jaxft.recipes.scoring import data_metrics
from jaxft.train.loop import StepConfig, init_state, jit_train_step
from jaxft.train.objectives import CausalLM
from jaxft.train.optim import OptimConfig

SPECIAL = ["<pad>", "<|im_start|>", "<|im_end|>", "[UNK]"]
BASE_VERSION = "increment-v2"


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo; ``quick()`` uses fewer training and held-out problems (for the test suite)."""

    min_len: int = 4
    max_len: int = 4
    pretrain_steps: int = 400
    finetune_steps: int = 300
    n_train: int = 4000
    n_eval: int = 200
    batch_size: int = 32
    seed: int = 0

    @classmethod
    def quick(cls) -> "DemoConfig":
        return cls(n_train=1000, n_eval=50)


def model_config(vocab_size: int) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       bos_token_id=None, eos_token_ids=(SPECIAL.index("<|im_end|>"),), pad_token_id=0)


def problems(rng: np.random.Generator, n: int, cfg: DemoConfig, exclude=frozenset()) -> list[tuple[int, ...]]:
    """``n`` distinct digit lists not in ``exclude``."""
    out, seen = [], set(exclude)
    while len(out) < n:
        p = tuple(int(d) for d in rng.integers(0, 10, rng.integers(cfg.min_len, cfg.max_len + 1)))
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def words(digits) -> str:
    return " ".join(map(str, digits))


def answer(digits) -> tuple[int, ...]:
    return tuple((d + 1) % 10 for d in digits)


def raw_text(p) -> str:
    """The pretraining form; the answer starts a line, as it does after a chat turn header."""
    return f"increment {words(p)} =\n{words(answer(p))} ."


def chat(p) -> list[dict]:
    return [{"role": "user", "content": f"increment {words(p)}"},
            {"role": "assistant", "content": words(answer(p))}]


def build_tokenizer(folder: Path, corpus: list[str]):
    """A word-level tokenizer trained on the corpus, saved as tokenizer.json + tokenizer_config.json.

    Byte-level pre-tokenization keeps whitespace inside tokens (``Ġ3``, ``Ċ``), so every character of a chat
    belongs to a token and assistant spans map onto tokens exactly.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL)
    chat_words = ["user\nincrement 0 1 2 3 4 5 6 7 8 9", "assistant\n0 1 2 3 4 5 6 7 8 9", "system\n"]
    tok.train_from_iterator(corpus + chat_words, trainer)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "eos_token": "<|im_end|>",
              "unk_token": "[UNK]", "chat_template": CHATML_TEMPLATE, "model_max_length": 128}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def _pretrain_batches(tokenizer, rng, cfg: DemoConfig, row: int = 33):
    """Endless [1, B, row] batches of packed raw-text increment lines (plain next-token loss)."""
    while True:
        ids = np.zeros((cfg.batch_size, row), np.int32)
        for r in range(cfg.batch_size):
            stream: list[int] = []
            while len(stream) < row + 1:
                p = problems(rng, 1, cfg)[0]
                stream += tokenizer.encode(raw_text(p), add_special_tokens=False)
            ids[r] = stream[:row]
        labels = np.concatenate([ids[:, 1:], np.full((cfg.batch_size, 1), IGNORE_INDEX, np.int32)], axis=1)
        yield {"input_ids": jnp.asarray(ids[None]), "labels": jnp.asarray(labels[None])}


def build_base(folder: Path, cfg: DemoConfig, log=print) -> Path:
    """Pretrain the tiny base (full fine-tuning from random init) and save it as a HF folder."""
    with atomic_dir(folder, overwrite=True) as tmp:
        rng = np.random.default_rng(cfg.seed)
        corpus = [raw_text(p) for p in problems(rng, 2000, cfg)]
        build_tokenizer(tmp, corpus)
        tokenizer = load_tokenizer(tmp)
        model_cfg = model_config(len(tokenizer))
        params = init_params(model_cfg, jax.random.PRNGKey(cfg.seed))
        trainable, frozen = split(params, lambda path, leaf: True)
        schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 20, cfg.pretrain_steps, 1e-3)
        optimizer = optax.adam(schedule)
        state = init_state(trainable, optimizer, cfg.seed)
        step = jit_train_step(model_cfg, StepConfig(objective=CausalLM(chunk_size=0)), optimizer)
        batches = _pretrain_batches(tokenizer, rng, cfg)
        start = time.perf_counter()
        for i in range(1, cfg.pretrain_steps + 1):
            state, metrics = step(state, frozen, next(batches))
            if i % 100 == 0 or i == cfg.pretrain_steps:
                log(f"  pretrain step {i:4d}/{cfg.pretrain_steps}  loss {float(metrics['loss']):.3f}  "
                    f"({time.perf_counter() - start:.0f} s)")
        params = jax.device_get(state["trainable"])
        write_pretrained(model_cfg, to_hf_tensors(model_cfg, params), tmp)
    return folder


def greedy_replies(model_cfg, params, tokenizer, problems: list[tuple[int, ...]]) -> list[tuple[str, bool]]:
    """(text, finished) of the greedy reply to each problem: the text up to the end-of-turn token, and whether the
    reply reached that token within the answer's budget of new tokens."""
    prompts = [tokenizer.apply_chat_template(chat(p)[:1], add_generation_prompt=True) for p in problems]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    params, hooks = prompt_inputs(model_cfg, params)  # a prompt-style method's prefix, if the params hold one
    outputs = generate(model_cfg, params, prompts, max_new_tokens=10, stop_token_ids=[end], hooks=hooks)
    return [(tokenizer.decode([t for t in out if t != end]).strip(), bool(out) and out[-1] == end) for out in outputs]


def exact_match(model_cfg, params, tokenizer, test: list[tuple[int, ...]]) -> tuple[float, list[str]]:
    """Share of problems whose greedy answer (up to the end-of-turn token) is exactly right."""
    hits, samples = 0, []
    for p, (text, finished) in zip(test, greedy_replies(model_cfg, params, tokenizer, test)):
        ok = finished and text == words(answer(p))
        hits += ok
        samples.append(f"increment {words(p)}  ->  {text!r}  {'ok' if ok else 'WRONG'}")
    return hits / len(test), samples


def write_jsonl(path: Path, rows: list[dict]):
    path.write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))


def base_dir(cfg: DemoConfig = DemoConfig()) -> Path:
    """Where the demo's pretrained base is cached (built by :func:`build_base` on first use)."""
    return cache_root() / f"demo-base-{BASE_VERSION}-{cfg.pretrain_steps}-{cfg.seed}"


def held_out_split(cfg: DemoConfig) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """(held-out problems, training problems) of the demo, disjoint."""
    rng = np.random.default_rng(cfg.seed + 1)
    test = problems(rng, cfg.n_eval, cfg)
    train = problems(rng, cfg.n_train, cfg, exclude=frozenset(test))
    assert not set(test) & set(train), "held-out problems must not appear in training"
    return test, train


def run(out_dir: Path, cfg: DemoConfig = DemoConfig(), log=print, overwrite: bool = False) -> dict:
    """The whole demo; returns before/after metrics and the output paths."""
    t0 = time.perf_counter()
    base = base_dir(cfg)
    if not (base / "config.json").exists():
        log(f"[1/4] pretraining a tiny Llama-style base on generated text (cached at {base})")
        build_base(base, cfg, log)
    else:
        log(f"[1/4] using the cached base model at {base}")
    tokenizer = load_tokenizer(base)

    test, train = held_out_split(cfg)
    data_dir = Path(out_dir) / "data"
    data_dir.mkdir(parents=True, exist_ok=overwrite)
    write_jsonl(data_dir / "train.jsonl", [chat(p) for p in train])
    write_jsonl(data_dir / "eval.jsonl", [chat(p) for p in test])

    log("[2/4] loading the base with NF4 (4-bit, double-quant) linear layers; scoring it on held-out problems")
    model_cfg, nf4_params = from_pretrained(base, quant="nf4")
    before, _ = exact_match(model_cfg, nf4_params, tokenizer, test)
    eval_data = DataConfig(paths=(str(data_dir / "eval.jsonl"),), max_length=64, batch_size=cfg.batch_size,
                           seed=cfg.seed)
    loss_before = data_metrics(model_cfg, nf4_params, tokenizer, eval_data)["loss"]

    log(f"[3/4] QLoRA fine-tuning for {cfg.finetune_steps} steps")
    run_cfg = RunConfig(
        model=str(base), output_dir=str(Path(out_dir) / "run"), method="qlora",
        data=eval_data.replace(paths=(str(data_dir / "train.jsonl"),)), eval_data=eval_data,
        lora=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
        optim=OptimConfig(lr=3e-3, schedule="cosine", warmup_steps=10, total_steps=cfg.finetune_steps,
                          min_lr_ratio=0.1, max_grad_norm=1.0),
        train=TrainConfig(steps=cfg.finetune_steps, log_every=10, eval_batches=2, loss_chunk_size=0))
    summary = sft.run(run_cfg, overwrite=overwrite)

    log("[4/4] scoring the fine-tuned model on the same held-out problems")
    params = load_adapter(summary["export"], nf4_params)
    after, samples = exact_match(model_cfg, params, tokenizer, test)
    (Path(out_dir) / "samples.txt").write_text("\n".join(samples) + "\n")
    loss_after = data_metrics(model_cfg, params, tokenizer, eval_data)["loss"]
    result = {"before_exact_match": before, "after_exact_match": after, "n_eval": len(test),
              "eval_loss_before": loss_before, "eval_loss": loss_after, "adapter": summary["export"],
              "curves": str(Path(run_cfg.output_dir) / "curves.png"), "samples": str(Path(out_dir) / "samples.txt"),
              "seconds": time.perf_counter() - t0}
    (Path(out_dir) / "demo.json").write_text(json.dumps(result, indent=2))
    return result


def table(result: dict) -> str:
    return "\n".join([
        "| | exact match (greedy, held-out) |",
        "|---|---|",
        f"| base (NF4), before QLoRA | {100 * result['before_exact_match']:.1f}% of {result['n_eval']} |",
        f"| after QLoRA | {100 * result['after_exact_match']:.1f}% of {result['n_eval']} |",
        "",
        f"eval loss (assistant tokens of the held-out chats): {result['eval_loss_before']:.4f} before, "
        f"{result['eval_loss']:.4f} after",
        f"adapter (PEFT format): {result['adapter']}",
        f"loss curves: {result['curves']}",
        f"sample generations: {result['samples']}",
        f"total time: {result['seconds']:.0f} s",
    ])
