"""The llama-cpp-python requirement, read from [project].dependencies in pyproject.toml (the one
place the version is written). No third-party imports: the tests read it too."""
from __future__ import annotations

import re
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]


def llama_requirement(pyproject: Path = Path("pyproject.toml")) -> str:
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    for dep in project["dependencies"]:
        if re.match(r"^llama[-_]cpp[-_]python\s*==", dep):
            return dep.split(";")[0].split("#")[0].strip()
    raise RuntimeError("pyproject.toml must pin llama-cpp-python with '==' in [project].dependencies")
