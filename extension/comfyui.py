"""LoRAtorio inside ComfyUI: the composition behind the custom nodes (``comfyui_nodes``).

How it hooks in (ComfyUI's model API is the one Forge inherited):
- *Apply LoRAtorio* clones the MODEL's ``ModelPatcher`` and puts two things in the clone's
  ``model_options`` (ComfyUI deep-copies them on every clone; the objects below copy as themselves,
  so every clone of the composed model shares one ``Composition``):
  - a ``calc_cond_batch`` wrapper (``comfy.patcher_extension``), called once per model evaluation
    with the sampler's sigma, the whole latent and the conds: it starts a new sampling pass when
    the schedule changes, tells the composer a new evaluation began, and, when the uncond branch is
    re-centred with the cond rows' weights, has ComfyUI run the cond chunks before the uncond ones
    (two calls of ComfyUI's own batching, memory check, ControlNet and wrappers), so an uncond
    chunk never arrives before its image's cond chunks, whatever ComfyUI's memory split does;
  - a ``model_function_wrapper`` that receives each UNet call (chunks of images labelled 0 = cond,
    1 = uncond by ``cond_or_uncond``), has ``RowComposer`` evaluate base + LoRAs for its rows in one
    forward (the per-row runtime's hooks are on the UNet only inside that call) and returns each
    row's composed x0. A wrapper another node put in the slot first is chained: it wraps ours.
- The LoRAs' UNet parts are never given to ComfyUI (no patches: nothing is merged); their
  text-encoder parts are added to the CLIP as ComfyUI's LoraLoader does (shared by every row).
- The MODEL given to Apply LoRAtorio is never changed: everything lives on the clone, and the UNet
  carries no hook outside our own calls, so a plain workflow after a composed, failed or
  interrupted one runs as before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from loratorio_core import Adapter, LoRAtorioConfig
from loratorio_core.guidance import denoised_from_eps, eps_from_denoised
from loratorio_core.lora import (
    LoRARuntime,
    bind_lora,
    layer_aliases,
    load_lora,
    read_metadata,
    tag_frequencies,
)
from loratorio_core.lora.files import LoRAFileError
from loratorio_core.maps import PALETTE, weight_overlay
from loratorio_core.relevance import named_by_prompts
from loratorio_core.rows import RowComposer, RowLabel

WRAPPER_KEY = "loratorio"  # our key in ComfyUI's wrapper lists and in model_options
CALC_COND_BATCH = "calc_cond_batch"  # comfy.patcher_extension.WrappersMP.CALC_COND_BATCH
# Key prefixes of a LoRA's UNet layers (kohya, diffusers/PEFT, ComfyUI's own); everything else is
# the text encoders', which go to ComfyUI's loader for the CLIP.
UNET_KEY_PREFIXES = ("lora_unet_", "unet.", "diffusion_model.", "model.diffusion_model.", "transformer.")

log = logging.getLogger("loratorio")


@dataclass(frozen=True)
class StackEntry:
    """One LoRA of a LoRAtorio stack: its name, its file, and its UNet and CLIP strengths."""

    name: str
    path: str
    strength_model: float = 1.0
    strength_clip: float = 1.0


@dataclass
class Composition:
    """One Apply LoRAtorio's composition: its settings and LoRAs, and the current sampling pass."""

    config: LoRAtorioConfig
    adapters: list[Adapter]
    runtime: LoRARuntime
    max_rows: int | None = None
    rows: RowComposer | None = None  # the current (or last) sampling pass's composer
    schedule: Tensor | None = None  # that pass's sample_sigmas (ComfyUI makes one per pass)
    sigma: float | None = None  # the current model evaluation's sigma
    step: int = 0
    latent_size: tuple[int, ...] | None = None  # the whole latent's (H, W): smaller rows are areas
    area_of_cond: dict = field(default_factory=dict)  # this evaluation's cond uuid -> its area
    area_ids: dict = field(default_factory=dict)  # this pass's areas, numbered (stable over steps)
    passes: list[RowComposer] = field(default_factory=list)
    steps_seen: set[int] = field(default_factory=set)  # the current pass's steps (the baselines' maps)
    named: Tensor | None = None  # (N, 1) what the workflow asks for, which top-k keeps first

    def __deepcopy__(self, memo) -> Composition:
        return self  # ComfyUI deep-copies model_options on every clone: all clones share this

    # --- a model evaluation (the calc_cond_batch wrapper) ---------------------------------------

    def begin_evaluation(
        self, x: Tensor, sigma: Tensor, model_options: Mapping, conds: Sequence = ()
    ) -> None:
        """A new model evaluation: a new pass when the sampler's schedule is a new one. conds: the
        evaluation's cond lists, whose areas label the UNet calls' area chunks."""
        schedule = (model_options.get("transformer_options") or {}).get("sample_sigmas")
        if schedule is None or schedule is not self.schedule:
            self.schedule = schedule
            self.rows = RowComposer(
                self.config,
                self.adapters,
                self.runtime,
                max_rows=self.max_rows,
                record_weights=True,
                named=self.named if self.config.top_k is not None else None,
            )
            self.passes = [*self.passes[-7:], self.rows]
            self.steps_seen, self.area_ids = set(), {}
        self.sigma = float(sigma.flatten()[0])
        self.step = step_of(self.schedule, self.sigma)
        self.steps_seen.add(self.step)
        self.latent_size = tuple(x.shape[2:])
        self.area_of_cond = {
            entry["uuid"]: tuple(entry["area"])
            for branch in conds
            for entry in branch or ()
            if isinstance(entry, Mapping) and "area" in entry and "uuid" in entry
        }
        self.rows.forget_cond()  # second-order samplers evaluate twice a step: new cond weights

    def needs_cond_first(self) -> bool:
        """Whether uncond rows are re-centred with their image's cond weights (so must come after)."""
        return self.config.mode == "loratorio" and self.config.recenter < 1.0

    # --- one UNet call (the model_function_wrapper) ---------------------------------------------

    def compose(self, apply_model: Callable, input: Tensor, timestep: Tensor, c: Mapping) -> Tensor:
        """Each row of ComfyUI's call composed, as x0 (what apply_model returns)."""
        if self.rows is None:
            raise RuntimeError(
                "LoRAtorio: the UNet was called outside a sampling ComfyUI announced (no calc_cond_batch "
                "call came first); another node may replace ComfyUI's sampling function"
            )
        options = dict(c.get("transformer_options") or {})
        rest = {key: value for key, value in c.items() if key != "transformer_options"}
        labels = self._labels(input, options)
        self._check_uncond(labels)
        mark = torch.tensor([float(label.branch == "uncond") for label in labels])
        inputs = {"input": input, "timestep": timestep, "c": rest, "mark": mark}

        def forward(input, timestep, c, mark):
            return apply_model(
                input, timestep, transformer_options=_row_options(options, mark, timestep), **c
            )

        with self.runtime:  # hooks on the UNet for this call only
            return self.rows(forward, inputs, labels, self.step, to_eps=_x0_to_eps, from_eps=_eps_to_x0)

    def _labels(self, input: Tensor, options: Mapping) -> list[RowLabel]:
        """Each row's branch and image. The rows of an area chunk (smaller than the latent) count as
        images of their own, one per area: its positive chunks' weights cover that area only, and
        the negative chunk ComfyUI makes for the same area (``create_cond_with_same_area_if_none``:
        a copy with the positive's uuid) is re-centred with them."""
        chunks = options.get("cond_or_uncond")
        if not chunks:
            raise RuntimeError(
                "LoRAtorio: ComfyUI's UNet call came without transformer_options['cond_or_uncond']; "
                "another node's model wrapper may be dropping it: remove one of them"
            )
        images = input.shape[0] // len(chunks)
        if images < 1 or input.shape[0] % len(chunks):
            raise RuntimeError(
                f"LoRAtorio: ComfyUI's UNet call has {input.shape[0]} rows for {len(chunks)} chunks; another "
                "node may be re-batching: remove one of them"
            )
        area = self.latent_size is not None and tuple(input.shape[2:]) != self.latent_size
        uuids = options.get("uuids") or [None] * len(chunks)
        labels = []
        for branch, uuid in zip(chunks, uuids, strict=False):
            offset = images * self._area_id(uuid, tuple(input.shape[2:])) if area else 0
            name = "uncond" if branch == 1 else "cond"
            labels += [RowLabel(name, offset + j) for j in range(images)]
        return labels

    def _area_id(self, uuid, size: tuple[int, ...]) -> int:
        """1, 2, ...: the number of an area in this pass (by its place and size, else its size)."""
        key = self.area_of_cond.get(uuid, ("size", *size))
        return self.area_ids.setdefault(key, len(self.area_ids) + 1)

    def _check_uncond(self, labels: Sequence[RowLabel]) -> None:
        if not self.rows.missing_cond(labels, self.step):
            return
        raise ValueError(
            "LoRAtorio: the negative conditioning is re-centred with the positive's weights (lam < 1), "
            "but at this step its image (or one of its areas) has no positive conditioning of its "
            "own (only areas, an area on the negative alone, or a timestep range that excludes it): "
            "set lam to 1, or add a positive conditioning without area"
        )

    # --- after sampling ------------------------------------------------------------------------

    def mean_weights(self, image: int) -> Tensor | None:
        """The last pass's weights of one image, averaged over its steps: (N, h, w), or None. A
        baseline's are what it gives each LoRA everywhere: merge 1, composite 1/N, switch the share
        of the steps it was active."""
        if self.rows is None:
            return None
        if self.config.mode != "loratorio":
            return _baseline_weights(self.config, len(self.adapters), sorted(self.steps_seen))
        steps = [by_image[image] for by_image in self.rows.weights.values() if image in by_image]
        return torch.stack(steps).mean(0) if steps else None


