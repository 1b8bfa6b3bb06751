"""Loads llama-cpp-python's libllama by the path `import llama_cpp` opens, before the native module.

llama-cpp-python ships libllama.so and libllama.so.0 as two files, not a link. The native module
needs "libllama.so.0" (found through its run path); llama_cpp opens ".../lib/libllama.so" by
path. Whichever comes second, the dynamic loader sees a different file, so `import neurotap`
before `import llama_cpp` would map two llama.cpp runtimes. Opened first by llama_cpp's path, its
soname (libllama.so.0) then satisfies the module's dependency: one copy in either order. Nothing
of llama_cpp's Python is imported (find_spec only locates the package)."""
import ctypes
import importlib.util
import os
import sys


def preload() -> None:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return  # the native module's import then fails with the loader's own message
    name = {"darwin": "libllama.dylib", "win32": "llama.dll"}.get(sys.platform, "libllama.so")
    path = os.path.join(os.path.dirname(spec.origin), "lib", name)
    if os.path.exists(path):
        ctypes.CDLL(path)


preload()
