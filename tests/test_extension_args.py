"""The script's arguments: one order for UI, API and infotext; clear errors for bad API args."""

import math

import pytest

from extension.args import ARGS, NAMES, Settings, from_infotext, parse_args
from loratorio_core import LoRAtorioConfig


def test_the_argument_order_is_the_documented_public_contract():
    # Appending is allowed; reordering or renaming breaks API clients and saved infotexts.
    assert NAMES[:9] == (
        "enabled",
        "mode",
        "patch_size",
        "temperature",
        "recenter",
        "pool",
        "top_k",
        "reselect_every",
        "show_maps",
    )


def test_missing_trailing_arguments_take_their_defaults():
    assert parse_args([]) == Settings()
    settings = parse_args([True, "Composite", 2])
    assert settings.enabled and settings.mode == "Composite" and settings.patch_size == "2"
    assert settings.temperature == Settings().temperature


def test_api_values_are_coerced_from_json_types():
    settings = parse_args([1, "LoRAtorio", 4.0, "0.02", 1, " styles ", "3", 2, "false"])
    assert settings == Settings(True, "LoRAtorio", "4", 0.02, 1.0, "styles", 3, 2, False)


@pytest.mark.parametrize(
    "values, named",
    [
        ([True, "Blend"], "mode"),
        ([True, "LoRAtorio", 2.5], "patch_size"),
        ([True, "LoRAtorio", 0], "patch_size"),
        ([True, "LoRAtorio", "1/0"], "patch_size"),
        ([True, "LoRAtorio", "2/1"], "patch_size"),
        ([True, "LoRAtorio", "big"], "patch_size.*fraction of the latent's shorter side"),
        ([True, "LoRAtorio", 4, "hot"], "temperature"),
        ([True, "LoRAtorio", 4, -1.0], "temperature"),
        ([True, "LoRAtorio", 4, math.nan], "temperature"),
        ([True, "LoRAtorio", 4, 0.01, 2.0], "recenter"),
        ([True, "LoRAtorio", 4, 0.01, 1.0, 7], "pool"),
        ([True, "LoRAtorio", 4, 0.01, 1.0, "", -1], "top_k"),
        (["yes"], "enabled"),
        ([True, "LoRAtorio", 4, 0.01, 1.0, "", 0, 1, False, 0], "exact_every"),
        ([True, "LoRAtorio", 4, 0.01, 1.0, "", 0, 1, False, 4, 0], "exact_first"),
        ([True, "LoRAtorio", 4, 0.01, 1.0, "", 0, 1, False, 1, 3, "sharp"], "argument 11 .weighting."),
        (
            [True, "LoRAtorio", 4, 0.01, 0.5, "", 0, 1, False, 1, 3, "contrast", "skip"],
            "argument 12 .uncond_loras.",
        ),
        ([True] * 14, "at most 13"),
    ],
)
def test_bad_api_arguments_raise_a_clear_error_naming_the_argument(values, named):
    with pytest.raises(ValueError, match=named) as error:
        parse_args(values)
    assert str(error.value).startswith("LoRAtorio")


def test_config_follows_the_settings_and_a_large_top_k_keeps_every_lora():
    settings = parse_args([True, "LoRAtorio", 2, 0.05, 1.0, "", 3, 2])
    config = settings.config(num_loras=5)
    assert (config.patch_size, config.temperature, config.recenter, config.top_k, config.reselect_every) == (
        2,
        0.05,
        1.0,
        3,
        2,
    )
    assert settings.config(num_loras=3).top_k is None
    assert parse_args([True, "Merge", 4, 0.01, 1.0, "", 3]).config(5).top_k is None  # baselines never select


def test_infotext_round_trips_through_paste():
    settings = parse_args([True, "LoRAtorio", "1/8", 0.2, 0.75, "faces", 2, 3, True])
    params = {key: str(value) for key, value in settings.infotext().items()}
    assert params["LoRAtorio"] == "True" and params["LoRAtorio mode"] == "LoRAtorio"
    pasted = from_infotext(params)
    restored = Settings(**{**Settings().__dict__, **pasted})
    assert restored == Settings(
        True, "LoRAtorio", "1/8", 0.2, 0.75, "faces", 2, 3, False
    )  # maps are not an infotext setting
    assert from_infotext({"Steps": "20"}) == {}


def test_a_baseline_records_no_top_k_since_it_selects_nothing():
    params = parse_args([True, "Switch", 8, 0.2, 0.75, "", 2, 3]).infotext()
    assert params["LoRAtorio mode"] == "Switch" and "LoRAtorio top-k" not in params


def test_every_infotext_key_is_unique_and_prefixed():
    keys = [arg.infotext for arg in ARGS if arg.infotext]
    assert len(keys) == len(set(keys)) and all(k.startswith("LoRAtorio") for k in keys)


