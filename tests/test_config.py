"""LoRAtorioConfig validates itself with messages that name the setting."""

import math

import pytest

from loratorio_core import LoRAtorioConfig


def test_defaults_are_the_method_with_the_papers_recentering():
    config = LoRAtorioConfig()
    assert config.mode == "loratorio"
    assert config.recenter == 0.5
    assert config.top_k is None and config.reselect_every == 1
    assert config.switch_every == 5
    assert config.upsample == "nearest"
    assert config.uncond_loras == "evaluate"  # every LoRA runs the negative prompt, as in the paper
    assert config.patch_size is None and config.patch_fraction == 1 / 16  # of the latent's side


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"mode": "blend"}, "mode"),
        ({"patch_size": 0}, "patch_size"),
        ({"patch_size": 2.0}, "patch_size"),
        ({"patch_fraction": 0}, "patch_fraction.*latent's shorter side"),
        ({"patch_fraction": 1.5}, "patch_fraction"),
        ({"patch_fraction": math.nan}, "patch_fraction"),
        ({"patch_fraction": "1/16"}, "patch_fraction"),
        ({"temperature": 0}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"recenter": 1.5}, "recenter"),
        ({"recenter": -0.01}, "recenter"),
        ({"recenter": math.nan}, "recenter"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 2, "mode": "merge"}, "top_k"),
        ({"reselect_every": 0}, "reselect_every"),
        ({"upsample": "bicubic"}, "upsample"),
        ({"switch_every": 0}, "switch_every"),
        ({"switch_every": True}, "switch_every"),
        ({"uncond_loras": "skip"}, "uncond_loras must be one of evaluate, reuse"),
    ],
)
def test_bad_settings_raise_value_error_naming_the_setting(changes, named):
    with pytest.raises(ValueError, match=named):
        LoRAtorioConfig(**changes)


def test_replace_validates_and_rejects_unknown_settings():
    config = LoRAtorioConfig().replace(temperature=0.05, top_k=3)
    assert config.temperature == 0.05 and config.top_k == 3
    with pytest.raises(ValueError, match="temperature"):
        config.replace(temperature=0)
    with pytest.raises(ValueError, match="tau"):
        config.replace(tau=0.1)


@pytest.mark.parametrize(
    "latent, size",
    [
        ((64, 64), 4),  # SD1.5 at 512 px
        ((128, 128), 8),  # SDXL at 1024 px
        ((96, 96), 6),  # a 1.5x hires pass of 512 px
        ((64, 96), 4),  # 512x768: the shorter side
        ((72, 72), 5),  # 4.5 rounds half up
        ((16, 16), 1),  # the synthetic benchmark's latent
        ((8, 8), 1),  # never below 1
    ],
)
def test_the_default_patch_is_a_sixteenth_of_the_latents_shorter_side(latent, size):
    assert LoRAtorioConfig().patch_size_for(latent) == size


def test_an_absolute_patch_size_is_the_same_at_every_latent_size():
    config = LoRAtorioConfig(patch_size=4)
    assert {config.patch_size_for(latent) for latent in [(8, 8), (64, 64), (128, 96)]} == {4}
    assert LoRAtorioConfig(patch_fraction=1 / 8).patch_size_for((128, 128)) == 16


@pytest.mark.parametrize("value", [0, -1, 2.5, "0", "abc", "1/0", "3/2", "-1/16", True, None])
def test_a_bad_patch_setting_is_a_clear_error_saying_what_to_write(value):
    from loratorio_core.config import parse_patch

    with pytest.raises(ValueError, match=r"whole number >= 1, e.g. 4\) or a fraction .*e.g. 1/16"):
        parse_patch(value)


def test_patch_settings_read_and_write_as_users_type_them():
    from loratorio_core.config import format_patch, parse_patch

    for text in ("1/32", "1/16", "1/8", "1/4", "1", "4", "16", "3/64"):
        assert format_patch(LoRAtorioConfig(**parse_patch(text))) == text
    assert parse_patch(4) == {"patch_size": 4, "patch_fraction": 1 / 16}
