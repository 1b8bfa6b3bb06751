// Token choice shared by every decode: llama.cpp's sampler chain, stop strings, per-sample seeds,
// and the progress/cancel flags another thread (a Python progress bar) watches.
#pragma once
#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "llama.h"

namespace neurotap {

struct SamplingParams {
    float temperature = 0.8f;  // <= 0: greedy
    float top_p = 0.95f;
    int top_k = 40;            // 0: off
    float min_p = 0.0f;
    uint32_t seed = 0;
    bool ignore_eos = false;   // ban end-of-generation tokens (fixed-length runs, benchmarks)
};

// Builds llama.cpp's sampler chain; validates the parameters (ParamError).
llama_sampler* make_sampler_chain(const SamplingParams& p, const llama_vocab* vocab);

// Position of the earliest stop string that a piece appended at text[from:] completed, or npos.
size_t find_stop(const std::string& text, size_t from, const std::vector<std::string>& stops);

// Seed of sample `index` of a run: reproducible from (seed, index), distinct across indices.
uint32_t sample_seed(uint32_t seed, int index);

// Progress and cancellation shared with another thread.
struct Progress {
    std::atomic<int64_t> tokens{0};
    std::atomic<int> live{0};  // sequences still generating
    std::atomic<bool> cancel{false};
};

}  // namespace neurotap
