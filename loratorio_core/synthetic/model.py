"""The synthetic world's text-to-image model and a sampler that runs any ``LoRAtorioConfig`` mode.

- Text encoder: a token embedding plus a position embedding, (B, T) ids -> (B, T, 32).
- "Autoencoder": a fixed, lossless space-to-depth codec, (B, 3, 32, 32) in [0, 1] <->
  (B, 12, 16, 16) in [-1, 1], so the UNet works on an 8x-smaller-area latent as SD's does.
- Denoiser: the project's LDM-layout ``UNetModel`` (``unet_config``: small widths, cross-attention
  and convs), so LoRAs bind through the same key maps as real SD LoRAs.
- Schedule: SD's scaled-linear betas over 1000 steps (with the plain linear schedule the model
  ignores its caption at high noise); sampling is deterministic DDIM.

``sample`` (the sampler both synthetic benchmarks share, ``sampler.sample``) steps many jobs (each
its own LoRA set, prompt and seeds) in lockstep: every step it asks ``StepComposer.plan`` per job,
evaluates all jobs' rows in ONE UNet forward through one ``LoRARuntime`` that holds every LoRA,
and ``combine``s per job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.ldm_unet import UNetConfig, UNetModel, tiny_config
from . import sampler
from .checkpoint import TextToImageModel, load_trained, save_base
from .sampler import Job, Samples, ddim_step, sample
from .world import CONCEPTS, CONTEXT_LENGTH, VOCABULARY, tokenize

__all__ = [
    "Job",
    "Samples",
    "SyntheticModel",
    "ddim_step",
    "ddim_timesteps",
    "initial_noise",
    "load_model",
    "sample",
    "save_base",
]

WEIGHTS = Path(__file__).parent / "weights"
BASE_FILE = "base.safetensors"
LATENT_CHANNELS = 12
LATENT_SHAPE = (LATENT_CHANNELS, 16, 16)
CONTEXT_DIM = 32
TRAIN_STEPS = 1000
PREDICTION = "epsilon"
LORA_SCALE = 0.8  # ComposLoRA's and the paper's LoRA scale; the LoRAs are trained at it


class TextEncoder(nn.Module):
    """(B, T) token ids -> (B, T, CONTEXT_DIM): token embedding + position embedding."""

    def __init__(self, vocabulary_size: int = len(VOCABULARY), dim: int = CONTEXT_DIM):
        super().__init__()
        self.token = nn.Embedding(vocabulary_size, dim)
        self.position = nn.Parameter(torch.zeros(CONTEXT_LENGTH, dim))

    def forward(self, ids: Tensor) -> Tensor:
        return self.token(ids) + self.position[: ids.shape[1]]


def encode_images(images: Tensor) -> Tensor:
    """(B, 3, 32, 32) in [0, 1] -> (B, 12, 16, 16) in [-1, 1]: each 2x2 pixel block to channels."""
    return F.pixel_unshuffle(images * 2 - 1, 2)


def decode_latents(latents: Tensor) -> Tensor:
    """(B, 12, 16, 16) -> (B, 3, 32, 32) in [0, 1] (the exact inverse of ``encode_images``)."""
    return ((F.pixel_shuffle(latents, 2) + 1) / 2).clamp(0, 1)


def scaled_linear_alphas_cumprod(steps: int = TRAIN_STEPS) -> Tensor:
    """(steps,) alpha-bar of SD's schedule: betas = linspace(sqrt(0.00085), sqrt(0.012))^2."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def unet_config() -> UNetConfig:
    """SD1.5's layout at 0.56 M parameters: two levels (16x16, 8x8), cross-attention at 8x8 and in
    the middle block (attention at 16x16 would double the cost on a CPU for little gain)."""
    return replace(
        tiny_config(context_dim=CONTEXT_DIM, in_channels=LATENT_CHANNELS),
        model_channels=24,
        transformer_depth=(0, 1),
    )


def new_unet() -> UNetModel:
    """The denoiser (random weights)."""
    return UNetModel(unet_config())


class SyntheticModel(TextToImageModel):
    """The base model and the LoRAs bound to it (by concept name)."""

    latent_shape = LATENT_SHAPE
    prediction = PREDICTION
    tokenize = staticmethod(tokenize)
    decode_latents = staticmethod(decode_latents)


def lora_path(name: str, weights: Path = WEIGHTS) -> Path:
    return Path(weights) / f"{name}.safetensors"


def schedule() -> Tensor:
    """The training and sampling schedule's alpha-bar, (TRAIN_STEPS,)."""
    return scaled_linear_alphas_cumprod(TRAIN_STEPS)


def load_model(weights: str | Path = WEIGHTS, loras: Sequence[str] | None = None) -> SyntheticModel:
    """The shipped base model, with the LoRAs ``loras`` (default: all 11 that exist) loaded
    with ``load_lora`` and bound with ``bind_lora`` exactly as real SD LoRAs are."""
    unet, text_encoder = new_unet(), TextEncoder()
    names = [c.name for c in CONCEPTS]
    bound = load_trained(
        Path(weights) / BASE_FILE, unet, text_encoder, names, lambda n: lora_path(n, Path(weights)), loras
    )
    return SyntheticModel(unet, text_encoder, schedule(), bound)


def initial_noise(seed: int) -> Tensor:
    """(12, 16, 16) the starting latent of ``seed``."""
    return sampler.initial_noise(seed, LATENT_SHAPE)


def ddim_timesteps(steps: int) -> list[int]:
    """The ``steps`` timesteps DDIM visits, from 999 down to 0."""
    return sampler.ddim_timesteps(steps, TRAIN_STEPS)
