"""How strongly a prompt names each LoRA of a pool, from the LoRAs' training tags.

Real LoRAs carry the tags of their training captions (kohya's ``ss_tag_frequency``: tag -> how
many captions had it). A LoRA is named by a prompt when the prompt contains tags that are both
frequent in that LoRA's captions and rare among the pool's other LoRAs (its trigger words, not
"1girl"). This is the prior that top-k selection starts from; the intrinsic score
(``weighting.select_top_k``) decides among the named LoRAs and fills up with unnamed ones.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

NAMED = 0.5  # a LoRA scoring above this is named by the prompt


def normalized_words(text: str) -> str:
    """Lowercase words separated by single spaces, with A1111's emphasis syntax, weights,
    LoRA tags and punctuation taken out: ``"(Kiro:1.2), red_dress"`` -> ``"kiro red dress"``."""
    text = re.sub(r"<[^>]*>", " ", text.lower())  # <lora:...>, <lyco:...>, <hypernet:...>
    text = re.sub(r":\s*-?\d+(\.\d+)?", " ", text)  # (word:1.2) weights
    return " ".join(re.sub(r"[^\w]+|_", " ", text).split())


def tag_relevance(prompt: str, tags: Sequence[Mapping[str, int]]) -> Tensor:
    """(M,) float in [0, 1]: how strongly ``prompt`` names each of M LoRAs, given each one's
    training tag counts (``lora.tag_frequencies``; {} for a LoRA without tags, which scores 0).

    A LoRA's score is the largest, over its tags that occur in the prompt as whole words, of
    share / sharing, where share is the tag's count over the LoRA's most frequent tag's (1 for
    a trigger in every caption) and sharing is how many of the M LoRAs have the tag. A LoRA is
    named (score > ``NAMED``) by a tag in over half its captions that no other LoRA of the pool
    has: its trigger, not "1girl"; generic tags never add up to a name.
    """
    words = f" {normalized_words(prompt)} "
    normalized = [
        {word: count for tag, count in lora.items() if (word := normalized_words(tag))} for lora in tags
    ]
    sharing: dict[str, int] = {}
    for lora in normalized:
        for tag in lora:
            sharing[tag] = sharing.get(tag, 0) + 1
    scores = torch.zeros(len(tags))
    for i, lora in enumerate(normalized):
        top = max(lora.values(), default=0)
        matched = [count / top / sharing[tag] for tag, count in lora.items() if f" {tag} " in words]
        scores[i] = max(matched, default=0.0) if top > 0 else 0.0
    return scores


def named_by_prompt(prompt: str, tags: Sequence[Mapping[str, int]]) -> Tensor:
    """(M,) bool: the LoRAs ``prompt`` names (``tag_relevance`` above ``NAMED``), the prior a
    top-k selection keeps first (``StepComposer.plan(named=...)``)."""
    return tag_relevance(prompt, tags) > NAMED


def named_by_prompts(
    prompts: Sequence[str], tags: Sequence[Mapping[str, int]], asked: Sequence[bool] | None = None
) -> Tensor | None:
    """(M, B) bool: ``named_by_prompt`` for each of the batch's B prompts; None when no LoRA of
    the pool carries tags and none is asked for (the intrinsic score alone selects).

    asked: (M,) the LoRAs the user asked for by name (a WebUI prompt's ``<lora:...>`` tags, a
    ComfyUI stack), named in every prompt whatever their tags; the rest (a pool) by their tags."""
    asked = [False] * len(tags) if asked is None else list(asked)
    if len(asked) != len(tags):
        raise ValueError(f"asked has {len(asked)} entries for {len(tags)} LoRAs")
    if not any(tags) and not any(asked):
        return None
    by_tags = torch.stack([named_by_prompt(p, tags) for p in prompts], dim=1)
    return by_tags | torch.tensor(asked, dtype=torch.bool)[:, None]
