// NAD's neuron contributions (arXiv 2510.26277, eq. 1) and activated-neuron sets.
//
// The contribution of FFN neuron i of layer l to the token y that a position predicts is
//     c = a_i * (W_U[y] . W_down[:, i])
// with a the input of the down projection (what the tap captures) and W_U the unembedding; the
// final norm is ignored, as in the paper. Per token, the 64 largest contributions of each layer
// are kept, eta is the 500th largest of those, and a neuron is activated when it is among its
// layer's top 64 and c > eta (appendix B).
//
// Exact: every c is computed (a second down projection, L x n_ff x n_embd MACs a token) from the
// quantized W_down of the file itself, dequantized block by block, batched over the queued tokens
// so W_down streams from memory once per pass, with AVX-512 or AVX2/FMA kernels on the OpenMP
// threads ggml already runs.
#pragma once
#include <atomic>
#include <cstdint>
#include <new>
#include <memory>
#include <unordered_map>
#include <vector>

#include "reducers/reducers.h"
#include "reducers/set_record.h"
#include "runtime/reducer.h"
#include "weights/mapped_weights.h"

namespace neurotap {

struct ModelInfo;

struct ContributionParams {
    int chunk = 32;            // tokens per chunk of the activated sets
    int top_per_layer = 64;    // the paper's per-layer k
    int eta_rank = 500;        // eta = the eta_rank-th largest of the per-layer top values
    bool gate_variant = false; // a = act(gate) (the authors' code) instead of the down projection input
    bool gelu = false;         // the activation of the gate variant: GELU (GeGLU models) or SiLU
    bool keep_top = false;     // keep every token's per-layer top values (for verification)
    int n_threads = 1;         // OpenMP threads for the contribution pass
    // Private memory of the reducer, each < 0 for auto (ContributionReducer::auto_budget): 5% of
    // the model file, less where the activation rows of the samples in flight take much of it.
    int64_t cache_bytes = -1;  // per-token-id projections W_down^T W_U[y] kept for reuse
    int64_t queue_bytes = -1;  // activations of committed tokens awaiting one shared pass
    int pass_tokens = -1;      // the most tokens one pass selects (< 0: auto, from queue_bytes)
};

// Streams activations; a committed token is queued with its activations, and its contributions are
// computed, all L x n_ff of them, exactly. c = a * d(y) with d(y) = W_down^T W_U[y] a function of
// the token id alone: d is cached per token id (LRU, within cache_bytes). When the queue fills
// queue_bytes, the tokens whose d is cached (MoE: for every expert they ran) are selected and their
// activations freed; the others wait for one pass over W_down that computes d for all their ids at
// once, a layer at a time: ids beyond the cache's free slots are projected for the pass alone, so
// the cache never outgrows its budget and only one layer of the new projections is held per
// thread. (A Cauchy-Schwarz bound
// |c_i| <= |a_i| ||W_down[:, i]|| ||W_U[y]|| was measured to prune only about a third of the neurons on
// SmolLM2, so it is not used.) Activated neurons go into the working bitset of the token's chunk,
// encoded compactly once the chunk completes (set_record.h).
class ContributionReducer : public Reducer {
public:
    ContributionReducer(std::shared_ptr<const ContributionWeights> w, ContributionParams p);
    void begin(int n_samples, int n_layers, int64_t n_ff, int max_tokens) override;
    void on_row(int sample, int token, int layer, const float* a) override;
    // MoE: the compact row, kept compact (only the experts that ran are stored and multiplied).
    bool on_moe_row(int sample, int token, const MoeRows& m, int r) override;
    void on_gate_row(int sample, int token, int layer, const float* g) override;
    // MoE layers: the route (experts and gate weights) of the row that follows.
    void on_hidden_row(TapKind kind, int sample, int token, int layer, const float* h, int64_t width) override;
    TapRequest tap_request() const override {
        return {(p_.gate_variant ? tap_bit(TapKind::MlpPre) : 0u) | (w_->moe().moe() ? tap_bit(TapKind::MoeRoute) : 0u), -1};
    }
    void commit(int sample, int token, int32_t token_id) override;
    void end_step() override;
    void sync() override;
    void finish(int sample, int n_tokens) override;

