// Streaming per-sample reductions of tapped FFN rows (the Reducer interface: runtime/reducer.h).
#pragma once
#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "reducers/set_record.h"
#include "runtime/reducer.h"

namespace neurotap {

// Grows a per-sample buffer to hold token `token` (rows arrive in token order); returns its slot.
template <typename T>
T* slot(std::vector<T>& v, size_t token, size_t stride) {
    if (v.size() < (token + 1) * stride) v.resize((token + 1) * stride, T{});
    return v.data() + token * stride;
}

// Per token and layer: the number of neurons whose activation exceeds a threshold.
class ActiveCountReducer : public Reducer {
public:
    explicit ActiveCountReducer(float threshold = 0.0f) : thr_(threshold) {}
    void begin(int n_samples, int n_layers, int64_t n_ff, int max_tokens) override;
    void on_row(int sample, int token, int layer, const float* a) override;
    // MoE: counts over the computed neurons only (a threshold below 0 counts the idle experts'
    // zeros as active: such rows are taken scattered).
    bool on_moe_row(int sample, int token, const MoeRows& m, int r) override;
    void finish(int sample, int n_tokens) override;
    bool can_roll_back() const override { return true; }
    void roll_back(int sample, int n_tokens) override { finish(sample, n_tokens); }
    const std::vector<int32_t>& counts(int sample) const { return counts_[sample]; }  // [tokens, layers]
    std::vector<int32_t> take_counts(int sample) { return std::move(counts_[sample]); }

private:
    float thr_;
    int n_layers_ = 0;
    int64_t n_ff_ = 0;
    std::vector<std::vector<int32_t>> counts_;
};

// Per chunk of `chunk` tokens: the set of active neurons (activation > threshold) on any token
// of the chunk, over all n_layers x n_ff neurons (key layer*n_ff + i), kept encoded (set_record.h).
class ActiveSetReducer : public Reducer {
public:
    ActiveSetReducer(int chunk, float threshold);
    void begin(int n_samples, int n_layers, int64_t n_ff, int max_tokens) override;
    void on_row(int sample, int token, int layer, const float* a) override;
    // MoE: sets the bits of the computed neurons only and remembers their words, so that commit
    // merges and clears those words, not the whole [layers x width] bitset (as with on_threshold
    // below 0, where idle zeros are active, the row is then taken scattered).
    bool on_moe_row(int sample, int token, const MoeRows& m, int r) override;
    void commit(int sample, int token, int32_t token_id) override;
    void finish(int sample, int n_tokens) override;
    int64_t n_words() const { return n_words_; }
    int chunk() const { return chunk_; }
    // The record of a sample's first n_chunks chunks.
    SetRecord record(int sample, int64_t n_chunks) const { return sets_.snapshot(sample, n_chunks); }
    // The chunks opened so far as dense bitsets [chunks, words] (decoded: for tests).
    std::vector<uint64_t> sets(int sample) const { return sets_.dense(sample); }

private:
    int chunk_;
    float thr_;
    int n_layers_ = 0;
    int64_t n_ff_ = 0;
    int64_t n_words_ = 0;
    SetRecorder sets_;
    std::vector<std::vector<uint64_t>> pending_;  // the current token's bits, until committed
    // Per sample: the word ranges [first, last] of pending_ that compact rows wrote since the last
    // commit, unless a full row came (then every word is merged).
    std::vector<std::vector<std::pair<int64_t, int64_t>>> dirty_;
    std::vector<uint8_t> all_dirty_;
    std::vector<MoeSegment> seg_;  // scratch
};

// Per token: the activations of a fixed list of watched neurons (NEAT's monitor).
class WatchReducer : public Reducer {
public:
    explicit WatchReducer(std::vector<std::pair<int, int>> neurons);  // (layer, index)
    void begin(int n_samples, int n_layers, int64_t n_ff, int max_tokens) override;
    void on_row(int sample, int token, int layer, const float* a) override;
    // MoE: each watched neuron read where it is computed, 0 for an expert that did not run.
    bool on_moe_row(int sample, int token, const MoeRows& m, int r) override;
    void finish(int sample, int n_tokens) override;
    bool can_roll_back() const override { return true; }
    void roll_back(int sample, int n_tokens) override { finish(sample, n_tokens); }
    int n_watched() const { return static_cast<int>(neurons_.size()); }
    const std::vector<float>& values(int sample) const { return values_[sample]; }  // [tokens, watched]

private:
    std::vector<std::pair<int, int>> neurons_;
    std::vector<std::vector<std::pair<int, int>>> by_layer_;  // layer -> (slot, index)
    std::vector<std::vector<float>> values_;
};

// Opt-in, for small runs: every row, as float32 or IEEE half.
class MlpPostReducer : public Reducer {
public:
    explicit MlpPostReducer(bool half) : half_(half) {}
    void begin(int n_samples, int n_layers, int64_t n_ff, int max_tokens) override;
    void on_row(int sample, int token, int layer, const float* a) override;
    void finish(int sample, int n_tokens) override;
    bool can_roll_back() const override { return true; }
    void roll_back(int sample, int n_tokens) override { finish(sample, n_tokens); }
    bool half() const { return half_; }
    const std::vector<float>& rows_f32(int sample) const { return f32_[sample]; }     // [tokens, layers, n_ff]
    const std::vector<uint16_t>& rows_f16(int sample) const { return f16_[sample]; }
    std::vector<float> take_f32(int sample) { return std::move(f32_[sample]); }
    std::vector<uint16_t> take_f16(int sample) { return std::move(f16_[sample]); }

private:
    bool half_;
    int n_layers_ = 0;
    int64_t n_ff_ = 0;
    std::vector<std::vector<float>> f32_;
    std::vector<std::vector<uint16_t>> f16_;
};

// Mixture-of-experts routing, per sample, token and layer: the selected experts (in the router's
// order, best first), their gate weights, the shared expert's gate (if any) and, with probs, the
// router's output over every expert (ffn_moe_probs: a sync per layer). What RAD-style selectors
// compare; small: L x (2 x n_used + 1) floats a token.
class MoeRouteReducer : public Reducer {
public:
    MoeRouteReducer(const MoeLayout& layout, bool probs);
    TapRequest tap_request() const override {
        return {tap_bit(TapKind::MoeRoute) | (probs_ ? tap_bit(TapKind::MoeProbs) : 0u), -1};
    }
    void begin(int n_samples, int n_layers, int64_t n_ff, int max_tokens) override;
    void on_row(int, int, int, const float*) override {}
    bool on_moe_row(int, int, const MoeRows&, int) override { return true; }  // reads the route rows only: no scatter
    void on_hidden_row(TapKind kind, int sample, int token, int layer, const float* h, int64_t width) override;
    void finish(int sample, int n_tokens) override;
    bool can_roll_back() const override { return true; }
    void roll_back(int sample, int n_tokens) override { finish(sample, n_tokens); }
    const MoeLayout& layout() const { return m_; }
    bool probs() const { return probs_; }
    const std::vector<int32_t>& ids(int sample) const { return ids_[sample]; }          // [tokens, layers, n_used]
    const std::vector<float>& weights(int sample) const { return weights_[sample]; }    // [tokens, layers, n_used]
    const std::vector<float>& shexp_gate(int sample) const { return gate_[sample]; }    // [tokens, layers]
    const std::vector<float>& router_probs(int sample) const { return probs_rows_[sample]; }  // [tokens, layers, n_expert]

private:
    MoeLayout m_;
    bool probs_;
    int n_layers_ = 0;
    std::vector<std::vector<int32_t>> ids_;
    std::vector<std::vector<float>> weights_, gate_, probs_rows_;
};

// Opt-in: every row of a hidden-state kind (the normed FFN input or the residual stream after
// the layer), float32 [tokens, layers, n_embd] per sample.
class HiddenRowReducer : public Reducer {
public:
    explicit HiddenRowReducer(TapKind kind);  // NormInput or Residual
    TapRequest tap_request() const override { return {tap_bit(kind_), -1}; }
    void begin(int n_samples, int n_layers, int64_t n_ff, int max_tokens) override;
    void on_row(int, int, int, const float*) override {}
    void on_hidden_row(TapKind kind, int sample, int token, int layer, const float* h, int64_t n_embd) override;
    void finish(int sample, int n_tokens) override;
    bool can_roll_back() const override { return true; }
    void roll_back(int sample, int n_tokens) override { finish(sample, n_tokens); }
    TapKind kind() const { return kind_; }
    int64_t width() const { return n_embd_; }
    const std::vector<float>& rows(int sample) const { return rows_[sample]; }  // [tokens, layers, n_embd]
    std::vector<float> take(int sample) { return std::move(rows_[sample]); }

private:
    TapKind kind_;
    int n_layers_ = 0;
    int64_t n_embd_ = 0;
    std::vector<std::vector<float>> rows_;
};

}  // namespace neurotap
