// NEAT (arXiv 2602.02010): neuron-based early exit. A few calibrated FFN neurons are watched while
// generating; at line starts, when their activations point the way of the calibrated reference
// pattern (cosine > exit_similarity) with enough magnitude (norm ratio > magnitude), the reasoning
// is ended by appending the exit tokens; while they half match (cosine > ban_similarity), the
// reflection words ("Wait", "Hmm", ...) are banned for the next token. Every decision is recorded.
#pragma once
#include <cstdint>
#include <utility>
#include <vector>

#include "llama.h"
#include "runtime/steering.h"

namespace neurotap {

struct NeatConfig {
    std::vector<std::pair<int, int>> neurons;  // (layer, index) watched
    std::vector<float> reference;              // their activations at termination (calibrated)
    float exit_similarity = 0.6f;
    float ban_similarity = 0.4f;
    float magnitude = 0.0f;                    // exit also needs ||v|| / ||reference|| > this
    bool line_starts_only = true;              // decide only where the previous token ended a line
    std::vector<llama_token> ban_tokens;       // banned for one token while half matching
    std::vector<llama_token> exit_tokens;      // appended on exit; an end-of-generation token ends the text
};

enum NeatAction : int { kNeatContinue = 0, kNeatBan = 1, kNeatExit = 2 };

struct NeatEvent {
    int token;  // index of the token this decision applied to (the position that predicts it)
    int action;
    float similarity;
    float magnitude;
};

// Gathers the watched neurons' activations of each sample's current position (fed by the tap
// like a reducer), makes the decisions at line starts, bans in place and forces the exit tokens.
class NeatMonitor : public Steering {
public:
    NeatMonitor(NeatConfig config, int n_layers, int64_t n_ff, int n_vocab);  // ParamError if inconsistent
    void begin(int n_samples, int n_layers, int64_t n_ff, int max_tokens) override;
    void on_row(int sample, int token, int layer, const float* a) override;
    void finish(int, int) override {}

    const char* name() const override { return "NEAT"; }
    const char* exit_reason() const override { return "neat_exit"; }
    bool steers() const override { return true; }
    Pick before_sample(int sample, int j, float* logits, llama_token* token) override;
    Decision after_commit(int sample, const SampleView& v, bool mine) override;

    // The decision at sample's current position; similarity and magnitude go to *sim / *mag.
    int decide(int sample, float* sim, float* mag) const;
    void ban(float* logits) const;  // -inf on the banned tokens
    const NeatConfig& config() const { return c_; }
    // Every decision taken for the sample, in order, and the token index where it exited (-1: none).
    const std::vector<NeatEvent>& events(int sample) const { return track_.at(static_cast<size_t>(sample)).events; }
    int exit_at(int sample) const { return track_.at(static_cast<size_t>(sample)).exit_at; }
    // Sample starts over (no decisions, no exit): for callers that reuse a sequence (the C interface).
    void reset(int sample) { track_.at(static_cast<size_t>(sample)) = Track{}; }

private:
    // The per-sample state: where lines start, and the exit tokens queued.
    struct Track {
        bool line_start = false;
        bool exited = false;
        size_t queued = 0;  // exit tokens already emitted
        int exit_at = -1;
        std::vector<NeatEvent> events;
    };
    NeatConfig c_;
    float ref_norm_ = 0;
    std::vector<std::vector<std::pair<int, int>>> by_layer_;  // layer -> (slot, index)
    std::vector<std::vector<float>> cur_;                      // [sample][watched]
    std::vector<Track> track_;
};

class ContributionWeights;

// NEAT's calibration score, exactly: for each candidate c, log p(token | h + a_c * col_c) -
// log p(token | h), through the final RMSNorm (weight g, epsilon eps) and the whole unembedding.
// cols is [n_cand, n_embd]; the unembedding rows are those of the contribution weights.
std::vector<double> neat_attribution(const ContributionWeights& w, const std::vector<float>& norm_weight, float eps,
                                     const std::vector<float>& h, const std::vector<float>& a,
                                     const std::vector<float>& cols, int32_t token, int n_threads);

}  // namespace neurotap
