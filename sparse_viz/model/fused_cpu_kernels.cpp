// Fused CPU kernels of DeepSeek Sparse Attention's sparse stage (loaded by fused_kernels.py).
//
// The readable meaning of each kernel is Python: `masked_sparse_attention` (attention.py) for
// the attention, `LightningIndexer.forward` + `topk_causal` for the top-k, and the full score
// matrix read at the selection for the selected-key scores. The tests hold every kernel to those.
//
// Why fused: the same computations as torch ops write O(T * k * H) (attention) or O(T^2 * H_I)
// (indexer) intermediates to memory and read them back; here a query row's scores live in a
// small buffer, and the attention keeps only a log-sum-exp per (head, query) for backward, as
// flash attention does.
//
// Layouts (all contiguous):
//   q, k, v, out, grad_out: (B, T, H, D)     lse: (B, T, H)
//   selected: (B, T, K) int64, -1 = unfilled slot; shared by every head; any order
//   indexer q: (B, T, HI, DI), indexer k: (B, T, DI), w: (B, T, HI)
//
// float32 goes through 8-lane vectors (GCC/Clang vector extensions: AVX where the compiler
// targets it, two SSE halves elsewhere); float64 through plain loops.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

namespace {

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

inline v8f load8(const float* p) { v8f x; std::memcpy(&x, p, sizeof(x)); return x; }
inline void store8(float* p, v8f x) { std::memcpy(p, &x, sizeof(x)); }
inline v8f splat8(float x) { return v8f{x, x, x, x, x, x, x, x}; }
inline float sum8(v8f x) { return ((x[0] + x[1]) + (x[2] + x[3])) + ((x[4] + x[5]) + (x[6] + x[7])); }

// ---- small vector routines: a . b, y += a * x, exp --------------------------------------------

template <typename scalar_t>
inline scalar_t dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  scalar_t s = 0;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <>
inline float dot<float>(const float* a, const float* b, int64_t n) {
  v8f acc0 = splat8(0.f), acc1 = splat8(0.f);  // two chains: the adds do not wait on each other
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 += load8(a + i) * load8(b + i);
    acc1 += load8(a + i + 8) * load8(b + i + 8);
  }
  for (; i + 8 <= n; i += 8) acc0 += load8(a + i) * load8(b + i);
  float s = sum8(acc0 + acc1);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <typename scalar_t>
inline void axpy(scalar_t alpha, const scalar_t* x, scalar_t* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

template <>
inline void axpy<float>(float alpha, const float* x, float* y, int64_t n) {
  const v8f a = splat8(alpha);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store8(y + i, load8(y + i) + a * load8(x + i));
  for (; i < n; ++i) y[i] += alpha * x[i];
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

// out[i] = fixed[0 .. D) . base[offset[i] .. offset[i] + D) for n rows gathered from anywhere:
// one query against its selected keys, or one key against the queries that selected it.
template <typename scalar_t>
void dots_with_rows(const scalar_t* fixed, const scalar_t* base, const int64_t* offset, int64_t n, int64_t D,
                    scalar_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = dot(fixed, base + offset[i], D);
}

// The fixed row stays in U registers; eight gathered rows at a time, one accumulator each
// (eight independent chains of adds), then one tree reduction for the eight sums.
template <int U>
void dots_with_rows_tiles(const float* fixed, const float* base, const int64_t* offset, int64_t n, float* out) {
  v8f f[U];
  for (int u = 0; u < U; ++u) f[u] = load8(fixed + 8 * u);
  int64_t i0 = 0;
  for (; i0 + 8 <= n; i0 += 8) {
    const float* rows[8];
    for (int r = 0; r < 8; ++r) rows[r] = base + offset[i0 + r];
    v8f acc[8];
    for (int r = 0; r < 8; ++r) acc[r] = f[0] * load8(rows[r]);
    for (int u = 1; u < U; ++u)
      for (int r = 0; r < 8; ++r) acc[r] += f[u] * load8(rows[r] + 8 * u);
    store8(out + i0, reduce8(acc));
  }
  for (; i0 < n; ++i0) out[i0] = dot(fixed, base + offset[i0], 8 * U);
}

template <>
void dots_with_rows<float>(const float* fixed, const float* base, const int64_t* offset, int64_t n, int64_t D,
                           float* out) {
  switch (D) {
    case 16: return dots_with_rows_tiles<2>(fixed, base, offset, n, out);
    case 32: return dots_with_rows_tiles<4>(fixed, base, offset, n, out);
    case 64: return dots_with_rows_tiles<8>(fixed, base, offset, n, out);
    case 128: return dots_with_rows_tiles<16>(fixed, base, offset, n, out);
    default:  // other sizes: the plain dot
      for (int64_t i = 0; i < n; ++i) out[i] = dot(fixed, base + offset[i], D);
  }
}

// out[0 .. D) = sum_i weight[i] * base[offset[i] .. offset[i] + D): the weighted sum of n rows
// gathered from anywhere. For float the sum stays in registers over all n rows: accumulating
// row by row into memory would chain every row's add through a store and a load.
template <typename scalar_t>
void weighted_rows_sum(const scalar_t* base, const int64_t* offset, const scalar_t* weight, int64_t n, int64_t D,
                       scalar_t* out) {
  std::fill(out, out + D, scalar_t(0));
  for (int64_t i = 0; i < n; ++i) axpy(weight[i], base + offset[i], out, D);
}

// Two sets of U accumulators (even and odd rows): 2U independent chains of adds.
template <int U>
void weighted_rows_sum_tiles(const float* base, const int64_t* offset, const float* weight, int64_t n, float* out) {
  v8f even[U], odd[U];
  for (int u = 0; u < U; ++u) even[u] = odd[u] = splat8(0.f);
  int64_t i = 0;
  for (; i + 2 <= n; i += 2) {
    const float *a = base + offset[i], *b = base + offset[i + 1];
    const v8f wa = splat8(weight[i]), wb = splat8(weight[i + 1]);
    for (int u = 0; u < U; ++u) {
      even[u] += wa * load8(a + 8 * u);
      odd[u] += wb * load8(b + 8 * u);
    }
  }
  if (i < n) {
    const float* a = base + offset[i];
    const v8f wa = splat8(weight[i]);
    for (int u = 0; u < U; ++u) even[u] += wa * load8(a + 8 * u);
  }
  for (int u = 0; u < U; ++u) store8(out + 8 * u, even[u] + odd[u]);
}

template <>
void weighted_rows_sum<float>(const float* base, const int64_t* offset, const float* weight, int64_t n, int64_t D,
                              float* out) {
  switch (D) {
    case 16: return weighted_rows_sum_tiles<2>(base, offset, weight, n, out);
    case 32: return weighted_rows_sum_tiles<4>(base, offset, weight, n, out);
    case 64: return weighted_rows_sum_tiles<8>(base, offset, weight, n, out);
    case 128:
      weighted_rows_sum_tiles<8>(base, offset, weight, n, out);
      return weighted_rows_sum_tiles<8>(base + 64, offset, weight, n, out + 64);
    default:  // other sizes: row by row
      std::fill(out, out + D, 0.f);
      for (int64_t i = 0; i < n; ++i) axpy(weight[i], base + offset[i], out, D);
  }
}

// ---- sparse attention over the selected keys ---------------------------------------------------
// Token-major layouts: q, k, v, out, grad_out (B, T, H, D); a selected key's rows of every head
// are one contiguous H * D block, read once per query for all heads.

// The valid slots of one selection row: slot[i] = j and offset[i] = (b * T + selected[j]) * HD,
// for the n valid slots in order.
inline int64_t valid_slots(const int64_t* sel, int64_t K, int64_t first_row, int64_t HD, int64_t* slot,
                           int64_t* offset) {
  int64_t n = 0;
  for (int64_t j = 0; j < K; ++j) {
    if (sel[j] < 0) continue;
    slot[n] = j;
    offset[n++] = (first_row + sel[j]) * HD;
  }
  return n;
}

template <typename scalar_t>
void attention_forward(const scalar_t* q, const scalar_t* k, const scalar_t* v, const int64_t* selected,
                       scalar_t* out, scalar_t* lse, scalar_t* probs, bool per_head_probs, int64_t B,
                       int64_t H, int64_t T, int64_t D, int64_t K, scalar_t scale) {
  const scalar_t neg_inf = -std::numeric_limits<scalar_t>::infinity();
  const int64_t Kp = round8(K), HD = H * D;
  // Rows (b, t) in parallel: every output of a row is its own, so no two threads write one place.
  at::parallel_for(0, B * T, 16, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> s(H * Kp);  // (H, Kp) scores, then probabilities, of the valid slots
    std::vector<int64_t> slot(K), offset(K);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / T;
      const int64_t n = valid_slots(selected + row * K, K, b * T, HD, slot.data(), offset.data());
      const scalar_t* q_row = q + row * HD;
      scalar_t* o_row = out + row * HD;
      for (int64_t h = 0; h < H; ++h) {
        scalar_t* s_h = s.data() + h * Kp;
        dots_with_rows(q_row + h * D, k + h * D, offset.data(), n, D, s_h);
        if (n == 0) {  // no valid key: zero output and probabilities
          lse[row * H + h] = neg_inf;
          std::fill(o_row + h * D, o_row + (h + 1) * D, scalar_t(0));
          continue;
        }
        for (int64_t i = 0; i < n; ++i) s_h[i] *= scale;
        const scalar_t m = max_of(s_h, n);
        exp_shifted(s_h, n, m);
        const scalar_t total = sum_of(s_h, n);
        const scalar_t inv = scalar_t(1) / total;
        for (int64_t i = 0; i < n; ++i) s_h[i] *= inv;
        lse[row * H + h] = m + std::log(total);
        weighted_rows_sum(v + h * D, offset.data(), s_h, n, D, o_row + h * D);
        scalar_t* p_row = per_head_probs ? probs + ((b * H + h) * T + row % T) * K : probs + row * K;
        for (int64_t i = 0; i < n; ++i) p_row[slot[i]] += s_h[i];  // per head: once; summed: over heads
      }
    }
  });
}

// The queries that selected each key, ascending: the selection transposed (a counting sort).
// queries[offsets[b * T + s] .. offsets[b * T + s + 1]) are the rows (b, t) whose selection holds s.
inline void transpose_selection(const int64_t* selected, int64_t B, int64_t T, int64_t K,
                                std::vector<int64_t>& offsets, std::vector<int32_t>& queries) {
  offsets.assign(B * T + 1, 0);
  for (int64_t row = 0; row < B * T; ++row) {
    const int64_t b = row / T;
    for (int64_t j = 0; j < K; ++j)
      if (selected[row * K + j] >= 0) ++offsets[b * T + selected[row * K + j] + 1];
  }
  for (int64_t i = 0; i < B * T; ++i) offsets[i + 1] += offsets[i];
  queries.resize(offsets[B * T]);
  std::vector<int64_t> next(offsets.begin(), offsets.end() - 1);
  for (int64_t row = 0; row < B * T; ++row) {
    const int64_t b = row / T;
    for (int64_t j = 0; j < K; ++j)
      if (selected[row * K + j] >= 0) queries[next[b * T + selected[row * K + j]]++] = int32_t(row % T);
  }
}

// Backward in two passes that only gather (a scatter into the key and value gradients from
// every query would be read-modify-writes all over them, which is memory-bound):
//   by query:  P and dS of the row's selected keys, dQ = scale * sum_j dS_j K_j;
//   by key:    for the queries that selected the key, P and dS again,
//              dK = scale * sum_t dS_t Q_t,  dV = sum_t P_t dO_t.
// dS_j = P_j (dP_j - delta), dP_j = dO . V_j, delta = sum_i P_i dP_i = dO . O.
template <typename scalar_t>
void attention_backward(const scalar_t* grad_out, const scalar_t* q, const scalar_t* k, const scalar_t* v,
                        const scalar_t* out, const scalar_t* lse, const int64_t* selected, scalar_t* grad_q,
                        scalar_t* grad_k, scalar_t* grad_v, int64_t B, int64_t H, int64_t T, int64_t D, int64_t K,
                        scalar_t scale) {
  const int64_t Kp = round8(K), HD = H * D;
  std::vector<scalar_t> delta(B * T * H);  // (B, T, H)
  at::parallel_for(0, B * T * H, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) delta[i] = dot(grad_out + i * D, out + i * D, D);
  });
  // Pass 1, by query: dQ.
  at::parallel_for(0, B * T, 16, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> p(H * Kp), ds(H * Kp);  // (H, Kp) of the valid slots
    std::vector<int64_t> slot(K), offset(K);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / T;
      const int64_t n = valid_slots(selected + row * K, K, b * T, HD, slot.data(), offset.data());
      const scalar_t* q_row = q + row * HD;
      const scalar_t* go_row = grad_out + row * HD;
      for (int64_t h = 0; h < H; ++h) {
        scalar_t *p_h = p.data() + h * Kp, *ds_h = ds.data() + h * Kp;
        dots_with_rows(q_row + h * D, k + h * D, offset.data(), n, D, p_h);
        dots_with_rows(go_row + h * D, v + h * D, offset.data(), n, D, ds_h);
        const scalar_t row_lse = lse[row * H + h], row_delta = delta[row * H + h];
        for (int64_t i = 0; i < n; ++i) p_h[i] *= scale;
        exp_shifted(p_h, n, row_lse);  // the forward's probabilities, recomputed
        for (int64_t i = 0; i < n; ++i) ds_h[i] = p_h[i] * (ds_h[i] - row_delta) * scale;
        weighted_rows_sum(k + h * D, offset.data(), ds_h, n, D, grad_q + row * HD + h * D);
      }
    }
  });
  // Pass 2, by key: dK and dV.
  std::vector<int64_t> offsets;
  std::vector<int32_t> queries;
  transpose_selection(selected, B, T, K, offsets, queries);
  at::parallel_for(0, B * T, 16, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> p, ds;  // (H, n) for the n queries of a key
    std::vector<int64_t> offset, query;
    for (int64_t key_row = begin; key_row < end; ++key_row) {
      const int64_t b = key_row / T;
      const int32_t* rows = queries.data() + offsets[key_row];
      const int64_t n = offsets[key_row + 1] - offsets[key_row], np = round8(n);
      scalar_t* gk_row = grad_k + key_row * HD;
      scalar_t* gv_row = grad_v + key_row * HD;
      p.resize(H * np);
      ds.resize(H * np);
      offset.resize(n);
      query.resize(n);
      for (int64_t i = 0; i < n; ++i) {
        query[i] = (b * T + rows[i]) * H;  // + h: the (query, head) entry of lse and delta
        offset[i] = query[i] * D;
      }
      const scalar_t* key = k + key_row * HD;
      const scalar_t* value = v + key_row * HD;
      for (int64_t h = 0; h < H; ++h) {
        scalar_t *p_h = p.data() + h * np, *ds_h = ds.data() + h * np;
        dots_with_rows(key + h * D, q + h * D, offset.data(), n, D, p_h);
        dots_with_rows(value + h * D, grad_out + h * D, offset.data(), n, D, ds_h);
        for (int64_t i = 0; i < n; ++i) {
          p_h[i] = p_h[i] * scale - lse[query[i] + h];  // each entry has its own query's log-sum-exp
          ds_h[i] -= delta[query[i] + h];
        }
        exp_shifted(p_h, n, scalar_t(0));
        weighted_rows_sum(grad_out + h * D, offset.data(), p_h, n, D, gv_row + h * D);
        for (int64_t i = 0; i < n; ++i) ds_h[i] *= p_h[i] * scale;
        weighted_rows_sum(q + h * D, offset.data(), ds_h, n, D, gk_row + h * D);
      }
    }
  });
}

