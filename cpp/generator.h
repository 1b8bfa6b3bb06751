// Single-sequence generation with the tap: the decode loop, llama.cpp's sampler chain, stop
// strings, and per-token neuron records, all in native code.
#pragma once
#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "neat.h"
#include "tapped_context.h"

namespace neurotap {

enum class CaptureMode : int { None = 0, Float32 = 1, Float16 = 2 };

struct SamplingParams {
    float temperature = 0.8f;  // <= 0: greedy
    float top_p = 0.95f;
    int top_k = 40;            // 0: off
    float min_p = 0.0f;
    uint32_t seed = 0;
    bool ignore_eos = false;   // ban end-of-generation tokens (fixed-length runs, benchmarks)
};

// Position of the earliest stop string that a piece appended at text[from:] completed, or npos.
size_t find_stop(const std::string& text, size_t from, const std::vector<std::string>& stops);

// Builds llama.cpp's sampler chain; validates the parameters (ParamError).
llama_sampler* make_sampler_chain(const SamplingParams& p, const llama_vocab* vocab);

struct GenerateParams {
    int max_tokens = 128;
    SamplingParams sampling;
    std::vector<std::string> stop;
    bool tap = true;                 // false: decode with the tap unarmed (baseline timing)
    CaptureMode capture = CaptureMode::None;
    bool capture_norm = false;       // debug: also keep ffn_norm-<il> rows
    bool capture_residual = false;   // also keep l_out-<il> rows (the residual stream after each layer)
    float active_threshold = 0.0f;   // a neuron is active on a token when its activation > this
    // Teacher forcing: when set, these tokens are fed instead of sampled (max_tokens is their
    // count, and an end-of-generation token among them is kept), so their rows can be read.
    std::vector<llama_token> forced;
    const NeatConfig* neat = nullptr;  // NEAT early exit (needs the tap)
};

struct GenerateResult {
    std::vector<llama_token> prompt_tokens;
    std::vector<llama_token> tokens;  // generated, end-of-generation token excluded
    std::string text;                 // raw bytes (UTF-8 of complete pieces), cut at a stop string
    std::string finish_reason;        // "eos", "length", "stop", "cancelled" or "neat_exit"
    int n_layer = 0;
    int64_t n_ff = 0;
    int64_t n_embd = 0;
    // Per generated token j: the row of the position that predicts token j.
    std::vector<int32_t> active_counts;  // [n_tokens, n_layer]; empty when tap=false
    std::vector<float> acts_f32;         // [n_tokens, n_layer, n_ff] with CaptureMode::Float32
    std::vector<uint16_t> acts_f16;      // same, IEEE half, with CaptureMode::Float16
    std::vector<float> norm_inputs;      // [n_tokens, n_layer, n_embd] with capture_norm
    std::vector<float> residuals;        // [n_tokens, n_layer, n_embd] with capture_residual
    std::vector<NeatEvent> neat_events;  // every NEAT decision taken (line starts), in order
    int neat_exit_at = -1;               // token index where NEAT exited, -1 if it did not
    llama_token eog_token = -1;          // the end-of-generation token that ended it (finish "eos")
    double prompt_seconds = 0;
    double decode_seconds = 0;           // decode steps after the prompt, sampling included
};

// The per-sequence NEAT state shared by single and parallel generation: decides at line starts,
// bans in place, and queues the exit tokens. Returns the token to emit when NEAT forces one.
struct NeatTrack {
    bool line_start = false;
    bool exited = false;
    size_t queued = 0;  // exit tokens already emitted
    int exit_at = -1;
    std::vector<NeatEvent> events;
    // Before token j is sampled: true with *forced set when the token is NEAT's, not the sampler's.
    bool before_sample(const NeatMonitor& mon, int sample, int j, float* logits, llama_token* forced);
};

// Progress and cancellation shared with another thread (the Python progress bar).
struct Progress {
    std::atomic<int64_t> tokens{0};
    std::atomic<int> live{0};  // sequences still generating (parallel runs)
    std::atomic<bool> cancel{false};
};

GenerateResult generate(TappedContext& tc, const std::vector<llama_token>& prompt, const GenerateParams& params,
                        Progress* progress);

}  // namespace neurotap
