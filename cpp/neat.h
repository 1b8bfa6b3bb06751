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
#include "reducers.h"

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

// Gathers the watched neurons' activations of each sample's current position (a Reducer fed by
// the tap like the others) and makes the decisions.
class NeatMonitor : public Reducer {
public:
    NeatMonitor(NeatConfig config, int n_layers, int64_t n_ff, int n_vocab);  // ParamError if inconsistent
    void begin(int n_samples, int n_layers, int64_t n_ff, int max_tokens) override;
    void on_row(int sample, int token, int layer, const float* a) override;
    void finish(int, int) override {}

    // The decision at sample's current position; similarity and magnitude go to *sim / *mag.
    int decide(int sample, float* sim, float* mag) const;
    void ban(float* logits) const;  // -inf on the banned tokens
    const NeatConfig& config() const { return c_; }

private:
    NeatConfig c_;
    float ref_norm_ = 0;
    std::vector<std::vector<std::pair<int, int>>> by_layer_;  // layer -> (slot, index)
    std::vector<std::vector<float>> cur_;                      // [sample][watched]
};

class ContributionWeights;

// NEAT's calibration score, exactly: for each candidate c, log p(token | h + a_c * col_c) -
// log p(token | h), through the final RMSNorm (weight g, epsilon eps) and the whole unembedding.
// cols is [n_cand, n_embd]; the unembedding rows are those of the contribution weights.
std::vector<double> neat_attribution(const ContributionWeights& w, const std::vector<float>& norm_weight, float eps,
                                     const std::vector<float>& h, const std::vector<float>& a,
                                     const std::vector<float>& cols, int32_t token, int n_threads);

}  // namespace neurotap
