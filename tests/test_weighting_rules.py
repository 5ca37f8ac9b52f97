"""The weighting rules: what each one means, and what makes a temperature mean the same on
every model (invariance to the scale of the divergences)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from loratorio_core import WEIGHTINGS, LoRAtorioConfig, patch_weights, softmin_weights

SCALE_FREE = [r for r in WEIGHTINGS if r != "softmin"]
# Rules that compare the LoRAs' divergences within a patch as they are (contrast compares each
# to the LoRA's own mean over the image first).
WITHIN_PATCH = [r for r in WEIGHTINGS if r != "contrast"]


def similarities(seed: int, n: int = 3, b: int = 2, h: int = 3, w: int = 3, spread: float = 0.01):
    """Cosine similarities as real noise predictions give them: all close to 1."""
    return 1 - spread * torch.rand(n, b, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rule", WEIGHTINGS)
@given(seed=st.integers(0, 2**16), tau=st.sampled_from([0.3, 1.0, 3.0]))
def test_every_rule_gives_weights_that_sum_to_one_and_favour_the_most_divergent(rule, seed, tau):
    sim = similarities(seed)
    weights = patch_weights(sim, rule, tau)
    assert weights.shape == sim.shape and torch.all(weights >= 0)
    torch.testing.assert_close(weights.sum(0), torch.ones(sim.shape[1:]))
    # More divergence (relative to the LoRA's own mean for contrast) never gets less weight.
    divergence = 1 - sim.double()
    if rule == "contrast":
        divergence = divergence / divergence.mean(dim=(2, 3), keepdim=True)
    order = (-divergence).argsort(0)
    ranked = weights.gather(0, order)
    assert torch.all(ranked[:-1] >= ranked[1:] - 1e-6)


@pytest.mark.parametrize("rule", SCALE_FREE)
@given(seed=st.integers(0, 2**16), factor=st.sampled_from([0.1, 3.0, 20.0]))
def test_scale_free_rules_ignore_how_far_the_model_sits_from_the_base(rule, seed, factor):
    """Two models whose divergences differ by a constant factor get the same weights: the
    temperature means the same on both (the paper's SoftMin does not)."""
    # float64: in float32 a similarity near 1 holds its divergence to only ~1e-4 relative.
    sim = similarities(seed, spread=0.004).double()
    scaled = 1 - factor * (1 - sim)
    torch.testing.assert_close(patch_weights(scaled, rule, 1.0), patch_weights(sim, rule, 1.0), atol=1e-9, rtol=0)


def test_softmin_rule_is_the_papers_softmin_and_depends_on_the_scale():
    sim = similarities(0)
    torch.testing.assert_close(patch_weights(sim, "softmin", 0.01), softmin_weights(sim, 0.01))
    scaled = 1 - 10 * (1 - sim)
    assert (patch_weights(scaled, "softmin", 0.01) - patch_weights(sim, "softmin", 0.01)).abs().max() > 0.05


def test_rank_rule_depends_only_on_the_order_within_a_patch():
    sim = torch.tensor([0.99, 0.999, 0.9]).reshape(3, 1, 1, 1)
    other = torch.tensor([0.5, 0.9999, 0.4]).reshape(3, 1, 1, 1)  # same order, other gaps
    torch.testing.assert_close(patch_weights(sim, "rank", 1.0), patch_weights(other, "rank", 1.0))
    expected = torch.softmax(torch.tensor([1.0, 0.0, 2.0]), 0).reshape(3, 1, 1, 1)
    torch.testing.assert_close(patch_weights(sim, "rank", 1.0), expected)


def test_power_rule_weighs_in_proportion_to_the_divergence():
    sim = torch.tensor([0.99, 0.97]).reshape(2, 1, 1, 1)  # divergences 0.01 and 0.03
    torch.testing.assert_close(patch_weights(sim, "power", 1.0).flatten(), torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(patch_weights(sim, "power", 0.5).flatten(), torch.tensor([0.1, 0.9]))


def test_contrast_rule_weighs_each_loras_divergence_over_its_own_mean_over_the_image():
    d = torch.tensor([[0.01, 0.03], [0.04, 0.04]], dtype=torch.float64).reshape(2, 1, 1, 2)
    # Own means 0.02 and 0.04: relative divergences [0.5, 1.5] and [1, 1].
    relative = torch.tensor([[0.5, 1.5], [1.0, 1.0]], dtype=torch.float64).reshape(2, 1, 1, 2)
    torch.testing.assert_close(patch_weights(1 - d, "contrast", 1.0), relative / relative.sum(0))
    torch.testing.assert_close(
        patch_weights(1 - d, "contrast", 0.5), relative**2 / (relative**2).sum(0)
    )


@given(seed=st.integers(0, 2**16), factor=st.sampled_from([0.05, 4.0, 50.0]), lora=st.integers(0, 2))
def test_contrast_rule_ignores_how_strong_each_lora_is_overall(seed, factor, lora):
    """A LoRA trained harder, or given a larger scale, moves the image more everywhere: under
    contrast that alone wins it no patch."""
    sim = similarities(seed, spread=0.004).double()
    stronger = sim.clone()
    stronger[lora] = 1 - factor * (1 - sim[lora])
    torch.testing.assert_close(
        patch_weights(stronger, "contrast", 1.0), patch_weights(sim, "contrast", 1.0), atol=1e-9, rtol=0
    )


def test_under_contrast_a_lora_that_moves_every_patch_leaves_a_local_concept_its_patch():
    """A style moves every patch by 0.05; a character moves the centre by 0.03 and the rest by
    0.001. By raw divergence (power) the style takes the centre too; by contrast the character does."""
    style = torch.full((3, 3), 0.05, dtype=torch.float64)
    character = torch.full((3, 3), 0.001, dtype=torch.float64)
    character[1, 1] = 0.03
    sim = 1 - torch.stack([style, character])[:, None]
    centre = (slice(None), 0, 1, 1)
    assert patch_weights(sim, "power", 1.0)[centre].argmax() == 0
    assert patch_weights(sim, "contrast", 1.0)[centre].argmax() == 1
    # Elsewhere the style keeps the image.
    assert bool((patch_weights(sim, "contrast", 1.0)[0, 0, 0] > 0.5).all())


def test_median_rule_measures_divergence_in_units_of_the_samples_median():
    d = torch.tensor([[0.01, 0.02], [0.03, 0.04]]).reshape(2, 1, 1, 2)  # lower median 0.02
    weights = patch_weights(1 - d, "median", 1.0)
    logits = d / 0.02
    torch.testing.assert_close(weights, torch.softmax(logits, 0))


def test_spread_rule_measures_gaps_in_units_of_the_typical_spread_across_loras():
    d = torch.tensor([[0.01, 0.01], [0.03, 0.05]]).reshape(2, 1, 1, 2)
    # std across the 2 LoRAs: 0.01 and 0.02 per patch; typical spread (their mean) 0.015.
    mean = d.mean(0, keepdim=True)
    torch.testing.assert_close(patch_weights(1 - d, "spread", 1.0), torch.softmax((d - mean) / 0.015, 0))


@pytest.mark.parametrize("rule", WEIGHTINGS)
@given(seed=st.integers(0, 2**16), data=st.data())
def test_every_rule_gives_dropped_loras_exactly_zero(rule, seed, data):
    sim = similarities(seed, n=4)
    keep = torch.tensor(data.draw(st.lists(st.lists(st.booleans(), min_size=2, max_size=2), min_size=4, max_size=4)))
    assume(bool(keep.any(0).all()))
    weights = patch_weights(sim, rule, 1.0, keep)
    assert torch.all(weights[~keep] == 0)
    torch.testing.assert_close(weights.sum(0), torch.ones(2, 3, 3))


def test_a_dropped_lora_takes_no_part_in_the_statistics():
    sim = similarities(3, n=3)
    keep = torch.tensor([[True, True], [True, True], [False, False]])
    for rule in WEIGHTINGS:
        alone = patch_weights(sim[:2], rule, 1.0)
        torch.testing.assert_close(patch_weights(sim, rule, 1.0, keep)[:2], alone, atol=1e-6, rtol=0)


def test_identical_predictions_everywhere_give_uniform_weights_not_nan():
    sim = torch.ones(3, 1, 2, 2)
    for rule in WEIGHTINGS:
        weights = patch_weights(sim, rule, 1.0)
        assert torch.isfinite(weights).all()
        if rule != "rank":  # rank breaks ties by LoRA order
            torch.testing.assert_close(weights, torch.full_like(weights, 1 / 3))


def test_unknown_rule_is_refused_by_name():
    with pytest.raises(ValueError, match="weighting rule must be one of softmin, spread"):
        patch_weights(similarities(0), "sharpest", 1.0)
    with pytest.raises(ValueError, match="weighting must be one of"):
        LoRAtorioConfig(weighting="sharpest")


def test_under_contrast_a_lora_that_hardly_moves_the_image_stays_light():
    """Out of its domain everywhere, a LoRA's divergence is tiny noise: contrast must not scale that
    noise up into a map that takes patches from the LoRAs that act."""
    gen = torch.Generator().manual_seed(0)
    active = 0.01 + 0.01 * torch.rand(2, 1, 4, 4, generator=gen, dtype=torch.float64)
    inert = 1e-9 * torch.rand(1, 1, 4, 4, generator=gen, dtype=torch.float64)
    weights = patch_weights(1 - torch.cat([active, inert]), "contrast", 1.0)
    assert float(weights[2].max()) < 0.01
    # Dropped by top-k, the most active LoRA sets no floor for the others.
    keep = torch.tensor([[False], [True], [True]])
    alone = patch_weights(1 - torch.cat([active[1:], inert]), "contrast", 1.0)
    torch.testing.assert_close(patch_weights(1 - torch.cat([active, inert]), "contrast", 1.0, keep)[1:], alone)


def test_under_contrast_a_single_patch_gives_uniform_weights():
    sim = torch.tensor([0.9, 0.99, 0.999]).reshape(3, 1, 1, 1)  # one patch: nowhere to act "more"
    torch.testing.assert_close(patch_weights(sim, "contrast", 1.0), torch.full_like(sim, 1 / 3))
