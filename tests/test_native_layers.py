"""The native core stands in layers: cpp/<layer>/ files include only their own layer and those below
(base, kernels, weights, runtime, reducers, methods, run); bindings.cpp, the C API (capi/) and the
native tests sit on top. Includes name the layer from cpp/ ("runtime/model.h"), so the layer of every
project include is read from its path; an include of a project header by its bare name is refused too."""
import re
from pathlib import Path

import pytest

CPP = Path(__file__).resolve().parents[1] / "cpp"
LAYERS = ["base", "kernels", "weights", "runtime", "reducers", "methods", "run"]
TOP = {"capi", "tests"}  # above every layer, like bindings.cpp
INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.M)


def rank(rel: str) -> int:
    """Layer rank of a path below cpp/ ("runtime/model.h" -> 3); the top for bindings.cpp, capi/, tests/."""
    head = rel.split("/")[0]
    if "/" not in rel or head in TOP:
        return len(LAYERS)
    if head not in LAYERS:
        raise AssertionError(f"cpp/{rel} is in no layer: put it under one of {LAYERS}")
    return LAYERS.index(head)


def upward_includes(rel: str, source: str):
    """(line, include, why) for every project include of `source` (cpp/<rel>) that a layer forbids."""
    mine = rank(rel)
    for m in INCLUDE.finditer(source):
        target, line = m.group(1), source.count("\n", 0, m.start()) + 1
        if (CPP / target).is_file():
            if rank(target) > mine:
                yield line, target, f"a layer above {LAYERS[mine] if mine < len(LAYERS) else 'the top'}"
        elif (CPP / rel).parent.joinpath(target).is_file() or any(CPP.glob(f"*/{target}")):
            yield line, target, "a project header by its bare name: include it as \"<layer>/<file>\""


SOURCES = sorted(p for p in CPP.rglob("*") if p.suffix in (".h", ".cpp"))


def test_every_source_is_seen():
    assert len(SOURCES) > 30 and any(p.parts[-2] == "runtime" for p in SOURCES)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(CPP)))
def test_includes_only_downward(path):
    rel = path.relative_to(CPP).as_posix()
    bad = list(upward_includes(rel, path.read_text(encoding="utf-8")))
    assert not bad, "\n".join(f"cpp/{rel}:{line} includes {t}: {why}" for line, t, why in bad)


def test_the_checker_sees_upward_includes():
    """The check itself can fail: a runtime header including a method, or a bare name, is refused."""
    assert [t for _, t, _ in upward_includes("runtime/decode_loop.h", '#include "methods/neat.h"\n')] == ["methods/neat.h"]
    assert [t for _, t, _ in upward_includes("runtime/decode_loop.h", '#include "neat.h"\n')] == ["neat.h"]
    assert not list(upward_includes("run/run.h", '#include "methods/neat.h"\n#include "llama.h"\n'))
    assert not list(upward_includes("bindings.cpp", '#include "run/run.h"\n'))
