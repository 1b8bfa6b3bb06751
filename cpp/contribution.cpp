#include "contribution.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <cstdint>
#include <functional>
#include <mutex>
#include <numeric>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "errors.h"
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

// Floats between the 16-neuron column blocks of a packed panel of kc rows: padded by one row, or
// at kc = 64 the blocks would be 4 KiB apart and all fall in the same L1 set as they are written.
constexpr int64_t panel_stride(int kc) { return 16 * static_cast<int64_t>(kc) + 16; }

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

// The same with AVX-512: one 16-neuron column block per register, MR x 2 blocks per tile (32
// neurons; a lone last block in a tile of its own). Per lane the same FMAs in the same order, so
// the same bits as the AVX2 kernel.
template <int MR, int NB>
__attribute__((target("avx512f"), always_inline)) inline void panel_tile512(const float* U, int64_t ldu, const float* p,
                                                                           int64_t pstride, int kc, float* D, int64_t ldd) {
    __m512 acc[MR][NB];
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 2
        for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_loadu_ps(D + m * ldd + 16 * b);
    for (int k = 0; k < kc; ++k) {
        __m512 w[NB];
#pragma GCC unroll 2
        for (int b = 0; b < NB; ++b) w[b] = _mm512_loadu_ps(p + b * pstride + 16 * k);
#pragma GCC unroll 8
        for (int m = 0; m < MR; ++m) {
            const __m512 u = _mm512_set1_ps(U[m * ldu + k]);
#pragma GCC unroll 2
            for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_fmadd_ps(u, w[b], acc[m][b]);
        }
    }
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 2
        for (int b = 0; b < NB; ++b) _mm512_storeu_ps(D + m * ldd + 16 * b, acc[m][b]);
}

template <int NB>
__attribute__((target("avx512f"))) void panel_cols512(const float* U, int64_t ldu, int M, const float* p, int64_t pstride,
                                                      int kc, float* d, int64_t ldd) {
    int m = 0;
    for (; m + 6 <= M; m += 6) panel_tile512<6, NB>(U + m * ldu, ldu, p, pstride, kc, d + m * ldd, ldd);
    switch (M - m) {
        case 5: panel_tile512<5, NB>(U + m * ldu, ldu, p, pstride, kc, d + m * ldd, ldd); break;
        case 4: panel_tile512<4, NB>(U + m * ldu, ldu, p, pstride, kc, d + m * ldd, ldd); break;
        case 3: panel_tile512<3, NB>(U + m * ldu, ldu, p, pstride, kc, d + m * ldd, ldd); break;
        case 2: panel_tile512<2, NB>(U + m * ldu, ldu, p, pstride, kc, d + m * ldd, ldd); break;
        case 1: panel_tile512<1, NB>(U + m * ldu, ldu, p, pstride, kc, d + m * ldd, ldd); break;
        default: break;
    }
}

__attribute__((target("avx512f"))) void panel_avx512(const float* U, int64_t ldu, int M, const float* P, int kc,
                                                     int64_t n, float* D, int64_t ldd) {
    const int64_t ps = panel_stride(kc);
    int64_t j = 0;
    for (; j + 32 <= n; j += 32) panel_cols512<2>(U, ldu, M, P + (j / 16) * ps, ps, kc, D + j, ldd);
    if (j < n) panel_cols512<1>(U, ldu, M, P + (j / 16) * ps, ps, kc, D + j, ldd);
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
    for (size_t k = 0; k < bytes / bsz; ++k) {
        const ggml_fp16_t d = ggml_fp32_to_fp16(scales[k % 8]), m = ggml_fp32_to_fp16(scales[(k / 8 + 3) % 8]);
        std::memcpy(blocks.data() + k * bsz, &d, sizeof d);
        if (type == GGML_TYPE_Q4_1) std::memcpy(blocks.data() + k * bsz + 2, &m, sizeof m);
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
    }
    if (has_avx2_fma_f16c()) {
        if (type == GGML_TYPE_Q4_0) all.push_back(&dequant_q4_0_avx2);
        if (type == GGML_TYPE_Q4_1) all.push_back(&dequant_q4_1_avx2);
        if (type == GGML_TYPE_Q8_0) all.push_back(&dequant_q8_0_avx2);
    }
#endif
    (void)type;
    return all;
}

