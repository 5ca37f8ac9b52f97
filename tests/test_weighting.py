"""The method's tensor functions, against the float64 reference and as properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from loratorio_core import (
    compose,
    guided,
    mean_divergence,
    patch_cosine_similarity,
    patch_weights,
    recentered_uncond,
    select_top_k,
    softmin_weights,
    upsample_weights,
)

import reference as ref

shapes = st.tuples(
    st.integers(1, 4),  # N
    st.integers(1, 2),  # B
    st.integers(1, 3),  # C
    st.integers(1, 9),  # H
    st.integers(1, 9),  # W
    st.integers(1, 4),  # d
)


def predictions(seed: int, n: int, b: int, c: int, h: int, w: int):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(b, c, h, w, generator=g)
    # LoRAs = base + a perturbation, as real eps predictions are: similar, not identical.
    loras = base + 0.5 * torch.randn(n, b, c, h, w, generator=g)
    return loras, base


@given(shapes, st.integers(0, 2**16))
def test_similarity_matches_reference_including_edge_patches(shape, seed):
    n, b, c, h, w, d = shape
    loras, base = predictions(seed, n, b, c, h, w)
    got = patch_cosine_similarity(loras, base, d)
    assert got.shape == (n, b, math.ceil(h / d), math.ceil(w / d))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got.double(), ref.similarity(loras, base, d), atol=1e-5, rtol=1e-5)


def test_similarity_is_float64_when_given_float64():
    loras, base = predictions(0, 2, 1, 4, 6, 6)
    got = patch_cosine_similarity(loras.double(), base.double(), 3)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref.similarity(loras.double(), base.double(), 3), atol=1e-12, rtol=0)


@given(st.integers(1, 4), st.integers(1, 2), st.integers(0, 2**16), st.sampled_from([0.01, 0.1, 1.0]))
def test_softmin_matches_reference(n, b, seed, tau):
    sim = 1 - torch.rand(n, b, 3, 2, generator=torch.Generator().manual_seed(seed)) * 0.2
    torch.testing.assert_close(
        softmin_weights(sim, tau).double(), ref.softmin(sim, tau), atol=1e-6, rtol=1e-5
    )


@pytest.mark.parametrize("rule", ["power", "contrast"])
@given(st.integers(1, 4), st.integers(1, 2), st.integers(0, 2**16), st.sampled_from([0.5, 1.0, 5.0]), st.data())
def test_scale_free_rules_match_reference_with_and_without_keep(rule, n, b, seed, tau, data):
    sim = 1 - torch.rand(n, b, 3, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 0.2
    keep = torch.tensor(
        data.draw(st.lists(st.lists(st.booleans(), min_size=b, max_size=b), min_size=n, max_size=n))
    )
    assume(bool(keep.any(0).all()))
    for mask in (None, keep):
        torch.testing.assert_close(
            patch_weights(sim, rule, tau, mask), ref.RULES[rule](sim, tau, mask), atol=1e-9, rtol=1e-9
        )


@given(st.integers(2, 5), st.integers(1, 3), st.integers(0, 2**16), st.data())
def test_softmin_with_keep_gives_dropped_loras_exactly_zero_and_renormalises(n, b, seed, data):
    sim = 1 - torch.rand(n, b, 2, 2, generator=torch.Generator().manual_seed(seed)) * 0.2
    keep = torch.tensor(
        data.draw(st.lists(st.lists(st.booleans(), min_size=b, max_size=b), min_size=n, max_size=n))
    )
    assume(bool(keep.any(0).all()))
    weights = softmin_weights(sim, 0.05, keep)
    assert torch.all(weights[~keep] == 0)
    torch.testing.assert_close(weights.sum(0), torch.ones(b, 2, 2))
    torch.testing.assert_close(weights.double(), ref.softmin(sim, 0.05, keep), atol=1e-6, rtol=1e-5)


@given(shapes, st.integers(0, 2**16), st.sampled_from(["nearest", "bilinear"]))
def test_upsampled_weights_sum_to_one_at_every_pixel(shape, seed, mode):
    n, b, c, h, w, d = shape
    loras, base = predictions(seed, n, b, c, h, w)
    weights = softmin_weights(patch_cosine_similarity(loras, base, d), 0.1)
    up = upsample_weights(weights, (h, w), d, mode)
    assert up.shape == (n, b, 1, h, w)
    assert torch.all(up >= 0)
    torch.testing.assert_close(up.sum(0), torch.ones(b, 1, h, w, dtype=up.dtype))


@given(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9), st.integers(1, 4), st.integers(0, 2**16))
def test_nearest_upsampling_gives_each_pixel_its_patch_weight(n, h, w, d, seed):
    hh, ww = math.ceil(h / d), math.ceil(w / d)
    weights = torch.rand(n, 2, hh, ww, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(
        upsample_weights(weights, (h, w), d).double(), ref.upsample_nearest(weights.double(), h, w, d)
    )


def test_bilinear_upsampling_is_smooth_between_patch_centres():
    weights = torch.tensor([[[[1.0, 0.0]]], [[[0.0, 1.0]]]])  # N=2, B=1, one row of 2 patches
    up = upsample_weights(weights, (4, 8), 4, "bilinear")[0, 0, 0, 0]
    assert up[0] == 1 and up[-1] == 0  # patch centres and beyond keep their weight
    assert torch.all(up[1:] <= up[:-1])  # decreasing monotonically across the seam
    assert 0 < up[4] < 1


@given(shapes, st.integers(0, 2**16))
def test_compose_matches_reference(shape, seed):
    n, b, c, h, w, d = shape
    loras, base = predictions(seed, n, b, c, h, w)
    up = upsample_weights(softmin_weights(patch_cosine_similarity(loras, base, d), 0.1), (h, w), d)
    torch.testing.assert_close(compose(loras, up).double(), ref.compose(loras, up), atol=1e-5, rtol=1e-5)


@given(shapes, st.integers(0, 2**16), st.randoms(use_true_random=False))
def test_permuting_the_loras_permutes_the_weights(shape, seed, rnd):
    n, b, c, h, w, d = shape
    loras, base = predictions(seed, n, b, c, h, w)
    perm = list(range(n))
    rnd.shuffle(perm)
    weights = softmin_weights(patch_cosine_similarity(loras, base, d), 0.05)
    permuted = softmin_weights(patch_cosine_similarity(loras[perm], base, d), 0.05)
    torch.testing.assert_close(permuted, weights[perm])


@given(shapes, st.integers(0, 2**16))
def test_identical_loras_give_that_lora_back(shape, seed):
    n, b, c, h, w, d = shape
    lora, base = predictions(seed, 1, b, c, h, w)
    loras = lora.expand(n, -1, -1, -1, -1)
    up = upsample_weights(softmin_weights(patch_cosine_similarity(loras, base, d), 0.01), (h, w), d)
    torch.testing.assert_close(compose(loras, up), lora[0])


@given(shapes, st.integers(0, 2**16))
def test_large_temperature_gives_the_uniform_mean(shape, seed):
    n, b, c, h, w, d = shape
    loras, base = predictions(seed, n, b, c, h, w)
    up = upsample_weights(softmin_weights(patch_cosine_similarity(loras, base, d), 1e6), (h, w), d)
    torch.testing.assert_close(compose(loras, up), loras.mean(0), atol=1e-4, rtol=1e-4)


@given(shapes, st.integers(0, 2**16))
def test_small_temperature_gives_a_one_hot_argmin(shape, seed):
    n, b, c, h, w, d = shape
    loras, base = predictions(seed, n, b, c, h, w)
    sim = patch_cosine_similarity(loras, base, d)
    if n > 1:  # a tie has no single argmin
        top2 = sim.topk(2, dim=0, largest=False).values
        assume(bool((top2[1] - top2[0] > 1e-4).all()))
    weights = softmin_weights(sim, 1e-9)
    one_hot = torch.nn.functional.one_hot(sim.argmin(0), n).permute(3, 0, 1, 2).float()
    assert torch.equal(weights, one_hot)


def test_tiny_temperature_never_overflows_to_nan():
    sim = torch.tensor([[[[1.0]]], [[[1.0]]], [[[-1.0]]]])
    for tau in (1e-30, 1e-45, 5e-324):
        weights = softmin_weights(sim, tau)
        assert torch.isfinite(weights).all()
        torch.testing.assert_close(weights.flatten(), torch.tensor([0.0, 0.0, 1.0]))


@given(shapes, st.integers(0, 2**16))
def test_each_sample_depends_only_on_its_own_predictions(shape, seed):
    n, b, c, h, w, d = shape
    assume(b == 2)
    loras, base = predictions(seed, n, b, c, h, w)
    changed_loras, changed_base = loras.clone(), base.clone()
    changed_loras[:, 1] = torch.randn_like(loras[:, 1])
    changed_base[1] = -base[1]

    def run(lo, ba):
        up = upsample_weights(softmin_weights(patch_cosine_similarity(lo, ba, d), 0.05), (h, w), d)
        return compose(lo, up)

    assert torch.equal(run(loras, base)[0], run(changed_loras, changed_base)[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_give_finite_results_within_tolerance(dtype):
    loras, base = predictions(3, 3, 2, 4, 16, 12)
    full_sim = patch_cosine_similarity(loras, base, 4)
    half_sim = patch_cosine_similarity(loras.to(dtype), base.to(dtype), 4)
    assert half_sim.dtype == torch.float64
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(half_sim, full_sim, atol=tol, rtol=0)
    up = upsample_weights(softmin_weights(half_sim, 0.05), (16, 12), 4)
    out = compose(loras.to(dtype), up)
    assert out.dtype == dtype and torch.isfinite(out).all()
    full = compose(loras, upsample_weights(softmin_weights(full_sim, 0.05), (16, 12), 4))
    torch.testing.assert_close(out.float(), full, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("fill", [0.0, 1.0, -3.5])
def test_zeros_and_constants_give_no_nan(fill):
    loras = torch.full((3, 2, 4, 5, 7), fill)
    base = torch.full((2, 4, 5, 7), fill)
    base_zero = torch.zeros(2, 4, 5, 7)
    for b in (base, base_zero):
        sim = patch_cosine_similarity(loras, b, 2)
        assert torch.isfinite(sim).all()
        for mode in ("nearest", "bilinear"):
            up = upsample_weights(softmin_weights(sim, 0.01), (5, 7), 2, mode)
            out = compose(loras, up)
            assert torch.isfinite(out).all()
            torch.testing.assert_close(out, loras[0])
        uncond = recentered_uncond(b, loras, up, 0.5)
        assert torch.isfinite(guided(out, uncond, 7.5)).all()


def test_top_k_keeps_the_most_divergent_per_sample():
    sim = torch.tensor([0.99, 0.90, 0.95, 0.80]).reshape(4, 1, 1, 1).repeat(1, 2, 2, 2)
    sim[:, 1] = torch.tensor([0.80, 0.99, 0.90, 0.99]).reshape(4, 1, 1)
    keep = select_top_k(sim, 2)
    assert keep[:, 0].tolist() == [False, True, False, True]
    assert keep[:, 1].tolist() == [True, False, True, False]


@given(st.integers(1, 6), st.integers(1, 3), st.integers(0, 2**16), st.data())
def test_top_k_matches_reference_with_ties_broken_by_lora_order(n, b, seed, data):
    k = data.draw(st.integers(1, n))
    # Few distinct values: ties happen often.
    sim = torch.randint(0, 3, (n, b, 2, 2), generator=torch.Generator().manual_seed(seed)).float() / 4
    keep = select_top_k(sim, k)
    assert torch.equal(keep, ref.top_k(sim, k))
    assert torch.all(keep.sum(0) == k)


def test_mean_divergence_is_mean_of_one_minus_similarity():
    sim = torch.tensor([[[[1.0, 0.5], [0.0, -1.0]]]])
    torch.testing.assert_close(mean_divergence(sim), torch.tensor([[0.875]]))


def test_recentered_uncond_mixes_base_and_composed_loras():
    loras, base = predictions(1, 2, 1, 4, 4, 4)
    up = upsample_weights(softmin_weights(patch_cosine_similarity(loras, base, 2), 0.1), (4, 4), 2)
    mixed = ref.compose(loras, up)
    for lam in (0.0, 0.3, 1.0):
        got = recentered_uncond(base, loras, up, lam)
        torch.testing.assert_close(
            got.double(), lam * base.double() + (1 - lam) * mixed, atol=1e-6, rtol=1e-6
        )
    assert recentered_uncond(base, None, up, 1.0) is base


def test_guided_is_classifier_free_guidance():
    cond, uncond = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(guided(cond, uncond, 7.0), uncond + 7.0 * (cond - uncond))
    torch.testing.assert_close(guided(cond, uncond, 1.0), cond)


def _raises(match: str):
    return pytest.raises(ValueError, match=match)


def test_bad_arguments_raise_value_errors_naming_the_argument():
    loras, base = predictions(0, 3, 2, 4, 8, 8)
    sim = patch_cosine_similarity(loras, base, 4)
    up = upsample_weights(softmin_weights(sim, 0.1), (8, 8), 4)
    with _raises("eps_base"):
        patch_cosine_similarity(loras, base[:1], 4)
    with _raises("eps_loras"):
        patch_cosine_similarity(loras[0], base, 4)
    for d in (0, -2, 1.5, True):
        with _raises("patch_size"):
            patch_cosine_similarity(loras, base, d)
    for tau in (0, -1.0, math.inf, math.nan):
        with _raises("temperature"):
            softmin_weights(sim, tau)
    with _raises("keep"):
        softmin_weights(sim, 0.1, torch.ones(3, 1, dtype=torch.bool))
    with _raises("keep"):
        softmin_weights(sim, 0.1, torch.zeros(3, 2, dtype=torch.bool))
    with _raises("size"):
        upsample_weights(softmin_weights(sim, 0.1), (9, 8), 4)
    with _raises("mode"):
        upsample_weights(softmin_weights(sim, 0.1), (8, 8), 4, "bicubic")
    with _raises("weights_up"):
        compose(loras, up[:2])
    for k in (0, 4, 1.0):
        with _raises("k must"):
            select_top_k(sim, k)
    for lam in (-0.1, 1.1, math.nan):
        with _raises("lam"):
            recentered_uncond(base, loras, up, lam)
    with _raises("eps_loras_uncond"):
        recentered_uncond(base, None, up, 0.5)
    with _raises("cond and uncond"):
        guided(base, base[:1], 7.0)
    with _raises("scale"):
        guided(base, base, math.inf)
