"""``loratorio generate``: the PNG, its metadata, the maps, and one clear line for bad input."""

from __future__ import annotations

import json
import re

import pytest
import torch
from PIL import Image

from loratorio_core.cli import main
from loratorio_core.generate import parse_lora

from test_a1111_extension import webui  # noqa: F401 - the fake A1111 with the extension loaded
from test_diffusers_integration import random_lora
from tiny_pipes import tiny_sd, tiny_sdxl


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    pipe = tiny_sd(folder / "src")
    pipe.save_pretrained(folder / "sd")
    for i in range(3):
        random_lora(folder / f"lora{i}.safetensors", pipe, seed=i, text_encoder=i == 0)
    return folder


def run(capsys, *args):
    code = main(["generate", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_generate_writes_the_png_with_its_settings_and_the_weight_maps(model_folder, tmp_path, capsys):
    out = tmp_path / "out" / "knight.png"
    code, stdout, err = run(
        capsys,
        model_folder / "sd",
        "--prompt",
        "a knight",
        "--negative",
        "blurry",
        "--lora",
        f"{model_folder / 'lora0.safetensors'}:0.8",
        "--lora",
        model_folder / "lora1.safetensors",
        "--steps",
        3,
        "--width",
        16,
        "--height",
        16,
        "--seed",
        7,
        "--output",
        out,
        "--maps",
        "--quiet",
    )
    assert code == 0, err
    assert stdout.split() == [str(out), str(out.with_name("knight_maps.png"))]
    image = Image.open(out)
    assert image.size == (16, 16)
    parameters = image.text["parameters"]
    assert parameters.startswith("a knight <lora:lora0:0.8> <lora:lora1:1>\nNegative prompt: blurry\n")
    assert "Steps: 3" in parameters and "Seed: 7" in parameters
    assert "LoRAtorio: True, LoRAtorio mode: LoRAtorio" in parameters
    settings = json.loads(image.text["loratorio"])
    assert settings["loras"] == [["lora0", 0.8], ["lora1", 1.0]]
    assert settings["config"]["patch_size"] is None and settings["config"]["patch_fraction"] == 1 / 16
    assert "LoRAtorio patch size: 1/16" in parameters
    maps = Image.open(out.with_name("knight_maps.png"))
    assert maps.width == 4 * 160 and maps.height == 2 * (160 + 14)  # the result + 3 steps, 2 LoRAs


def test_reusing_the_cond_change_on_the_negative_is_a_different_image_and_is_recorded(
    model_folder, tmp_path, capsys
):
    def generate(name, *extra):
        out = tmp_path / f"{name}.png"
        loras = ("--lora", model_folder / "lora1.safetensors", "--lora", model_folder / "lora2.safetensors")
        code, _, err = run(
            capsys,
            *(model_folder / "sd", "-p", "a knight", *loras, "--steps", 2, "--width", 16, "--height", 16),
            *("--seed", 3, "--output", out, "--quiet", *extra),
        )
        assert code == 0, err
        image = Image.open(out)
        return torch.tensor(list(image.getdata())), image.text

    evaluated, evaluated_text = generate("evaluate")
    reused, reused_text = generate("reuse", "--uncond-loras", "reuse")
    assert not torch.equal(evaluated, reused)
    assert "LoRAtorio uncond LoRAs: reuse" in reused_text["parameters"]
    assert json.loads(reused_text["loratorio"])["config"]["uncond_loras"] == "reuse"
    assert "uncond LoRAs" not in evaluated_text["parameters"]  # absent: every LoRA ran the negative
    at_lam_one, text = generate("lam1", "--uncond-loras", "reuse", "--recenter", 1)
    assert "uncond LoRAs" not in text["parameters"]  # at lam 1 no LoRA part is left to take anywhere
    assert torch.equal(at_lam_one, generate("lam1-evaluate", "--recenter", 1)[0])


def test_generate_with_a_pool_records_the_kept_loras_per_image(model_folder, tmp_path, capsys):
    pool = tmp_path / "pool"
    pool.mkdir()
    for i in range(3):
        (pool / f"p{i}.safetensors").write_bytes((model_folder / f"lora{i}.safetensors").read_bytes())
    out = tmp_path / "pool.png"
    code, stdout, err = run(
        capsys,
        model_folder / "sd",
        "-p",
        "a knight",
        "--pool",
        f"{pool}:0.5,{model_folder / 'lora2.safetensors'}:0.7",  # a folder and a file, each its scale
        "--top-k",
        2,
        "--patch-size",
        4,  # absolute latent pixels
        "--steps",
        2,
        "--width",
        16,
        "--height",
        16,
        "--batch",
        2,
        "--output",
        out,
        "--quiet",
    )
    assert code == 0, err
    files = stdout.split()
    assert files == [str(tmp_path / "pool-0.png"), str(tmp_path / "pool-1.png")]
    for file in files:
        parameters = Image.open(file).text["parameters"]
        assert parameters.startswith("a knight <lora:p0:0.5> <lora:p1:0.5> <lora:p2:0.5> <lora:lora2:0.7>\n")
        assert "LoRAtorio patch size: 4," in parameters
        kept = parameters.split('LoRAtorio kept: "')[1].split('"')[0]
        assert len(kept.split(", ")) == 2


def test_top_k_keeps_the_loras_given_by_name_before_the_pool(model_folder, tmp_path, capsys):
    pool = tmp_path / "pool"
    pool.mkdir()
    for i in range(3):
        (pool / f"p{i}.safetensors").write_bytes((model_folder / f"lora{i}.safetensors").read_bytes())
    out = tmp_path / "named.png"
    args = (
        model_folder / "sd",
        "-p",
        "a knight",
        "--lora",
        model_folder / "lora1.safetensors",
        "--pool",
        pool,
    )
    code, stdout, err = run(
        capsys, *args, "--top-k", 2, "--steps", 2, "--width", 16, "--height", 16, "--output", out, "--quiet"
    )
    assert code == 0, err
    kept = Image.open(out).text["parameters"].split('LoRAtorio kept: "')[1].split('"')[0].split(", ")
    assert len(kept) == 2 and "lora1" in kept  # asked for by --lora; the pool fills the other place


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--lora", "missing.safetensors"], "missing.safetensors: no such LoRA file"),
        (["--lora", "style.ckpt"], "pickle LoRA"),
        (["--lora", "{lora}:abc"], "is not a scale"),
        (["--lora", "{lora}:nan"], "finite"),
        (["--pool", "{lora}:abc"], "--pool '"),
        (["--patch-size", "0"], "patch size must be an absolute size in latent pixels"),
        (["--patch-size", "1/0"], "or a fraction of the latent's shorter side (e.g. 1/16"),
        (["--pool", "{lora}:1,nowhere.safetensors"], "nowhere.safetensors: no such LoRA file"),
        (["--temperature", "0"], "temperature"),
        (["--top-k", "3", "--lora", "{lora}"], "--top-k 3 is more than the 1 LoRAs"),
        (["--lora", "{xl}"], "xl.safetensors"),
    ],
)
def test_bad_input_exits_nonzero_with_one_clear_line(model_folder, tmp_path, capsys, extra, fragment):
    xl = tmp_path / "xl.safetensors"
    if any("{xl}" in e for e in extra):
        random_lora(xl, tiny_sdxl(tmp_path / "xlpipe"), seed=0)
    extra = [e.format(lora=model_folder / "lora1.safetensors", xl=xl) for e in extra]
    code, _, err = run(
        capsys,
        model_folder / "sd",
        "-p",
        "x",
        "--steps",
        1,
        "--width",
        16,
        "--height",
        16,
        "--quiet",
        "--output",
        tmp_path / "o.png",
        *extra,
    )
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loratorio: ") and fragment in lines[0], err


