"""The second synthetic ComposLoRA (``loratorio_core.pixelworld``), the sampler and benchmark interface
both synthetic benchmarks share, and the LoRA files both ship."""

import hashlib
import json
import random

import pytest
import torch

from loratorio_core.config import LoRAtorioConfig
from loratorio_core.lora.binding import bind_lora
from loratorio_core.lora.files import load_lora, read_metadata, trigger_words
from loratorio_core.pixelworld import benchmark as pixel_benchmark
from loratorio_core.pixelworld import detectors, world
from loratorio_core.synthetic import benchmark as first_benchmark
from loratorio_core.synthetic.composition import CATEGORIES, nearest_rmse
from loratorio_core.synthetic.sampler import Job, eps_from_prediction

BENCHMARKS = [first_benchmark, pixel_benchmark]

# --- the world renders what it says ---------------------------------------------------------------


def every_scene_layout(concepts):
    base = world.scene_for(concepts, random.Random(0))
    return [base.at(layout) for layout in world.LAYOUTS]


def test_rendering_is_deterministic_in_range_and_stands_on_the_ground():
    a = world.render(world.scene_for(("hopa", "sashu", "bricko", "balla", "nocta"), random.Random(3)))
    b = world.render(world.scene_for(("hopa", "sashu", "bricko", "balla", "nocta"), random.Random(3)))
    assert a.shape == (3, 24, 24) and torch.equal(a, b)
    assert 0 <= float(a.min()) and float(a.max()) <= 1
    plain = world.render(world.Scene(background="dim", figure="egg"))
    assert torch.allclose(plain[:, 21:], torch.tensor(world.GROUND).view(3, 1, 1).expand(3, 3, 24))
    for scene in every_scene_layout(("arky", "pantz", "treeb")):
        rows = world.figure_mask(scene).nonzero()[:, 0]
        assert int(rows.max()) <= 20 and int(rows.min()) >= 8  # on the ground, below the backdrop band


def test_clothing_is_drawn_on_the_figure_trousers_below_and_the_sash_across():
    for figure in (*world.BASE_SHAPES, "hopa", "arky", "tebo"):
        for clothing in ("pantz", "sashu"):
            scene = world.Scene(figure=figure, clothing=clothing)
            worn = world.clothing_mask(scene)
            assert int(worn.sum()) >= 10, (figure, clothing)
            assert not bool((worn & ~world.figure_mask(scene)).any())
        trousers = world.clothing_mask(world.Scene(figure=figure, clothing="pantz")).nonzero()[:, 0]
        assert int(trousers.min()) >= 17  # the figure's lower rows only


def test_objects_sit_in_their_bottom_corner_and_never_touch_the_figure():
    for scene in every_scene_layout(("tebo", "balla")) + every_scene_layout(("arky", "treeb")):
        glyph = world.object_mask(scene)
        columns = glyph.nonzero()[:, 1]
        assert bool((columns >= 19).all()) if scene.object_right else bool((columns <= 4).all())
        assert not bool((glyph & world.figure_mask(scene)).any())


def test_styles_are_the_affine_colour_maps_they_claim_and_keep_every_concept_hue():
    scene = world.Scene(background="bricko", figure="tebo", clothing="pantz", object="balla")
    plain = world.render(scene)
    from dataclasses import replace

    assert torch.allclose(world.render(replace(scene, style="nocta")), plain * 0.45)
    assert torch.allclose(world.render(replace(scene, style="fogu")), plain * 0.6 + 0.4)
    for concept in world.CONCEPTS:
        if concept.color is None:
            continue
        assert abs(world.hue_degrees(concept.color) - concept.hue) < 1.0, concept.name
        for style in ("nocta", "fogu"):
            styled = world.style_transform(torch.tensor(concept.color), style)
            assert abs(world.hue_degrees(tuple(styled.tolist())) - concept.hue) < 1.0
    # Concepts that share a place (the figure's: characters and clothing; the corners': objects)
    # have hues at least 45 degrees apart, so a detector's 20-degree tolerance never takes another.
    for place in (("character", "clothing"), ("object",)):
        hues = sorted(c.hue for c in world.CONCEPTS if c.category in place)
        gaps = [b - a for a, b in zip(hues, hues[1:], strict=False)] + [360 - hues[-1] + hues[0]]
        assert min(gaps) >= 45, place


