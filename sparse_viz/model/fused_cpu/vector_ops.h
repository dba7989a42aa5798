// Small vector routines shared by the fused CPU kernels: dot products, weighted sums of gathered
// rows (one head's, or a group of heads' against the same rows), adding weighted rows into gathered
// rows, exp, max and sum, for float through 8-lane vectors (GCC/Clang vector extensions: AVX
// where the compiler targets it, two SSE halves elsewhere) and for double through plain loops.
// Rows read (fixed and gathered) may be stored in bfloat16: they are computed in float, the
// type every sum and weight takes (compute_type), and only the bytes brought in are halved. Dot
// products of two bfloat16 rows take AVX512-BF16's vdpbf16ps where the CPU has it (exact products,
// float32 sums: twice the multiply-adds per instruction, no widening).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif

// AVX512-BF16 with its 256-bit forms: the bfloat16 dot products here and in index_topk.cpp.
#if defined(__AVX512BF16__) && defined(__AVX512VL__)
#define SPARSE_VIZ_DPBF16 1
#endif

namespace sparse_viz_fused {

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint16_t v8u16 __attribute__((vector_size(16)));

// The type a kernel computes rows of T in: float for float and bfloat16, double for double.
template <typename T>
using compute_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Rows whose fast paths run in 8-lane float vectors.
template <typename T>
constexpr bool float_lanes = std::is_same_v<compute_type<T>, float>;

inline v8f load8(const float* p) { v8f x; std::memcpy(&x, p, sizeof(x)); return x; }
// A bfloat16 is a float's upper 16 bits: widen and shift, exactly. (GCC splits the generic
// widening into 128-bit halves; AVX2 has it as one instruction.)
inline v8f load8(const at::BFloat16* p) {
#ifdef __AVX2__
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
#else
  v8u16 h;
  std::memcpy(&h, p, sizeof(h));
  const v8i bits = __builtin_convertvector(h, v8i) << 16;
  v8f x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
#endif
}
inline void store8(float* p, v8f x) { std::memcpy(p, &x, sizeof(x)); }
inline v8f splat8(float x) { return v8f{x, x, x, x, x, x, x, x}; }
inline float sum8(v8f x) { return ((x[0] + x[1]) + (x[2] + x[3])) + ((x[4] + x[5]) + (x[6] + x[7])); }

// ---- small vector routines: a . b, y += a * x, exp --------------------------------------------

template <typename row_t>
inline compute_type<row_t> dot(const row_t* a, const row_t* b, int64_t n) {
  using acc_t = compute_type<row_t>;
  acc_t s = 0;
  int64_t i = 0;
  if constexpr (float_lanes<row_t>) {
    v8f acc0 = splat8(0.f), acc1 = splat8(0.f);  // two chains: the adds do not wait on each other
    for (; i + 16 <= n; i += 16) {
      acc0 += load8(a + i) * load8(b + i);
      acc1 += load8(a + i + 8) * load8(b + i + 8);
    }
    for (; i + 8 <= n; i += 8) acc0 += load8(a + i) * load8(b + i);
    s = sum8(acc0 + acc1);
  }
  for (; i < n; ++i) s += acc_t(a[i]) * acc_t(b[i]);
  return s;
}

// y += alpha * x, y in x's compute type.
template <typename row_t>
inline void axpy(compute_type<row_t> alpha, const row_t* x, compute_type<row_t>* y, int64_t n) {
  int64_t i = 0;
  if constexpr (float_lanes<row_t>) {
    const v8f a = splat8(alpha);
    for (; i + 8 <= n; i += 8) store8(y + i, load8(y + i) + a * load8(x + i));
  }
  for (; i < n; ++i) y[i] += alpha * compute_type<row_t>(x[i]);
}

// exp of 8 floats (Cephes' expf: 2^n * e^r with |r| <= ln2 / 2, degree-6 polynomial; relative
// error ~1e-7). Inputs below -87.3 (and -inf: masked slots) give 0.
inline v8f exp8(v8f x) {
  const v8i underflow = x < -87.3f;
  x = x < -87.3f ? splat8(-87.3f) : x;
  x = x > 88.3f ? splat8(88.3f) : x;
  v8f n = __builtin_convertvector(x * 1.44269504088896341f + 0.5f, v8f);
  v8i ni = __builtin_convertvector(n, v8i);  // truncation; floor below
  v8f nf = __builtin_convertvector(ni, v8f);
  const v8i too_big = nf > n;
  ni += too_big;  // true lanes are -1
  nf = __builtin_convertvector(ni, v8f);
  v8f r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  v8f p = splat8(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const v8i bits = (ni + 127) << 23;
  v8f scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  p = p * scale;
  return underflow ? splat8(0.f) : p;
}

// Natural log of 8 positive, finite floats (Cephes' logf: x = m * 2^e with m in [sqrt(1/2), sqrt(2)),
// log(m) by a degree-9 polynomial in m - 1; relative error ~1e-7). Callers mask x <= 0 themselves.
inline v8f log8(v8f x) {
  v8i bits;
  std::memcpy(&bits, &x, sizeof(bits));
  v8i e = ((bits >> 23) & 0xff) - 126;  // x = m * 2^e, m in [0.5, 1)
  bits = (bits & 0x807fffff) | 0x3f000000;
  v8f m;
  std::memcpy(&m, &bits, sizeof(m));
  const v8i small = m < 0.707106781186547524f;  // m in [0.5, sqrt(1/2)): use 2m, e - 1
  e += small;  // true lanes are -1
  m = (small ? m + m : m) - 1.0f;
  const v8f ef = __builtin_convertvector(e, v8f);
  const v8f z = m * m;
  v8f y = splat8(7.0376836292e-2f);
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += ef * -2.12194440e-4f;
  y -= 0.5f * z;
  return m + y + ef * 0.693359375f;
}

// x[i] = exp(x[i] - shift) for i < n; x holds at least round_up(n, 8) entries.
template <typename scalar_t>
inline void exp_shifted(scalar_t* x, int64_t n, scalar_t shift) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::exp(x[i] - shift);
}

template <>
inline void exp_shifted<float>(float* x, int64_t n, float shift) {
  const v8f s = splat8(shift);
  for (int64_t i = 0; i < n; i += 8) store8(x + i, exp8(load8(x + i) - s));
}

// max and sum of x[0 .. n), eight lanes at a time for float (a scalar loop would be one long
// chain of dependent operations).
template <typename scalar_t>
inline scalar_t max_of(const scalar_t* x, int64_t n) {
  scalar_t m = -std::numeric_limits<scalar_t>::infinity();
  for (int64_t i = 0; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

template <>
inline float max_of<float>(const float* x, int64_t n) {
  v8f m8 = splat8(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const v8f v = load8(x + i);
    m8 = v > m8 ? v : m8;
  }
  float m = m8[0];
  for (int u = 1; u < 8; ++u) m = std::max(m, m8[u]);
  for (; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

template <typename scalar_t>
inline scalar_t sum_of(const scalar_t* x, int64_t n) {
  scalar_t s = 0;
  for (int64_t i = 0; i < n; ++i) s += x[i];
  return s;
}

template <>
inline float sum_of<float>(const float* x, int64_t n) {
  v8f s8 = splat8(0.f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) s8 += load8(x + i);
  float s = sum8(s8);
  for (; i < n; ++i) s += x[i];
  return s;
}

inline int64_t round8(int64_t n) { return (n + 7) / 8 * 8; }

// r[i] = sum of the lanes of parts[i]: eight horizontal sums as a tree of shuffles and adds
// (one horizontal sum per dot would cost as much as the dot itself at 64 dims).
inline v8f reduce8(const v8f* parts) {
  v8f p01 = __builtin_shufflevector(parts[0], parts[1], 0, 8, 2, 10, 4, 12, 6, 14) +
            __builtin_shufflevector(parts[0], parts[1], 1, 9, 3, 11, 5, 13, 7, 15);
  v8f p23 = __builtin_shufflevector(parts[2], parts[3], 0, 8, 2, 10, 4, 12, 6, 14) +
            __builtin_shufflevector(parts[2], parts[3], 1, 9, 3, 11, 5, 13, 7, 15);
  v8f p45 = __builtin_shufflevector(parts[4], parts[5], 0, 8, 2, 10, 4, 12, 6, 14) +
            __builtin_shufflevector(parts[4], parts[5], 1, 9, 3, 11, 5, 13, 7, 15);
  v8f p67 = __builtin_shufflevector(parts[6], parts[7], 0, 8, 2, 10, 4, 12, 6, 14) +
            __builtin_shufflevector(parts[6], parts[7], 1, 9, 3, 11, 5, 13, 7, 15);
  v8f p0123 = __builtin_shufflevector(p01, p23, 0, 1, 8, 9, 4, 5, 12, 13) +
              __builtin_shufflevector(p01, p23, 2, 3, 10, 11, 6, 7, 14, 15);
  v8f p4567 = __builtin_shufflevector(p45, p67, 0, 1, 8, 9, 4, 5, 12, 13) +
              __builtin_shufflevector(p45, p67, 2, 3, 10, 11, 6, 7, 14, 15);
  return __builtin_shufflevector(p0123, p4567, 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(p0123, p4567, 4, 5, 6, 7, 12, 13, 14, 15);
}

// ---- rows gathered from anywhere --------------------------------------------------------------
// Each routine takes rows of row_t (float, double or bfloat16) and sums in compute_type<row_t>;
// the 8-lane tiles serve float and bfloat16 rows, double takes the plain loops.

// out[i] = fixed[0 .. D) . base[offset[i] .. offset[i] + D) for n rows gathered from anywhere:
// one query against its selected keys, or one key against the queries that selected it.
// The fixed row stays in U registers; eight gathered rows at a time, one accumulator each
// (eight independent chains of adds), then one tree reduction for the eight sums.
template <int U, typename row_t>
inline void dots_with_rows_tiles(const row_t* fixed, const row_t* base, const int64_t* offset, int64_t n, float* out) {
  v8f f[U];
  for (int u = 0; u < U; ++u) f[u] = load8(fixed + 8 * u);
  int64_t i0 = 0;
  for (; i0 + 8 <= n; i0 += 8) {
    const row_t* rows[8];
    for (int r = 0; r < 8; ++r) rows[r] = base + offset[i0 + r];
    if (i0 + 16 <= n)  // the next tile's rows start on their way from L2 / L3 while this one computes
      for (int r = 0; r < 8; ++r) __builtin_prefetch(base + offset[i0 + 8 + r]);
    v8f acc[8];
    for (int r = 0; r < 8; ++r) acc[r] = f[0] * load8(rows[r]);
    for (int u = 1; u < U; ++u)
      for (int r = 0; r < 8; ++r) acc[r] += f[u] * load8(rows[r] + 8 * u);
    store8(out + i0, reduce8(acc));
  }
  for (; i0 < n; ++i0) out[i0] = dot(fixed, base + offset[i0], 8 * U);
}

#ifdef SPARSE_VIZ_DPBF16
// bfloat16 rows where the CPU has AVX512-BF16: vdpbf16ps multiplies sixteen bfloat16 pairs (each
// product exact in float) and adds them into the eight float lanes, two per lane, in float32 with
// round-to-nearest; no widening of the rows first. (It reads bfloat16 subnormals, |x| < 1.2e-38,
// as 0: the one way it departs from widening.)
inline __m256bh load16_bf16(const at::BFloat16* p) {
  return (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

template <int U>
inline void dots_with_rows_tiles_dpbf16(const at::BFloat16* fixed, const at::BFloat16* base, const int64_t* offset,
                                        int64_t n, float* out) {
  constexpr int C = U / 2;  // sixteen bfloat16 per register
  __m256bh f[C];
  for (int c = 0; c < C; ++c) f[c] = load16_bf16(fixed + 16 * c);
  int64_t i0 = 0;
  for (; i0 + 8 <= n; i0 += 8) {
    const at::BFloat16* rows[8];
    for (int r = 0; r < 8; ++r) rows[r] = base + offset[i0 + r];
    if (i0 + 16 <= n)
      for (int r = 0; r < 8; ++r) __builtin_prefetch(base + offset[i0 + 8 + r]);
    v8f acc[8];
    for (int r = 0; r < 8; ++r) acc[r] = _mm256_dpbf16_ps(_mm256_setzero_ps(), f[0], load16_bf16(rows[r]));
    for (int c = 1; c < C; ++c)
      for (int r = 0; r < 8; ++r) acc[r] = _mm256_dpbf16_ps(acc[r], f[c], load16_bf16(rows[r] + 16 * c));
    store8(out + i0, reduce8(acc));
  }
  for (; i0 < n; ++i0) out[i0] = dot(fixed, base + offset[i0], 8 * U);
}
#endif

template <typename row_t>
inline void dots_with_rows(const row_t* fixed, const row_t* base, const int64_t* offset, int64_t n, int64_t D,
                           compute_type<row_t>* out) {
#ifdef SPARSE_VIZ_DPBF16
  if constexpr (std::is_same_v<row_t, at::BFloat16>) {
    switch (D) {
      case 16: return dots_with_rows_tiles_dpbf16<2>(fixed, base, offset, n, out);
      case 32: return dots_with_rows_tiles_dpbf16<4>(fixed, base, offset, n, out);
      case 64: return dots_with_rows_tiles_dpbf16<8>(fixed, base, offset, n, out);
      case 128: return dots_with_rows_tiles_dpbf16<16>(fixed, base, offset, n, out);
      default: break;
    }
  }
#endif
  if constexpr (float_lanes<row_t>) {
    switch (D) {
      case 16: return dots_with_rows_tiles<2>(fixed, base, offset, n, out);
      case 32: return dots_with_rows_tiles<4>(fixed, base, offset, n, out);
      case 64: return dots_with_rows_tiles<8>(fixed, base, offset, n, out);
      case 128: return dots_with_rows_tiles<16>(fixed, base, offset, n, out);
      default: break;  // other sizes: the plain dot
    }
  }
  for (int64_t i = 0; i < n; ++i) out[i] = dot(fixed, base + offset[i], D);
}

// out[0 .. D) = sum_i weight[i] * base[offset[i] .. offset[i] + D): the weighted sum of n rows
// gathered from anywhere. For float the sum stays in registers over all n rows: accumulating
// row by row into memory would chain every row's add through a store and a load.
// Two sets of U accumulators (even and odd rows): 2U independent chains of adds.
template <int U, typename row_t>
inline void weighted_rows_sum_tiles(const row_t* base, const int64_t* offset, const float* weight, int64_t n,
                                    float* out) {
  v8f even[U], odd[U];
  for (int u = 0; u < U; ++u) even[u] = odd[u] = splat8(0.f);
  int64_t i = 0;
  for (; i + 2 <= n; i += 2) {
    const row_t *a = base + offset[i], *b = base + offset[i + 1];
    const v8f wa = splat8(weight[i]), wb = splat8(weight[i + 1]);
    if (i + 10 <= n) {
      __builtin_prefetch(base + offset[i + 8]);
      __builtin_prefetch(base + offset[i + 9]);
    }
    for (int u = 0; u < U; ++u) {
      even[u] += wa * load8(a + 8 * u);
      odd[u] += wb * load8(b + 8 * u);
    }
  }
  if (i < n) {
    const row_t* a = base + offset[i];
    const v8f wa = splat8(weight[i]);
    for (int u = 0; u < U; ++u) even[u] += wa * load8(a + 8 * u);
  }
  for (int u = 0; u < U; ++u) store8(out + 8 * u, even[u] + odd[u]);
}

template <typename row_t>
inline void weighted_rows_sum(const row_t* base, const int64_t* offset, const compute_type<row_t>* weight, int64_t n,
                              int64_t D, compute_type<row_t>* out) {
  if constexpr (float_lanes<row_t>) {
    switch (D) {
      case 16: return weighted_rows_sum_tiles<2>(base, offset, weight, n, out);
      case 32: return weighted_rows_sum_tiles<4>(base, offset, weight, n, out);
      case 64: return weighted_rows_sum_tiles<8>(base, offset, weight, n, out);
      case 128:
        weighted_rows_sum_tiles<8>(base, offset, weight, n, out);
        return weighted_rows_sum_tiles<8>(base + 64, offset, weight, n, out + 64);
      default: break;  // other sizes: row by row
    }
  }
  std::fill(out, out + D, compute_type<row_t>(0));
  for (int64_t i = 0; i < n; ++i) axpy(weight[i], base + offset[i], out, D);
}

// ---- several heads against the same gathered rows (grouped-query attention) -------------------
// G query heads sharing one key/value head read each gathered row once for all G: G multiply-adds
// per float brought in from L2 / L3 instead of one.

// Calls run(U, G), each a std::integral_constant<int, ...>, for a head size D = 8U and group size
// G with a tile kernel (D 16, 32, 64, 128; G 2, 4, 8) and returns true; false for the others,
// which the callers compute head by head.
template <typename Run>
inline bool with_group_tile(int64_t D, int64_t G, Run&& run) {
  auto for_group = [&](auto g) {
    switch (D) {
      case 16: run(std::integral_constant<int, 2>{}, g); return true;
      case 32: run(std::integral_constant<int, 4>{}, g); return true;
      case 64: run(std::integral_constant<int, 8>{}, g); return true;
      case 128: run(std::integral_constant<int, 16>{}, g); return true;
      default: return false;
    }
  };
  switch (G) {
    case 2: return for_group(std::integral_constant<int, 2>{});
    case 4: return for_group(std::integral_constant<int, 4>{});
    case 8: return for_group(std::integral_constant<int, 8>{});
    default: return false;
  }
}

// A tile's eight dot products, acc[r * G + i] for gathered row r and head i, summed (one tree
// reduction) into out[i * stride + j0 + r].
template <int R, int G>
inline void store_tile_sums(const v8f* acc, float* out, int64_t stride, int64_t j0) {
  float sums[8];
  store8(sums, reduce8(acc));
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < G; ++i) out[i * stride + j0 + r] = sums[r * G + i];
}

// out[i * stride + j] = fixed[i * D .. (i + 1) * D) . base[offset[j] .. offset[j] + D) for the G
// fixed rows (contiguous, D apart) and n gathered rows.
// Tiles of R = 8 / G gathered rows x G heads: eight sums, one tree reduction.
template <int U, int G, typename row_t>
inline void dots_of_heads_tiles(const row_t* fixed, const row_t* base, const int64_t* offset, int64_t n, float* out,
                                int64_t stride) {
  constexpr int R = 8 / G;
  constexpr int64_t D = 8 * U;
  int64_t j0 = 0;
  for (; j0 + R <= n; j0 += R) {
    const row_t* rows[R];
    for (int r = 0; r < R; ++r) rows[r] = base + offset[j0 + r];
    if (j0 + 2 * R <= n)
      for (int r = 0; r < R; ++r) __builtin_prefetch(base + offset[j0 + R + r]);
    v8f acc[8];  // acc[r * G + i]: row r, head i
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < G; ++i) acc[r * G + i] = load8(fixed + i * D) * load8(rows[r]);
    for (int u = 1; u < U; ++u)
      for (int r = 0; r < R; ++r) {
        const v8f x = load8(rows[r] + 8 * u);
        for (int i = 0; i < G; ++i) acc[r * G + i] += load8(fixed + i * D + 8 * u) * x;
      }
    store_tile_sums<R, G>(acc, out, stride, j0);
  }
  for (; j0 < n; ++j0)
    for (int i = 0; i < G; ++i) out[i * stride + j0] = dot(fixed + i * D, base + offset[j0], D);
}

#ifdef SPARSE_VIZ_DPBF16
// The same tiles for bfloat16 rows with vdpbf16ps (see dots_with_rows_tiles_dpbf16).
template <int U, int G>
inline void dots_of_heads_tiles_dpbf16(const at::BFloat16* fixed, const at::BFloat16* base, const int64_t* offset,
                                       int64_t n, float* out, int64_t stride) {
  constexpr int R = 8 / G, C = U / 2;
  constexpr int64_t D = 8 * U;
  int64_t j0 = 0;
  for (; j0 + R <= n; j0 += R) {
    const at::BFloat16* rows[R];
    for (int r = 0; r < R; ++r) rows[r] = base + offset[j0 + r];
    if (j0 + 2 * R <= n)
      for (int r = 0; r < R; ++r) __builtin_prefetch(base + offset[j0 + R + r]);
    v8f acc[8];  // acc[r * G + i]: row r, head i
    for (int a = 0; a < 8; ++a) acc[a] = _mm256_setzero_ps();
    for (int c = 0; c < C; ++c)
      for (int r = 0; r < R; ++r) {
        const __m256bh x = load16_bf16(rows[r] + 16 * c);
        for (int i = 0; i < G; ++i) acc[r * G + i] = _mm256_dpbf16_ps(acc[r * G + i], load16_bf16(fixed + i * D + 16 * c), x);
      }
    store_tile_sums<R, G>(acc, out, stride, j0);
  }
  for (; j0 < n; ++j0)
    for (int i = 0; i < G; ++i) out[i * stride + j0] = dot(fixed + i * D, base + offset[j0], D);
}
#endif

template <typename row_t>
inline void dots_of_heads_with_rows(const row_t* fixed, int64_t G, const row_t* base, const int64_t* offset, int64_t n,
                                    int64_t D, compute_type<row_t>* out, int64_t stride) {
#ifdef SPARSE_VIZ_DPBF16
  if constexpr (std::is_same_v<row_t, at::BFloat16>) {
    const bool tiled = with_group_tile(D, G, [&](auto u, auto g) {
      dots_of_heads_tiles_dpbf16<decltype(u)::value, decltype(g)::value>(fixed, base, offset, n, out, stride);
    });
    if (tiled) return;
  }
#endif
  if constexpr (float_lanes<row_t>) {
    const bool tiled = with_group_tile(D, G, [&](auto u, auto g) {
      dots_of_heads_tiles<decltype(u)::value, decltype(g)::value>(fixed, base, offset, n, out, stride);
    });
    if (tiled) return;
  }
  // one head, or a group size without a tile: head by head
  for (int64_t i = 0; i < G; ++i) dots_with_rows(fixed + i * D, base, offset, n, D, out + i * stride);
}

// out[i * D .. (i + 1) * D) = sum_j weight[i * stride + j] * base[offset[j] .. offset[j] + D) for
// G heads: the weighted sums of the same n gathered rows with each head's weights.
// C chunks of eight floats per pass over the rows, G * C <= 16 accumulators in registers.
template <int U, int G, typename row_t>
inline void weighted_rows_sum_of_heads_tiles(const row_t* base, const int64_t* offset, const float* weight,
                                             int64_t stride, int64_t n, float* out) {
  constexpr int C = 16 / G < U ? 16 / G : U;
  constexpr int64_t D = 8 * U;
  for (int c0 = 0; c0 < U; c0 += C) {
    v8f acc[G][C];
    for (int i = 0; i < G; ++i)
      for (int c = 0; c < C; ++c) acc[i][c] = splat8(0.f);
    for (int64_t j = 0; j < n; ++j) {
      const row_t* row = base + offset[j] + 8 * c0;
      v8f x[C];
      for (int c = 0; c < C; ++c) x[c] = load8(row + 8 * c);
      for (int i = 0; i < G; ++i) {
        const v8f w = splat8(weight[i * stride + j]);
        for (int c = 0; c < C; ++c) acc[i][c] += w * x[c];
      }
    }
    for (int i = 0; i < G; ++i)
      for (int c = 0; c < C; ++c) store8(out + i * D + 8 * (c0 + c), acc[i][c]);
  }
}

template <typename row_t>
inline void weighted_rows_sum_of_heads(const row_t* base, const int64_t* offset, const compute_type<row_t>* weight,
                                       int64_t stride, int64_t G, int64_t n, int64_t D, compute_type<row_t>* out) {
  if constexpr (float_lanes<row_t>) {
    const bool tiled = with_group_tile(D, G, [&](auto u, auto g) {
      weighted_rows_sum_of_heads_tiles<decltype(u)::value, decltype(g)::value>(base, offset, weight, stride, n, out);
    });
    if (tiled) return;
  }
  for (int64_t i = 0; i < G; ++i) weighted_rows_sum(base, offset, weight + i * stride, n, D, out + i * D);
}

// base[offset[j] .. offset[j] + D) += sum_i weight[i * stride + j] * fixed[i * D .. (i + 1) * D)
// for the n rows (distinct): each gathered row read, added to and written back, once for the G
// heads' terms. The gathered rows are sums (compute type); the fixed rows may be bfloat16.
// C chunks of eight floats per pass over the rows, the G heads' chunks (G * C <= 16) in registers.
template <int U, int G, typename row_t>
inline void add_weighted_heads_to_rows_tiles(const row_t* fixed, const float* weight, int64_t stride, int64_t n,
                                             float* base, const int64_t* offset) {
  constexpr int C = 16 / G < U ? 16 / G : U;
  constexpr int64_t D = 8 * U;
  for (int c0 = 0; c0 < U; c0 += C) {
    v8f f[G][C];
    for (int i = 0; i < G; ++i)
      for (int c = 0; c < C; ++c) f[i][c] = load8(fixed + i * D + 8 * (c0 + c));
    for (int64_t j = 0; j < n; ++j) {
      float* row = base + offset[j] + 8 * c0;
      if (j + 8 < n) __builtin_prefetch(base + offset[j + 8] + 8 * c0, 1);
      v8f w[G];
      for (int i = 0; i < G; ++i) w[i] = splat8(weight[i * stride + j]);
      for (int c = 0; c < C; ++c) {
        v8f acc = load8(row + 8 * c);
        for (int i = 0; i < G; ++i) acc += w[i] * f[i][c];
        store8(row + 8 * c, acc);
      }
    }
  }
}

template <typename row_t>
inline void add_weighted_heads_to_rows(const row_t* fixed, int64_t G, const compute_type<row_t>* weight, int64_t stride,
                                       int64_t n, int64_t D, compute_type<row_t>* base, const int64_t* offset) {
  if constexpr (float_lanes<row_t>) {
    const bool tiled = with_group_tile(D, G, [&](auto u, auto g) {
      add_weighted_heads_to_rows_tiles<decltype(u)::value, decltype(g)::value>(fixed, weight, stride, n, base, offset);
    });
    if (tiled) return;
    if (D % 8 == 0) {  // other group sizes: still one read-modify-write of each row for all G heads
      for (int64_t j = 0; j < n; ++j) {
        float* row = base + offset[j];
        for (int64_t c = 0; c < D; c += 8) {
          v8f acc = load8(row + c);
          for (int64_t i = 0; i < G; ++i) acc += splat8(weight[i * stride + j]) * load8(fixed + i * D + c);
          store8(row + c, acc);
        }
      }
      return;
    }
  }
  for (int64_t j = 0; j < n; ++j)
    for (int64_t i = 0; i < G; ++i) axpy(weight[i * stride + j], fixed + i * D, base + offset[j], D);
}

}  // namespace sparse_viz_fused
