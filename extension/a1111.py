"""LoRAtorio inside AUTOMATIC1111 (1.6-1.10): the prompt's LoRAs composed per step instead of merged.

How it hooks in (every piece is undone when the generation ends, also after an error):
- ``process_before_every_sampling`` (first pass, hires pass, img2img) takes the LoRAs being
  composed out of the built-in Lora's ``networks.loaded_networks``, in place, so the built-in never
  merges their UNet part (their text-encoder part stays applied as the built-in does, which keeps
  A1111's cond cache valid); their up/down/alpha tensors feed the per-row runtime on the UNet.
- ``sd_model.apply_model`` is wrapped on the instance. A1111's CFG denoiser calls it with its CFG
  batch (cond rows, AND sub-prompts included, then uncond rows; sometimes in chunks); an
  ``on_cfg_denoiser`` callback records that layout each step, so every row of every call is
  known, and ``RowComposer`` evaluates base + LoRAs for them in one forward and returns each row's
  composed prediction. A1111's own CFG then guides as usual.
- The step index comes from the denoiser's counter (second-order samplers call twice a step).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from loratorio_core import Adapter, eps_from_v, v_from_eps
from loratorio_core.lora import LayerUpdate
from loratorio_core.lora.binding import layer_mismatch
from loratorio_core.rows import RowLabel

from .session import Session, encode_variants, sampler_step


@dataclass
class Layout:
    """The rows of this step's CFG batch, in order, and a cursor over the calls that take them."""

    labels: list[RowLabel]
    step: int
    cursor: int = 0
    text: dict | None = None  # per-LoRA text: adapter index (None: base) -> this step's (cond, uncond) rows


