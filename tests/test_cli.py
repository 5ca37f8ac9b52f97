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


def test_every_third_party_module_the_core_imports_is_a_declared_dependency():
    """A fresh `pip install -e .` must bring everything `loratorio demo` and the core import
    (the demo once failed on a fresh machine for want of pillow). The optional integrations
    import their framework lazily and are declared as extras."""
    import ast
    import re
    from importlib.metadata import requires
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    # The installed package's requirements as pyproject.toml declares them; extras carry a marker.
    declared = [r for r in requires("loratorio") or [] if ";" not in r]
    names = {re.split(r"[<>=!~ \[]", r, maxsplit=1)[0].lower() for r in declared}
    distribution = {"PIL": "pillow"}  # import name -> distribution name where they differ
    stdlib = set(sys.stdlib_module_names)
    imported = set()
    for path in (root / "loratorio_core").rglob("*.py"):
        if "integrations" in path.parts:
            continue
        tree = ast.parse(path.read_text())
        # An import guarded by `except ImportError` has a fallback: optional, not a dependency.
        optional = {
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.Try)
            and any(ast.unparse(h.type or ast.Name("")).endswith("ImportError") for h in node.handlers)
            for stmt in node.body
            for inner in ast.walk(stmt)
        }
        for node in ast.walk(tree):
            if id(node) in optional:
                continue
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {m for m in imported if m not in stdlib and m != "loratorio_core"}
    missing = {distribution.get(m, m).lower() for m in third_party} - names
    assert not missing, f"imported by loratorio_core but not in pyproject's dependencies: {missing}"
    # torch converts to and from numpy arrays; without numpy it warns at import and .numpy() fails.
    assert "numpy" in names
