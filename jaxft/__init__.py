"""jaxft: fine-tune Llama-family models in JAX (LoRA, QLoRA/NF4, SFT) on CPU, GPU and TPU meshes."""
from jaxft.config import ConfigError, HeadConfig, ModelConfig, QuantConfig, RopeConfig
from jaxft.errors import JaxftError
from jaxft.hf import peft_format
from jaxft.hf.checkpoint import from_pretrained, save_pretrained
from jaxft.hf.peft_format import load_adapter, save_adapter
from jaxft.hf.safetensors_io import CheckpointError
from jaxft.hf.tokenizer import Tokenizer, TokenizerError, load_tokenizer
from jaxft.models.generate import generate
from jaxft.models.hooks import Hooks
from jaxft.models.llama import forward, init_params
from jaxft.ops import nf4
from jaxft.peft import ia3, ln_tuning, lora, lycoris  # each registers its adapter config and methods
from jaxft.peft.ia3 import IA3Config
from jaxft.peft.ln_tuning import LNTuningConfig
from jaxft.peft.lora import LoraConfig
from jaxft.peft.lycoris import LohaConfig, LokrConfig
from jaxft.peft.methods import merge, unmerge
from jaxft.peft.prefix import PrefixTuningConfig
from jaxft.peft.prompt import PromptEncoderConfig, PromptTuningConfig
from jaxft.peft.tree import Trainable, combine, split

__all__ = ["CheckpointError", "ConfigError", "HeadConfig", "Hooks", "IA3Config", "JaxftError", "LNTuningConfig",
           "LohaConfig", "LokrConfig", "LoraConfig", "ModelConfig", "PrefixTuningConfig", "PromptEncoderConfig",
           "PromptTuningConfig", "QuantConfig", "RopeConfig", "Tokenizer", "TokenizerError", "Trainable", "combine",
           "forward", "from_pretrained", "generate", "ia3", "init_params", "ln_tuning", "load_adapter",
           "load_tokenizer", "lora", "lycoris", "merge", "nf4", "peft_format", "save_adapter", "save_pretrained",
           "split", "unmerge"]
