"""The house's rules, checked: dependencies run one way (import-linter), imports of the zoo's own
modules sit at the top of their files, and docs/architecture.md and README's Layout map every module."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import tomllib
from importlinter.cli import lint_imports

REPO = Path(__file__).resolve().parents[1]
ZOO = REPO / "zoo"
ARCHITECTURE = (REPO / "docs" / "architecture.md").read_text()


def test_import_linter_contracts_hold():
    """The layers contract (every module listed, no ignore_imports) and no cycles inside any package."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    contracts = config["contracts"]
    assert {c["type"] for c in contracts} == {"layers", "acyclic_siblings"}
    assert not any("ignore_imports" in c for c in contracts)
    layers = next(c for c in contracts if c["type"] == "layers")
    assert layers["exhaustive"] is True and layers["layers"][-1].startswith("errors")
    assert lint_imports(config_filename=str(REPO / "pyproject.toml")) == 0


def _function_level_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and (inner.level > 0 or (inner.module or "").startswith("zoo")):
                    found.append(f"{path.relative_to(REPO)}:{inner.lineno} from {'.' * inner.level}{inner.module or ''}")
    return found


def test_the_zoo_imports_its_own_modules_at_the_top():
    """No hidden dependency: a module's imports of the zoo are at its top, where the linter and a reader see
    them. Only the CLI imports per subcommand, so that `zoo list` does not load the trainer."""
    hidden = [hit for path in sorted(ZOO.rglob("*.py")) if path.name != "cli.py" for hit in _function_level_imports(path)]
    assert hidden == []


def _modules() -> list[str]:
    """Every module, a package's ``__init__.py`` standing for its folder (the top one is the public API)."""
    return sorted(p.relative_to(REPO).as_posix() for folder in ("zoo", "plugins") for p in (REPO / folder).rglob("*.py")
                  if "__pycache__" not in p.parts and (p.name != "__init__.py" or p.parent == ZOO))


def test_docs_architecture_maps_every_module():
    """Every module of zoo/ and plugins/ has its line in the map (a module's file name, under its folder)."""
    tree = ARCHITECTURE[ARCHITECTURE.index("## Layout"):]
    tree = tree[:tree.index("\n## ", 3)]
    missing = []
    for module in _modules():
        folder, name = module.rsplit("/", 1)
        section = re.search(rf"^ *{re.escape(folder.split('/')[-1])}/.*?(?=^ {{0,2}}\S+/|\Z)", tree, re.M | re.S)
        if section is None or not re.search(rf"(?<![\w.]){re.escape(name)}", section.group(0)):
            missing.append(module)
    assert missing == []


def test_readme_layout_names_every_package():
    readme = (REPO / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    packages = sorted(p.parent.name for p in ZOO.rglob("__init__.py"))
    folders = [*packages, "plugins", "tests", "benchmarks", "docs", "model_cards"]
    assert [f for f in folders if not re.search(rf"^ *{f}/ ", layout, re.M)] == []
