"""neurotap: watch the FFN neurons of quantized GGUF models while llama.cpp generates.

The package is layered; each layer imports only the ones below it:
    core      exceptions, parameter checks, atomic output, progress     (neurotap.core)
    runtime   models, tokenizing, generation, parallel sampling         (neurotap.runtime)
    scoring   selectors, confidence, answers, statistics, NEX, tasks    (neurotap.scoring)
    methods   NAD, NEAT, NeuReasoner and the selection registry         (neurotap.methods)
    apps      eval, rank-models, quantize, the command line             (neurotap.apps)
This module only gathers the public names.
"""
# First: llama.cpp loaded from llama_cpp's own path, so a process holds one copy (see the module).
from .core import llama_libs  # noqa: F401  isort: skip
from .core.errors import ContextError, ModelError, ModelNotInstalledError, NativeError
from .methods import nad, neat, neureasoner, selection
from .runtime.model import Generation, Model, ModelInfo, devices, load, tap
from .runtime.registry import default_model, known_models, resolve
from .runtime.sampling import ActivationCache, Sample, SampleRun
from .scoring import nex

__version__ = "0.1.0"

__all__ = [
    "load", "tap", "devices", "Model", "Sample", "SampleRun", "ModelInfo", "Generation", "ActivationCache", "resolve",
    "known_models", "default_model", "ModelError", "ContextError", "NativeError", "ModelNotInstalledError",
    "nad", "neat", "neureasoner", "nex", "selection",
]