    const ContributionParams& params() const { return p_; }
    // The automatic cache and queue budget (each) for n samples: 5% of the file, or half of what
    // the rows in flight (n x L x n_ff floats) leave of 12% of it, if less (so that the whole mode
    // stays within about 15% of the file; at n = 64 the default model's rows alone are 12%).
    static int64_t auto_budget(int64_t file_bytes, int n_samples, int n_layers, int64_t n_ff);
    int64_t n_words() const { return n_words_; }
    // The record of a sample's first n_chunks chunks (set_record.h).
    SetRecord record(int sample, int64_t n_chunks) const { return sets_.snapshot(sample, n_chunks); }
    // The chunks opened so far as dense bitsets [chunks, words] (decoded: for tests).
    std::vector<uint64_t> sets(int sample) const { return sets_.dense(sample); }
    const std::vector<float>& eta(int sample) const { return eta_[sample]; }        // [tokens]
    const std::vector<int32_t>& n_active(int sample) const { return count_[sample]; }  // [tokens]
    // With keep_top: [tokens, layers, k] contributions (descending) and neuron indices.
    const std::vector<float>& top_values(int sample) const { return top_c_[sample]; }
    const std::vector<int32_t>& top_index(int sample) const { return top_i_[sample]; }
    int64_t tokens_processed() const { return tokens_; }
    double seconds() const { return seconds_; }          // time in the contribution pass
    double dot_seconds() const { return dot_seconds_; }  // of which the dot products and products
    int64_t cache_bytes() const { return static_cast<int64_t>(cache_floats_ * sizeof(float)); }
    int64_t cache_hits() const { return hits_; }
    int64_t cache_misses() const { return misses_; }
    // MoE: (token id, layer, expert) projections computed, and of those, ones added to an id
    // already cached (a token routed to an expert the id had not needed before).
    int64_t expert_projections() const { return expert_proj_.load(); }
    int64_t expert_projections_cached() const { return expert_proj_cached_.load(); }

private:
    struct Queued {
        int sample, token;
        int32_t token_id;
        int buf;      // index in bufs_ of the token's activations, -1 once selected
        int sel = -1;  // index of its selection in the sel_ arrays, once selected
    };
    int take_buffer();
    float* row_buffer(int sample);  // the sample's buffer for this step's rows, taken on first use
    void flush();
    void select_hits();
    int64_t queued_bytes() const;  // held activations and pending selections
    void assign_sources(const std::vector<int>& which);
    void select(const std::vector<int>& which);
    void record_prefix();

    std::shared_ptr<const ContributionWeights> w_;
    ContributionParams p_;
    int n_layers_ = 0;
    int64_t n_ff_ = 0, n_words_ = 0;
    int k_ = 0;
    // Activation buffers: layers * n_ff each; MoE: layers * compact_ (the experts that ran, by
    // ascending id, then the shared expert, times their gate weights), their ids in exps_.
    std::vector<std::vector<float>> bufs_;
    int64_t compact_ = 0;  // MoE: n_used * n_ff_exp + n_ff_shexp, the neurons a token computes per layer
    // MoE: per buffer, which experts ran [layers * n_expert] (the others' neurons are no
    // candidates: their contribution is -inf, so they are never in a top k nor activated), the
    // experts of each layer's compact row [layers * n_used], ascending, and per sample the route
    // of its current row [layers * route width].
    std::vector<std::vector<uint8_t>> ran_;
    std::vector<std::vector<int32_t>> exps_;

