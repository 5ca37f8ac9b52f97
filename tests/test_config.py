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


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"mode": "blend"}, "mode"),
        ({"patch_size": 0}, "patch_size"),
        ({"patch_size": 2.0}, "patch_size"),
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
