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
#include <cstdint>
#include <memory>
#include <unordered_map>
#include <vector>

#include "gguf_file.h"
#include "reducers.h"
#include "set_record.h"

namespace neurotap {

struct ModelInfo;

// Dequantizes n values (a multiple of 32) of Q4_0, Q4_1 or Q8_0 blocks to exactly what ggml's
// to_float gives, with AVX-512 or AVX2 where the CPU has them: ggml's own to_float is scalar,
// and a pass over W_down dequantizes all of it. dequant_kernel() picks the first of
// dequant_kernels() that equals to_float on a test set of blocks (checked once per type), or null
// (ggml's is used). Value i goes to out[(i / 16) * stride + i % 16]: stride 16 writes a row, a
// larger one the 16-neuron column blocks of the projection's packed panel.
using DequantFn = void (*)(const void* blocks, float* out, int64_t n, int64_t stride);
DequantFn dequant_kernel(ggml_type type);
std::vector<DequantFn> dequant_kernels(ggml_type type);  // every one the CPU runs, the chosen one first

// What contributions need from the weights, read in place from the GGUF file, mapped read-only:
// W_down and the unembedding stay in their file encoding (quantized) and pages of the file are
// shared with the page cache (and with llama.cpp's own mapping), so this costs no private memory.
// Rows are dequantized on the fly with ggml's own to_float, the values the model multiplies by.
class ContributionWeights {
public:
    ContributionWeights(const GgufFile& file, int n_layers, int64_t n_ff, int64_t n_embd, int n_vocab);
    ~ContributionWeights();
    ContributionWeights(const ContributionWeights&) = delete;
    ContributionWeights& operator=(const ContributionWeights&) = delete;

    int n_layers() const { return n_layers_; }
    int64_t n_ff() const { return n_ff_; }
    int64_t n_embd() const { return n_embd_; }
    int n_vocab() const { return n_vocab_; }
    const std::string& unembedding_name() const { return unembed_name_; }
    size_t memory_bytes() const { return 0; }  // private memory: none (the file is mapped)
    size_t mapped_bytes() const { return map_size_; }
    ggml_type down_type(int layer) const { return down_[static_cast<size_t>(layer)].type; }

