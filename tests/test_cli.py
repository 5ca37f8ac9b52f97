"""The ``loratorio`` command and the package's boundaries."""

import subprocess
import sys

from loratorio_core.cli import main


def test_demo_prints_rows_per_mode_and_finds_each_loras_region(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "loratorio (lam=0.5)  8" in out and "loratorio (lam=1)    5" in out
    share = int(out.split("most of them: ")[1].split("%")[0])
    assert share >= 90


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
