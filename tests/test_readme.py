"""The README's Python examples run as written."""
import re
from pathlib import Path

import zoo

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python examples"
    try:
        for block in blocks:
            exec(compile(block, str(README), "exec"), {})
    finally:
        if "my-norms" in {p.name for p in zoo.registry.REGISTRY.plugins()}:
            zoo.unregister_plugin("my-norms")


def test_readme_quickstart_uses_the_ci_test_command():
    ci = (README.parent / ".ci" / "run").read_text()
    assert "pip install torch==2.13.0 -e '.[test]' && python -m pytest" in README.read_text()
    assert "torch==2.13.0" in ci and "-e '.[test]'" in ci and "run_pytest\n" in ci
