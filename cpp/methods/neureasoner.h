// NeuReasoner (arXiv 2604.02972): reasoning failures detected from the fluctuations of small groups
// of components ("Mixture of Neurons", MoN) at the middle layer, and corrected while generating.
//
// Per committed token y, each watched component's direct contribution to y's logit is computed:
// an FFN neuron i of the layer gives a_i (W_U[y] . W_down[:, i]) (NAD's contribution), an attention
// head h gives z_h . (W_O[:, h] ^T W_U[y]) with z_h the head's output before the output projection
// (llama.cpp's kqv_out). A level's signal is the sum over its MoN; its spectral features over the
// last `window` tokens feed a small MLP (trained by scikit-learn, evaluated here) whose probability
// above a threshold is a detection, on which the monitor acts through the loop's steering hooks
// (steering.h): it rolls the step back to resample or redirect it, or ends the reasoning.
// Every size, band and threshold is neurotap's choice (the paper leaves them open): see README.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "llama.h"
#include "runtime/steering.h"

namespace neurotap {

class Model;
class ContributionWeights;

// The features of one window of a signal, in this order. Bands over the window's rfft bins
// k = 1..W/2 (the mean removed): low k <= max(1, W/8), high k > W/4.
enum SpectralFeature : int {
    kHighRatio = 0,     // energy in the high band / all non-DC energy (intra-step: sharp spikes)
    kLowRatio = 1,      // energy in the low band / all (instance level: an early rise, then collapse)
    kDominantRatio = 2, // the largest bin / all (inter-step: a periodic pattern)
    kEntropy = 3,       // spectral entropy of the normalized power, / log(W/2)
    kTvEnergy = 4,      // sum of squared first differences / (W * variance)
    kNumSpectral = 5,
};

// Spectral features of x[0..W) (oldest first) into out[kNumSpectral]; a constant window gives 0s.
// A direct DFT over a cached twiddle table: O(W^2 / 2) per call, constant per token.
class SpectralWindow {
public:
    explicit SpectralWindow(int window);  // ParamError unless 4 <= window <= 512
    int window() const { return w_; }
    void features(const float* x, float* out) const;

private:
    int w_;
    std::vector<double> cos_, sin_;  // [k * W + t], k = 1..W/2
};

// scikit-learn's MLPClassifier (ReLU hidden layers, one logistic output) behind a StandardScaler.
struct Mlp {
    std::vector<float> mean, scale;               // the scaler, per input
    std::vector<std::vector<float>> weights;      // per layer, [n_in, n_out] row-major (coefs_)
    std::vector<std::vector<float>> biases;       // per layer, [n_out] (intercepts_)
    int n_inputs() const { return static_cast<int>(mean.size()); }
    void validate() const;                        // ParamError naming the inconsistent part
    float probability(const float* x) const;      // P(failure) for n_inputs() features
};

enum NrLevel : int { kNrIntra = 0, kNrInter = 1, kNrInstance = 2, kNrLevels = 3 };
// What a detection does: nothing (record only), roll back the step and resample it, roll back and
// insert the redirect tokens, or end the reasoning with the exit tokens.
enum NrAction : int { kNrNone = 0, kNrResample = 1, kNrRedirect = 2, kNrExit = 3 };

struct NrLevelConfig {
    bool enabled = false;
    std::vector<int> components;  // the MoN: i < n_ff is FFN neuron i of `layer`, n_ff + h is head h
    std::vector<int> features;    // SpectralFeature indices the MLP reads, in its input order
    Mlp mlp;
    float threshold = 0.5f;
    int action = kNrNone;
};

struct NeuReasonerConfig {
    int layer = -1;                        // the middle layer, n_layers / 2 (the paper's L/2)
    int window = 32;
    std::vector<NrLevelConfig> levels;     // kNrLevels entries (intra, inter, instance)
    bool record = false;                   // keep every component's contribution per token (calibration)
    int max_retries = 2;                   // resamples of one step before its detections are let pass
    int max_actions = 8;                   // interventions per sample
    int cooldown = 16;                     // tokens after an intervention before the next detection acts
    std::vector<llama_token> exit_tokens;      // appended on an exit
    bool exit_line = false;                    // after them, the sample ends with the line it writes (its answer)
    std::vector<llama_token> redirect_tokens;  // inserted after a redirecting rollback
};

struct NrEvent {
    int token;        // tokens the sample held when the detection was made
    int level;
    int action;       // NrAction taken (kNrNone: the step's retries or the sample's actions ran out)
    float probability;
    int rollback_to;  // tokens kept by the rollback (-1: none)
    uint32_t seed;    // the sampler's new seed after a rollback (0: none)
};

// Watches the configured components (fed by the tap like a reducer: the layer's activation and,
// when heads are watched, its attention output), updated at each commit, and acts on detections.
class NeuReasonerMonitor : public Steering {
public:
    // Reads W_down columns, W_O and the unembedding from the model's file; ParamError if the
    // configuration does not fit the model.
    NeuReasonerMonitor(NeuReasonerConfig config, const Model& model);
    const NeuReasonerConfig& config() const { return c_; }
    bool acts() const;  // some enabled level takes an action that changes the tokens
    int n_components() const { return n_ff_ + n_head_; }