def test_backdrops_a_dusk_ramp_and_a_brick_wall_of_offset_courses():
    dusk = world.backdrop("dusko")[0, :21, 0]
    assert bool((dusk[1:] > dusk[:-1]).all()) and float(dusk[0]) < 0.3 and float(dusk[-1]) > 0.8
    wall = world.brick_texture()[0]
    assert torch.equal(wall, torch.roll(wall, (8, 8), (0, 1)))  # period 8 both ways
    assert bool((wall[3::4] < 0.4).all())  # a mortar row under every course
    first, second = (wall[0] < 0.4).nonzero()[:, 0], (wall[4] < 0.4).nonzero()[:, 0]
    assert set(((first + 4) % 8).tolist()) == set((second % 8).tolist())  # courses offset by half a brick


def test_captions_follow_the_grammar_and_fit_the_context():
    scene = world.Scene(background="dusko", figure="hopa", clothing="sashu", object="treeb", style="fogu")
    assert world.caption(scene) == ["hopa", "wearing", "sashu", "on", "dusko", "with", "treeb", "fogu"]
    assert world.caption(world.Scene(background="dim", figure="egg")) == ["egg", "on", "dim"]
    for concepts in world.composition_sets():
        ids = world.tokenize(world.prompt_for(concepts))
        assert ids.shape == (world.CONTEXT_LENGTH,) and int(ids[0]) == world.TOKEN_ID[concepts[0]]


# --- composition sets and their split ----------------------------------------------------------------


@pytest.mark.parametrize("bench", BENCHMARKS, ids=lambda b: b.NAME)
def test_sets_match_composlora_and_the_split_is_fixed_and_disjoint(bench):
    dev, test = bench.sets("dev"), bench.sets("test")
    sets = dev + test
    assert len(dev) == len(test) == 120 and not set(dev) & set(test) and len(set(sets)) == 240
    assert [sum(len(s) == n for s in sets) for n in (2, 3, 4, 5)] == [24, 72, 96, 48]
    category = {c.name: c.category for c in bench.CONCEPTS}
    for s in sets:
        cats = [category[c] for c in s]
        assert cats[0] == "character" and cats.count("character") == 1 and len(set(cats)) == len(cats)
    assert bench.sets("dev") == dev  # the same split every call
    assert [sum(len(s) == n for s in dev) for n in (2, 3, 4, 5)] == [12, 36, 48, 24]  # stratified by N


def test_the_split_is_pinned():
    digest = {b.NAME: hashlib.sha256(repr(b.sets("dev")).encode()).hexdigest()[:16] for b in BENCHMARKS}
    assert digest == {"synthetic ComposLoRA": FIRST_DEV_DIGEST, "pixel ComposLoRA": PIXEL_DEV_DIGEST}


FIRST_DEV_DIGEST = "992b1b5af34ef6ce"
PIXEL_DEV_DIGEST = "4eed4f8963ce4533"


# --- detectors ----------------------------------------------------------------------------------------


def test_detectors_are_reliable_on_held_out_noisy_renderings():
    report = detectors.validate(count=300, seed=99, noise=0.05)
    assert set(report) == {c.name for c in world.CONCEPTS}
    for name, stats in report.items():
        assert stats["positives"] >= 30 and stats["negatives"] >= 30, (name, stats)
        assert stats["precision"] >= 0.97 and stats["recall"] >= 0.97, (name, stats)


