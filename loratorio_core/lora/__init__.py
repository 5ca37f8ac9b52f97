"""LoRA files, their mapping onto a model's modules, and the per-row runtime."""

from .files import LayerUpdate, LoRAFile, LoRAFileError, load_lora, read_safetensors
from .keymap import layer_aliases

__all__ = ["LayerUpdate", "LoRAFile", "LoRAFileError", "layer_aliases", "load_lora", "read_safetensors"]
