"""Gates: an adapter's strength that varies over the image, for the gated single pass.

On LoRAtorio's gated steps one model row carries every LoRA at once, and each LoRA's change of a
layer's output is multiplied, per spatial position, by its latest weight map (its gate). A gate
is given at the latent's resolution; every layer reads it at its own: a conv's (h, w) output
grid, a transformer layer's h * w tokens. Layers whose inputs have no position (cross-attention
keys and values, computed from the text; time-embedding projections) take one number per row,
``Gate.context_scale``, which the core chooses (``LoRAtorioConfig.gate_context``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# Cross-attention keys and values: computed from the prompt's tokens, which have no position in
# the image (the module names of the LDM layout A1111/Forge use and of diffusers alike).
CONTEXT_LAYER_SUFFIXES = ("attn2.to_k", "attn2.to_v")


@dataclass(frozen=True, eq=False)
class Gate:
    """One adapter's strength on one row: ``scale * map[y, x]`` at each latent position.

    scale: the LoRA's multiplier (times any factor of the row). map: (H, W) weights at the
    latent's resolution, usually in [0, 1]. context_scale: the multiplier of layers without
    position (``is_context_layer``).
    """

    scale: float
    map: Tensor
    context_scale: float

    def __post_init__(self) -> None:
        if not isinstance(self.map, Tensor) or self.map.dim() != 2:
            raise ValueError(f"Gate.map must be an (H, W) tensor; got {_describe(self.map)}")
        for name in ("scale", "context_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"Gate.{name} must be a finite number; got {value!r}")


def is_context_layer(name: str) -> bool:
    """Whether module ``name``'s input has no spatial position (cross-attention K/V)."""
    return name.endswith(CONTEXT_LAYER_SUFFIXES)


def token_grid(tokens: int, size: tuple[int, int]) -> tuple[int, int] | None:
    """The (h, w) grid of ``tokens`` positions at one of the UNet's resolutions of a latent of
    ``size`` (H, W): the latent's, then each stride-2 downsampling's (ceil(H / 2), ...), down to
    1 x 1. None when no resolution has that many positions."""
    height, width = size
    while True:
        if height * width == tokens:
            return height, width
        if height == 1 and width == 1:
            return None
        height, width = math.ceil(height / 2), math.ceil(width / 2)


def resize_maps(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Gate maps (R, H, W) -> (R, h, w), each cell the mean of the latent positions it covers
    (area pooling: weights that sum to 1 over the LoRAs still do at every resolution)."""
    if tuple(maps.shape[1:]) == tuple(size):
        return maps
    return F.adaptive_avg_pool2d(maps.float().unsqueeze(1), size).squeeze(1).to(maps.dtype)


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return repr(value)


class RowGates:
    """The gates of one adapter over its rows in a ``rows()`` block, read at each layer's
    resolution; each resolution is computed once per block and device.

    gates: one per row (rows without a gate use their float scale everywhere).
    """

    def __init__(self, gates: list[Gate | float]):
        sizes = {tuple(g.map.shape) for g in gates if isinstance(g, Gate)} - {(1, 1)}
        if len(sizes) > 1:
            raise ValueError(
                f"the gates of one adapter in one rows() block must share a latent size; got {sorted(sizes)}"
            )
        # A 1 x 1 map is one weight over the whole image (the uniform gates before any exact step).
        self.size: tuple[int, int] | None = sizes.pop() if sizes else None
        self._gates = gates
        self._cache: dict[tuple, Tensor] = {}

    def _maps(self, device: torch.device) -> Tensor:
        """(R, H, W): each row's gate times its scale (a float scale: that number everywhere),
        built where the layers run: constants are filled there, never copied from the host, which
        would make it wait for a GPU."""
        size = self.size or (1, 1)
        return torch.stack(
            [
                g.map.detach().float().to(device).expand(size) * g.scale
                if isinstance(g, Gate)
                else torch.full(size, float(g), device=device)
                for g in self._gates
            ]
        )

    def _context(self, device: torch.device) -> Tensor:
        """(R,): each row's multiplier of layers without position."""
        return torch.stack(
            [
                torch.full((), g.context_scale if isinstance(g, Gate) else float(g), device=device)
                for g in self._gates
            ]
        )

    def multiplier(self, name: str, shape: torch.Size, device: torch.device, dtype: torch.dtype) -> Tensor:
        """What multiplies the adapter's delta of layer ``name``, whose output has ``shape``
        (R, C, h, w) for a conv, (R, T, C) for a transformer layer: (R, 1, h, w), (R, T, 1), or
        (R, 1, ...) for a layer without position."""
        dims = len(shape)
        ones = [1] * (dims - 1)
        if is_context_layer(name) or dims < 3:
            context = lambda: self._context(device).view(-1, *ones)  # noqa: E731
            return self._cached(("context", dims), device, dtype, context)
        maps = self._cached(("maps",), device, torch.float32, lambda: self._maps(device))
        if self.size is None:  # constant over the image
            return self._cached(("constant", dims), device, dtype, lambda: maps.view(-1, *ones))
        if dims == 4:
            grid = (shape[2], shape[3])
            return self._cached(("conv", grid), device, dtype, lambda: resize_maps(maps, grid).unsqueeze(1))
        grid = token_grid(shape[1], self.size)
        if grid is None:
            raise RuntimeError(
                f"LoRAtorio: layer {name} has {shape[1]} tokens, which is no resolution of the "
                f"{self.size[0]}x{self.size[1]} latent, so a gated step cannot place its LoRA outputs; "
                f"use exact steps only (exact_every=1)"
            )
        return self._cached(
            ("tokens", grid), device, dtype, lambda: resize_maps(maps, grid).flatten(1).unsqueeze(2)
        )

    def _cached(self, key: tuple, device: torch.device, dtype: torch.dtype, make) -> Tensor:
        full_key = (key, device, dtype)
        if full_key not in self._cache:
            self._cache[full_key] = make().to(dtype=dtype)
        return self._cache[full_key]
