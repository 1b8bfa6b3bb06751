// The mapped-weights reader (NAD's contributions, NEAT's attribution, NeuReasoner's projections).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "base/gguf_file.h"
#include "kernels/kernels.h"
#include "base/moe_layout.h"

namespace neurotap {

// What contributions need from the weights, read in place from the GGUF file, mapped read-only:
// W_down and the unembedding stay in their file encoding (quantized) and pages of the file are
// shared with the page cache (and with llama.cpp's own mapping), so this costs no private memory.
// Rows are dequantized on the fly with ggml's own to_float, the values the model multiplies by.
class ContributionWeights {
public:
    // moe: a mixture-of-experts model's layout (n_ff == moe->width()): a layer's W_down is then the
    // experts' ffn_down_exps slices side by side, then ffn_down_shexp, in the flat neuron order.
    ContributionWeights(const GgufFile& file, int n_layers, int64_t n_ff, int64_t n_embd, int n_vocab,
                        const MoeLayout* moe = nullptr);
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
    ggml_type down_type(int layer) const { return down_[static_cast<size_t>(layer)][0].t.type; }
    const MoeLayout& moe() const { return moe_; }

    // W_down row e of `layer` (the n_ff weights from every neuron to output dimension e), dequantized.
    void down_row(int layer, int64_t e, float* out) const;
    // D[m * ldd + (i - i0)] = sum_e U[m * n_embd + e] * W_down[e, i] for i in [i0, i1), m < M: the
    // projections W_down^T u of M vectors onto a range of neurons (i0, i1 multiples of the block
    // size, or i1 = n_ff). `scratch` holds at least kProjectScratch floats.
    void project(int layer, const float* U, int M, int64_t i0, int64_t i1, float* D, int64_t ldd, float* scratch) const;
    // The slices project() works in for M vectors: `cols` neurons (a multiple of every block size)
    // by `rows` rows of W_down at a time. Few vectors: wide slices, so W_down streams through whole
    // pages; many: narrow ones, so their M x cols accumulators stay in cache. `width`: the neurons
    // to project (rows are counted against the columns a slice really has).
    struct Tile {
        int64_t rows, cols;
    };
    static Tile project_tile(int M, int64_t width);
    static constexpr int64_t kProjectScratch = 131072 + 8192 + 8192 + 16;  // a panel, its padding, a row, alignment
    int64_t block_size(int layer) const { return down_[static_cast<size_t>(layer)][0].t.block; }
    // W_U[token] into out (n_embd floats); ParamError for an id outside the vocabulary.
    void unembed_row(int32_t token, float* out) const;

private:
    struct Tensor {
        const uint8_t* data = nullptr;
        ggml_type type = GGML_TYPE_F32;
        size_t row_bytes = 0;
        int64_t block = 1;
        size_t block_bytes = 0;
        DequantFn fast = nullptr;  // an AVX2/AVX-512 dequantizer equal to ggml's to_float, where there is one
    };
    void dequantize(const Tensor& t, int64_t row, int64_t i0, int64_t i1, float* out) const;
    void project_slice(const Tensor& t, const float* U, int M, int64_t i0, int64_t i1, float* D, int64_t ldd,
                       int64_t rows, float* scratch) const;
    int n_layers_;
    int64_t n_ff_, n_embd_;
    int n_vocab_;
    MoeLayout moe_;
    void* map_ = nullptr;
    size_t map_size_ = 0;
    // A layer's W_down: one segment (dense), or one per expert and the shared expert's, each the
    // neurons [offset, offset + width) of the flat layer.
    struct Segment {
        int64_t offset = 0, width = 0;
        Tensor t;
    };
    std::vector<std::vector<Segment>> down_;
    Tensor unembed_;
    std::string unembed_name_;
};

}  // namespace neurotap