// ---- the Lightning Indexer's scores at the selected keys ----------------------------------------
//   I[t, s] = sum_h w[t, h] * ReLU(q[t, h] . k[s])

template <typename scalar_t>
void index_scores_forward(const scalar_t* q, const scalar_t* k, const scalar_t* w, const int64_t* selected,
                          scalar_t* scores, int64_t B, int64_t T, int64_t HI, int64_t DI, int64_t K) {
  at::parallel_for(0, B * T, 64, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> slot(K), offset(K);
    std::vector<scalar_t> logits(round8(K));
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = valid_slots(selected + row * K, K, (row / T) * T, DI, slot.data(), offset.data());
      scalar_t* out = scores + row * K;
      std::fill(out, out + K, scalar_t(0));  // unfilled slots score 0
      for (int64_t h = 0; h < HI; ++h) {
        const scalar_t weight = w[row * HI + h];
        dots_with_rows(q + (row * HI + h) * DI, k, offset.data(), n, DI, logits.data());
        for (int64_t i = 0; i < n; ++i) out[slot[i]] += weight * std::max(logits[i], scalar_t(0));
      }
    }
  });
}

// For I = weight * ReLU(logit) summed over n keys with upstream gradients g: returns
// dI/dweight = sum_i g[i] ReLU(logit[i]) and writes coeff[i] = g[i] * weight * ReLU'(logit[i])
// (ReLU'(x) = 0 for x <= 0, as torch.relu's). g and logit hold round8(n) entries.
template <typename scalar_t>
scalar_t relu_backward(const scalar_t* logit, const scalar_t* g, scalar_t weight, int64_t n, scalar_t* coeff) {
  scalar_t grad_weight = 0;
  for (int64_t i = 0; i < n; ++i) {
    const bool active = logit[i] > scalar_t(0);
    grad_weight += active ? g[i] * logit[i] : scalar_t(0);
    coeff[i] = active ? g[i] * weight : scalar_t(0);
  }
  return grad_weight;
}