    // W_down row e of `layer` (the n_ff weights from every neuron to output dimension e), dequantized.
    void down_row(int layer, int64_t e, float* out) const;
    // D[m * ldd + (i - i0)] = sum_e U[m * n_embd + e] * W_down[e, i] for i in [i0, i1), m < M: the
    // projections W_down^T u of M vectors onto a range of neurons (i0, i1 multiples of the block
    // size, or i1 = n_ff). `scratch` holds at least kProjectScratch floats.
    void project(int layer, const float* U, int M, int64_t i0, int64_t i1, float* D, int64_t ldd, float* scratch) const;
    // The slices project() works in for M vectors: `cols` neurons (a multiple of every block size)
    // by `rows` rows of W_down at a time. Few vectors: wide slices, so W_down streams through whole
    // pages; many: narrow ones, so their M x cols accumulators stay in cache.
    struct Tile {
        int64_t rows, cols;
    };
    static Tile project_tile(int M);
    static constexpr int64_t kProjectScratch = 131072 + 8192 + 8192 + 16;  // a panel, its padding, a row, alignment
    int64_t block_size(int layer) const { return down_[static_cast<size_t>(layer)].block; }
    // W_U[token] into out (n_embd floats); ParamError for an id outside the vocabulary.
    void unembed_row(int32_t token, float* out) const;

private:
    struct Tensor {
        const uint8_t* data = nullptr;
        ggml_type type = GGML_TYPE_F32;
        size_t row_bytes = 0;
        int64_t block = 1;
        size_t block_bytes = 0;
        DequantFn fast = nullptr;  // an AVX2 dequantizer equal to ggml's to_float, where there is one
    };
    void dequantize(const Tensor& t, int64_t row, int64_t i0, int64_t i1, float* out) const;
    void project_slice(const Tensor& t, const float* U, int M, int64_t i0, int64_t i1, float* D, int64_t ldd,
                       int64_t rows, float* scratch) const;
    int n_layers_;
    int64_t n_ff_, n_embd_;
    int n_vocab_;
    void* map_ = nullptr;
    size_t map_size_ = 0;
    std::vector<Tensor> down_;
    Tensor unembed_;
    std::string unembed_name_;
};

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

// out[q] = col . U[q] for q < n: dot products (NEAT's attribution; AVX2+FMA where the CPU has it).
constexpr int kMaxBatch = 64;
using DotsFn = void (*)(const float* col, const float* U, int n, int64_t E, float* out);
DotsFn dots_kernel();
DotsFn dots_kernel_generic();  // the portable one, for tests on CPUs where the other is chosen

// y[j] += a[0] x[j] + a[1] x[ldx + j] + a[2] x[2 ldx + j] + a[3] x[3 ldx + j] for j < n, added in
// that order (as four axpys would): the projection kernel, four rows of W_down
// per load and store of the accumulators (AVX2+FMA where the CPU has it).
using Axpy4Fn = void (*)(const float* a, const float* x, int64_t ldx, float* y, int64_t n);
Axpy4Fn axpy4_kernel();
Axpy4Fn axpy4_kernel_generic();  // the portable one, for tests on CPUs where the other is chosen
// axpy4 for two accumulator rows at once (y0 with a0, y1 with a1), sharing the loads of x.
using Axpy4x2Fn = void (*)(const float* a0, const float* a1, const float* x, int64_t ldx, float* y0, float* y1, int64_t n);
Axpy4x2Fn axpy4x2_kernel();
Axpy4x2Fn axpy4x2_kernel_generic();
// D[m * ldd + j] += U[m * ldu + k] * P[(j / 16) * (16 kc + 16) + 16 k + j % 16] for k = 0 .. kc - 1 in that
// order, one FMA each, for m < M and j < n (a multiple of 16): the projection's kernel where the CPU
// has AVX-512 or AVX2+FMA (null elsewhere). Rows of W_down packed 16 neurons wide (P) let the
// accumulators of MR vectors stay in registers over kc rows, so it is bound by the FMA units, not
// by loads and stores of accumulators as axpy4 is. Gives the bits of axpy4 (AVX2) over the same rows.
// c[i] = a[i] * d[i] for i < n (NaN as -inf: it would break the ordering), and the indices with
// c[i] >= guess written to idx, ascending; returns their number. One pass for a layer's
// contributions and the candidates of its top k (AVX2 where the CPU has it).
using ProductsFn = int64_t (*)(const float* a, const float* d, int64_t n, float guess, float* c, int32_t* idx);
ProductsFn products_kernel();
ProductsFn products_kernel_generic();  // the portable one, for tests
using PanelFn = void (*)(const float* U, int64_t ldu, int M, const float* P, int kc, int64_t n, float* D, int64_t ldd);
PanelFn panel_kernel();
std::vector<PanelFn> panel_kernels();  // every one the CPU runs, the chosen one first (for tests)

// Streams activations; a committed token is queued with its activations, and its contributions are
// computed, all L x n_ff of them, exactly. c = a * d(y) with d(y) = W_down^T W_U[y] a function of
// the token id alone: d is cached per token id (LRU, within cache_bytes). When the queue fills
// queue_bytes, the tokens whose d is cached are selected and their activations freed; the others
// wait for one pass over W_down that computes d for all their ids at once, a layer at a time: ids
// beyond the cache's free slots are projected for the pass alone, so the cache never outgrows its
// budget and only one layer of the new projections is held per thread. (A Cauchy-Schwarz bound
// |c_i| <= |a_i| ||W_down[:, i]|| ||W_U[y]|| was measured to prune only about a third of the neurons on
// SmolLM2, so it is not used.) Activated neurons go into the working bitset of the token's chunk,
// encoded compactly once the chunk completes (set_record.h).
class ContributionReducer : public Reducer {
public:
    ContributionReducer(std::shared_ptr<const ContributionWeights> w, ContributionParams p);
    void begin(int n_samples, int n_layers, int64_t n_ff, int max_tokens) override;
    void on_row(int sample, int token, int layer, const float* a) override;
    void on_gate_row(int sample, int token, int layer, const float* g) override;
    TapRequest tap_request() const override { return {p_.gate_variant ? tap_bit(TapKind::Gate) : 0u, -1}; }
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
    int64_t cache_bytes() const { return static_cast<int64_t>(cache_.capacity() * sizeof(float)); }
    int64_t cache_hits() const { return hits_; }
    int64_t cache_misses() const { return misses_; }

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
    std::vector<std::vector<float>> bufs_;  // activation buffers (layers * n_ff each)
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
    std::vector<float> cache_;            // [slots, layers * n_ff]
    std::vector<int32_t> cache_token_;    // slot -> token id
    std::vector<int64_t> cache_used_;     // slot -> last step that used it
    std::unordered_map<int32_t, int> cache_index_;
    std::vector<int> slot_of_, row_of_;   // [queued] a token's cache slot, its row in the pass's projections
    std::vector<int32_t> missing_ids_;    // the pass's ids not cached before it, in row order
    std::vector<int> missing_slot_;       // and the slot each is cached in (-1: none free)
    std::unordered_map<int32_t, int> pass_row_;
    struct Scratch {  // one thread's
        std::vector<float> proj;  // [missing ids, n_ff]: one layer's new projections
        std::vector<float> row, c, top;
        std::vector<int32_t> idx;
    };
    std::vector<Scratch> scratch_;
    int64_t step_ = 0, hits_ = 0, misses_ = 0;
};

// Jaccard similarity |A & B| / |A | B| of n bitsets of `words` 64-bit words each (row-major);
// two empty sets count as identical (1). Returns n x n, row-major.
std::vector<double> jaccard_matrix(const uint64_t* sets, int n, int64_t words);
int64_t popcount(const uint64_t* set, int64_t words);

}  // namespace neurotap
