"""Benchmark: what each GGUF type does to a trained model's logits and perplexity (``jaxft export --gguf``).

A model with meaning to lose is trained here first, at the demo's size (``jaxft.recipes.demo.model_config``: 2
layers, hidden 64, intermediate 128, so every weight row divides into the quantized types' blocks): a byte-level
BPE tokenizer (Llama 3's split rule, 300 tokens) trained on the demo's ``increment 3 1 9 4 =`` lines, the model
pretrained on them in full, then a LoRA adapter (r=8, all linear layers) trained on the same problems written as
ChatML chats, and merged. Each type's file is read back by transformers' GGUF loader and scored on held-out chats
(problems disjoint from both training sets), against the merged model run by jaxft in float32: the largest logit
difference, ||delta|| / ||logits||, perplexity of the answer-and-template tokens and its change, argmax agreement,
file size. Random weights (the tests') would say little here: a trained model's perplexity is what a user loses.

    python scripts/bench_gguf.py                          # about 1-2 minutes on 2 CPU cores
    python scripts/bench_gguf.py --pretrain-steps 50 --lora-steps 20 --out /tmp/gguf.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_train import cpu_info, cpu_label  # scripts/ is on sys.path when a script in it runs

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(folder: Path, corpus: list[str]):
    """A Llama-3-style byte-level BPE (its split regex, no bos) with ChatML's special tokens and template."""
    import transformers
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from jaxft.data.chat import CHATML_TEMPLATE
    from jaxft.gguf.layout import PRE_TOKENIZERS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRE_TOKENIZERS["llama-bpe"].split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.model.ignore_merges = True  # Llama 3's split is llama.cpp's llama-bpe only with Llama 3's ignore_merges
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(folder)


def packed_batches(rows: list[list[int]], batch: int, length: int, rng: np.random.Generator):
    """Endless [1, batch, length] next-token batches cut from the documents concatenated in random order."""
    import jax.numpy as jnp

    while True:
        stream: list[int] = []
        while len(stream) < batch * (length + 1):
            stream += rows[rng.integers(len(rows))]
        ids = np.asarray(stream[:batch * (length + 1)], np.int32).reshape(batch, length + 1)
        yield {"input_ids": jnp.asarray(ids[None, :, :-1]), "labels": jnp.asarray(ids[None, :, 1:])}


