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

from .config import UPSAMPLE_MODES, WEIGHTINGS


def patch_grid(size: tuple[int, int], patch_size: int) -> tuple[int, int]:
    """(H, W) -> (h, w): the number of patch rows and columns, edge patches included."""
    _check_patch_size(patch_size)
    height, width = size
    return math.ceil(height / patch_size), math.ceil(width / patch_size)


def patch_cosine_similarity(eps_loras: Tensor, eps_base: Tensor, patch_size: int) -> Tensor:
    """Cosine similarity of each LoRA's prediction to the base's, patch by patch.

    eps_loras (N, B, C, H, W), eps_base (B, C, H, W) -> (N, B, h, w), in float64 whatever the
    input dtype (float32 on a device without float64, Apple's MPS): LoRA and base predictions
    often agree to within 1e-4, where a float32 similarity holds 1 - s to a few digits only and the
    scale-free rules, which read the ratios of the divergences 1 - s, would see its rounding. The
    reduction is over N * B * C * H * W values, nothing next to a UNet call. The cosine runs over
    the C * d * d values of a patch (fewer for edge patches). A patch whose norm is zero gives 0,
    never NaN.
    """
    _check_patch_size(patch_size)
    if eps_loras.dim() != 5:
        raise ValueError(f"eps_loras must be (N, B, C, H, W); got shape {tuple(eps_loras.shape)}")
    if eps_base.shape != eps_loras.shape[1:]:
        raise ValueError(
            f"eps_base must be (B, C, H, W) = {tuple(eps_loras.shape[1:])} to match eps_loras; "
            f"got shape {tuple(eps_base.shape)}"
        )
    dtype = torch.float32 if eps_loras.device.type == "mps" else torch.float64
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


def patch_weights(similarity: Tensor, rule: str, temperature: float, keep: Tensor | None = None) -> Tensor:
    """Each LoRA's weight in each patch: the more it diverges from the base, the more weight.

    similarity (N, B, h, w) -> weights (N, B, h, w) summing to 1 over N, as
    softmax(logits / temperature) over the LoRAs, where the logits depend on ``rule``:

    - ``softmin``: -s (the paper's SoftMin). Its temperature is in units of cosine similarity,
      whose spread differs from model to model and step to step.
    - ``spread``: d - mean_N(d) over the sample's typical spread of d across the LoRAs (the mean
      over patches of std_N(d)), d = 1 - s: a temperature in units of "how differently the LoRAs
      move this image"; patches where they differ more than usual are picked more sharply.
    - ``median``: d over the sample's median d (over LoRAs and patches): a temperature relative
      to how far this step's predictions sit from the base.
    - ``power``: log d, i.e. weights proportional to d ** (1 / temperature): depends only on the
      ratios of the divergences within a patch, so scaling every divergence changes nothing.
    - ``rank``: the LoRA's rank by d within the patch (0 for the least divergent): only the order.
    - ``contrast``: log(d / m), m the LoRA's own mean d over the sample's patches, i.e. weights
      proportional to (d / m) ** (1 / temperature): a patch goes to the LoRA that acts there more
      than it does elsewhere in the image, whatever its overall strength. A LoRA that moves every
      pixel (a style, a background) no longer takes the patches where another draws something
      local (a character, its clothing, an object), and a weak LoRA is not outvoted by a strong one.
      With a single patch (d as large as the latent) every ratio is 1: uniform weights.

    Every rule but ``softmin`` is invariant to scaling all divergences of a sample; ``contrast`` to
    scaling each LoRA's divergences by a factor of its own. keep: bool
    (N, B) top-k mask; dropped LoRAs get exactly 0, take no part in the statistics, and the kept
    ones renormalise.
    """
    if rule not in WEIGHTINGS:
        raise ValueError(f"weighting rule must be one of {', '.join(WEIGHTINGS)}; got {rule!r}")
    if rule == "softmin":
        return softmin_weights(similarity, temperature, keep)
    if similarity.dim() != 4:
        raise ValueError(f"similarity must be (N, B, h, w); got shape {tuple(similarity.shape)}")
    kept = None
    if keep is not None:
        _check_keep(keep, similarity.shape[:2])
        kept = keep.to(similarity.device)[:, :, None, None].expand_as(similarity)
    logits = _divergence_logits(1.0 - similarity.to(_reduction_dtype(similarity)), rule, kept)
    # softmin_weights of -logits is softmax(logits / temperature), masked and overflow-safe.
    return softmin_weights(-logits, temperature, keep)