@dataclass
class A1111Session(Session):
    """A generation in A1111: its apply_model wrapper and the CFG batch layout of each step."""

    sd_model: object = None
    layout: Layout | None = None
    conversions: tuple = (None, None)  # (to_eps, from_eps) for v-prediction models
    text: dict | None = None  # per-LoRA text: adapter index (None: base) -> (c, uc) as encoded for it
    pending: object = None  # A1111 < 1.9: the p whose pass begins at the next on_cfg_denoiser
    _wrapped: bool = False
    _previous_apply: object = None

    # --- a sampling pass ----------------------------------------------------------------------------

    def begin_pass(self, p) -> None:
        """Take the composed LoRAs from the built-in and set up the runtime for this pass."""
        self.end_pass()
        if self.error is not None:
            self._wrap(p.sd_model)  # the first UNet call raises the error: a clear failure, not a silent one
            return
        if _edit_model(p):
            self._refuse_edit_model(p)
            return
        networks = sys.modules.get("networks")
        if networks is None:
            self.warn("the built-in Lora extension is not loaded: nothing to compose")
            return
        sd_model = p.sd_model
        unet = sd_model.model.diffusion_model
        names = {id(module): name for name, module in unet.named_modules()}
        composed, layers = [], []
        for net in list(networks.loaded_networks):
            unet_layers, problem = _unet_layers(net, names)
            if problem:
                self.warn(f"{net.name}: {problem}; merged as usual instead of composed")
                continue
            if unet_layers:
                composed.append(net)
                layers.append(unet_layers)
        adapters = [Adapter(net.name, float(net.unet_multiplier)) for net in composed]
        if not self.add_pool(networks, unet, adapters, layers):
            self._wrap(sd_model)  # the first UNet call raises the pool's error
            return
        if not adapters:
            return
        if self.per_lora_text:
            self.text = _encode_per_adapter(p, networks, composed)
        # In place: the built-in's other modules hold this very list.
        networks.loaded_networks[:] = [net for net in networks.loaded_networks if net not in composed]
        self.compose(p, unet, adapters, layers)
        # v models: similarity on eps, so outputs are converted (tables built once a pass)
        v_model = getattr(sd_model, "parameterization", "eps") == "v"
        self.conversions = _v_conversions(sd_model.alphas_cumprod) if v_model else (None, None)
        self._wrap(sd_model)

    def _refuse_edit_model(self, p) -> None:
        """Instruct-pix2pix with an Image CFG scale: A1111 adds a third branch (uncond text, no image)
        whose re-centring the method does not define. Left to A1111 as if LoRAtorio were off (the
        built-in merges the LoRAs), so a generation the user (or auto-compose) turned it on for
        still runs; the console says why and how to compose, the infotext does not claim it."""
        self.warn(
            f"instruct-pix2pix (edit) model with Image CFG scale {p.image_cfg_scale}: its third guidance "
            "branch is not part of the method, so the LoRAs are merged as usual for this generation; "
            "set Image CFG scale to 1 to compose them"
        )
        for key in self.settings.infotext():
            p.extra_generation_params.pop(key, None)

    def end_pass(self) -> None:
        super().end_pass()
        self.layout = None

    def close(self) -> None:
        """Put everything back: hooks off, apply_model unwrapped."""
        self.end_pass()
        if self._wrapped:
            if self._previous_apply is None:
                self.sd_model.__dict__.pop("apply_model", None)
            else:
                self.sd_model.__dict__["apply_model"] = self._previous_apply
            self._wrapped = False

    # --- the model call -----------------------------------------------------------------------------

    def _wrap(self, sd_model) -> None:
        if self._wrapped:
            return
        self.sd_model = sd_model
        self._previous_apply = sd_model.__dict__.get("apply_model")  # another extension's wrapper
        original = sd_model.apply_model
        session = self

        def apply_model(x, t, *args, **kwargs):
            if session.error is not None:
                message = session.error
                session.close()
                raise ValueError(message)
            if session.rows is None or session.layout is None:
                return original(x, t, *args, **kwargs)
            keyword = "cond" in kwargs
            cond = kwargs.pop("cond") if keyword else args[0]
            extra = args if keyword else args[1:]
            try:
                return session._compose(original, x, t, cond, keyword, extra, kwargs)
            except BaseException:
                # A1111 skips postprocess after an exception: leave the model as it was now.
                session.close()
                raise

        sd_model.__dict__["apply_model"] = apply_model
        self._wrapped = True

    def _compose(self, original, x, t, cond, keyword, extra, kwargs):
        layout = self.layout
        labels = layout.labels[layout.cursor : layout.cursor + x.shape[0]]
        layout.cursor += x.shape[0]
        if len(labels) != x.shape[0]:
            raise RuntimeError(
                f"LoRAtorio: the UNet was called with {x.shape[0]} rows beyond the {len(layout.labels)} of "
                f"this step's CFG batch; another extension may be re-batching: turn one of them off"
            )

        def forward(x, t, cond):
            if keyword:
                return original(x, t, *extra, cond=cond, **kwargs)
            return original(x, t, cond, *extra, **kwargs)

        to_eps, from_eps = self.conversions
        start = layout.cursor - x.shape[0]
        adapter_inputs = None
        if layout.text:
            n_cond = sum(label.branch == "cond" for label in layout.labels)
            adapter_inputs = {
                key: {"cond": _text_part(cond, _call_rows(rows, start, layout.cursor, n_cond))}
                for key, rows in layout.text.items()
            }
            if any(part["cond"] is None for part in adapter_inputs.values()):
                self.warn("per-LoRA text encodings do not fit this UNet call's conditioning; shared used")
                adapter_inputs = None
        return self.rows(
            forward,
            {"x": x, "t": t, "cond": cond},
            labels,
            layout.step,
            to_eps=to_eps,
            from_eps=from_eps,
            adapter_inputs=adapter_inputs,
        )

    def on_cfg_denoiser(self, params) -> None:
        """Record the rows of this step's CFG batch: cond rows per image (AND), then uncond rows."""
        if self.pending is not None:  # A1111 < 1.9: this pass starts now
            p, self.pending = self.pending, None
            self.start_pass(p)
        if self.rows is None:
            return
        uncond = params.text_uncond
        images = (uncond["crossattn"] if isinstance(uncond, dict) else uncond).shape[0]
        cond_rows = params.x.shape[0] - images
        repeats = _repeats(params.denoiser, images, cond_rows)
        labels = [RowLabel("cond", i) for i, n in enumerate(repeats) for _ in range(n)]
        labels += [RowLabel("uncond", i) for i in range(images)]
        self.layout = Layout(labels, sampler_step(params.denoiser))
        if self.text:
            from modules import prompt_parser

            step = params.denoiser.step  # the denoiser reconstructs the scheduled prompts at its own count
            self.layout.text = {
                key: _padded(
                    params.denoiser,
                    prompt_parser.reconstruct_multicond_batch(c, step)[1],
                    prompt_parser.reconstruct_cond_batch(uc, step),
                )
                for key, (c, uc) in self.text.items()
            }


def _encode_per_adapter(p, networks, composed) -> dict:
    """The pass's prompts encoded once with no composed LoRA's text-encoder part (key None) and once
    with each one's alone (key: its index), by the host's own code; the built-in's list is kept."""
    shared = list(networks.loaded_networks)
    others = [net for net in shared if net not in composed]

    @contextmanager
    def only(nets):
        networks.loaded_networks[:] = others + nets  # in place: the built-in's modules hold this list
        try:
            yield
        finally:
            networks.loaded_networks[:] = shared

    variants = {None: lambda: only([])}
    variants.update({i: (lambda net=net: only([net])) for i, net in enumerate(composed)})
    return encode_variants(p, variants)


def _edit_model(p) -> bool:
    """As A1111's CFG denoiser decides it: an instruct-pix2pix checkpoint at an Image CFG scale other
    than 1 batches three branches (cond, uncond, uncond without the image)."""
    scale = getattr(p, "image_cfg_scale", None)
    return getattr(p.sd_model, "cond_stage_key", None) == "edit" and scale is not None and scale != 1.0


