"""jaxft: fine-tune Llama-family models in JAX (LoRA, QLoRA/NF4, SFT) on CPU, GPU and TPU meshes."""
from jaxft.config import ConfigError, ModelConfig, RopeConfig
from jaxft.hf.checkpoint import from_pretrained, save_pretrained
from jaxft.hf.safetensors_io import CheckpointError
from jaxft.hf.tokenizer import Tokenizer, TokenizerError, load_tokenizer
from jaxft.models.generate import generate
from jaxft.models.llama import forward, init_params

__all__ = ["CheckpointError", "ConfigError", "ModelConfig", "RopeConfig", "forward", "from_pretrained", "generate",
           "init_params", "load_tokenizer", "Tokenizer", "TokenizerError", "save_pretrained"]
