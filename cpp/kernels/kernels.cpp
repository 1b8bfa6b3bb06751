// The SIMD kernels (AVX-512, AVX2+FMA, portable) behind contributions, NEAT's attribution and
// NeuReasoner's projections, and the CPU dispatch that picks one per machine.
#include "kernels/kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <unordered_map>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "ggml.h"

namespace neurotap {

namespace {

// out[q] = col . U[q] for q < n (n <= kMaxBatch); U rows are E floats apart.
void dots_generic(const float* col, const float* U, int n, int64_t E, float* out) {
    for (int q = 0; q < n; ++q) {
        const float* u = U + static_cast<size_t>(q) * E;
        float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t e = 0;
        for (; e + 8 <= E; e += 8)
            for (int k = 0; k < 8; ++k) s[k] += col[e + k] * u[e + k];
        float t = 0;
        for (; e < E; ++e) t += col[e] * u[e];
        out[q] = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])) + t;
    }
}

#if defined(__x86_64__) || defined(__i386__)
// Four unembedding rows at a time share each load of the column. Compiled for AVX2+FMA and
// chosen at run time, so the extension still runs on CPUs without them.
__attribute__((target("avx2,fma"))) float hsum(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
    return _mm_cvtss_f32(lo);
}

__attribute__((target("avx2,fma"))) void dots_avx2(const float* col, const float* U, int n, int64_t E, float* out) {
    const int64_t E8 = E / 8 * 8;
    int q = 0;
    for (; q + 4 <= n; q += 4) {
        const float* u0 = U + static_cast<size_t>(q) * E;
        const float *u1 = u0 + E, *u2 = u1 + E, *u3 = u2 + E;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t e = 0; e < E8; e += 8) {
            const __m256 c = _mm256_loadu_ps(col + e);
            a0 = _mm256_fmadd_ps(c, _mm256_loadu_ps(u0 + e), a0);
            a1 = _mm256_fmadd_ps(c, _mm256_loadu_ps(u1 + e), a1);
            a2 = _mm256_fmadd_ps(c, _mm256_loadu_ps(u2 + e), a2);
            a3 = _mm256_fmadd_ps(c, _mm256_loadu_ps(u3 + e), a3);
        }
        float r[4] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)};
        for (int64_t e = E8; e < E; ++e) {
            r[0] += col[e] * u0[e], r[1] += col[e] * u1[e], r[2] += col[e] * u2[e], r[3] += col[e] * u3[e];
        }
        for (int k = 0; k < 4; ++k) out[q + k] = r[k];
    }
    for (; q < n; ++q) {
        const float* u = U + static_cast<size_t>(q) * E;
        __m256 a = _mm256_setzero_ps();
        for (int64_t e = 0; e < E8; e += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(col + e), _mm256_loadu_ps(u + e), a);
        float r = hsum(a);
        for (int64_t e = E8; e < E; ++e) r += col[e] * u[e];
        out[q] = r;
    }
}
#endif

// Neurons i0 .. n of the fused products and candidates (see ProductsFn), m candidates found so far.
int64_t products_from(const float* a, const float* d, int64_t i0, int64_t n, float guess, float* c, int32_t* idx,
                      int64_t m) {
    for (int64_t i = i0; i < n; ++i) {
        const float v = a[i] * d[i];
        c[i] = std::isnan(v) ? -INFINITY : v;  // NaN (inf activations, inf x 0) would break the ordering
        if (c[i] >= guess) idx[m++] = static_cast<int32_t>(i);
    }
    return m;
}

int64_t products_generic(const float* a, const float* d, int64_t n, float guess, float* c, int32_t* idx) {
    return products_from(a, d, 0, n, guess, c, idx, 0);
}

void axpy4_generic(const float* a, const float* x, int64_t ldx, float* y, int64_t n) {
    const float *x0 = x, *x1 = x + ldx, *x2 = x1 + ldx, *x3 = x2 + ldx;
    for (int64_t j = 0; j < n; ++j) {
        float v = y[j];
        v += a[0] * x0[j];
        v += a[1] * x1[j];
        v += a[2] * x2[j];
        v += a[3] * x3[j];
        y[j] = v;
    }
}

void axpy4x2_generic(const float* a0, const float* a1, const float* x, int64_t ldx, float* y0, float* y1, int64_t n) {
    axpy4_generic(a0, x, ldx, y0, n);
    axpy4_generic(a1, x, ldx, y1, n);
}

// ggml's block layouts (ggml-common.h): an fp16 scale, then the quants.
constexpr int64_t kQ4_0Bytes = 2 + 16, kQ4_1Bytes = 2 + 2 + 16, kQ8_0Bytes = 2 + 32;
// How far ahead of the block being dequantized its row is prefetched: a pass reads W_down from
// memory (the file's pages), and without it the loads stalled (a Q4_0 pass at the 4B shape took
// 0.36 s on one thread, 0.29 s with it).
constexpr int kPrefetch = 4096;

