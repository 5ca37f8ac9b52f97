"""The one settings object of the method, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from fractions import Fraction
from typing import Any

MODES = ("loratorio", "composite", "switch", "merge")
UPSAMPLE_MODES = ("nearest", "bilinear")
WEIGHTINGS = ("softmin", "spread", "median", "power", "rank", "contrast")
GATE_CONTEXTS = ("full", "mean")
GATE_MAPS = ("weights", "winner", "zero")
UNCOND_LORAS = ("evaluate", "reuse")


@dataclass(frozen=True)
class LoRAtorioConfig:
    """How a step is composed.

    mode: ``loratorio`` (the method), or one of the baselines of Zhong et al. 2024:
        ``composite`` (mean of every LoRA's cond and uncond, then CFG), ``switch`` (one LoRA a
        step, cycling every ``switch_every`` steps in prompt order), ``merge`` (every LoRA
        active at once on one model: what the WebUIs do by default).
    patch_size: side d of the square latent patches the similarity is measured on, in latent
        pixels whatever the latent's size; None (the default) takes ``patch_fraction`` of it.
    patch_fraction: with patch_size None, d as a fraction of the latent's shorter side (rounded to
        the nearest pixel, at least 1): 1/16 is d = 4 on SD1.5's 64x64 latent (512 px), 8 on
        SDXL's 128x128 (1024 px), and each hires pass gets its own. ``patch_size_for`` resolves it.
    weighting: how divergences become patch weights (``weighting.patch_weights``): ``softmin``
        (the paper's: softmax of -similarity / tau, a tau in units of cosine similarity, whose
        useful range moves with the model and the step), or the scale-free rules ``contrast``,
        ``power``, ``spread``, ``median``, ``rank``, whose tau means the same on every model.
    temperature: tau of the weighting's softmax (lower: winner-take-more weights).
    recenter: lam of the re-centered unconditional branch; 1 uses the base model's unconditional
        prediction alone, so no LoRA needs an unconditional pass (N + 2 rows instead of 2N + 2).
    uncond_loras: with lam < 1, where the LoRAs' share of the re-centred uncond comes from:
        ``evaluate`` (the paper's: every LoRA runs on the negative prompt, N rows a step) or
        ``reuse`` (the cond branch's composed LoRA change, cond - base cond, added to the base's
        uncond: lam * base_u + (1 - lam) * (base_u + change); no LoRA runs the negative prompt, so
        a step is N + 2 rows, as at lam 1). It assumes a LoRA changes the prediction for the
        negative prompt as it does for the positive one.
    top_k: keep only the k LoRAs that diverge most from the base (dynamic selection); None keeps all.
    reselect_every: with top_k, how many steps a selection stays in force (1 = every step, as in
        the paper); between selections only the kept LoRAs are evaluated.
    upsample: how patch weights are spread over the latent's pixels: ``nearest`` or ``bilinear``.
    switch_every: steps each LoRA stays active in ``switch`` mode (5 in the paper's baseline).
    exact_every: K, LoRAtorio's gated single pass (``loratorio`` mode; ignored by the baselines):
        1 (the default) evaluates base + every LoRA at every step, the method as written. With
        K > 1 only the first ``exact_first`` steps and every K-th step after (step % K == 0) are
        exact; the steps between run ONE cond row with every LoRA active, each LoRA's output at
        every layer multiplied per position by its weight map of the last exact step (its gate),
        and one uncond row (the base's at lam = 1; else the gated row with gates x (1 - lam)):
        2 rows a sample, like merge. K = 2 kept the exact method's quality on both synthetic
        benchmarks; K = 3 costs fewer rows and loses some at N = 4-5 (README, the gated single pass).
    exact_first: with exact_every > 1, how many leading steps are exact (where the layout is decided).
    gate_context: on gated steps, what multiplies each LoRA's change of layers whose input has no
        position (cross-attention keys and values, from the text): ``full`` (its scale: every
        LoRA's keys and values at full strength, the queries and outputs gated) or ``mean`` (its
        scale times the mean of its gate over the image).

    The paper does not publish d, tau, k or the upsampling mode. The defaults were chosen on the
    dev halves of both synthetic benchmarks (``benchmarks/sweep.py``, two different toy models),
    one reason each:
    - weighting ``contrast``, tau 3 (weights proportional to (d / the LoRA's own mean d) ** 1/3):
      on the whole dev halves +14 points of all-present on the first model and a tie on the second
      against the best earlier rule (power tau 5), with co-located clothing kept far more often;
      it compares where each LoRA acts, not how strongly, so neither the model's closeness to the
      base (softmin tau 1 drifts to uniform there) nor one LoRA's overall strength decides.
    - lam 0.5: lam 1 (N + 2 rows instead of 2N + 2) lost 12 points of all-present (19 on one model).
    - patch 1/16 of the side: 1/8 tied, and the finer patch follows small concepts.
    - uncond_loras ``evaluate``: ``reuse`` (N + 2 rows) tied it on the dev halves but lost 6.7 points
      on the first benchmark's test half; it is offered, not the default.
    """

    mode: str = "loratorio"
    patch_size: int | None = None
    patch_fraction: float = 1 / 16
    weighting: str = "contrast"
    temperature: float = 3.0
    recenter: float = 0.5
    top_k: int | None = None
    reselect_every: int = 1
    upsample: str = "nearest"
    switch_every: int = 5
    exact_every: int = 1
    exact_first: int = 3
    gate_context: str = "full"
    gate_maps: str = "weights"
    uncond_loras: str = "evaluate"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if self.patch_size is not None:
            _require_int("patch_size", self.patch_size, minimum=1)
        if not _is_real(self.patch_fraction) or not (0 < self.patch_fraction <= 1):
            raise ValueError(
                f"patch_fraction must be a number in (0, 1], the patch side as a fraction of the "
                f"latent's shorter side (e.g. 1/16); got {self.patch_fraction!r}"
            )
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}; got {self.weighting!r}")
        if not _is_real(self.temperature) or not (0 < self.temperature < math.inf):
            raise ValueError(f"temperature must be a finite number > 0 (try 3); got {self.temperature!r}")
        if not _is_real(self.recenter) or not (0.0 <= self.recenter <= 1.0):
            raise ValueError(f"recenter (lam) must be in [0, 1]; got {self.recenter!r}")
        if self.top_k is not None:
            _require_int("top_k", self.top_k, minimum=1)
            if self.mode != "loratorio":
                raise ValueError(
                    f"top_k (dynamic selection) applies to mode 'loratorio' only; got mode "
                    f"{self.mode!r} with top_k={self.top_k}: set top_k=None"
                )
        _require_int("reselect_every", self.reselect_every, minimum=1)
        if self.upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {', '.join(UPSAMPLE_MODES)}; got {self.upsample!r}")
        _require_int("switch_every", self.switch_every, minimum=1)
        _require_int("exact_every", self.exact_every, minimum=1)
        _require_int("exact_first", self.exact_first, minimum=1)
        if self.gate_maps not in GATE_MAPS:
            raise ValueError(f"gate_maps must be one of {', '.join(GATE_MAPS)}; got {self.gate_maps!r}")
        if self.uncond_loras not in UNCOND_LORAS:
            raise ValueError(
                f"uncond_loras must be one of {', '.join(UNCOND_LORAS)}; got {self.uncond_loras!r}"
            )
        if self.gate_context not in GATE_CONTEXTS:
            raise ValueError(
                f"gate_context must be one of {', '.join(GATE_CONTEXTS)}; got {self.gate_context!r}"
            )

    @property
    def gated(self) -> bool:
        """Whether some steps run the gated single pass (LoRAtorio with exact_every > 1)."""
        return self.mode == "loratorio" and self.exact_every > 1

    @property
    def reuses_cond_change(self) -> bool:
        """Whether the re-centred uncond takes the LoRAs' part from the cond branch (LoRAtorio,
        lam < 1, ``uncond_loras="reuse"``): no LoRA runs the negative prompt."""
        return self.mode == "loratorio" and self.recenter < 1.0 and self.uncond_loras == "reuse"

    def is_exact_step(self, step: int) -> bool:
        """Whether ``step`` (0-based) evaluates base + every LoRA: always unless ``gated``; then
        the first ``exact_first`` steps and every ``exact_every``-th step."""
        return not self.gated or step < self.exact_first or step % self.exact_every == 0

    def patch_size_for(self, size: tuple[int, int]) -> int:
        """The patch side d in latent pixels for a latent of ``size`` (H, W): ``patch_size`` when
        set, else ``patch_fraction`` of the shorter side rounded to the nearest pixel (halves up),
        at least 1."""
        if self.patch_size is not None:
            return self.patch_size
        return max(1, math.floor(min(size) * self.patch_fraction + 0.5))

    def replace(self, **changes: Any) -> LoRAtorioConfig:
        """A copy with some settings changed (validated like any new config)."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"unknown LoRAtorioConfig setting(s): {', '.join(sorted(unknown))}")
        return replace(self, **changes)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _require_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")


def parse_patch(value: object) -> dict[str, Any]:
    """A patch-size setting as users write it -> the config's ``patch_size`` and ``patch_fraction``:
    an absolute size in latent pixels (a whole number >= 1: 4, "4") or a fraction of the latent's
    shorter side ("1/16", at most 1). ValueError with what to write otherwise."""
    problem = (
        "patch size must be an absolute size in latent pixels (a whole number >= 1, e.g. 4) or a "
        f"fraction of the latent's shorter side (e.g. 1/16, at most 1); got {value!r}"
    )
    text = value.strip() if isinstance(value, str) else value
    if isinstance(text, str) and "/" in text:
        try:
            fraction = Fraction(*(int(part) for part in text.split("/")))
        except (ValueError, ZeroDivisionError, TypeError):
            raise ValueError(problem) from None
        if not 0 < fraction <= 1:
            raise ValueError(problem)
        return {"patch_size": None, "patch_fraction": float(fraction)}
    try:
        number = float(text) if isinstance(text, (str, int, float)) and not isinstance(text, bool) else None
    except ValueError:
        number = None
    if number is None or not math.isfinite(number) or number != int(number) or number < 1:
        raise ValueError(problem)
    return {"patch_size": int(number), "patch_fraction": LoRAtorioConfig.patch_fraction}


def format_patch(config: LoRAtorioConfig) -> str:
    """The patch-size setting of ``config`` as users write it: "4" (absolute) or "1/16"."""
    if config.patch_size is not None:
        return str(config.patch_size)
    fraction = Fraction(config.patch_fraction).limit_denominator(1024)
    return f"{fraction.numerator}/{fraction.denominator}"
