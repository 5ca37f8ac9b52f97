"""LoRA layer names find exactly one module, in either UNet layout, on full-size SD1.5 and SDXL shapes.

The diffusers-layout UNets are diffusers' own ``UNet2DConditionModel`` (built on the meta
device, no weights), so the LDM <-> diffusers translation is checked against an independent
implementation, not against itself.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loratorio_core.lora.keymap import layer_aliases
from loratorio_core.models import UNetModel, sd15_config

from unets import build, kohya_keys


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_both_layouts_map_every_layer_to_the_same_shaped_module_of_the_other(kind):
    ldm, diff = build(kind)
    ldm_modules = {n: m for n, m in ldm.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    diff_modules = {n: m for n, m in diff.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert len(ldm_modules) == len(diff_modules)
    on_ldm, on_diff = layer_aliases(ldm), layer_aliases(diff)
    for name, module in diff_modules.items():
        target = on_ldm[name.replace(".", "_")]
        assert ldm_modules[target].weight.shape == module.weight.shape, name
    for name, module in ldm_modules.items():
        target = on_diff[name.replace(".", "_")]
        assert diff_modules[target].weight.shape == module.weight.shape, name


@pytest.mark.parametrize("kind, trained_on", [("sd15", "diffusers"), ("sdxl", "ldm")])
def test_a_kohya_file_covering_every_targeted_layer_maps_each_key_to_exactly_one_module(kind, trained_on):
    # kohya's SD1.x trainer spells layers the diffusers way, its SDXL trainer the LDM way.
    ldm, diff = build(kind)
    keys = kohya_keys(diff if trained_on == "diffusers" else ldm)
    assert len(keys) > (190 if kind == "sd15" else 700)
    for host in (ldm, diff):
        aliases = layer_aliases(host)
        targets = [aliases.get(key.removeprefix("lora_unet_")) for key in keys]
        assert None not in targets, [k for k, t in zip(keys, targets, strict=True) if t is None][:5]
        assert len(set(targets)) == len(targets)  # no two keys share a module


def test_prefixed_hosts_and_text_encoders_match_on_their_own_names():
    class Host(nn.Module):  # like A1111's sd_model.model: the UNet under diffusion_model
        def __init__(self):
            super().__init__()
            self.diffusion_model = UNetModel(sd15_config())

    with torch.device("meta"):
        host = Host()
    aliases = layer_aliases(host)
    assert aliases["down_blocks_0_attentions_0_proj_in"] == "diffusion_model.input_blocks.1.1.proj_in"
    assert aliases["input_blocks_1_1_proj_in"] == "diffusion_model.input_blocks.1.1.proj_in"

    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )

    class Wrapper(nn.Module):  # like A1111's FrozenCLIPEmbedder: the CLIP model under .transformer
        def __init__(self):
            super().__init__()
            self.transformer = transformers.CLIPTextModel(config)

    wrapper = Wrapper()
    aliases = layer_aliases(wrapper)
    names = [name for name, _ in wrapper.named_modules()]

    def real(tail):  # transformers 4 has a text_model level, transformers 5 not
        return next(name for name in names if name.endswith(tail))

    assert aliases["text_model_encoder_layers_1_self_attn_q_proj"] == real("layers.1.self_attn.q_proj")
    assert aliases["text_model_encoder_layers_0_mlp_fc2"] == real("layers.0.mlp.fc2")
