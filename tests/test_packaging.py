"""Flower's own `flwr run .` installs the app with `uv sync`, which resolves the project for
every Python version that `requires-python` admits: each must be one Flower supports."""

import tomllib
from importlib.metadata import metadata
from pathlib import Path

from packaging.specifiers import SpecifierSet

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_every_python_the_app_admits_is_one_flower_supports():
    ours = SpecifierSet(tomllib.loads(PYPROJECT.read_text())["project"]["requires-python"])
    flowers = SpecifierSet(metadata("flwr")["Requires-Python"])
    admitted = [f"3.{minor}" for minor in range(8, 20) if f"3.{minor}" in ours]
    assert admitted, "requires-python admits no Python 3 version"
    assert [v for v in admitted if v not in flowers] == [], f"flwr requires {flowers}"
