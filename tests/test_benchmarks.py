"""The benchmark scripts still run (smoke runs at tiny sizes; their figures are not judged here)."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str):
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))  # as when a benchmark runs: its folder is on sys.path
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_core_prints_its_table(capsys):
    load("bench_core").main(
        ["--device", "cpu", "--repeats", "1", "--latents", "16", "--batches", "2", "--loras", "2", "3"]
    )
    out = capsys.readouterr().out
    assert "core/step" in out and "worst core/step" in out
    assert len([line for line in out.splitlines() if line.startswith("tiny")]) == 2


def test_bench_step_prints_image_times_and_ends_with_the_fast_to_merge_ratios(capsys):
    load("bench_step").main(
        [
            "--device",
            "cpu",
            "--repeats",
            "1",
            "--loras",
            "1",
            "3",
            "--latent",
            "8",
            "--steps",
            "5",  # the gated default's first gated step is step 4
            "--per-step",
        ]
        + ["--skip-diffusers"]
    )
    out = capsys.readouterr().out
    assert "fast/mg" in out and "ours/floor" in out and "gstep/mg" in out
    lines = out.strip().splitlines()
    # the gated step's own cost is measured (a number, not nan) on every LoRA count
    # (N, 4 image times, 3 ratios, gstep/mg, gather ms, slices ms, GiB)
    rows = [line.split() for line in lines if line.split()[:1] in (["1"], ["3"]) and len(line.split()) == 12]
    assert len(rows) == 2 and all(float(row[8]) > 0 for row in rows)
    assert lines[-1].startswith("N=3 fast/merge ") and float(lines[-1].split()[-1]) > 0


def test_selection_prints_every_candidate_for_both_benchmarks(capsys):
    selection = load("selection")
    selection.main(["--limit", "2", "--steps", "1"])
    out = capsys.readouterr().out
    rows = {line.split(" |")[0].strip() for line in out.splitlines() if " | " in line}
    assert set(selection.CANDIDATES) <= rows
    assert "composlora" in out and "pixelworld" in out and "took" in out


def test_sweep_only_takes_rules_and_temperatures_and_names_a_bad_one():
    sweep = load("sweep")
    assert sweep.parse_only("power:5, contrast:1.5,contrast:3") == {"power": (5.0,), "contrast": (1.5, 3.0)}
    with pytest.raises(SystemExit, match="'sharp:3'.*weighting must be one of"):
        sweep.parse_only("sharp:3")
    with pytest.raises(SystemExit, match="'contrast:-1'.*temperature must be"):
        sweep.parse_only("contrast:-1")
