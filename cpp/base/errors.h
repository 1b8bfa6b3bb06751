// Exception types of the native core. bindings.cpp maps each to a Python exception class.
#pragma once
#include <stdexcept>
#include <string>

namespace neurotap {

// The model file is missing, not GGUF, truncated, or of an unsupported architecture.
struct ModelError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// A parameter is impossible (max_tokens <= 0, top_p outside (0, 1], ...).
struct ParamError : std::invalid_argument {
    using std::invalid_argument::invalid_argument;
};

// The request does not fit the context's KV cells.
struct ContextError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// llama.cpp failed at run time, or the tap saw something it cannot interpret.
struct RuntimeError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

}  // namespace neurotap