#if defined(__x86_64__) || defined(__i386__)
// Compiled for AVX2+FMA and chosen at run time, so the extension still runs on CPUs without them.
// Four dependent FMAs per 8 accumulators (the order of the generic kernel, which FMA contracts).
__attribute__((target("avx2,fma"))) void axpy4_avx2(const float* a, const float* x, int64_t ldx, float* y, int64_t n) {
    const float *x0 = x, *x1 = x + ldx, *x2 = x1 + ldx, *x3 = x2 + ldx;
    const __m256 a0 = _mm256_set1_ps(a[0]), a1 = _mm256_set1_ps(a[1]), a2 = _mm256_set1_ps(a[2]),
                 a3 = _mm256_set1_ps(a[3]);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256 v = _mm256_loadu_ps(y + j);
        v = _mm256_fmadd_ps(a0, _mm256_loadu_ps(x0 + j), v);
        v = _mm256_fmadd_ps(a1, _mm256_loadu_ps(x1 + j), v);
        v = _mm256_fmadd_ps(a2, _mm256_loadu_ps(x2 + j), v);
        v = _mm256_fmadd_ps(a3, _mm256_loadu_ps(x3 + j), v);
        _mm256_storeu_ps(y + j, v);
    }
    for (; j < n; ++j) {
        float v = y[j];
        v = std::fma(a[0], x0[j], v);
        v = std::fma(a[1], x1[j], v);
        v = std::fma(a[2], x2[j], v);
        v = std::fma(a[3], x3[j], v);
        y[j] = v;
    }
}

// Two accumulator rows at once (y0 with a0, y1 with a1): each load of x feeds two FMAs, so the
// kernel is bound by the FMA units rather than by loads. Same order of additions as axpy4.
__attribute__((target("avx2,fma"))) void axpy4x2_avx2(const float* a0s, const float* a1s, const float* x, int64_t ldx,
                                                      float* y0, float* y1, int64_t n) {
    const float *x0 = x, *x1 = x + ldx, *x2 = x1 + ldx, *x3 = x2 + ldx;
    const __m256 a00 = _mm256_set1_ps(a0s[0]), a01 = _mm256_set1_ps(a0s[1]), a02 = _mm256_set1_ps(a0s[2]),
                 a03 = _mm256_set1_ps(a0s[3]);
    const __m256 a10 = _mm256_set1_ps(a1s[0]), a11 = _mm256_set1_ps(a1s[1]), a12 = _mm256_set1_ps(a1s[2]),
                 a13 = _mm256_set1_ps(a1s[3]);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        const __m256 r0 = _mm256_loadu_ps(x0 + j), r1 = _mm256_loadu_ps(x1 + j), r2 = _mm256_loadu_ps(x2 + j),
                     r3 = _mm256_loadu_ps(x3 + j);
        __m256 v = _mm256_loadu_ps(y0 + j), w = _mm256_loadu_ps(y1 + j);
        v = _mm256_fmadd_ps(a00, r0, v);
        w = _mm256_fmadd_ps(a10, r0, w);
        v = _mm256_fmadd_ps(a01, r1, v);
        w = _mm256_fmadd_ps(a11, r1, w);
        v = _mm256_fmadd_ps(a02, r2, v);
        w = _mm256_fmadd_ps(a12, r2, w);
        v = _mm256_fmadd_ps(a03, r3, v);
        w = _mm256_fmadd_ps(a13, r3, w);
        _mm256_storeu_ps(y0 + j, v);
        _mm256_storeu_ps(y1 + j, w);
    }
    if (j < n) {
        axpy4_avx2(a0s, x + j, ldx, y0 + j, n - j);
        axpy4_avx2(a1s, x + j, ldx, y1 + j, n - j);
    }
}

// The projection's register-blocked kernel (see PanelFn): MR accumulator rows of 16 neurons stay in
// registers over the kc rows of a packed panel, each weight load feeding MR FMAs.
template <int MR>
__attribute__((target("avx2,fma"), always_inline)) inline void panel_tile(const float* U, int64_t ldu, const float* p,
                                                                         int kc, float* D, int64_t ldd) {
    __m256 acc0[MR], acc1[MR];
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
        acc0[m] = _mm256_loadu_ps(D + m * ldd);
        acc1[m] = _mm256_loadu_ps(D + m * ldd + 8);
    }
    for (int k = 0; k < kc; ++k, p += 16) {
        const __m256 w0 = _mm256_loadu_ps(p), w1 = _mm256_loadu_ps(p + 8);
#pragma GCC unroll 8
        for (int m = 0; m < MR; ++m) {
            const __m256 b = _mm256_broadcast_ss(U + m * ldu + k);
            acc0[m] = _mm256_fmadd_ps(b, w0, acc0[m]);
            acc1[m] = _mm256_fmadd_ps(b, w1, acc1[m]);
        }
    }
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
        _mm256_storeu_ps(D + m * ldd, acc0[m]);
        _mm256_storeu_ps(D + m * ldd + 8, acc1[m]);
    }
}

__attribute__((target("avx2,fma"))) void panel_avx2(const float* U, int64_t ldu, int M, const float* P, int kc,
                                                    int64_t n, float* D, int64_t ldd) {
    for (int64_t j = 0; j < n; j += 16) {
        const float* p = P + (j / 16) * panel_stride(kc);
        float* d = D + j;
        int m = 0;
        for (; m + 6 <= M; m += 6) panel_tile<6>(U + m * ldu, ldu, p, kc, d + m * ldd, ldd);
        switch (M - m) {
            case 5: panel_tile<5>(U + m * ldu, ldu, p, kc, d + m * ldd, ldd); break;
            case 4: panel_tile<4>(U + m * ldu, ldu, p, kc, d + m * ldd, ldd); break;
            case 3: panel_tile<3>(U + m * ldu, ldu, p, kc, d + m * ldd, ldd); break;
            case 2: panel_tile<2>(U + m * ldu, ldu, p, kc, d + m * ldd, ldd); break;
            case 1: panel_tile<1>(U + m * ldu, ldu, p, kc, d + m * ldd, ldd); break;
            default: break;
        }
    }
}