def _divergence_logits(divergence: Tensor, rule: str, kept: Tensor | None) -> Tensor:
    """(N, B, h, w) divergences -> the rule's logits (statistics over kept LoRAs only)."""
    tiny = torch.finfo(divergence.dtype).tiny
    d = divergence.clamp_min(0.0)
    if rule == "power":
        # A LoRA that equals the base in a patch (d = 0) gets -inf there unless all do.
        return d.clamp_min(tiny).log()
    if rule == "contrast":
        return _contrast_logits(d, kept)
    if rule == "rank":
        ranked = d if kept is None else d.masked_fill(~kept, -math.inf)
        return torch.argsort(torch.argsort(ranked, dim=0, stable=True), dim=0).to(d.dtype)
    mask = torch.ones_like(d, dtype=torch.bool) if kept is None else kept
    count = mask.sum(0, keepdim=True).clamp_min(1)
    if rule == "median":
        flat = d.masked_fill(~mask, math.nan).transpose(0, 1).flatten(1)  # (B, N*h*w)
        median = flat.nanmedian(dim=1).values.clamp_min(tiny)
        return d / median[None, :, None, None]
    mean = (d * mask).sum(0, keepdim=True) / count
    std = (((d - mean) ** 2 * mask).sum(0, keepdim=True) / count).sqrt()  # (1, B, h, w)
    typical = std.mean(dim=(0, 2, 3), keepdim=True).clamp_min(tiny)  # (1, B, 1, 1)
    return (d - mean) / typical


# Under ``contrast``, a LoRA whose mean divergence is below this fraction of the most active
# LoRA's acts nowhere: its own mean is floored there, so its noise is not blown up into a map.
INERT_FRACTION = 1e-3


def _contrast_logits(d: Tensor, kept: Tensor | None) -> Tensor:
    """(N, B, h, w) divergences -> log(d / m): m each LoRA's own mean over the sample's patches,
    floored at ``INERT_FRACTION`` of the largest kept LoRA's (so a LoRA that hardly moves the
    image, out of its domain everywhere, stays light instead of being scaled up to the others)."""
    tiny = torch.finfo(d.dtype).tiny
    own_mean = d.mean(dim=(2, 3), keepdim=True)  # (N, B, 1, 1)
    in_play = own_mean if kept is None else own_mean.masked_fill(~kept[:, :, :1, :1], 0.0)
    floor = INERT_FRACTION * in_play.amax(0, keepdim=True)
    return (d / torch.maximum(own_mean, floor).clamp_min(tiny)).clamp_min(tiny).log()


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


def select_top_k(similarity: Tensor, k: int, named: Tensor | None = None) -> Tensor:
    """Per sample, the k LoRAs to keep: those the prompt names first, then by divergence.

    similarity (N, B, h, w) -> bool (N, B). named: optional bool (N, B) or (N,): the LoRAs the
    prompt names (``relevance.tag_relevance`` > ``relevance.NAMED``); they rank above every
    unnamed one, and within each group the LoRAs that diverge most from the base
    (``mean_divergence``) come first; ties go to the LoRA that comes first.
    """
    if similarity.dim() != 4:
        raise ValueError(f"similarity must be (N, B, h, w); got shape {tuple(similarity.shape)}")
    n = similarity.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not (1 <= k <= n):
        raise ValueError(f"k must be an integer in [1, N={n}]; got {k!r}")
    score = mean_divergence(similarity)
    if named is not None:
        if named.dtype != torch.bool or tuple(named.shape) not in ((n,), tuple(similarity.shape[:2])):
            raise ValueError(
                f"named must be a bool (N,) or (N, B) mask with N = {n}; "
                f"got {named.dtype} of shape {tuple(named.shape)}"
            )
        mask = named.to(score.device).reshape(n, -1).expand_as(score)
        # Divergences are at most 2: adding 4 puts every named LoRA above every unnamed one.
        score = score + 4.0 * mask
    order = torch.sort(score, dim=0, descending=True, stable=True).indices
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