template <>
float relu_backward<float>(const float* logit, const float* g, float weight, int64_t n, float* coeff) {
  v8f sum = splat8(0.f);
  const v8f w = splat8(weight), zero = splat8(0.f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const v8f x = load8(logit + i), gi = load8(g + i);
    const v8i active = x > 0.f;
    sum += active ? gi * x : zero;
    store8(coeff + i, active ? gi * w : zero);
  }
  float total = sum8(sum);
  for (; i < n; ++i) {
    const bool active = logit[i] > 0.f;
    total += active ? g[i] * logit[i] : 0.f;
    coeff[i] = active ? g[i] * weight : 0.f;
  }
  return total;
}

template <typename scalar_t>
void index_scores_backward(const scalar_t* grad, const scalar_t* q, const scalar_t* k, const scalar_t* w,
                           const int64_t* selected, scalar_t* grad_q, scalar_t* grad_k, scalar_t* grad_w,
                           int64_t B, int64_t T, int64_t HI, int64_t DI, int64_t K) {
  // Rows in parallel; keys are shared by many rows, so each thread scatters into its own copy of
  // grad_k (B * T * DI: small, it stays in cache) and the copies are summed at the end.
  const int64_t n_threads = at::get_num_threads();
  std::vector<std::vector<scalar_t>> grad_k_copies(n_threads);
  at::parallel_for(0, B * T, 64, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t>& gk = grad_k_copies[at::get_thread_num()];
    if (gk.empty()) gk.assign(B * T * DI, scalar_t(0));
    std::vector<int64_t> slot(K), offset(K);
    std::vector<scalar_t> logits(round8(K)), coeff(HI * K), g(K), head_sum(DI), head_weight(HI);
    std::vector<int64_t> head_offset(HI);  // the heads' query rows within a row's (HI, DI) block
    for (int64_t h = 0; h < HI; ++h) head_offset[h] = h * DI;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = valid_slots(selected + row * K, K, (row / T) * T, DI, slot.data(), offset.data());
      for (int64_t i = 0; i < n; ++i) g[i] = grad[row * K + slot[i]];
      for (int64_t h = 0; h < HI; ++h) {
        const scalar_t* q_h = q + (row * HI + h) * DI;
        const scalar_t weight = w[row * HI + h];
        scalar_t* c_h = coeff.data() + h * K;
        dots_with_rows(q_h, k, offset.data(), n, DI, logits.data());  // recomputed, not saved
        grad_w[row * HI + h] = relu_backward(logits.data(), g.data(), weight, n, c_h);
        weighted_rows_sum(k, offset.data(), c_h, n, DI, grad_q + (row * HI + h) * DI);
      }
      for (int64_t i = 0; i < n; ++i) {  // dk[s] += sum_h coeff[h, s] q[h]: the heads summed first
        // (no test for a zero coefficient: ReLU is active about half the time, so a branch on
        // it would be mispredicted about half the time, and adding zero is cheaper)
        for (int64_t h = 0; h < HI; ++h) head_weight[h] = coeff[h * K + i];
        weighted_rows_sum(q + row * HI * DI, head_offset.data(), head_weight.data(), HI, DI, head_sum.data());
        axpy(scalar_t(1), head_sum.data(), gk.data() + offset[i], DI);
      }
    }
  });
  for (const auto& copy : grad_k_copies)
    if (!copy.empty()) axpy(scalar_t(1), copy.data(), grad_k, B * T * DI);
}

