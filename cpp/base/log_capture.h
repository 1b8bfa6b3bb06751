// Native log sink for llama.cpp and ggml. llama_cpp installs a Python (ctypes) logger at
// import; replacing it keeps Python out of everything llama.cpp does on our threads, and keeps
// the last error lines so exceptions can say what llama.cpp reported.
#pragma once
#include <string>

namespace neurotap {

// Installs the native logger (idempotent). verbose=true forwards everything to stderr.
void install_log_capture(bool verbose);

// Error and warning lines logged since the last call, joined; clears them.
std::string take_logged_errors();

}  // namespace neurotap
