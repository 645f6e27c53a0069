"""The ``jaxft`` command line (also ``python -m jaxft``).

Every subcommand explains itself with ``--help``. Errors print one paragraph and exit with status 2;
``--debug`` shows the full traceback instead.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jaxft.config import ConfigError

EXPECTED_ERRORS = (ConfigError, ValueError, OSError, KeyError)


def _train(args) -> int:
    from jaxft.recipes import sft
    from jaxft.recipes.config import load_run_config

    cfg = load_run_config(args.config, args.set or [])
    summary = sft.run(cfg, resume=args.resume, overwrite=args.overwrite)
    print(json.dumps(summary, indent=2, default=float))
    return 0


def _demo(args) -> int:
    from jaxft.recipes import demo

    cfg = demo.DemoConfig.quick() if args.quick else demo.DemoConfig()
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{out}: already exists and is not empty; pass --overwrite or choose --out")
    result = demo.run(out, cfg, overwrite=args.overwrite)
    print()
    print(demo.table(result))
    return 0


def _load(model: str, adapter: str | None, quant: str | None):
    import jaxft

    cfg, params = jaxft.from_pretrained(model, quant=quant)
    if adapter:
        params = jaxft.load_adapter(adapter, params)
    return cfg, params


def _generate(args) -> int:
    import jaxft

    cfg, params = _load(args.model, args.adapter, args.quant)
    tok = jaxft.load_tokenizer(args.adapter or args.model)
    prompts = list(args.prompt or [])
    if args.file:
        prompts += [line.rstrip("\n") for line in Path(args.file).read_text().splitlines() if line.strip()]
    interactive = not prompts
    while True:
        if interactive:
            try:
                prompts = [input("> ")]
            except EOFError:
                return 0
        ids = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
               if args.chat else tok.encode(p) for p in prompts]
        stops = [tok.eos_token_id] if tok.eos_token_id is not None else None
        outs = jaxft.generate(cfg, params, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, stop_token_ids=stops)
        for p, out in zip(prompts, outs):
            print(f"{p}\t{tok.decode(out, skip_special_tokens=True)}" if not interactive
                  else tok.decode(out, skip_special_tokens=True))
        if not interactive:
            return 0


def _export(args) -> int:
    import jaxft

    from jaxft.hf.config import read_json
    from jaxft.hf.peft_format import lora_config_from_peft

    out = Path(args.out)
    cfg, params = _load(args.model, args.adapter, None)
    if args.merged:
        jaxft.save_pretrained(cfg, jaxft.lora.merge(params), out, overwrite=args.overwrite)
    else:
        lcfg = lora_config_from_peft(read_json(Path(args.adapter) / "adapter_config.json"), args.adapter)
        jaxft.save_adapter(params, lcfg, out, base_model_name_or_path=str(Path(args.model).resolve()),
                           overwrite=args.overwrite)
    tok = jaxft.load_tokenizer(args.adapter if (Path(args.adapter) / "tokenizer_config.json").exists()
                               else args.model)
    tok.save(out)
    print(f"wrote {out}")
    return 0


def _inspect(args) -> int:
    import jax

    import jaxft
    from jaxft.peft.tree import nbytes, split
    from jaxft.recipes import sft
    from jaxft.recipes.config import load_run_config

    cfg = load_run_config(args.config, args.set or [])
    _, params = sft.load_model(cfg, jax.random.PRNGKey(0))
    trainable, frozen = split(params, sft.trainable_predicate(cfg))
    n_train = jaxft.lora.trainable_count(params) if cfg.method != "full" else sum(
        x.size for x in jax.tree.leaves(trainable))
    print(jaxft.lora.summary(params) if cfg.method != "full" else f"trainable params: {n_train:,}")
    print(f"frozen bytes: {nbytes(frozen):,}; trainable bytes: {nbytes(trainable):,}; "
          f"AdamW state bytes: {2 * nbytes(trainable):,}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxft", description="Fine-tune Llama-family models in JAX "
                                     "(LoRA, QLoRA/NF4, full) from Hugging Face folders, on CPU, GPU and TPU meshes.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="fine-tune per a YAML run config",
                       description="Full fine-tuning, LoRA or QLoRA SFT from a HF model folder, as one YAML file "
                       "describes it (see configs/). The resolved config, metrics.jsonl, curves.png, checkpoints "
                       "and the exported adapter land in output_dir.")
    p.add_argument("config", help="YAML run config")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value, e.g. lora.r=8")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output_dir")
    p.set_defaults(func=_train)

    p = sub.add_parser("demo", help="run the offline end-to-end demo",
                       description="Pretrain a tiny Llama-style base on generated text (cached), quantize it to "
                       "NF4, QLoRA fine-tune it on a chat task with exactly checkable answers (increment every digit), "
                       "and print exact match before/after on held-out problems.")
    p.add_argument("--out", default="jaxft-demo", help="output folder (default: ./jaxft-demo)")
    p.add_argument("--quick", action="store_true", help="a much shorter run (smoke test)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=_demo)

    p = sub.add_parser("generate", help="generate from a model (+ adapter)",
                       description="Batch generation for --prompt/--file, or an interactive prompt when neither "
                       "is given (Ctrl-D ends).")
    p.add_argument("model", help="HF model folder (the base)")
    p.add_argument("--adapter", help="PEFT adapter folder to apply")
    p.add_argument("--quant", choices=["nf4", "fp4"], help="load the base in 4 bits")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--file", help="a file of prompts, one per line")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the chat template as a user turn")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.set_defaults(func=_generate)

    p = sub.add_parser("export", help="export an adapter (PEFT format) or a merged HF model",
                       description="Write the adapter in PEFT format, or with --merged a dense HF model with the "
                       "adapter folded in; the tokenizer and chat template go along.")
    p.add_argument("model", help="HF model folder (the base)")
    p.add_argument("--adapter", required=True, help="PEFT adapter folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--merged", action="store_true", help="merge the adapter into the base weights")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_export)

    p = sub.add_parser("inspect", help="parameter counts and memory of a run config",
                       description="Load the model of a run config as the run would (adapters, 4-bit base) and "
                       "print trainable vs total params and bytes.")
    p.add_argument("config")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.set_defaults(func=_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EXPECTED_ERRORS as e:
        if args.debug:
            raise
        message = " ".join(str(e).split())
        print(f"jaxft {args.command}: error: {message}\n(run with --debug for the full traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
