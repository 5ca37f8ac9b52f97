"""Full-size SD1.5 and SDXL UNets (meta device: names and shapes, no weights) in both layouts.

The diffusers layout is diffusers' own UNet2DConditionModel, so translations between the layouts
are checked against an independent implementation.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loratorio_core.models import UNetModel, sd15_config, sdxl_config

diffusers = pytest.importorskip("diffusers")

SD15 = dict(
    cross_attention_dim=768,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SDXL = dict(
    cross_attention_dim=2048,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    attention_head_dim=(5, 10, 20),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


def build(kind: str):
    with torch.device("meta"):
        ldm = UNetModel(sd15_config() if kind == "sd15" else sdxl_config())
        diff = diffusers.UNet2DConditionModel(**(SD15 if kind == "sd15" else SDXL))
    return ldm, diff


def kohya_keys(model: nn.Module) -> list[str]:
    """The layers a kohya trainer (LoRA + LoCon) targets, in the given model's naming:
    every Linear/Conv2d inside the transformers, the ResBlocks, down- and upsamplers."""
    blocks = ("attentions", "resnets", "samplers", "input_blocks.", "output_blocks.", "middle_block.")
    names = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and any(b in name for b in blocks):
            if name.startswith("input_blocks.0") or ".norm" in name:
                continue
            names.append("lora_unet_" + name.replace(".", "_"))
    return names