// The same with AVX-512: one 16-neuron column block per register, MR x NB blocks per tile (six
// rows by 2 blocks; the last M % 6 rows by up to 8). Per lane the same FMAs in the same order, so
// the same bits as the AVX2 kernel.
template <int MR, int NB>
__attribute__((target("avx512f"), always_inline)) inline void panel_tile512(const float* U, int64_t ldu, const float* p,
                                                                           int64_t pstride, int kc, float* D, int64_t ldd) {
    __m512 acc[MR][NB];
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
        for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_loadu_ps(D + m * ldd + 16 * b);
    for (int k = 0; k < kc; ++k) {
        __m512 w[NB];
#pragma GCC unroll 8
        for (int b = 0; b < NB; ++b) w[b] = _mm512_loadu_ps(p + b * pstride + 16 * k);
#pragma GCC unroll 8
        for (int m = 0; m < MR; ++m) {
            const __m512 u = _mm512_set1_ps(U[m * ldu + k]);
#pragma GCC unroll 8
            for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_fmadd_ps(u, w[b], acc[m][b]);
        }
    }
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
        for (int b = 0; b < NB; ++b) _mm512_storeu_ps(D + m * ldd + 16 * b, acc[m][b]);
}

// One column tile of NB blocks for M rows of U, M a multiple of 6.
template <int NB>
__attribute__((target("avx512f"))) void panel_cols512(const float* U, int64_t ldu, int M, const float* p, int64_t pstride,
                                                      int kc, float* d, int64_t ldd) {
    for (int m = 0; m < M; m += 6) panel_tile512<6, NB>(U + m * ldu, ldu, p, pstride, kc, d + m * ldd, ldd);
}

// MR rows of U across all n neurons, NB column blocks a tile, then fewer where n leaves less.
template <int MR, int NB>
__attribute__((target("avx512f"))) void panel_strip512(const float* U, int64_t ldu, const float* P, int64_t ps, int kc,
                                                       int64_t n, float* D, int64_t ldd) {
    int64_t j = 0;
    for (; j + 16 * NB <= n; j += 16 * NB) panel_tile512<MR, NB>(U, ldu, P + (j / 16) * ps, ps, kc, D + j, ldd);
    if constexpr (NB > 1)
        if (j < n) panel_strip512<MR, NB / 2>(U, ldu, P + (j / 16) * ps, ps, kc, n - j, D + j, ldd);
}

__attribute__((target("avx512f"))) void panel_avx512(const float* U, int64_t ldu, int M, const float* P, int kc,
                                                     int64_t n, float* D, int64_t ldd) {
    const int64_t ps = panel_stride(kc);
    const int M6 = M / 6 * 6;
    if (M6 > 0) {
        int64_t j = 0;
        for (; j + 32 <= n; j += 32) panel_cols512<2>(U, ldu, M6, P + (j / 16) * ps, ps, kc, D + j, ldd);
        if (j < n) panel_cols512<1>(U, ldu, M6, P + (j / 16) * ps, ps, kc, D + j, ldd);
    }
    // The last M % 6 rows in tiles of at least 8 independent accumulators, which the FMAs' latency
    // needs: in 32-neuron tiles a lone row had 2 and ran at a quarter of the FMA rate (an MoE
    // expert's projection often has few vectors: the ids of one pass that ran it).
    const float* Ur = U + static_cast<int64_t>(M6) * ldu;
    float* Dr = D + static_cast<int64_t>(M6) * ldd;
    switch (M - M6) {
        case 5: panel_strip512<5, 2>(Ur, ldu, P, ps, kc, n, Dr, ldd); break;
        case 4: panel_strip512<4, 2>(Ur, ldu, P, ps, kc, n, Dr, ldd); break;
        case 3: panel_strip512<3, 4>(Ur, ldu, P, ps, kc, n, Dr, ldd); break;
        case 2: panel_strip512<2, 4>(Ur, ldu, P, ps, kc, n, Dr, ldd); break;
        case 1: panel_strip512<1, 8>(Ur, ldu, P, ps, kc, n, Dr, ldd); break;
        default: break;
    }
}

// NEUROTAP_NO_AVX512=1 keeps to the AVX2 kernels, to measure what a CPU without AVX-512 gets.
bool has_avx512f() {
    static const bool yes = [] {
        __builtin_cpu_init();
        const char* off = std::getenv("NEUROTAP_NO_AVX512");
        return __builtin_cpu_supports("avx512f") && !(off && *off && std::strcmp(off, "0") != 0);
    }();
    return yes;
}

