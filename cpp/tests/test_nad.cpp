// Native tests of one component (ctest group "nad"); fixtures in common.h.
#include "tests/common.h"

namespace {

void test_nad_jaccard() {
    std::mt19937_64 rng(2024);
    for (int64_t words : {0, 1, 3}) {
        const int n = 9;
        std::vector<uint64_t> sets(static_cast<size_t>(n) * words, 0);
        // Rows 0 and 1 empty, row 2 full, row 3 a subset of row 4, the rest random of various densities.
        for (int64_t k = 0; k < words; ++k) {
            sets[2 * words + k] = ~uint64_t(0);
            sets[4 * words + k] = rng();
            sets[3 * words + k] = sets[4 * words + k] & rng();
            sets[5 * words + k] = rng() & rng() & rng();  // sparse
            sets[6 * words + k] = rng() | rng();          // dense
            sets[7 * words + k] = rng();
            sets[8 * words + k] = k == 0 ? uint64_t(1) << 63 : 0;  // a single bit
        }
        const std::string tag = std::to_string(words) + " words";
        const int64_t n_bits = 64 * words;
        for (int i = 0; i < n; ++i) {
            int64_t want = 0;
            for (int64_t b = 0; b < n_bits; ++b) want += bit_at(sets.data() + i * words, b);
            CHECK_MSG(popcount(sets.data() + i * words, words) == want, tag + ", set " + std::to_string(i));
        }
        const std::vector<double> got = jaccard_matrix(sets.data(), n, words);
        CHECK_MSG(got.size() == static_cast<size_t>(n) * n, tag);
        if (got.size() != static_cast<size_t>(n) * n) continue;
        int bad = 0;
        for (int i = 0; i < n; ++i)
            for (int j = 0; j < n; ++j) {
                int64_t inter = 0, uni = 0;
                for (int64_t b = 0; b < n_bits; ++b) {
                    const bool x = bit_at(sets.data() + i * words, b), y = bit_at(sets.data() + j * words, b);
                    inter += x && y;
                    uni += x || y;
                }
                const double want = uni == 0 ? 1.0 : double(inter) / double(uni);
                bad += got[static_cast<size_t>(i) * n + j] != want;
            }
        CHECK_MSG(bad == 0, tag + ": " + std::to_string(bad) + " entries differ from the bit-by-bit Jaccard");
        CHECK_MSG(got[0 * n + 1] == 1.0, tag + ": two empty sets");
        for (int i = 0; i < n; ++i) CHECK_MSG(got[static_cast<size_t>(i) * n + i] == 1.0, tag + ": diagonal");
        if (words > 0) {
            CHECK_MSG(got[0 * n + 2] == 0.0 && got[2 * n + 0] == 0.0, tag + ": empty vs full");
            CHECK_MSG(got[2 * n + 8] == 1.0 / double(n_bits), tag + ": full vs one bit");
        }
    }
    // By hand: {0, 1, 3} and {1, 2}: 1 in common of 4.
    const uint64_t pair[2] = {0xB, 0x6};
    const std::vector<double> j2 = jaccard_matrix(pair, 2, 1);
    CHECK(j2 == (std::vector<double>{1.0, 0.25, 0.25, 1.0}));
    CHECK(popcount(pair, 1) == 3 && popcount(pair + 1, 1) == 2 && popcount(pair, 2) == 5);
    CHECK(popcount(nullptr, 0) == 0);

    CHECK(jaccard_matrix(nullptr, 0, 4).empty());
    CHECK(jaccard_matrix(pair, 1, 1) == std::vector<double>{1.0});
    const uint64_t zero = 0;
    CHECK(jaccard_matrix(&zero, 1, 1) == std::vector<double>{1.0});
    EXPECT_THROW(ParamError, jaccard_matrix(pair, -1, 1), "jaccard n = -1");
    EXPECT_THROW(ParamError, jaccard_matrix(pair, 1, -1), "jaccard words = -1");
}

void test_nad_dots() {
    const DotsFn dots = dots_kernel();
    CHECK(dots != nullptr);
    if (!dots) return;
    CHECK(dots_kernel() == dots);  // chosen once
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    std::printf("  CPU %s AVX2+FMA: the kernel under test is the %s one\n",
                __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? "has" : "lacks",
                __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? "AVX2" : "generic");
#endif
    // The chosen kernel, then the portable one (which the dispatch skips on AVX2 machines).
    for (const DotsFn kernel : {dots, dots_kernel_generic()}) {
        std::mt19937 rng(31337);
        std::uniform_real_distribution<float> u(-1.0f, 1.0f);
        std::uniform_int_distribution<int> small(-5, 5);
        int bad = 0, bad_exact = 0, checked = 0;
        double worst = 0;
        for (int64_t E : {1, 7, 8, 576, 577}) {
            for (int n : {1, 2, 3, 4, 5, 6, 7, 8, 9, kMaxBatch}) {
                for (int variant = 0; variant < 3; ++variant) {
                    // 0: aligned vectors; 1: both one float past an allocation's start (unaligned);
                    // 2: small integers, whose dot products float computes exactly. Every buffer ends
                    // exactly where the kernel must stop reading (or writing), so ASan sees overruns.
                    const size_t skip = variant == 1 ? 1 : 0;
                    std::vector<float> col_buf(skip + E), u_buf(skip + static_cast<size_t>(n) * E);
                    for (float& x : col_buf) x = variant == 2 ? float(small(rng)) : u(rng);
                    for (float& x : u_buf) x = variant == 2 ? float(small(rng)) : u(rng);
                    const float* col = col_buf.data() + skip;
                    const float* U = u_buf.data() + skip;
                    std::vector<float> out(static_cast<size_t>(n), NAN);
                    kernel(col, U, n, E, out.data());
                    for (int q = 0; q < n; ++q) {
                        double ref = 0, mag = 0;
                        for (int64_t e = 0; e < E; ++e) {
                            const double p = double(col[e]) * double(U[static_cast<size_t>(q) * E + e]);
                            ref += p;
                            mag += std::fabs(p);
                        }
                        const double err = std::fabs(double(out[q]) - ref);
                        ++checked;
                        if (variant == 2) {
                            bad_exact += !(double(out[q]) == ref);
                        } else {
                            bad += !(err <= 1e-5 * mag);
                            if (mag > 0) worst = std::max(worst, err / mag);
                        }
                    }
                }
            }
        }
        CHECK_MSG(bad == 0, std::to_string(bad) + " dot products off by more than 1e-5 of the sum of |products|");
        CHECK_MSG(bad_exact == 0, std::to_string(bad_exact) + " integer dot products not exact");
        std::printf("  %d dot products, worst error %.2e of the sum of |products|\n", checked, worst);

        // n = 0 writes nothing.
        float sentinel = 42.0f;
        const float one = 1.0f;
        kernel(&one, &one, 0, 1, &sentinel);
        CHECK(sentinel == 42.0f);
    }
}

// The projection's kernels: the AVX2 dequantizers give exactly ggml's to_float values, and the
// four-row axpy adds in the generic kernel's order.
void test_nad_projection_kernels() {
    std::mt19937 rng(7);
    std::uniform_int_distribution<int> byte(0, 255);
    std::uniform_real_distribution<float> scale(-3.0f, 3.0f);
    const ggml_type fast_types[] = {GGML_TYPE_Q4_0, GGML_TYPE_Q4_1, GGML_TYPE_Q8_0, GGML_TYPE_Q4_K, GGML_TYPE_Q6_K, GGML_TYPE_MXFP4};
    for (ggml_type type : fast_types) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_cpu_init();
        CHECK(!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("f16c") || dequant_kernel(type) != nullptr);
#endif
        // The chosen one is the first that passed its check against to_float (here: the first).
        CHECK(dequant_kernels(type).empty() ? dequant_kernel(type) == nullptr : dequant_kernel(type) == dequant_kernels(type).front());
    }
    for (ggml_type type : fast_types)
      for (const DequantFn fast : dequant_kernels(type)) {  // each kernel the CPU runs, not only the chosen one
        const int64_t n = std::max<int64_t>(32, ggml_blck_size(type)) * 37;  // 37 blocks of 32 (K-quants: of 256)
        const size_t bytes = ggml_row_size(type, n);
        std::vector<uint8_t> blocks(bytes);
        for (auto& b : blocks) b = static_cast<uint8_t>(byte(rng));
        const size_t bsz = ggml_type_size(type);
        for (size_t b = 0; b < bytes / bsz; ++b) {
            if (type == GGML_TYPE_MXFP4) {  // the E8M0 exponent: every byte is a finite scale; both ends, 0 and 1 subnormal
                const uint8_t ends[] = {0, 1, 2, 127, 254, 255};
                if (b < 6) blocks[b * bsz] = ends[b];
                continue;
            }
            // Finite scales, a zero and a subnormal among them.
            const float d = b == 3 ? 0.0f : b == 5 ? 3e-6f : scale(rng);
            const ggml_fp16_t h = ggml_fp32_to_fp16(d);
            std::memcpy(blocks.data() + b * bsz + (type == GGML_TYPE_Q6_K ? bsz - 2 : 0), &h, sizeof h);  // Q6_K: d last
            if (type == GGML_TYPE_Q4_1 || type == GGML_TYPE_Q4_K) {  // and the offset m (Q4_K: dmin), finite
                const ggml_fp16_t m = ggml_fp32_to_fp16(b == 7 ? 0.0f : scale(rng));
                std::memcpy(blocks.data() + b * bsz + 2, &m, sizeof m);
            }
        }
        std::vector<float> want(static_cast<size_t>(n)), got(static_cast<size_t>(n), -1.0f);
        ggml_get_type_traits(type)->to_float(blocks.data(), want.data(), n);
        fast(blocks.data(), got.data(), n, 16);
        int bad = 0;
        for (int64_t i = 0; i < n; ++i) bad += std::memcmp(&want[i], &got[i], sizeof(float)) != 0;
        CHECK_MSG(bad == 0, std::string(ggml_type_name(type)) + ": " + std::to_string(bad) + " values differ from to_float");
        // Into 16-value column blocks `stride` floats apart (the packed panel), nothing else written.
        const int64_t stride = 16 * 3 + 5;
        std::vector<float> packed(static_cast<size_t>(n / 16 * stride), -7.0f);
        fast(blocks.data(), packed.data(), n, stride);
        bad = 0;
        for (int64_t i = 0; i < n; ++i) bad += std::memcmp(&want[i], &packed[(i / 16) * stride + i % 16], sizeof(float)) != 0;
        for (int64_t g = 0; g < n / 16; ++g)
            for (int64_t j = 16; j < stride; ++j) bad += packed[g * stride + j] != -7.0f;
        CHECK_MSG(bad == 0, std::string(ggml_type_name(type)) + ": " + std::to_string(bad) + " strided values wrong");
    }
    CHECK(dequant_kernel(GGML_TYPE_F16) == nullptr);
    // axpy4: every length around the vector width, the chosen kernel against an FMA reference.
    std::uniform_real_distribution<float> val(-1.0f, 1.0f);
    for (const Axpy4Fn kernel : {axpy4_kernel(), axpy4_kernel_generic()}) {
        for (int64_t n : {0, 1, 7, 8, 9, 31, 64, 100}) {
            const int64_t ldx = n + 3;
            std::vector<float> x(static_cast<size_t>(4 * ldx)), y(static_cast<size_t>(n) + 1), ref;
            for (auto& v : x) v = val(rng);
            for (auto& v : y) v = val(rng);
            const float a[4] = {val(rng), val(rng), 0.0f, val(rng)};
            ref = y;
            for (int64_t j = 0; j < n; ++j)
                for (int k = 0; k < 4; ++k) ref[j] = ref[j] + a[k] * x[static_cast<size_t>(k * ldx + j)];
            kernel(a, x.data(), ldx, y.data(), n);
            int bad = 0;
            for (int64_t j = 0; j < n; ++j) bad += !(std::fabs(y[j] - ref[j]) <= 1e-5f);
            CHECK_MSG(bad == 0, std::to_string(bad) + " of " + std::to_string(n) + " axpy4 sums off");
            CHECK(y[static_cast<size_t>(n)] == ref[static_cast<size_t>(n)]);  // nothing past n written
        }
    }
    // axpy4x2 equals two axpy4 calls of the same kernel family, bit for bit.
    for (const auto& [pair, single] : {std::pair{axpy4x2_kernel(), axpy4_kernel()},
                                       std::pair{axpy4x2_kernel_generic(), axpy4_kernel_generic()}}) {
        for (int64_t n : {0, 3, 8, 13, 64, 77}) {
            const int64_t ldx = n + 1;
            std::vector<float> x(static_cast<size_t>(4 * ldx) + 1);
            for (auto& v : x) v = val(rng);
            std::vector<float> y0(static_cast<size_t>(n) + 1), y1(y0.size());
            for (auto& v : y0) v = val(rng);
            for (auto& v : y1) v = val(rng);
            std::vector<float> r0 = y0, r1 = y1;
            const float a0[4] = {val(rng), val(rng), val(rng), val(rng)}, a1[4] = {val(rng), 0.0f, val(rng), val(rng)};
            pair(a0, a1, x.data(), ldx, y0.data(), y1.data(), n);
            single(a0, x.data(), ldx, r0.data(), n);
            single(a1, x.data(), ldx, r1.data(), n);
            CHECK(y0 == r0);
            CHECK(y1 == r1);
        }
    }
    // The panel kernel gives the bits of axpy4 over the same rows (each sum over the rows in order,
    // one FMA a term) for every count of vectors around its tile of 6, and writes only its n columns.
    // The fused products and candidates: the chosen kernel as the portable one, NaN and inf included.
    for (int64_t n : {0, 5, 8, 29, 200}) {
        std::vector<float> a(static_cast<size_t>(n)), d(a.size());
        for (auto& v : a) v = val(rng);
        for (auto& v : d) v = val(rng);
        if (n > 20) a[3] = INFINITY, d[3] = 0.0f, a[17] = NAN, a[19] = -INFINITY;  // inf x 0 and NaN: -inf
        for (float guess : {-INFINITY, 0.0f, 0.25f, INFINITY}) {
            std::vector<float> c0(a.size() + 1, 9.0f), c1 = c0;
            std::vector<int32_t> i0(a.size() + 1, -5), i1 = i0;
            const int64_t m0 = products_kernel_generic()(a.data(), d.data(), n, guess, c0.data(), i0.data());
            const int64_t m1 = products_kernel()(a.data(), d.data(), n, guess, c1.data(), i1.data());
            CHECK(m0 == m1 && i0 == i1 && std::memcmp(c0.data(), c1.data(), c0.size() * sizeof(float)) == 0);
            int64_t want = 0;
            for (int64_t i = 0; i < n; ++i) want += c0[i] >= guess;
            CHECK(m0 == want);
            if (n > 20) CHECK(c0[3] == -INFINITY && c0[17] == -INFINITY);
        }
    }
    CHECK(panel_kernels().empty() ? panel_kernel() == nullptr : panel_kernel() == panel_kernels().front());
    for (const PanelFn panel : panel_kernels()) {
        const Axpy4Fn axpy4 = axpy4_kernel();
        for (int kc : {1, 4, 7, 64}) {
            for (int M : {1, 2, 3, 4, 5, 6, 7, 13}) {
                for (int64_t n : {80, 208}) {  // 2 x 32 + 16 neurons; 128 + 64 + 16 (the widest tiles, then each narrower)
                    const int64_t ldd = n + 3, stride = 16 * kc + 16, ldu = kc + 2;
                    std::vector<float> rows(static_cast<size_t>(kc + 3) * n), P(static_cast<size_t>(n / 16 * stride));
                    std::vector<float> U(static_cast<size_t>(M) * ldu), D(static_cast<size_t>(M) * ldd);
                    for (auto& v : rows) v = val(rng);
                    for (auto& v : U) v = val(rng);
                    for (auto& v : D) v = val(rng);
                    for (int k = 0; k < kc; ++k)
                        for (int64_t j = 0; j < n; ++j) P[(j / 16) * stride + 16 * k + j % 16] = rows[static_cast<size_t>(k) * n + j];
                    std::vector<float> ref = D;
                    for (int m = 0; m < M; ++m)
                        for (int k = 0; k < kc; k += 4) {  // axpy4 takes 4 rows: pad with zero coefficients
                            float a[4];
                            for (int r = 0; r < 4; ++r) a[r] = k + r < kc ? U[static_cast<size_t>(m) * ldu + k + r] : 0.0f;
                            axpy4(a, rows.data() + static_cast<size_t>(k) * n, n, ref.data() + static_cast<size_t>(m) * ldd, n);
                        }
                    panel(U.data(), ldu, M, P.data(), kc, n, D.data(), ldd);
                    CHECK_MSG(std::memcmp(D.data(), ref.data(), D.size() * sizeof(float)) == 0,
                              "panel != axpy4 at kc " + std::to_string(kc) + ", M " + std::to_string(M) + ", n " +
                                  std::to_string(n));
                }
            }
        }
    }
}

