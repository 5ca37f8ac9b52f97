"""Programmatic detectors, one per concept, on (B, 3, 32, 32) images in [0, 1].

Each detector returns a score per image and a threshold; present = score >= threshold. They
key on what the renderer guarantees: concept hues (styles only scale brightness, which keeps
hue and saturation), where each category lives (figure near the centre, object in a top
corner, background at the edges) and the styles' brightness patterns. ``validate`` measures
their precision and recall on freshly rendered ground truth.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .composition import add_pixel_noise, precision_recall, validation_scenes
from .world import (
    CONCEPT,
    CONCEPTS,
    SIZE,
    background_texture,
    composition_sets,
    render,
    scene_for,
)

HUE_TOLERANCE = 20.0
TEXTURE_PERIOD = 8  # both background textures repeat every 8 pixels along x and y
MIN_SATURATION = 0.45
MIN_VALUE = 0.12
MIN_CHROMA = 0.25  # max - min of RGB: keeps noisy greys out (concept colours have >= 0.38 under any style)

# Where each category lives (rows, columns), with margin for the jitter.
CENTRE = (slice(9, 28), slice(6, 27))
TOP = slice(0, 9)
_EDGE = torch.zeros(SIZE, SIZE, dtype=torch.bool)
_EDGE[27:, :] = True
_EDGE[9:, :5] = True
_EDGE[9:, 27:] = True

THRESHOLDS = {
    "character": 20.0,  # pixels of the hue near the centre (a figure has 70-90)
    "zebu": 2.0,  # rows of the figure holding >= 3 near-black pixels (3 stripes drawn)
    "poka": 3.0,  # yellow pixels on the figure after the 2x2 filter (a figure carries 4-9 dots, >= 1 each)
    "object": 8.0,  # pixels of the hue in the top band (a glyph has 25)
    "background": 0.75,  # correlation of edge brightness with the texture at its best phase
    "scanz": 0.2,  # 1 - (odd rows' brightness / even rows')
    "vigna": 0.2,  # 1 - (outer columns' brightness / inner columns')
}


def hsv(images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(B, 3, H, W) RGB -> hue in degrees [0, 360), saturation, value: each (B, H, W)."""
    r, g, b = images.clamp(0, 1).unbind(1)
    value, _ = images.clamp(0, 1).max(1)
    low, _ = images.clamp(0, 1).min(1)
    chroma = value - low
    safe = chroma.clamp_min(1e-6)
    hue = torch.where(
        value == r, ((g - b) / safe) % 6, torch.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4)
    )
    return hue * 60.0, chroma / value.clamp_min(1e-6), value


def hue_mask(images: Tensor, hue: float) -> Tensor:
    """(B, H, W) bool: saturated, colourful pixels within ``HUE_TOLERANCE`` of ``hue``."""
    h, s, v = hsv(smoothed(images))
    distance = (h - hue).abs()
    distance = torch.minimum(distance, 360.0 - distance)
    return (distance <= HUE_TOLERANCE) & (s >= MIN_SATURATION) & (v >= MIN_VALUE) & (s * v >= MIN_CHROMA)


def smoothed(images: Tensor) -> Tensor:
    """A 2x2 box filter (same size): generated pixels carry noise, every drawn feature is >= 2x2."""
    return F.avg_pool2d(F.pad(images, (0, 1, 0, 1), mode="replicate"), 2, 1)


def luminance(images: Tensor) -> Tensor:
    """(B, 3, H, W) -> (B, H, W) Rec. 601 luma."""
    weights = torch.tensor([0.299, 0.587, 0.114], device=images.device).view(1, 3, 1, 1)
    return (images.clamp(0, 1) * weights).sum(1)