def _baseline_weights(config: LoRAtorioConfig, count: int, steps: list[int]) -> Tensor | None:
    if not steps:
        return None
    if config.mode == "merge":
        return torch.ones(count, 1, 1)
    if config.mode == "composite":
        return torch.full((count, 1, 1), 1.0 / count)
    active = torch.tensor([(step // config.switch_every) % count for step in steps])  # as the core's switch
    return torch.stack([(active == i).float().mean() for i in range(count)]).view(count, 1, 1)


def step_of(schedule: Tensor | None, sigma: float) -> int:
    """The sampler step of an evaluation at ``sigma``: the last schedule entry at or above it
    (a second-order sampler's midpoint belongs to the step it starts from)."""
    if schedule is None:
        return 0
    at_or_above = (schedule.float() >= sigma * (1 - 1e-5)).sum().item()
    return max(0, int(at_or_above) - 1)


def _row_options(options: Mapping, mark: Tensor, timestep: Tensor) -> dict:
    """transformer_options for the expanded batch: every row a chunk of its own, so patches that
    split the batch by ``cond_or_uncond`` see each row's branch."""
    branches = [int(m) for m in mark.tolist()]
    row_options = dict(options)
    row_options.update(cond_or_uncond=branches, sigmas=timestep)
    uuids = options.get("uuids")
    if uuids and len(uuids) != len(branches):
        row_options.pop("uuids")  # per chunk in ComfyUI; rows of one chunk are no longer together
    return row_options


def _x0_to_eps(x0: Tensor, inputs) -> Tensor:
    """apply_model returns x0 for every prediction type (eps, v): x = x0 + sigma * eps."""
    return eps_from_denoised(inputs["input"].to(x0), x0, inputs["timestep"].to(x0))


def _eps_to_x0(eps: Tensor, inputs) -> Tensor:
    return denoised_from_eps(inputs["input"].to(eps), eps, inputs["timestep"].to(eps))


class ModelFunctionWrapper:
    """ComfyUI's ``model_function_wrapper``: ``(apply_model, {"input", "timestep", "c",
    "cond_or_uncond"})`` -> the call's output. A previous wrapper in the slot wraps ours."""

    def __init__(self, composition: Composition, previous: Callable | None = None):
        self.composition, self.previous = composition, previous

    def __deepcopy__(self, memo) -> ModelFunctionWrapper:
        return self

    def __call__(self, apply_model: Callable, args: Mapping) -> Tensor:
        composition = self.composition

        def composed(input, timestep, **c):
            return composition.compose(apply_model, input, timestep, c)

        if self.previous is not None:
            return self.previous(composed, args)
        return composed(args["input"], args["timestep"], **args["c"])


class CondBatchWrapper:
    """ComfyUI's ``calc_cond_batch`` wrapper: ``(executor, model, conds, x_in, timestep,
    model_options)`` -> one output per cond list (``conds[0]`` positive, ``conds[1]`` negative)."""

    def __init__(self, composition: Composition):
        self.composition = composition

    def __deepcopy__(self, memo) -> CondBatchWrapper:
        return self

    def __call__(self, executor, model, conds, x_in, timestep, model_options):
        composition = self.composition
        composition.begin_evaluation(x_in, timestep, model_options, conds)
        has_uncond = len(conds) > 1 and any(c is not None for c in conds[1:])
        if not (composition.needs_cond_first() and has_uncond and conds[0] is not None):
            return executor(model, conds, x_in, timestep, model_options)
        # The positive chunks first (ComfyUI would batch the negative first, or alone when short of
        # memory); each output depends only on its own chunks, so the two calls give ComfyUI's result.
        cond_out = executor(model, [conds[0]] + [None] * (len(conds) - 1), x_in, timestep, model_options)
        rest = executor(model, [None, *conds[1:]], x_in, timestep, model_options)
        return [cond_out[0], *rest[1:]]


# --- building a composition ------------------------------------------------------------------------


def bind_unet_layers(unet: torch.nn.Module, entries: Sequence[StackEntry]) -> list[dict]:
    """Each LoRA's UNet layers bound to ComfyUI's diffusion model (a ValueError naming the file
    when it does not fit: another architecture, a broken file)."""
    aliases = layer_aliases(unet)
    layers = []
    for entry in entries:
        try:
            bound = bind_lora(unet, load_lora(entry.path), "unet", aliases)
        except LoRAFileError as error:
            raise ValueError(f"LoRAtorio: {error}") from None
        if not bound.layers:
            raise ValueError(
                f"LoRAtorio: {entry.path} has no UNet layers to compose; use a LoRA loader for it"
            )
        if bound.unmatched:
            log.warning("LoRAtorio: %s: %d layers match no UNet module", entry.name, len(bound.unmatched))
        layers.append(bound.layers)
    return layers


def compose_model(
    model,
    entries: Sequence[StackEntry],
    config: LoRAtorioConfig,
    max_rows: int | None = None,
    named: Tensor | None = None,
):
    """A clone of ComfyUI's ``model`` (a ModelPatcher) whose sampling composes ``entries``' UNet
    parts per row; ``model`` itself is left as it was. named: bool (N, 1), the entries the workflow
    asks for (``named_entries``), which a top-k selection keeps first."""
    unet = model.model.diffusion_model
    layers = bind_unet_layers(unet, entries)
    adapters = [Adapter(entry.name, entry.strength_model) for entry in entries]
    composition = Composition(config, adapters, LoRARuntime(unet, layers), max_rows=max_rows, named=named)
    clone = model.clone()
    previous = clone.model_options.get("model_function_wrapper")
    try:
        import comfy.patcher_extension as extension
    except ImportError:
        raise RuntimeError(
            "Apply LoRAtorio needs a ComfyUI with comfy.patcher_extension (late 2024 on); update ComfyUI"
        ) from None
    clone.set_model_unet_function_wrapper(ModelFunctionWrapper(composition, previous))
    extension.add_wrapper_with_key(
        CALC_COND_BATCH,
        WRAPPER_KEY,
        CondBatchWrapper(composition),
        clone.model_options,
        is_model_options=True,
    )
    clone.model_options[WRAPPER_KEY] = composition
    return clone


def named_entries(stack: Sequence[StackEntry], pool: Sequence[StackEntry], prompt: str = "") -> Tensor | None:
    """(N, 1) bool over ``stack`` then ``pool``: the stack's LoRAs (the workflow names them) and the
    pool's whose training tags (kohya ``ss_tag_frequency``) the prompt names; None when nothing is."""
    tags = [{} for _ in stack] + [tag_frequencies(read_metadata(Path(entry.path))) for entry in pool]
    return named_by_prompts([prompt], tags, asked=[True] * len(stack) + [False] * len(pool))


def text_encoder_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A LoRA's tensors without its UNet layers: what ComfyUI's loader applies to the CLIP."""
    return {key: value for key, value in state.items() if not key.startswith(UNET_KEY_PREFIXES)}


def apply_text_encoders(clip, entries: Sequence[StackEntry]):
    """The CLIP with each LoRA's text-encoder part added as ComfyUI's LoraLoader adds it (its own
    loader and key map), at the entry's CLIP strength; ``clip`` itself is left as it was."""
    import comfy.sd
    import comfy.utils

    for entry in entries:
        if entry.strength_clip == 0:
            continue
        state = text_encoder_state(comfy.utils.load_torch_file(entry.path, safe_load=True))
        if state:
            _, clip = comfy.sd.load_lora_for_models(None, clip, state, 0.0, entry.strength_clip)
    return clip


def composition_of(model) -> Composition:
    """The composition an Apply LoRAtorio put on this MODEL (or on a model it was cloned from)."""
    composition = model.model_options.get(WRAPPER_KEY) if hasattr(model, "model_options") else None
    if composition is None:
        raise ValueError(
            "LoRAtorio weight maps: this MODEL has no LoRAtorio composition; connect the MODEL output of "
            "'Apply LoRAtorio' that the sampler used"
        )
    return composition


def weight_map_images(composition: Composition, images: Tensor, tinted: bool = True) -> Tensor:
    """The last pass's weight maps as a ComfyUI IMAGE batch (B*N, H, W, 3) in [0, 1]: for each
    image, each LoRA's weights (averaged over the steps) tinted over it, or alone on black."""
    out = []
    for b in range(images.shape[0]):
        weights = composition.mean_weights(b)
        if weights is None:
            raise ValueError(
                f"LoRAtorio weight maps: no weights were recorded for image {b}; run the sampler with "
                "this MODEL first, with a positive conditioning that covers the whole image (areas alone "
                "have no whole-image weights)"
            )
        picture = images[b].permute(2, 0, 1).float()
        if not tinted:
            picture = torch.zeros_like(picture)
        for n in range(weights.shape[0]):
            strength = 0.75 if tinted else 1.0
            out.append(weight_overlay(picture, weights[n], PALETTE[n % len(PALETTE)], strength))
    return torch.stack(out).permute(0, 2, 3, 1).contiguous()