// Weights of a tiny llama-like model, as written to the file (and so as the reducer sees them).
struct NadWeights {
    int L = 0;
    int64_t F = 0, E = 0;
    int V = 0;
    std::vector<float> down;     // [L][E][F]: W_down[e][i] of layer l, the tensor's rows of ne0 = n_ff
    std::vector<float> unembed;  // [V][E]: the rows that unembed (output.weight if written, else token_embd)
    // W_U[y] . W_down[:, i] of layer l, in double.
    double dot(int l, int64_t i, int32_t y) const {
        double s = 0;
        for (int64_t e = 0; e < E; ++e)
            s += double(unembed[static_cast<size_t>(y) * E + e]) * double(down[(static_cast<size_t>(l) * E + e) * F + i]);
        return s;
    }
};

struct NadFileOptions {
    int wmax = 3;                            // every weight is an integer in [-wmax, wmax]
    ggml_type unembed_type = GGML_TYPE_F32;  // F32 or F16: small integers are exact in both
    bool with_output = false;                // also write output.weight (unlike token_embd), which then unembeds
    int bad_layer = -1;                      // this layer's ffn_down gets ne0 = n_ff + 1
};

// Writes blk.<l>.ffn_down.weight (F32, ne = {n_ff, n_embd}) for each layer and token_embd.weight
// (ne = {n_embd, n_vocab}) through the gguf C API. Integer weights make every dot product, and with
// dyadic activations every contribution, exact in float: the reference can demand equality, ties
// included. In each layer neuron 5 is a copy of neuron 2 (when n_ff > 5), for exact ties.
NadWeights write_nad_gguf(const std::string& path, int L, int64_t F, int64_t E, int V, uint32_t seed,
                          const NadFileOptions& o = {}) {
    NadWeights w;
    w.L = L, w.F = F, w.E = E, w.V = V;
    std::mt19937 rng(seed);
    std::uniform_int_distribution<int> val(-o.wmax, o.wmax);
    w.down.resize(static_cast<size_t>(L) * E * F);
    for (float& x : w.down) x = float(val(rng));
    if (F > 5)
        for (int l = 0; l < L; ++l)
            for (int64_t e = 0; e < E; ++e) {
                float* row = w.down.data() + (static_cast<size_t>(l) * E + e) * F;
                row[5] = row[2];
            }
    std::vector<float> embd(static_cast<size_t>(V) * E), output(static_cast<size_t>(V) * E);
    for (float& x : embd) x = float(val(rng));
    for (float& x : output) x = float(val(rng));
    w.unembed = o.with_output ? output : embd;

    gguf_context* g = gguf_init_empty();
    gguf_set_val_str(g, "general.architecture", "llama");
    gguf_set_val_u32(g, "llama.block_count", static_cast<uint32_t>(L));
    const size_t bytes = (w.down.size() + static_cast<size_t>(L) * E + 2 * embd.size()) * sizeof(float) +
                         static_cast<size_t>(L + 2) * ggml_tensor_overhead() + 4096;
    ggml_init_params ip{/*mem_size=*/bytes, /*mem_buffer=*/nullptr, /*no_alloc=*/false};
    ggml_context* tctx = ggml_init(ip);
    for (int l = 0; l < L; ++l) {
        const int64_t ne0 = l == o.bad_layer ? F + 1 : F;
        ggml_tensor* t = ggml_new_tensor_2d(tctx, GGML_TYPE_F32, ne0, E);
        ggml_set_name(t, ("blk." + std::to_string(l) + ".ffn_down.weight").c_str());
        float* d = static_cast<float*>(t->data);
        for (int64_t e = 0; e < E; ++e)
            for (int64_t i = 0; i < ne0; ++i)
                d[e * ne0 + i] = i < F ? w.down[(static_cast<size_t>(l) * E + e) * F + i] : 1.0f;
        gguf_add_tensor(g, t);
    }
    auto unembedding = [&](const char* name, const std::vector<float>& v) {
        ggml_tensor* t = ggml_new_tensor_2d(tctx, o.unembed_type, E, V);
        ggml_set_name(t, name);
        for (size_t k = 0; k < v.size(); ++k) {
            if (o.unembed_type == GGML_TYPE_F16) static_cast<ggml_fp16_t*>(t->data)[k] = ggml_fp32_to_fp16(v[k]);
            else static_cast<float*>(t->data)[k] = v[k];
        }
        gguf_add_tensor(g, t);
    };
    unembedding("token_embd.weight", embd);
    if (o.with_output) unembedding("output.weight", output);
    const bool ok = gguf_write_to_file(g, path.c_str(), /*only_meta=*/false);
    gguf_free(g);
    ggml_free(tctx);
    if (!ok) throw std::runtime_error("gguf_write_to_file failed for " + path);
    return w;
}

