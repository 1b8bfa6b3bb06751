"""Files shipped with the package (models/registry.json, NEAT calibrations)."""
from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parents[1]


def shipped_file(name: str) -> Path:
    """models/<name> installed next to the package, or in a source checkout the repository's
    models/ folder; the installed location when neither exists (so errors name it)."""
    for cand in (_PACKAGE_DIR / "models" / name, _PACKAGE_DIR.parents[1] / "models" / name):
        if cand.is_file():
            return cand
    return _PACKAGE_DIR / "models" / name