// q * d per value, as ggml's dequantize_row_q4_0 (elements 0-15 the low nibbles, 16-31 the high),
// value i to out[(i / 16) * stride + i % 16].
__attribute__((target("avx2,fma,f16c"))) void dequant_q4_0_avx2(const void* blocks, float* out, int64_t n,
                                                               int64_t stride) {
    const uint8_t* b = static_cast<const uint8_t*>(blocks);
    const __m128i low4 = _mm_set1_epi8(0x0f);
    const __m256i eight = _mm256_set1_epi32(8);
    for (int64_t i = 0; i < n; i += 32, b += kQ4_0Bytes, out += 2 * stride) {
        _mm_prefetch(reinterpret_cast<const char*>(b) + kPrefetch, _MM_HINT_T0);
        uint16_t h;
        std::memcpy(&h, b, 2);
        const __m256 d = _mm256_set1_ps(_cvtsh_ss(h));
        const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2));
        const __m128i lo = _mm_and_si128(q, low4), hi = _mm_and_si128(_mm_srli_epi16(q, 4), low4);
        const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
        float* const dst[4] = {out, out + 8, out + stride, out + stride + 8};
        for (int k = 0; k < 4; ++k) {
            const __m256i v = _mm256_sub_epi32(_mm256_cvtepu8_epi32(parts[k]), eight);
            _mm256_storeu_ps(dst[k], _mm256_mul_ps(_mm256_cvtepi32_ps(v), d));
        }
    }
}

__attribute__((target("avx2,fma,f16c"))) void dequant_q8_0_avx2(const void* blocks, float* out, int64_t n,
                                                               int64_t stride) {
    const uint8_t* b = static_cast<const uint8_t*>(blocks);
    for (int64_t i = 0; i < n; i += 32, b += kQ8_0Bytes, out += 2 * stride) {
        _mm_prefetch(reinterpret_cast<const char*>(b) + kPrefetch, _MM_HINT_T0);
        uint16_t h;
        std::memcpy(&h, b, 2);
        const __m256 d = _mm256_set1_ps(_cvtsh_ss(h));
        float* const dst[4] = {out, out + 8, out + stride, out + stride + 8};
        for (int k = 0; k < 4; ++k) {
            const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 2 + 8 * k));
            _mm256_storeu_ps(dst[k], _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d));
        }
    }
}

// AVX-512: the 16 bytes widened once to 16 lanes, then each lane's low nibble is element j, its
// high nibble element 16 + j: half the instructions of the AVX2 kernel, the same values.
__attribute__((target("avx512f,f16c"))) void dequant_q4_0_avx512(const void* blocks, float* out, int64_t n,
                                                            int64_t stride) {
    const uint8_t* b = static_cast<const uint8_t*>(blocks);
    const __m512i low4 = _mm512_set1_epi32(0x0f), eight = _mm512_set1_epi32(8);
    for (int64_t i = 0; i < n; i += 32, b += kQ4_0Bytes, out += 2 * stride) {
        _mm_prefetch(reinterpret_cast<const char*>(b) + kPrefetch, _MM_HINT_T0);
        uint16_t h;
        std::memcpy(&h, b, 2);
        const __m512 d = _mm512_set1_ps(_cvtsh_ss(h));
        const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2)));
        const __m512i lo = _mm512_sub_epi32(_mm512_and_si512(q, low4), eight);
        const __m512i hi = _mm512_sub_epi32(_mm512_srli_epi32(q, 4), eight);
        _mm512_storeu_ps(out, _mm512_mul_ps(_mm512_cvtepi32_ps(lo), d));
        _mm512_storeu_ps(out + stride, _mm512_mul_ps(_mm512_cvtepi32_ps(hi), d));
    }
}

__attribute__((target("avx512f,f16c"))) void dequant_q8_0_avx512(const void* blocks, float* out, int64_t n,
                                                            int64_t stride) {
    const uint8_t* b = static_cast<const uint8_t*>(blocks);
    for (int64_t i = 0; i < n; i += 32, b += kQ8_0Bytes, out += 2 * stride) {
        _mm_prefetch(reinterpret_cast<const char*>(b) + kPrefetch, _MM_HINT_T0);
        uint16_t h;
        std::memcpy(&h, b, 2);
        const __m512 d = _mm512_set1_ps(_cvtsh_ss(h));
        const __m512i q0 = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2)));
        const __m512i q1 = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 18)));
        _mm512_storeu_ps(out, _mm512_mul_ps(_mm512_cvtepi32_ps(q0), d));
        _mm512_storeu_ps(out + stride, _mm512_mul_ps(_mm512_cvtepi32_ps(q1), d));
    }
}

// The fused products and candidates of a layer (see ProductsFn), 8 at a time.
__attribute__((target("avx2,fma"))) int64_t products_avx2(const float* a, const float* d, int64_t n, float guess,
                                                          float* c, int32_t* idx) {
    const __m256 g = _mm256_set1_ps(guess), ninf = _mm256_set1_ps(-INFINITY);
    int64_t m = 0, i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_mul_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(d + i));
        v = _mm256_blendv_ps(v, ninf, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        _mm256_storeu_ps(c + i, v);
        unsigned bits = static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(v, g, _CMP_GE_OQ)));
        while (bits) {
            idx[m++] = static_cast<int32_t>(i + __builtin_ctz(bits));
            bits &= bits - 1;
        }
    }
    return products_from(a, d, i, n, guess, c, idx, m);
}