def score(name: str, images: Tensor) -> Tensor:
    """(B, 3, H, W) -> (B,) the detector score of concept ``name``."""
    concept = CONCEPT[name]
    if concept.category == "character":
        return hue_mask(images, concept.hue)[:, CENTRE[0], CENTRE[1]].sum((1, 2)).float()
    if name == "zebu":
        dark = (luminance(images) < 0.1)[:, CENTRE[0], CENTRE[1]]
        return (dark.sum(2) >= 3).sum(1).float()
    if name == "poka":
        return hue_mask(images, concept.hue)[:, CENTRE[0], CENTRE[1]].sum((1, 2)).float()
    if concept.category == "object":
        return hue_mask(images, concept.hue)[:, TOP].sum((1, 2)).float()
    if concept.category == "background":
        return _edge_correlation(texture_contrast(luminance(images)), _texture_phases(name))
    lum = luminance(images)
    if name == "scanz":
        return 1.0 - lum[:, 1::2].mean((1, 2)) / lum[:, 0::2].mean((1, 2)).clamp_min(1e-3)
    # vigna: the outer two columns against columns 5-6 in from each side, over rows 8-23
    # (4 checker rows: both sets see as much of every texture).
    rows = slice(8, 24)
    outer = torch.cat([lum[:, rows, :2], lum[:, rows, 30:]], 2).mean((1, 2))
    inner = torch.cat([lum[:, rows, 5:7], lum[:, rows, 25:27]], 2).mean((1, 2))
    return 1.0 - outer / inner.clamp_min(1e-3)


def threshold(name: str) -> float:
    """The score at or above which ``name`` counts as present."""
    category = CONCEPT[name].category
    return THRESHOLDS.get(name, THRESHOLDS.get(category))


def detect(name: str, images: Tensor) -> Tensor:
    """(B, 3, H, W) -> (B,) bool: concept ``name`` is present."""
    return score(name, images) >= threshold(name)


def detect_all(images: Tensor) -> dict[str, Tensor]:
    """Every concept's detection, (B,) bool each."""
    return {c.name: detect(c.name, images) for c in CONCEPTS}


def texture_contrast(lum: Tensor) -> Tensor:
    """(B, H, W) luma -> (B, H, W) its texture, with the styles and the colour level taken out.

    The styles multiply brightness, so work in log luma: scanz (every other row darker) is then
    removed by averaging row pairs, vigna (a smooth falloff) and the background's level by
    subtracting the 8x8 local mean (one texture period, over which the texture's own mean is flat).
    """
    x = torch.log(lum.clamp_min(0.02))[:, None]
    x = F.avg_pool2d(F.pad(x, (0, 0, 0, 1), mode="replicate"), (2, 1), 1)
    local_mean = F.avg_pool2d(F.pad(x, (4, 3, 4, 3), mode="replicate"), TEXTURE_PERIOD, 1)
    return (x - local_mean)[:, 0]


def _texture_phases(name: str) -> Tensor:
    """(P, H, W) the texture contrast of background ``name`` at every phase of its period.

    A texture is the concept, not where its cells start: a convolutional model draws a
    checkerboard with any offset (it has little to lock the phase to), and a shifted checkerboard
    is still a checkerboard. The other texture at its best phase correlates at most ~0.7 with
    either (rendered, any style, noise 0.05), a texture itself at least ~0.8: hence 0.75."""
    texture = luminance(background_texture(name)[None])[0]
    shifts = range(TEXTURE_PERIOD)
    return texture_contrast(
        torch.stack([torch.roll(texture, (dy, dx), (0, 1)) for dy in shifts for dx in shifts])
    )


def _edge_correlation(lum: Tensor, templates: Tensor) -> Tensor:
    """(B, H, W), (P, H, W) -> (B,) the best Pearson correlation with any template, over the edge
    pixels (never covered by the figure or the object)."""
    x = lum[:, _EDGE]
    t = templates[:, _EDGE]
    x = x - x.mean(1, keepdim=True)
    t = t - t.mean(1, keepdim=True)
    corr = (x @ t.T) / (x.norm(dim=1)[:, None] * t.norm(dim=1)[None]).clamp_min(1e-6)
    return corr.max(1).values


def validate(count: int = 400, seed: int = 1234, noise: float = 0.0) -> dict[str, dict[str, float]]:
    """Precision and recall of every detector on ``count`` freshly rendered scenes of random
    composition sets (``composition.validation_scenes``: some with one concept of the set dropped,
    so every detector meets scenes of its own category without its concept), with Gaussian pixel
    noise of std ``noise``.

    -> {concept: {"precision", "recall", "positives", "negatives"}}.
    """
    scenes = validation_scenes(composition_sets(), scene_for, count, seed)
    images = add_pixel_noise(torch.stack([render(s) for s in scenes]), noise, seed)
    return precision_recall(detect_all(images), [set(s.concepts()) for s in scenes])
