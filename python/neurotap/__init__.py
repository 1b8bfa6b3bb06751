"""neurotap: watch the FFN neurons of quantized GGUF models while llama.cpp generates."""
from .errors import ContextError, ModelError, ModelNotInstalledError, NativeError
from .model import Generation, Model, ModelInfo, load, tap
from .registry import default_model, known_models, resolve
from .sampling import Sample, SampleRun

__version__ = "0.1.0"

__all__ = [
    "load", "tap", "Model", "Sample", "SampleRun", "ModelInfo", "Generation", "resolve", "known_models", "default_model",
    "ModelError", "ContextError", "NativeError", "ModelNotInstalledError",
]
