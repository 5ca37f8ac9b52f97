"""Binding a LoRA file onto a model: full-size SD1.5 and SDXL shapes, and the refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loratorio_core.lora import LayerUpdate, LoRAFileError, bind_lora, guess_family, load_lora, save_lora
from loratorio_core.models import UNetModel, tiny_config

from unets import build, kohya_keys


def kohya_file(tmp_path, model: nn.Module, name: str, rank: int = 1, text_encoders=()):
    """A kohya LoRA (LoRA + LoCon) covering every layer a trainer targets in ``model``."""
    modules = dict(model.named_modules())
    layers = {}
    for key in kohya_keys(model):
        path = key.removeprefix("lora_unet_")
        module = _module_by_alias(modules, path)
        weight = module.weight
        if isinstance(module, nn.Linear):
            update = LayerUpdate(
                down=torch.randn(rank, weight.shape[1]), up=torch.randn(weight.shape[0], rank), alpha=1.0
            )
        else:
            update = LayerUpdate(
                down=torch.randn(rank, weight.shape[1], *weight.shape[2:]),
                up=torch.randn(weight.shape[0], rank, 1, 1),
                alpha=1.0,
            )
        layers[("unet", path)] = update
    for component, width in text_encoders:
        layers[(component, "text_model_encoder_layers_0_self_attn_q_proj")] = LayerUpdate(
            down=torch.randn(rank, width), up=torch.randn(width, rank)
        )
    path = tmp_path / f"{name}.safetensors"
    save_lora(path, layers)
    return path


def _module_by_alias(modules, path):
    return modules[_underscored(modules)[path]]


def _underscored(modules, cache={}):  # noqa: B006 - one lookup table per module dict
    key = id(modules)
    if key not in cache:
        cache[key] = {name.replace(".", "_"): name for name in modules}
    return cache[key]


@pytest.mark.parametrize("kind, trained_on", [("sd15", "diffusers"), ("sdxl", "ldm")])
def test_a_full_kohya_file_binds_every_layer_on_either_layout(tmp_path, kind, trained_on):
    ldm, diff = build(kind)
    lora = load_lora(kohya_file(tmp_path, diff if trained_on == "diffusers" else ldm, kind))
    for host in (ldm, diff):
        bound = bind_lora(host, lora)
        assert bound.unmatched == []
        assert len(bound.layers) == len(lora.component("unet"))
    assert guess_family(lora) == ("SD1.x" if kind == "sd15" else "SDXL")


def test_an_sdxl_lora_on_an_sd15_model_is_refused_naming_both(tmp_path):
    sd15, _ = build("sd15")
    sdxl, _ = build("sdxl")
    path = kohya_file(tmp_path, sdxl, "xl_style", text_encoders=[("te1", 768), ("te2", 1280)])
    with pytest.raises(LoRAFileError, match="for SDXL, the model is SD1.x") as error:
        bind_lora(sd15, load_lora(path))
    assert "xl_style.safetensors" in str(error.value)


def test_an_sd15_lora_on_an_sdxl_model_is_refused(tmp_path):
    _, sd15 = build("sd15")
    sdxl, _ = build("sdxl")
    with pytest.raises(LoRAFileError, match="for SD1.x, the model is SDXL"):
        bind_lora(sdxl, load_lora(kohya_file(tmp_path, sd15, "sd15_style")))


def test_layers_that_match_nothing_are_reported(tmp_path):
    unet = UNetModel(tiny_config())
    layers = {
        ("unet", "input_blocks_1_1_proj_in"): LayerUpdate(
            down=torch.randn(2, 32, 1, 1), up=torch.randn(32, 2, 1, 1)
        ),
        ("unet", "input_blocks_99_1_proj_in"): LayerUpdate(down=torch.randn(2, 32), up=torch.randn(32, 2)),
    }
    save_lora(tmp_path / "a.safetensors", layers)
    bound = bind_lora(unet, load_lora(tmp_path / "a.safetensors"))
    assert list(bound.layers) == ["input_blocks.1.1.proj_in"]
    assert bound.unmatched == ["input_blocks_99_1_proj_in"]


def test_a_layer_whose_shape_does_not_fit_is_refused_naming_layer_and_module(tmp_path):
    unet = UNetModel(tiny_config())
    save_lora(
        tmp_path / "a.safetensors",
        {
            ("unet", "input_blocks_1_1_transformer_blocks_0_attn2_to_k"): LayerUpdate(
                down=torch.randn(2, 77), up=torch.randn(64, 2)
            )
        },
    )
    with pytest.raises(
        LoRAFileError,
        match=r"attn2_to_k does not fit the model's input_blocks.1.1.transformer_blocks.0.attn2.to_k",
    ):
        bind_lora(unet, load_lora(tmp_path / "a.safetensors"))


def test_text_encoder_components_bind_to_their_own_models(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    encoder = transformers.CLIPTextModel(config)
    save_lora(
        tmp_path / "a.safetensors",
        {
            ("te1", "text_model_encoder_layers_1_self_attn_q_proj"): LayerUpdate(
                down=torch.randn(2, 32), up=torch.randn(32, 2)
            )
        },
    )
    lora = load_lora(tmp_path / "a.safetensors")
    bound = bind_lora(encoder, lora, "te1")
    assert [name.split("layers.")[1] for name in bound.layers] == ["1.self_attn.q_proj"]
    assert bind_lora(encoder, lora, "te2").layers == {}


@pytest.mark.parametrize("norm", [nn.GroupNorm(4, 8), nn.LayerNorm(8)], ids=["GroupNorm", "LayerNorm"])
def test_a_dense_update_of_a_norm_layer_does_not_fit_the_per_row_runtime(norm):
    from loratorio_core.lora.binding import layer_mismatch

    update = LayerUpdate(dense=torch.full((8,), 0.1), dense_bias=torch.full((8,), 0.05))
    problem = layer_mismatch(norm, update)
    assert problem == f"it is a {type(norm).__name__} layer, which the per-row runtime cannot apply"
