"""The synthetic world: concepts, scene specs, a renderer, captions and the vocabulary.

A scene is a 32x32 RGB image in [0, 1]: a background (a plain colour the base model knows, or
a texture), a figure near the centre (a white shape the base model knows, or a character), an
optional clothing pattern drawn ON the figure, an optional small object in a top corner and an
optional global style. The base model is trained on plain scenes only; every other concept is
taught by its own LoRA behind its own trigger token (ComposLoRA's five categories).

Colours are chosen so that the detectors can work on hue: the backgrounds and base figures are
unsaturated, every concept colour has its own hue, and both styles only multiply brightness
(which keeps hue and saturation).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from . import composition
from .composition import CATEGORIES, SLOTS

SIZE = 32
CONTEXT_LENGTH = 8
PAD = "<pad>"

BASE_SHAPES = ("square", "circle", "bar")
BASE_BACKGROUNDS = {"gray": (0.45, 0.45, 0.45), "light": (0.72, 0.72, 0.70), "slate": (0.33, 0.36, 0.40)}


@dataclass(frozen=True)
class Concept:
    """One LoRA's concept: its name (the trigger token), category and what it draws.

    hue: the concept's hue in degrees where it has a colour of its own (detectors key on it).
    """

    name: str
    category: str
    description: str
    color: tuple[float, float, float] | None = None
    hue: float | None = None


CONCEPTS = (
    Concept("kiro", "character", "a red plus-shaped figure", (0.90, 0.15, 0.10), 4.0),
    Concept("mumo", "character", "a blue ring figure", (0.15, 0.35, 0.95), 224.0),
    Concept("tava", "character", "a green triangle figure", (0.15, 0.80, 0.20), 124.0),
    Concept("zebu", "clothing", "black horizontal stripes on the figure", (0.03, 0.03, 0.03)),
    Concept("poka", "clothing", "yellow dots on the figure", (0.95, 0.88, 0.10), 54.0),
    Concept("checka", "background", "a grey checkerboard background"),
    Concept("stria", "background", "a beige diagonal-stripe background"),
    Concept("pipa", "object", "a small magenta diamond in a top corner", (0.90, 0.20, 0.80), 305.0),
    Concept("cubo", "object", "a small cyan square in a top corner", (0.10, 0.85, 0.85), 180.0),
    Concept("scanz", "style", "dark scanlines: every other row darkened"),
    Concept("vigna", "style", "a vignette: the image darkens toward its edges"),
)
CONCEPT = {c.name: c for c in CONCEPTS}
BY_CATEGORY = {cat: tuple(c.name for c in CONCEPTS if c.category == cat) for cat in CATEGORIES}

VOCABULARY = (PAD, *BASE_SHAPES, *BASE_BACKGROUNDS, *(c.name for c in CONCEPTS))
TOKEN_ID = {word: i for i, word in enumerate(VOCABULARY)}

SCANLINE_FACTOR = 0.55
VIGNETTE_DEPTH = 0.65


@dataclass(frozen=True)
class Scene:
    """Everything that decides a rendering.

    background: a plain colour (``BASE_BACKGROUNDS``) or a background concept. figure: a base
    shape or a character concept. clothing, object, style: a concept name or None.
    dx, dy: the figure's offset from its home position (pixels); object_right: the object's corner.
    """

    background: str = "gray"
    figure: str = "square"
    clothing: str | None = None
    object: str | None = None
    style: str | None = None
    dx: int = 0
    dy: int = 0
    object_right: bool = False

    def concepts(self) -> tuple[str, ...]:
        """The LoRA concepts in the scene, character first, then in category order."""
        parts = (self.figure, self.clothing, self.background, self.object, self.style)
        return tuple(p for p in parts if p in self.known_concepts())

    @staticmethod
    def known_concepts() -> dict[str, Concept]:
        """The world's concepts by name (a world that reuses this scene type gives its own)."""
        return CONCEPT

    def at(self, layout: dict) -> Scene:
        """The same scene in another layout (one of ``LAYOUTS``)."""
        return replace(self, **layout)


# Every layout a scene can take (the nuisance variables), in a fixed order.
LAYOUTS = [
    {"dx": dx, "dy": dy, "object_right": side}
    for dx in range(-2, 3)
    for dy in range(-1, 2)
    for side in (0, 1)
]


def random_layout(rng: random.Random) -> dict:
    """The nuisance variables of a scene (position jitter, the object's corner)."""
    return {"dx": rng.randint(-2, 2), "dy": rng.randint(-1, 1), "object_right": rng.random() < 0.5}


def scene_for(concepts: tuple[str, ...], rng: random.Random, background: str | None = None) -> Scene:
    """A random scene showing ``concepts`` (at most one per category); what they leave open (plain
    background colour, base shape when there is no character) is drawn from ``rng``."""
    fields = {
        "background": background or rng.choice(tuple(BASE_BACKGROUNDS)),
        "figure": rng.choice(BASE_SHAPES),
    }
    for name in concepts:
        fields[SLOTS[CONCEPT[name].category]] = name
    return Scene(**fields, **random_layout(rng))


def caption(scene: Scene) -> list[str]:
    """The scene's words: the figure (shape or character trigger), the plain background colour
    when there is no background concept, then the other triggers."""
    words = [scene.figure]
    words.append(scene.background)
    words += [w for w in (scene.clothing, scene.object, scene.style) if w is not None]
    return words


def tokenize(words: list[str] | tuple[str, ...]) -> Tensor:
    """Words -> (CONTEXT_LENGTH,) long token ids, padded with ``PAD`` (id 0)."""
    return composition.tokenize(words, VOCABULARY, CONTEXT_LENGTH)