namespace {

inline float silu(float x) { return x < -80.0f ? -0.0f : x / (1.0f + std::exp(-x)); }  // exp overflow at -inf
inline float gelu(float x) {  // ggml's tanh approximation
    constexpr float k = 0.79788456080286535588f;  // sqrt(2 / pi)
    return 0.5f * x * (1.0f + std::tanh(k * x * (1.0f + 0.044715f * x * x)));
}

}  // namespace

ContributionWeights::ContributionWeights(const GgufFile& file, int n_layers, int64_t n_ff, int64_t n_embd, int n_vocab)
    : n_layers_(n_layers), n_ff_(n_ff), n_embd_(n_embd), n_vocab_(n_vocab) {
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
        if (out.row_bytes * static_cast<uint64_t>(t->ne[1]) != t->nbytes || t->ne[0] % out.block != 0)
            throw ModelError("tensor '" + t->name + "' has an inconsistent size in " + file.path());
        out.data = reinterpret_cast<const uint8_t*>(static_cast<uintptr_t>(t->file_offset));  // offset until mapped
        return out;
    };
    for (int l = 0; l < n_layers; ++l) {
        const std::string name = "blk." + std::to_string(l) + ".ffn_down.weight";
        const TensorInfo* t = file.find_tensor(name);
        if (!t) throw ModelError("tensor '" + name + "' missing in " + file.path());
        if (t->ne[0] != n_ff || t->ne[1] != n_embd || t->ne[2] != 1 || t->ne[3] != 1)
            throw ModelError("tensor '" + name + "' has shape " + std::to_string(t->ne[0]) + " x " +
                             std::to_string(t->ne[1]) + ", expected n_ff x n_embd = " + std::to_string(n_ff) +
                             " x " + std::to_string(n_embd) + " in " + file.path());
        down_.push_back(tensor(t));
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
    for (Tensor& d : down_) d.data = base + reinterpret_cast<uintptr_t>(d.data);
    unembed_.data = base + reinterpret_cast<uintptr_t>(unembed_.data);
}

ContributionWeights::~ContributionWeights() {
    if (map_) ::munmap(map_, map_size_);
}

void ContributionWeights::dequantize(const Tensor& t, int64_t row, int64_t i0, int64_t i1, float* out) const {
    const uint8_t* src = t.data + static_cast<size_t>(row) * t.row_bytes + static_cast<size_t>(i0 / t.block) * t.block_bytes;
    if (t.type == GGML_TYPE_F32) std::memcpy(out, src, static_cast<size_t>(i1 - i0) * sizeof(float));
    else if (t.fast && (i1 - i0) % 32 == 0) t.fast(src, out, i1 - i0, 16);
    else ggml_get_type_traits(t.type)->to_float(src, out, i1 - i0);
}

void ContributionWeights::down_row(int layer, int64_t e, float* out) const {
    if (layer < 0 || layer >= n_layers_ || e < 0 || e >= n_embd_) throw ParamError("down_row: out of range");
    dequantize(down_[static_cast<size_t>(layer)], e, 0, n_ff_, out);
}

void ContributionWeights::project(int layer, const float* U, int M, int64_t i0, int64_t i1, float* D, int64_t ldd,
                                  float* scratch) const {
    const Tensor& t = down_[static_cast<size_t>(layer)];
    if (i0 < 0 || i1 > n_ff_ || i0 >= i1 || i0 % t.block || (i1 % t.block && i1 != n_ff_))
        throw ParamError("project: neuron range not on block boundaries");
    for (int m = 0; m < M; ++m) std::fill_n(D + static_cast<size_t>(m) * ldd, i1 - i0, 0.0f);
    const Tile tile = project_tile(M);
    for (int64_t s0 = i0; s0 < i1; s0 += tile.cols) {
        const int64_t s1 = std::min(i1, s0 + tile.cols);
        project_slice(t, U, M, s0, s1, D + (s0 - i0), ldd, tile.rows, scratch);
    }
}

