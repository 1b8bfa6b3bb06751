"""Quantization variants of one GGUF model, through llama.cpp's own quantizer (the C API that
llama-cpp-python exposes): what a user needs before ranking variants with NEX."""
from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import List, Optional

from ..core.io import atomic_path
from ..runtime.registry import check_gguf, resolve


def quant_types() -> List[str]:
    import llama_cpp

    return sorted(n[len("LLAMA_FTYPE_MOSTLY_"):] for n in dir(llama_cpp) if n.startswith("LLAMA_FTYPE_MOSTLY_"))


def quantize(model: str, out: os.PathLike, qtype: str, *, threads: Optional[int] = None) -> Path:
    """Write `model` (a known name or .gguf path) re-quantized to `qtype` (e.g. Q8_0, Q4_K_M) to `out`.

    Requantizing an already quantized file is allowed (llama.cpp warns that quality suffers more
    than quantizing from f16): with only the Q4_1 default model at hand it is how variants are made.
    The output appears only when complete (written to a temporary file, then renamed).
    """
    import llama_cpp

    src = Path(resolve(model))
    check_gguf(src)  # validates the input before llama.cpp sees it
    name = qtype.upper()
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}", None)
    if ftype is None:
        raise ValueError(f"unknown quantization type {qtype!r}; available: {', '.join(quant_types())}")
    out = Path(out)
    if out.resolve() == src.resolve():
        raise ValueError("the output would overwrite the input model")
    out.parent.mkdir(parents=True, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    params.nthread = int(threads or 0)
    with atomic_path(out) as tmp:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise RuntimeError(f"llama.cpp failed to quantize {src} to {name} (code {rc})")
        check_gguf(tmp)
    return out
