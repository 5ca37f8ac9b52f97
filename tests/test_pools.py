"""Named pools are user data: they live in the WebUI's data folder and survive updates of the
extension (the WebUI's updater runs git fetch + reset --hard in the extension's folder)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# What an update touches: the pools code, the committed legacy pools file, the ignore rules.
SHIPPED = ("extension/__init__.py", "extension/pools.py", "pools.json", ".gitignore")
GIT_ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.com",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.com",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
}


def git(cwd: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, env=GIT_ENV, capture_output=True, text=True)
    assert done.returncode == 0, f"git {' '.join(args)}: {done.stderr}"
    return done.stdout


def commit_files(repo: Path, message: str, files: dict[str, str]) -> None:
    for name, text in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text, encoding="utf-8")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)


def shipped_files() -> dict[str, str]:
    return {name: (ROOT / name).read_text(encoding="utf-8") for name in SHIPPED}


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """The WebUI's data folder, as ``modules.paths_internal.data_path`` gives it."""
    data = tmp_path / "webui-data"
    modules = types.ModuleType("modules")
    modules.paths_internal = types.SimpleNamespace(data_path=str(data))
    monkeypatch.setitem(sys.modules, "modules", modules)
    monkeypatch.setitem(sys.modules, "modules.paths_internal", modules.paths_internal)
    return data


def load_pools(extension_folder: Path):
    """The pools module of an installed copy of the extension, as the WebUI would load it."""
    path = extension_folder / "extension" / "pools.py"
    spec = importlib.util.spec_from_file_location(f"pools_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def clean(repo: Path) -> bool:
    return git(repo, "status", "--porcelain") == ""


@pytest.mark.parametrize("update", ["reset --hard", "pull"])
def test_pools_saved_in_the_tab_survive_an_update_of_the_extension(tmp_path, data_dir, update):
    upstream = tmp_path / "upstream"
    upstream.mkdir()
    git(upstream, "init", "-q")
    commit_files(upstream, "this version", shipped_files())
    installed = tmp_path / "extensions" / "loratorio"
    git(tmp_path, "clone", "-q", str(upstream), str(installed))  # Extensions > Install from URL

    load_pools(installed).save_pool("knights", ["l0", "l1"])
    assert clean(installed)  # nothing the user saved is in the extension's tracked tree

    commit_files(upstream, "a newer version", {"NEWS": "newer\n"})
    if update == "reset --hard":  # A1111's and Forge's extension updater
        git(installed, "fetch", "--all", "-q")
        git(installed, "reset", "--hard", "-q", "origin/HEAD")
    else:
        git(installed, "pull", "-q")
    assert (installed / "NEWS").is_file()
    assert load_pools(installed).read_pools() == {"knights": ["l0", "l1"]}
    assert (data_dir / "loratorio" / "pools.json").is_file()


def test_pools_an_older_version_saved_in_the_extension_folder_move_to_the_data_folder_once(
    tmp_path, data_dir, capsys
):
    upstream = tmp_path / "upstream"
    upstream.mkdir()
    git(upstream, "init", "-q")
    older = shipped_files()
    older["extension/pools.py"] = "# the older version wrote the repository's pools.json\n"
    commit_files(upstream, "an older version", older)
    installed = tmp_path / "extensions" / "loratorio"
    git(tmp_path, "clone", "-q", str(upstream), str(installed))
    saved = {"knights": ["l0", "l1"], "styles": ["l2"]}
    (installed / "pools.json").write_text(json.dumps(saved), encoding="utf-8")  # what it saved

    commit_files(upstream, "this version", shipped_files())
    git(installed, "pull", "-q")  # the committed pools.json did not change: the user's copy stays

    pools = load_pools(installed)
    assert pools.read_pools() == saved
    assert "moved 2 saved pool(s)" in capsys.readouterr().err
    assert clean(installed)  # the legacy file is back to its committed content
    assert json.loads((data_dir / "loratorio" / "pools.json").read_text()) == saved
    pools.save_pool("styles", [])  # deleted in the tab: the legacy copy must not bring it back
    assert load_pools(installed).read_pools() == {"knights": ["l0", "l1"]}


def test_a_pool_saved_in_the_data_folder_wins_over_a_legacy_one_of_the_same_name(tmp_path):
    from extension import pools

    legacy, target = tmp_path / "legacy.json", tmp_path / "data" / "pools.json"
    legacy.write_text(json.dumps({"knights": ["old"], "styles": ["l2"]}), encoding="utf-8")
    pools.save_pool("knights", ["new"], target)
    pools.migrate_legacy(target, legacy)
    assert pools.read_pools(target) == {"knights": ["new"], "styles": ["l2"]}
    assert legacy.read_text() == pools.LEGACY_CONTENT


def test_a_broken_pools_file_is_a_clear_error_naming_it(tmp_path):
    from extension import pools

    broken = tmp_path / "pools.json"
    broken.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=f"{broken}: not a valid pools file .*fix or delete it"):
        pools.read_pools(broken)
    with pytest.raises(ValueError, match="fix or delete it"):
        pools.migrate_legacy(tmp_path / "data" / "pools.json", broken)
    assert not (tmp_path / "data").exists()


def test_the_committed_legacy_file_is_what_migration_writes_back():
    from extension import pools

    assert (ROOT / "pools.json").read_text(encoding="utf-8") == pools.LEGACY_CONTENT