def _padded(denoiser, cond, uncond):
    """A variant's cond and uncond text rows padded to one token length as the denoiser pads the
    host's (settings "Pad prompt/negative prompt" and its v0), by the denoiser's own methods."""
    from modules import shared

    if cond.shape[1] == uncond.shape[1]:
        return cond, uncond
    if getattr(shared.opts, "pad_cond_uncond_v0", False) and hasattr(denoiser, "pad_cond_uncond_v0"):
        return denoiser.pad_cond_uncond_v0(cond, uncond)
    if getattr(shared.opts, "pad_cond_uncond", False) and hasattr(denoiser, "pad_cond_uncond"):
        return denoiser.pad_cond_uncond(cond, uncond)
    return cond, uncond


def _call_rows(text, start: int, stop: int, n_cond: int):
    """Rows [start, stop) of a CFG batch's text rows: cond rows first, then uncond rows. A call that
    holds both only comes when their token lengths match (A1111 runs them apart otherwise)."""
    cond, uncond = text
    parts = []
    if start < n_cond:
        parts.append(_slice_rows(cond, start, min(stop, n_cond)))
    if stop > n_cond:
        parts.append(_slice_rows(uncond, max(start - n_cond, 0), stop - n_cond))
    if len(parts) == 1:
        return parts[0]
    if isinstance(cond, dict):
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
    return torch.cat(parts)


def _slice_rows(rows, start: int, stop: int):
    if isinstance(rows, dict):
        return {key: value[start:stop] for key, value in rows.items()}
    return rows[start:stop]


def _text_part(cond, rows):
    """The text part of an apply_model ``cond`` with ``rows`` in it; None when the shapes differ."""
    if isinstance(rows, dict):  # SDXL: crossattn and vector
        part = {key: rows[key] for key in ("crossattn", "vector") if key in cond}
        ok = all(tuple(cond[k].shape) == tuple(v.shape) for k, v in part.items())
        return part if ok else None
    current = cond["c_crossattn"][0]
    return {"c_crossattn": [rows]} if tuple(current.shape) == tuple(rows.shape) else None


def _repeats(denoiser, images: int, cond_rows: int) -> list[int]:
    """How many cond rows (AND sub-prompts) each image has this step."""
    sampler = getattr(denoiser, "sampler", None)
    cond = getattr(sampler, "sampler_extra_args", {}).get("cond")
    batch = getattr(cond, "batch", None)
    if batch is not None and len(batch) == images and sum(len(b) for b in batch) == cond_rows:
        return [len(b) for b in batch]
    if cond_rows % images == 0:
        return [cond_rows // images] * images
    raise RuntimeError(
        f"LoRAtorio cannot tell which of {cond_rows} cond rows belong to which of {images} images"
    )


def _unet_layers(net, names: dict[int, str]) -> tuple[dict[str, LayerUpdate], str | None]:
    """A built-in Lora network's UNet layers as the runtime's updates (module name -> update)."""
    layers = {}
    for module in net.modules.values():
        name = names.get(id(getattr(module, "sd_module", None)))
        if name is None:
            continue  # a text-encoder layer: left to the built-in
        if getattr(module, "dora_scale", None) is not None:
            return {}, "DoRA layers depend on the merged weight and cannot be composed per row"
        up, down = getattr(module, "up_model", None), getattr(module, "down_model", None)
        if up is not None and down is not None and getattr(module, "bias", None) is None:
            rank = down.weight.shape[0]
            mid = module.mid_model.weight.detach() if getattr(module, "mid_model", None) is not None else None
            update = LayerUpdate(
                down=down.weight.detach(), up=up.weight.detach(), mid=mid, alpha=module.calc_scale() * rank
            )
        else:
            update = _dense(net, module)
        if layer_mismatch(module.sd_module, update):
            return {}, f"layer {name} does not fit the model ({layer_mismatch(module.sd_module, update)})"
        layers[name] = update
    return layers, None


def _dense(net, module) -> LayerUpdate:
    """LoHa, LoKr, full diff...: the built-in's own delta at multiplier 1."""
    saved = net.unet_multiplier
    net.unet_multiplier = 1.0
    try:
        with torch.no_grad():
            updown, ex_bias = module.calc_updown(module.sd_module.weight)
    finally:
        net.unet_multiplier = saved
    return LayerUpdate(dense=updown.detach().float(), dense_bias=None if ex_bias is None else ex_bias.float())


def _v_conversions(alphas_cumprod: torch.Tensor):
    """v <-> eps for the model input x at (fractional) timestep t: t to sigma as k-diffusion
    interpolates it (log-sigma, linearly), then the core's conversions."""
    log_sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).log()

    def sigma(inputs) -> torch.Tensor:
        t = inputs["t"].float().to(log_sigmas.device)
        low, high = t.floor().long(), t.ceil().long()
        frac = t - low
        return ((1 - frac) * log_sigmas[low] + frac * log_sigmas[high]).exp()

    def to_eps(v, inputs):
        return eps_from_v(inputs["x"], v, sigma(inputs).to(v.device))

    def from_eps(eps, inputs):
        return v_from_eps(inputs["x"], eps, sigma(inputs).to(eps.device))

    return to_eps, from_eps
