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


def test_a_background_texture_is_detected_at_any_phase_and_under_any_style_but_not_the_other():
    noise = torch.Generator().manual_seed(0)
    for name, other in (("checka", "stria"), ("stria", "checka")):
        texture = world.background_texture(name)
        for dy, dx in ((0, 0), (3, 1), (4, 4), (7, 2)):
            for style in (None, "scanz", "vigna"):
                shifted = torch.roll(texture, (dy, dx), (1, 2)) * world.style_factor(style)
                noisy = (shifted + 0.05 * torch.randn(shifted.shape, generator=noise)).clamp(0, 1)[None]
                assert bool(detectors.detect(name, noisy)), (name, dy, dx, style)
                assert not bool(detectors.detect(other, noisy)), (other, dy, dx, style)
    plain = world.background_texture("gray")[None]
    assert not bool(detectors.detect("checka", plain)) and not bool(detectors.detect("stria", plain))


# --- the shipped model and LoRAs -----------------------------------------------------------------

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from loratorio_core.config import LoRAtorioConfig  # noqa: E402
from loratorio_core.lora.binding import bind_lora  # noqa: E402
from loratorio_core.lora.files import load_lora, read_header  # noqa: E402
from loratorio_core.synthetic import model as synthetic  # noqa: E402

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def shipped():
    torch.set_num_threads(1)
    return synthetic.load_model()


def test_every_concept_ships_a_kohya_lora_that_binds_fully(shipped):
    assert sorted(shipped.loras) == sorted(c.name for c in world.CONCEPTS)
    for concept in world.CONCEPTS:
        path = synthetic.lora_path(concept.name)
        keys = [k for k in read_header(path) if k != "__metadata__"]
        assert all(k.startswith("lora_unet_") for k in keys)
        bound = bind_lora(shipped.unet, load_lora(path))
        assert bound.unmatched == []
        kinds = {name.rsplit(".", 1)[-1] for name in bound.layers}
        assert {"to_q", "to_k", "to_v", "2", "3"} <= kinds  # attention projections and ResBlock convs
        ranks = {u.rank for u in bound.layers.values()}
        assert ranks <= set(range(4, 9))


@pytest.mark.parametrize(
    "config, loras, rows_per_step",
    [
        (LoRAtorioConfig(mode="merge"), (), 2),  # the base alone
        (LoRAtorioConfig(mode="merge"), ("kiro", "pipa"), 2),
        (LoRAtorioConfig(mode="switch"), ("kiro", "pipa"), 2),
        (LoRAtorioConfig(mode="composite"), ("kiro", "pipa"), 4),
        (LoRAtorioConfig(recenter=0.5), ("kiro", "pipa"), 6),
        (LoRAtorioConfig(recenter=1.0), ("kiro", "pipa"), 4),
        (LoRAtorioConfig(recenter=1.0, top_k=2), ("kiro", "pipa", "checka"), 5),
    ],
)
def test_sampling_evaluates_each_modes_rows_for_every_image(shipped, config, loras, rows_per_step):
    jobs = [
        synthetic.Job(loras, ("kiro", "gray", "pipa"), (0, 1)),
        synthetic.Job(loras, ("kiro", "light"), (2,)),
    ]
    out = synthetic.sample(shipped, jobs, config, steps=2)
    assert [im.shape for im in out.images] == [(2, 3, 32, 32), (1, 3, 32, 32)]
    assert out.rows == [2 * rows_per_step] * 2


def test_the_base_model_draws_the_shape_its_caption_asks_for(shipped):
    # Judged by the nearest rendering over every caption and layout. The shipped base gets the
    # figure's shape right in ~85% of images; its plain background colours are weaker (~50%,
    # chance 33%), which the README states.
    captions = [(shape, bg) for shape in world.BASE_SHAPES for bg in world.BASE_BACKGROUNDS]
    jobs = [synthetic.Job((), caption, (0, 1, 2, 3)) for caption in captions]
    out = synthetic.sample(shipped, jobs, LoRAtorioConfig(mode="merge"), steps=20)

    def distance(images, caption):  # (S,) RMSE to the nearest rendering of the caption's scene
        truths = torch.stack(
            [
                world.render(world.Scene(caption[1], caption[0], dx=dx, dy=dy))
                for dx in range(-2, 3)
                for dy in (-1, 0, 1)
            ]
        )
        return ((images[:, None] - truths[None]) ** 2).mean((2, 3, 4)).sqrt().min(1).values

    right = []
    for caption, images in zip(captions, out.images, strict=True):
        nearest = torch.stack([distance(images, other) for other in captions]).argmin(0)
        right += [captions[i][0] == caption[0] for i in nearest.tolist()]
    assert sum(right) / len(right) >= 0.75


def test_quality_benchmark_runs_end_to_end_on_a_tiny_subset(capsys):
    sys.path.insert(0, str(BENCHMARKS))
    import quality

    argv = ["--benchmark", "composlora", "--sets", "dev", "--limit", "2", "--seeds", "1", "--steps", "2"]
    assert quality.main([*argv, "--workers", "1"]) == 0
    out = capsys.readouterr().out
    for method in quality.methods():
        assert method.label in out
    assert "gt-rmse" in out and "avg [95% CI]" in out and "win" in out
    assert "minus each method, paired on the same sets and seeds" in out


def test_the_paired_difference_cancels_how_hard_each_set_is():
    sys.path.insert(0, str(BENCHMARKS))
    import quality

    def records(hits: dict[tuple, list[bool]]) -> list[dict]:
        return [{"set": key, "found": {"a": hit}} for key, seeds in hits.items() for hit in seeds]

    # Ten sets of N = 2 of varied difficulty (1-3 of 4 images found by ours): ours finds exactly one
    # image more than the baseline in every set, so the rates spread from 0 to 0.75 over the sets
    # while the difference never moves.
    sets = [("a", f"x{i}") for i in range(10)]
    found = {key: 1 + i % 3 for i, key in enumerate(sets)}
    ours = records({key: [k < found[key] for k in range(4)] for key in sets})
    baseline = records({key: [k < found[key] - 1 for k in range(4)] for key in sets})
    assert quality.paired_difference(ours, baseline)[2] == pytest.approx((0.25, 0.25, 0.25))
    # Equal methods differ by nothing, however the sets are resampled.
    assert quality.paired_difference(ours, ours)[2] == (0.0, 0.0, 0.0)


def test_sweep_runs_every_rule_then_patch_and_lam_at_the_best_and_names_it(capsys):
    sys.path.insert(0, str(BENCHMARKS))
    import sweep

    argv = ["--benchmark", "composlora", "--limit", "2", "--seeds", "1", "--steps", "2", "--workers", "1"]
    assert sweep.main(argv) == 0
    out = capsys.readouterr().out
    for rule, taus in sweep.TEMPERATURES.items():
        for tau in taus:
            assert f"{rule} tau={tau:g} d=1/16 lam=0.5" in out
    best = next(line for line in out.splitlines() if line.startswith("best: "))
    rule, tau = best.split()[1], best.split()[2]
    assert f"{rule} {tau} d=1/16 lam=1" in out and f"{rule} {tau} d=1/8 lam=0.5" in out
