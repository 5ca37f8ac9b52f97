"""Classifier-free guidance, the re-centered unconditional branch, and prediction spaces.

All similarity work happens on noise (epsilon) predictions. Hosts that work in denoised (x0)
space convert with ``eps_from_denoised`` and back with ``denoised_from_eps``, and hosts of
v-prediction models with ``eps_from_v`` and ``v_from_eps``: each is affine in the prediction and
the composition weights sum to 1, so composing eps and composing the matching x0 (or v) give the
same result. All four work in k-diffusion's sigma space (alpha-bar = 1 / (1 + sigma^2)), which is
where every host keeps its noise level; these are the only copies of these formulas.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .weighting import compose


def recentered_uncond(
    eps_base_uncond: Tensor,
    eps_loras_uncond: Tensor | None,
    weights_up: Tensor,
    lam: float,
) -> Tensor:
    """The unconditional branch re-centered on the base model.

    lam * eps_base_uncond + (1 - lam) * compose(eps_loras_uncond, weights_up).
    eps_base_uncond (B, C, H, W), eps_loras_uncond (N, B, C, H, W) (may be None when lam == 1:
    then no LoRA needs an unconditional pass), weights_up (N, B, 1, H, W) -> (B, C, H, W).
    """
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (0.0 <= lam <= 1.0):
        raise ValueError(f"lam must be in [0, 1]; got {lam!r}")
    if lam == 1.0:
        return eps_base_uncond
    if eps_loras_uncond is None:
        raise ValueError("eps_loras_uncond is required when lam < 1")
    if eps_loras_uncond.shape[1:] != eps_base_uncond.shape:
        raise ValueError(
            f"eps_loras_uncond must be (N, B, C, H, W) with (B, C, H, W) = "
            f"{tuple(eps_base_uncond.shape)}; got shape {tuple(eps_loras_uncond.shape)}"
        )
    mixed = compose(eps_loras_uncond, weights_up)
    if lam == 0.0:
        return mixed.to(eps_base_uncond.dtype)
    dtype = torch.promote_types(eps_base_uncond.dtype, torch.float32)
    out = lam * eps_base_uncond.to(dtype) + (1.0 - lam) * mixed.to(dtype)
    return out.to(eps_base_uncond.dtype)


def reused_uncond(eps_base_uncond: Tensor, lora_change: Tensor, lam: float) -> Tensor:
    """The re-centred unconditional branch with the LoRAs' change taken from the cond branch.

    lam * eps_base_uncond + (1 - lam) * (eps_base_uncond + lora_change) = eps_base_uncond +
    (1 - lam) * lora_change, where lora_change = composed cond - base cond: what the composed LoRAs
    change in the prediction for the positive prompt, assumed the same for the negative one (so no
    LoRA runs on it). eps_base_uncond, lora_change (B, C, H, W) -> (B, C, H, W), in
    eps_base_uncond's dtype (computed in float32 at least).
    """
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (0.0 <= lam <= 1.0):
        raise ValueError(f"lam must be in [0, 1]; got {lam!r}")
    if lora_change.shape != eps_base_uncond.shape:
        raise ValueError(
            f"lora_change must be (B, C, H, W) = {tuple(eps_base_uncond.shape)}; "
            f"got shape {tuple(lora_change.shape)}"
        )
    if lam == 1.0:
        return eps_base_uncond
    dtype = torch.promote_types(eps_base_uncond.dtype, torch.float32)
    out = eps_base_uncond.to(dtype) + (1.0 - lam) * lora_change.to(dtype)
    return out.to(eps_base_uncond.dtype)


def guided(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance: uncond + scale * (cond - uncond). (B, C, H, W) each."""
    if cond.shape != uncond.shape:
        raise ValueError(
            f"cond and uncond must have one shape; got {tuple(cond.shape)} and {tuple(uncond.shape)}"
        )
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number; got {scale!r}")
    return uncond + scale * (cond - uncond)


def eps_from_denoised(x: Tensor, denoised: Tensor, sigma: Tensor | float) -> Tensor:
    """k-diffusion's x0 prediction to the noise prediction: (x - denoised) / sigma.

    x, denoised (B, C, H, W); sigma a number or (B,) per sample (must be > 0).
    """
    return (x - denoised) / _per_sample(sigma, x)


def denoised_from_eps(x: Tensor, eps: Tensor, sigma: Tensor | float) -> Tensor:
    """The inverse of ``eps_from_denoised``: x - sigma * eps."""
    return x - _per_sample(sigma, x) * eps


def eps_from_v(x: Tensor, v: Tensor, sigma: Tensor | float) -> Tensor:
    """A v-prediction to the noise prediction: sqrt(a) v + sqrt(1 - a) x, alpha-bar a = 1 / (1 + sigma^2).

    x is the model's input, the noisy latent in variance-preserving scale (sqrt(a) x0 + sqrt(1 - a) eps:
    k-diffusion's x times c_in = 1 / sqrt(1 + sigma^2), or a diffusers scheduler's scaled sample);
    v = sqrt(a) eps - sqrt(1 - a) x0. x, v (B, C, H, W); sigma a number or (B,) per sample (>= 0).
    The result has v's dtype.
    """
    a, b = _vp_coefficients(sigma, v)
    return (a * v + b * x.to(v)).to(v.dtype)


def v_from_eps(x: Tensor, eps: Tensor, sigma: Tensor | float) -> Tensor:
    """The inverse of ``eps_from_v``: (eps - sqrt(1 - a) x) / sqrt(a). The result has eps's dtype."""
    a, b = _vp_coefficients(sigma, eps)
    return ((eps - b * x.to(eps)) / a).to(eps.dtype)


def _vp_coefficients(sigma: Tensor | float, like: Tensor) -> tuple[Tensor, Tensor]:
    """(sqrt(a), sqrt(1 - a)) for alpha-bar a = 1 / (1 + sigma^2), per sample, in ``like``'s dtype
    (computed in float32 at least: sigma^2 reaches ~200 on SD's schedule, too coarse in half)."""
    exact = torch.promote_types(like.dtype, torch.float32)
    sigma = _per_sample(sigma, like, exact)
    alpha_bar = 1 / (1 + sigma**2)
    return alpha_bar.sqrt().to(like.dtype), (1 - alpha_bar).sqrt().to(like.dtype)


def _per_sample(sigma: Tensor | float, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """sigma as a tensor (``dtype``, default x's) that broadcasts over x's samples."""
    sigma = torch.as_tensor(sigma, dtype=dtype or x.dtype, device=x.device)
    if sigma.dim() == 0:
        return sigma
    if sigma.dim() != 1 or sigma.shape[0] not in (1, x.shape[0]):
        raise ValueError(
            f"sigma must be a number, (1,) or (B,) = ({x.shape[0]},); got shape {tuple(sigma.shape)}"
        )
    return sigma.reshape(-1, *([1] * (x.dim() - 1)))
