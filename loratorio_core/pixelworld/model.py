"""The pixel world's text-to-image model: another family than the first synthetic benchmark's.

- No codec: the UNet denoises the 24x24 RGB image itself (3 channels, [-1, 1]), as pixel-space
  models do; the first benchmark works on a 16x16x12 space-to-depth latent. Three channels per
  latent pixel make a d = 1 patch's cosine similarity a 3-value one (SD's latent has 4).
- Text encoder: token + position embeddings through one pre-norm transformer layer (self-attention
  and an MLP, width 48), so a word's features depend on its neighbours ("wearing pantz").
- Denoiser: the project's LDM-layout ``UNetModel`` (SD1.5's block names) at three levels
  (24, 12, 6), cross-attention only at 6x6 and in the middle block; LoRAs bind through the same
  key maps as real SD LoRAs.
- v-prediction on the cosine schedule (Nichol & Dhariwal); sampling is the shared DDIM sampler,
  which converts each row's v to epsilon before composing (``sampler.eps_from_prediction``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ..models.ldm_unet import UNetConfig, UNetModel
from ..synthetic.checkpoint import TextToImageModel, load_trained, save_base
from .world import CONCEPTS, CONTEXT_LENGTH, SIZE, VOCABULARY, tokenize

__all__ = ["PixelModel", "load_model", "new_unet", "save_base", "schedule"]

WEIGHTS = Path(__file__).parent / "weights"
BASE_FILE = "base.safetensors"
LATENT_SHAPE = (3, SIZE, SIZE)
CONTEXT_DIM = 48
TRAIN_STEPS = 1000
PREDICTION = "v"
LORA_SCALE = 0.8  # ComposLoRA's and the paper's LoRA scale; the LoRAs are trained at it


class TextEncoder(nn.Module):
    """(B, T) token ids -> (B, T, CONTEXT_DIM): embeddings, one pre-norm transformer layer, a norm."""

    def __init__(self, vocabulary_size: int = len(VOCABULARY), dim: int = CONTEXT_DIM, heads: int = 4):
        super().__init__()
        self.token = nn.Embedding(vocabulary_size, dim)
        self.position = nn.Parameter(torch.zeros(CONTEXT_LENGTH, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.final_norm = nn.LayerNorm(dim)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.token(ids) + self.position[: ids.shape[1]]
        h = self.norm1(x)
        x = x + self.attention(h, h, h, need_weights=False)[0]
        x = x + self.mlp(self.norm2(x))
        return self.final_norm(x)


def encode_images(images: Tensor) -> Tensor:
    """(B, 3, 24, 24) in [0, 1] -> the model's space, [-1, 1] (pixel space: no codec)."""
    return images * 2 - 1


def decode_latents(latents: Tensor) -> Tensor:
    """The model's space -> (B, 3, 24, 24) images in [0, 1]."""
    return ((latents + 1) / 2).clamp(0, 1)


def cosine_alphas_cumprod(steps: int = TRAIN_STEPS, offset: float = 0.008) -> Tensor:
    """(steps,) alpha-bar of the cosine schedule, betas clipped at 0.999 (Nichol & Dhariwal 2021)."""

    def f(t: float) -> float:
        return math.cos((t / steps + offset) / (1 + offset) * math.pi / 2) ** 2

    betas = torch.tensor([min(1 - f(i + 1) / f(i), 0.999) for i in range(steps)], dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).float()


def schedule() -> Tensor:
    """The training and sampling schedule's alpha-bar, (TRAIN_STEPS,)."""
    return cosine_alphas_cumprod(TRAIN_STEPS)


def unet_config() -> UNetConfig:
    """SD1.5's layout at 0.36 M parameters on 24x24x3: levels 24/12/6 at 16/32/32 channels, one
    ResBlock a level, cross-attention at 6x6 and in the middle (measured: a UNet row costs less than
    the first benchmark's)."""
    return UNetConfig(
        in_channels=3,
        out_channels=3,
        model_channels=16,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        transformer_depth=(0, 0, 1),
        middle_transformer_depth=1,
        num_heads=2,
        context_dim=CONTEXT_DIM,
        norm_groups=8,
    )


def new_unet() -> UNetModel:
    """The denoiser (random weights)."""
    return UNetModel(unet_config())


class PixelModel(TextToImageModel):
    """The base model and the LoRAs bound to it (by concept name); a ``sampler.SamplerModel``."""

    latent_shape = LATENT_SHAPE
    prediction = PREDICTION
    tokenize = staticmethod(tokenize)
    decode_latents = staticmethod(decode_latents)


def lora_path(name: str, weights: Path = WEIGHTS) -> Path:
    return Path(weights) / f"{name}.safetensors"


def load_model(weights: str | Path = WEIGHTS, loras: Sequence[str] | None = None) -> PixelModel:
    """The shipped base model, with the LoRAs ``loras`` (default: all 11 that exist) loaded
    with ``load_lora`` and bound with ``bind_lora`` exactly as real SD LoRAs are."""
    unet, text_encoder = new_unet(), TextEncoder()
    names = [c.name for c in CONCEPTS]
    bound = load_trained(
        Path(weights) / BASE_FILE, unet, text_encoder, names, lambda n: lora_path(n, Path(weights)), loras
    )
    return PixelModel(unet, text_encoder, schedule(), bound)
