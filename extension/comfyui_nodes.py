"""The LoRAtorio custom nodes for ComfyUI (category ``loratorio``); the work is in ``comfyui``.

ComfyUI reads ``NODE_CLASS_MAPPINGS`` and ``NODE_DISPLAY_NAME_MAPPINGS`` from the repository's root
``__init__.py``, which re-exports them from here.
"""

from __future__ import annotations

import os
from pathlib import Path

from loratorio_core import LoRAtorioConfig
from loratorio_core.config import UNCOND_LORAS, WEIGHTINGS, parse_patch
from loratorio_core.lora import split_scale

from . import comfyui
from .comfyui import StackEntry

CATEGORY = "loratorio"
STACK, POOL = "LORATORIO_STACK", "LORATORIO_POOL"
MODES = ["loratorio", "composite", "switch", "merge"]
LORA_SUFFIX = ".safetensors"


def _lora_names() -> list[str]:
    import folder_paths

    return folder_paths.get_filename_list("loras")


def _lora_path(name: str) -> str:
    """The file of a LoRA named as ComfyUI lists it (with or without its extension)."""
    import folder_paths

    path = folder_paths.get_full_path("loras", name)
    if path is None and not name.endswith(LORA_SUFFIX):
        path = folder_paths.get_full_path("loras", name + LORA_SUFFIX)
    if path is None:
        raise ValueError(
            f"LoRAtorio: no LoRA {name!r} in ComfyUI's loras folders ({', '.join(_lora_roots())}); "
            "put the .safetensors file there or pick one from the list"
        )
    return path


def _lora_roots() -> list[str]:
    import folder_paths

    return list(folder_paths.get_folder_paths("loras"))


def _stem(name: str) -> str:
    return Path(name).stem


class LoRAtorioLoRAStack:
    """One more LoRA on a LoRAtorio stack (chain as many as you like)."""

    DESCRIPTION = (
        "Adds a LoRA to a LoRAtorio stack. 'Apply LoRAtorio' composes the stack's LoRAs per patch and "
        "per step instead of merging them."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (STACK,)
    RETURN_NAMES = ("stack",)
    OUTPUT_TOOLTIPS = ("The LoRAs so far: connect to another LoRA stack node or to Apply LoRAtorio.",)
    FUNCTION = "add"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "lora_name": (_lora_names(), {"tooltip": "A LoRA from ComfyUI's loras folder."}),
                "strength_model": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": -10.0,
                        "max": 10.0,
                        "step": 0.01,
                        "tooltip": "The LoRA's scale in the UNet (its rows of the composition).",
                    },
                ),
                "strength_clip": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": -10.0,
                        "max": 10.0,
                        "step": 0.01,
                        "tooltip": "The scale of its text-encoder part, applied to CLIP as LoraLoader does "
                        "(shared by every row).",
                    },
                ),
            },
            "optional": {"stack": (STACK, {"tooltip": "The LoRAs before this one (leave empty to start)."})},
        }

    def add(self, lora_name: str, strength_model: float, strength_clip: float, stack=None):
        entry = StackEntry(
            _stem(lora_name), _lora_path(lora_name), float(strength_model), float(strength_clip)
        )
        return ([*(stack or []), entry],)


class LoRAtorioPool:
    """A pool of LoRAs (folders and files) of which the k most divergent are kept per image."""

    DESCRIPTION = (
        "A pool of LoRAs for dynamic selection: every step (or every 'reselect_every' steps) each image "
        "keeps the top_k LoRAs whose predictions depart most from the base model's."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (POOL,)
    RETURN_NAMES = ("pool",)
    OUTPUT_TOOLTIPS = ("Connect to Apply LoRAtorio's pool input.",)
    FUNCTION = "pool"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "loras": (
                    "STRING",
                    {
                        "default": "",
                        "multiline": True,
                        "tooltip": "Comma-separated: sub-folders of the loras folder (all their LoRAs) and "
                        "LoRA names, each with an optional scale, e.g. 'styles:0.8, knight.safetensors'.",
                    },
                ),
                "top_k": (
                    "INT",
                    {"default": 2, "min": 0, "max": 64, "tooltip": "LoRAs kept per image (0: all of them)."},
                ),
                "reselect_every": (
                    "INT",
                    {
                        "default": 1,
                        "min": 1,
                        "max": 1000,
                        "tooltip": "Steps between selections (1: every step).",
                    },
                ),
            }
        }

    def pool(self, loras: str, top_k: int, reselect_every: int):
        entries = resolve_pool(loras)
        return ({"entries": entries, "top_k": int(top_k), "reselect_every": int(reselect_every)},)


