"""The pixel world: concepts, scenes, a renderer, captions and the vocabulary.

A scene is a 24x24 RGB image in [0, 1] with a fixed dark ground (the bottom 3 rows) under a
backdrop (a plain colour the base model knows, or a background concept). A figure stands on the
ground near the middle (a white shape the base model knows, or a character), clothing is drawn ON
the figure (trousers over its lower part, a sash across it), an object sits on the ground in a
bottom corner, and a style transforms every pixel's colour (night darkens, fog lifts toward white).

Colours are chosen so that the detectors can work on hue: the backdrops, the ground and the base
figures are unsaturated, every concept colour has its own hue, at least 45 degrees from those of
the concepts that share its place (the figure's: characters and clothing; the corners': objects),
and both styles are affine maps applied equally to the three channels (which keep hue).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..synthetic import composition
from ..synthetic import world as synthetic_world
from ..synthetic.composition import CATEGORIES, SLOTS
from ..synthetic.world import Concept

SIZE = 24
GROUND_ROWS = 3  # rows 21-23: the ground every scene stands on
CONTEXT_LENGTH = 8
PAD = "<pad>"
GLUE_WORDS = ("wearing", "on", "with")  # the caption's grammar, between the concept words

BASE_SHAPES = ("pillar", "egg", "stump")
BASE_BACKGROUNDS = {"pale": (0.80, 0.80, 0.77), "dim": (0.42, 0.42, 0.44), "ashen": (0.62, 0.60, 0.57)}
GROUND = (0.30, 0.27, 0.24)
FIGURE_WHITE = (0.95, 0.95, 0.93)

CONCEPTS = (
    Concept("hopa", "character", "a red-orange hourglass figure", (0.95, 0.32, 0.08), 16.0),
    Concept("arky", "character", "a teal arch figure", (0.10, 0.80, 0.72), 174.0),
    Concept("tebo", "character", "a violet T-shaped figure", (0.62, 0.22, 0.95), 273.0),
    Concept("pantz", "clothing", "blue trousers over the figure's lower part", (0.15, 0.32, 0.92), 226.0),
    Concept("sashu", "clothing", "a pink sash across the figure", (0.95, 0.20, 0.60), 328.0),
    Concept("bricko", "background", "a grey brick wall"),
    Concept("dusko", "background", "a dusk gradient: dark at the top, light toward the ground"),
    Concept("balla", "object", "a yellow ball on the ground in a bottom corner", (0.95, 0.85, 0.10), 53.0),
    Concept("treeb", "object", "a small green tree on the ground in a corner", (0.15, 0.75, 0.15), 120.0),
    Concept("nocta", "style", "night: every colour darkened to 45%"),
    Concept("fogu", "style", "fog: every colour lifted 40% of the way to white"),
)
CONCEPT = {c.name: c for c in CONCEPTS}
BY_CATEGORY = {cat: tuple(c.name for c in CONCEPTS if c.category == cat) for cat in CATEGORIES}

VOCABULARY = (PAD, *GLUE_WORDS, *BASE_SHAPES, *BASE_BACKGROUNDS, *(c.name for c in CONCEPTS))
TOKEN_ID = {word: i for i, word in enumerate(VOCABULARY)}

NIGHT_FACTOR = 0.45
FOG_AMOUNT = 0.40

# Every layout a scene can take: the figure's offset (dx, dy) and the object's corner.
LAYOUTS = [
    {"dx": dx, "dy": dy, "object_right": side} for dx in range(-2, 3) for dy in (-1, 0) for side in (0, 1)
]


@dataclass(frozen=True)
class Scene(synthetic_world.Scene):
    """Everything that decides a rendering (the first world's fields, this world's defaults).

    background: a plain colour (``BASE_BACKGROUNDS``) or a background concept. figure: a base
    shape or a character concept. clothing, object, style: a concept name or None.
    dx, dy: the figure's offset from its home position (pixels); object_right: the object's corner.
    """

    background: str = "pale"
    figure: str = "pillar"

    @staticmethod
    def known_concepts() -> dict[str, Concept]:
        return CONCEPT


def scene_for(concepts: tuple[str, ...], rng: random.Random, background: str | None = None) -> Scene:
    """A random scene showing ``concepts`` (at most one per category); what they leave open (plain
    backdrop colour, base shape when there is no character) and the layout are drawn from ``rng``."""
    fields = {
        "background": background or rng.choice(tuple(BASE_BACKGROUNDS)),
        "figure": rng.choice(BASE_SHAPES),
    }
    for name in concepts:
        fields[SLOTS[CONCEPT[name].category]] = name
    return Scene(**fields).at(rng.choice(LAYOUTS))


def caption(scene: Scene) -> list[str]:
    """The scene's words: ``<figure> [wearing <clothing>] on <backdrop> [with <object>] [<style>]``."""
    words = [scene.figure]
    if scene.clothing is not None:
        words += ["wearing", scene.clothing]
    words += ["on", scene.background]
    if scene.object is not None:
        words += ["with", scene.object]
    if scene.style is not None:
        words.append(scene.style)
    return words