// ---- the indexer's causal top-k, scores never stored ------------------------------------------

// Scores of one query against keys 0 .. n-1 into row[0 .. round8(n)): for float, tiles of 8
// keys, one accumulator per (head, tile), keys read transposed (k_t: (DI, T_pad)) so a tile is
// one load per dimension. Entries past n are scratch.
template <typename scalar_t>
void score_row(const scalar_t* q_row, const scalar_t* w_row, const scalar_t* k_t, int64_t T_pad, int64_t n,
               int64_t HI, int64_t DI, scalar_t* row) {
  for (int64_t s = 0; s < n; ++s) {
    scalar_t score = 0;
    for (int64_t h = 0; h < HI; ++h) {
      scalar_t logit = 0;
      for (int64_t d = 0; d < DI; ++d) logit += q_row[h * DI + d] * k_t[d * T_pad + s];
      score += w_row[h] * std::max(logit, scalar_t(0));
    }
    row[s] = score;
  }
}

template <int NH, int NV>
inline void score_tiles_float(const float* q_row, const float* w_row, const float* k_t, int64_t T_pad, int64_t n,
                              int64_t DI, float* row) {
  constexpr int64_t width = 8 * NV;
  for (int64_t s0 = 0; s0 < n; s0 += width) {
    v8f acc[NH][NV];
    for (int h = 0; h < NH; ++h)
      for (int u = 0; u < NV; ++u) acc[h][u] = splat8(0.f);
    for (int64_t d = 0; d < DI; ++d) {
      v8f keys[NV];
      for (int u = 0; u < NV; ++u) keys[u] = load8(k_t + d * T_pad + s0 + 8 * u);
      for (int h = 0; h < NH; ++h) {
        const v8f qd = splat8(q_row[h * DI + d]);
        for (int u = 0; u < NV; ++u) acc[h][u] += qd * keys[u];
      }
    }
    for (int u = 0; u < NV; ++u) {
      v8f score = splat8(0.f);
      for (int h = 0; h < NH; ++h) score += splat8(w_row[h]) * (acc[h][u] > 0.f ? acc[h][u] : splat8(0.f));
      store8(row + s0 + 8 * u, score);
    }
  }
}

