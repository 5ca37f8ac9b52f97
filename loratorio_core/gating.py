"""What LoRAtorio's gated steps carry over from its exact steps (``LoRAtorioConfig.exact_every``).

A gated step evaluates ONE cond row with every LoRA active, each LoRA's change of every layer's
output multiplied per position by its gate (a weight map of an earlier exact step), and one uncond
row: two rows a sample, like merge. One gated row is not the method: the method averages the
predictions of N models, each with one LoRA at full strength, and a model with every LoRA at a
fraction of its strength predicts something else (on the synthetic benchmark, whose weights are
close to uniform, far weaker concepts). So the exact step before a run of gated steps also
evaluates the gated rows, and the gated steps add what they missed there, the residual

    r = (exact composed prediction) - (gated rows' prediction)      at that exact step,

to their own gated prediction: eps_gated(t) + r. The residual is measured with the gates the
gated steps then use: the weight maps of the exact step before it (its own are known only after
its rows are evaluated), so gates lag one exact step behind the newest maps; the first exact
step, with no maps before it, measures it with uniform gates (1/N everywhere).

Shapes: N LoRAs, B samples, (C, H, W) a prediction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)
class GateState:
    """Per sample of the batch, what the next steps need (pass ``StepResult.gates`` to the next
    ``StepComposer.plan`` as ``gates=``, like ``kept``).

    latest: (N, B, 1, H, W) the newest exact step's weight maps (the next residual's gates).
    gates: (N, B, 1, H, W) the gates the gated steps use, those ``residual_cond`` was measured
        with ((N, B, 1, 1, 1) uniform ones after the first exact step); None until an exact step
        evaluated gated rows.
    residual_cond: (B, C, H, W) exact minus gated cond prediction at that step, or None.
    residual_uncond: (B, C, H, W) the same for the uncond branch; None at lam = 1 (the uncond is
        the base model's on every step) or until measured.
    """

    latest: Tensor
    gates: Tensor | None = None
    residual_cond: Tensor | None = None
    residual_uncond: Tensor | None = None

    @property
    def ready(self) -> bool:
        """Whether a gated step can run on this state (a residual was measured)."""
        return self.gates is not None and self.residual_cond is not None

    def with_latest(self, latest: Tensor) -> GateState:
        """The state after an exact step that measured no residual: only the newest maps change."""
        return replace(self, latest=latest)

    def check(self, n: int, batch_size: int) -> GateState:
        """This state if it fits N adapters and B samples; ValueError naming what to do otherwise."""
        tensors = [self.latest] + [t for t in (self.gates,) if t is not None]
        for t in tensors:
            if not isinstance(t, Tensor) or t.dim() != 5 or tuple(t.shape[:3]) != (n, batch_size, 1):
                raise ValueError(
                    f"gates must be the previous step's StepResult.gates for {n} adapters and {batch_size} "
                    f"samples (maps of shape (N, B, 1, H, W)); got maps of shape {tuple(t.shape)}: pass "
                    f"gates=None after the adapters or the batch changed"
                )
        return self


def split_gate_state(state: GateState) -> list[GateState]:
    """A state of B samples -> B states of one sample each (hosts that keep state per image)."""
    count = state.latest.shape[1]
    return [
        GateState(
            state.latest[:, b : b + 1],
            None if state.gates is None else state.gates[:, b : b + 1],
            None if state.residual_cond is None else state.residual_cond[b : b + 1],
            None if state.residual_uncond is None else state.residual_uncond[b : b + 1],
        )
        for b in range(count)
    ]


def stack_gate_states(states: Sequence[GateState]) -> GateState:
    """One-sample states -> the state of their batch, in order. A part that some sample lacks is
    None (a gated step then needs an exact one first)."""

    def joined(parts: list[Tensor | None], dim: int) -> Tensor | None:
        if any(p is None for p in parts) or len({tuple(p.shape) for p in parts}) > 1:
            return None
        return torch.cat(parts, dim=dim)

    latest = joined([s.latest for s in states], 1)
    if latest is None:
        raise ValueError("the images' gate states have weight maps of different sizes")
    return GateState(
        latest,
        joined([s.gates for s in states], 1),
        joined([s.residual_cond for s in states], 0),
        joined([s.residual_uncond for s in states], 0),
    )
