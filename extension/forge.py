"""LoRAtorio inside Forge: what the "backend" Forge (f2, ``forge_f2``) and the ldm_patched Forge
(f0 and reForge, ``forge_f0``) share. Each of those modules holds one Forge's own ways (how its
patchers keep LoRA patches, how it merges one, where its sampling and memory functions live); the
row labelling (``row_labels``) and the x0 <-> eps of its model calls (``x0_to_eps``, ``eps_to_x0``)
are host-neutral enough for any host with Forge's (ComfyUI's) model-function wrapper.

How it hooks in (Forge resets ``sd_model.forge_objects`` before every sampling pass, so nothing
here outlives a pass except the runtime's hooks, which ``close`` removes):
- ``process_before_every_sampling`` clones the pass's UNet patcher and takes the prompt's LoRAs out
  of the clone's patches (f2: whole entries of ``lora_patches``, keyed by file; f0: their entries in
  the per-parameter ``patches`` lists), so Forge never merges them; their up/down/alpha tensors feed
  the per-row runtime on the UNet. The LoRAs' text-encoder patches stay with Forge (shared), unless
  the text encoders are per LoRA: then the pass's prompts are encoded once more per LoRA (and once
  with none) on CLIP clones carrying only that LoRA's patches, and each UNet call's text rows are
  matched to the prompt they encode, so each LoRA's rows get its own encoding.
- A ``model_function_wrapper`` on the clone receives each of Forge's UNet calls (cond and uncond
  chunks, ``cond_or_uncond`` saying which, possibly several calls a step), labels the rows, has
  ``RowComposer`` evaluate base + LoRAs for them in one forward, and returns each row's composed x0.
  A wrapper already in the slot (another extension's) is chained: it wraps ours, and still runs.
- Forge's memory manager is told about the larger batch (peak-memory estimate) and the LoRA tensors.
- Short of memory, Forge's ``calc_cond_uncond_batch`` runs part of its chunks per call, the uncond
  chunk first and alone. The uncond branch is re-centred with the cond rows' weights, so when an
  uncond row comes before its image's cond rows, the wrapper first has Forge run the step's cond
  chunks (the compiled conds a pre-CFG function recorded, through Forge's own batching, memory
  check, ControlNet and wrappers), composes them, and keeps their outputs for the cond calls of
  the same evaluation, which then cost nothing.
- The step index comes from the sampler's CFG denoiser counter (``p.sampler.model_wrap_cfg``), not
  from call counts and not from ``on_cfg_denoiser``.
"""

from __future__ import annotations

import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from loratorio_core import Adapter, StepComposer, denoised_from_eps, eps_from_denoised
from loratorio_core.lora import LayerUpdate
from loratorio_core.lora.binding import layer_mismatch
from loratorio_core.rows import RowLabel

from .session import Session, encode_variants, sampler_step

UNET_PREFIX, WEIGHT = "diffusion_model.", ".weight"


