"""The distribution: its own PyPI name, one version, the entry points that `calm`, `calm-lm-eval` and
lm-eval's plugin discovery use, and a wheel that holds what an installed calm needs to run its main job."""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
import zipfile
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


def test_the_public_api_loads_lazily() -> None:
    """``from calm import load_model, generate_text`` works, and ``import calm`` / ``import calm.config``
    load neither torch nor the rest of the package until a public name is used."""
    code = (
        "import sys\nimport calm, calm.config\n"
        "assert 'torch' not in sys.modules and 'calm.generate' not in sys.modules, sorted(sys.modules)\n"
        "from calm import load_model, generate_text, complete, as_language_model, evaluate_checkpoint, __version__\n"
        "import calm.checkpoint, calm.eval.brier, calm.generate.lm as lm\n"
        "assert load_model is calm.checkpoint.load_model\n"
        "assert evaluate_checkpoint is calm.eval.brier.evaluate_checkpoint\n"
        "assert (generate_text, complete, as_language_model) == (lm.generate_text, lm.complete, lm.as_language_model)\n"
        "assert set(calm.__all__) <= set(dir(calm))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        calm.nothing  # noqa: B018


@pytest.mark.slow
def test_the_wheel_holds_every_subpackage_the_presets_the_eval_set_and_the_licences(tmp_path: Path) -> None:
    """Built from this checkout (setuptools, no network): every package and module of calm, the presets,
    the shipped WikiText-103 test set with its attribution, and the MIT licence; no tests or run folders."""
    pytest.importorskip("setuptools")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("calm_lm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "calm").rglob("*.py")}
    assert sources <= names, sorted(sources - names)
    assert {"calm/configs/autoencoder.yaml", "calm/configs/calm.yaml", "calm/configs/gpt.yaml"} <= names
    assert {"calm/data/wikitext103/test.jsonl.gz", "calm/data/wikitext103/README.md"} <= names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), sorted(n for n in names if "dist-info" in n)
    assert not any(n.startswith(("tests/", "runs/", "benchmarks/")) for n in names)