template <>
void score_row<float>(const float* q_row, const float* w_row, const float* k_t, int64_t T_pad, int64_t n,
                      int64_t HI, int64_t DI, float* row) {
  switch (HI) {  // registers: NH * NV accumulators, at most 8 of them
    case 1: return score_tiles_float<1, 4>(q_row, w_row, k_t, T_pad, n, DI, row);
    case 2: return score_tiles_float<2, 4>(q_row, w_row, k_t, T_pad, n, DI, row);
    case 4: return score_tiles_float<4, 2>(q_row, w_row, k_t, T_pad, n, DI, row);
    case 8: return score_tiles_float<8, 1>(q_row, w_row, k_t, T_pad, n, DI, row);
    default: {
      // Any other head count: the plain loop, with the same per-head sums as the tiles.
      for (int64_t s = 0; s < n; ++s) {
        float score = 0;
        for (int64_t h = 0; h < HI; ++h) {
          float logit = 0;
          for (int64_t d = 0; d < DI; ++d) logit += q_row[h * DI + d] * k_t[d * T_pad + s];
          score += w_row[h] * std::max(logit, 0.f);
        }
        row[s] = score;
      }
    }
  }
}

// Two query rows at once against keys 0 .. n-1 (each key tile loaded once for both):
// rows[r][0 .. round8(n)) for r = 0, 1. Same sums, in the same order, as `score_row`.
template <typename scalar_t>
void score_two_rows(const scalar_t* const q_rows[2], const scalar_t* const w_rows[2], const scalar_t* k_t,
                    int64_t T_pad, int64_t n, int64_t HI, int64_t DI, scalar_t* const rows[2]) {
  for (int r = 0; r < 2; ++r) score_row(q_rows[r], w_rows[r], k_t, T_pad, n, HI, DI, rows[r]);
}

