"""A GGUF file as a Hugging Face model folder: config.json, safetensors, the tokenizer and its chat template.

The tensors are dequantized one at a time (:class:`jaxft.gguf.read.GgufCheckpoint`) into ``dtype`` (float32 by
default, which holds every GGUF type's dequantized values exactly; the whole model is held in memory in that dtype
while it is written), then written by the code that writes jaxft's own HF folders
(:func:`jaxft.hf.checkpoint.write_pretrained`), with the tokenizer as :meth:`jaxft.Tokenizer.save` writes it, and
for a sentencepiece vocabulary with scores its ``tokenizer.model`` too, checked by loading it in sentencepiece (the
pieces' scores, which tokenizer.json cannot hold, so that ``jaxft export --gguf`` writes the same vocabulary
back); the folder appears whole or not at all (:func:`jaxft.files.atomic_dir`).
"""
from __future__ import annotations

from pathlib import Path

import sentencepiece

from jaxft.files import atomic_dir, check_output_dir
from jaxft.gguf.layout import GgufError
from jaxft.gguf.read import GgufCheckpoint
from jaxft.gguf.tokenizer import sentencepiece_model_from_gguf, tokenizer_from_gguf
from jaxft.hf.checkpoint import cast_checked, check_tensors, expected_tensors, write_pretrained
from jaxft.hf.config import config_from_hf
from jaxft.hf.tokenizer import SENTENCEPIECE_MODEL


def gguf_to_hf(path, out_dir, *, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Write the model of the GGUF file ``path`` as a HF folder at ``out_dir`` that transformers' AutoModel and
    AutoTokenizer load; an existing non-empty ``out_dir`` needs ``overwrite``. Returns ``out_dir``."""
    check_output_dir(out_dir, overwrite)
    ckpt = GgufCheckpoint(path)
    cfg = config_from_hf(ckpt.hf_config(), source=str(path), dtype=dtype)
    check_tensors(ckpt, cfg)
    tokenizer = tokenizer_from_gguf(path)  # before anything is written: its errors leave no folder behind
    sentencepiece_model = sentencepiece_model_from_gguf(path)
    if sentencepiece_model is not None:
        _check_sentencepiece_model(sentencepiece_model, path)
    tensors = {name: cast_checked(ckpt.get(name), dtype, name, path) for name in expected_tensors(cfg)}
    with atomic_dir(out_dir, overwrite) as tmp:
        write_pretrained(cfg, tensors, tmp)
        tokenizer.save(tmp)
        if sentencepiece_model is not None:  # as hub Llama-2 folders hold it: the scores export back with it
            (tmp / SENTENCEPIECE_MODEL).write_bytes(sentencepiece_model)
    return Path(out_dir)


def _check_sentencepiece_model(model_proto: bytes, path):
    """Load the tokenizer.model made from the file's pieces as sentencepiece will, so that a vocabulary it refuses
    (a piece twice, say) is an error naming the GGUF file before the folder is written."""
    try:
        sentencepiece.SentencePieceProcessor(model_proto=model_proto)
    except RuntimeError as err:
        raise GgufError(f"{path}: its llama vocabulary is no sentencepiece model ({err}); the file's tokenizer "
                        "cannot be written as a tokenizer.model") from err
