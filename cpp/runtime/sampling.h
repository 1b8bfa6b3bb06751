// Token choice shared by every decode: llama.cpp's sampler chain, stop strings, per-sample seeds,
// and the progress/cancel flags another thread (a Python progress bar) watches.
#pragma once
#include <atomic>
#include <cstdint>
#include <functional>
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
    // Added to these tokens' logits before any other sampler (OpenAI's logit_bias); token ids are
    // checked against the vocabulary when the chain is built.
    std::vector<llama_logit_bias> logit_bias;
    void validate() const;     // ParamError naming the value out of range
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
    // Asked between decode steps (never inside llama.cpp): true stops the loop as cancel does.
    // The Python binding checks for a pending Ctrl-C here, so that native work can run on the
    // caller's own thread (OpenMP's thread team is per calling thread: switching threads halves
    // decode speed) and still stop within one step.
    std::function<bool()> should_stop;
    bool stop_requested() { return cancel.load(std::memory_order_relaxed) || (should_stop && should_stop()); }
};

}  // namespace neurotap