template <int NH, int NV>
inline void score_two_rows_tiles(const float* const q_rows[2], const float* const w_rows[2], const float* k_t,
                                 int64_t T_pad, int64_t n, int64_t DI, float* const rows[2]) {
  constexpr int64_t width = 8 * NV;
  for (int64_t s0 = 0; s0 < n; s0 += width) {
    v8f acc[2][NH][NV];
    for (int r = 0; r < 2; ++r)
      for (int h = 0; h < NH; ++h)
        for (int u = 0; u < NV; ++u) acc[r][h][u] = splat8(0.f);
    for (int64_t d = 0; d < DI; ++d) {
      v8f keys[NV];
      for (int u = 0; u < NV; ++u) keys[u] = load8(k_t + d * T_pad + s0 + 8 * u);
      for (int r = 0; r < 2; ++r)
        for (int h = 0; h < NH; ++h) {
          const v8f qd = splat8(q_rows[r][h * DI + d]);
          for (int u = 0; u < NV; ++u) acc[r][h][u] += qd * keys[u];
        }
    }
    for (int r = 0; r < 2; ++r)
      for (int u = 0; u < NV; ++u) {
        v8f score = splat8(0.f);
        for (int h = 0; h < NH; ++h) score += splat8(w_rows[r][h]) * (acc[r][h][u] > 0.f ? acc[r][h][u] : splat8(0.f));
        store8(rows[r] + s0 + 8 * u, score);
      }
  }
}

template <>
void score_two_rows<float>(const float* const q_rows[2], const float* const w_rows[2], const float* k_t,
                           int64_t T_pad, int64_t n, int64_t HI, int64_t DI, float* const rows[2]) {
  switch (HI) {  // registers: 2 * NH * NV accumulators, at most 16 of them
    case 1: return score_two_rows_tiles<1, 4>(q_rows, w_rows, k_t, T_pad, n, DI, rows);
    case 2: return score_two_rows_tiles<2, 4>(q_rows, w_rows, k_t, T_pad, n, DI, rows);
    case 4: return score_two_rows_tiles<4, 2>(q_rows, w_rows, k_t, T_pad, n, DI, rows);
    case 8: return score_two_rows_tiles<8, 1>(q_rows, w_rows, k_t, T_pad, n, DI, rows);
    default:
      for (int r = 0; r < 2; ++r) score_row(q_rows[r], w_rows[r], k_t, T_pad, n, HI, DI, rows[r]);
  }
}

// The K largest of row[0 .. n) (n > K), earliest indices among ties at the K-th largest value
// (the rule of selectors.topk_earliest_ties), written ascending into out[0 .. K).
//
// Exact, without ranking all n: for G >= K strided groups {i, i + G, i + 2G, ...}, the K-th
// largest of the G group maxima is <= the K-th largest score (the maxima are K distinct entries),
// so only entries >= that bound can be selected; typically a few hundred of thousands.
template <typename scalar_t>
void row_topk(const scalar_t* row, int64_t n, int64_t K, std::vector<scalar_t>& scratch,
              std::vector<int32_t>& candidates, int64_t* out) {
  scalar_t bound = -std::numeric_limits<scalar_t>::infinity();
  const int64_t groups = std::max<int64_t>(2 * K, n / 16);
  if (n >= 4 * K) {
    scratch.assign(row, row + groups);
    for (int64_t start = groups; start < n; start += groups) {
      const int64_t len = std::min(groups, n - start);
      for (int64_t i = 0; i < len; ++i) scratch[i] = std::max(scratch[i], row[start + i]);
    }
    std::nth_element(scratch.begin(), scratch.begin() + (K - 1), scratch.end(), std::greater<scalar_t>());
    bound = scratch[K - 1];
  }
  // The entries >= bound, in order, without a branch per entry (most are below it).
  candidates.resize(n);
  int64_t count = 0;
  for (int64_t s = 0; s < n; ++s) {
    candidates[count] = int32_t(s);
    count += row[s] >= bound;
  }
  scratch.resize(count);
  for (int64_t i = 0; i < count; ++i) scratch[i] = row[candidates[i]];
  std::nth_element(scratch.begin(), scratch.begin() + (K - 1), scratch.end(), std::greater<scalar_t>());
  const scalar_t kth = scratch[K - 1];
  int64_t above = 0;
  for (const scalar_t x : scratch) above += x > kth;
  int64_t ties_left = K - above, filled = 0;  // ties at the K-th value: the earliest ones
  for (int64_t i = 0; i < count && filled < K; ++i) {
    const scalar_t x = row[candidates[i]];
    if (x > kth || (x == kth && ties_left-- > 0)) out[filled++] = candidates[i];
  }
}

