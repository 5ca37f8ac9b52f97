"""Programmatic detectors for the pixel world, one per concept, on (B, 3, 24, 24) images in [0, 1].

Each detector returns a score per image and a threshold; present = score >= threshold. They key
on what the renderer guarantees: concept hues (both styles are affine maps applied equally to the
channels, which keep hue), where each category lives (figure in the middle columns, objects in
the bottom corners, the backdrop above the figure and beside it, the ground in the bottom rows),
and that the styles move the whole image's colour range (night pulls the brightest pixels down,
fog lifts the darkest up). Pearson correlations are unchanged by affine maps of brightness, so the
backdrop detectors see a backdrop the same under any style. ``validate`` measures precision and
recall on freshly rendered ground truth.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..synthetic.composition import add_pixel_noise, precision_recall, validation_scenes
from ..synthetic.detectors import hsv, luminance, smoothed
from .world import CONCEPT, CONCEPTS, SIZE, brick_texture, composition_sets, render, scene_for

HUE_TOLERANCE = 20.0
MIN_SATURATION = 0.3  # fogged concept colours keep >= 0.44, the unsaturated backdrops stay <= 0.2
MIN_CHROMA = 0.15  # max - min of RGB: concept colours keep >= 0.27 at night, noisy greys stay below

# Where each category lives (rows, columns), with margin for the jitter.
FIGURE_ZONE = (slice(7, 21), slice(5, 19))
_OBJECT_ZONE = torch.zeros(SIZE, SIZE, dtype=torch.bool)
_OBJECT_ZONE[14:21, :6] = True
_OBJECT_ZONE[14:21, 18:] = True
# Backdrop pixels no figure or object ever covers: rows 0-7 whole, rows 8-15 beside the figure.
_BACKDROP = torch.zeros(SIZE, SIZE, dtype=torch.bool)
_BACKDROP[:8] = True
_BACKDROP[8:16, :5] = True
_BACKDROP[8:16, 19:] = True

THRESHOLDS = {
    "character": 12.0,  # pixels of the hue in the figure zone (a figure shows 30-90 beside its clothing)
    "clothing": 6.0,  # pixels of the hue in the figure zone (trousers 15-30, a sash 10-25)
    "object": 5.0,  # pixels of the hue in the bottom corners (a ball 21, a tree 13)
    "bricko": 0.6,  # correlation of backdrop luma with the brick wall at its best phase (wall: > 0.85)
    "dusko": 0.6,  # correlation of backdrop luma with the row index (dusk: > 0.9; plain: ~0)
    "nocta": 0.45,  # 1 - the 95th percentile of value (every scene's figure has value >= 0.85)
    "fogu": 0.42,  # the 5th percentile of value (the ground's 0.30 lifts to 0.58)
}


def hue_mask(images: Tensor, hue: float) -> Tensor:
    """(B, H, W) bool: saturated, colourful pixels within ``HUE_TOLERANCE`` of ``hue``."""
    h, s, v = hsv(smoothed(images))
    distance = (h - hue).abs()
    distance = torch.minimum(distance, 360.0 - distance)
    return (distance <= HUE_TOLERANCE) & (s >= MIN_SATURATION) & (s * v >= MIN_CHROMA)


def score(name: str, images: Tensor) -> Tensor:
    """(B, 3, H, W) -> (B,) the detector score of concept ``name``."""
    concept = CONCEPT[name]
    if concept.category in ("character", "clothing"):
        return hue_mask(images, concept.hue)[:, FIGURE_ZONE[0], FIGURE_ZONE[1]].sum((1, 2)).float()
    if concept.category == "object":
        return hue_mask(images, concept.hue)[:, _OBJECT_ZONE].sum(1).float()
    if name == "bricko":
        lum = luminance(images)[:, _BACKDROP]
        return _best_correlation(lum, _brick_phases())
    if name == "dusko":
        rows = torch.arange(SIZE, dtype=torch.float32)[:, None].expand(SIZE, SIZE)[_BACKDROP]
        return _best_correlation(luminance(smoothed(images))[:, _BACKDROP], rows[None])
    value = smoothed(images).clamp(0, 1).amax(1).flatten(1)
    if name == "nocta":
        return 1.0 - value.quantile(0.95, dim=1)
    return value.quantile(0.05, dim=1)  # fogu


def threshold(name: str) -> float:
    """The score at or above which ``name`` counts as present."""
    return THRESHOLDS.get(name, THRESHOLDS.get(CONCEPT[name].category))


def detect(name: str, images: Tensor) -> Tensor:
    """(B, 3, H, W) -> (B,) bool: concept ``name`` is present."""
    return score(name, images) >= threshold(name)


def detect_all(images: Tensor) -> dict[str, Tensor]:
    """Every concept's detection, (B,) bool each."""
    return {c.name: detect(c.name, images) for c in CONCEPTS}


def _brick_phases() -> Tensor:
    """(P, K) the brick wall's luma on the backdrop pixels at every phase of its 8x8 period: a wall
    whose courses start elsewhere is still a brick wall (a convolutional model picks any phase)."""
    phases = [luminance(brick_texture(dy, dx)[None])[0][_BACKDROP] for dy in range(8) for dx in range(8)]
    return torch.stack(phases)


def _best_correlation(values: Tensor, templates: Tensor) -> Tensor:
    """(B, K), (P, K) -> (B,) the best Pearson correlation of each row with any template."""
    x = values - values.mean(1, keepdim=True)
    t = templates - templates.mean(1, keepdim=True)
    corr = (x @ t.T) / (x.norm(dim=1)[:, None] * t.norm(dim=1)[None]).clamp_min(1e-6)
    return corr.max(1).values


def validate(count: int = 400, seed: int = 1234, noise: float = 0.0) -> dict[str, dict[str, float]]:
    """Precision and recall of every detector on ``count`` freshly rendered scenes of random
    composition sets (``composition.validation_scenes``), with Gaussian pixel noise of std ``noise``.

    -> {concept: {"precision", "recall", "positives", "negatives"}}.
    """
    scenes = validation_scenes(composition_sets(), scene_for, count, seed)
    images = add_pixel_noise(torch.stack([render(s) for s in scenes]), noise, seed)
    return precision_recall(detect_all(images), [set(s.concepts()) for s in scenes])
