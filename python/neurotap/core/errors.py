"""The exceptions neurotap raises. Each names the problem and, where there is one, the fix."""
from __future__ import annotations

from .. import _native

#: The model file is not a usable GGUF (corrupt, truncated, unsupported architecture). A ValueError.
ModelError = _native.ModelError
#: The request does not fit the context (prompt plus max_tokens beyond n_ctx). A ValueError.
ContextError = _native.ContextError
#: llama.cpp failed, or the tap saw data it cannot interpret. A RuntimeError.
NativeError = _native.NativeError


class ModelNotInstalledError(ModuleNotFoundError):
    """A known model name whose weights package is not installed; the message has the pip command."""


__all__ = ["ModelError", "ContextError", "NativeError", "ModelNotInstalledError"]
