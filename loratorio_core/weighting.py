"""Patch-wise LoRA weighting: similarity to the base, SoftMin over LoRAs, top-k, composition.

Shapes: N LoRAs, B samples, C channels, H x W latent, d patch side, h = ceil(H / d),
w = ceil(W / d). Edge patches that are smaller than d x d are kept, never dropped.
Every function is pure: tensors in, tensors out, nothing remembered.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import UPSAMPLE_MODES


def patch_grid(size: tuple[int, int], patch_size: int) -> tuple[int, int]:
    """(H, W) -> (h, w): the number of patch rows and columns, edge patches included."""
    _check_patch_size(patch_size)
    height, width = size
    return math.ceil(height / patch_size), math.ceil(width / patch_size)


def patch_cosine_similarity(eps_loras: Tensor, eps_base: Tensor, patch_size: int) -> Tensor:
    """Cosine similarity of each LoRA's prediction to the base's, patch by patch.

    eps_loras (N, B, C, H, W), eps_base (B, C, H, W) -> (N, B, h, w), in float32 (float64 if
    either input is float64) whatever the input dtype. The cosine runs over the C * d * d values
    of a patch (fewer for edge patches). A patch whose norm is zero gives 0, never NaN.
    """
    _check_patch_size(patch_size)
    if eps_loras.dim() != 5:
        raise ValueError(f"eps_loras must be (N, B, C, H, W); got shape {tuple(eps_loras.shape)}")
    if eps_base.shape != eps_loras.shape[1:]:
        raise ValueError(
            f"eps_base must be (B, C, H, W) = {tuple(eps_loras.shape[1:])} to match eps_loras; "
            f"got shape {tuple(eps_base.shape)}"
        )
    dtype = _reduction_dtype(eps_loras, eps_base)
    n, b, c, height, width = eps_loras.shape
    h, w = patch_grid((height, width), patch_size)
    pad = (0, w * patch_size - width, 0, h * patch_size - height)
    # Zero padding adds nothing to dot products or norms, so edge patches stay exact.
    loras = F.pad(eps_loras.to(dtype), pad).reshape(n, b, c, h, patch_size, w, patch_size)
    base = F.pad(eps_base.to(dtype), pad).reshape(b, c, h, patch_size, w, patch_size)
    dot = torch.einsum("nbcxpyq,bcxpyq->nbxy", loras, base)
    lora_sq = torch.einsum("nbcxpyq,nbcxpyq->nbxy", loras, loras)
    base_sq = torch.einsum("bcxpyq,bcxpyq->bxy", base, base)
    tiny = torch.finfo(dtype).tiny
    cos = dot * lora_sq.clamp_min(tiny).rsqrt() * base_sq.clamp_min(tiny).rsqrt()
    return cos.clamp(-1.0, 1.0)


def softmin_weights(similarity: Tensor, temperature: float, keep: Tensor | None = None) -> Tensor:
    """SoftMin over the LoRA axis: the LoRA that diverges most from the base weighs most.

    similarity (N, B, h, w) -> weights (N, B, h, w) = softmax(-similarity / temperature) over N,
    in float32 or wider. keep: optional bool (N, B) mask (top-k); LoRAs it drops get weight
    exactly 0 and the kept ones renormalise. Every sample must keep at least one LoRA
    (checked when keep is on the CPU).
    """
    if similarity.dim() != 4:
        raise ValueError(f"similarity must be (N, B, h, w); got shape {tuple(similarity.shape)}")
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not (0 < temperature < math.inf)
    ):
        raise ValueError(f"temperature must be a finite number > 0; got {temperature!r}")
    sim = similarity.to(_reduction_dtype(similarity))
    # Below the dtype's smallest normal number the weights are one-hot anyway; clamping keeps
    # 0 / temperature from becoming 0 / 0.
    temperature = max(temperature, torch.finfo(sim.dtype).tiny)
    if keep is None:
        # Shifting by the minimum keeps the largest logit at 0: no overflow at tiny temperatures.
        return torch.softmax((sim.amin(0, keepdim=True) - sim) / temperature, dim=0)
    _check_keep(keep, similarity.shape[:2])
    kept = keep.to(sim.device)[:, :, None, None]
    floor = sim.masked_fill(~kept, math.inf).amin(0, keepdim=True)
    logits = ((floor - sim) / temperature).masked_fill(~kept, -math.inf)
    return torch.softmax(logits, dim=0)


def upsample_weights(
    weights: Tensor, size: tuple[int, int], patch_size: int, mode: str = "nearest"
) -> Tensor:
    """Spread patch weights over the latent's pixels.

    weights (N, B, h, w) -> (N, B, 1, H, W). ``nearest``: each pixel takes the weight of the
    patch that contains it (edge patches included). ``bilinear``: interpolated between patch
    centres, then renormalised so the weights still sum to 1 at every pixel.
    """
    if weights.dim() != 4:
        raise ValueError(f"weights must be (N, B, h, w); got shape {tuple(weights.shape)}")
    if mode not in UPSAMPLE_MODES:
        raise ValueError(f"mode must be one of {', '.join(UPSAMPLE_MODES)}; got {mode!r}")
    height, width = size
    grid = patch_grid((height, width), patch_size)
    if tuple(weights.shape[2:]) != grid:
        raise ValueError(
            f"weights has a {tuple(weights.shape[2:])} patch grid, but size {(height, width)} "
            f"with patch_size {patch_size} needs {grid}"
        )
    n, b, h, w = weights.shape
    if mode == "nearest":
        rows = torch.arange(height, device=weights.device) // patch_size
        cols = torch.arange(width, device=weights.device) // patch_size
        return weights[:, :, rows][:, :, :, cols].unsqueeze(2)
    spread = F.interpolate(
        weights.reshape(n * b, 1, h, w),
        size=(h * patch_size, w * patch_size),
        mode="bilinear",
        align_corners=False,
    )[:, :, :height, :width].reshape(n, b, 1, height, width)
    total = spread.sum(0, keepdim=True).clamp_min(torch.finfo(spread.dtype).tiny)
    return spread / total


def compose(eps: Tensor, weights_up: Tensor) -> Tensor:
    """Pixel-wise weighted sum of the LoRAs' predictions.

    eps (N, B, C, H, W), weights_up (N, B, 1, H, W) -> (B, C, H, W) in eps's dtype
    (accumulated in float32 or wider).
    """
    if eps.dim() != 5:
        raise ValueError(f"eps must be (N, B, C, H, W); got shape {tuple(eps.shape)}")
    n, b, _, height, width = eps.shape
    if tuple(weights_up.shape) != (n, b, 1, height, width):
        raise ValueError(
            f"weights_up must be (N, B, 1, H, W) = {(n, b, 1, height, width)}; "
            f"got shape {tuple(weights_up.shape)}"
        )
    dtype = torch.promote_types(_reduction_dtype(eps), weights_up.dtype)
    return (eps.to(dtype) * weights_up.to(dtype)).sum(0).to(eps.dtype)


def mean_divergence(similarity: Tensor) -> Tensor:
    """Each LoRA's divergence from the base: mean over patches of 1 - s.

    similarity (N, B, h, w) -> (N, B).
    """
    if similarity.dim() != 4:
        raise ValueError(f"similarity must be (N, B, h, w); got shape {tuple(similarity.shape)}")
    return (1.0 - similarity.to(_reduction_dtype(similarity))).mean(dim=(2, 3))


def select_top_k(similarity: Tensor, k: int) -> Tensor:
    """Per sample, the k LoRAs that diverge most from the base.

    similarity (N, B, h, w) -> bool (N, B). Divergence is ``mean_divergence``; ties go to the
    LoRA that comes first.
    """
    if similarity.dim() != 4:
        raise ValueError(f"similarity must be (N, B, h, w); got shape {tuple(similarity.shape)}")
    n = similarity.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not (1 <= k <= n):
        raise ValueError(f"k must be an integer in [1, N={n}]; got {k!r}")
    order = torch.sort(mean_divergence(similarity), dim=0, descending=True, stable=True).indices
    keep = torch.zeros(similarity.shape[:2], dtype=torch.bool, device=similarity.device)
    return keep.scatter_(0, order[:k], True)


def _reduction_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_patch_size(patch_size: int) -> None:
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be an integer >= 1; got {patch_size!r}")


def _check_keep(keep: Tensor, shape: torch.Size) -> None:
    if keep.dtype != torch.bool or tuple(keep.shape) != tuple(shape):
        raise ValueError(
            f"keep must be a bool (N, B) = {tuple(shape)} mask; got {keep.dtype} of shape {tuple(keep.shape)}"
        )
    # On an accelerator this check would stall the stream; there the caller's mask is trusted.
    if keep.device.type == "cpu" and not bool(keep.any(dim=0).all()):
        raise ValueError("keep must keep at least one LoRA for every sample")
