"""A faithful fake of the parts of ComfyUI (0.8.0) that the LoRAtorio nodes touch, written from
ComfyUI's source for the tests: ``folder_paths``, ``nodes`` (custom-node loading, the built-in nodes
the example workflows use, an API-format prompt executor), ``comfy.model_patcher`` (clone: patches
copied a level deep, model_options deep-copied; LoRA patches merged into the shared model when a
patcher loads), ``comfy.patcher_extension`` (wrapper lists and their executor), ``comfy.samplers``
(calc_cond_batch's chunks, areas, masks, memory split, model_function_wrapper call, CFG 1, the
samplers), ``comfy.model_base`` (apply_model: sigma in, x0 out, eps or v), ``comfy.sd`` /
``comfy.lora`` (LoraLoader's path: key maps, patches, merge). A test fixture, never shipped."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "root")
REPO = os.path.dirname(os.path.dirname(HERE))
_MODULES = ("comfy", "nodes", "folder_paths", "loratorio_extension")


def _purge():
    for name in list(sys.modules):
        if name.split(".")[0] in _MODULES or name.startswith(REPO.replace(".", "_x_")):
            del sys.modules[name]


def install(lora_dir: Path, xl=False, prediction="eps", inpaint=False, seed=0):
    """The fake ComfyUI on sys.path with a tiny checkpoint ``tiny.safetensors`` loaded (the
    A1111 fake's FakeSD: its UNet in BaseModel, its text encoder in CLIP), ``lora_dir`` as the
    loras folder, and this repository loaded as a custom node the way ComfyUI loads one."""
    _purge()
    sys.path.insert(0, ROOT)
    import comfy.model_management
    import comfy.sd
    import folder_paths
    import nodes
    from comfy.model_base import BaseModel
    from comfy.model_patcher import ModelPatcher

    from fake_a1111.model import FakeSD

    source = FakeSD(xl=xl, parameterization="v" if prediction == "v" else "eps", inpaint=inpaint, seed=seed)
    base = BaseModel(source.model.diffusion_model, source.alphas_cumprod, prediction, xl=xl, inpaint=inpaint)
    model, clip = ModelPatcher(base), comfy.sd.CLIP(source.cond_stage_model)
    nodes.CHECKPOINTS["tiny.safetensors"] = (model, clip, nodes.FakeVAE())
    nodes.CONTROLNETS["control.safetensors"] = object()
    folder_paths.set_folder("loras", [str(lora_dir)])
    comfy.model_management.FREE_MEMORY[0] = float("inf")
    comfy.model_management.interrupt_processing = False
    loaded = nodes.load_custom_node(REPO)
    return SimpleNamespace(
        nodes=nodes,
        model=model,
        clip=clip,
        source=source,
        loaded=loaded,
        management=comfy.model_management,
        folder_paths=folder_paths,
    )


def uninstall():
    import comfy.model_management

    comfy.model_management.unload_all_models()
    while ROOT in sys.path:
        sys.path.remove(ROOT)
    _purge()
