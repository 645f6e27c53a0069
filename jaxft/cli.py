"""The ``jaxft`` command line. Errors print one paragraph and exit 2 (``--debug`` shows the traceback)."""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


def _demo(args) -> int:
    """Build a tiny random Llama, write it as a HF folder, load it back and generate from it."""
    import jax

    import jaxft

    cfg = jaxft.ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, eos_token_ids=(2,))
    params = jaxft.init_params(cfg, jax.random.PRNGKey(args.seed))
    with tempfile.TemporaryDirectory() as tmp:
        folder = jaxft.save_pretrained(cfg, params, Path(tmp) / "tiny-llama")
        cfg, params = jaxft.from_pretrained(folder)
        out = jaxft.generate(cfg, params, [[1, 5, 9], [1, 7]], max_new_tokens=args.max_new_tokens)
    print(f"tiny Llama ({sum(x.size for x in jax.tree.leaves(params)):,} params) round-tripped through a HF folder")
    for row in out:
        print("generated:", row)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxft", description="Fine-tune Llama-family models in JAX.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the offline demo",
                          description="Build a tiny Llama, save it in Hugging Face format, reload it and generate.")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--max-new-tokens", type=int, default=8)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, KeyError) as e:
        if args.debug:
            raise
        print(f"jaxft {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
