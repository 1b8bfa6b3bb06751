"""In-tree PEP 517 backend: scikit-build-core, plus llama-cpp-python as a build requirement.

The extension compiles against the headers and links the libraries that llama-cpp-python
installs, so the build environment needs exactly the version the package depends on at run
time. That version is read from [project].dependencies so it is written only once.
"""
from __future__ import annotations

from llama_pin import llama_requirement
from scikit_build_core import build as _skb
from scikit_build_core.build import *  # noqa: F401,F403  (re-export the PEP 517 hooks)


def get_requires_for_build_wheel(config_settings=None):
    return [*_skb.get_requires_for_build_wheel(config_settings), llama_requirement()]


def get_requires_for_build_editable(config_settings=None):
    return [*_skb.get_requires_for_build_editable(config_settings), llama_requirement()]