// Brute force, in double: every contribution c = a_i * (W_U[y] . W_down[:, i]); per layer the top k
// (descending, ties by lower index); eta the eta_rank-th largest of those L * k values (the smallest
// when there are fewer); activated: the top members with c > eta, OR-ed over chunks of `chunk` tokens.
// `acts` is [tokens][L][F]; counts how many layer selections a tie at the k-th place decided.
NadResult nad_reference(const NadWeights& w, const std::vector<double>& acts, const std::vector<int32_t>& ids,
                        int chunk, int top_per_layer, int eta_rank, int* boundary_ties = nullptr) {
    const int T = static_cast<int>(ids.size());
    const int L = w.L;
    const int64_t F = w.F;
    const int k = static_cast<int>(std::min<int64_t>(top_per_layer, F));
    const int K = L * k;
    const int64_t words = (L * F + 63) / 64;
    NadResult r;
    r.bits.assign(static_cast<size_t>((T + chunk - 1) / chunk * words), 0);
    std::vector<double> c(static_cast<size_t>(F));
    std::vector<int32_t> order(static_cast<size_t>(F));
    for (int t = 0; t < T; ++t) {
        const size_t first = r.top_c.size();
        for (int l = 0; l < L; ++l) {
            for (int64_t i = 0; i < F; ++i) c[i] = acts[(static_cast<size_t>(t) * L + l) * F + i] * w.dot(l, i, ids[t]);
            std::iota(order.begin(), order.end(), 0);
            std::sort(order.begin(), order.end(), [&](int32_t x, int32_t y) { return c[x] != c[y] ? c[x] > c[y] : x < y; });
            if (boundary_ties && k < F && c[order[k - 1]] == c[order[k]]) ++*boundary_ties;
            for (int q = 0; q < k; ++q) {
                r.top_c.push_back(c[order[q]]);
                r.top_i.push_back(order[q]);
            }
        }
        std::vector<double> vals(r.top_c.begin() + first, r.top_c.end());
        std::sort(vals.begin(), vals.end(), std::greater<double>());
        const double eta = vals[static_cast<size_t>(std::min(eta_rank, K) - 1)];
        int32_t active = 0;
        uint64_t* b = r.bits.data() + static_cast<size_t>(t / chunk * words);
        for (int q = 0; q < K; ++q)
            if (r.top_c[first + q] > eta) {
                const int64_t bit = static_cast<int64_t>(q / k) * F + r.top_i[first + q];
                b[bit / 64] |= uint64_t(1) << (bit % 64);
                ++active;
            }
        r.eta.push_back(eta);
        r.n_active.push_back(active);
    }
    return r;
}