def train(cfg, params, trainable_predicate, batches, steps: int, lr: float, label: str) -> dict:
    """``steps`` Adam steps (warmup, cosine decay) of the leaves ``trainable_predicate`` selects; the new params."""
    import jax
    import optax

    from jaxft.peft.tree import combine, split
    from jaxft.train.loop import StepConfig, init_state, jit_train_step
    from jaxft.train.objectives import CausalLM

    trainable, frozen = split(params, trainable_predicate)
    optimizer = optax.adam(optax.warmup_cosine_decay_schedule(0.0, lr, min(20, steps // 2), steps, lr / 10))
    state = init_state(trainable, optimizer)
    step = jit_train_step(cfg, StepConfig(objective=CausalLM(chunk_size=0)), optimizer)
    start = time.perf_counter()
    for i in range(1, steps + 1):
        state, metrics = step(state, frozen, next(batches))
        if i % 100 == 0 or i == steps:
            print(f"  {label} step {i}/{steps}  loss {float(metrics['loss']):.3f}  "
                  f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    return combine(jax.device_get(state["trainable"]), frozen)


def trained_model(folder: Path, pretrain_steps: int, lora_steps: int, seed: int = 0):
    """(cfg, merged params, tokenizer, held-out chat ids); the tokenizer is written to ``folder``."""
    import jax

    import jaxft
    from jaxft.recipes import demo

    dcfg = demo.DemoConfig(seed=seed)
    rng = np.random.default_rng(seed)
    test, train_problems = demo.held_out_split(dcfg)
    raw = [demo.raw_text(p) for p in train_problems]
    build_tokenizer(folder, raw + ["user assistant system"])
    tok = jaxft.load_tokenizer(folder)
    cfg = demo.model_config(tok.vocab_size).replace(bos_token_id=None, eos_token_ids=(tok.eos_token_id,),
                                                    pad_token_id=tok.pad_token_id)
    params = jaxft.init_params(cfg, jax.random.PRNGKey(seed))
    raw_rows = [tok.encode(t + "\n") for t in raw]
    params = train(cfg, params, lambda path, leaf: True, packed_batches(raw_rows, 32, 32, rng), pretrain_steps,
                   3e-3, "pretrain")
    lcfg = jaxft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    params = jaxft.lora.add(cfg, params, lcfg, jax.random.PRNGKey(seed + 1))
    chat_rows = [tok.apply_chat_template(demo.chat(p)) for p in train_problems]
    params = train(cfg, params, lcfg.trainable(cfg, params), packed_batches(chat_rows, 32, 32, rng), lora_steps,
                   3e-3, "lora")
    held_out = [tok.apply_chat_template(demo.chat(p)) for p in test]
    return cfg, jaxft.merge(params), tok, held_out


def nll_and_logits(logits_fn, rows: list[list[int]]) -> tuple[float, list[np.ndarray]]:
    """Mean next-token negative log-likelihood over every held-out row, and each row's logits. The rows run as one
    right-padded batch: a causal model's logits at a row's own positions do not see the padding after them."""
    width = max(map(len, rows))
    batch = np.asarray([row + [0] * (width - len(row)) for row in rows])
    logits = np.asarray(logits_fn(batch), np.float64)
    total, count, out = 0.0, 0, []
    for row, row_logits in zip(rows, logits):
        row_logits = row_logits[:len(row)]
        top = row_logits.max(-1, keepdims=True)
        logp = row_logits - top - np.log(np.exp(row_logits - top).sum(-1, keepdims=True))
        total -= logp[np.arange(len(row) - 1), row[1:]].sum()
        count += len(row) - 1
        out.append(row_logits)
    return total / count, out


def run(pretrain_steps: int, lora_steps: int, types=GGUF_TYPES) -> dict:
    import jaxft
    import torch
    import transformers
    from jaxft.gguf.write import save_gguf

    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        cfg, merged, tok, held_out = trained_model(Path(tmp) / "base", pretrain_steps, lora_steps)
        ref_nll, ref_logits = nll_and_logits(lambda ids: jaxft.forward(cfg, merged, ids), held_out)
        rows = []
        for gguf_type in types:
            path = save_gguf(cfg, merged, tok, Path(tmp) / f"model-{gguf_type}.gguf", gguf_type=gguf_type)
            model = transformers.AutoModelForCausalLM.from_pretrained(tmp, gguf_file=path.name,
                                                                      dtype=torch.float32).eval()
            with torch.no_grad():
                nll, logits = nll_and_logits(lambda ids: model(torch.as_tensor(ids)).logits.numpy(), held_out)
            delta = np.concatenate([(a - b).ravel() for a, b in zip(logits, ref_logits)])
            ref = np.concatenate([b.ravel() for b in ref_logits])
            agree = np.mean(np.concatenate([a.argmax(-1) == b.argmax(-1) for a, b in zip(logits, ref_logits)]))
            rows.append({"gguf_type": gguf_type, "file_bytes": path.stat().st_size,
                         "max_abs_logit_diff": float(np.abs(delta).max()),
                         "relative_logit_diff": float(np.linalg.norm(delta) / np.linalg.norm(ref)),
                         "perplexity": float(np.exp(nll)), "perplexity_diff": float(np.exp(nll) - np.exp(ref_nll)),
                         "argmax_agreement": float(agree)})
            print(f"  {gguf_type}: done", file=sys.stderr, flush=True)
    return {"benchmark": "GGUF export: logits and perplexity of each type vs the merged model (jaxft, float32)",
            "model": {"layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "intermediate": cfg.intermediate_size,
                      "vocab": cfg.vocab_size, "pretrain_steps": pretrain_steps, "lora_steps": lora_steps,
                      "lora": "r=8, alpha=16, all linear layers, merged"},
            "held_out": {"chats": len(held_out), "tokens": sum(len(r) - 1 for r in held_out)},
            "reference_perplexity": float(np.exp(ref_nll)), "types": rows,
            "reader": f"transformers {transformers.__version__} (GGUF loader, float32)",
            "load_average_1_5_15": {"start": load_start, "end": os.getloadavg()},
            "machine": {"cpus": os.cpu_count(), "cpu": cpu_info(), "python": platform.python_version(),
                        "platform": platform.platform()},
            "command": " ".join(["python", *sys.argv])}


def table(report: dict) -> str:
    lines = [f"merged model (jaxft, float32): perplexity {report['reference_perplexity']:.4f} on "
             f"{report['held_out']['tokens']} held-out tokens ({report['held_out']['chats']} chats)", "",
             "| type | file KiB | max abs logit diff | ‖Δ‖/‖logits‖ | perplexity | Δ perplexity "
             "| argmax agreement |",
             "|---|---|---|---|---|---|---|"]
    for r in report["types"]:
        lines.append(f"| {r['gguf_type']} | {r['file_bytes'] / 1024:.0f} | {r['max_abs_logit_diff']:.2e} | "
                     f"{r['relative_logit_diff']:.2e} | {r['perplexity']:.4f} | {r['perplexity_diff']:+.4f} | "
                     f"{r['argmax_agreement']:.4f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--lora-steps", type=int, default=200)
    parser.add_argument("--types", default=",".join(GGUF_TYPES), help=f"comma-separated subset of {GGUF_TYPES}")
    parser.add_argument("--out", default="bench/results/gguf.json")
    args = parser.parse_args(argv)
    types = args.types.split(",")
    unknown = [t for t in types if t not in GGUF_TYPES]
    if unknown:
        parser.error(f"--types {unknown}: choose from {GGUF_TYPES}")
    report = run(args.pretrain_steps, args.lora_steps, types)
    print(f"\nCPU: {cpu_label(report['machine']['cpu'])}\n")
    print(table(report))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
