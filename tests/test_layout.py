"""The package layout: imports point down the data's journey, no import circle, an explicit registry."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "finetune"
# Top to bottom; a module may import its own package and any package below it, never one above.
# errors.py and console.py sit under all of them; demo/ is the quickstart's, outside the stack.
LAYERS = ["cli", "run", "trainers", "infer", "rl", "train", "models", "data", "recipe"]


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every finetune import in a file, function-level imports included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "finetune":
            if node.module == "finetune":
                found += [(node.lineno, f"finetune.{a.name}") for a in node.names]
            else:
                found += [(node.lineno, node.module + "." + a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "finetune"]
    return found


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PKG.rglob("*.py")}


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """`finetune.a.b.attr` -> the longest prefix that is a module of ours."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        if ".".join(parts[:k]) in modules:
            return ".".join(parts[:k])
    return None


def upward_imports(modules: dict[str, Path]) -> list[str]:
    bad = []
    for name, path in modules.items():
        parts = name.split(".")
        if len(parts) < 3 or parts[1] not in LAYERS:
            continue
        for line, target in imports_of(path):
            tparts = target.split(".")
            if len(tparts) > 1 and tparts[1] in LAYERS and LAYERS.index(tparts[1]) < LAYERS.index(parts[1]):
                bad.append(f"{path.relative_to(PKG.parent)}:{line}: {parts[1]} imports {target}")
    return bad


def test_every_module_is_in_a_stage_package():
    loose = sorted(p.name for p in PKG.glob("*.py"))
    assert loose == ["__init__.py", "__main__.py", "console.py", "errors.py"]
    assert sorted(p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()) == sorted(
        LAYERS + ["demo"])


def test_imports_point_down_the_stack():
    assert upward_imports(all_modules()) == []


def test_the_checker_sees_an_upward_import(tmp_path):
    # The check above can fail: an import from data/ up into train/ is reported.
    fake = tmp_path / "finetune" / "data" / "x.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("def f():\n    from finetune.train.metrics import MetricsLogger\n")
    global PKG
    saved, PKG = PKG, tmp_path / "finetune"
    try:
        assert upward_imports({"finetune.data.x": fake}) == ["finetune/data/x.py:2: data imports "
                                                             "finetune.train.metrics.MetricsLogger"]
    finally:
        PKG = saved


def test_no_import_circle():
    modules = all_modules()
    graph = {name: {t for _, imp in imports_of(path) if (t := resolve(imp, modules)) and t != name
                    and not name.startswith(t + ".")}  # a module importing its own package's __init__
             for name, path in modules.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                pytest.fail("import circle: " + " -> ".join(stack[stack.index(m):] + [m]))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_registry_names_every_trainer_type_and_each_module_trains():
    from finetune.recipe.schema import TRAINER_TYPES
    from finetune.trainers import REGISTRY, get_trainer

    assert sorted(REGISTRY) == sorted(TRAINER_TYPES)
    for name in REGISTRY:
        module = get_trainer(name)
        assert module.__name__ == f"finetune.trainers.{name}"
        assert callable(module.train) and callable(module.plan)
