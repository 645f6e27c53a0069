"""Peak host memory of `jaxft export --gguf` on a random Llama of about 398 MB (380 MiB, float32), for the record.

Builds the model once (transformers, random weights, float32 safetensors, a small byte-level BPE tokenizer) in
DIR/model, then runs the export in a fresh process per GGUF type and prints that process's peak RSS
(``getrusage(RUSAGE_SELF).ru_maxrss`` at its exit) beside the safetensors size.

    python scripts/gguf_export_memory.py DIR [f16 q8_0 ...]
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def build(folder: Path) -> None:
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if (folder / "model.safetensors").is_file():
        return
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                                      num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048,
                                      tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).to(torch.float32).save_pretrained(folder)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|eot|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eot|>").save_pretrained(folder)


# Runs the CLI in this process's child and reports that child's own peak RSS (KiB on Linux) on stderr.
_MEASURED = ("import resource, runpy, sys\n"
             "sys.argv = ['jaxft', *sys.argv[1:]]\n"
             "try:\n    runpy.run_module('jaxft', run_name='__main__')\n"
             "finally:\n    print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n")


def main(root: str, *types: str) -> None:
    folder = Path(root) / "model"
    subprocess.run([sys.executable, __file__, "--build", str(folder)], check=True)
    size = (folder / "model.safetensors").stat().st_size / 2**20
    for gguf_type in types or ("f16", "q8_0"):
        out = Path(root) / f"model-{gguf_type}.gguf"
        run = subprocess.run([sys.executable, "-c", _MEASURED, "export", str(folder), "--gguf", str(out),
                              "--gguf-type", gguf_type, "--overwrite"], check=True, capture_output=True, text=True)
        peak = int(next(line.split()[1] for line in run.stderr.splitlines() if line.startswith("PEAK")))
        print(f"{gguf_type}: safetensors {size:.0f} MiB, file {out.stat().st_size / 2**20:.0f} MiB, "
              f"peak RSS {peak / 1024:.0f} MiB")


if __name__ == "__main__":
    if sys.argv[1] == "--build":
        build(Path(sys.argv[2]))
    else:
        main(*sys.argv[1:])
