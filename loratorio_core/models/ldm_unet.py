"""A UNet with the module names and shapes of the original LDM / SGM ``UNetModel``.

A1111 and Forge load SD1.x and SDXL checkpoints into this layout (``input_blocks.1.1.
transformer_blocks.0.attn1.to_q``, ...), and kohya LoRA keys map onto it. The project builds it
(random or trained weights) for tests, benchmarks and its own small models: full-size SD1.5- and
SDXL-shaped instances (on the ``meta`` device when only names and shapes matter) and tiny ones.
Written for this project from the architecture's description; no weights are downloaded.

Shapes: x (B, C_in, H, W), timesteps (B,), context (B, T, context_dim), y (B, adm_in_channels)
-> (B, C_out, H, W).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class UNetConfig:
    """The architecture. ``transformer_depth[level]`` is 0 for levels without attention."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)
    middle_transformer_depth: int = 1
    num_heads: int | None = 8
    head_channels: int | None = None
    context_dim: int = 768
    use_linear_in_transformer: bool = False
    adm_in_channels: int | None = None
    norm_groups: int = 32

    def __post_init__(self) -> None:
        if len(self.transformer_depth) != len(self.channel_mult):
            raise ValueError("transformer_depth needs one entry per channel_mult level")
        if (self.num_heads is None) == (self.head_channels is None):
            raise ValueError("set exactly one of num_heads and head_channels")

    def heads(self, channels: int) -> tuple[int, int]:
        """(heads, channels per head) of an attention layer with ``channels`` channels."""
        if self.num_heads is not None:
            return self.num_heads, channels // self.num_heads
        return channels // self.head_channels, self.head_channels


def sd15_config() -> UNetConfig:
    """Stable Diffusion 1.x (860 M parameters)."""
    return UNetConfig()


def sdxl_config() -> UNetConfig:
    """Stable Diffusion XL base (2.6 B parameters)."""
    return UNetConfig(
        channel_mult=(1, 2, 4),
        transformer_depth=(0, 2, 10),
        middle_transformer_depth=10,
        num_heads=None,
        head_channels=64,
        context_dim=2048,
        use_linear_in_transformer=True,
        adm_in_channels=2816,
    )


def tiny_config(context_dim: int = 32, in_channels: int = 4) -> UNetConfig:
    """A few hundred thousand parameters, SD1.5's layout at small width: for tests and CPU demos."""
    return UNetConfig(
        in_channels=in_channels,
        out_channels=in_channels,
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        transformer_depth=(1, 1),
        middle_transformer_depth=1,
        num_heads=2,
        context_dim=context_dim,
        norm_groups=8,
    )


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (B,) -> (B, dim): cosines then sines, as in LDM."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(groups, out_channels),
            nn.SiLU(),
            nn.Dropout(0.0),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = (
            nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x) + self.emb_layers(emb).to(x.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        q, k, v = (
            t.unflatten(-1, (self.heads, -1)).transpose(1, 2)
            for t in (self.to_q(x), self.to_k(context), self.to_v(context))
        )
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).flatten(2))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    def __init__(self, channels: int, depth: int, config: UNetConfig):
        super().__init__()
        heads, dim_head = config.heads(channels)
        inner = heads * dim_head
        self.use_linear = config.use_linear_in_transformer
        self.norm = nn.GroupNorm(config.norm_groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if self.use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, config.context_dim) for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, channels) if self.use_linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, _, h, w = x.shape
        residual = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(b, -1, h, w)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + residual


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        return self.conv(F.interpolate(x, size=size, scale_factor=None if size else 2.0, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """Passes the time embedding to ResBlocks and the context to transformers."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor, skip_size=None) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, skip_size)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """The LDM/SGM UNet layout: ``time_embed``, ``label_emb`` (SDXL), ``input_blocks``,
    ``middle_block``, ``output_blocks``, ``out``."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        mc, groups = config.model_channels, config.norm_groups
        emb = mc * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, emb), nn.SiLU(), nn.Linear(emb, emb))
        if config.adm_in_channels is not None:
            self.label_emb = nn.Sequential(
                nn.Sequential(nn.Linear(config.adm_in_channels, emb), nn.SiLU(), nn.Linear(emb, emb))
            )
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(config.in_channels, mc, 3, padding=1))]
        )
        skip_channels, ch = [mc], mc
        last = len(config.channel_mult) - 1
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb, mult * mc, groups)]
                ch = mult * mc
                if config.transformer_depth[level]:
                    layers.append(SpatialTransformer(ch, config.transformer_depth[level], config))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != last:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb, ch, groups),
            SpatialTransformer(ch, config.middle_transformer_depth, config),
            ResBlock(ch, emb, ch, groups),
        )
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for i in range(config.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb, mult * mc, groups)]
                ch = mult * mc
                if config.transformer_depth[level]:
                    layers.append(SpatialTransformer(ch, config.transformer_depth[level], config))
                if level and i == config.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(
            nn.GroupNorm(groups, ch), nn.SiLU(), nn.Conv2d(mc, config.out_channels, 3, padding=1)
        )

    def forward(
        self, x: Tensor, timesteps: Tensor, context: Tensor | None = None, y: Tensor | None = None
    ) -> Tensor:
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(x.dtype))
        if self.config.adm_in_channels is not None:
            if y is None:
                raise ValueError("this UNet needs y (the SDXL vector conditioning)")
            emb = emb + self.label_emb(y.to(x.dtype))
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            skip = skips.pop()
            h = block(torch.cat([h, skip], dim=1), emb, context, skip_size=_next_size(skips))
        return self.out(h)


def _next_size(skips: list[Tensor]) -> tuple[int, int] | None:
    # Upsampling to the next skip's size keeps odd latent sizes working (H = 9 -> 5 -> 9).
    return tuple(skips[-1].shape[-2:]) if skips else None
