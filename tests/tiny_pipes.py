"""Tiny diffusers SD and SDXL pipelines, assembled from configs (no download, random weights)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


def _byte_chars() -> list[str]:
    """GPT-2/CLIP's printable stand-ins for the 256 byte values."""
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def tiny_tokenizer(folder: Path):
    """A character-level CLIP tokenizer (no merges): any text works, ids stay below 520."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    vocab = {
        token: i
        for i, token in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])
    }
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16
    )


def _text_encoder(vocab: int, projection: bool = False):
    config = transformers.CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1,
        projection_dim=32,
    )
    model = (
        transformers.CLIPTextModelWithProjection(config) if projection else transformers.CLIPTextModel(config)
    )
    return model.eval()


def _vae():
    return diffusers.AutoencoderKL(
        block_out_channels=(8, 16),
        norm_num_groups=8,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
    ).eval()


def _scheduler(name: str, prediction_type: str):
    common = dict(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type
    )
    if name == "ddim":
        common["clip_sample"] = False
    cls = {
        "ddim": diffusers.DDIMScheduler,
        "euler": diffusers.EulerDiscreteScheduler,
        "dpm": diffusers.DPMSolverMultistepScheduler,
    }[name]
    return cls(**common)


def tiny_sd(tmp_path: Path, scheduler: str = "ddim", prediction_type: str = "epsilon"):
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(tmp_path / "tokenizer")
    unet = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()
    return diffusers.StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=_text_encoder(len(tokenizer)),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_scheduler(scheduler, prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl(tmp_path: Path, scheduler: str = "euler", prediction_type: str = "epsilon"):
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(tmp_path / "tokenizer")
    unet = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=8,
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 32,
    ).eval()
    return diffusers.StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=_text_encoder(len(tokenizer)),
        text_encoder_2=_text_encoder(len(tokenizer), True),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=_scheduler(scheduler, prediction_type),
    )