// One sample as the sampler would feed it.
struct NadSample {
    int n_tokens = 0;           // committed tokens
    bool eos = false;           // rows of one more token are offered, never committed, then finish()
                                // (else finish() right after the last commit, before end_step())
    std::vector<float> in;      // [n_tokens + eos][L][F]: what on_row (gate variant: on_gate_row) gets
    std::vector<float> other;   // the same shape, offered to the callback that must ignore it
    std::vector<int32_t> ids;   // [n_tokens]
    int rows() const { return n_tokens + (eos ? 1 : 0); }
};

// Feeds the reducer as DecodeLoop does: each step, the rows of every live sample layer by layer
// (both callbacks), then each sample's commit or finish, then end_step(). Returns each sample's
// results as they stood right after its finish().
std::vector<NadResult> run_nad(ContributionReducer& red, const std::vector<NadSample>& samples, int L, int64_t F) {
    const int n = static_cast<int>(samples.size());
    int steps = 1, max_tokens = 1;
    for (const NadSample& s : samples) steps = std::max(steps, s.rows()), max_tokens = std::max(max_tokens, s.n_tokens);
    red.begin(n, L, F, max_tokens);
    const bool gate = red.params().gate_variant;
    std::vector<NadResult> at_finish(static_cast<size_t>(n));
    for (int t = 0; t < steps; ++t) {
        for (int l = 0; l < L; ++l)
            for (int s = 0; s < n; ++s) {
                if (t >= samples[s].rows()) continue;
                const size_t at = (static_cast<size_t>(t) * L + l) * F;
                // The ignored callback's rows come both before and after the real ones, so that
                // heeding them would overwrite the token's activations whatever the order.
                if (gate) {
                    red.on_row(s, t, l, samples[s].other.data() + at);
                    red.on_gate_row(s, t, l, samples[s].in.data() + at);
                    red.on_row(s, t, l, samples[s].other.data() + at);
                } else {
                    red.on_gate_row(s, t, l, samples[s].other.data() + at);
                    red.on_row(s, t, l, samples[s].in.data() + at);
                    red.on_gate_row(s, t, l, samples[s].other.data() + at);
                }
            }
        for (int s = 0; s < n; ++s) {
            const NadSample& smp = samples[s];
            if (t == 0 && smp.rows() == 0) {  // stopped before its first token
                red.finish(s, 0);
                at_finish[s] = snapshot(red, s);
            }
            if (t >= smp.rows()) continue;
            if (t == smp.n_tokens) {  // the end-of-generation token: offered, not committed
                red.finish(s, smp.n_tokens);
                at_finish[s] = snapshot(red, s);
                continue;
            }
            red.commit(s, t, smp.ids[t]);
            if (!smp.eos && t == smp.n_tokens - 1) {  // max_tokens reached: the token is still queued
                red.finish(s, smp.n_tokens);
                at_finish[s] = snapshot(red, s);
            }
        }
        red.end_step();
    }
    return at_finish;
}

// Activations k/8 in [-2, 2] (or k/1024 in [-4, 4] when `fine`): dyadic, so contributions are exact.
NadSample nad_sample(int n_tokens, bool eos, int L, int64_t F, int V, uint32_t seed, bool fine = false) {
    NadSample s;
    s.n_tokens = n_tokens;
    s.eos = eos;
    std::mt19937 rng(seed);
    const size_t n = static_cast<size_t>(s.rows()) * L * F;
    s.in.resize(n);
    s.other.resize(n);
    for (float& x : s.in) x = fine ? float(int(rng() % 8193) - 4096) / 1024.0f : float(int(rng() % 33) - 16) / 8.0f;
    for (float& x : s.other) x = 50.0f + float(rng() % 1000);  // would dominate every selection
    for (int t = 0; t < n_tokens; ++t) s.ids.push_back(static_cast<int32_t>(rng() % static_cast<uint32_t>(V)));
    return s;
}

std::vector<double> to_double(const std::vector<float>& v, size_t n) { return std::vector<double>(v.begin(), v.begin() + n); }

