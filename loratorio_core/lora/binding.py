"""Binding a LoRA file's layers to the modules of a host model, with shapes checked."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .files import LayerUpdate, LoRAFile, LoRAFileError
from .keymap import is_linear, layer_aliases

# Cross-attention context width of attn2.to_k -> the model family it belongs to.
_CONTEXT_FAMILIES = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL", 4096: "FLUX/SD3"}


@dataclass(eq=False)
class BoundLoRA:
    """A LoRA's layers for one component of a model, keyed by module name.

    unmatched: the file's layer paths for this component that match no module of the model
    (reported, never silently dropped).
    """

    name: str
    path: str
    layers: dict[str, LayerUpdate]
    unmatched: list[str] = field(default_factory=list)


def guess_family(lora: LoRAFile) -> str | None:
    """The model family a LoRA was trained for, from its own shapes; None if it cannot tell."""
    if lora.component("te2"):
        return "SDXL"
    for path, update in lora.component("unet").items():
        if path.endswith("attn2_to_k") and update.down is not None:
            return _CONTEXT_FAMILIES.get(int(update.down.flatten(1).shape[1]))
    return None


def bind_lora(
    model: nn.Module, lora: LoRAFile, component: str = "unet", aliases: dict[str, str] | None = None
) -> BoundLoRA:
    """Map ``lora``'s layers of ``component`` (``unet``, ``te1``, ``te2``) onto ``model``.

    Raises ``LoRAFileError`` when a layer's shapes do not fit its module, or when the file has
    layers for this component and none of them matches the model: it was made for another model.
    aliases: ``layer_aliases(model)``, when the caller already has it.
    """
    aliases = layer_aliases(model) if aliases is None else aliases
    modules = dict(model.named_modules())
    wanted = lora.component(component)
    layers, unmatched = {}, []
    for path, update in wanted.items():
        name = aliases.get(path)
        if name is None:
            unmatched.append(path)
            continue
        problem = layer_mismatch(modules[name], update)
        if problem:
            raise LoRAFileError(
                lora.path,
                f"layer {path} does not fit the model's {name}: {problem}. {_made_for(lora, model)}",
            )
        layers[name] = update
    if wanted and not layers:
        raise LoRAFileError(
            lora.path,
            f"none of its {len(wanted)} {component} layers matches this model "
            f"(e.g. {sorted(wanted)[0]}). {_made_for(lora, model)}",
        )
    return BoundLoRA(lora.name, lora.path, layers, sorted(unmatched))


def layer_mismatch(module: nn.Module, update: LayerUpdate) -> str | None:
    """Why ``update`` cannot apply to ``module``, or None when it fits."""
    if not (is_linear(module) or isinstance(module, nn.Conv2d)):
        # The runtime adds a Linear/conv delta to a layer's output; a norm layer's change (LyCORIS
        # w_norm/b_norm) is no such delta, so it must be left to a merge.
        return f"it is a {type(module).__name__} layer, which the per-row runtime cannot apply"
    weight = module.weight
    if update.is_dense:
        if update.dense.numel() != weight.numel():
            return f"the update has shape {tuple(update.dense.shape)}, the weight {tuple(weight.shape)}"
        if update.dense_bias is not None and (
            module.bias is None or update.dense_bias.numel() != module.bias.numel()
        ):
            return "the update has a bias the layer cannot take"
        return None
    down, up = update.down, update.up
    out_features = weight.shape[0]
    if up.shape[0] != out_features:
        return f"up gives {up.shape[0]} outputs, the layer has {out_features}"
    if is_linear(module):
        if down.flatten(1).shape[1] != weight.shape[1] or update.mid is not None:
            return f"down {tuple(down.shape)} does not take the layer's {weight.shape[1]} inputs"
        return None
    kernel = tuple(module.kernel_size)  # a Conv2d from here on
    if module.groups > 1:
        if update.mid is not None or up.shape[0] * down.flatten(1).shape[1] != weight.numel():
            return f"down {tuple(down.shape)} does not fit the grouped weight {tuple(weight.shape)}"
        return None
    down_kernel = tuple(down.shape[2:]) if down.dim() == 4 else (1, 1)
    expected = (1, 1) if update.mid is not None else kernel
    if down.shape[1] != module.in_channels or down_kernel != expected:
        return f"down {tuple(down.shape)} does not fit the layer's weight {tuple(weight.shape)}"
    if update.mid is not None and tuple(update.mid.shape[2:]) != kernel:
        return f"lora_mid kernel {tuple(update.mid.shape[2:])} differs from the layer's {kernel}"
    return None


def _made_for(lora: LoRAFile, model: nn.Module) -> str:
    family = guess_family(lora)
    model_family = None
    for name, module in model.named_modules():
        if name.endswith("attn2.to_k") and is_linear(module):
            model_family = _CONTEXT_FAMILIES.get(module.in_features)
            break
    if family and model_family and family != model_family:
        return f"The LoRA is for {family}, the model is {model_family}: use a LoRA made for this model"
    return "It was made for another model architecture: use a LoRA made for this model"
