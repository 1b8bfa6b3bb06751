"""The package's layers import only downward: core, runtime, scoring, methods, apps (each may import
its own layer and those below). Read from the source, imports inside functions included, so a
lazy import cannot hide a cycle."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "neurotap"
LAYERS = ["_native", "core", "runtime", "scoring", "methods", "apps"]
TOP = {"__init__": len(LAYERS), "__main__": len(LAYERS)}  # the facade and `python -m neurotap`


def layer_of(module: str) -> int:
    """Rank of a module path below neurotap ("runtime.model" -> 2)."""
    head = module.split(".")[0]
    if head in TOP:
        return TOP[head]
    if head not in LAYERS:
        raise AssertionError(f"neurotap.{module} is in no layer: put it under one of {LAYERS[1:]}")
    return LAYERS.index(head)


def imports_in(source: str, package: list):
    """(line, imported neurotap module relative to the package) for every import in `source`, a
    module of the sub-package `package` (["runtime"], or [] for the top)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                target = [*base, *(node.module.split(".") if node.module else [])]
                names = [target] if node.module else [[*target, a.name] for a in node.names]
            elif node.module and node.module.split(".")[0] == "neurotap":
                names = [node.module.split(".")[1:] or [a.name for a in node.names][:1]]
            else:
                continue
            for parts in names:
                if parts:
                    yield node.lineno, ".".join(parts)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "neurotap" and "." in a.name:
                    yield node.lineno, a.name.split(".", 1)[1]


MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_only_downward(path):
    rel = path.relative_to(PACKAGE).with_suffix("")
    mine = layer_of(".".join(rel.parts))
    for line, target in imports_in(path.read_text(encoding="utf-8"), list(rel.parts[:-1])):
        theirs = layer_of(target)
        assert theirs <= mine, (f"{rel}.py:{line} imports neurotap.{target} ({LAYERS[theirs] if theirs < len(LAYERS) else 'top'}),"
                                f" a layer above {LAYERS[mine] if mine < len(LAYERS) else 'top'}")


def test_the_checker_sees_upward_imports():
    """The check itself can fail: a lazy import of a method inside the runtime is seen and ranked above."""
    found = list(imports_in("def f():\n    from ..methods import nad\n", ["runtime"]))
    assert found == [(2, "methods")]
    assert layer_of(found[0][1]) > layer_of("runtime.model")
    assert list(imports_in("from .pool import Lease\nimport numpy\n", ["runtime"])) == [(1, "runtime.pool")]