    std::vector<int> order_;  // scratch: slots by expert id
    std::vector<std::vector<float>> route_;
    std::vector<int> free_;                 // unused buffers
    std::vector<int> cur_;                  // [sample] -> the buffer its current rows go to (-1: none yet)
    std::vector<Queued> queue_;  // committed tokens, in order, until their selections are recorded
    int64_t held_ = 0;           // of which still holding activations
    int64_t queue_budget_ = 0;   // bytes of held activations and pending selections before a pass
    int64_t group_tokens_ = 0;   // the most tokens one pass selects
    std::vector<Queued*> pending_;
    SetRecorder sets_;  // activated sets per chunk, encoded as each chunk completes
    std::vector<std::vector<float>> eta_;
    std::vector<std::vector<int32_t>> count_;
    std::vector<std::vector<float>> top_c_;
    std::vector<std::vector<int32_t>> top_i_;
    std::vector<std::vector<float>> kth_;  // [sample][layer] a guess below the next token's k-th value
    // Scratch.
    std::vector<float> u_;                // [missing, n_embd]
    std::vector<float> sel_c_;            // [selected, layers * k]: each selected token's top values
    std::vector<int32_t> sel_i_;          // and their neurons
    std::vector<float> sel_eta_, sel_kth_;  // [selected], [selected, layers]
    std::vector<int> which_;
    int64_t tokens_ = 0;
    double seconds_ = 0, dot_seconds_ = 0;
    // d(y) = W_down^T W_U[y] per token id, least recently used evicted first.
    int cache_slots_ = 0;
    // Page-aligned storage from aligned operator new (C++17; std::aligned_alloc is missing on MSVC).
    static constexpr std::align_val_t kCacheAlign{4096};
    struct Free {
        void operator()(float* p) const { ::operator delete(p, kCacheAlign); }
    };
    std::unique_ptr<float[], Free> cache_;  // [slots, layers * n_ff], a slot's values written before they are read
    size_t cache_floats_ = 0;
    std::vector<int32_t> cache_token_;    // slot -> token id
    std::vector<int64_t> cache_used_;     // slot -> last step that used it
    std::unordered_map<int32_t, int> cache_index_;
    std::vector<int> slot_of_, row_of_;   // [queued] a token's cache slot, its row in the pass's projections
    std::vector<int32_t> missing_ids_;    // the pass's ids not cached before it, in row order
    std::vector<int> missing_slot_;       // and the slot each is cached in (-1: none free)
    std::unordered_map<int32_t, int> pass_row_;
    struct Target {  // MoE: one projection of one expert to compute
        int urow, prow, slot;  // row of u_; row of the pass's projections (-1: none); cache slot (-1: none)
    };
    struct Scratch {  // one thread's
        std::vector<float> proj;  // dense: [missing ids, n_ff]: one layer's new projections
        std::vector<float> row, c, top;
        std::vector<int32_t> idx;
        std::vector<std::vector<Target>> targets;  // MoE: per expert segment
        // MoE: one layer's projections, expert by expert (its targets' rows), and where a new id's
        // expert starts in it [missing ids, segments] (-1: not run by the pass's tokens).
        std::vector<float> pool;
        std::vector<int64_t> at;
        std::vector<const float*> seg;  // a token's experts' projections (the shared expert last)
        std::vector<float> u;
        std::vector<float> full;      // MoE: a full-width row (fewer than k neurons ran)
        std::vector<float> guess;     // [sample] a value below its next token's k-th at the layer in hand
    };
    // MoE: row `layer` of the sample's buffer from slot j's expert id_of(j), gate weight
    // weight_of(j) and activations act_of(j) (n_ff_exp floats), and the shared expert's and its gate.
    template <typename IdOf, typename WeightOf, typename ActOf>
    void store_moe_row(int sample, int layer, IdOf id_of, WeightOf weight_of, ActOf act_of, const float* shexp,
                       float shexp_gate);
    // MoE: layer l's top k of one token from its compact activations `a` and its experts `exps`
    // (ascending), d[k] the projections of expert exps[k] (d[n_used]: the shared expert's, if
    // any); returns the k-th value (as layer_top).
    float moe_layer_top(const float* a, const int32_t* exps, const float* const* d, float guess, Scratch& s,
                        float* top_c, int32_t* top_i, ProductsFn products) const;
    int moe_segments() const;  // experts + the shared one (0: dense)
    // MoE: whether cache slot `slot` holds, at every layer, the projections of every expert that
    // the token in buffer `buf` ran (dense: always).
    bool cached_all_experts(int slot, int buf) const;
    void project_experts(int l, const std::vector<int>& which, Scratch& s);
    std::vector<uint8_t> valid_;                 // MoE: [slot, layer, segment] projection computed
    std::atomic<int64_t> expert_proj_{0}, expert_proj_cached_{0};
    std::unordered_map<int, int> hit_row_;       // MoE: cache slot -> its row after the new ids in u_
    std::vector<Scratch> scratch_;
    int64_t step_ = 0, hits_ = 0, misses_ = 0;
};

}  // namespace neurotap