    void begin(int n_samples, int n_layers, int64_t n_ff, int max_tokens) override;
    void on_row(int sample, int token, int layer, const float* a) override;
    void on_hidden_row(TapKind kind, int sample, int token, int layer, const float* h, int64_t width) override;
    TapRequest tap_request() const override;
    void commit(int sample, int token, int32_t token_id) override;
    bool can_roll_back() const override { return true; }
    void roll_back(int sample, int n_tokens) override;
    void finish(int sample, int n_tokens) override;

    const char* name() const override { return "NeuReasoner"; }
    const char* exit_reason() const override { return "neureasoner_exit"; }
    bool steers() const override { return acts(); }
    bool rolls_back() const override { return acts(); }
    Pick before_sample(int sample, int j, float* logits, llama_token* token) override;
    Decision after_commit(int sample, const SampleView& v, bool mine) override;
    void rolled_back(int sample, uint32_t seed) override;

    // Whether `level` detects at the sample's last committed token; its probability in *p.
    bool detected(int sample, int level, float* p) const;

    const std::vector<float>& signals(int sample) const { return sig_[sample]; }    // [tokens, levels]
    const std::vector<float>& probs(int sample) const { return prob_[sample]; }     // [tokens, levels], NaN: none
    const std::vector<float>& recorded(int sample) const { return rec_[sample]; }   // [tokens, n_components]
    // What was detected and done for the sample, and the token index where it exited (-1: none).
    const std::vector<NrEvent>& events(int sample) const { return track_.at(static_cast<size_t>(sample)).events; }
    int exit_at(int sample) const { return track_.at(static_cast<size_t>(sample)).exit_at; }

private:
    // The per-sample state: what was detected and done, the forced tokens queued (an exit or a
    // redirect) and the bounds on interventions.
    struct Track {
        std::vector<NrEvent> events;
        std::vector<llama_token> queue;  // tokens to emit instead of sampling
        size_t queued = 0;               // of queue, already emitted
        bool exiting = false;            // the queue is the exit: its end-of-generation ends the sample
        size_t answer_from = 0;          // text offset where the exit's queue ended
        int exit_at = -1;
        int actions = 0;
        int next_check = 0;              // no detection acts before the sample holds this many tokens
        int retry_step = -1, retries = 0;
    };
    // After a commit with nothing queued: acts on a detection (a rollback is returned).
    Decision act(int sample, const SampleView& v);

    NeuReasonerConfig c_;
    int n_ff_ = 0, n_head_ = 0, head_dim_ = 0, n_embd_ = 0;
    std::shared_ptr<const ContributionWeights> w_;
    SpectralWindow spec_;
    std::vector<int> watched_;              // every component some level or the record reads
    std::vector<float> cols_;               // [watched, n_embd] W_down[:, i] for neurons
    std::vector<float> wo_;                 // [n_head * head_dim, n_embd]: W_O transposed (heads watched)
    bool heads_ = false;
    std::vector<std::vector<float>> cur_a_, cur_z_;  // per sample: the current position's rows
    std::vector<std::vector<float>> sig_, prob_, rec_;
    std::vector<float> u_, proj_, scratch_, contrib_, window_, feats_, in_;
    std::vector<Track> track_;
};

}  // namespace neurotap
