"""Top-k from the prompt: the LoRAs whose training tags the prompt names are kept first."""

from __future__ import annotations

import json

import pytest
import torch

from loratorio_core import Adapter, LoRAtorioConfig, StepComposer, select_top_k
from loratorio_core.lora import tag_frequencies, trigger_words
from loratorio_core.relevance import NAMED, named_by_prompts, normalized_words, tag_relevance

# Tags as kohya writes them: the trigger in every caption, generic words in many LoRAs.
POOL_TAGS = [
    {"kiro": 90, "1girl": 88, "solo": 80, "smile": 20},  # a character
    {"mumo": 60, "1girl": 60, "solo": 58},  # another character
    {"ink wash": 40, "landscape": 12, "solo": 5},  # a style, a two-word trigger
    {},  # a LoRA without metadata
]


def test_prompt_words_drop_weights_emphasis_lora_tags_and_punctuation():
    assert normalized_words("(Kiro:1.2), red_dress <lora:kiro:0.8> [mumo]") == "kiro red dress mumo"


def test_a_trigger_in_the_prompt_names_its_lora_and_shared_tags_name_none():
    relevance = tag_relevance("kiro, 1girl, solo, smile", POOL_TAGS)
    assert relevance[0] == 1.0 > NAMED
    assert relevance[1] <= NAMED and relevance[2] <= NAMED and relevance[3] == 0
    # Tags every character has ("1girl", "solo") name neither character alone.
    assert (tag_relevance("1girl, solo", POOL_TAGS) <= NAMED).all()


def test_multi_word_triggers_match_as_whole_words_only():
    assert tag_relevance("a castle, ink wash", POOL_TAGS)[2] > NAMED
    assert tag_relevance("pink washing machine", POOL_TAGS)[2] <= NAMED


def test_a_batch_of_prompts_names_loras_per_image_and_an_untagged_pool_names_nothing():
    named = named_by_prompts(["kiro in ink wash", "mumo, 1girl", "a castle"], POOL_TAGS)
    assert named.shape == (4, 3) and named.dtype == torch.bool
    assert named.T.tolist() == [
        [True, False, True, False],
        [False, True, False, False],
        [False, False, False, False],
    ]
    assert named_by_prompts(["kiro"], [{}, {}]) is None  # the intrinsic score alone selects


def test_tags_are_read_from_kohya_metadata_summed_over_datasets():
    metadata = {"ss_tag_frequency": json.dumps({"10_kiro": {"kiro": 10, "solo": 4}, "5_kiro": {"kiro": 5}})}
    assert tag_frequencies(metadata) == {"kiro": 15, "solo": 4}
    assert trigger_words(metadata) == ["kiro", "solo"]
    assert tag_frequencies({"ss_tag_frequency": "not json"}) == {}
    assert tag_frequencies({}) == {}


def test_named_loras_are_kept_before_more_divergent_unnamed_ones():
    # LoRA 2 diverges most, LoRA 0 least; the prompt names 0 and 1.
    similarity = torch.tensor([0.99, 0.9, 0.5]).reshape(3, 1, 1, 1)
    named = torch.tensor([True, True, False])
    assert select_top_k(similarity, 2, named).flatten().tolist() == [True, True, False]
    # Fewer named than k: the most divergent unnamed one fills up.
    assert select_top_k(similarity, 2, torch.tensor([True, False, False])).flatten().tolist() == [True, False, True]
    # More named than k: the most divergent of the named.
    assert select_top_k(similarity, 1, named).flatten().tolist() == [False, True, False]
    assert select_top_k(similarity, 2).flatten().tolist() == [False, True, True]


def test_a_prompt_naming_exactly_k_loras_selects_them_without_evaluating_the_pool():
    composer = StepComposer(LoRAtorioConfig(top_k=2))
    pool = [Adapter(f"l{i}", 1.0) for i in range(5)]
    named = torch.tensor([False, True, False, True, False])
    plan = composer.plan(0, pool, batch_size=2, named=named)
    assert not plan.selecting and plan.evaluated == (1, 3)
    assert plan.kept.tolist() == [[False, False], [True, True], [False, False], [True, True], [False, False]]
    # Naming another number than k leaves the selection to the step's divergences.
    plan = composer.plan(0, pool, batch_size=2, named=torch.tensor([True, False, False, False, False]))
    assert plan.selecting and plan.evaluated == (0, 1, 2, 3, 4)


def test_selection_with_named_loras_through_combine_keeps_them():
    composer = StepComposer(LoRAtorioConfig(top_k=1, recenter=1.0))
    pool = [Adapter("a", 1.0), Adapter("b", 1.0)]
    plan = composer.plan(0, pool, batch_size=1, named=torch.tensor([True, True]))
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 4, 4, 4, generator=g)
    a, b = base + 0.01 * torch.randn(1, 4, 4, 4, generator=g), base + torch.randn(1, 4, 4, 4, generator=g)
    preds = torch.cat([base, a, b, base])  # cond: base, a, b; uncond: base
    assert composer.combine(plan, preds, 5.0).kept.flatten().tolist() == [False, True]
    # Naming only "a" (k = 1) keeps it without evaluating "b" at all.
    plan = composer.plan(0, pool, batch_size=1, named=torch.tensor([True, False]))
    assert plan.evaluated == (0,)
    assert composer.combine(plan, torch.cat([base, a, base]), 5.0).kept.flatten().tolist() == [True, False]


def test_a_bad_named_mask_is_refused_with_its_shape():
    composer = StepComposer(LoRAtorioConfig(top_k=1))
    with pytest.raises(ValueError, match=r"named must be a bool \(N,\) or \(N, B\)"):
        composer.plan(0, [Adapter("a"), Adapter("b")], named=torch.tensor([1.0, 0.0]))