@pytest.mark.parametrize(
    "value, patch_size, fraction",
    [
        (4, 4, 1 / 16),  # what every API call before fractions sent: absolute, as it was
        (4.0, 4, 1 / 16),
        ("4", 4, 1 / 16),
        ("1/16", None, 1 / 16),
        (" 1/8 ", None, 1 / 8),
        ("1/1", None, 1.0),
    ],
)
def test_the_patch_size_argument_takes_an_absolute_size_or_a_fraction(value, patch_size, fraction):
    config = parse_args([True, "LoRAtorio", value]).config()
    assert (config.patch_size, config.patch_fraction) == (patch_size, fraction)


def test_the_default_patch_size_is_a_sixteenth_of_the_latent():
    assert Settings().patch_size == "1/16" and parse_args([True]).config().patch_size_for((64, 64)) == 4


@pytest.mark.parametrize(
    "written, pasted", [("4", "4"), ("1/16", "1/16"), ("8", "8")], ids=["old-absolute", "fraction", "int"]
)
def test_patch_sizes_paste_back_from_old_and_new_infotexts(written, pasted):
    params = {"LoRAtorio": "True", "LoRAtorio patch size": written}
    assert from_infotext(params)["patch_size"] == pasted
    config = Settings(**{**Settings().__dict__, **from_infotext(params)}).config()
    assert config.patch_size_for((128, 128)) == (8 if written == "1/16" else int(written))
    assert parse_args([True, "LoRAtorio", pasted]).infotext()["LoRAtorio patch size"] == written


def test_the_gated_single_pass_is_two_appended_arguments_recorded_only_when_on():
    assert NAMES[9:11] == ("exact_every", "exact_first")
    exact = parse_args([True])
    assert exact.config().exact_every == 1 and not exact.config().gated
    assert "LoRAtorio exact every" not in exact.infotext()
    fast = parse_args([True, "LoRAtorio", "1/16", 1.0, 0.5, "", 0, 1, False, 3, 2])
    config = fast.config()
    assert (config.exact_every, config.exact_first) == (3, 2) and config.gated
    params = fast.infotext()
    assert params["LoRAtorio exact every"] == 3 and params["LoRAtorio exact first"] == 2
    pasted = from_infotext({key: str(value) for key, value in params.items()})
    assert pasted["exact_every"] == 3 and pasted["exact_first"] == 2


def test_the_weighting_rule_is_the_twelfth_argument_recorded_and_pasted_back():
    assert NAMES[11] == "weighting" and Settings().weighting == LoRAtorioConfig().weighting == "contrast"
    paper = parse_args([True, "LoRAtorio", "1/16", 0.05, 0.5, "", 0, 1, False, 1, 3, "softmin"])
    assert (paper.config().weighting, paper.config().temperature) == ("softmin", 0.05)
    params = {key: str(value) for key, value in paper.infotext().items()}
    assert params["LoRAtorio weighting"] == "softmin"
    assert from_infotext(params)["weighting"] == "softmin"


def test_reusing_the_cond_change_on_the_negative_is_the_thirteenth_argument_recorded_only_when_it_acts():
    assert (
        NAMES[12] == "uncond_loras"
        and Settings().uncond_loras == LoRAtorioConfig().uncond_loras == "evaluate"
    )
    reuse = parse_args([True, "LoRAtorio", "1/16", 3.0, 0.5, "", 0, 1, False, 1, 3, "contrast", "reuse"])
    assert reuse.config().uncond_loras == "reuse"
    params = {key: str(value) for key, value in reuse.infotext().items()}
    assert params["LoRAtorio uncond LoRAs"] == "reuse"
    assert from_infotext(params)["uncond_loras"] == "reuse"
    # silent when it changes nothing (lam 1, a baseline) or is off; absent pastes back "evaluate"
    at_lam_one = parse_args([True, "LoRAtorio", "1/16", 3.0, 1.0, "", 0, 1, False, 1, 3, "contrast", "reuse"])
    assert "LoRAtorio uncond LoRAs" not in at_lam_one.infotext()
    assert "LoRAtorio uncond LoRAs" not in parse_args([True]).infotext()
    assert from_infotext({"LoRAtorio": "True"})["uncond_loras"] == "evaluate"


def test_an_infotext_pastes_back_the_settings_it_made_even_where_it_is_silent():
    # Made before the weighting setting existed (softmin, the only rule then), exact, no pool:
    # pasted over fields that hold other values, it sets each one back to what made the picture.
    old = {"LoRAtorio": "True", "LoRAtorio mode": "LoRAtorio", "LoRAtorio temperature": "1.0"}
    pasted = from_infotext(old)
    assert pasted["weighting"] == "softmin" and pasted["temperature"] == 1.0
    assert (pasted["exact_every"], pasted["top_k"], pasted["pool"]) == (1, 0, "")
    assert "recenter" not in pasted  # a key every version writes: absent means hand-edited, left as is
