"""LoRAtorio: training-free, patch-wise composition of several LoRAs in diffusion models.

The method on raw tensors (``weighting``, ``guidance``), one step as plan -> rows -> combine
(``step``), and its settings (``config``). Framework-free: hosts (WebUIs, diffusers, any
sampler) call in; nothing here imports them.
"""

from .config import MODES, UPSAMPLE_MODES, WEIGHTINGS, LoRAtorioConfig
from .gating import GateState
from .guidance import (
    denoised_from_eps,
    eps_from_denoised,
    eps_from_v,
    guided,
    recentered_uncond,
    reused_uncond,
    v_from_eps,
)
from .step import Adapter, CondResult, Row, StepComposer, StepPlan, StepResult
from .weighting import (
    compose,
    mean_divergence,
    patch_cosine_similarity,
    patch_grid,
    patch_weights,
    select_top_k,
    softmin_weights,
    upsample_weights,
)

__version__ = "0.1.0"

__all__ = [
    "MODES",
    "UPSAMPLE_MODES",
    "WEIGHTINGS",
    "Adapter",
    "CondResult",
    "GateState",
    "LoRAtorioConfig",
    "Row",
    "StepComposer",
    "StepPlan",
    "StepResult",
    "compose",
    "denoised_from_eps",
    "eps_from_denoised",
    "eps_from_v",
    "guided",
    "mean_divergence",
    "patch_cosine_similarity",
    "patch_grid",
    "patch_weights",
    "recentered_uncond",
    "reused_uncond",
    "select_top_k",
    "softmin_weights",
    "upsample_weights",
    "v_from_eps",
]