template <typename scalar_t>
void index_topk(const scalar_t* q, const scalar_t* k_t, const scalar_t* w, int64_t* selected, int64_t B,
                int64_t T, int64_t T_pad, int64_t HI, int64_t DI, int64_t K) {
  // Work items are pairs of adjacent rows (2p, 2p + 1), scored together. Row t costs ~t, so
  // the items alternate between the two ends (p = 0, P-1, 1, P-2, ...): equal chunks, equal work.
  const int64_t P = (T + 1) / 2;
  at::parallel_for(0, B * P, 4, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> row0(T_pad), row1(T_pad);
    std::vector<scalar_t> scratch;
    std::vector<int32_t> candidates;
    scratch.reserve(T_pad);
    candidates.reserve(T_pad);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / P, i = item % P;
      const int64_t p = i % 2 == 0 ? i / 2 : P - 1 - i / 2;
      const int64_t t0 = 2 * p, t1 = 2 * p + 1;  // t1 may be T (odd T): no such row
      const scalar_t* keys = k_t + b * DI * T_pad;
      int64_t* out0 = selected + (b * T + t0) * K;
      if (t0 + 1 <= K) {  // short rows: every past key, then unfilled slots
        for (int64_t t = t0; t <= std::min(t1, T - 1); ++t)
          for (int64_t j = 0; j < K; ++j) selected[(b * T + t) * K + j] = j <= t ? j : -1;
        if (t1 < T && t1 + 1 > K) {
          score_row(q + (b * T + t1) * HI * DI, w + (b * T + t1) * HI, keys, T_pad, t1 + 1, HI, DI, row1.data());
          row_topk(row1.data(), t1 + 1, K, scratch, candidates, out0 + K);
        }
        continue;
      }
      if (t1 >= T) {
        score_row(q + (b * T + t0) * HI * DI, w + (b * T + t0) * HI, keys, T_pad, t0 + 1, HI, DI, row0.data());
        row_topk(row0.data(), t0 + 1, K, scratch, candidates, out0);
        continue;
      }
      const scalar_t* q_rows[2] = {q + (b * T + t0) * HI * DI, q + (b * T + t1) * HI * DI};
      const scalar_t* w_rows[2] = {w + (b * T + t0) * HI, w + (b * T + t1) * HI};
      scalar_t* rows[2] = {row0.data(), row1.data()};
      score_two_rows(q_rows, w_rows, keys, T_pad, t1 + 1, HI, DI, rows);  // row t0 ignores key t1
      row_topk(row0.data(), t0 + 1, K, scratch, candidates, out0);
      row_topk(row1.data(), t1 + 1, K, scratch, candidates, out0 + K);
    }
  });
}

// ---- operator entry points ---------------------------------------------------------------------

void check_selection(const at::Tensor& selected, int64_t B, int64_t T) {
  TORCH_CHECK(selected.scalar_type() == at::kLong && selected.dim() == 3 && selected.size(0) == B &&
                  selected.size(1) == T && selected.is_contiguous(),
              "selected must be a contiguous (B, T, K) int64 tensor");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                                        const at::Tensor& v,
                                                                        const at::Tensor& selected, double scale,
                                                                        bool per_head_probs) {
  TORCH_CHECK(q.dim() == 4 && q.is_contiguous() && k.is_contiguous() && v.is_contiguous() &&
                  k.sizes() == q.sizes() && v.sizes() == q.sizes() && k.scalar_type() == q.scalar_type() &&
                  v.scalar_type() == q.scalar_type(),
              "q, k, v must be contiguous (B, T, H, D) tensors of one shape and dtype");
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3);
  check_selection(selected, B, T);
  const int64_t K = selected.size(2);
  auto out = at::empty_like(q);
  auto lse = at::empty({B, T, H}, q.options());
  auto probs = per_head_probs ? at::zeros({B, H, T, K}, q.options()) : at::zeros({B, T, K}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "sparse_attention_forward", [&] {
    attention_forward<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                                selected.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(),
                                probs.data_ptr<scalar_t>(), per_head_probs, B, H, T, D, K, scalar_t(scale));
  });
  return {out, lse, probs};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& selected, double scale) {
  TORCH_CHECK(grad_out.is_contiguous() && grad_out.sizes() == q.sizes() && out.is_contiguous(),
              "grad_out and out must be contiguous and shaped like q");
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3);
  check_selection(selected, B, T);
  const int64_t K = selected.size(2);
  auto grad_q = at::empty_like(q);
  auto grad_k = at::zeros_like(k);
  auto grad_v = at::zeros_like(v);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "sparse_attention_backward", [&] {
    attention_backward<scalar_t>(grad_out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                                 v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(),
                                 selected.data_ptr<int64_t>(), grad_q.data_ptr<scalar_t>(),
                                 grad_k.data_ptr<scalar_t>(), grad_v.data_ptr<scalar_t>(), B, H, T, D, K,
                                 scalar_t(scale));
  });
  return {grad_q, grad_k, grad_v};
}