def resolve_pool(text: str) -> list[StackEntry]:
    """The pool's LoRAs: each comma-separated ``entry[:scale]`` a sub-folder of a loras folder (its
    .safetensors files, sorted) or a LoRA name. ValueError naming an entry that is neither."""
    entries: list[StackEntry] = []
    for item in (part for part in text.replace("\n", ",").split(",") if part.strip()):
        try:
            name, scale = split_scale(item)
        except ValueError as error:
            raise ValueError(f"LoRAtorio pool: {error}") from None
        scale = 1.0 if scale is None else scale
        folders = [Path(root) / name for root in _lora_roots() if (Path(root) / name).is_dir()]
        if folders:
            files = sorted(p for folder in folders for p in folder.rglob(f"*{LORA_SUFFIX}"))
            if not files:
                raise ValueError(f"LoRAtorio pool: the folder {folders[0]} holds no {LORA_SUFFIX} file")
            entries += [StackEntry(p.stem, os.fspath(p), scale, 0.0) for p in files]
        else:
            entries.append(StackEntry(_stem(name), _lora_path(name), scale, 0.0))
    if not entries:
        raise ValueError("LoRAtorio pool: name at least one LoRA or sub-folder of the loras folder")
    return entries


MODE_TIP = (
    "loratorio, or a baseline for comparison: composite (mean of every LoRA), switch (one LoRA a "
    "step), merge (all merged, as LoraLoader)."
)
PATCH_TIP = "Patch side: a fraction of the latent's shorter side ('1/16') or latent pixels ('4')."
TEMPERATURE_TIP = (
    "The weighting rule's temperature (lower: the most divergent LoRA takes more of a patch; "
    "contrast's 3: weights grow as (divergence / the LoRA's own mean) ** 1/3)."
)
WEIGHTING_TIP = (
    "How a patch's divergences become weights: contrast (default; each LoRA's divergence over its "
    "own mean: where it acts decides, not how strongly), softmin (the paper's rule), power, spread, "
    "median, rank."
)
PROMPT_TIP = (
    "With a pool and top_k: the positive prompt's text. The pool's LoRAs whose training tags (their "
    "trigger words) it names are kept first; the stack's LoRAs always are."
)
GATED_TIP = (
    "Exact steps every K-th step (1: every step, the method as written); between them one row with "
    "every LoRA gated by its latest weight map (faster). 2 kept the method's quality on both synthetic "
    "benchmarks; 3 costs fewer rows and loses some with 4-5 LoRAs."
)
UNCOND_LORAS_TIP = (
    "With lam < 1, the LoRAs' part of the negative branch: evaluate (every LoRA runs the negative "
    "prompt, the paper) or reuse (the positive branch's LoRA change; as many model rows as lam 1, faster)."
)
LAM_TIP = (
    "Re-centring of the negative branch on the base model (paper: 0.5); 1 is faster (no LoRA runs "
    "the negative prompt)."
)


def _number(kind: str, default, low, high, tooltip: str, step=None) -> tuple:
    """A ComfyUI INT/FLOAT input spec."""
    spec = {"default": default, "min": low, "max": high, "tooltip": tooltip}
    if step is not None:
        spec["step"] = step
    return (kind, spec)


class ApplyLoRAtorio:
    """MODEL + CLIP + a LoRA stack -> the MODEL that composes the stack per step, and the CLIP."""

    DESCRIPTION = (
        "Composes the stack's LoRAs with LoRAtorio: at every step each LoRA's UNet prediction is weighed "
        "per patch against the base model's and the most divergent LoRA leads there. The UNet parts are "
        "never merged; the text-encoder parts go to CLIP as LoraLoader applies them. The input MODEL "
        "and CLIP are left as they were."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP")
    OUTPUT_TOOLTIPS = (
        "The model that composes the LoRAs: connect it to the sampler (and to LoRAtorio weight maps).",
        "The CLIP with the LoRAs' text-encoder parts: encode the prompts with it.",
    )
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        defaults = LoRAtorioConfig()
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The checkpoint's MODEL (after any LoRA you want merged)."}),
                "clip": ("CLIP", {"tooltip": "The checkpoint's CLIP."}),
                "stack": (STACK, {"tooltip": "The LoRAs to compose (LoRAtorio LoRA stack nodes)."}),
                "mode": (MODES, {"default": "loratorio", "tooltip": MODE_TIP}),
                "patch_size": ("STRING", {"default": "1/16", "tooltip": PATCH_TIP}),
                "temperature": _number(
                    "FLOAT", defaults.temperature, 0.001, 100.0, TEMPERATURE_TIP, step=0.01
                ),
                "lam": _number("FLOAT", defaults.recenter, 0.0, 1.0, LAM_TIP, step=0.05),
                "top_k": _number("INT", 0, 0, 64, "Keep the k most divergent LoRAs per image (0: all)."),
            },
            "optional": {
                "pool": (POOL, {"tooltip": "More LoRAs to choose from (LoRAtorio pool); its top_k applies."}),
                "switch_every": _number(
                    "INT", defaults.switch_every, 1, 1000, "Steps per LoRA in mode switch."
                ),
                "rows_per_forward": _number(
                    "INT", 0, 0, 4096, "Most UNet rows per forward (memory); 0: no limit."
                ),
                # optional, so workflows saved before these inputs existed still load
                "weighting": (list(WEIGHTINGS), {"default": defaults.weighting, "tooltip": WEIGHTING_TIP}),
                "exact_every": _number("INT", defaults.exact_every, 1, 1000, GATED_TIP),
                "prompt": ("STRING", {"default": "", "multiline": True, "tooltip": PROMPT_TIP}),
                "exact_first": _number(
                    "INT", defaults.exact_first, 1, 1000, "With exact_every > 1: leading exact steps."
                ),
                "uncond_loras": (
                    list(UNCOND_LORAS),
                    {"default": defaults.uncond_loras, "tooltip": UNCOND_LORAS_TIP},
                ),
            },
        }

    def apply(
        self,
        model,
        clip,
        stack,
        mode,
        patch_size,
        temperature,
        lam,
        top_k,
        pool=None,
        switch_every=5,
        rows_per_forward=0,
        weighting=None,
        exact_every=1,
        exact_first=3,
        prompt="",
        uncond_loras=None,
    ):
        entries = list(stack or [])
        pool_entries = [e for e in (pool or {}).get("entries", []) if e.name not in {s.name for s in entries}]
        if pool is not None and pool.get("top_k"):
            top_k = pool["top_k"]
        config = settings_config(
            mode,
            patch_size,
            temperature,
            lam,
            top_k,
            len(entries) + len(pool_entries),
            reselect_every=(pool or {}).get("reselect_every", 1),
            switch_every=switch_every,
            weighting=weighting,
            exact_every=exact_every,
            exact_first=exact_first,
            uncond_loras=uncond_loras,
        )
        if not entries + pool_entries:
            raise ValueError("Apply LoRAtorio: the stack has no LoRA; add a LoRAtorio LoRA stack node")
        max_rows = int(rows_per_forward) or None
        named = comfyui.named_entries(entries, pool_entries, prompt) if config.top_k is not None else None
        composed = comfyui.compose_model(
            model, entries + pool_entries, config, max_rows=max_rows, named=named
        )
        return composed, comfyui.apply_text_encoders(clip, entries)


