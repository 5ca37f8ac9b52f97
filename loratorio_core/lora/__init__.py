"""LoRA files, their mapping onto a model's modules, and the per-row runtime."""

from .binding import BoundLoRA, bind_lora, guess_family
from .files import (
    LayerUpdate,
    LoRAFile,
    LoRAFileError,
    load_lora,
    read_metadata,
    read_safetensors,
    save_lora,
    tag_frequencies,
    trigger_words,
)
from .gates import Gate
from .keymap import layer_aliases
from .runtime import LoRARuntime, evaluate_entries
from .specs import split_scale

__all__ = [
    "BoundLoRA",
    "Gate",
    "LayerUpdate",
    "LoRAFile",
    "LoRAFileError",
    "LoRARuntime",
    "bind_lora",
    "evaluate_entries",
    "guess_family",
    "layer_aliases",
    "load_lora",
    "read_metadata",
    "read_safetensors",
    "save_lora",
    "split_scale",
    "tag_frequencies",
    "trigger_words",
]
