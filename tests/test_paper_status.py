"""``paper_status.toml`` ships inside the package, so ``vitlab info`` reports status from a wheel install too."""

from __future__ import annotations

import sys
from importlib.resources import files
from pathlib import Path

import vitlab
from vitlab import cli

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_status_file_is_package_data():
    resource = files("vitlab") / "paper_status.toml"
    assert resource.is_file()
    assert Path(str(resource)).parent == Path(vitlab.__file__).resolve().parent
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    assert "paper_status.toml" in package_data["package-data"]["vitlab"]


def test_single_source_of_truth():
    assert not (ROOT / "docs" / "paper_status.toml").exists(), "the status file lives in src/vitlab/ only"


def test_status_found_without_source_tree(monkeypatch, tmp_path):
    # A wheel install: cli.py sits in site-packages with no docs/ folder two levels up.
    monkeypatch.setattr(cli, "__file__", str(tmp_path / "site-packages" / "vitlab" / "cli.py"))
    line = cli._paper_status(0)
    assert not line.startswith("see docs")
    assert line.split(":")[0] in {"works", "partial", "missing"}
