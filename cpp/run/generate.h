// Single-sequence generation for C++ users: a Run of one (the same decode loop and reducers as
// parallel sampling) returning its tokens, text and neuron record in one struct.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "run/run.h"

namespace neurotap {

struct GenerateParams {
    int max_tokens = 128;
    SamplingParams sampling;         // the sampler draws with sampling.seed itself
    std::vector<std::string> stop;
    bool tap = true;                 // false: decode with the tap unarmed (baseline timing)
    RowFormat capture = RowFormat::None; // keep every activation row
    bool capture_norm = false;       // also keep ffn_norm-<il> rows
    bool capture_residual = false;   // also keep l_out-<il> rows (the residual stream after each layer)
    float active_threshold = 0.0f;   // a neuron is active on a token when its activation > this
    std::vector<llama_token> forced; // teacher forcing (see SampleParams::forced)
    const NeatConfig* neat = nullptr;  // NEAT early exit (needs the tap)
};

struct GenerateResult {
    std::vector<llama_token> prompt_tokens;
    std::vector<llama_token> tokens;  // generated, end-of-generation token excluded
    std::string text;                 // raw bytes (UTF-8 of complete pieces), cut at a stop string
    std::string finish_reason;        // SampleState::finish_reason(): "eos", "length", "stop", "cancelled" or "neat_exit"
    int n_layers = 0;
    int64_t n_ff = 0;
    int64_t n_embd = 0;
    // Per generated token j: the row of the position that predicts token j.
    std::vector<int32_t> active_counts;  // [n_tokens, n_layers]; empty when tap=false
    std::vector<float> acts_f32;         // [n_tokens, n_layers, n_ff] with RowFormat::Float32
    std::vector<uint16_t> acts_f16;      // same, IEEE half, with RowFormat::Float16
    std::vector<float> norm_inputs;      // [n_tokens, n_layers, n_embd] with capture_norm
    std::vector<float> residuals;        // [n_tokens, n_layers, n_embd] with capture_residual
    std::vector<NeatEvent> neat_events;  // every NEAT decision taken (line starts), in order
    int neat_exit_at = -1;               // token index where NEAT exited, -1 if it did not
    llama_token eog_token = -1;          // the end-of-generation token that ended it
    double prompt_seconds = 0;
    double decode_seconds = 0;           // decode steps after the prompt, sampling included
};

// The options of a run of one equivalent to `p` (what generate() runs).
RunOptions generate_options(const GenerateParams& p);

GenerateResult generate(TappedContext& tc, const std::vector<llama_token>& prompt, const GenerateParams& params,
                        Progress* progress);

}  // namespace neurotap