// q * d + m per value, as ggml's dequantize_row_q4_1 (two roundings: ggml-base is built for the
// baseline ISA, so its C is not contracted to an FMA; contraction is off here for the same sums;
// the weights check every fast kernel against to_float at load and fall back if one differs).
__attribute__((target("avx2,fma,f16c"), optimize("fp-contract=off"))) void dequant_q4_1_avx2(const void* blocks,
                                                                                            float* out, int64_t n,
                                                                                            int64_t stride) {
    const uint8_t* b = static_cast<const uint8_t*>(blocks);
    const __m128i low4 = _mm_set1_epi8(0x0f);
    for (int64_t i = 0; i < n; i += 32, b += kQ4_1Bytes, out += 2 * stride) {
        _mm_prefetch(reinterpret_cast<const char*>(b) + kPrefetch, _MM_HINT_T0);
        uint16_t h[2];
        std::memcpy(h, b, 4);
        const __m256 d = _mm256_set1_ps(_cvtsh_ss(h[0])), m = _mm256_set1_ps(_cvtsh_ss(h[1]));
        const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 4));
        const __m128i lo = _mm_and_si128(q, low4), hi = _mm_and_si128(_mm_srli_epi16(q, 4), low4);
        const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
        float* const dst[4] = {out, out + 8, out + stride, out + stride + 8};
        for (int k = 0; k < 4; ++k) {
            const __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[k])), d);
            _mm256_storeu_ps(dst[k], _mm256_add_ps(v, m));
        }
    }
}

__attribute__((target("avx512f,f16c"), optimize("fp-contract=off"))) void dequant_q4_1_avx512(const void* blocks,
                                                                                             float* out, int64_t n,
                                                                                             int64_t stride) {
    const uint8_t* b = static_cast<const uint8_t*>(blocks);
    const __m512i low4 = _mm512_set1_epi32(0x0f);
    for (int64_t i = 0; i < n; i += 32, b += kQ4_1Bytes, out += 2 * stride) {
        _mm_prefetch(reinterpret_cast<const char*>(b) + kPrefetch, _MM_HINT_T0);
        uint16_t h[2];
        std::memcpy(h, b, 4);
        const __m512 d = _mm512_set1_ps(_cvtsh_ss(h[0])), m = _mm512_set1_ps(_cvtsh_ss(h[1]));
        const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 4)));
        const __m512 lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(q, low4)), d);
        const __m512 hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4)), d);
        _mm512_storeu_ps(out, _mm512_add_ps(lo, m));
        _mm512_storeu_ps(out + stride, _mm512_add_ps(hi, m));
    }
}

// MXFP4 (gpt-oss's experts), as ggml's dequantize_row_mxfp4: a block is an E8M0 exponent e and
// 16 bytes of 4-bit E2M1 codes (elements 0-15 the low nibbles, 16-31 the high), value
// kvalues_mxfp4[code] * 2^(e - 128). The products are exact (small integers times a power of two),
// so only the table and the scale must match ggml's: ggml's C is a scalar table lookup (about
// 1 ns a value here, the larger part of a gpt-oss pass), a byte shuffle does 16 lookups at once.
constexpr int64_t kMxfp4Bytes = 1 + 16;
alignas(16) constexpr int8_t kMxfp4Values[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

// ggml_e8m0_to_fp32_half: 2^(e - 128), the two smallest as subnormals.
inline float e8m0_half(uint8_t e) {
    const uint32_t bits = e < 2 ? 0x00200000u << e : static_cast<uint32_t>(e - 1) << 23;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

__attribute__((target("avx2,fma,f16c"))) void dequant_mxfp4_avx2(const void* blocks, float* out, int64_t n,
                                                                int64_t stride) {
    const uint8_t* b = static_cast<const uint8_t*>(blocks);
    const __m128i table = _mm_load_si128(reinterpret_cast<const __m128i*>(kMxfp4Values)), low4 = _mm_set1_epi8(0x0f);
    for (int64_t i = 0; i < n; i += 32, b += kMxfp4Bytes, out += 2 * stride) {
        _mm_prefetch(reinterpret_cast<const char*>(b) + kPrefetch, _MM_HINT_T0);
        const __m256 d = _mm256_set1_ps(e8m0_half(b[0]));
        const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 1));
        const __m128i lo = _mm_shuffle_epi8(table, _mm_and_si128(q, low4));
        const __m128i hi = _mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16(q, 4), low4));
        const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
        float* const dst[4] = {out, out + 8, out + stride, out + stride + 8};
        for (int k = 0; k < 4; ++k)
            _mm256_storeu_ps(dst[k], _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(parts[k])), d));
    }
}

__attribute__((target("avx512f,avx2,f16c"))) void dequant_mxfp4_avx512(const void* blocks, float* out, int64_t n,
                                                                      int64_t stride) {
    const uint8_t* b = static_cast<const uint8_t*>(blocks);
    const __m128i table = _mm_load_si128(reinterpret_cast<const __m128i*>(kMxfp4Values)), low4 = _mm_set1_epi8(0x0f);
    for (int64_t i = 0; i < n; i += 32, b += kMxfp4Bytes, out += 2 * stride) {
        _mm_prefetch(reinterpret_cast<const char*>(b) + kPrefetch, _MM_HINT_T0);
        const __m512 d = _mm512_set1_ps(e8m0_half(b[0]));
        const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 1));
        const __m128i lo = _mm_shuffle_epi8(table, _mm_and_si128(q, low4));
        const __m128i hi = _mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16(q, 4), low4));
        _mm512_storeu_ps(out, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo)), d));
        _mm512_storeu_ps(out + stride, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi)), d));
    }
}