def settings_config(
    mode,
    patch_size,
    temperature,
    lam,
    top_k,
    num_loras,
    *,
    reselect_every=1,
    switch_every=5,
    weighting=None,
    exact_every=1,
    exact_first=3,
    uncond_loras=None,
):
    """The node's inputs as the core's config; ValueError naming the input for a bad value."""
    if mode not in MODES:
        raise ValueError(f"Apply LoRAtorio: mode must be one of {', '.join(MODES)}; got {mode!r}")
    top = int(top_k) or None
    if top is not None and (top >= num_loras or mode != "loratorio"):
        top = None  # keeping at least every LoRA keeps them all; the baselines have no selection
    try:
        return LoRAtorioConfig(
            mode=mode,
            **parse_patch(patch_size),
            weighting=str(weighting or LoRAtorioConfig().weighting),
            temperature=float(temperature),
            recenter=float(lam),
            top_k=top,
            reselect_every=int(reselect_every),
            switch_every=int(switch_every),
            exact_every=int(exact_every),
            exact_first=int(exact_first),
            uncond_loras=str(uncond_loras or LoRAtorioConfig().uncond_loras),
        )
    except ValueError as error:
        raise ValueError(f"Apply LoRAtorio: {error}") from None


class LoRAtorioWeightMaps:
    """After sampling: which LoRA led where, one picture per LoRA and image."""

    DESCRIPTION = (
        "Each LoRA's LoRAtorio weights (averaged over the last sampling's steps) as an IMAGE batch: for "
        "every image, one picture per LoRA, tinted over the image or alone, to preview or save."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("Image b's maps at b*N .. b*N+N-1 (N LoRAs, in stack order).",)
    FUNCTION = "maps"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The MODEL from Apply LoRAtorio that the sampler used."}),
                "images": (
                    "IMAGE",
                    {
                        "tooltip": "The decoded images of that sampling (this also makes the "
                        "maps wait for it)."
                    },
                ),
                "style": (["tinted", "alone"], {"tooltip": "Over the image, or on black."}),
            }
        }

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")  # the weights come from the last sampling, not from the inputs

    def maps(self, model, images, style):
        composition = comfyui.composition_of(model)
        return (comfyui.weight_map_images(composition, images, tinted=style == "tinted"),)


NODE_CLASS_MAPPINGS = {
    "LoRAtorioLoRAStack": LoRAtorioLoRAStack,
    "ApplyLoRAtorio": ApplyLoRAtorio,
    "LoRAtorioPool": LoRAtorioPool,
    "LoRAtorioWeightMaps": LoRAtorioWeightMaps,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LoRAtorioLoRAStack": "LoRAtorio LoRA stack",
    "ApplyLoRAtorio": "Apply LoRAtorio",
    "LoRAtorioPool": "LoRAtorio pool",
    "LoRAtorioWeightMaps": "LoRAtorio weight maps",
}
