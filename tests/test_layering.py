"""The package's layers: every import between calm's parts points down, never back up.

The layers, bottom first (a part may import the parts of lower layers and its own modules only):

0. ``calm.io``, ``calm.config``: files, strict JSON, configuration values
1. ``calm.models``, ``calm.data``, ``calm.hardware``: pure modules and functions, text and tokens, the
   one place that probes the hardware (none of the three knows the other two)
2. ``calm.extensions``: what we add beyond the paper, built on the paper's models
3. ``calm.checkpoint``: saving and loading models
4. ``calm.generate``: the language-model interface, samplers and the decoding engine
5. ``calm.eval``: BrierLM and the other measures
6. ``calm.train``: the training loop and its stages
7. ``calm.interop``: the authors' checkpoints, serving, lm-evaluation-harness
8. ``calm.experiments``, ``calm.bench``: the demo, sweeps, studies, reports, speed benchmarks
9. ``calm.cli``, then ``calm.__main__``

``calm/__init__.py``, the public API, is the package's face: it may name anything, and no module
of the package imports it (except for ``__version__``).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "calm"

LAYERS: dict[str, int] = {
    "calm.io": 0,
    "calm.config": 0,
    "calm.models": 1,
    "calm.data": 1,
    "calm.hardware": 1,
    "calm.extensions": 2,
    "calm.checkpoint": 3,
    "calm.generate": 4,
    "calm.eval": 5,
    "calm.train": 6,
    "calm.interop": 7,
    "calm.experiments": 8,
    "calm.bench": 8,
    "calm.cli": 9,
    "calm.__main__": 10,
}


def part_of(module: str) -> str:
    """The part (a key of LAYERS) a dotted module name belongs to; ``calm`` for the package face."""
    parts = module.split(".")
    return "calm" if len(parts) == 1 else ".".join(parts[:2])


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, dotted name) of every calm module ``source`` imports, function-local ones included."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # `from calm import checkpoint` names a module of the package
            found += [
                (node.lineno, f"{target}.{a.name}")
                for a in node.names
                if target == "calm" and not a.name.startswith("__")
            ]
    return [(line, name) for line, name in found if name == "calm" or name.startswith("calm.")]


def upward_imports(sources: dict[str, tuple[str, bool]]) -> list[str]:
    """Every import that breaks the layering, as 'module:line imports target (layer a -> layer b)'.

    ``sources`` maps a dotted module name to (its source, whether it is a package's ``__init__``).
    """
    problems = []
    for module, (source, is_package) in sorted(sources.items()):
        here = part_of(module)
        if here == "calm":  # the public API may name anything
            continue
        if here not in LAYERS:
            problems.append(f"{module} belongs to no layer; add {here} to LAYERS in {Path(__file__).name}")
            continue
        for line, target in imported_modules(source, module, is_package):
            there = part_of(target)
            if there == here:
                continue
            if there == "calm":
                if target == "calm":
                    continue  # `from calm import __version__`; `from calm import X` is checked as calm.X
                problems.append(f"{module}:{line} imports the public API {target}; import the module itself")
            elif there not in LAYERS:
                problems.append(f"{module}:{line} imports {target}, which belongs to no layer")
            elif LAYERS[there] >= LAYERS[here]:
                problems.append(
                    f"{module}:{line} imports {target} (layer {LAYERS[here]} -> {LAYERS[there]}): "
                    f"{here} may only use lower layers"
                )
    return problems


def package_sources(root: Path = PACKAGE) -> dict[str, tuple[str, bool]]:
    return {module_name(p, root): (p.read_text(encoding="utf-8"), p.name == "__init__.py") for p in root.rglob("*.py")}


def test_every_import_points_down() -> None:
    problems = upward_imports(package_sources())
    assert not problems, "imports against the layering:\n" + "\n".join(problems)


def test_every_part_of_the_package_has_a_layer() -> None:
    parts = {part_of(m) for m in package_sources()} - {"calm"}
    assert parts == set(LAYERS), (
        f"parts without a layer: {parts - set(LAYERS)}; layers without a part: {set(LAYERS) - parts}"
    )


def test_an_upward_import_is_caught() -> None:
    """The check itself: a model that imports the training loop, a function-local import of the CLI from
    the data layer, and a relative import from generation into evaluation are all reported."""
    sources = package_sources()
    sources["calm.models.calm"] = (
        sources["calm.models.calm"][0] + "\nfrom calm.train.loop import run_training\n",
        False,
    )
    sources["calm.data.shards"] = (sources["calm.data.shards"][0] + "\ndef f():\n    import calm.cli\n", False)
    sources["calm.generate.engine"] = (sources["calm.generate.engine"][0] + "\nfrom ..eval import brier\n", False)
    problems = upward_imports(sources)
    assert any(p.startswith("calm.models.calm:") and "calm.train.loop" in p for p in problems), problems
    assert any(p.startswith("calm.data.shards:") and "calm.cli" in p for p in problems), problems
    assert any(p.startswith("calm.generate.engine:") and "calm.eval" in p for p in problems), problems
    # same layer, different parts: models must not know data
    sources = package_sources()
    sources["calm.models.gpt"] = (
        sources["calm.models.gpt"][0] + "\nfrom calm.data.tokenizer import Tokenizer\n",
        False,
    )
    assert any(p.startswith("calm.models.gpt:") for p in upward_imports(sources))
