"""The sampler both synthetic benchmarks share: many jobs in lockstep, any ``LoRAtorioConfig`` mode.

Every step it asks ``StepComposer.plan`` per job, evaluates all jobs' rows in ONE UNet forward
through one ``LoRARuntime`` that holds every LoRA, and ``combine``s per job. What differs between
the benchmarks' models is read from the model object (``SamplerModel``): the latent's shape, the
noise schedule, the prediction type (epsilon or v) and the decoder. The method always composes
noise predictions, so a v-prediction model's rows are converted to epsilon first, as a host does.
Deterministic DDIM, timesteps spread evenly from the last training step to 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from ..config import LoRAtorioConfig
from ..lora.files import LayerUpdate
from ..lora.runtime import LoRARuntime
from ..step import Adapter, StepComposer, StepPlan

PREDICTIONS = ("epsilon", "v")


class SamplerModel(Protocol):
    """What ``sample`` needs of a benchmark's model.

    unet(x, t, context) -> (B, C, H, W) predictions of type ``prediction``; loras: the bound
    LoRA layers by concept name; alphas_cumprod: (T,) the training schedule's alpha-bar;
    latent_shape: (C, H, W) of one latent.
    """

    unet: nn.Module
    loras: dict[str, dict[str, LayerUpdate]]
    alphas_cumprod: Tensor
    latent_shape: tuple[int, int, int]
    prediction: str

    def encode_text(self, prompts: Sequence[Sequence[str]]) -> Tensor: ...

    def decode(self, latents: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class Job:
    """One LoRA set sampled with one prompt for several seeds.

    loras: concept names in prompt order (empty: the base model alone). prompt: words.
    seeds: one image per seed; the seed fixes the initial noise (the same for every method).
    named: the LoRAs the prompt names by their training tags (a top-k selection keeps them
    first, as a host that reads the LoRAs' metadata does), or None (no such prior).
    """

    loras: tuple[str, ...]
    prompt: tuple[str, ...]
    seeds: tuple[int, ...]
    named: tuple[str, ...] | None = None


@dataclass(eq=False)
class Samples:
    """What ``sample`` returns.

    images: per job, (S, 3, H, W) in [0, 1]. rows: per job, model rows evaluated per image (summed
    over steps). weights: per job, per step, (N, S, h, w) patch weights (when recorded).
    """

    images: list[Tensor]
    rows: list[float]
    weights: list[list[Tensor]] | None = None


def initial_noise(seed: int, shape: tuple[int, int, int]) -> Tensor:
    """(C, H, W) the starting latent of ``seed``."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def ddim_timesteps(steps: int, train_steps: int = 1000) -> list[int]:
    """The ``steps`` timesteps DDIM visits, from ``train_steps - 1`` down to 0."""
    return torch.linspace(train_steps - 1, 0, steps).round().long().tolist()


def ddim_step(x: Tensor, eps: Tensor, alpha: Tensor, alpha_prev: Tensor) -> Tensor:
    """One deterministic DDIM step from alpha-bar ``alpha`` to ``alpha_prev``; x, eps (B, C, H, W).

    The predicted x0 is clipped to the latent's range [-1, 1]; the noise direction is kept as
    predicted (re-deriving it from the clipped x0 measured worse on the first benchmark: more grain)."""
    x0 = ((x - (1 - alpha).sqrt() * eps) / alpha.sqrt()).clamp(-1, 1)
    return alpha_prev.sqrt() * x0 + (1 - alpha_prev).sqrt() * eps


def eps_from_prediction(prediction: str, output: Tensor, x: Tensor, alpha: Tensor) -> Tensor:
    """The noise prediction of a model output: itself for epsilon models; for v models
    (v = sqrt(a) eps - sqrt(1 - a) x0) eps = sqrt(a) v + sqrt(1 - a) x_t."""
    if prediction == "epsilon":
        return output
    if prediction == "v":
        return alpha.sqrt() * output + (1 - alpha).sqrt() * x
    raise ValueError(f"prediction must be one of {PREDICTIONS}; got {prediction!r}")


class _Lockstep:
    """The per-job state of one ``sample`` call: latents, prompts, top-k sets, costs, weights."""

    def __init__(self, model: SamplerModel, jobs: Sequence[Job], record_weights: bool):
        self.jobs = list(jobs)
        self.latents = [
            torch.stack([initial_noise(s, model.latent_shape) for s in job.seeds]) for job in jobs
        ]
        self.conds = [model.encode_text([job.prompt] * len(job.seeds)) for job in jobs]
        self.uncond = model.encode_text([[]])[0]
        self.kept: list[Tensor | None] = [None] * len(jobs)
        self.gates: list[Tensor | None] = [None] * len(jobs)
        self.rows = [0.0] * len(jobs)
        self.weights: list[list[Tensor]] | None = [[] for _ in jobs] if record_weights else None

    def plan_all(
        self, composer: StepComposer, step: int, index: dict[str, int], scale: float
    ) -> tuple[list[StepPlan], Tensor, Tensor, list[tuple[tuple[int, float], ...]]]:
        """Every job's plan, and the stacked rows: latents, contexts, runtime adapters per row."""
        plans, x_in, ctx, entry_adapters = [], [], [], []
        for j, job in enumerate(self.jobs):
            adapters = [Adapter(n, scale) for n in job.loras]
            named = None if job.named is None else torch.tensor([n in job.named for n in job.loras])
            plan = composer.plan(
                step, adapters, batch_size=len(job.seeds), kept=self.kept[j], named=named, gates=self.gates[j]
            )
            plans.append(plan)
            x_in.append(self.latents[j][plan.sample_index])
            both = torch.cat([self.conds[j], self.uncond.expand_as(self.conds[j])])
            ctx.append(both[plan.conditioning_index])
            entry_adapters += [
                tuple((index[job.loras[a]], s) for a, s in active) for active in plan.entry_adapters
            ]
            self.rows[j] += plan.num_entries / len(job.seeds)
        return plans, torch.cat(x_in), torch.cat(ctx), entry_adapters


def sample(
    model: SamplerModel,
    jobs: Sequence[Job],
    config: LoRAtorioConfig,
    *,
    steps: int = 20,
    guidance: float = 5.0,
    scale: float = 0.8,
    record_weights: bool = False,
) -> Samples:
    """Generate every job's images with ``config`` (any mode, top-k included), all jobs'
    rows in one UNet forward per step. guidance: the CFG scale; scale: every LoRA's multiplier."""
    names = sorted({n for job in jobs for n in job.loras})
    index = {n: i for i, n in enumerate(names)}
    runtime = LoRARuntime(model.unet, [model.loras[n] for n in names])
    composer = StepComposer(config)
    state = _Lockstep(model, jobs, record_weights)
    alphas = model.alphas_cumprod
    times = ddim_timesteps(steps, len(alphas))
    with runtime, torch.no_grad():
        for step, t in enumerate(times):
            plans, x, context, entry_adapters = state.plan_all(composer, step, index, scale)
            a = alphas[t]
            # In plan order, as the benchmark's published images were made (grouping the rows by
            # adapter would change float sums in their last bits).
            with runtime.rows(entry_adapters):
                output = model.unet(x, torch.full((x.shape[0],), t), context)
            eps_all = eps_from_prediction(model.prediction, output, x, a)
            a_prev = alphas[times[step + 1]] if step + 1 < len(times) else torch.tensor(1.0)
            start = 0
            for j, plan in enumerate(plans):
                result = composer.combine(plan, eps_all[start : start + plan.num_entries], guidance)
                start += plan.num_entries
                state.kept[j] = result.kept
                state.gates[j] = result.gates
                if state.weights is not None and result.weights is not None:
                    state.weights[j].append(result.weights)
                state.latents[j] = ddim_step(state.latents[j], result.eps, a, a_prev)
    return Samples([model.decode(z) for z in state.latents], state.rows, state.weights)