def test_a_missing_or_foreign_model_is_one_clear_line(tmp_path, capsys):
    code, _, err = run(capsys, tmp_path / "nowhere", "-p", "x", "--quiet")
    assert code == 2 and "no such model folder or file" in err
    (tmp_path / "notamodel").mkdir()
    code, _, err = run(capsys, tmp_path / "notamodel", "-p", "x", "--quiet")
    assert code == 2 and "no model_index.json" in err and len(err.strip().splitlines()) == 1
    torch.save({}, tmp_path / "model.ckpt")
    code, _, err = run(capsys, tmp_path / "model.ckpt", "-p", "x", "--quiet")
    assert code == 2 and "pickle checkpoints" in err


def test_lora_specs_parse_paths_and_scales():
    assert parse_lora("a.safetensors") == (parse_lora("a.safetensors")[0], 1.0)
    assert parse_lora("dir/a.safetensors:0.5")[1] == 0.5
    path, scale = parse_lora("C:\\loras\\a.safetensors:-0.3")
    assert str(path) == "C:\\loras\\a.safetensors" and scale == -0.3
    assert str(parse_lora("C:\\loras\\a.safetensors")[0]) == "C:\\loras\\a.safetensors"


def test_a_single_file_checkpoint_that_cannot_load_is_one_clear_line(tmp_path, capsys):
    import safetensors.torch

    path = tmp_path / "xl.safetensors"
    safetensors.torch.save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(4)}, str(path))
    code, _, err = run(capsys, path, "-p", "x", "--quiet")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "cannot be loaded as a diffusers SD/SDXL pipeline" in lines[0]


def parse_generation_parameters(text: str) -> dict[str, str]:
    """The parameters line as A1111's parse_generation_parameters reads it: ``key: value`` pairs, a
    JSON-quoted value unquoted."""
    line = text.strip().splitlines()[-1]
    found = re.findall(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)', line)
    return {key: json.loads(value) if value.startswith('"') else value for key, value in found}


def test_a_cli_picture_pastes_its_settings_into_the_webui_extensions_fields(
    model_folder,
    tmp_path,
    capsys,
    webui,  # noqa: F811
):
    from modules import scripts

    pool = tmp_path / "pool"
    pool.mkdir()
    for i in range(3):
        (pool / f"p{i}.safetensors").write_bytes((model_folder / f"lora{i}.safetensors").read_bytes())
    out = tmp_path / "knight.png"
    code, _, err = run(
        capsys,
        *(model_folder / "sd", "-p", "a knight", "--pool", pool, "--top-k", 2, "--reselect-every", 3),
        *("--patch-size", "1/8", "--temperature", 0.2, "--recenter", 0.75, "--steps", 2),
        *("--width", 16, "--height", 16, "--output", out, "--quiet"),
    )
    assert code == 0, err
    params = parse_generation_parameters(Image.open(out).text["parameters"])
    runner = scripts.ScriptRunner([webui.script_class()])
    pasted = {component.label: paste(params) for component, paste in runner.infotext_fields}
    assert {label: value for label, value in pasted.items() if value is not None} == {
        "LoRAtorio": True,
        "Mode": "LoRAtorio",
        "Patch size (fraction or pixels)": "1/8",
        "Temperature (tau)": 0.2,
        "Re-centering (lam)": 0.75,
        "Pool (folder or named pool)": str(pool),
        "Top-k (0: all)": 2,
        "Reselect every": 3,
        "Weighting": "contrast",
        "Exact every K steps (1: every step; more: gated single pass between, faster)": 1,
        "Negative branch LoRAs (lam < 1; reuse: faster)": "evaluate",  # absent: every LoRA ran it
    }
