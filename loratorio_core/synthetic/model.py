"""The synthetic world's text-to-image model and a sampler that runs any ``LoRAtorioConfig`` mode.

- Text encoder: a token embedding plus a position embedding, (B, T) ids -> (B, T, 32).
- "Autoencoder": a fixed, lossless space-to-depth codec, (B, 3, 32, 32) in [0, 1] <->
  (B, 12, 16, 16) in [-1, 1], so the UNet works on an 8x-smaller-area latent as SD's does.
- Denoiser: the project's LDM-layout ``UNetModel`` (``unet_config``: small widths, cross-attention
  and convs), so LoRAs bind through the same key maps as real SD LoRAs.
- Schedule: SD's scaled-linear betas over 1000 steps (with the plain linear schedule the model
  ignores its caption at high noise); sampling is deterministic DDIM.

``sample`` steps many jobs (each its own LoRA set, prompt and seeds) in lockstep: every step it
asks ``StepComposer.plan`` per job, evaluates all jobs' rows in ONE UNet forward through one
``LoRARuntime`` that holds every LoRA, and ``combine``s per job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import LoRAtorioConfig
from ..lora.binding import bind_lora
from ..lora.files import LayerUpdate, load_lora, read_safetensors
from ..lora.keymap import layer_aliases
from ..lora.runtime import LoRARuntime
from ..models.ldm_unet import UNetConfig, UNetModel, tiny_config
from ..step import Adapter, StepComposer
from .world import CONCEPTS, CONTEXT_LENGTH, VOCABULARY, tokenize

WEIGHTS = Path(__file__).parent / "weights"
BASE_FILE = "base.safetensors"
LATENT_CHANNELS = 12
CONTEXT_DIM = 32
TRAIN_STEPS = 1000
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


@dataclass(eq=False)
class SyntheticModel:
    """The base model and the LoRAs bound to it (by concept name)."""

    unet: UNetModel
    text_encoder: TextEncoder
    alphas_cumprod: Tensor
    loras: dict[str, dict[str, LayerUpdate]] = field(default_factory=dict)

    def encode_text(self, prompts: Sequence[Sequence[str]]) -> Tensor:
        """Prompts (lists of words; [] is the empty prompt) -> (B, T, CONTEXT_DIM)."""
        with torch.no_grad():
            return self.text_encoder(torch.stack([tokenize(list(p)) for p in prompts]))


def lora_path(name: str, weights: Path = WEIGHTS) -> Path:
    return Path(weights) / f"{name}.safetensors"


def load_model(weights: str | Path = WEIGHTS, loras: Sequence[str] | None = None) -> SyntheticModel:
    """The shipped base model, with the LoRAs ``loras`` (default: all 11 that exist) loaded
    with ``load_lora`` and bound with ``bind_lora`` exactly as real SD LoRAs are."""
    weights = Path(weights)
    tensors, _ = read_safetensors(weights / BASE_FILE)
    unet, text_encoder = new_unet(), TextEncoder()
    unet.load_state_dict({k[5:]: v.float() for k, v in tensors.items() if k.startswith("unet.")})
    text_encoder.load_state_dict({k[5:]: v.float() for k, v in tensors.items() if k.startswith("text.")})
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    model = SyntheticModel(unet, text_encoder, scaled_linear_alphas_cumprod())
    names = [c.name for c in CONCEPTS if lora_path(c.name, weights).exists()] if loras is None else loras
    aliases = layer_aliases(unet)
    for name in names:
        bound = bind_lora(unet, load_lora(lora_path(name, weights)), aliases=aliases)
        model.loras[name] = bound.layers
    return model


def save_base(path: str | Path, unet: UNetModel, text_encoder: TextEncoder) -> None:
    """Write the base model as fp16 safetensors (``unet.*`` and ``text.*`` keys)."""
    from safetensors.torch import save_file

    tensors = {f"unet.{k}": v.detach().half().contiguous() for k, v in unet.state_dict().items()}
    tensors.update(
        {f"text.{k}": v.detach().half().contiguous() for k, v in text_encoder.state_dict().items()}
    )
    save_file(tensors, str(path))


def ddim_timesteps(steps: int) -> list[int]:
    """The ``steps`` timesteps DDIM visits, from 999 down to 0."""
    return torch.linspace(TRAIN_STEPS - 1, 0, steps).round().long().tolist()


def ddim_step(x: Tensor, eps: Tensor, alpha: Tensor, alpha_prev: Tensor) -> Tensor:
    """One deterministic DDIM step from alpha-bar ``alpha`` to ``alpha_prev``; x, eps (B, C, H, W).

    The predicted x0 is clipped to the latent's range [-1, 1]; the noise direction is kept as
    predicted (re-deriving it from the clipped x0 measured worse here: more grain)."""
    x0 = ((x - (1 - alpha).sqrt() * eps) / alpha.sqrt()).clamp(-1, 1)
    return alpha_prev.sqrt() * x0 + (1 - alpha_prev).sqrt() * eps


@dataclass(frozen=True)
class Job:
    """One LoRA set sampled with one prompt for several seeds.

    loras: concept names in prompt order (empty: the base model alone). prompt: words.
    seeds: one image per seed; the seed fixes the initial noise (the same for every method).
    """

    loras: tuple[str, ...]
    prompt: tuple[str, ...]
    seeds: tuple[int, ...]


@dataclass(eq=False)
class Samples:
    """What ``sample`` returns.

    images: per job, (S, 3, 32, 32). rows: per job, model rows evaluated per image (summed over
    steps). weights: per job, per step, (N, S, h, w) patch weights (when recorded).
    """

    images: list[Tensor]
    rows: list[float]
    weights: list[list[Tensor]] | None = None


def initial_noise(seed: int) -> Tensor:
    """(12, 16, 16) the starting latent of ``seed``."""
    return torch.randn(LATENT_CHANNELS, 16, 16, generator=torch.Generator().manual_seed(seed))


def sample(
    model: SyntheticModel,
    jobs: Sequence[Job],
    config: LoRAtorioConfig,
    *,
    steps: int = 20,
    guidance: float = 5.0,
    scale: float = LORA_SCALE,
    record_weights: bool = False,
    named: Sequence[Tensor | None] | None = None,
) -> Samples:
    """Generate every job's images with ``config`` (any mode, top-k included), all jobs'
    rows in one UNet forward per step. named: per job, the bool (N,) mask of its LoRAs that
    the prompt names (``StepComposer.plan``'s ``named``), or None."""
    names = sorted({n for job in jobs for n in job.loras})
    index = {n: i for i, n in enumerate(names)}
    runtime = LoRARuntime(model.unet, [model.loras[n] for n in names])
    composer = StepComposer(config)
    latents = [torch.stack([initial_noise(s) for s in job.seeds]) for job in jobs]
    conds = [model.encode_text([job.prompt] * len(job.seeds)) for job in jobs]
    uncond = model.encode_text([[]])[0]
    kept: list[Tensor | None] = [None] * len(jobs)
    rows = [0.0] * len(jobs)
    weights: list[list[Tensor]] | None = [[] for _ in jobs] if record_weights else None
    times = ddim_timesteps(steps)
    alphas = model.alphas_cumprod
    with runtime, torch.no_grad():
        for step, t in enumerate(times):
            plans, x_in, ctx, entry_adapters = [], [], [], []
            for j, job in enumerate(jobs):
                adapters = [Adapter(n, scale) for n in job.loras]
                plan = composer.plan(
                    step, adapters, batch_size=len(job.seeds), kept=kept[j], named=named[j] if named else None
                )
                plans.append(plan)
                x_in.append(latents[j][plan.sample_index])
                both = torch.cat([conds[j], uncond.expand_as(conds[j])])
                ctx.append(both[plan.conditioning_index])
                entry_adapters += [
                    tuple((index[job.loras[a]], s) for a, s in active) for active in plan.entry_adapters
                ]
                rows[j] += plan.num_entries / len(job.seeds)
            x = torch.cat(x_in)
            with runtime.rows(entry_adapters):
                eps_all = model.unet(x, torch.full((x.shape[0],), t), torch.cat(ctx))
            a = alphas[t]
            a_prev = alphas[times[step + 1]] if step + 1 < len(times) else torch.tensor(1.0)
            start = 0
            for j, plan in enumerate(plans):
                result = composer.combine(plan, eps_all[start : start + plan.num_entries], guidance)
                start += plan.num_entries
                kept[j] = result.kept
                if weights is not None and result.weights is not None:
                    weights[j].append(result.weights)
                latents[j] = ddim_step(latents[j], result.eps, a, a_prev)
    return Samples([decode_latents(z) for z in latents], rows, weights)