// Q4_K (K-quant experts, OLMoE and Qwen3-MoE's Q4_K files), as ggml's dequantize_row_q4_K: a block
// of 256 values is fp16 d and dmin, 12 bytes of 6-bit sub-block scales and mins, then 128 bytes of
// nibbles; in each 64 values, 32 bytes give the low nibbles (first 32) and the high ones (next 32),
// value = (d * sc) * q - (dmin * m), two roundings as ggml's C (no FMA: contraction off).
constexpr int64_t kQ4_KBytes = 2 + 2 + 12 + 128;

// Prefetches `lines` cache lines kPrefetch bytes ahead of block b (a K-quant block spans several).
inline void prefetch_block(const uint8_t* b, int lines) {
    for (int p = 0; p < lines; ++p) _mm_prefetch(reinterpret_cast<const char*>(b) + kPrefetch + 64 * p, _MM_HINT_T0);
}

// Q4_K block b's 8 sub-block scales d * sc and mins dmin * m, each one rounding as ggml's C forms
// them (get_scale_min_k4: 6-bit scales and mins, the last four split across bytes). The 12 bytes
// are unpacked to 8 scale bytes and 8 min bytes with ggml's own word masks (its AVX2 vec_dot_q4_K),
// then converted and scaled 8 at a time, in fewer instructions than unpacking a byte at a time
// (a pass at OLMoE's shape is bound by reading W_down from memory: perf showed the same share).
__attribute__((target("avx2,f16c"))) inline void q4_k_scales(const uint8_t* b, float* dsc, float* dm) {
    uint16_t h[2];
    std::memcpy(h, b, 4);
    constexpr uint32_t kmask1 = 0x3f3f3f3f, kmask2 = 0x0f0f0f0f, kmask3 = 0x03030303;
    uint32_t u[4];
    std::memcpy(u, b + 4, 12);
    u[3] = ((u[2] >> 4) & kmask2) | (((u[1] >> 6) & kmask3) << 4);  // mins 4-7
    const uint32_t mins = u[1] & kmask1;                            // mins 0-3
    u[1] = (u[2] & kmask2) | (((u[0] >> 6) & kmask3) << 4);         // scales 4-7
    u[2] = mins;
    u[0] &= kmask1;                                                 // scales 0-3
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(u));
    const __m256 sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
    const __m256 m = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(v, 8)));
    _mm256_storeu_ps(dsc, _mm256_mul_ps(_mm256_set1_ps(_cvtsh_ss(h[0])), sc));
    _mm256_storeu_ps(dm, _mm256_mul_ps(_mm256_set1_ps(_cvtsh_ss(h[1])), m));
}

__attribute__((target("avx2,fma,f16c"), optimize("fp-contract=off"))) void dequant_q4_k_avx2(const void* blocks,
                                                                                            float* out, int64_t n,
                                                                                            int64_t stride) {
    const uint8_t* b = static_cast<const uint8_t*>(blocks);
    const __m128i low4 = _mm_set1_epi8(0x0f);
    for (int64_t i = 0; i < n; i += 256, b += kQ4_KBytes, out += 16 * stride) {
        prefetch_block(b, 3);
        float dsc[8], dm[8];
        q4_k_scales(b, dsc, dm);
        const uint8_t* q = b + 16;
        for (int j = 0; j < 4; ++j, q += 32) {
            const __m256 d1 = _mm256_set1_ps(dsc[2 * j]), m1 = _mm256_set1_ps(dm[2 * j]);
            const __m256 d2 = _mm256_set1_ps(dsc[2 * j + 1]), m2 = _mm256_set1_ps(dm[2 * j + 1]);
            for (int h16 = 0; h16 < 2; ++h16) {  // bytes 16 h16 .. 16 h16 + 15: values 64 j + 16 h16 + (0 | 32) + l
                const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16 * h16));
                const __m128i lo = _mm_and_si128(v, low4), hi = _mm_and_si128(_mm_srli_epi16(v, 4), low4);
                float* const dl = out + (4 * j + h16) * stride;      // column block of value 64 j + 16 h16
                float* const dh = out + (4 * j + 2 + h16) * stride;  // of value 64 j + 32 + 16 h16
                const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
                float* const dst[4] = {dl, dl + 8, dh, dh + 8};
                for (int k = 0; k < 4; ++k) {
                    const __m256 x = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[k]));
                    _mm256_storeu_ps(dst[k], k < 2 ? _mm256_sub_ps(_mm256_mul_ps(d1, x), m1)
                                                   : _mm256_sub_ps(_mm256_mul_ps(d2, x), m2));
                }
            }
        }
    }
}

__attribute__((target("avx512f,avx2,f16c"), optimize("fp-contract=off"))) void dequant_q4_k_avx512(const void* blocks,
                                                                                             float* out, int64_t n,
                                                                                             int64_t stride) {
    const uint8_t* b = static_cast<const uint8_t*>(blocks);
    const __m512i low4 = _mm512_set1_epi32(0x0f);
    for (int64_t i = 0; i < n; i += 256, b += kQ4_KBytes, out += 16 * stride) {
        prefetch_block(b, 3);
        float dsc[8], dm[8];
        q4_k_scales(b, dsc, dm);
        const uint8_t* q = b + 16;
        for (int j = 0; j < 4; ++j, q += 32) {
            const __m512 d1 = _mm512_set1_ps(dsc[2 * j]), m1 = _mm512_set1_ps(dm[2 * j]);
            const __m512 d2 = _mm512_set1_ps(dsc[2 * j + 1]), m2 = _mm512_set1_ps(dm[2 * j + 1]);
            for (int h16 = 0; h16 < 2; ++h16) {
                const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16 * h16)));
                const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, low4));
                const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
                _mm512_storeu_ps(out + (4 * j + h16) * stride, _mm512_sub_ps(_mm512_mul_ps(d1, lo), m1));
                _mm512_storeu_ps(out + (4 * j + 2 + h16) * stride, _mm512_sub_ps(_mm512_mul_ps(d2, hi), m2));
            }
        }
    }
}