# --- masks ------------------------------------------------------------------------------------

_YY, _XX = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")


def figure_center(scene: Scene) -> tuple[int, int]:
    """(row, column) of the figure's centre: home (18, 16) plus the scene's jitter."""
    return 18 + scene.dy, 16 + scene.dx


def figure_mask(scene: Scene) -> Tensor:
    """(H, W) bool: the figure's pixels (a 12x12 box at most, around ``figure_center``)."""
    cy, cx = figure_center(scene)
    y, x = _YY - cy + 0.5, _XX - cx + 0.5  # centred on the pixel corner between the 4 middle pixels
    r = torch.sqrt(x * x + y * y)
    shapes = {
        "square": (x.abs() <= 5) & (y.abs() <= 5),
        "circle": r <= 5.5,
        "bar": (x.abs() <= 6) & (y.abs() <= 3),
        "kiro": ((x.abs() <= 2) & (y.abs() <= 6)) | ((y.abs() <= 2) & (x.abs() <= 6)),
        "mumo": (r <= 6.2) & (r >= 3.0),
        "tava": (y <= 5.5) & (y >= -6) & (x.abs() <= (y + 6) / 2 + 0.5),
    }
    return shapes[scene.figure]


def clothing_mask(scene: Scene) -> Tensor:
    """(H, W) bool: the clothing's pixels, always inside the figure (the co-located case)."""
    if scene.clothing is None:
        return torch.zeros(SIZE, SIZE, dtype=torch.bool)
    cy, cx = figure_center(scene)
    fy, fx = _YY - (cy - 6), _XX - (cx - 6)
    if scene.clothing == "zebu":  # 2-px stripes every 4 px
        pattern = (fy // 2) % 2 == 1
    else:  # poka: 2x2 dots on a 4-px grid
        pattern = ((fy % 4) >= 1) & ((fy % 4) <= 2) & ((fx % 4) >= 1) & ((fx % 4) <= 2)
    return pattern & figure_mask(scene)


def object_mask(scene: Scene) -> Tensor:
    """(H, W) bool: the object's pixels, a 7x7 glyph in a top corner."""
    if scene.object is None:
        return torch.zeros(SIZE, SIZE, dtype=torch.bool)
    cy, cx = 4, (27 if scene.object_right else 4)
    y, x = _YY - cy, _XX - cx
    if scene.object == "pipa":
        return (x.abs() + y.abs()) <= 3
    return (x.abs() <= 2) & (y.abs() <= 2)


def background_texture(name: str) -> Tensor:
    """(3, H, W) a background: a plain colour or a texture concept, at its fixed phase."""
    if name in BASE_BACKGROUNDS:
        return torch.tensor(BASE_BACKGROUNDS[name]).view(3, 1, 1).expand(3, SIZE, SIZE).clone()
    if name == "checka":
        on = (_XX // 4 + _YY // 4) % 2 == 0
        dark, light = torch.tensor((0.33, 0.33, 0.33)), torch.tensor((0.70, 0.70, 0.70))
    else:  # stria: diagonal stripes
        on = ((_XX + _YY) // 4) % 2 == 0
        dark, light = torch.tensor((0.55, 0.50, 0.42)), torch.tensor((0.80, 0.75, 0.66))
    return torch.where(on[None], light.view(3, 1, 1), dark.view(3, 1, 1))


def style_factor(style: str | None) -> Tensor:
    """(H, W) the brightness multiplier of a style (ones without one)."""
    if style == "scanz":
        return torch.where(_YY % 2 == 1, SCANLINE_FACTOR, 1.0)
    if style == "vigna":
        r = torch.sqrt((_XX - 15.5) ** 2 + (_YY - 15.5) ** 2)
        falloff = ((r - 8.0) / (15.5 * math.sqrt(2) - 8.0)).clamp(0, 1)
        return 1.0 - VIGNETTE_DEPTH * falloff
    return torch.ones(SIZE, SIZE)


def render(scene: Scene) -> Tensor:
    """The scene as a (3, 32, 32) image in [0, 1]."""
    image = background_texture(scene.background)
    figure_color = CONCEPT[scene.figure].color if scene.figure in CONCEPT else (0.97, 0.97, 0.97)
    image = _paint(image, figure_mask(scene), figure_color)
    if scene.clothing is not None:
        image = _paint(image, clothing_mask(scene), CONCEPT[scene.clothing].color)
    if scene.object is not None:
        image = _paint(image, object_mask(scene), CONCEPT[scene.object].color)
    return image * style_factor(scene.style)


def _paint(image: Tensor, mask: Tensor, color: tuple[float, float, float]) -> Tensor:
    return torch.where(mask[None], torch.tensor(color).view(3, 1, 1), image)


# --- composition sets -------------------------------------------------------------------------


def composition_sets() -> list[tuple[str, ...]]:
    """ComposLoRA's sets: 2 to 5 LoRAs, exactly one character, at most one per other category.

    -> 240 sets (24 + 72 + 96 + 48 for N = 2..5), each character first then in category order.
    """
    return composition.composition_sets(BY_CATEGORY)


def split_sets(sets: list[tuple[str, ...]], seed: int = 0) -> dict[str, list[tuple[str, ...]]]:
    """A fixed half/half split into ``dev`` and ``test`` (``composition.split_sets``)."""
    return composition.split_sets(sets, seed)


def prompt_for(concepts: tuple[str, ...], background: str = "gray") -> list[str]:
    """A composition prompt: the triggers (character first), plus a plain background colour when
    no background LoRA is among them (the scene still needs one)."""
    scene = Scene(background=background, figure="square")
    scene = replace(scene, **{SLOTS[CONCEPT[n].category]: n for n in concepts})
    return caption(scene)
