"""The LDM-layout UNet is shaped like the real SD1.5 and SDXL UNets."""

import pytest
import torch

from loratorio_core.models import UNetModel, sd15_config, sdxl_config, tiny_config


@pytest.mark.parametrize(
    "config, parameters",
    [(sd15_config(), 859_520_964), (sdxl_config(), 2_567_463_684)],
    ids=["sd15", "sdxl"],
)
def test_full_size_unets_have_the_real_parameter_count_and_names(config, parameters):
    with torch.device("meta"):
        unet = UNetModel(config)
    assert sum(p.numel() for p in unet.parameters()) == parameters
    names = dict(unet.named_modules())
    if config.adm_in_channels:
        assert names["input_blocks.7.1.transformer_blocks.9.attn2.to_k"].in_features == 2048
        assert names["label_emb.0.0"].in_features == 2816
        assert isinstance(names["output_blocks.2.2"].conv, torch.nn.Conv2d)  # upsample after attention
    else:
        assert names["input_blocks.1.1.transformer_blocks.0.attn2.to_k"].in_features == 768
        assert names["input_blocks.3.0.op"].stride == (2, 2)
        assert names["output_blocks.2.1.conv"].out_channels == 1280  # upsample, no attention at that level
        assert names["output_blocks.5.2.conv"].out_channels == 1280
        assert names["middle_block.1.proj_in"].kernel_size == (1, 1)


@pytest.mark.parametrize("size", [(8, 8), (9, 13), (5, 6)])
def test_tiny_unet_keeps_odd_latent_sizes(size):
    unet = UNetModel(tiny_config()).eval()
    x = torch.randn(2, 4, *size)
    with torch.no_grad():
        out = unet(x, torch.tensor([1, 999]), torch.randn(2, 3, 32))
    assert out.shape == x.shape and torch.isfinite(out).all()