// Compares the reducer's results with the reference: exactly, or values within a relative `tol`.
void check_nad(const NadResult& got, const NadResult& want, bool keep_top, double tol, const std::string& tag) {
    auto near = [tol](double x, double y) { return tol == 0 ? x == y : std::fabs(x - y) <= tol * std::fabs(y); };
    CHECK_MSG(got.bits == want.bits, tag + ": bits (" + std::to_string(got.bits.size()) + " words, want " +
                                         std::to_string(want.bits.size()) + ")");
    CHECK_MSG(got.n_active == want.n_active, tag + ": n_active");
    CHECK_MSG(got.eta.size() == want.eta.size(), tag + ": eta size");
    if (got.eta.size() == want.eta.size()) {
        int bad = 0;
        for (size_t t = 0; t < want.eta.size(); ++t) bad += !near(got.eta[t], want.eta[t]);
        CHECK_MSG(bad == 0, tag + ": " + std::to_string(bad) + " eta values");
    }
    if (!keep_top) {
        CHECK_MSG(got.top_c.empty() && got.top_i.empty(), tag + ": top values kept without keep_top");
        return;
    }
    CHECK_MSG(got.top_i == want.top_i, tag + ": top_index");
    CHECK_MSG(got.top_c.size() == want.top_c.size(), tag + ": top_values size");
    if (got.top_c.size() == want.top_c.size()) {
        int bad = 0;
        for (size_t q = 0; q < want.top_c.size(); ++q) bad += !near(got.top_c[q], want.top_c[q]);
        CHECK_MSG(bad == 0, tag + ": " + std::to_string(bad) + " top values");
    }
}

// Runs `samples` through a reducer with `p` and checks every sample against the reference, both as
// it stood at its finish() and at the end. Returns the references.
std::vector<NadResult> check_nad_run(const std::shared_ptr<const ContributionWeights>& cw, const NadWeights& w,
                                     const ContributionParams& p, const std::vector<NadSample>& samples,
                                     const std::string& label, int* boundary_ties = nullptr,
                                     const std::function<std::vector<double>(const NadSample&)>& acts_of = nullptr,
                                     double tol = 0) {
    ContributionReducer red(cw, p);
    const std::vector<NadResult> at_finish = run_nad(red, samples, w.L, w.F);
    std::vector<NadResult> refs;
    int64_t tokens = 0;
    for (size_t s = 0; s < samples.size(); ++s) {
        const NadSample& smp = samples[s];
        const std::vector<double> acts =
            acts_of ? acts_of(smp) : to_double(smp.in, static_cast<size_t>(smp.n_tokens) * w.L * w.F);
        refs.push_back(nad_reference(w, acts, smp.ids, p.chunk, p.top_per_layer, p.eta_rank, boundary_ties));
        const std::string tag = label + ", sample " + std::to_string(s);
        check_nad(at_finish[s], refs.back(), p.keep_top, tol, tag + " at finish()");
        check_nad(snapshot(red, static_cast<int>(s)), refs.back(), p.keep_top, tol, tag + " at the end");
        tokens += smp.n_tokens;
    }
    CHECK_MSG(red.tokens_processed() == tokens, label + ": tokens_processed");
    return refs;
}

// Whether the references exercise the rules: something activated, something in a top list left out.
void check_nad_not_trivial(const std::vector<NadResult>& refs, const std::string& label) {
    int64_t active = 0, kept = 0;
    for (const NadResult& r : refs) {
        for (int32_t a : r.n_active) active += a;
        kept += static_cast<int64_t>(r.top_c.size());
    }
    CHECK_MSG(active > 0, label + ": nothing activated, the test proves little");
    CHECK_MSG(active < kept, label + ": every top member activated, eta is never exercised");
}

