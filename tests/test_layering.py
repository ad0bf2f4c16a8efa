"""The package's import layering (README's layout, ``../shared/DESIGN.md``): imports only point
down, and no two parts of the package import each other. Every import counts, function-level ones
included (they are how an upward dependency usually hides). tools/, bench/ and slurm/ are entry
points outside the package and may import anything."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_vlm"

# Floors, bottom first: a module may import its own part and the floors below, never a neighbour
# on its own floor nor anything above. ``train`` is the ``python -m megatron_vlm.train`` entry point.
LAYERS: tuple[frozenset[str], ...] = (
    frozenset({"config", "backend"}),
    frozenset({"distributed"}),
    frozenset({"backbones", "data"}),
    frozenset({"models"}),
    frozenset({"inference"}),
    frozenset({"perf"}),
    frozenset({"evaluation"}),
    frozenset({"training", "conversion"}),
    frozenset({"train"}),
)
FLOOR = {part: floor for floor, parts in enumerate(LAYERS) for part in parts}


def module_name(path: Path, package: Path) -> str:
    names = list(path.relative_to(package.parent).with_suffix("").parts)
    if names[-1] == "__init__":
        names.pop()
    return ".".join(names)


def part_of(module: str) -> str | None:
    """``megatron_vlm.models.lora`` -> ``models``; None outside the package and for the package itself."""
    names = module.split(".")
    return names[1] if names[0] == "megatron_vlm" and len(names) > 1 else None


def imported_modules(path: Path, package: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in a file: top-level or in a function, relative ones
    resolved, and ``importlib.import_module`` of a literal name."""
    name = module_name(path, package)
    parent = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = parent[: len(parent) - node.level + 1] if node.level else []
            source = ".".join(base + ([node.module] if node.module else []))
            if source == "megatron_vlm":  # ``from megatron_vlm import distributed``: the parts named
                found += [(node.lineno, f"{source}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, source))
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def cross_part_imports(package: Path = PACKAGE) -> dict[tuple[str, str], list[str]]:
    """(importer part, imported part) -> where, for every import from one part into another."""
    edges: dict[tuple[str, str], list[str]] = {}
    for path in sorted(package.rglob("*.py")):
        importer = part_of(module_name(path, package))
        for line, module in imported_modules(path, package):
            imported = part_of(module)
            if importer and imported and imported != importer:
                where = f"{path.relative_to(package.parent)}:{line} {module}"
                edges.setdefault((importer, imported), []).append(where)
    return edges


def test_every_part_has_a_floor():
    parts = {part_of(module_name(path, PACKAGE)) for path in PACKAGE.rglob("*.py")} - {None}
    assert {"config", "data", "models", "training", "conversion"} <= parts  # the walk found the package
    assert parts <= set(FLOOR), f"parts without a floor in LAYERS: {sorted(parts - set(FLOOR))}"


def test_imports_only_point_down():
    upward = [
        f"{importer} (floor {FLOOR[importer]}) -> {imported} (floor {FLOOR[imported]}): {where}"
        for (importer, imported), places in sorted(cross_part_imports().items())
        if FLOOR.get(imported, -1) >= FLOOR.get(importer, -1)
        for where in places
    ]
    assert not upward, "imports that do not point down:\n  " + "\n  ".join(upward)


def test_no_two_parts_import_each_other():
    edges = cross_part_imports()
    both_ways = sorted({tuple(sorted(pair)) for pair in edges if pair[::-1] in edges})
    assert not both_ways, "parts importing each other: " + ", ".join(f"{a} <-> {b}" for a, b in both_ways)


def test_the_walk_sees_function_level_and_relative_imports(tmp_path):
    package = tmp_path / "megatron_vlm"
    (package / "data").mkdir(parents=True)
    (package / "data" / "__init__.py").write_text("from . import batch\n")
    (package / "data" / "batch.py").write_text(
        "import importlib\n\n\ndef build():\n    from megatron_vlm.training.step import train_step\n"
        "    importlib.import_module('megatron_vlm.perf.flops')\n\n\nfrom ..models import lora\n"
    )
    edges = cross_part_imports(package)
    assert edges == {
        ("data", "training"): ["megatron_vlm/data/batch.py:5 megatron_vlm.training.step"],
        ("data", "perf"): ["megatron_vlm/data/batch.py:6 megatron_vlm.perf.flops"],
        ("data", "models"): ["megatron_vlm/data/batch.py:9 megatron_vlm.models"],
    }
