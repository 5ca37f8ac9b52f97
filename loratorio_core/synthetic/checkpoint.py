"""Reading and writing the synthetic benchmarks' shipped weights (shared by both).

A base model is one fp16 ``.safetensors`` file with ``unet.*`` and ``text.*`` keys; each LoRA is a
kohya file, loaded with ``load_lora`` and bound with ``bind_lora`` exactly as a real SD LoRA is.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..lora.binding import bind_lora
from ..lora.files import LayerUpdate, load_lora, read_safetensors
from ..lora.keymap import layer_aliases


@dataclass(eq=False)
class TextToImageModel:
    """A trained base model and the LoRAs bound to it (by concept name): a ``sampler.SamplerModel``.

    A benchmark subclasses it with its latent shape, prediction type, tokenizer and decoder.
    """

    latent_shape: ClassVar[tuple[int, int, int]]
    prediction: ClassVar[str]
    tokenize: ClassVar[Callable[[list[str]], Tensor]]
    decode_latents: ClassVar[Callable[[Tensor], Tensor]]

    unet: nn.Module
    text_encoder: nn.Module
    alphas_cumprod: Tensor
    loras: dict[str, dict[str, LayerUpdate]] = field(default_factory=dict)

    def encode_text(self, prompts: Sequence[Sequence[str]]) -> Tensor:
        """Prompts (lists of words; [] is the empty prompt) -> (B, T, context width)."""
        with torch.no_grad():
            return self.text_encoder(torch.stack([type(self).tokenize(list(p)) for p in prompts]))

    def decode(self, latents: Tensor) -> Tensor:
        """(B, C, H, W) latents -> (B, 3, H', W') images in [0, 1]."""
        return type(self).decode_latents(latents)


def save_base(path: str | Path, unet: nn.Module, text_encoder: nn.Module) -> None:
    """Write the base model as fp16 safetensors (``unet.*`` and ``text.*`` keys)."""
    from safetensors.torch import save_file

    tensors = {f"unet.{k}": v.detach().half().contiguous() for k, v in unet.state_dict().items()}
    tensors.update(
        {f"text.{k}": v.detach().half().contiguous() for k, v in text_encoder.state_dict().items()}
    )
    save_file(tensors, str(path))


def load_base(path: str | Path, unet: nn.Module, text_encoder: nn.Module) -> None:
    """Load a ``save_base`` file into ``unet`` and ``text_encoder`` (float32, eval, frozen)."""
    tensors, _ = read_safetensors(path)
    unet.load_state_dict({k[5:]: v.float() for k, v in tensors.items() if k.startswith("unet.")})
    text_encoder.load_state_dict({k[5:]: v.float() for k, v in tensors.items() if k.startswith("text.")})
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)


def bind_loras(unet: nn.Module, paths: Mapping[str, Path]) -> dict[str, dict[str, LayerUpdate]]:
    """Each named LoRA file bound to ``unet``: {name: its layers by module path}."""
    aliases = layer_aliases(unet)
    return {name: bind_lora(unet, load_lora(path), aliases=aliases).layers for name, path in paths.items()}


def load_trained(
    base: Path,
    unet: nn.Module,
    text_encoder: nn.Module,
    concepts: Sequence[str],
    lora_path: Callable[[str], Path],
    loras: Sequence[str] | None = None,
) -> dict[str, dict[str, LayerUpdate]]:
    """Load the base model file into ``unet`` and ``text_encoder`` and bind the LoRAs ``loras``
    (default: every concept whose file exists) -> their bound layers by name."""
    load_base(base, unet, text_encoder)
    names = [n for n in concepts if lora_path(n).exists()] if loras is None else loras
    return bind_loras(unet, {name: lora_path(name) for name in names})


def tag_frequency(captions: Iterable[Iterable[str]], dataset: str) -> str:
    """kohya's ``ss_tag_frequency``: JSON {dataset: {tag: count}}, a tag counted once per caption it
    appears in (kohya counts the comma-separated tags of each caption file; these captions are
    word lists, so each word is a tag). Real LoRAs carry it; WebUIs read trigger words from it."""
    counts: Counter[str] = Counter()
    for words in captions:
        counts.update(dict.fromkeys(words, 1))
    ordered = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return json.dumps({dataset: ordered})


def dataset_name(concept: str, repeats: int = 1) -> str:
    """kohya names a dataset by its folder, ``<repeats>_<name>``."""
    if not re.fullmatch(r"[A-Za-z0-9_]+", concept):
        raise ValueError(f"a concept name is a plain word; got {concept!r}")
    return f"{repeats}_{concept}"