void test_nad_contributions() {
    TempDir dir;
    const int L = 3, V = 7;
    const int64_t F = 10, E = 12;
    const std::string path = dir.file("nad.gguf");
    const NadWeights w = write_nad_gguf(path, L, F, E, V, 11);
    GgufFile file(path);
    auto cw = std::make_shared<const ContributionWeights>(file, L, F, E, V);
    CHECK(cw->n_layers() == L && cw->n_ff() == F && cw->n_embd() == E && cw->n_vocab() == V);
    CHECK(cw->unembedding_name() == "token_embd.weight");
    // Read in place from the mapped file: no private copy.
    CHECK(cw->memory_bytes() == 0 && cw->mapped_bytes() == fs::file_size(path));
    // The rows, and projections of any neuron range (blocks of 1 for f32) equal to the sums by hand.
    {
        int bad = 0;
        std::vector<float> wrow(static_cast<size_t>(F));
        for (int l = 0; l < L; ++l)
            for (int64_t e = 0; e < E; ++e) {
                cw->down_row(l, e, wrow.data());
                for (int64_t i = 0; i < F; ++i) bad += wrow[i] != w.down[(static_cast<size_t>(l) * E + e) * F + i];
            }
        CHECK_MSG(bad == 0, std::to_string(bad) + " W_down weights wrong");
        std::vector<float> U(static_cast<size_t>(2 * E)), D(static_cast<size_t>(2 * F), -1.0f), scratch(ContributionWeights::kProjectScratch);
        for (int64_t e = 0; e < 2 * E; ++e) U[e] = static_cast<float>((e % 5) - 2);
        const int l = L - 1;
        cw->project(l, U.data(), 2, 3, F, D.data(), F, scratch.data());  // neurons 3.. only, rows F apart
        for (int m = 0; m < 2; ++m)
            for (int64_t i = 3; i < F; ++i) {
                double want = 0;
                for (int64_t e = 0; e < E; ++e) want += double(U[m * E + e]) * w.down[(static_cast<size_t>(l) * E + e) * F + i];
                bad += D[m * F + (i - 3)] != static_cast<float>(want);  // integer weights: exact
            }
        CHECK_MSG(bad == 0, std::to_string(bad) + " projections wrong");
        EXPECT_THROW(ParamError, cw->project(l, U.data(), 2, 5, 2, D.data(), F, scratch.data()), "empty range");
        std::vector<float> row(static_cast<size_t>(E));
        cw->unembed_row(V - 1, row.data());
        CHECK(std::equal(row.begin(), row.end(), w.unembed.begin() + static_cast<size_t>(V - 1) * E));
        EXPECT_THROW(ParamError, cw->unembed_row(V, row.data()), "unembed_row(n_vocab)");
        EXPECT_THROW(ParamError, cw->unembed_row(-1, row.data()), "unembed_row(-1)");
    }

    ContributionParams p;
    p.chunk = 2;
    p.top_per_layer = 4;
    p.eta_rank = 5;
    p.keep_top = true;
    p.n_threads = 2;

    // Sample 0: 5 tokens, then an end-of-generation token; sample 1: 3 tokens, ending at max_tokens.
    std::vector<NadSample> samples = {nad_sample(5, true, L, F, V, 100), nad_sample(3, false, L, F, V, 101)};
    {
        // Token 1, layer 0: only neurons 7 and 8 active, so two zero contributions fill the top 4
        // (ties at the boundary: the lowest indices). Token 2: neurons 2 and 5 (equal columns) equal
        // and large in every layer, an exact tie inside the top list.
        NadSample& s = samples[0];
        float* a = s.in.data() + (static_cast<size_t>(1) * L + 0) * F;
        std::fill(a, a + F, 0.0f);
        a[7] = w.dot(0, 7, s.ids[1]) >= 0 ? 1.5f : -1.5f;
        a[8] = w.dot(0, 8, s.ids[1]) >= 0 ? 0.75f : -0.75f;
        for (int l = 0; l < L; ++l) {
            float* b = s.in.data() + (static_cast<size_t>(2) * L + l) * F;
            b[2] = b[5] = w.dot(l, 2, s.ids[2]) >= 0 ? 2.0f : -2.0f;
        }
        // The uncommitted token's rows would activate everything: nothing of them may show.
        std::fill(s.in.begin() + static_cast<size_t>(5) * L * F, s.in.end(), 2.0f);
    }
    int ties = 0;
    const auto refs = check_nad_run(cw, w, p, samples, "top 4, eta rank 5", &ties);
    check_nad_not_trivial(refs, "top 4, eta rank 5");
    CHECK_MSG(ties > 0, "no tie at a layer's k-th place: tie-breaking by index is not exercised");
    // The hand-made ties came out as intended.
    if (refs[0].top_i.size() >= static_cast<size_t>(3 * L * 4)) {
        const int32_t* t1 = refs[0].top_i.data() + static_cast<size_t>(1) * L * 4;  // token 1, layer 0
        std::vector<int32_t> got(t1, t1 + 4);
        std::sort(got.begin(), got.end());
        if (w.dot(0, 7, samples[0].ids[1]) != 0 && w.dot(0, 8, samples[0].ids[1]) != 0)
            CHECK_MSG((got == std::vector<int32_t>{0, 1, 7, 8}), "zero ties at the boundary not broken by index");
    }
    // The sizes: 3 chunks of sample 0, 2 of sample 1 (the last one half full).
    CHECK(refs[0].bits.size() == 3u * 1u && refs[1].bits.size() == 2u * 1u);

    // Without keep_top nothing is kept, the rest is the same; one thread gives the same results.
    ContributionParams lean = p;
    lean.keep_top = false;
    lean.n_threads = 1;
    check_nad_run(cw, w, lean, samples, "without keep_top");

    // A chunk of 1 token, and a larger one than any sample.
    for (int chunk : {1, 64}) {
        ContributionParams pc = p;
        pc.chunk = chunk;
        check_nad_run(cw, w, pc, samples, "chunk " + std::to_string(chunk));
    }

    // Budgets: no cache and no queue (a pass every step); a cache of 2 ids and queues of 6 and 40
    // tokens (the tokens whose projection is cached are selected early while the others wait,
    // across chunk boundaries, and ids are evicted); the automatic ones; passes of 1, 3 and 5
    // tokens (the queue recorded a prefix at a time, early selections behind a waiting token
    // moved down). The same exact results.
    {
        const std::vector<NadSample> many = {nad_sample(23, false, L, F, V, 104), nad_sample(17, true, L, F, V, 105),
                                             nad_sample(20, false, L, F, V, 106)};
        const int64_t row = L * F * static_cast<int64_t>(sizeof(float));
        struct Budget {
            int64_t cache, queue;
            int pass;
        };
        for (const auto& [cache, queue, pass] : {Budget{0, 0, -1}, {2 * row, 6 * row, -1}, {2 * row, 40 * row, -1}, {-1, -1, -1},
                                                 {0, 0, 1}, {2 * row, 6 * row, 1}, {2 * row, 6 * row, 2}, {2 * row, 40 * row, 3},
                                                 {-1, -1, 5}}) {
            ContributionParams pb = p;
            pb.cache_bytes = cache;
            pb.queue_bytes = queue;
            pb.pass_tokens = pass;
            const auto r = check_nad_run(cw, w, pb, many, "cache " + std::to_string(cache) + " B, queue " + std::to_string(queue) +
                                                              " B, passes of " + std::to_string(pass));
            check_nad_not_trivial(r, "budgets");
            // The cache holds at most its budget, however many distinct ids a pass carries.
            ContributionReducer red(cw, pb);
            run_nad(red, many, L, F);
            if (cache >= 0) CHECK_MSG(red.cache_bytes() <= cache, "cache of " + std::to_string(red.cache_bytes()) + " B over its budget");
        }
    }

    // Gate rows are ignored without gate_variant (run_nad offers huge ones around every row): shown
    // by the matches above. A sample stopped before its first token, and one ending with EOS first.
    {
        std::vector<NadSample> more = samples;
        more.push_back(nad_sample(0, false, L, F, V, 102));
        more.push_back(nad_sample(0, true, L, F, V, 103));
        const auto r = check_nad_run(cw, w, p, more, "with empty samples");
        CHECK(r[2].bits.empty() && r[3].bits.empty() && r[2].eta.empty() && r[3].n_active.empty());
    }

    // eta_rank past L * k: eta is the smallest top value, which is never activated.
    {
        ContributionParams pe = p;
        pe.eta_rank = 100;
        ContributionReducer red(cw, pe);
        run_nad(red, samples, L, F);
        const int K = L * 4;
        int bad = 0;
        for (int s = 0; s < 2; ++s) {
            const auto& tc = red.top_values(s);
            for (int t = 0; t < samples[s].n_tokens; ++t) {
                const float mn = *std::min_element(tc.begin() + t * K, tc.begin() + (t + 1) * K);
                int above = 0;
                for (int q = 0; q < K; ++q) above += tc[static_cast<size_t>(t) * K + q] > mn;
                bad += red.eta(s)[t] != mn || red.n_active(s)[t] != above;
            }
        }
        CHECK_MSG(bad == 0, std::to_string(bad) + " tokens whose eta is not the smallest top value");
        const auto r = check_nad_run(cw, w, pe, samples, "eta rank 100");
        check_nad_not_trivial(r, "eta rank 100");
        // eta_rank exactly L * k: the same thing.
        pe.eta_rank = K;
        check_nad_run(cw, w, pe, samples, "eta rank L * k");
        pe.eta_rank = 1;  // eta is the largest: nothing activated
        const auto none = check_nad_run(cw, w, pe, samples, "eta rank 1");
        for (const auto& x : none)
            for (int32_t a : x.n_active) CHECK(a == 0);
    }

    // top_per_layer past n_ff: clipped, every neuron ranked.
    {
        ContributionParams pk = p;
        pk.top_per_layer = 50;
        ContributionReducer red(cw, pk);
        run_nad(red, samples, L, F);
        CHECK(red.top_values(0).size() == static_cast<size_t>(5) * L * F);
        CHECK(red.top_index(1).size() == static_cast<size_t>(3) * L * F);
        if (red.top_index(0).size() == static_cast<size_t>(5) * L * F) {
            int bad = 0;
            for (size_t row = 0; row < static_cast<size_t>(5) * L; ++row) {
                std::vector<int32_t> idx(red.top_index(0).begin() + row * F, red.top_index(0).begin() + (row + 1) * F);
                std::sort(idx.begin(), idx.end());
                for (int64_t i = 0; i < F; ++i) bad += idx[i] != i;
            }
            CHECK_MSG(bad == 0, "with top_per_layer > n_ff a layer's top list is not a permutation");
        }
        const auto r = check_nad_run(cw, w, pk, samples, "top 50 > n_ff");
        check_nad_not_trivial(r, "top 50 > n_ff");
        pk.top_per_layer = static_cast<int>(F);
        check_nad_run(cw, w, pk, samples, "top == n_ff");
        pk.top_per_layer = 1;
        pk.eta_rank = 2;
        check_nad_run(cw, w, pk, samples, "top 1, eta rank 2");
    }

    // A token id outside the vocabulary: ParamError from commit, and nothing queued.
    {
        ContributionReducer red(cw, p);
        red.begin(1, L, F, 4);
        red.on_row(0, 0, 0, samples[0].in.data());
        EXPECT_THROW(ParamError, red.commit(0, 0, V), "commit(token id n_vocab)");
        EXPECT_THROW(ParamError, red.commit(0, 0, -1), "commit(token id -1)");
        EXPECT_NO_THROW(red.end_step(), "end_step after rejected commits");
        CHECK(red.tokens_processed() == 0);
        EXPECT_NO_THROW(red.commit(0, 0, V - 1), "commit(token id n_vocab - 1)");
        red.finish(0, 1);
        CHECK(red.tokens_processed() == 1 && red.eta(0).size() == 1u && red.n_active(0).size() == 1u);
        EXPECT_THROW(ParamError, red.begin(1, L + 1, F, 4), "begin with another n_layers");
        EXPECT_THROW(ParamError, red.begin(1, L, F - 1, 4), "begin with another n_ff");
    }

    // Impossible parameters.
    {
        auto make = [&](ContributionParams q) { ContributionReducer r(cw, q); };
        ContributionParams q = p;
        q.chunk = 0;
        EXPECT_THROW(ParamError, make(q), "chunk 0");
        q = p;
        q.top_per_layer = 0;
        EXPECT_THROW(ParamError, make(q), "top_per_layer 0");
        q = p;
        q.eta_rank = 0;
        EXPECT_THROW(ParamError, make(q), "eta_rank 0");
        q = p;
        q.n_threads = 0;  // clamped to 1
        EXPECT_NO_THROW(make(q), "n_threads 0");
        EXPECT_THROW(ParamError, ContributionReducer(nullptr, p), "no weights");
    }
}

