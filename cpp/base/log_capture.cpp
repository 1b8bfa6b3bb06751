#include "base/log_capture.h"

#include <cstdio>
#include <deque>
#include <mutex>

#include "llama.h"

namespace neurotap {
namespace {

std::mutex g_mu;
std::deque<std::string> g_lines;
std::string g_partial;
bool g_verbose = false;
ggml_log_level g_last_level = GGML_LOG_LEVEL_INFO;

void log_cb(ggml_log_level level, const char* text, void*) {
    if (level == GGML_LOG_LEVEL_CONT) level = g_last_level;
    g_last_level = level;
    if (g_verbose) std::fputs(text, stderr);
    if (level != GGML_LOG_LEVEL_ERROR && level != GGML_LOG_LEVEL_WARN) return;
    std::lock_guard<std::mutex> lock(g_mu);
    g_partial += text;
    size_t nl;
    while ((nl = g_partial.find('\n')) != std::string::npos) {
        g_lines.push_back(g_partial.substr(0, nl));
        g_partial.erase(0, nl + 1);
        if (g_lines.size() > 16) g_lines.pop_front();  // bounded: only the recent context matters
    }
}

}  // namespace

void install_log_capture(bool verbose) {
    g_verbose = verbose;
    llama_log_set(log_cb, nullptr);
}

std::string take_logged_errors() {
    std::lock_guard<std::mutex> lock(g_mu);
    std::string out;
    for (auto& l : g_lines) {
        if (!out.empty()) out += "; ";
        out += l;
    }
    if (!g_partial.empty()) out += (out.empty() ? "" : "; ") + g_partial;
    g_lines.clear();
    g_partial.clear();
    return out;
}

}  // namespace neurotap