def tokenize(words: list[str] | tuple[str, ...]) -> Tensor:
    """Words -> (CONTEXT_LENGTH,) long token ids, padded with ``PAD`` (id 0)."""
    return composition.tokenize(words, VOCABULARY, CONTEXT_LENGTH)


def prompt_for(concepts: tuple[str, ...], background: str = "pale") -> list[str]:
    """A composition prompt: the caption of a scene with ``concepts`` (a plain backdrop colour
    when none of them is a background; a character is always among a set's concepts)."""
    scene = Scene(background=background, figure="pillar")
    return caption(replace(scene, **{SLOTS[CONCEPT[n].category]: n for n in concepts}))


# --- masks ------------------------------------------------------------------------------------

_YY, _XX = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")


def figure_coordinates(scene: Scene) -> tuple[Tensor, Tensor]:
    """(x, y) of every pixel relative to the figure's centre (home: between columns 11 and 12, and
    rows 14 and 15, so a 12-row figure stands on row 20, just above the ground)."""
    return _XX - (12 + scene.dx) + 0.5, _YY - (15 + scene.dy) + 0.5


def figure_mask(scene: Scene) -> Tensor:
    """(H, W) bool: the figure's pixels (at most 10 wide and 12 tall)."""
    x, y = figure_coordinates(scene)
    tall = y.abs() <= 6
    shapes = {
        "pillar": (x.abs() <= 2.5) & tall,
        "egg": (x / 4.3) ** 2 + (y / 6.3) ** 2 <= 1,
        "stump": (x.abs() <= 4.5) & (y >= 1) & (y <= 6),
        "hopa": (x.abs() <= 0.7 * y.abs() + 0.8) & tall,
        "arky": (x.abs() <= 4.5) & tall & ~((x.abs() <= 1.5) & (y >= -1)),
        "tebo": ((x.abs() <= 4.5) & (y >= -6) & (y <= -4)) | ((x.abs() <= 1.5) & tall),
    }
    return shapes[scene.figure]


def clothing_mask(scene: Scene) -> Tensor:
    """(H, W) bool: the clothing's pixels, always inside the figure (the co-located case)."""
    if scene.clothing is None:
        return torch.zeros(SIZE, SIZE, dtype=torch.bool)
    x, y = figure_coordinates(scene)
    if scene.clothing == "pantz":  # the lower 5 rows of the figure
        worn = y >= 2
    else:  # sashu: a 5-px band from the upper left to the lower right
        worn = (x - y).abs() <= 2.0
    return worn & figure_mask(scene)