// Weights that do not fit the model: ModelError naming the tensor, or ParamError for a shape that
// cannot be a model.
void test_nad_weights_errors() {
    TempDir dir;
    const int L = 3, V = 7;
    const int64_t F = 10, E = 12;
    const std::string good = dir.file("good.gguf");
    write_nad_gguf(good, L, F, E, V, 12);
    GgufFile g(good);
    EXPECT_NO_THROW(ContributionWeights(g, L, F, E, V), "matching shape");
    EXPECT_NO_THROW(ContributionWeights(g, L - 1, F, E, V - 2), "fewer layers and a smaller vocabulary");
    EXPECT_THROW_MSG(ModelError, ContributionWeights(g, L, F + 1, E, V), "ffn_down.weight' has shape", "n_ff + 1");
    EXPECT_THROW_MSG(ModelError, ContributionWeights(g, L, F - 1, E, V), "ffn_down.weight' has shape", "n_ff - 1");
    EXPECT_THROW_MSG(ModelError, ContributionWeights(g, L, F, E + 1, V), "ffn_down.weight' has shape", "n_embd + 1");
    EXPECT_THROW_MSG(ModelError, ContributionWeights(g, L + 1, F, E, V), "blk.3.ffn_down.weight' missing", "n_layers + 1");
    EXPECT_THROW_MSG(ModelError, ContributionWeights(g, L, F, E, V + 1), "unembedding", "n_vocab + 1");
    for (int bad : {0, -1})
        EXPECT_THROW(ParamError, ContributionWeights(g, bad, F, E, V), "n_layers " + std::to_string(bad));
    EXPECT_THROW(ParamError, ContributionWeights(g, L, 0, E, V), "n_ff 0");
    EXPECT_THROW(ParamError, ContributionWeights(g, L, F, 0, V), "n_embd 0");
    EXPECT_THROW(ParamError, ContributionWeights(g, L, F, E, 0), "n_vocab 0");

    NadFileOptions o;
    o.bad_layer = 1;
    const std::string bad = dir.file("bad-layer.gguf");
    write_nad_gguf(bad, L, F, E, V, 13, o);
    GgufFile b(bad);
    EXPECT_THROW_MSG(ModelError, ContributionWeights(b, L, F, E, V), "blk.1.ffn_down.weight' has shape 11 x 12",
                     "layer 1's ffn_down is n_ff + 1 wide");
    EXPECT_NO_THROW(ContributionWeights(b, 1, F, E, V), "only layer 0, which fits");

    // No unembedding at all: a file with only the ffn_down tensors.
    {
        const std::string p = dir.file("no-unembedding.gguf");
        gguf_context* gc = gguf_init_empty();
        gguf_set_val_str(gc, "general.architecture", "llama");
        ggml_init_params ip{/*mem_size=*/1 << 16, /*mem_buffer=*/nullptr, /*no_alloc=*/false};
        ggml_context* tctx = ggml_init(ip);
        ggml_tensor* t = ggml_new_tensor_2d(tctx, GGML_TYPE_F32, F, E);
        ggml_set_name(t, "blk.0.ffn_down.weight");
        std::memset(t->data, 0, ggml_nbytes(t));
        gguf_add_tensor(gc, t);
        const bool ok = gguf_write_to_file(gc, p.c_str(), false);
        gguf_free(gc);
        ggml_free(tctx);
        CHECK(ok);
        GgufFile f(p);
        EXPECT_THROW_MSG(ModelError, ContributionWeights(f, 1, F, E, V), "no unembedding", "no unembedding tensor");
    }
}

// output.weight (untied) in F16: it unembeds, not token_embd, and is dequantized exactly.
void test_nad_untied_f16() {
    TempDir dir;
    const int L = 2, V = 5;
    const int64_t F = 9, E = 16;
    NadFileOptions o;
    o.with_output = true;
    o.unembed_type = GGML_TYPE_F16;
    const std::string path = dir.file("untied.gguf");
    const NadWeights w = write_nad_gguf(path, L, F, E, V, 14, o);
    GgufFile file(path);
    auto cw = std::make_shared<const ContributionWeights>(file, L, F, E, V);
    CHECK(cw->unembedding_name() == "output.weight");
    CHECK(cw->memory_bytes() == 0);
    std::vector<float> row(static_cast<size_t>(E));
    cw->unembed_row(3, row.data());
    CHECK(std::equal(row.begin(), row.end(), w.unembed.begin() + 3 * E));
    ContributionParams p;
    p.chunk = 2;
    p.top_per_layer = 3;
    p.eta_rank = 4;
    p.keep_top = true;
    const std::vector<NadSample> samples = {nad_sample(4, false, L, F, V, 200), nad_sample(3, true, L, F, V, 201),
                                            nad_sample(1, false, L, F, V, 202)};
    const auto refs = check_nad_run(cw, w, p, samples, "untied F16");
    check_nad_not_trivial(refs, "untied F16");
}

// The paper's parameters (top 64 per layer, eta the 500th largest, chunks of 32) on a wider model,
// large enough that the contribution pass runs on two OpenMP threads.
void test_nad_paper_params() {
    TempDir dir;
    const int L = 8, V = 5;
    const int64_t F = 15000, E = 16;
    NadFileOptions o;
    o.wmax = 7;
    const std::string path = dir.file("wide.gguf");
    const NadWeights w = write_nad_gguf(path, L, F, E, V, 15, o);
    GgufFile file(path);
    auto cw = std::make_shared<const ContributionWeights>(file, L, F, E, V);
    ContributionParams p;
    CHECK(p.chunk == 32 && p.top_per_layer == 64 && p.eta_rank == 500);
    p.keep_top = true;
    p.n_threads = 2;
    const std::vector<NadSample> samples = {nad_sample(3, false, L, F, V, 300, true), nad_sample(3, true, L, F, V, 301, true)};
    const auto refs = check_nad_run(cw, w, p, samples, "paper parameters");
    check_nad_not_trivial(refs, "paper parameters");
    int64_t active = 0;
    for (const auto& r : refs)
        for (int32_t a : r.n_active) active += a;
    std::printf("  %lld neurons activated over 6 tokens (at most %d each)\n", static_cast<long long>(active), L * 64);
}

