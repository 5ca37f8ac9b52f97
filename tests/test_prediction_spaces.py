"""The conversions between prediction spaces live once, in the core (guidance.py), and every host
(A1111, Forge, diffusers) uses them: they match the definitions and the hosts' former formulas."""

from __future__ import annotations

import pytest
import torch

from loratorio_core import denoised_from_eps, eps_from_denoised, eps_from_v, v_from_eps

SIGMAS = torch.tensor([0.03, 1.0, 14.6])


def _noisy(seed: int = 0):
    """x0, eps and the model input in variance-preserving scale, with v as its definition says."""
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    alpha_bar = (1 / (1 + SIGMAS**2)).view(-1, 1, 1, 1)
    x_vp = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps
    v = alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0
    return x0, eps, x_vp, v


def test_v_and_eps_convert_as_the_definition_says_per_sample():
    x0, eps, x_vp, v = _noisy()
    torch.testing.assert_close(eps_from_v(x_vp, v, SIGMAS), eps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v_from_eps(x_vp, eps, SIGMAS), v, atol=1e-5, rtol=1e-5)
    # x0 <-> eps in k-diffusion's space: x = x0 + sigma * eps
    x_k = x0 + SIGMAS.view(-1, 1, 1, 1) * eps
    torch.testing.assert_close(eps_from_denoised(x_k, x0, SIGMAS), eps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(denoised_from_eps(x_k, eps, SIGMAS), x0, atol=1e-5, rtol=1e-5)


def test_one_sigma_for_every_sample_and_half_precision_keep_their_shape_and_dtype():
    _, eps, x_vp, v = _noisy()
    one = eps_from_v(x_vp[1:2].expand(3, -1, -1, -1), v[1:2].expand(3, -1, -1, -1), 1.0)
    torch.testing.assert_close(one, eps[1:2].expand(3, -1, -1, -1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eps_from_v(x_vp, v, SIGMAS[1:2].expand(1)), eps_from_v(x_vp, v, torch.ones(3)))
    half = eps_from_v(x_vp.half(), v.half(), SIGMAS)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), eps, atol=1e-2, rtol=1e-2)
    assert v_from_eps(x_vp.half(), eps.half(), SIGMAS).dtype == torch.float16


def test_a_sigma_that_fits_no_sample_is_a_clear_error():
    _, eps, x_vp, v = _noisy()
    with pytest.raises(ValueError, match=r"sigma must be a number, \(1,\) or \(B,\) = \(3,\)"):
        eps_from_v(x_vp, v, torch.ones(2))
    with pytest.raises(ValueError, match="sigma must be"):
        eps_from_denoised(x_vp, eps, torch.ones(3, 1))


def test_a1111s_v_conversion_is_the_core_one_at_k_diffusions_interpolated_sigma():
    """A1111 feeds apply_model x * c_in at a fractional timestep t: its sigma is k-diffusion's
    log-linear interpolation of the schedule's sigmas; the former alpha-bar table formula agrees."""
    from extension.a1111 import _v_conversions

    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0).float()
    to_eps, from_eps = _v_conversions(alphas_cumprod)
    t = torch.tensor([10.0, 500.5, 998.2])
    x, v = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    inputs = {"x": x, "t": t}
    log_sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).log()
    frac = t - t.floor()
    sigma = ((1 - frac) * log_sigmas[t.floor().long()] + frac * log_sigmas[t.ceil().long()]).exp()
    a = (1 / (1 + sigma**2)).sqrt().view(-1, 1, 1, 1)
    b = (1 - 1 / (1 + sigma**2)).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(to_eps(v, inputs), a * v + b * x)
    torch.testing.assert_close(from_eps(v, inputs), (v - b * x) / a)


@pytest.mark.parametrize("kind", ["v_prediction", "sample"])
@pytest.mark.parametrize("with_sigmas", [True, False])
def test_the_diffusers_pipelines_conversions_are_the_core_ones(kind, with_sigmas):
    """diffusers' schedulers: alpha-bar from the scheduler's sigma (Euler, DPM) or its schedule
    (DDIM); the former a/b formulas on the scaled sample agree."""
    from types import SimpleNamespace

    from loratorio_core.integrations.diffusers import _prediction_space

    alphas_cumprod = torch.linspace(0.999, 0.01, 1000)
    scheduler = SimpleNamespace(config=SimpleNamespace(prediction_type=kind), alphas_cumprod=alphas_cumprod)
    if with_sigmas:
        scheduler.sigmas, scheduler.step_index = torch.tensor([14.6, 2.5, 0.0]), 1
        alpha_bar = 1 / (1 + 2.5**2)
    else:
        alpha_bar = float(alphas_cumprod[400])
    a, b = alpha_bar**0.5, (1 - alpha_bar) ** 0.5
    to_eps, from_eps = _prediction_space(scheduler, 400, 1)
    x, out = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    if kind == "v_prediction":
        expected_eps, expected_out = a * out + b * x, (out - b * x) / a
    else:
        expected_eps, expected_out = (x - a * out) / b, (x - b * out) / a
    torch.testing.assert_close(to_eps(out, x), expected_eps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(from_eps(out, x), expected_out, atol=1e-5, rtol=1e-5)