// Q6_K (the down projection of most Q4_K_M files: llama.cpp gives half of their ffn_down layers
// 6 bits), as ggml's dequantize_row_q6_K, whose C took about 1 ns a value here: a block of 256
// values is 128 bytes of low nibbles, 64 of 2-bit high parts, 16 int8 scales, then fp16 d. Each
// 16 values share one scale: value = (d * scale) * (q - 32), in that order, as ggml's C.
constexpr int64_t kQ6_KBytes = 128 + 64 + 16 + 2;

// Column block c (values 16 c .. 16 c + 15) of a Q6_K block: its 16 low-nibble bytes, which
// nibble, its 16 high-part bytes, their shift, and its scale's index.
struct Q6KBlock {
    int ql, hi_nibble, qh, shift, scale;
};
constexpr Q6KBlock q6_k_block(int c) {
    // Half n of the block (128 values), group g of 32 values in it, h the 16 of the group.
    return {64 * (c / 8) + 32 * ((c % 8 / 2) % 2) + 16 * (c % 2), (c % 8 / 2) / 2, 32 * (c / 8) + 16 * (c % 2),
            2 * (c % 8 / 2), 8 * (c / 8) + c % 2 + 2 * (c % 8 / 2)};
}

// Q6_K block b's 16 scales times d (d * scale, the first of ggml's two roundings).
__attribute__((target("f16c"))) inline void q6_k_scales(const uint8_t* b, float* scale) {
    uint16_t h;
    std::memcpy(&h, b + 208, 2);
    const float d = _cvtsh_ss(h);
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    for (int j = 0; j < 16; ++j) scale[j] = d * static_cast<float>(sc[j]);
}

__attribute__((target("avx512f,f16c"), optimize("fp-contract=off"))) void dequant_q6_k_avx512(const void* blocks,
                                                                                             float* out, int64_t n,
                                                                                             int64_t stride) {
    const uint8_t* b = static_cast<const uint8_t*>(blocks);
    const __m512i low4 = _mm512_set1_epi32(0x0f), three = _mm512_set1_epi32(3), bias = _mm512_set1_epi32(32);
    for (int64_t i = 0; i < n; i += 256, b += kQ6_KBytes, out += 16 * stride) {
        prefetch_block(b, 4);
        float scale[16];
        q6_k_scales(b, scale);
#pragma GCC unroll 16
        for (int c = 0; c < 16; ++c) {
            const Q6KBlock k = q6_k_block(c);
            __m512i lo = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + k.ql)));
            lo = k.hi_nibble ? _mm512_srli_epi32(lo, 4) : _mm512_and_si512(lo, low4);
            __m512i hi = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 128 + k.qh)));
            hi = _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(hi, k.shift), three), 4);
            const __m512 q = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_or_si512(lo, hi), bias));
            _mm512_storeu_ps(out + c * stride, _mm512_mul_ps(_mm512_set1_ps(scale[k.scale]), q));
        }
    }
}

__attribute__((target("avx2,fma,f16c"), optimize("fp-contract=off"))) void dequant_q6_k_avx2(const void* blocks,
                                                                                            float* out, int64_t n,
                                                                                            int64_t stride) {
    const uint8_t* b = static_cast<const uint8_t*>(blocks);
    const __m256i low4 = _mm256_set1_epi32(0x0f), three = _mm256_set1_epi32(3), bias = _mm256_set1_epi32(32);
    for (int64_t i = 0; i < n; i += 256, b += kQ6_KBytes, out += 16 * stride) {
        prefetch_block(b, 4);
        float scale[16];
        q6_k_scales(b, scale);
#pragma GCC unroll 16
        for (int c = 0; c < 16; ++c) {
            const Q6KBlock k = q6_k_block(c);
            const __m256 s = _mm256_set1_ps(scale[k.scale]);
            for (int half = 0; half < 2; ++half) {
                __m256i lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + k.ql + 8 * half)));
                lo = k.hi_nibble ? _mm256_srli_epi32(lo, 4) : _mm256_and_si256(lo, low4);
                __m256i hi = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 128 + k.qh + 8 * half)));
                hi = _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(hi, k.shift), three), 4);
                const __m256 q = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_or_si256(lo, hi), bias));
                _mm256_storeu_ps(out + c * stride + 8 * half, _mm256_mul_ps(s, q));
            }
        }
    }
}

// What the CPU runs, read once: the extension is built for any x86-64 and picks its kernels here.
bool has_avx2_fma() {
    static const bool yes = [] {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    }();
    return yes;
}

bool has_avx2_fma_f16c() {
    static const bool yes = has_avx2_fma() && __builtin_cpu_supports("f16c");
    return yes;
}
#endif

}  // namespace

// The AVX2+FMA kernel `name`_avx2 where the CPU has them, else the portable `name`_generic.
#if defined(__x86_64__) || defined(__i386__)
#define AVX2_OR_GENERIC(name) (has_avx2_fma() ? &name##_avx2 : &name##_generic)
#else
#define AVX2_OR_GENERIC(name) (&name##_generic)
#endif

