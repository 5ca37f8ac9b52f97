"""The synthetic ComposLoRA: its world, detectors, shipped weights, sampler, benchmark and demo."""

import random

import torch

from loratorio_core.synthetic import detectors, world


def test_rendering_is_deterministic_and_in_range():
    rng_a, rng_b = random.Random(3), random.Random(3)
    a = world.render(world.scene_for(("kiro", "zebu", "checka", "pipa", "vigna"), rng_a))
    b = world.render(world.scene_for(("kiro", "zebu", "checka", "pipa", "vigna"), rng_b))
    assert a.shape == (3, 32, 32) and torch.equal(a, b)
    assert 0 <= float(a.min()) and float(a.max()) <= 1


def test_clothing_is_drawn_on_the_figure():
    scene = world.scene_for(("mumo", "poka"), random.Random(0))
    assert bool(world.clothing_mask(scene).any())
    assert not bool((world.clothing_mask(scene) & ~world.figure_mask(scene)).any())


def test_composition_sets_match_composlora_counts_and_split_in_halves():
    sets = world.composition_sets()
    assert [sum(len(s) == n for s in sets) for n in (2, 3, 4, 5)] == [24, 72, 96, 48]
    assert all(sum(world.CONCEPT[c].category == "character" for c in s) == 1 for s in sets)
    split = world.split_sets(sets)
    assert len(split["dev"]) == len(split["test"]) == 120
    assert not set(split["dev"]) & set(split["test"])


def test_captions_tokenize_within_the_context():
    for concepts in world.composition_sets()[-3:]:
        ids = world.tokenize(world.prompt_for(concepts))
        assert ids.shape == (world.CONTEXT_LENGTH,) and int(ids[0]) != 0


def test_detectors_are_reliable_on_held_out_noisy_renderings():
    report = detectors.validate(count=300, seed=99, noise=0.05)
    for name, stats in report.items():
        assert stats["precision"] >= 0.97 and stats["recall"] >= 0.97, (name, stats)