def test_the_brick_wall_is_found_at_any_phase_under_any_style_and_the_ramp_is_not_a_wall():
    noise = torch.Generator().manual_seed(0)
    for dy, dx in ((0, 0), (1, 3), (2, 5), (3, 7)):
        for style in (None, "nocta", "fogu"):
            wall = world.style_transform(world.brick_texture(dy, dx), style)
            noisy = (wall + 0.05 * torch.randn(wall.shape, generator=noise)).clamp(0, 1)[None]
            assert bool(detectors.detect("bricko", noisy)) and not bool(detectors.detect("dusko", noisy))
    for style in (None, "nocta", "fogu"):
        ramp = world.style_transform(world.backdrop("dusko"), style)[None]
        assert bool(detectors.detect("dusko", ramp)) and not bool(detectors.detect("bricko", ramp))
    plain = world.backdrop("ashen")[None]
    assert not bool(detectors.detect("bricko", plain)) and not bool(detectors.detect("dusko", plain))


# --- the shared benchmark interface --------------------------------------------------------------------


@pytest.mark.parametrize("bench", BENCHMARKS, ids=lambda b: b.NAME)
def test_each_benchmark_module_exposes_the_interface(bench):
    assert isinstance(bench.NAME, str) and bench.CATEGORIES == CATEGORIES
    assert {c.category for c in bench.CONCEPTS} == set(CATEGORIES) and len(bench.CONCEPTS) == 11
    assert isinstance(bench.LATENT_SIDE, int) and bench.STEPS == 20
    jobs = bench.jobs_for(bench.sets("test")[:5], seeds=2)
    assert [j.seeds for j in jobs] == [(0, 1), (1000, 1001), (2000, 2001), (3000, 3001), (4000, 4001)]
    assert all(
        isinstance(j, Job) and j.loras == s for j, s in zip(jobs, bench.sets("test"), strict=False)
    )
    files = bench.lora_files()
    assert list(files) == [c.name for c in bench.CONCEPTS] and all(p.exists() for p in files.values())


@pytest.mark.parametrize("bench", BENCHMARKS, ids=lambda b: b.NAME)
def test_gt_rmse_is_zero_for_a_clean_rendering_of_the_intended_scene(bench):
    job = bench.jobs_for([bench.sets("dev")[-1]], seeds=1)[0]
    scenes = bench.intended_scenes(job)
    world_module = __import__(type(scenes[0]).__module__, fromlist=["render"])
    clean = torch.stack([world_module.render(scenes[3]), 1 - world_module.render(scenes[3])])
    errors = bench.gt_rmse(clean, job)
    assert float(errors[0]) == 0.0 and float(errors[1]) > 0.2
    assert torch.equal(errors, nearest_rmse(clean, torch.stack([world_module.render(s) for s in scenes])))


def test_v_predictions_are_composed_as_the_noise_they_imply():
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, 4, 4, generator=gen), torch.randn(2, 3, 4, 4, generator=gen)
    a = torch.tensor(0.3)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    assert torch.allclose(eps_from_prediction("v", v, x_t, a), eps, atol=1e-6)
    assert eps_from_prediction("epsilon", eps, x_t, a) is eps
    with pytest.raises(ValueError, match="prediction"):
        eps_from_prediction("sample", eps, x_t, a)


# --- the shipped models and LoRAs ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pixel_model():
    torch.set_num_threads(1)
    return pixel_benchmark.load_model()


@pytest.mark.parametrize("bench", BENCHMARKS, ids=lambda b: b.NAME)
def test_every_shipped_lora_binds_every_layer_it_targets_and_names_its_trigger(bench):
    model = bench.load_model()
    for concept in bench.CONCEPTS:
        path = bench.lora_files()[concept.name]
        lora = load_lora(path)
        assert all(component == "unet" for component, _ in lora.layers)
        bound = bind_lora(model.unet, lora)
        assert bound.unmatched == [] and len(bound.layers) == len(lora.layers)
        kinds = {name.rsplit(".", 1)[-1] for name in bound.layers}
        assert {"to_q", "to_k", "to_v", "2", "3"} <= kinds  # attention projections and ResBlock convs
        metadata = read_metadata(path)
        assert metadata["ss_output_name"] == metadata["loratorio_trigger"] == concept.name
        assert metadata["loratorio_category"] == concept.category
        ((dataset, tags),) = json.loads(metadata["ss_tag_frequency"]).items()
        assert dataset.endswith("_" + concept.name) and len(tags) >= 3  # the trigger and caption words
        # Every training caption holds the trigger: it is a most frequent tag (a character's
        # captions hold "on" as often, as real LoRAs' captions hold "1girl").
        assert tags[concept.name] == max(tags.values()) and concept.name in trigger_words(metadata, 3)


