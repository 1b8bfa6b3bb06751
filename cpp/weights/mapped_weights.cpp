// The mapped-weights reader: W_down and the unembedding read in place from the GGUF file.
#include "weights/mapped_weights.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "base/errors.h"
#include "ggml.h"

namespace neurotap {

ContributionWeights::ContributionWeights(const GgufFile& file, int n_layers, int64_t n_ff, int64_t n_embd, int n_vocab,
                                         const MoeLayout* moe)
    : n_layers_(n_layers), n_ff_(n_ff), n_embd_(n_embd), n_vocab_(n_vocab), moe_(moe ? *moe : MoeLayout{}) {
    if (n_layers <= 0 || n_ff <= 0 || n_embd <= 0 || n_vocab <= 0)
        throw ParamError("contribution weights need a positive model shape");
    // Every tensor is checked before the file is mapped: shape, type, and that its bytes lie
    // inside the file (GgufFile validated offsets and sizes against the file size).
    auto tensor = [&](const TensorInfo* t) {
        const auto* traits = ggml_get_type_traits(t->type);
        if (t->type != GGML_TYPE_F32 && (!traits || !traits->to_float))
            throw ModelError("tensor '" + t->name + "' has type " + ggml_type_name(t->type) +
                             ", which cannot be dequantized (" + file.path() + ")");
        Tensor out;
        out.type = t->type;
        out.row_bytes = ggml_row_size(t->type, t->ne[0]);
        out.block = ggml_blck_size(t->type);
        out.block_bytes = ggml_type_size(t->type);
        out.fast = dequant_kernel(t->type);
        if (out.row_bytes * static_cast<uint64_t>(t->ne[1]) * static_cast<uint64_t>(t->ne[2]) != t->nbytes ||
            t->ne[0] % out.block != 0)
            throw ModelError("tensor '" + t->name + "' has an inconsistent size in " + file.path());
        out.data = reinterpret_cast<const uint8_t*>(static_cast<uintptr_t>(t->file_offset));  // offset until mapped
        return out;
    };
    if (moe_.moe() && n_ff != moe_.width()) throw ParamError("contribution weights: n_ff is not the experts' width");
    // A tensor of `ne` (checked): each named layer's W_down, or the 3-D stack of its experts'.
    auto find = [&](const std::string& name, int64_t ne0, int64_t ne2, const std::string& what) {
        const TensorInfo* t = file.find_tensor(name);
        if (!t) throw ModelError("tensor '" + name + "' missing in " + file.path());
        if (t->ne[0] != ne0 || t->ne[1] != n_embd || t->ne[2] != ne2 || t->ne[3] != 1)
            throw ModelError("tensor '" + name + "' has shape " + std::to_string(t->ne[0]) + " x " +
                             std::to_string(t->ne[1]) + " x " + std::to_string(t->ne[2]) + ", expected " + what +
                             " = " + std::to_string(ne0) + " x " + std::to_string(n_embd) + " x " +
                             std::to_string(ne2) + " in " + file.path());
        return t;
    };
    for (int l = 0; l < n_layers; ++l) {
        const std::string p = "blk." + std::to_string(l) + ".";
        std::vector<Segment> segs;
        if (!moe_.moe()) {
            segs.push_back({0, n_ff, tensor(find(p + "ffn_down.weight", n_ff, 1, "n_ff x n_embd"))});
        } else {
            // Expert e's matrix is rows [e * n_embd, (e + 1) * n_embd) of the stacked tensor.
            const Tensor all = tensor(find(p + "ffn_down_exps.weight", moe_.n_ff_exp, moe_.n_expert,
                                           "n_ff_exp x n_embd x n_expert"));
            for (int e = 0; e < moe_.n_expert; ++e) {
                Segment s{int64_t{e} * moe_.n_ff_exp, moe_.n_ff_exp, all};
                s.t.data += static_cast<uintptr_t>(e) * static_cast<uintptr_t>(n_embd) * all.row_bytes;
                segs.push_back(s);
            }
            if (moe_.n_ff_shexp > 0)
                segs.push_back({int64_t{moe_.n_expert} * moe_.n_ff_exp, moe_.n_ff_shexp,
                                tensor(find(p + "ffn_down_shexp.weight", moe_.n_ff_shexp, 1, "n_ff_shexp x n_embd"))});
        }
        down_.push_back(std::move(segs));
    }
    // Tied embeddings (SmolLM2, Gemma) have no output.weight: the token embedding unembeds.
    unembed_name_ = file.find_tensor("output.weight") ? "output.weight" : "token_embd.weight";
    const TensorInfo* t = file.find_tensor(unembed_name_);
    if (!t) throw ModelError("no unembedding ('output.weight' or 'token_embd.weight') in " + file.path());
    if (t->ne[0] != n_embd || t->ne[1] < n_vocab || t->ne[2] != 1 || t->ne[3] != 1)
        throw ModelError("unembedding '" + unembed_name_ + "' has shape " + std::to_string(t->ne[0]) + " x " +
                         std::to_string(t->ne[1]) + ", expected n_embd x n_vocab = " + std::to_string(n_embd) +
                         " x " + std::to_string(n_vocab) + " in " + file.path());
    unembed_ = tensor(t);

    const int fd = ::open(file.path().c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw ModelError("cannot open model file: " + file.path());
    struct stat st {};
    if (::fstat(fd, &st) != 0 || static_cast<uint64_t>(st.st_size) != file.file_size()) {
        ::close(fd);
        throw ModelError("the model file " + file.path() + " changed while it was read");
    }
    map_size_ = static_cast<size_t>(st.st_size);
    map_ = ::mmap(nullptr, map_size_, PROT_READ, MAP_SHARED, fd, 0);
    ::close(fd);  // the mapping keeps the file (even if it is replaced on disk later)
    if (map_ == MAP_FAILED) {
        map_ = nullptr;
        throw ModelError("cannot map model file: " + file.path());
    }
    ::madvise(map_, map_size_, MADV_RANDOM);  // rows are read in blocks; no read-ahead of the whole file
    const uint8_t* base = static_cast<const uint8_t*>(map_);
    for (auto& layer : down_)
        for (Segment& s : layer) s.t.data = base + reinterpret_cast<uintptr_t>(s.t.data);
    unembed_.data = base + reinterpret_cast<uintptr_t>(unembed_.data);
}

ContributionWeights::~ContributionWeights() {
    if (map_) ::munmap(map_, map_size_);
}

void ContributionWeights::dequantize(const Tensor& t, int64_t row, int64_t i0, int64_t i1, float* out) const {
    const uint8_t* src = t.data + static_cast<size_t>(row) * t.row_bytes + static_cast<size_t>(i0 / t.block) * t.block_bytes;
    if (t.type == GGML_TYPE_F32) std::memcpy(out, src, static_cast<size_t>(i1 - i0) * sizeof(float));
    else if (t.fast && (i1 - i0) % 32 == 0 && (i1 - i0) % t.block == 0) t.fast(src, out, i1 - i0, 16);
    else ggml_get_type_traits(t.type)->to_float(src, out, i1 - i0);
}

void ContributionWeights::down_row(int layer, int64_t e, float* out) const {
    if (layer < 0 || layer >= n_layers_ || e < 0 || e >= n_embd_) throw ParamError("down_row: out of range");
    for (const Segment& s : down_[static_cast<size_t>(layer)]) dequantize(s.t, e, 0, s.width, out + s.offset);
}

void ContributionWeights::project(int layer, const float* U, int M, int64_t i0, int64_t i1, float* D, int64_t ldd,
                                  float* scratch) const {
    if (layer < 0 || layer >= n_layers_ || i0 < 0 || i1 > n_ff_ || i0 >= i1) throw ParamError("project: out of range");
    for (int m = 0; m < M; ++m) std::fill_n(D + static_cast<size_t>(m) * ldd, i1 - i0, 0.0f);
    for (const Segment& seg : down_[static_cast<size_t>(layer)]) {
        // The part of [i0, i1) in this segment, in its own neuron numbers.
        const int64_t a = std::max(i0, seg.offset) - seg.offset, b = std::min(i1, seg.offset + seg.width) - seg.offset;
        if (a >= b) continue;
        const Tile tile = project_tile(M, b - a);
        const Tensor& t = seg.t;
        if (a % t.block || (b % t.block && b != seg.width))
            throw ParamError("project: neuron range not on block boundaries");
        float* Dseg = D + (seg.offset + a - i0);
        for (int64_t s0 = a; s0 < b; s0 += tile.cols) {
            const int64_t s1 = std::min(b, s0 + tile.cols);
            project_slice(t, U, M, s0, s1, Dseg + (s0 - a), ldd, tile.rows, scratch);
        }
    }
}

// Measured at the 1B shape (2 cores): one pass for M = 1 takes 0.047 s in slices of 1024 neurons
// and 0.027 s in slices of 8192 (whole rows of the file's pages), while M = 64 takes 0.218 s in
// 1024 x 64 tiles and 0.284 s in 8192 x 16 ones. Accumulators M x cols within 64 Ki floats, the
// panel rows x cols within 128 Ki floats (half of L2), counting only the columns a slice has: an
// MoE expert (1024 neurons at OLMoE's shape) was projected 16 rows at a time for a panel of 8192
// columns it never filled, loading and storing its accumulators 8x as often as 128 rows need.
ContributionWeights::Tile ContributionWeights::project_tile(int M, int64_t width) {
    int64_t cols = 8192;
    while (cols > 1024 && static_cast<int64_t>(std::max(M, 1)) * cols > 65536) cols /= 2;
    return {std::min<int64_t>(128, 131072 / std::max<int64_t>(1, std::min(cols, width))), cols};
}

// Each value's sum runs over e = 0, 1, ... in order, one FMA a term, in both kernels, so the
// panel kernel gives the same bits as axpy4.
void ContributionWeights::project_slice(const Tensor& t, const float* U, int M, int64_t i0, int64_t i1, float* D,
                                        int64_t ldd, int64_t rows, float* scratch) const {
    const int64_t n = i1 - i0;
    if (const PanelFn panel = panel_kernel(); panel && n % 16 == 0) {
        // Rows e0 .. e0 + kc of the slice, dequantized and packed 16 neurons wide: panel
        // [n / 16][kc][16] (kc x n floats, in L2), then every vector's sums in registers over them.
        // Column blocks on cache lines: every 16-float store of the dequantizer fills one line.
        float* packed = scratch + (16 - (reinterpret_cast<uintptr_t>(scratch) / sizeof(float)) % 16) % 16;
        float* row = packed + (n / 16) * panel_stride(static_cast<int>(rows));
        for (int64_t e0 = 0; e0 < n_embd_; e0 += rows) {
            const int kc = static_cast<int>(std::min<int64_t>(rows, n_embd_ - e0));
            for (int k = 0; k < kc; ++k) {
                if (t.fast && n % 32 == 0 && n % t.block == 0) {  // straight into the panel
                    t.fast(t.data + static_cast<size_t>(e0 + k) * t.row_bytes + static_cast<size_t>(i0 / t.block) * t.block_bytes,
                           packed + 16 * k, n, panel_stride(kc));
                    continue;
                }
                dequantize(t, e0 + k, i0, i1, row);
                for (int64_t j = 0; j < n; j += 16)
                    std::memcpy(packed + (j / 16) * panel_stride(kc) + 16 * k, row + j, 16 * sizeof(float));
            }
            panel(U + e0, n_embd_, M, packed, kc, n, D, ldd);
        }
        return;
    }
    const Axpy4Fn axpy4 = axpy4_kernel();
    const Axpy4x2Fn axpy4x2 = axpy4x2_kernel();
    float* row = scratch;
    // One pass over the rows of W_down, four at a time: each dequantized slice is used by all M
    // vectors while it is in cache, and the M x n accumulators are loaded and stored once per four rows.
    for (int64_t e = 0; e < n_embd_; e += 4) {
        const int rows = static_cast<int>(std::min<int64_t>(4, n_embd_ - e));
        for (int k = 0; k < rows; ++k) dequantize(t, e + k, i0, i1, row + k * n);
        for (int k = rows; k < 4; ++k) std::fill_n(row + k * n, n, 0.0f);
        auto coefs = [&](int m, float* u) {
            for (int k = 0; k < 4; ++k) u[k] = k < rows ? U[static_cast<size_t>(m) * n_embd_ + e + k] : 0.0f;
        };
        int m = 0;
        for (; m + 2 <= M; m += 2) {
            float u0[4], u1[4];
            coefs(m, u0);
            coefs(m + 1, u1);
            axpy4x2(u0, u1, row, n, D + static_cast<size_t>(m) * ldd, D + static_cast<size_t>(m + 1) * ldd, n);
        }
        if (m < M) {
            float u[4];
            coefs(m, u);
            axpy4(u, row, n, D + static_cast<size_t>(m) * ldd, n);
        }
    }
}

void ContributionWeights::unembed_row(int32_t token, float* out) const {
    if (token < 0 || token >= n_vocab_) throw ParamError("token id out of range: " + std::to_string(token));
    dequantize(unembed_, token, 0, n_embd_, out);
}

}  // namespace neurotap
