"""An independent float64 rendering of the method's formulas (docs: shared method.md).

Written with plain loops over patches and pixels, nothing shared with loratorio_core, so the
tests compare two implementations rather than one with itself.
"""

from __future__ import annotations

import math

import torch


def similarity(eps_loras: torch.Tensor, eps_base: torch.Tensor, d: int) -> torch.Tensor:
    n, b, _, height, width = eps_loras.shape
    h, w = math.ceil(height / d), math.ceil(width / d)
    out = torch.zeros(n, b, h, w, dtype=torch.float64)
    for i in range(n):
        for s in range(b):
            for y in range(h):
                for x in range(w):
                    a = eps_loras[i, s, :, y * d : (y + 1) * d, x * d : (x + 1) * d].double().flatten()
                    c = eps_base[s, :, y * d : (y + 1) * d, x * d : (x + 1) * d].double().flatten()
                    na, nc = a.norm().item(), c.norm().item()
                    out[i, s, y, x] = 0.0 if na == 0 or nc == 0 else (a @ c).item() / (na * nc)
    return out


def softmin(sim: torch.Tensor, tau: float, keep: torch.Tensor | None = None) -> torch.Tensor:
    n, b, h, w = sim.shape
    out = torch.zeros(n, b, h, w, dtype=torch.float64)
    for s in range(b):
        members = [i for i in range(n) if keep is None or bool(keep[i, s])]
        for y in range(h):
            for x in range(w):
                for i in members:
                    # w_i = 1 / sum_j exp(-(s_j - s_i) / tau): the softmin, stable in float64.
                    total = sum(
                        math.exp(-(sim[j, s, y, x].item() - sim[i, s, y, x].item()) / tau) for j in members
                    )
                    out[i, s, y, x] = 1.0 / total
    return out


def power(sim: torch.Tensor, tau: float, keep: torch.Tensor | None = None) -> torch.Tensor:
    """The ``power`` rule: w_i = d_i ** (1 / tau) / sum_j d_j ** (1 / tau), d = 1 - s."""
    n, b, h, w = sim.shape
    out = torch.zeros(n, b, h, w, dtype=torch.float64)
    for s in range(b):
        members = [i for i in range(n) if keep is None or bool(keep[i, s])]
        for y in range(h):
            for x in range(w):
                logs = {i: math.log(max(1.0 - sim[i, s, y, x].item(), 1e-300)) / tau for i in members}
                top = max(logs.values())  # d ** (1/tau) relative to the largest: no overflow
                total = sum(math.exp(v - top) for v in logs.values())
                for i in members:
                    out[i, s, y, x] = math.exp(logs[i] - top) / total
    return out


def contrast(sim: torch.Tensor, tau: float, keep: torch.Tensor | None = None) -> torch.Tensor:
    """The ``contrast`` rule: the power rule on r_i = d_i / m_i, m_i the mean of LoRA i's
    d = 1 - s over the sample's patches (at least 1e-3 of the largest kept LoRA's)."""
    n, b, h, w = sim.shape
    relative = torch.zeros(n, b, h, w, dtype=torch.float64)
    for s in range(b):
        d = [[[max(1.0 - sim[i, s, y, x].item(), 0.0) for x in range(w)] for y in range(h)] for i in range(n)]
        means = [sum(map(sum, d[i])) / (h * w) for i in range(n)]
        # A LoRA below 1e-3 of the most active kept one's mean is measured against that floor.
        floor = 1e-3 * max(means[i] for i in range(n) if keep is None or bool(keep[i, s]))
        for i in range(n):
            mean = max(means[i], floor)
            for y in range(h):
                for x in range(w):
                    relative[i, s, y, x] = d[i][y][x] / mean if mean > 0 else 0.0
    return power(1.0 - relative, tau, keep)


RULES = {"softmin": softmin, "power": power, "contrast": contrast}
DEFAULT_RULE = "contrast"  # LoRAtorioConfig's default (tests check that it is)


def weights(sim: torch.Tensor, tau: float, keep: torch.Tensor | None = None, rule: str = DEFAULT_RULE):
    return RULES[rule](sim, tau, keep)


def upsample_nearest(weights: torch.Tensor, height: int, width: int, d: int) -> torch.Tensor:
    n, b = weights.shape[:2]
    out = torch.zeros(n, b, 1, height, width, dtype=torch.float64)
    for py in range(height):
        for px in range(width):
            out[:, :, 0, py, px] = weights[:, :, py // d, px // d]
    return out


def compose(eps: torch.Tensor, weights_up: torch.Tensor) -> torch.Tensor:
    return sum(weights_up[i].double() * eps[i].double() for i in range(eps.shape[0]))


def top_k(sim: torch.Tensor, k: int) -> torch.Tensor:
    n, b = sim.shape[:2]
    keep = torch.zeros(n, b, dtype=torch.bool)
    for s in range(b):
        divergence = [(1.0 - sim[i, s].double()).mean().item() for i in range(n)]
        # Most divergent first; equal divergence keeps prompt order.
        order = sorted(range(n), key=lambda i: (-divergence[i], i))
        for i in order[:k]:
            keep[i, s] = True
    return keep


def loratorio_step(
    base_c, base_u, loras_c, loras_u, *, d, tau, lam, scale, keep=None, rule=DEFAULT_RULE, reuse=False
) -> torch.Tensor:
    """One guided step of the method, in float64, from the raw predictions. reuse: the uncond's
    LoRA part is the base uncond plus the cond branch's LoRA change (e_c - base_c), not loras_u."""
    sim = similarity(loras_c, base_c, d)
    up = upsample_nearest(weights(sim, tau, keep, rule), base_c.shape[-2], base_c.shape[-1], d)
    e_c = compose(loras_c, up)
    if base_u is None:
        return e_c
    if reuse:
        mixed = base_u.double() + (e_c - base_c.double())
    else:
        mixed = compose(loras_u, up) if lam < 1 else 0.0
    e_u = lam * base_u.double() + (1 - lam) * mixed
    return e_u + scale * (e_c - e_u)


def loratorio_step_and(
    base_cs, base_u, loras_cs, loras_u, *, d, tau, lam, scale, rule=DEFAULT_RULE
) -> torch.Tensor:
    """One guided step with AND sub-prompts (A1111's composable diffusion, every weight 1): each
    sub-prompt j composed with its own weights W_j; the uncond re-centred with their mean;
    eps = e_u + w * sum_j (e_c_j - e_u)."""
    height, width = base_u.shape[-2:]
    ups = [
        upsample_nearest(weights(similarity(lc, bc, d), tau, rule=rule), height, width, d)
        for bc, lc in zip(base_cs, loras_cs, strict=True)
    ]
    e_cs = [compose(lc, w) for lc, w in zip(loras_cs, ups, strict=True)]
    mean = sum(ups) / len(ups)
    mixed = compose(loras_u, mean) if lam < 1 else 0.0
    e_u = lam * base_u.double() + (1 - lam) * mixed
    return e_u + scale * sum(e_c - e_u for e_c in e_cs)