// gate_variant: a = act(gate): on_row is ignored and on_gate_row stores SiLU(g) (GELU with gelu).
// Non-finite activations (fp16 overflow upstream, inf x 0) must not break the ranking: a NaN
// contribution ranks last and is never activated; +inf ranks first. Under ASan this also proves
// the selection never reads past its candidates.
void test_nad_non_finite() {
    TempDir dir;
    const int L = 2, V = 5;
    const int64_t F = 10, E = 8;
    const std::string path = dir.file("nan.gguf");
    write_nad_gguf(path, L, F, E, V, 21);
    GgufFile file(path);
    auto cw = std::make_shared<const ContributionWeights>(file, L, F, E, V);
    for (bool gate : {false, true}) {
        ContributionParams p;
        p.gate_variant = gate;
        p.top_per_layer = 4;
        p.eta_rank = 5;
        p.chunk = 1;
        p.keep_top = true;
        ContributionReducer red(cw, p);
        red.begin(1, L, F, 4);
        std::vector<float> row(static_cast<size_t>(F), 0.5f);
        row[1] = std::nanf("");
        row[3] = gate ? -INFINITY : std::nanf("");  // SiLU(-inf) would be -inf / inf = NaN
        for (int l = 0; l < L; ++l) {
            if (gate) red.on_gate_row(0, 0, l, row.data());
            else red.on_row(0, 0, l, row.data());
        }
        red.commit(0, 0, 2);
        red.end_step();
        red.finish(0, 1);
        const auto& ti = red.top_index(0);
        const auto& tc = red.top_values(0);
        CHECK(ti.size() == static_cast<size_t>(L) * 4);
        for (size_t k = 0; k < ti.size(); ++k) {
            CHECK_MSG(!std::isnan(tc[k]), "a NaN contribution was kept in a top list");
            CHECK(ti[k] >= 0 && ti[k] < F);
            if (!gate) CHECK_MSG(ti[k] != 1 && ti[k] != 3, "a NaN neuron ranked in the top 4 of 10");
        }
        const int64_t n_bits = popcount(red.sets(0).data(), static_cast<int64_t>(red.sets(0).size()));
        CHECK(n_bits == red.n_active(0)[0]);
        CHECK(n_bits <= 4);
    }
}

void test_nad_gate_variant() {
    TempDir dir;
    const int L = 2, V = 5;
    const int64_t F = 10, E = 8;
    const std::string path = dir.file("gate.gguf");
    const NadWeights w = write_nad_gguf(path, L, F, E, V, 16);
    GgufFile file(path);
    auto cw = std::make_shared<const ContributionWeights>(file, L, F, E, V);

    // Gate pre-activations in [-6, 6], not dyadic; neurons 2 and 5 (equal columns) get equal gates.
    std::vector<NadSample> samples = {nad_sample(4, true, L, F, V, 400), nad_sample(3, false, L, F, V, 401)};
    std::mt19937 rng(402);
    std::uniform_real_distribution<float> u(-6.0f, 6.0f);
    for (NadSample& s : samples) {
        for (float& x : s.in) x = u(rng);
        for (int t = 0; t < s.rows(); ++t)
            for (int l = 0; l < L; ++l) s.in[(static_cast<size_t>(t) * L + l) * F + 5] = s.in[(static_cast<size_t>(t) * L + l) * F + 2];
    }
    auto silu = [](double x) { return x / (1.0 + std::exp(-x)); };
    auto gelu = [](double x) {
        return 0.5 * x * (1.0 + std::tanh(std::sqrt(2.0 / std::acos(-1.0)) * x * (1.0 + 0.044715 * x * x)));
    };
    auto acts_with = [&](const std::function<double(double)>& act) {
        return [&, act](const NadSample& s) {
            std::vector<double> a(static_cast<size_t>(s.n_tokens) * L * F);
            for (size_t k = 0; k < a.size(); ++k) a[k] = act(s.in[k]);
            return a;
        };
    };

    ContributionParams p;
    p.gate_variant = true;
    p.chunk = 2;
    p.top_per_layer = static_cast<int>(F);  // every neuron's contribution is kept: each one is checked
    p.eta_rank = 5;
    p.keep_top = true;
    const auto refs = check_nad_run(cw, w, p, samples, "gate SiLU", nullptr, acts_with(silu), 1e-5);
    check_nad_not_trivial(refs, "gate SiLU");

    // Neuron by neuron: the value kept for index i is SiLU(g_i) * (W_U[y] . W_down[:, i]).
    {
        ContributionReducer red(cw, p);
        run_nad(red, samples, L, F);
        int bad = 0, seen = 0;
        for (int s = 0; s < 2; ++s) {
            const auto& tc = red.top_values(s);
            const auto& ti = red.top_index(s);
            CHECK(tc.size() == static_cast<size_t>(samples[s].n_tokens) * L * F && ti.size() == tc.size());
            if (tc.size() != static_cast<size_t>(samples[s].n_tokens) * L * F || ti.size() != tc.size()) continue;
            for (int t = 0; t < samples[s].n_tokens; ++t)
                for (int l = 0; l < L; ++l)
                    for (int64_t r = 0; r < F; ++r) {
                        const size_t at = (static_cast<size_t>(t) * L + l) * F;
                        const int32_t i = ti[at + r];
                        const double want = silu(samples[s].in[at + i]) * w.dot(l, i, samples[s].ids[t]);
                        bad += !(std::fabs(tc[at + r] - want) <= 1e-5 * std::fabs(want) + 1e-30);
                        ++seen;
                    }
        }
        CHECK_MSG(bad == 0, std::to_string(bad) + " of " + std::to_string(seen) + " contributions are not SiLU(g) * dot");
    }

    // GELU: the tanh approximation in float cancels below g = -3 (1e-5 relative error there, all of
    // it by -6, if only 1e-8 absolute), so the gates are mapped to [-2.5, 6] for a relative check.
    std::vector<NadSample> gsamples = samples;
    for (NadSample& s : gsamples)
        for (float& x : s.in) x = -2.5f + (x + 6.0f) * (8.5f / 12.0f);
    ContributionParams pg = p;
    pg.gelu = true;
    pg.top_per_layer = 4;
    const auto grefs = check_nad_run(cw, w, pg, gsamples, "gate GELU", nullptr, acts_with(gelu), 1e-5);
    check_nad_not_trivial(grefs, "gate GELU");
}

}  // namespace

std::vector<TestCase> nad_tests() {
    return {
        {"nad", "nad_jaccard", test_nad_jaccard, false},
        {"nad", "nad_dots", test_nad_dots, false},
        {"nad", "nad_projection_kernels", test_nad_projection_kernels, false},
        {"nad", "nad_contributions", test_nad_contributions, false},
        {"nad", "nad_weights_errors", test_nad_weights_errors, false},
        {"nad", "nad_untied_f16", test_nad_untied_f16, false},
        {"nad", "nad_paper_params", test_nad_paper_params, false},
        {"nad", "nad_gate_variant", test_nad_gate_variant, false},
        {"nad", "nad_non_finite", test_nad_non_finite, false},
    };
}
