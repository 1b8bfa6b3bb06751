"""The type stubs of the native module (python/neurotap/_native.pyi) name what the module has."""
import ast
from pathlib import Path

from neurotap import _native

STUB = Path(__file__).resolve().parents[1] / "python" / "neurotap" / "_native.pyi"


def _stub_names():
    tree = ast.parse(STUB.read_text(encoding="utf-8"))
    top, members = set(), {}
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            top.add(node.name)
        if isinstance(node, ast.ClassDef):
            members[node.name] = {n.name for n in node.body if isinstance(n, ast.FunctionDef)} | {
                n.target.id for n in node.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    return top, members


def test_stubs_match_the_native_module():
    top, members = _stub_names()
    public = {n for n in dir(_native) if not n.startswith("_")}
    assert top == public, f"regenerate _native.pyi (see its header): missing {public - top}, stale {top - public}"
    for cls, names in members.items():
        if issubclass(getattr(_native, cls), BaseException):
            continue  # exception classes carry only what Python's exceptions have
        have = {n for n in dir(getattr(_native, cls)) if not n.startswith("_")} | {"__init__"}
        names = {n for n in names if not n.startswith("_")} | {"__init__"}  # dunders (__len__, ...) are Python's
        assert names - {"__init__"} <= have, f"{cls}: stale in the stub: {names - have}"
        assert {n for n in have if n != "__init__"} <= names, f"{cls}: missing from the stub: {have - names}"
