"""Models the project builds itself (no downloads): the LDM-layout UNet."""

from .ldm_unet import UNetConfig, UNetModel, sd15_config, sdxl_config, tiny_config

__all__ = ["UNetConfig", "UNetModel", "sd15_config", "sdxl_config", "tiny_config"]
