"""What both synthetic benchmarks share about composition sets, jobs, detector validation and gt-rmse.

Each benchmark has its own world (concepts, scenes, renderer, captions) and detectors; the rules
here are ComposLoRA's and the project's, the same for both: sets of 2-5 LoRAs with exactly one
character and at most one per other category, split once into dev/test halves; one job per set
with seeds that differ per set; detectors judged by precision and recall on rendered scenes.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import torch
from torch import Tensor

from .sampler import Job

CATEGORIES = ("character", "clothing", "background", "object", "style")
# The scene field each category fills (both worlds' scenes use these field names).
SLOTS = {
    "character": "figure",
    "clothing": "clothing",
    "background": "background",
    "object": "object",
    "style": "style",
}


class SceneLike(Protocol):
    def concepts(self) -> tuple[str, ...]: ...


def tokenize(words: Sequence[str], vocabulary: Sequence[str], context_length: int) -> Tensor:
    """Words -> (context_length,) long ids into ``vocabulary`` (whose entry 0 is the padding)."""
    if len(words) > context_length:
        raise ValueError(f"at most {context_length} words; got {len(words)}")
    token_id = {word: i for i, word in enumerate(vocabulary)}
    unknown = [w for w in words if w not in token_id]
    if unknown:
        raise ValueError(f"unknown words {unknown}; the vocabulary is {', '.join(vocabulary[1:])}")
    return torch.tensor([token_id[w] for w in words] + [0] * (context_length - len(words)), dtype=torch.long)


def composition_sets(by_category: Mapping[str, Sequence[str]]) -> list[tuple[str, ...]]:
    """ComposLoRA's sets: 2 to 5 LoRAs, exactly one character, at most one per other category;
    each set character first then in category order, sorted by size then name."""
    others = [(None, *by_category[c]) for c in CATEGORIES[1:]]
    sets = []
    for character in by_category["character"]:
        for choice in itertools.product(*others):
            chosen = tuple(c for c in choice if c is not None)
            if chosen:
                sets.append((character, *chosen))
    return sorted(sets, key=lambda s: (len(s), s))


def split_sets(sets: list[tuple[str, ...]], seed: int = 0) -> dict[str, list[tuple[str, ...]]]:
    """A fixed half/half split into ``dev`` (choosing settings) and ``test`` (reporting),
    stratified by N so both halves have the same mix of sizes."""
    rng = random.Random(seed)
    dev, test = [], []
    for n in sorted({len(s) for s in sets}):
        group = [s for s in sets if len(s) == n]
        rng.shuffle(group)
        half = len(group) // 2
        dev += sorted(group[:half])
        test += sorted(group[half:])
    return {"dev": dev, "test": test}


def jobs_for(
    sets: Sequence[tuple[str, ...]], seeds: int, prompt_for: Callable[[int, tuple[str, ...]], Sequence[str]]
) -> list[Job]:
    """One job per set: the prompt ``prompt_for(i, set)`` and ``seeds`` seeds, different for every
    set (1000 i + s) and the same for every method."""
    return [
        Job(tuple(concepts), tuple(prompt_for(i, tuple(concepts))), tuple(1000 * i + s for s in range(seeds)))
        for i, concepts in enumerate(sets)
    ]


def nearest_rmse(images: Tensor, renderings: Tensor) -> Tensor:
    """(S, 3, H, W), (L, 3, H, W) -> (S,) each image's RMSE to its nearest rendering."""
    errors = ((images[:, None] - renderings[None]) ** 2).mean((2, 3, 4)).sqrt()
    return errors.min(1).values


def validation_scenes(
    sets: Sequence[tuple[str, ...]],
    scene_for: Callable[[tuple[str, ...], random.Random], SceneLike],
    count: int,
    seed: int,
) -> list[SceneLike]:
    """``count`` scenes of random composition sets: a third whole, a third with one concept dropped
    (a character dropped leaves a plain shape), a third plain shapes with some of the other
    concepts, so every detector meets scenes of its own category without its concept."""
    rng = random.Random(seed)
    scenes = []
    for i in range(count):
        chosen = list(rng.choice(sets))
        if i % 3 == 1:
            chosen.pop(rng.randrange(len(chosen)))
        elif i % 3 == 2:
            chosen = [c for c in chosen[1:] if rng.random() < 0.5]
        scenes.append(scene_for(tuple(chosen), rng))
    return scenes


def precision_recall(found: Mapping[str, Tensor], truths: Sequence[set[str]]) -> dict[str, dict[str, float]]:
    """Per concept, from its detections (B,) bool and the scenes' true concepts:
    {"precision", "recall", "positives", "negatives"}."""
    report = {}
    for name, hit in found.items():
        truth = torch.tensor([name in t for t in truths])
        tp = int((hit & truth).sum())
        report[name] = {
            "precision": tp / max(int(hit.sum()), 1),
            "recall": tp / max(int(truth.sum()), 1),
            "positives": int(truth.sum()),
            "negatives": int((~truth).sum()),
        }
    return report


def add_pixel_noise(images: Tensor, noise: float, seed: int) -> Tensor:
    """``images`` plus Gaussian noise of std ``noise`` (seeded), clipped to [0, 1]; unchanged at 0."""
    if not noise:
        return images
    return (images + noise * torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))).clamp(
        0, 1
    )
