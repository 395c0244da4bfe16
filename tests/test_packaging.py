"""The distribution: its own PyPI name, one version, and the entry points that `calm`, `calm-lm-eval`
and lm-eval's plugin discovery use."""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path

import pytest

import calm

ROOT = Path(__file__).resolve().parents[1]


def test_distribution_name_and_single_sourced_version() -> None:
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "calm-lm"  # "calm" on PyPI is an unrelated package
    assert "version" not in project and "version" in project["dynamic"]
    assert md.version("calm-lm") == calm.__version__


def test_entry_points_resolve() -> None:
    scripts = {e.name: e for e in md.entry_points(group="console_scripts") if e.dist.name == "calm-lm"}
    assert scripts["calm"].value == "calm.cli:main"
    assert scripts["calm-lm-eval"].value == "calm.interop.lm_eval:main"
    plugins = {e.name: e.value for e in md.entry_points(group="lm_eval.models")}
    assert plugins["calm"] == "calm.interop.lm_eval:CALMLM"
    assert callable(scripts["calm"].load())
