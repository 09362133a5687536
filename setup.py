"""Package discovery for the wheel; pyproject.toml holds everything else.

Every package under zoo/ ships, and plugins/ ships as zoo.plugins with its data folders
(the embedded hub, the variant configs), all found on disk rather than listed, so a new
subpackage or data folder cannot be left out. MANIFEST.in grafts the non-Python files.
"""

from setuptools import find_namespace_packages, setup


def packages(where: str, name: str) -> list[str]:
    """`name` and every folder below `where`, as importable package names under `name`."""
    found = find_namespace_packages(where, exclude=["__pycache__", "*.__pycache__"])
    return [name, *(f"{name}.{sub}" for sub in found)]


setup(
    packages=packages("zoo", "zoo") + packages("plugins", "zoo.plugins"),
    package_dir={"zoo": "zoo", "zoo.plugins": "plugins"},
)