void check_indexer(const at::Tensor& q, const at::Tensor& k, const at::Tensor& w) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 3 && w.dim() == 3 && q.is_contiguous() && k.is_contiguous() &&
                  w.is_contiguous() && k.scalar_type() == q.scalar_type() && w.scalar_type() == q.scalar_type(),
              "indexer q (B, T, HI, DI), k (B, T, DI), w (B, T, HI) must be contiguous and of one dtype");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(2) == q.size(3) &&
                  w.size(0) == q.size(0) && w.size(1) == q.size(1) && w.size(2) == q.size(2),
              "indexer q, k and w disagree in shape");
}

at::Tensor selected_index_scores_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& w,
                                         const at::Tensor& selected) {
  check_indexer(q, k, w);
  const int64_t B = q.size(0), T = q.size(1), HI = q.size(2), DI = q.size(3);
  check_selection(selected, B, T);
  const int64_t K = selected.size(2);
  auto scores = at::empty({B, T, K}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "selected_index_scores_forward", [&] {
    index_scores_forward<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                                   selected.data_ptr<int64_t>(), scores.data_ptr<scalar_t>(), B, T, HI, DI, K);
  });
  return scores;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> selected_index_scores_backward(const at::Tensor& grad,
                                                                              const at::Tensor& q,
                                                                              const at::Tensor& k,
                                                                              const at::Tensor& w,
                                                                              const at::Tensor& selected) {
  check_indexer(q, k, w);
  const int64_t B = q.size(0), T = q.size(1), HI = q.size(2), DI = q.size(3);
  check_selection(selected, B, T);
  const int64_t K = selected.size(2);
  TORCH_CHECK(grad.is_contiguous() && grad.sizes() == selected.sizes() && grad.scalar_type() == q.scalar_type(),
              "grad must be a contiguous (B, T, K) tensor of q's dtype");
  auto grad_q = at::zeros_like(q);
  auto grad_k = at::zeros_like(k);
  auto grad_w = at::zeros_like(w);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "selected_index_scores_backward", [&] {
    index_scores_backward<scalar_t>(grad.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                                    w.data_ptr<scalar_t>(), selected.data_ptr<int64_t>(),
                                    grad_q.data_ptr<scalar_t>(), grad_k.data_ptr<scalar_t>(),
                                    grad_w.data_ptr<scalar_t>(), B, T, HI, DI, K);
  });
  return {grad_q, grad_k, grad_w};
}

at::Tensor causal_index_topk(const at::Tensor& q, const at::Tensor& k, const at::Tensor& w, int64_t top_k) {
  check_indexer(q, k, w);
  TORCH_CHECK(top_k >= 1, "top_k must be >= 1");
  const int64_t B = q.size(0), T = q.size(1), HI = q.size(2), DI = q.size(3);
  const int64_t K = std::min(top_k, T);
  const int64_t T_pad = (T + 31) / 32 * 32;  // whole tiles of keys; the padding keys are never selected
  auto k_t = at::zeros({B, DI, T_pad}, k.options());
  k_t.narrow(2, 0, T).copy_(k.transpose(1, 2));
  auto selected = at::empty({B, T, K}, q.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "causal_index_topk", [&] {
    index_topk<scalar_t>(q.data_ptr<scalar_t>(), k_t.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                         selected.data_ptr<int64_t>(), B, T, T_pad, HI, DI, K);
  });
  return selected;
}

}  // namespace

TORCH_LIBRARY(sparse_viz_fused, m) {
  m.def("sparse_attention_forward", &sparse_attention_forward);
  m.def("sparse_attention_backward", &sparse_attention_backward);
  m.def("selected_index_scores_forward", &selected_index_scores_forward);
  m.def("selected_index_scores_backward", &selected_index_scores_backward);
  m.def("causal_index_topk", &causal_index_topk);
}