@dataclass
class ForgeSession(Session):
    """A generation in Forge: the UNet patchers it made, each with its wrapper. A base: each Forge's
    module (``forge_f2``, ``forge_f0``) fills in the methods that raise NotImplementedError."""

    p: object = None
    ours: list = field(default_factory=list)  # the patchers this generation made (compared by identity)
    text: dict | None = None  # per-LoRA text: adapter index (None: base) -> (c, uc) as encoded for it
    step_text: dict | None = None  # this step's text rows: {"cond": [(shared, {key: own})], "uncond": ...}
    step_conds: tuple | None = None  # this evaluation's (model, cond, x, timestep, model_options)
    cond_done: list = field(default_factory=list)  # this evaluation's cond rows composed: (input, text, out)

    # --- a sampling pass ----------------------------------------------------------------------------

    def begin_pass(self, p) -> None:
        unet = p.sd_model.forge_objects.unet
        if any(unet is mine for mine in self.ours):
            # New Forge calls the hook once more for hires fix on the first pass's objects, then
            # resets them and calls it again: nothing to do until then.
            return
        self.end_pass()
        self.p = p
        clone = unet.clone()
        if self.error is not None:
            self._install(p, clone, None)  # the first UNet call raises the error: a clear failure
            return
        model = clone.model.diffusion_model
        modules = dict(model.named_modules())
        adapters, layers, markers = [], [], []
        for name, scale, unet_layers, marker in self._take_prompt_loras(clone, modules):
            adapters.append(Adapter(name, scale))
            layers.append(unet_layers)
            markers.append(marker)
        if not self.add_pool(sys.modules.get("networks"), model, adapters, layers):
            self._install(p, clone, None)  # the first UNet call raises the pool's error
            return
        if not adapters:
            return
        if self.per_lora_text and markers:
            self.text = self._encode_per_adapter(p, markers)
        self.compose(p, model, adapters, layers)
        self._reserve_memory(clone, layers)
        clone.add_sampler_pre_cfg_function(self._record_conds())
        self._install(p, clone, clone.model_options.get("model_function_wrapper"))

    def _install(self, p, clone, previous) -> None:
        clone.set_model_unet_function_wrapper(self._wrapper(previous))
        p.sd_model.forge_objects.unet = clone
        self.ours.append(clone)

    def end_pass(self) -> None:
        super().end_pass()
        self.text = self.step_text = self.step_conds = None
        self.cond_done = []

    def close(self) -> None:
        """Hooks off. The patchers made here die with the pass: Forge resets forge_objects."""
        self.end_pass()
        self.ours.clear()
        self.p = None

    # --- the prompt's LoRAs, out of Forge's patches -------------------------------------------------

    def _take_prompt_loras(self, clone, modules: dict):
        """(name, scale, UNet layers, marker) of each prompt LoRA taken out of the clone's patches,
        so Forge does not merge it; the marker finds its patches again (``_drop_patches``)."""
        raise NotImplementedError

    def _drop_patches(self, patcher, marker) -> None:
        """Take one LoRA's patches (``marker``) out of a cloned patcher."""
        raise NotImplementedError

    def _load(self, patcher) -> None:
        """Load a patcher as Forge does before using it (its LoRAs merged into the shared model)."""
        raise NotImplementedError

    def _calc_cond_uncond_batch(self):
        """This Forge's ``calc_cond_uncond_batch``."""
        raise NotImplementedError

    def _unmerged_weight(self, clone, key: str, module) -> torch.Tensor:
        """A layer's weight without any LoRA merged into it."""
        return module.weight

    def _merged_weight(self, clone, key: str, patch, ratio: float, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` with one patch merged at ``ratio``, by Forge's own merge."""
        raise NotImplementedError

    def _layers(self, clone, modules: dict, entries: dict, strength: float):
        """Forge's patch entries of one LoRA as the runtime's updates (module name -> update)."""
        layers = {}
        for key, patches in entries.items():
            if not (isinstance(key, str) and key.startswith(UNET_PREFIX) and key.endswith(WEIGHT)):
                return {}, f"it patches {key!r}, which is not a UNet layer's weight"
            name = key[len(UNET_PREFIX) : -len(WEIGHT)]
            module = modules.get(name)
            if module is None:
                return {}, f"no UNet layer {name}"
            if len(patches) != 1:
                return {}, f"layer {name} has {len(patches)} patches from one file"
            entry_strength, (kind, values), strength_model, offset, function = patches[0]
            if strength_model != 1.0 or offset is not None or function is not None:
                return {}, f"layer {name} is patched in a way that is not a plain weight delta"
            if kind == "lora":
                up, down, alpha, mid = values[:4]
                if len(values) > 4 and values[4] is not None:
                    return {}, "DoRA layers depend on the merged weight and cannot be composed per row"
                rank = down.shape[0]
                # alpha / rank as Forge reads it, and this entry's strength relative to the LoRA's
                ratio = float(entry_strength) / strength if strength else 1.0
                alpha = (float(alpha) if alpha is not None else rank) * ratio
                update = LayerUpdate(down=down, up=up, mid=mid, alpha=alpha)
            else:
                update = self._dense(clone, key, module, (kind, values), float(entry_strength), strength)
            mismatch = layer_mismatch(module, update)
            if mismatch:
                return {}, f"layer {name} does not fit the model ({mismatch})"
            layers[name] = update
        return layers, None

    def _dense(self, clone, key, module, patch, entry_strength: float, strength: float) -> LayerUpdate:
        """LoHa, LoKr, full diff...: Forge's own delta of that patch, on the unmerged weight."""
        weight = self._unmerged_weight(clone, key, module).detach().float()
        ratio = entry_strength / strength if strength else 1.0
        with torch.no_grad():
            merged = self._merged_weight(clone, key, patch, ratio, weight.clone())
        return LayerUpdate(dense=(merged.float() - weight).to(weight.device))

    # --- per-LoRA text -----------------------------------------------------------------------------

    def _encode_per_adapter(self, p, markers: list) -> dict:
        """The pass's prompts encoded with no composed LoRA's text-encoder patches (key None) and with each
        one's alone (key: its index), by the host's own code, on CLIP clones; the host's CLIP is put
        back and loaded again afterwards, so its text encoder's weights are as they were."""
        objects = p.sd_model.forge_objects
        clip = objects.clip

        @contextmanager
        def only(keep):
            variant = clip.clone()
            for marker in markers:
                if marker is not keep:
                    self._drop_patches(variant.patcher, marker)
            objects.clip = variant
            try:
                yield
            finally:
                objects.clip = clip

        variants = {None: lambda: only(None)}
        variants.update({i: (lambda marker=marker: only(marker)) for i, marker in enumerate(markers)})
        try:
            return encode_variants(p, variants)
        finally:
            self._load(clip.patcher)

    # --- memory -------------------------------------------------------------------------------------

    def _reserve_memory(self, clone, layers) -> None:
        """Tell Forge the UNet batch is larger (its peak estimate) and the LoRA tensors need room."""
        plan = StepComposer(self.rows.composer.config).plan(0, self.adapters, batch_size=1, cfg=True)
        factor = len(plan.rows) / 2  # model rows per row of Forge's own CFG batch
        max_rows = self.max_rows
        previous = clone.model_options.get("memory_peak_estimation_modifier", clone.memory_required)

        def estimate(input_shape):
            rows = math.ceil(input_shape[0] * factor)
            return previous([min(rows, max_rows) if max_rows else rows, *input_shape[1:]])

        clone.set_memory_peak_estimation_modifier(estimate)
        size = sum(
            t.numel() * t.element_size()
            for adapter_layers in layers
            for update in adapter_layers.values()
            for t in (update.down, update.up, update.mid, update.dense)
            if t is not None
        )
        clone.add_extra_preserved_memory_during_sampling(size)

    # --- the model call -----------------------------------------------------------------------------

    def _wrapper(self, previous):
        session = self

        def model_function_wrapper(apply_model, args):
            if session.error is not None:
                message = session.error
                session.close()
                raise ValueError(message)

            def composed(input, timestep, **c):
                if session.rows is None:  # the generation ended: Forge's own call
                    return apply_model(input, timestep, **c)
                return session._compose(apply_model, input, timestep, c)

            try:
                if previous is not None:
                    return previous(composed, args)
                return composed(args["input"], args["timestep"], **args["c"])
            except BaseException:
                # Forge skips postprocess after an exception: leave the model as it was now.
                session.close()
                raise

        return model_function_wrapper

    def _record_conds(self):
        """A pre-CFG function (a closure: Forge deep-copies model_options) that records each model
        evaluation's compiled conds, so its cond chunks can be run ahead of an uncond chunk."""
        session = self

        def record_conds(model, cond, uncond, x, timestep, model_options):
            if session.rows is not None:
                session.step_conds = (model, cond, x, timestep, model_options)
                session.cond_done = []
                session.rows.forget_cond()  # a new evaluation: the last one's cond weights are stale
            return model, cond, uncond, x, timestep, model_options

        return record_conds

    def _compose_cond_ahead(self) -> None:
        """Forge's own calc_cond_uncond_batch over this evaluation's cond chunks only (its memory
        check splits them as it would); each call comes back through the wrapper, which composes
        the rows and keeps them in ``cond_done``."""
        calc_cond_uncond_batch = self._calc_cond_uncond_batch()
        model, cond, x, timestep, model_options = self.step_conds
        self.step_conds = None  # once per evaluation
        calc_cond_uncond_batch(model, cond, None, x, timestep, model_options)

    def _known_rows(self, input, cross, labels) -> dict:
        """This call's cond rows already composed in this evaluation (same latent and text): row ->
        output (the sigma is the evaluation's)."""
        known = {}
        for r, label in enumerate(labels):
            if label.branch != "cond":
                continue
            for row_input, row_text, output in self.cond_done:
                text = cross[r : r + 1] if isinstance(cross, torch.Tensor) else None
                if torch.equal(input[r], row_input) and (
                    text is None or row_text is None or _same_text(text, row_text)
                ):
                    known[r] = output
                    break
        return known

    def on_cfg_denoiser(self, params) -> None:
        """Per-LoRA text: this step's prompts (scheduling) as the host's rows and as each LoRA's, per
        AND part in the order Forge compiles them (one chunk per part, every image in it)."""
        if not self.text or self.rows is None:
            return
        from modules import prompt_parser

        step = params.denoiser.step
        parts, unconds = {}, {}
        for key, (c, uc) in self.text.items():
            composition, cond = prompt_parser.reconstruct_multicond_batch(c, step)
            parts[key] = [_index(cond, rows) for rows in _part_rows(composition)]
            unconds[key] = prompt_parser.reconstruct_cond_batch(uc, step) if uc is not None else None
        shared_parts = [_index(params.text_cond, rows) for rows in _part_rows(composition)]
        self.step_text = {
            "cond": [
                (shared, {key: parts[key][k] for key in parts}) for k, shared in enumerate(shared_parts)
            ],
            "uncond": (params.text_uncond, unconds) if params.text_uncond is not None else None,
        }

    def _text_inputs(self, c: dict, chunks: list, images: int) -> dict | None:
        """Each adapter's (and the base's) text conditioning for this call's rows: every chunk of
        ``images`` rows is matched to the prompt part it holds; None when one matches none."""
        cross = c.get("c_crossattn")
        if self.step_text is None or not isinstance(cross, torch.Tensor):
            return None
        group = len(chunks) * images
        blocks: dict = {}
        for start in range(0, cross.shape[0], images):
            block = cross[start : start + images]
            uncond = chunks[(start % group) // images] == 1
            candidates = [self.step_text["uncond"]] if uncond else self.step_text["cond"]
            own = next(
                (own for shared, own in candidates if shared is not None and _same_text(block, shared)), None
            )
            if own is None:
                self.warn("a UNet call's text rows match none of the prompts' encodings; shared text used")
                return None
            for key, text in own.items():
                blocks.setdefault(key, []).append(text)
        out = {}
        for key, texts in blocks.items():
            part = {"c_crossattn": torch.cat([_cross(t, cross) for t in texts])}
            if isinstance(c.get("y"), torch.Tensor) and isinstance(texts[0], dict):
                part["y"] = torch.cat([t["vector"] for t in texts]).to(c["y"])
            out[key] = {"c": part}
        return out

    def _compose(self, apply_model, input, timestep, c):
        options = c.get("transformer_options") or {}
        labels = row_labels(input.shape[0], options)
        step = sampler_step(self.p.sampler.model_wrap_cfg)
        rest = {key: value for key, value in c.items() if key != "transformer_options"}
        mark = torch.tensor([float(label.branch == "uncond") for label in labels])
        inputs = {"input": input, "timestep": timestep, "c": rest, "mark": mark}

        def forward(input, timestep, c, mark):
            # transformer_options for the expanded batch: every row its own chunk, so patches that
            # split the batch by cond_or_uncond (or cond_mark) see each row's branch
            branches = [int(m) for m in mark.tolist()]
            row_options = dict(options)
            row_options.update(
                cond_or_uncond=branches,
                sigmas=timestep,
                cond_mark=mark.to(input.device),
                cond_indices=[i for i, b in enumerate(branches) if b == 0],
                uncond_indices=[i for i, b in enumerate(branches) if b == 1],
            )
            return apply_model(input, timestep, transformer_options=row_options, **c)

        adapter_inputs = None
        if self.step_text is not None:
            sigmas = options.get("sigmas")
            images = len(sigmas) if sigmas is not None else input.shape[0] // len(options["cond_or_uncond"])
            adapter_inputs = self._text_inputs(rest, options["cond_or_uncond"], images)
        if self.rows.missing_cond(labels, step):
            if self.step_conds is None:
                raise RuntimeError(
                    "LoRAtorio: Forge ran an uncond chunk before its cond chunk (short of GPU memory) and "
                    "this step's conds were not recorded (another extension may replace Forge's pre-CFG "
                    "functions); set Re-centering (lam) to 1, which needs no cond weights for the uncond"
                )
            self._compose_cond_ahead()
        cross = rest.get("c_crossattn")
        known = self._known_rows(input, cross, labels)
        output = self.rows(
            forward,
            inputs,
            labels,
            step,
            to_eps=x0_to_eps,
            from_eps=eps_to_x0,
            adapter_inputs=adapter_inputs,
            known=known,
        )
        for r, label in enumerate(labels):
            if label.branch == "cond" and r not in known:
                text = cross[r : r + 1] if isinstance(cross, torch.Tensor) else None
                self.cond_done.append((input[r], text, output[r]))
        return output


def row_labels(rows: int, options: dict) -> list[RowLabel]:
    """Each row's branch and image. Forge's call holds chunks of B rows (one per image), chunk i
    cond (0) or uncond (1) as ``cond_or_uncond[i]`` says; a wrapper that batches tiles repeats that
    whole layout, and each tile's rows count as images of their own (their weights are their own)."""
    chunks = options.get("cond_or_uncond")
    if not chunks:
        raise RuntimeError(
            "LoRAtorio: Forge's UNet call came without transformer_options['cond_or_uncond']; another "
            "extension's model wrapper may be dropping it: turn one of them off"
        )
    sigmas = options.get("sigmas")
    images = len(sigmas) if sigmas is not None else rows // len(chunks)
    group = len(chunks) * images
    if images < 1 or rows % group:
        raise RuntimeError(
            f"LoRAtorio: Forge's UNet call has {rows} rows, not a multiple of its {len(chunks)} chunks of "
            f"{images} images; another extension may be re-batching: turn one of them off"
        )
    labels = []
    for r in range(rows):
        tile, within = divmod(r, group)
        branch = "uncond" if chunks[within // images] == 1 else "cond"
        labels.append(RowLabel(branch, tile * images + within % images))
    return labels


def x0_to_eps(x0: torch.Tensor, inputs) -> torch.Tensor:
    """Forge's apply_model returns x0 for every prediction type, and its timestep is the per-row
    sigma: the core's conversion on x = x0 + sigma * eps (in x0's dtype, as the rows combine)."""
    return eps_from_denoised(inputs["input"].to(x0), x0, inputs["timestep"])


def eps_to_x0(eps: torch.Tensor, inputs) -> torch.Tensor:
    return denoised_from_eps(inputs["input"].to(eps), eps, inputs["timestep"])


def _part_rows(composition) -> list[list[int]]:
    """The cond rows of each AND part, as Forge's compile_weighted_conditions groups them (a zip over
    the images: an image with fewer parts cuts the others' extra parts, in Forge too)."""
    return [[i for i, _ in part] for part in zip(*composition, strict=False)]


def _index(cond, indices: list[int]):
    """Rows of a reconstructed cond batch (a tensor, or SDXL's dict of tensors)."""
    if isinstance(cond, dict):
        return {key: value[indices] for key, value in cond.items()}
    return cond[indices]


def _crossattn(text) -> torch.Tensor:
    return text["crossattn"] if isinstance(text, dict) else text


def _cross(text, like: torch.Tensor) -> torch.Tensor:
    """A prompt part's cross-attention rows as a call holds them: Forge repeats shorter token
    sequences to the longest's multiple when it batches parts of different lengths."""
    rows = _crossattn(text).to(like)
    if rows.shape[1] != like.shape[1] and like.shape[1] % rows.shape[1] == 0:
        rows = rows.repeat(1, like.shape[1] // rows.shape[1], 1)
    return rows


def _same_text(block: torch.Tensor, text) -> bool:
    rows = _cross(text, block)
    return rows.shape == block.shape and torch.equal(rows, block)


def network_names() -> dict[str, str]:
    """File path -> the name the prompt used, from the built-in's loaded networks."""
    networks = sys.modules.get("networks")
    names = {}
    for net in getattr(networks, "loaded_networks", []):
        on_disk = getattr(net, "network_on_disk", None)
        if on_disk is not None:
            names[on_disk.filename] = net.name
    return names