def test_the_first_benchmarks_images_stay_bit_for_bit_what_the_quality_tables_measured():
    # SHA-256 of the first benchmark's images for fixed jobs and 6 steps. The softmin and switch
    # ones were first those of its own sampler before it was shared (git 64109cf); the LoRAtorio
    # ones changed once, on purpose, when the patch similarity went to float64 (a float32 cosine
    # holds 1 - s to a few digits where predictions agree). The top-k and switch ones changed in
    # their last bits when the runtime's up matmul began accumulating into the layer's output
    # (addmm): every row of README's test-half tables that uses that path (merge, switch,
    # composite, lam 1, pool merge all) was rerun then and printed the same numbers. Any other
    # change of these images may change the README's tables: rerun benchmarks/quality.py and
    # update both. The defaults' one changed when the default rule went from power tau 5 to
    # contrast tau 3 (README's tables rerun with it).
    # One thread, as they were made: another thread count changes float sums in the last bits.
    torch.set_num_threads(1)
    model = first_benchmark.load_model()
    jobs = [
        Job(("kiro", "zebu", "checka", "pipa"), ("kiro", "checka", "zebu", "pipa"), (0, 1)),
        Job(("tava", "vigna"), ("tava", "light", "vigna"), (5,)),
    ]
    expected = {
        "loratorio": "79a22282d71552b7ae3ea7b32322db84",
        "top-k": "438445e426d2b39a9fcc748169f29a91",
        "switch": "c1042d9fa611fbdb4f79a9ffdc865ad9",
        "defaults": "8f65c4e59f39f461127892b465ddd719",
    }
    configs = {
        # the settings of the time (softmin tau 1, patch 4 for top-k), and today's defaults
        "loratorio": LoRAtorioConfig(patch_size=1, weighting="softmin", temperature=1.0),
        "top-k": LoRAtorioConfig(patch_size=4, weighting="softmin", temperature=1.0, recenter=1.0, top_k=2),
        "switch": LoRAtorioConfig(mode="switch"),
        "defaults": LoRAtorioConfig(),
    }
    for label, config in configs.items():
        out = first_benchmark.sample(model, jobs, config, steps=6)
        digest = hashlib.sha256(b"".join(im.contiguous().numpy().tobytes() for im in out.images)).hexdigest()
        assert digest[:32] == expected[label], label


@pytest.mark.parametrize(
    "config, rows_per_step",
    [
        (LoRAtorioConfig(mode="merge"), 2),
        (LoRAtorioConfig(mode="composite"), 6),
        (LoRAtorioConfig(patch_size=2, recenter=0.5), 8),
        (LoRAtorioConfig(patch_size=2, recenter=1.0), 5),
    ],
)
def test_a_tiny_composition_through_the_pixel_benchmark_gives_finite_images(
    pixel_model, config, rows_per_step
):
    jobs = pixel_benchmark.jobs_for([("hopa", "bricko", "balla"), ("tebo", "sashu")], seeds=2)
    jobs = [jobs[0], Job(("tebo", "sashu", "nocta"), jobs[1].prompt + ("nocta",), (7,))]
    out = pixel_benchmark.sample(pixel_model, jobs, config, steps=3, record_weights=True)
    assert [im.shape for im in out.images] == [(2, 3, 24, 24), (1, 3, 24, 24)]
    assert all(
        bool(torch.isfinite(im).all()) and 0 <= float(im.min()) and float(im.max()) <= 1 for im in out.images
    )
    assert out.rows[0] == 3 * rows_per_step
    if config.mode == "loratorio":
        assert [w.shape for w in out.weights[0]] == [(3, 2, 12, 12)] * 3  # patch 2 of the 24x24 latent
        assert torch.allclose(out.weights[0][0].sum(0), torch.ones(2, 12, 12, dtype=out.weights[0][0].dtype))


