"""The base, data and run configs of the checkpoints written by jaxft b4e718f (README.md: how they were made)."""
from pathlib import Path

import jax

from jaxft.config import ModelConfig
from jaxft.hf.checkpoint import save_pretrained
from jaxft.hf.tokenizer import load_tokenizer
from jaxft.models.llama import init_params
from jaxft.recipes import demo

here = Path(__file__).parent
base, tokenizer = here / "base", here / "tokenizer"
tokenizer.mkdir()
demo.build_tokenizer(tokenizer, ["increment 1 2 3 4 = 2 3 4 5 6 7 8 9 0 ."])
cfg = ModelConfig(vocab_size=len(load_tokenizer(tokenizer)), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
                  qkv_bias=True, o_bias=True, eos_token_ids=(demo.SPECIAL.index("<|im_end|>"),), pad_token_id=0)
save_pretrained(cfg, init_params(cfg, jax.random.PRNGKey(0)), base)
for f in tokenizer.iterdir():
    f.rename(base / f.name)
tokenizer.rmdir()
demo.write_jsonl(here / "train.jsonl", [demo.chat((i, (i + 3) % 10, 7)) for i in range(8)])
# DoRA cannot adapt an embedding, so LoRA on embed_tokens (lora_embedding_a/b) gets a run of its own.
common = """\
model: base
method: lora
data: {paths: [train.jsonl], max_length: 32, batch_size: 8, packing: false}
optim: {lr: 0.01}
train: {steps: 3, save_every: 2, log_every: 1, loss_chunk_size: 0}
"""
(here / "dora.yaml").write_text(common + """\
output_dir: dora
lora: {r: 2, lora_alpha: 4, target_modules: [q_proj, v_proj, down_proj], use_dora: true, modules_to_save: [lm_head],
       bias: all, trainable_token_indices: [3, 5]}
""")
(here / "embedding.yaml").write_text(common + """\
output_dir: embedding
lora: {r: 2, lora_alpha: 4, target_modules: [embed_tokens, q_proj]}
""")
