// The SIMD kernels and their CPU dispatch: each *_kernel() returns the fastest one this CPU runs
// (checked once), each *_generic() the portable one (for tests on CPUs where another is chosen).
#pragma once
#include <cstdint>
#include <vector>

#include "ggml.h"

namespace neurotap {

// Dequantizes n values (a multiple of 32, and of the type's block: 256 for Q4_K and Q6_K) of Q4_0,
// Q4_1, Q8_0, Q4_K, Q6_K or MXFP4 blocks to exactly what ggml's to_float gives, with AVX-512 or AVX2 where the CPU has them: ggml's own to_float is scalar,
// and a pass over W_down dequantizes all of it. dequant_kernel() picks the first of
// dequant_kernels() that equals to_float on a test set of blocks (checked once per type), or null
// (ggml's is used). Value i goes to out[(i / 16) * stride + i % 16]: stride 16 writes a row, a
// larger one the 16-neuron column blocks of the projection's packed panel.
using DequantFn = void (*)(const void* blocks, float* out, int64_t n, int64_t stride);
DequantFn dequant_kernel(ggml_type type);
std::vector<DequantFn> dequant_kernels(ggml_type type);  // every one the CPU runs, the chosen one first

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
// Floats between the 16-neuron column blocks of a packed panel of kc rows: padded by one row, or
// at kc = 64 the blocks would be 4 KiB apart and all fall in the same L1 set as they are written.
constexpr int64_t panel_stride(int kc) { return 16 * static_cast<int64_t>(kc) + 16; }
using PanelFn = void (*)(const float* U, int64_t ldu, int M, const float* P, int kc, int64_t n, float* D, int64_t ldd);
PanelFn panel_kernel();
std::vector<PanelFn> panel_kernels();  // every one the CPU runs, the chosen one first (for tests)

}  // namespace neurotap