# --- the training script --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_synthetic():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import train_synthetic

    return train_synthetic


def test_a_v_model_trains_on_the_v_that_the_sampler_turns_back_into_its_noise(train_synthetic):
    latents = torch.rand(8, 3, 24, 24) * 2 - 1
    alphas = train_synthetic.kit_for("pixelworld").model.schedule()
    x_t, t, v = train_synthetic.noisy(latents, alphas, torch.Generator().manual_seed(0), "v")
    a = alphas[t].view(-1, 1, 1, 1)
    assert torch.allclose(a.sqrt() * x_t - (1 - a).sqrt() * v, latents, atol=1e-5)  # x0 from v
    eps = eps_from_prediction("v", v, x_t, a)
    assert torch.allclose(a.sqrt() * latents + (1 - a).sqrt() * eps, x_t, atol=1e-5)


def test_lora_masks_are_at_latent_resolution_and_cover_what_the_concept_changes(train_synthetic):
    for bench, name, side in (("synthetic", "poka", 16), ("pixelworld", "pantz", 24)):
        kit = train_synthetic.kit_for(bench)
        images, ids, masks = train_synthetic.concept_dataset(kit, name)
        assert masks.shape == (len(images), 1, side, side) and ids.shape[0] == len(images)
        assert 0 < float(masks.mean()) < 0.2  # clothing: a small part of the picture


@pytest.mark.parametrize("bench", ["synthetic", "pixelworld"])
def test_shipped_tag_frequencies_are_the_training_captions_word_counts(train_synthetic, bench):
    kit = train_synthetic.kit_for(bench)
    for concept in kit.world.CONCEPTS:
        captions = train_synthetic.concept_captions(kit, concept.name)
        shipped = json.loads(read_metadata(kit.model.lora_path(concept.name))["ss_tag_frequency"])
        assert shipped == json.loads(train_synthetic.lora_metadata(kit, concept.name)["ss_tag_frequency"])
        (counts,) = shipped.values()
        assert counts[concept.name] == len(captions)
        for word in captions[0]:
            assert counts[word] == sum(word in c for c in captions)
        if bench == "pixelworld":  # the caption grammar's words are tags too, as in real LoRAs
            assert counts["on"] == len(captions)
            assert ("wearing" in counts) == (concept.category == "clothing")


def test_the_base_model_draws_its_plain_scenes_and_none_of_the_concepts(pixel_model):
    # Its triggers are words it never saw; what its captions ask for it draws (nearest rendering
    # over every caption and layout: the shipped base gets the shape right in 32/36 images).
    captions = [(shape, backdrop) for shape in world.BASE_SHAPES for backdrop in world.BASE_BACKGROUNDS]
    jobs = [Job((), tuple(world.caption(world.Scene(b, s))), (0, 1, 2, 3)) for s, b in captions]
    out = pixel_benchmark.sample(pixel_model, jobs, LoRAtorioConfig(mode="merge"))
    right = []
    for caption, images in zip(captions, out.images, strict=True):
        distances = []
        for shape, backdrop in captions:
            scenes = [world.Scene(backdrop, shape).at(layout) for layout in world.LAYOUTS]
            distances.append(nearest_rmse(images, torch.stack([world.render(s) for s in scenes])))
        right += [captions[i][0] == caption[0] for i in torch.stack(distances).argmin(0).tolist()]
    assert sum(right) / len(right) >= 0.75
    composed = pixel_benchmark.jobs_for(pixel_benchmark.sets("dev")[::6], seeds=2)
    base = pixel_benchmark.sample(
        pixel_model, [Job((), j.prompt, j.seeds) for j in composed], LoRAtorioConfig(mode="merge")
    )
    found = [
        bool(f)
        for j, im in zip(composed, base.images, strict=True)
        for c in j.loras
        for f in detectors.detect(c, im)
    ]
    assert sum(found) <= 0.02 * len(found)