// Measured at the 1B shape (2 cores): one pass for M = 1 takes 0.047 s in slices of 1024 neurons
// and 0.027 s in slices of 8192 (whole rows of the file's pages), while M = 64 takes 0.218 s in
// 1024 x 64 tiles and 0.284 s in 8192 x 16 ones. Accumulators M x cols within 64 Ki floats, the
// panel rows x cols within 128 Ki floats (half of L2).
ContributionWeights::Tile ContributionWeights::project_tile(int M) {
    int64_t cols = 8192;
    while (cols > 1024 && static_cast<int64_t>(std::max(M, 1)) * cols > 65536) cols /= 2;
    return {std::min<int64_t>(128, 131072 / cols), cols};
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
                if (t.fast && n % 32 == 0) {  // straight into the panel
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

ContributionReducer::ContributionReducer(std::shared_ptr<const ContributionWeights> w, ContributionParams p)
    : w_(std::move(w)), p_(p) {
    if (!w_) throw ParamError("contribution reducer needs weights");
    if (p_.chunk < 1) throw ParamError("chunk must be at least 1 token");
    if (p_.top_per_layer < 1) throw ParamError("top_per_layer must be at least 1");
    if (p_.eta_rank < 1) throw ParamError("eta_rank must be at least 1");
    if (p_.n_threads < 1) p_.n_threads = 1;
}

int64_t ContributionReducer::auto_budget(int64_t file_bytes, int n_samples, int n_layers, int64_t n_ff) {
    const int64_t rows = static_cast<int64_t>(n_samples) * n_layers * n_ff * static_cast<int64_t>(sizeof(float));
    return std::min(file_bytes / 20, std::max<int64_t>(0, (file_bytes * 12 / 100 - rows) / 2));
}

void ContributionReducer::begin(int n_samples, int n_layers, int64_t n_ff, int) {
    if (n_layers != w_->n_layers() || n_ff != w_->n_ff())
        throw ParamError("contribution weights are for another model shape");
    n_layers_ = n_layers;
    n_ff_ = n_ff;
    n_words_ = (n_layers * n_ff + 63) / 64;
    k_ = static_cast<int>(std::min<int64_t>(p_.top_per_layer, n_ff));
    bufs_.clear();
    free_.clear();
    cur_.assign(n_samples, -1);  // a buffer is taken at a sample's first row of a step
    sets_.begin(n_samples, static_cast<int64_t>(n_layers) * n_ff);
    eta_.assign(n_samples, {});
    count_.assign(n_samples, {});
    top_c_.assign(n_samples, {});
    top_i_.assign(n_samples, {});
    kth_.assign(n_samples, std::vector<float>(static_cast<size_t>(n_layers), -INFINITY));
    queue_.clear();
    held_ = 0;
    sel_c_.clear();
    sel_i_.clear();
    sel_eta_.clear();
    sel_kth_.clear();
    const size_t per_token = static_cast<size_t>(n_layers) * n_ff * sizeof(float);
    const int64_t share = auto_budget(static_cast<int64_t>(w_->mapped_bytes()), n_samples, n_layers, n_ff);
    cache_slots_ = static_cast<int>(
        std::min<int64_t>((p_.cache_bytes < 0 ? share : p_.cache_bytes) / static_cast<int64_t>(per_token), 1 << 20));
    // No floor: a budget below one step's tokens selects and passes every step (W_down is small
    // where the rows of a step are large against the file).
    queue_budget_ = p_.queue_bytes < 0 ? share : p_.queue_bytes;
    // A pass holds, per token it selects, its top values and (per thread) one layer of its
    // projection: within the queue's budget, in passes of 16 tokens where that is empty (the
    // default model at n = 64, where the rows in flight alone take 12% of the file).
    const int64_t pass_bytes = static_cast<int64_t>(n_layers) * k_ * 8 + 4 +
                               static_cast<int64_t>(p_.n_threads) * n_ff * 4 + w_->n_embd() * 4;
    group_tokens_ = p_.pass_tokens > 0 ? p_.pass_tokens : std::max<int64_t>(16, queue_budget_ / pass_bytes);
    cache_.clear();
    // Reserved once: growing would reallocate, copying the cache and holding up to 3x its size at
    // once (and 0.12 s at the 1B shape). Reserved pages not yet written cost no resident memory.
    cache_.reserve(static_cast<size_t>(cache_slots_) * static_cast<size_t>(n_layers) * static_cast<size_t>(n_ff));
    cache_token_.clear();
    cache_used_.clear();
    cache_index_.clear();
    step_ = hits_ = misses_ = 0;
}

int ContributionReducer::take_buffer() {
    if (!free_.empty()) {
        const int b = free_.back();
        free_.pop_back();
        return b;
    }
    bufs_.emplace_back(static_cast<size_t>(n_layers_) * n_ff_, 0.0f);
    return static_cast<int>(bufs_.size()) - 1;
}

float* ContributionReducer::row_buffer(int sample) {
    if (cur_[sample] < 0) cur_[sample] = take_buffer();
    return bufs_[cur_[sample]].data();
}

void ContributionReducer::on_row(int sample, int, int layer, const float* a) {
    if (p_.gate_variant) return;
    std::memcpy(row_buffer(sample) + static_cast<size_t>(layer) * n_ff_, a, static_cast<size_t>(n_ff_) * sizeof(float));
}

void ContributionReducer::on_gate_row(int sample, int, int layer, const float* g) {
    if (!p_.gate_variant) return;
    float* out = row_buffer(sample) + static_cast<size_t>(layer) * n_ff_;
    for (int64_t i = 0; i < n_ff_; ++i) out[i] = p_.gelu ? gelu(g[i]) : silu(g[i]);
}

void ContributionReducer::commit(int sample, int token, int32_t token_id) {
    if (token_id < 0 || token_id >= w_->n_vocab()) throw ParamError("token id out of range: " + std::to_string(token_id));
    // The token's activations stay in their buffer until it is selected; the sample writes a fresh
    // one. Its next buffer is taken when its next rows come, after this step's selections have
    // freed the queue's: taking it now would hold n more rows at the peak (11.8 MB of the default
    // model's 98 MB file at n = 64).
    row_buffer(sample);
    queue_.push_back({sample, token, token_id, cur_[sample], -1});
    cur_[sample] = -1;
    ++held_;
}

int64_t ContributionReducer::queued_bytes() const {
    const int64_t selected = static_cast<int64_t>(queue_.size()) - held_;
    return held_ * n_layers_ * n_ff_ * static_cast<int64_t>(sizeof(float)) +
           selected * n_layers_ * (k_ * 8 + 4) + selected * 4;
}

// A pass over W_down dequantizes all of it, whatever the number of ids it projects, so a pass
// should carry many new ids. When the queue fills its budget, the tokens whose projection is
// already cached (most of them on real text: 84% at n = 16) are selected, freeing their
// activations; the pass waits until the tokens still missing theirs fill half the budget, so it
// carries more new ids than flushing the whole queue did. Selections are recorded in token order
// at the pass, since a sample's chunks are encoded in order. (Flushing every step
// instead, at the default model's n = 16, cut the contribution mode's private memory from 15.7% to
// 11.3% of the file but made the pass 1.2-1.3x slower.)
void ContributionReducer::end_step() {
    if (queued_bytes() < queue_budget_) return;
    select_hits();
    if (2 * queued_bytes() >= queue_budget_) flush();
}

void ContributionReducer::sync() { flush(); }

void ContributionReducer::select_hits() {
    const auto t0 = std::chrono::steady_clock::now();
    which_.clear();
    for (size_t q = 0; q < queue_.size(); ++q)
        if (queue_[q].buf >= 0 && cache_index_.count(queue_[q].token_id)) which_.push_back(static_cast<int>(q));
    assign_sources(which_);  // all cached: no new ids
    select(which_);
    seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// The source of each queued token's projection d(y) = W_down^T W_U[y] (all layers), for the
// tokens in `which`: its cache slot (slot_of_), and, for an id not cached, a row of this pass's
// projections (row_of_; missing_ids_ lists the pass's ids in row order, missing_slot_ the slot each
// one is then cached in, -1 when every slot is taken by this pass: the cache never outgrows its
// budget, however many distinct ids a pass carries). A contribution is c = a * d(y), and d depends
// on the token only, not on the context, so tokens that recur across samples and steps (most of
// them) cost one multiply per neuron.
void ContributionReducer::assign_sources(const std::vector<int>& which) {
    ++step_;
    slot_of_.resize(queue_.size());
    row_of_.resize(queue_.size());
    missing_ids_.clear();
    missing_slot_.clear();
    pass_row_.clear();
    for (const int q : which) {
        const int32_t y = queue_[q].token_id;
        row_of_[q] = -1;
        slot_of_[q] = -1;
        if (const auto it = cache_index_.find(y); it != cache_index_.end()) {
            slot_of_[q] = it->second;
            cache_used_[static_cast<size_t>(it->second)] = step_;
            ++hits_;
            continue;
        }
        if (const auto it = pass_row_.find(y); it != pass_row_.end()) {  // an id already new in this pass
            row_of_[q] = it->second;
            ++hits_;
            continue;
        }
        // A free slot, or the least recently used one not needed by this pass, or none.
        int slot = -1;
        if (static_cast<int>(cache_token_.size()) < cache_slots_) {
            slot = static_cast<int>(cache_token_.size());
            cache_token_.push_back(y);
            cache_used_.push_back(step_);
        } else {
            int64_t oldest = INT64_MAX;
            for (int k = 0; k < cache_slots_; ++k)
                if (cache_used_[static_cast<size_t>(k)] < oldest && cache_used_[static_cast<size_t>(k)] != step_)
                    oldest = cache_used_[static_cast<size_t>(k)], slot = k;
            if (slot >= 0) {
                cache_index_.erase(cache_token_[static_cast<size_t>(slot)]);
                cache_token_[static_cast<size_t>(slot)] = y;
                cache_used_[static_cast<size_t>(slot)] = step_;
            }
        }
        if (slot >= 0) cache_index_[y] = slot;
        row_of_[q] = static_cast<int>(missing_ids_.size());
        pass_row_[y] = row_of_[q];
        missing_ids_.push_back(y);
        missing_slot_.push_back(slot);
        ++misses_;
    }
    cache_.resize(cache_token_.size() * static_cast<size_t>(n_layers_) * static_cast<size_t>(n_ff_));
}

// The exact top k of one layer's contributions c (n values): descending, ties by lower index.
// idx (room for n) holds the m candidates c[i] >= guess, ascending, guess being a value believed
// to lie below the k-th largest (the same layer's k-th value on the sample's previous token,
// halved): when m >= k the top k are among them and only those are ranked; otherwise every value
// is. Exact either way; returns the k-th value.
static float layer_top(const float* c, int64_t n, int k, int32_t* idx, int64_t m, std::vector<float>& scratch,
                       float* top_c, int32_t* top_i) {
    if (m < k) {
        std::iota(idx, idx + n, 0);
        m = n;
    }
    scratch.resize(static_cast<size_t>(m));
    for (int64_t j = 0; j < m; ++j) scratch[j] = c[idx[j]];
    std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(), std::greater<float>());
    const float kth = scratch[k - 1];
    // Candidates above the k-th value, then ties at it by lowest index (idx is ascending).
    int64_t w = 0, ties = 0;
    for (int64_t j = 0; j < m; ++j)
        if (c[idx[j]] > kth) idx[w++] = idx[j];
    const int64_t above = w;
    for (int64_t i = 0; i < n && above + ties < k; ++i)
        if (c[i] == kth) scratch[ties++] = static_cast<float>(i);  // reuse scratch for tie indices (exact below 2^24)
    for (int64_t t = 0; t < ties; ++t) idx[w++] = static_cast<int32_t>(scratch[t]);
    std::sort(idx, idx + w, [c](int32_t x, int32_t y) { return c[x] != c[y] ? c[x] > c[y] : x < y; });
    for (int r = 0; r < k; ++r) {
        top_c[r] = c[idx[r]];
        top_i[r] = idx[r];
    }
    return kth;
}

// Selects the queued tokens in `which` (their activations held, their projections' sources
// assigned): contributions, each layer's top k, eta; frees their activations. One layer at a time
// per thread: the layer's new projections (W_down's rows for the layer streamed once per 64 ids),
// cached where they have a slot, then every token's products and top k at that layer; only one
// layer's projections of the pass's new ids are held per thread.
void ContributionReducer::select(const std::vector<int>& which) {
    const int W = static_cast<int>(which.size());
    if (W == 0) return;
    const int64_t E = w_->n_embd();
    const int64_t total = static_cast<int64_t>(n_layers_) * n_ff_;
    const int M = static_cast<int>(missing_ids_.size());
    u_.resize(static_cast<size_t>(M) * E);
    for (int m = 0; m < M; ++m) w_->unembed_row(missing_ids_[static_cast<size_t>(m)], u_.data() + static_cast<size_t>(m) * E);
    const int K = n_layers_ * k_;
    const size_t base = sel_eta_.size();
    sel_c_.resize((base + W) * K);
    sel_i_.resize((base + W) * K);
    sel_eta_.resize(base + W);
    sel_kth_.resize(static_cast<size_t>(W) * n_layers_);
    const int threads = (static_cast<int64_t>(M + W) * total > 200000) ? p_.n_threads : 1;
    if (static_cast<int>(scratch_.size()) < threads) scratch_.resize(static_cast<size_t>(threads));
    std::atomic<int> next_scratch{0};
    std::atomic<int64_t> project_ns{0};
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        Scratch& s = scratch_[static_cast<size_t>(next_scratch.fetch_add(1))];
        s.proj.resize(static_cast<size_t>(M) * n_ff_);
        s.row.resize(ContributionWeights::kProjectScratch);
        s.c.resize(static_cast<size_t>(n_ff_));
        s.idx.resize(static_cast<size_t>(n_ff_));
        const ProductsFn products = products_kernel();
#pragma omp for schedule(dynamic)
        for (int l = 0; l < n_layers_; ++l) {
            const auto t0 = std::chrono::steady_clock::now();
            for (int m0 = 0; m0 < M; m0 += kMaxBatch) {
                const int mn = std::min(kMaxBatch, M - m0);
                w_->project(l, u_.data() + static_cast<size_t>(m0) * E, mn, 0, n_ff_,
                            s.proj.data() + static_cast<size_t>(m0) * n_ff_, n_ff_, s.row.data());
            }
            for (int m = 0; m < M; ++m)
                if (const int slot = missing_slot_[static_cast<size_t>(m)]; slot >= 0)
                    std::copy_n(s.proj.data() + static_cast<size_t>(m) * n_ff_, n_ff_,
                                cache_.data() + static_cast<size_t>(slot) * total + static_cast<size_t>(l) * n_ff_);
            project_ns += std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count();
            for (int j = 0; j < W; ++j) {
                const int q = which[j];
                const size_t at = base + j;
                // c = a * d(y) in a buffer that stays in L1, and the candidates.
                const float* a = bufs_[queue_[q].buf].data() + static_cast<size_t>(l) * n_ff_;
                const float* d = row_of_[q] >= 0 ? s.proj.data() + static_cast<size_t>(row_of_[q]) * n_ff_
                                                 : cache_.data() + static_cast<size_t>(slot_of_[q]) * total +
                                                       static_cast<size_t>(l) * n_ff_;
                // kth_ is read only here and written after the pass.
                const float guess = kth_[queue_[q].sample][static_cast<size_t>(l)];
                // No finite guess: no candidates, so layer_top ranks every value.
                const float g = std::isfinite(guess) ? guess : INFINITY;
                const int64_t mc = products(a, d, n_ff_, g, s.c.data(), s.idx.data());
                const float kth = layer_top(s.c.data(), n_ff_, k_, s.idx.data(), mc, s.top,
                                            sel_c_.data() + at * K + l * k_, sel_i_.data() + at * K + l * k_);
                // A positive guess prunes; otherwise rank all.
                sel_kth_[static_cast<size_t>(j) * n_layers_ + l] = kth > 0 ? 0.5f * kth : -INFINITY;
            }
        }
#pragma omp for
        for (int j = 0; j < W; ++j) {
            const size_t at = base + j;
            const int rank = std::min(p_.eta_rank, K);
            s.top.assign(sel_c_.data() + at * K, sel_c_.data() + (at + 1) * K);
            std::nth_element(s.top.begin(), s.top.begin() + (rank - 1), s.top.end(), std::greater<float>());
            sel_eta_[at] = s.top[rank - 1];
        }
    }
    dot_seconds_ += static_cast<double>(project_ns.load()) * 1e-9 / threads;
    for (int j = 0; j < W; ++j) {
        Queued& e = queue_[which[j]];
        e.sel = static_cast<int>(base) + j;
        std::copy_n(sel_kth_.data() + static_cast<size_t>(j) * n_layers_, n_layers_, kth_[e.sample].data());
        free_.push_back(e.buf);
        e.buf = -1;
        --held_;
    }
}

// The held tokens go through passes of at most group_tokens_ at a time, in queue order; after each
// one, the queue's prefix whose selections are all made is recorded.
void ContributionReducer::flush() {
    if (queue_.empty()) return;
    const auto t0 = std::chrono::steady_clock::now();
    while (held_ > 0) {
        which_.clear();
        for (size_t q = 0; q < queue_.size() && static_cast<int64_t>(which_.size()) < group_tokens_; ++q)
            if (queue_[q].buf >= 0) which_.push_back(static_cast<int>(q));
        assign_sources(which_);
        select(which_);
        record_prefix();  // everything up to the pass's last token
    }
    record_prefix();
    seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Records the queue's selected prefix (sets, eta, counts) and drops it; the selections still
// pending (made early, for cached ids, behind a token still waiting) move down.
void ContributionReducer::record_prefix() {
    const int K = n_layers_ * k_;
    size_t p = 0;
    for (; p < queue_.size() && queue_[p].sel >= 0; ++p) {
        const Queued& e = queue_[p];
        const int sample = e.sample, token = e.token;
        const float* tc = sel_c_.data() + static_cast<size_t>(e.sel) * K;
        const int32_t* ti = sel_i_.data() + static_cast<size_t>(e.sel) * K;
        const float eta = sel_eta_[static_cast<size_t>(e.sel)];
        uint64_t* w = sets_.chunk(sample, token / p_.chunk);
        int32_t active = 0;
        for (int l = 0; l < n_layers_; ++l) {
            for (int r = 0; r < k_; ++r) {
                const size_t at = static_cast<size_t>(l) * k_ + r;
                if (!(tc[at] > eta)) break;  // descending within a layer
                const int64_t bit = static_cast<int64_t>(l) * n_ff_ + ti[at];
                w[bit >> 6] |= uint64_t{1} << (bit & 63);
                ++active;
            }
        }
        slot(eta_[sample], static_cast<size_t>(token), 1)[0] = eta;
        slot(count_[sample], static_cast<size_t>(token), 1)[0] = active;
        if (p_.keep_top) {
            std::copy(tc, tc + K, slot(top_c_[sample], static_cast<size_t>(token), static_cast<size_t>(K)));
            std::copy(ti, ti + K, slot(top_i_[sample], static_cast<size_t>(token), static_cast<size_t>(K)));
        }
        tokens_ += 1;
    }
    if (p == 0) return;
    queue_.erase(queue_.begin(), queue_.begin() + static_cast<std::ptrdiff_t>(p));
    // In order of their index, so that none is overwritten before it moves.
    pending_.clear();
    for (Queued& e : queue_)
        if (e.sel >= 0) pending_.push_back(&e);
    std::sort(pending_.begin(), pending_.end(), [](const Queued* a, const Queued* b) { return a->sel < b->sel; });
    for (size_t j = 0; j < pending_.size(); ++j) {
        const size_t from = static_cast<size_t>(pending_[j]->sel);
        std::copy_n(sel_c_.data() + from * K, K, sel_c_.data() + j * K);
        std::copy_n(sel_i_.data() + from * K, K, sel_i_.data() + j * K);
        sel_eta_[j] = sel_eta_[from];
        pending_[j]->sel = static_cast<int>(j);
    }
    sel_c_.resize(pending_.size() * K);
    sel_i_.resize(pending_.size() * K);
    sel_eta_.resize(pending_.size());
}

void ContributionReducer::finish(int sample, int n_tokens) {
    flush();  // the sample's last token may still be queued
    const size_t n = static_cast<size_t>(n_tokens);
    sets_.finish(sample, static_cast<int64_t>((n + p_.chunk - 1) / p_.chunk));
    eta_[sample].resize(n);
    count_[sample].resize(n);
    if (p_.keep_top) {
        top_c_[sample].resize(n * n_layers_ * k_);
        top_i_[sample].resize(n * n_layers_ * k_);
    }
}

int64_t popcount(const uint64_t* set, int64_t words) {
    int64_t c = 0;
    for (int64_t k = 0; k < words; ++k) c += __builtin_popcountll(set[k]);
    return c;
}

std::vector<double> jaccard_matrix(const uint64_t* sets, int n, int64_t words) {
    if (n < 0 || words < 0) throw ParamError("jaccard: negative shape");
    std::vector<double> s(static_cast<size_t>(n) * n, 1.0);
    for (int i = 0; i < n; ++i) {
        const uint64_t* a = sets + static_cast<size_t>(i) * words;
        for (int j = i + 1; j < n; ++j) {
            const uint64_t* b = sets + static_cast<size_t>(j) * words;
            int64_t inter = 0, uni = 0;
            for (int64_t k = 0; k < words; ++k) {
                inter += __builtin_popcountll(a[k] & b[k]);
                uni += __builtin_popcountll(a[k] | b[k]);
            }
            const double v = uni ? double(inter) / double(uni) : 1.0;
            s[static_cast<size_t>(i) * n + j] = s[static_cast<size_t>(j) * n + i] = v;
        }
    }
    return s;
}

}  // namespace neurotap