DotsFn dots_kernel_generic() { return &dots_generic; }

DotsFn dots_kernel() { return AVX2_OR_GENERIC(dots); }

Axpy4Fn axpy4_kernel_generic() { return &axpy4_generic; }

ProductsFn products_kernel_generic() { return &products_generic; }

ProductsFn products_kernel() { return AVX2_OR_GENERIC(products); }

PanelFn panel_kernel() {  // once: project() asks for every slice
    static const PanelFn chosen = [] {
        const std::vector<PanelFn> all = panel_kernels();
        return all.empty() ? nullptr : all.front();
    }();
    return chosen;
}

std::vector<PanelFn> panel_kernels() {
    std::vector<PanelFn> all;
#if defined(__x86_64__) || defined(__i386__)
    if (has_avx512f()) all.push_back(&panel_avx512);
    if (has_avx2_fma()) all.push_back(&panel_avx2);
#endif
    return all;
}

Axpy4x2Fn axpy4x2_kernel_generic() { return &axpy4x2_generic; }

Axpy4x2Fn axpy4x2_kernel() { return AVX2_OR_GENERIC(axpy4x2); }

Axpy4Fn axpy4_kernel() { return AVX2_OR_GENERIC(axpy4); }

// Whether `fast` gives exactly ggml's to_float values on blocks of every byte value and a spread
// of scales (zero, subnormal, negative, large): the kernels follow ggml's C, but a build of ggml
// that contracted q * d + m to an FMA would round differently, and exactness comes first.
static bool same_as_ggml(ggml_type type, DequantFn fast) {
    const int64_t n = 32 * 64;
    const size_t bytes = ggml_row_size(type, n), bsz = ggml_type_size(type);
    std::vector<uint8_t> blocks(bytes);
    uint32_t x = 12345;
    for (auto& b : blocks) b = static_cast<uint8_t>((x = x * 1664525u + 1013904223u) >> 24);
    const float scales[] = {0.0f, 3e-6f, -0.75f, 1.0f, 123.5f, -6e-5f, 0.0138f, 2.5f};
    for (size_t k = 0; k < bytes / bsz && type != GGML_TYPE_MXFP4; ++k) {  // MXFP4: every exponent byte is valid
        const ggml_fp16_t d = ggml_fp32_to_fp16(scales[k % 8]), m = ggml_fp32_to_fp16(scales[(k / 8 + 3) % 8]);
        std::memcpy(blocks.data() + k * bsz + (type == GGML_TYPE_Q6_K ? bsz - 2 : 0), &d, sizeof d);  // Q6_K: d last
        if (type == GGML_TYPE_Q4_1 || type == GGML_TYPE_Q4_K) std::memcpy(blocks.data() + k * bsz + 2, &m, sizeof m);
    }
    std::vector<float> want(static_cast<size_t>(n)), got(static_cast<size_t>(n));
    ggml_get_type_traits(type)->to_float(blocks.data(), want.data(), n);
    fast(blocks.data(), got.data(), n, 16);
    return std::memcmp(want.data(), got.data(), want.size() * sizeof(float)) == 0;
}

DequantFn dequant_kernel(ggml_type type) {
    static std::mutex mu;
    static std::unordered_map<int, DequantFn> chosen;  // checked once per type
    std::lock_guard<std::mutex> lock(mu);
    const auto it = chosen.find(static_cast<int>(type));
    if (it != chosen.end()) return it->second;
    DequantFn pick = nullptr;
    for (const DequantFn f : dequant_kernels(type))
        if (same_as_ggml(type, f)) {
            pick = f;
            break;
        }
    return chosen[static_cast<int>(type)] = pick;
}

std::vector<DequantFn> dequant_kernels(ggml_type type) {
    std::vector<DequantFn> all;
#if defined(__x86_64__) || defined(__i386__)
    if (has_avx512f() && has_avx2_fma_f16c()) {
        if (type == GGML_TYPE_Q4_0) all.push_back(&dequant_q4_0_avx512);
        if (type == GGML_TYPE_Q4_1) all.push_back(&dequant_q4_1_avx512);
        if (type == GGML_TYPE_Q8_0) all.push_back(&dequant_q8_0_avx512);
        if (type == GGML_TYPE_Q4_K) all.push_back(&dequant_q4_k_avx512);
        if (type == GGML_TYPE_MXFP4) all.push_back(&dequant_mxfp4_avx512);
        if (type == GGML_TYPE_Q6_K) all.push_back(&dequant_q6_k_avx512);
    }
    if (has_avx2_fma_f16c()) {
        if (type == GGML_TYPE_Q4_0) all.push_back(&dequant_q4_0_avx2);
        if (type == GGML_TYPE_Q4_1) all.push_back(&dequant_q4_1_avx2);
        if (type == GGML_TYPE_Q8_0) all.push_back(&dequant_q8_0_avx2);
        if (type == GGML_TYPE_Q4_K) all.push_back(&dequant_q4_k_avx2);
        if (type == GGML_TYPE_MXFP4) all.push_back(&dequant_mxfp4_avx2);
        if (type == GGML_TYPE_Q6_K) all.push_back(&dequant_q6_k_avx2);
    }
#endif
    (void)type;
    return all;
}

}  // namespace neurotap