def object_mask(scene: Scene) -> Tensor:
    """(H, W) bool: the object's pixels, a 5x5 glyph on the ground (rows 16-20) in a bottom corner."""
    if scene.object is None:
        return torch.zeros(SIZE, SIZE, dtype=torch.bool)
    cy, cx = 18, (21 if scene.object_right else 2)
    y, x = _YY - cy, _XX - cx
    if scene.object == "balla":
        return x * x + y * y <= 5
    return (y.abs() <= 2) & (x.abs() <= (y + 2) / 2 + 0.6)  # treeb: a triangle pointing up


def backdrop(name: str) -> Tensor:
    """(3, H, W) a backdrop over the whole image (the ground is painted over it)."""
    if name in BASE_BACKGROUNDS:
        return torch.tensor(BASE_BACKGROUNDS[name]).view(3, 1, 1).expand(3, SIZE, SIZE).clone()
    if name == "dusko":  # dark at the top, light just above the ground
        level = 0.25 + 0.60 * (_YY.float() / (SIZE - GROUND_ROWS - 1)).clamp(0, 1)
        return torch.stack([level, level, level * 1.04]).clamp(0, 1)
    return brick_texture()


def brick_texture(dy: int = 0, dx: int = 0) -> Tensor:
    """(3, H, W) the brick wall: 3-row courses of 7-px bricks with 1-px dark mortar, each course
    offset by half a brick; ``dy``, ``dx`` shift where the courses and joints start."""
    row, col = _YY + dy, _XX + dx
    course = torch.div(row, 4, rounding_mode="floor")
    mortar = (row % 4 == 3) | ((col + 4 * (course % 2)) % 8 == 7)
    brick, joint = torch.tensor((0.68, 0.66, 0.63)), torch.tensor((0.30, 0.30, 0.30))
    return torch.where(mortar[None], joint.view(3, 1, 1), brick.view(3, 1, 1))


def style_transform(image: Tensor, style: str | None) -> Tensor:
    """A style applied to every pixel: the same affine map on the three channels (keeps hue)."""
    if style == "nocta":
        return image * NIGHT_FACTOR
    if style == "fogu":
        return image * (1 - FOG_AMOUNT) + FOG_AMOUNT
    return image


def render(scene: Scene) -> Tensor:
    """The scene as a (3, 24, 24) image in [0, 1]."""
    image = backdrop(scene.background)
    image[:, SIZE - GROUND_ROWS :] = torch.tensor(GROUND).view(3, 1, 1)
    figure_color = CONCEPT[scene.figure].color if scene.figure in CONCEPT else FIGURE_WHITE
    image = _paint(image, figure_mask(scene), figure_color)
    if scene.clothing is not None:
        image = _paint(image, clothing_mask(scene), CONCEPT[scene.clothing].color)
    if scene.object is not None:
        image = _paint(image, object_mask(scene), CONCEPT[scene.object].color)
    return style_transform(image, scene.style)


def _paint(image: Tensor, mask: Tensor, color: tuple[float, float, float]) -> Tensor:
    return torch.where(mask[None], torch.tensor(color).view(3, 1, 1), image)


# --- composition sets -------------------------------------------------------------------------


def composition_sets() -> list[tuple[str, ...]]:
    """ComposLoRA's sets over this world's 11 concepts: 240 (24 + 72 + 96 + 48 for N = 2..5)."""
    return composition.composition_sets(BY_CATEGORY)


def split_sets(sets: list[tuple[str, ...]], seed: int = 0) -> dict[str, list[tuple[str, ...]]]:
    """The fixed dev/test halves (``composition.split_sets``)."""
    return composition.split_sets(sets, seed)


def hue_degrees(color: tuple[float, float, float]) -> float:
    """The hue of an RGB colour in degrees (documents and checks the concepts' ``hue``)."""
    r, g, b = color
    high, low = max(color), min(color)
    if high == r:
        value = ((g - b) / (high - low)) % 6
    elif high == g:
        value = (b - r) / (high - low) + 2
    else:
        value = (r - g) / (high - low) + 4
    return math.fmod(60.0 * value, 360.0)
