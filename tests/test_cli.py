"""The ``loratorio`` command and the package's boundaries."""

import subprocess
import sys

from loratorio_core.cli import main


def test_demo_composes_three_shipped_loras_and_writes_its_picture(tmp_path, capsys):
    out_file = tmp_path / "demo.png"
    assert main(["demo", "--out", str(out_file), "--seeds", "2"]) == 0
    out = capsys.readouterr().out
    assert str(out_file) in out and out_file.stat().st_size > 0
    for method in ("base", "merge", "composite", "LoRAtorio"):
        assert f"  {method} " in out
    assert "kiro" in out and "checka" in out and "pipa" in out
    from PIL import Image

    assert Image.open(out_file).size == (4 * 128, 2 * (128 + 16))


def test_bad_setting_exits_nonzero_with_one_clear_line(capsys):
    assert main(["demo", "--temperature", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("loratorio: temperature") and "\n" not in err


def test_core_imports_no_host_framework():
    code = (
        "import sys, loratorio_core, loratorio_core.cli\n"
        "bad = [m for m in ('modules', 'gradio', 'diffusers', 'backend', 'ldm_patched', 'transformers')"
        " if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
