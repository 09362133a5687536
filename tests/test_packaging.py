"""The wheel a user installs holds every package and data file of the source tree.

The wheel under test is ``$ZOO_WHEEL`` when set (CI passes the one it installs and smokes),
otherwise one built here from the source tree.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# source folder -> where its files land in the wheel
INSTALLED_AS = {"zoo": "zoo", "plugins": "zoo/plugins"}
BUILD_INPUTS = ["pyproject.toml", "setup.py", "MANIFEST.in", "README.md", *INSTALLED_AS]


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    given = os.environ.get("ZOO_WHEEL")
    if given:
        wheel = Path(given)
    else:
        src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
        for name in BUILD_INPUTS:  # a copy, so that no stale build/ folder of the checkout leaks in
            copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
            copy(REPO / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}))
        subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                        "--quiet", "--wheel-dir", str(out)], check=True, cwd=out)
        (wheel,) = out.glob("hybridnorm_zoo-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        return set(zf.namelist())


def source_files(pattern: str = "*") -> dict[str, Path]:
    """Files under zoo/ and plugins/ matching `pattern`, keyed by their path inside the wheel."""
    found = {}
    for folder, installed in INSTALLED_AS.items():
        for path in (REPO / folder).rglob(pattern):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                found[f"{installed}/{path.relative_to(REPO / folder).as_posix()}"] = path
    return found


def test_every_package_is_in_the_wheel(wheel_names: set[str]) -> None:
    inits = source_files("__init__.py")
    assert {"zoo/__init__.py", "zoo/moe/__init__.py", "zoo/plugins/__init__.py"} <= set(inits)
    missing = sorted(set(inits) - wheel_names)
    assert not missing, f"packages missing from the wheel: {missing}"


def test_every_module_and_data_file_is_in_the_wheel(wheel_names: set[str]) -> None:
    files = source_files()
    assert "zoo/plugins/hub/index.json" in files and "zoo/plugins/variant_configs/tiny-dense.yaml" in files
    missing = sorted(set(files) - wheel_names)
    assert not missing, f"files missing from the wheel: {missing}"


def test_the_wheel_installs_only_zoo(wheel_names: set[str]) -> None:
    """Nothing lands at the top of site-packages but zoo/ (no stray `plugins` or `tests` package)."""
    tops = {name.split("/")[0] for name in wheel_names if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"zoo"}
