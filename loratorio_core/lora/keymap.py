"""Which module of a host model each LoRA layer belongs to.

LoRA files spell a layer as its module name with dots as underscores, in one of two UNet layouts:
diffusers' (``down_blocks_0_attentions_0_proj_in``, what kohya's SD1.x trainers write) or the
original LDM/SGM one that A1111 and Forge load checkpoints into (``input_blocks_1_1_proj_in``,
what kohya's SDXL trainer writes). A host model has one layout; ``layer_aliases`` gives every
Linear/Conv2d of it both spellings, with the other layout derived from the model's own block
structure (any channel multipliers, block counts and attention levels: SD1.x, SD2.x, SDXL, tiny
test models). Text-encoder layers match on the part of the name from ``encoder.layers`` on.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

TARGET_TYPES = (nn.Linear, nn.Conv2d)


def is_linear(module: nn.Module) -> bool:
    """A Linear layer, or one that behaves like it (Forge's ForgeOperations.Linear is a plain Module
    with a 2-D weight and in/out_features)."""
    if isinstance(module, nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    return (
        isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and hasattr(module, "in_features")
        and hasattr(module, "out_features")
    )


def is_target(module: nn.Module) -> bool:
    """A layer a LoRA can update: Linear-like or Conv2d."""
    return isinstance(module, nn.Conv2d) or is_linear(module)


# ResBlock leaves: LDM name -> diffusers name.
_RESNET_LEAVES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_RESNET_LEAVES_BACK = {v: k for k, v in _RESNET_LEAVES.items()}
_LDM_RESBLOCK = re.compile(r"(input_blocks|output_blocks)\.\d+\.0|middle_block\.[02]")
_FIXED = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
    "middle_block.0": "mid_block.resnets.0",
    "middle_block.1": "mid_block.attentions.0",
    "middle_block.2": "mid_block.resnets.1",
}


def ldm_to_diffusers_blocks(module_names: Iterable[str]) -> dict[str, str]:
    """Block prefixes of an LDM-layout UNet -> the diffusers prefixes of the same blocks."""
    names = set(module_names)
    pairs = dict(_FIXED)
    level, j = 0, 0
    for k in _indices(names, "input_blocks"):
        if k == 0:
            continue
        if f"input_blocks.{k}.0.op" in names:
            pairs[f"input_blocks.{k}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
            level, j = level + 1, 0
            continue
        pairs[f"input_blocks.{k}.0"] = f"down_blocks.{level}.resnets.{j}"
        if f"input_blocks.{k}.1" in names:
            pairs[f"input_blocks.{k}.1"] = f"down_blocks.{level}.attentions.{j}"
        j += 1
    level, j = 0, 0
    for k in _indices(names, "output_blocks"):
        pairs[f"output_blocks.{k}.0"] = f"up_blocks.{level}.resnets.{j}"
        upsample = None
        for child in (1, 2):
            if f"output_blocks.{k}.{child}.conv" in names:
                upsample = child
            elif f"output_blocks.{k}.{child}" in names:
                pairs[f"output_blocks.{k}.{child}"] = f"up_blocks.{level}.attentions.{j}"
        if upsample is not None:
            pairs[f"output_blocks.{k}.{upsample}.conv"] = f"up_blocks.{level}.upsamplers.0.conv"
            level, j = level + 1, 0
        else:
            j += 1
    return pairs


def diffusers_to_ldm_blocks(module_names: Iterable[str]) -> dict[str, str]:
    """Block prefixes of a diffusers-layout UNet -> the LDM prefixes of the same blocks."""
    names = set(module_names)
    pairs = {v: k for k, v in _FIXED.items()}
    k = 1
    for level in _indices(names, "down_blocks"):
        for j in _indices(names, f"down_blocks.{level}.resnets"):
            pairs[f"down_blocks.{level}.resnets.{j}"] = f"input_blocks.{k}.0"
            if f"down_blocks.{level}.attentions.{j}" in names:
                pairs[f"down_blocks.{level}.attentions.{j}"] = f"input_blocks.{k}.1"
            k += 1
        if f"down_blocks.{level}.downsamplers.0.conv" in names:
            pairs[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{k}.0.op"
            k += 1
    k = 0
    for level in _indices(names, "up_blocks"):
        resnets = _indices(names, f"up_blocks.{level}.resnets")
        has_attention = f"up_blocks.{level}.attentions.0" in names
        for j in resnets:
            pairs[f"up_blocks.{level}.resnets.{j}"] = f"output_blocks.{k}.0"
            if has_attention:
                pairs[f"up_blocks.{level}.attentions.{j}"] = f"output_blocks.{k}.1"
            if j == resnets[-1] and f"up_blocks.{level}.upsamplers.0.conv" in names:
                child = 2 if has_attention else 1
                pairs[f"up_blocks.{level}.upsamplers.0.conv"] = f"output_blocks.{k}.{child}.conv"
            k += 1
    return pairs


def translate(name: str, blocks: dict[str, str], to_diffusers: bool) -> str | None:
    """A module name in the other layout, or None when it has no counterpart.

    blocks: the block map of the model's layout (``ldm_to_diffusers_blocks`` when
    ``to_diffusers``, else ``diffusers_to_ldm_blocks``).
    """
    best = max((p for p in blocks if name == p or name.startswith(p + ".")), key=len, default=None)
    if best is None:
        return None
    rest, target = name[len(best) + 1 :], blocks[best]
    if rest and _LDM_RESBLOCK.fullmatch(best if to_diffusers else target):
        leaves = _RESNET_LEAVES if to_diffusers else _RESNET_LEAVES_BACK
        if rest not in leaves:
            return None
        rest = leaves[rest]
    return f"{target}.{rest}" if rest else target


def layer_aliases(model: nn.Module) -> dict[str, str]:
    """Every spelling a LoRA file may use for each Linear/Conv2d of ``model`` -> its module name.

    Spellings are underscored (``down_blocks_0_attentions_0_proj_in``). A spelling that two
    modules would share is left out: it could not say which one it means.
    """
    targets = [name for name, module in model.named_modules() if is_target(module)]
    all_names = [name for name, _ in model.named_modules()]
    aliases: dict[str, set[str]] = {}

    def add(alias: str, name: str) -> None:
        aliases.setdefault(alias.replace(".", "_"), set()).add(name)

    roots = _unet_roots(all_names)
    for root in roots:
        local = [n[len(root) :] for n in all_names if n.startswith(root)]
        is_ldm = any(n.startswith("input_blocks.") for n in local)
        blocks = ldm_to_diffusers_blocks(local) if is_ldm else diffusers_to_ldm_blocks(local)
        for name in targets:
            if not name.startswith(root):
                continue
            rel = name[len(root) :]
            add(rel, name)
            other = translate(rel, blocks, to_diffusers=is_ldm)
            if other is not None:
                add(other, name)
    for name in targets:
        add(name, name)
        if "encoder.layers." in name:
            # CLIP text encoders: files say text_model.encoder.layers...; transformers 5 dropped
            # the text_model level, and hosts wrap the model (A1111: .transformer).
            add("text_model." + name[name.index("encoder.layers.") :], name)
    return {alias: next(iter(names)) for alias, names in aliases.items() if len(names) == 1}


def _unet_roots(names: list[str]) -> list[str]:
    """Prefixes ('' or 'diffusion_model.' ...) under which a UNet's blocks sit."""
    roots = set()
    for name in names:
        for marker in ("input_blocks", "down_blocks"):
            if name.endswith(marker) or f".{marker}" in name or name.startswith(marker):
                cut = name.find(marker)
                if cut >= 0 and (cut == 0 or name[cut - 1] == "."):
                    roots.add(name[:cut])
    return sorted(roots)


def _indices(names: set[str], prefix: str) -> list[int]:
    found = set()
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)(\.|$)")
    for name in names:
        match = pattern.match(name)
        if match:
            found.add(int(match.group(1)))
    return sorted(found)
