// The Lightning Indexer's causal top-k on CPU, each query's score row computed into a row-sized
// buffer and ranked there, never stored (loaded by fused_kernels.py; readable meaning:
// `topk_causal` of `LightningIndexer.forward`'s full score matrix).
// Layouts (contiguous): q (B, T, HI, DI), k (B, T, DI), w (B, T, HI) -> selected (B, T, K).
// q, k and w are float32 or float64, one dtype; or q and k bfloat16 with w float32: the bfloat16
// products are exact in float32 and summed there (with AVX512-BF16's vdpbf16ps where the CPU has
// it, else from q and k widened to float32: the same products), scores and ranking in float32.

#include <torch/library.h>

#include <tuple>

#ifdef __AVX__
#include <immintrin.h>
#endif

#include "selection.h"
#include "vector_ops.h"

namespace sparse_viz_fused {
namespace {

// Scores of one query against keys 0 .. n-1 into row[0 .. round8(n)), keys read transposed
// (k_t: (DI, T_pad)); entries past n are scratch. The plain loop: any dtype, any head count.
template <typename scalar_t>
void score_row_plain(const scalar_t* q_row, const scalar_t* w_row, const scalar_t* k_t, int64_t T_pad, int64_t n,
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

// One query row (`score_row`) or two adjacent ones (`score_two_rows`: each key tile loaded once for
// both) against keys 0 .. n-1. The plain loop for double; tiles for float and bfloat16 below.
template <typename scalar_t>
void score_row(const scalar_t* q_row, const scalar_t* w_row, const scalar_t* k_t, int64_t T_pad, int64_t n,
               int64_t HI, int64_t DI, scalar_t* row) {
  score_row_plain(q_row, w_row, k_t, T_pad, n, HI, DI, row);
}

template <typename scalar_t>
void score_two_rows(const scalar_t* const q_rows[2], const scalar_t* const w_rows[2], const scalar_t* k_t,
                    int64_t T_pad, int64_t n, int64_t HI, int64_t DI, scalar_t* const rows[2]) {
  for (int r = 0; r < 2; ++r) score_row_plain(q_rows[r], w_rows[r], k_t, T_pad, n, HI, DI, rows[r]);
}

// A tile's scores from its (head, 8-key) logit sums: sum_h w[h] * relu(logit), into row[0 .. 8 NV).
template <int NH, int NV>
inline void store_tile_scores(const v8f (&acc)[NH][NV], const float* w_row, float* row) {
  for (int u = 0; u < NV; ++u) {
    v8f score = splat8(0.f);
    for (int h = 0; h < NH; ++h) score += splat8(w_row[h]) * (acc[h][u] > 0.f ? acc[h][u] : splat8(0.f));
    store8(row + 8 * u, score);
  }
}

// R float query rows (1 or 2) in tiles of 8 NV keys: one accumulator per (row, head, 8 keys), a
// tile one load per dimension, shared by the R rows. The plain loop's per-head sums, in its order.
template <int R, int NH, int NV>
inline void score_rows_tiles_float(const float* const q_rows[], const float* const w_rows[], const float* k_t,
                                   int64_t T_pad, int64_t n, int64_t DI, float* const rows[]) {
  constexpr int64_t width = 8 * NV;
  for (int64_t s0 = 0; s0 < n; s0 += width) {
    v8f acc[R][NH][NV];
    for (int r = 0; r < R; ++r)
      for (int h = 0; h < NH; ++h)
        for (int u = 0; u < NV; ++u) acc[r][h][u] = splat8(0.f);
    for (int64_t d = 0; d < DI; ++d) {
      v8f keys[NV];
      for (int u = 0; u < NV; ++u) keys[u] = load8(k_t + d * T_pad + s0 + 8 * u);
      for (int r = 0; r < R; ++r)
        for (int h = 0; h < NH; ++h) {
          const v8f qd = splat8(q_rows[r][h * DI + d]);
          for (int u = 0; u < NV; ++u) acc[r][h][u] += qd * keys[u];
        }
    }
    for (int r = 0; r < R; ++r) store_tile_scores<NH, NV>(acc[r], w_rows[r], rows[r] + s0);
  }
}

template <int R>
void score_rows_float(const float* const q_rows[], const float* const w_rows[], const float* k_t, int64_t T_pad,
                      int64_t n, int64_t HI, int64_t DI, float* const rows[]) {
  switch (HI) {  // registers: R * NH * NV accumulators, at most 16 of them
    case 1: return score_rows_tiles_float<R, 1, 4>(q_rows, w_rows, k_t, T_pad, n, DI, rows);
    case 2: return score_rows_tiles_float<R, 2, 4>(q_rows, w_rows, k_t, T_pad, n, DI, rows);
    case 4: return score_rows_tiles_float<R, 4, 2>(q_rows, w_rows, k_t, T_pad, n, DI, rows);
    case 8: return score_rows_tiles_float<R, 8, 1>(q_rows, w_rows, k_t, T_pad, n, DI, rows);
    default:  // any other head count: the plain loop, with the same per-head sums
      for (int r = 0; r < R; ++r) score_row_plain(q_rows[r], w_rows[r], k_t, T_pad, n, HI, DI, rows[r]);
  }
}

void score_row(const float* q_row, const float* w_row, const float* k_t, int64_t T_pad, int64_t n, int64_t HI,
               int64_t DI, float* row) {
  const float* q_rows[1] = {q_row};
  const float* w_rows[1] = {w_row};
  float* rows[1] = {row};
  score_rows_float<1>(q_rows, w_rows, k_t, T_pad, n, HI, DI, rows);
}

void score_two_rows(const float* const q_rows[2], const float* const w_rows[2], const float* k_t, int64_t T_pad,
                    int64_t n, int64_t HI, int64_t DI, float* const rows[2]) {
  score_rows_float<2>(q_rows, w_rows, k_t, T_pad, n, HI, DI, rows);
}

#ifdef SPARSE_VIZ_DPBF16
// bfloat16 queries and keys with AVX512-BF16: the keys stored as pairs of dimensions, k2 (DI / 2,
// T_pad, 2), so that one load holds eight keys' dimensions 2p and 2p + 1, and vdpbf16ps adds both
// products of each key (exact in float) into its float lane: half the instructions of the float
// tiles for the same products. Otherwise as score_rows_tiles_float.
template <int R, int NH, int NV>
inline void score_rows_tiles_dpbf16(const at::BFloat16* const q_rows[], const float* const w_rows[],
                                    const at::BFloat16* k2, int64_t T_pad, int64_t n, int64_t DI, float* const rows[]) {
  constexpr int64_t width = 8 * NV;
  for (int64_t s0 = 0; s0 < n; s0 += width) {
    v8f acc[R][NH][NV];
    for (int r = 0; r < R; ++r)
      for (int h = 0; h < NH; ++h)
        for (int u = 0; u < NV; ++u) acc[r][h][u] = splat8(0.f);
    for (int64_t p = 0; p < DI / 2; ++p) {
      __m256bh keys[NV];
      for (int u = 0; u < NV; ++u) keys[u] = load16_bf16(k2 + (p * T_pad + s0 + 8 * u) * 2);
      for (int r = 0; r < R; ++r)
        for (int h = 0; h < NH; ++h) {
          int32_t pair;  // the query's dimensions 2p and 2p + 1, in every lane
          std::memcpy(&pair, q_rows[r] + h * DI + 2 * p, sizeof(pair));
          const __m256bh q_pair = (__m256bh)_mm256_set1_epi32(pair);
          for (int u = 0; u < NV; ++u) acc[r][h][u] = _mm256_dpbf16_ps(acc[r][h][u], q_pair, keys[u]);
        }
    }
    for (int r = 0; r < R; ++r) store_tile_scores<NH, NV>(acc[r], w_rows[r], rows[r] + s0);
  }
}

// `score_row` and `score_two_rows` for bfloat16 queries and keys (pairs layout); the head counts
// with a tile (1, 2, 4, 8) only: causal_index_topk widens the others to float.
template <int R>
void score_rows_dpbf16(const at::BFloat16* const q_rows[], const float* const w_rows[], const at::BFloat16* k2,
                       int64_t T_pad, int64_t n, int64_t HI, int64_t DI, float* const rows[]) {
  switch (HI) {  // registers: R * NH * NV accumulators, at most 16 of them
    case 1: return score_rows_tiles_dpbf16<R, 1, 4>(q_rows, w_rows, k2, T_pad, n, DI, rows);
    case 2: return score_rows_tiles_dpbf16<R, 2, 4>(q_rows, w_rows, k2, T_pad, n, DI, rows);
    case 4: return score_rows_tiles_dpbf16<R, 4, 2>(q_rows, w_rows, k2, T_pad, n, DI, rows);
    case 8: return score_rows_tiles_dpbf16<R, 8, 1>(q_rows, w_rows, k2, T_pad, n, DI, rows);
    default: TORCH_INTERNAL_ASSERT(false, "bfloat16 index scores have tiles for 1, 2, 4 or 8 heads, not ", HI);
  }
}

void score_row(const at::BFloat16* q_row, const float* w_row, const at::BFloat16* k2, int64_t T_pad, int64_t n,
               int64_t HI, int64_t DI, float* row) {
  const at::BFloat16* q_rows[1] = {q_row};
  const float* w_rows[1] = {w_row};
  float* rows[1] = {row};
  score_rows_dpbf16<1>(q_rows, w_rows, k2, T_pad, n, HI, DI, rows);
}

void score_two_rows(const at::BFloat16* const q_rows[2], const float* const w_rows[2], const at::BFloat16* k2,
                    int64_t T_pad, int64_t n, int64_t HI, int64_t DI, float* const rows[2]) {
  score_rows_dpbf16<2>(q_rows, w_rows, k2, T_pad, n, HI, DI, rows);
}

// Whether bfloat16 queries and keys of HI heads and DI dimensions are scored as stored (the tiles
// above), rather than widened to float first.
inline bool dpbf16_scores(int64_t HI, int64_t DI) { return DI % 2 == 0 && (HI == 1 || HI == 2 || HI == 4 || HI == 8); }
#else
inline bool dpbf16_scores(int64_t, int64_t) { return false; }
#endif

// How many of x[0 .. n) are >= v (for float, eight at a time: the compiler vectorises it).
template <typename scalar_t>
inline int64_t count_at_least(const scalar_t* x, int64_t n, scalar_t v) {
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) count += x[i] >= v;
  return count;
}

// A lower bound of the K-th largest of x[0 .. n) (K <= n): the largest v found by halving
// [min, max] twelve times such that at least K entries are >= v. It is exact enough for a
// prefilter's bound and costs a dozen vectorised counts instead of a selection's branches.
template <typename scalar_t>
scalar_t kth_largest_lower_bound(const scalar_t* x, int64_t n, int64_t K) {
  scalar_t lo = *std::min_element(x, x + n), hi = *std::max_element(x, x + n);
  if (count_at_least(x, n, hi) >= K) return hi;  // count(>= lo) = n >= K, count(>= hi) < K
  for (int step = 0; step < 12; ++step) {
    const scalar_t mid = lo + (hi - lo) / 2;
    if (!(mid > lo && mid < hi)) break;  // the interval is down to adjacent values
    (count_at_least(x, n, mid) >= K ? lo : hi) = mid;
  }
  return lo;
}

// The indices s < n with row[s] >= bound, ascending, into out (room for n); returns how many.
// Branch-free for each entry, as most are below the bound.
template <typename scalar_t>
inline int64_t entries_at_least(const scalar_t* row, int64_t n, scalar_t bound, int32_t* out) {
  int64_t count = 0;
  for (int64_t s = 0; s < n; ++s) {
    out[count] = int32_t(s);
    count += row[s] >= bound;
  }
  return count;
}

// row_topk's bound: entries below it cannot be among the K largest (-inf for short rows).
template <typename scalar_t>
scalar_t prefilter_bound(const scalar_t* row, int64_t n, int64_t K, std::vector<scalar_t>& scratch) {
  if (n < 4 * K) return -std::numeric_limits<scalar_t>::infinity();  // short rows: every entry
  const int64_t groups = std::max<int64_t>(2 * K, n / 16);
  scratch.assign(row, row + groups);
  for (int64_t start = groups; start < n; start += groups) {
    const int64_t len = std::min(groups, n - start);
    for (int64_t i = 0; i < len; ++i) scratch[i] = std::max(scratch[i], row[start + i]);
  }
  return kth_largest_lower_bound(scratch.data(), groups, K);
}

// The K largest of row[0 .. n) (n > K), earliest indices among ties at the K-th largest value
// (the rule of selectors.topk_earliest_ties), written ascending into out[0 .. K).
//
// Exact, without ranking all n: for G >= K strided groups {i, i + G, i + 2G, ...}, the K-th
// largest of the G group maxima is <= the K-th largest score (the maxima are K distinct entries),
// and so is any lower bound of it: only entries >= that bound can be selected; typically a few
// hundred of thousands.
template <typename scalar_t>
void row_topk(const scalar_t* row, int64_t n, int64_t K, std::vector<scalar_t>& scratch,
              std::vector<int32_t>& candidates, int64_t* out) {
  const scalar_t bound = prefilter_bound(row, n, K, scratch);
  candidates.resize(n);
  const int64_t count = entries_at_least(row, n, bound, candidates.data());
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

#ifdef __AVX512F__
// For float with AVX-512, the same selection without a branch per entry: the candidates and their
// scores, as order-preserving unsigned keys, are compacted sixteen entries per comparison; the K-th
// largest key comes from fixing its 32 bits from the top, each by one vectorised count over the
// candidates (instead of nth_element's data-dependent branches); the output takes the candidates in
// index order, ties at the K-th key while any are left.

// x's bits mapped so that unsigned order is float order (-0.0 first made +0.0: they are equal).
inline __m512i ordered_keys(__m512 x) {
  const __m512i bits = _mm512_castps_si512(_mm512_add_ps(x, _mm512_setzero_ps()));
  const __m512i flip = _mm512_or_si512(_mm512_srai_epi32(bits, 31), _mm512_set1_epi32(int32_t(0x80000000u)));
  return _mm512_xor_si512(bits, flip);
}

// How many of keys[0 .. n) are >= v.
inline int64_t keys_at_least(const float* keys, int64_t n, uint32_t v) {
  const __m512i vv = _mm512_set1_epi32(int32_t(v));
  int64_t count = 0, i = 0;
  for (; i + 16 <= n; i += 16)
    count += __builtin_popcount(_mm512_cmpge_epu32_mask(_mm512_loadu_si512(keys + i), vv));
  const __mmask16 tail = __mmask16((1u << (n - i)) - 1);
  count += __builtin_popcount(_mm512_mask_cmpge_epu32_mask(tail, _mm512_maskz_loadu_epi32(tail, keys + i), vv));
  return count;
}

template <>
void row_topk<float>(const float* row, int64_t n, int64_t K, std::vector<float>& scratch,
                     std::vector<int32_t>& candidates, int64_t* out) {
  const float bound = prefilter_bound(row, n, K, scratch);
  candidates.resize(n + 16);  // each compaction step stores sixteen lanes
  scratch.resize(n + 16);      // the candidates' keys, as float storage (read through intrinsics and memcpy)
  float* keys = scratch.data();
  const __m512 b = _mm512_set1_ps(bound);
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t count = 0;
  for (int64_t s = 0; s < n; s += 16) {
    const __mmask16 valid = n - s >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - s)) - 1);
    const __m512 x = _mm512_maskz_loadu_ps(valid, row + s);
    const __mmask16 take = _mm512_mask_cmp_ps_mask(valid, x, b, _CMP_GE_OQ);
    const __m512i index = _mm512_add_epi32(lanes, _mm512_set1_epi32(int32_t(s)));
    _mm512_storeu_si512(candidates.data() + count, _mm512_maskz_compress_epi32(take, index));
    _mm512_storeu_si512(keys + count, _mm512_maskz_compress_epi32(take, ordered_keys(x)));
    count += __builtin_popcount(take);
  }
  uint32_t kth = 0;  // the largest key with at least K candidates >= it: the K-th largest
  for (int bit = 31; bit >= 0; --bit) {
    const uint32_t trial = kth | (1u << bit);
    if (keys_at_least(keys, count, trial) >= K) kth = trial;
  }
  const int64_t above = kth == 0xffffffffu ? 0 : keys_at_least(keys, count, kth + 1);
  int64_t ties_left = K - above, filled = 0;  // ties at the K-th value: the earliest ones
  for (int64_t i = 0; i < count && filled < K; ++i) {
    uint32_t key;
    std::memcpy(&key, keys + i, sizeof(key));
    out[filled] = candidates[i];
    filled += key > kth || (key == kth && ties_left > 0);
    ties_left -= key == kth;
  }
}
#endif

// row_t: how q and the keys are stored (scalar_t, or bfloat16 in the pairs layout with float
// scores); scalar_t: the weights', the scores' and the ranking's type.
template <typename row_t, typename scalar_t>
void index_topk(const row_t* q, const row_t* k_t, const scalar_t* w, int64_t* selected, int64_t B,
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
      const row_t* keys = k_t + b * DI * T_pad;
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
      const row_t* q_rows[2] = {q + (b * T + t0) * HI * DI, q + (b * T + t1) * HI * DI};
      const scalar_t* w_rows[2] = {w + (b * T + t0) * HI, w + (b * T + t1) * HI};
      scalar_t* rows[2] = {row0.data(), row1.data()};
      score_two_rows(q_rows, w_rows, keys, T_pad, t1 + 1, HI, DI, rows);  // row t0 ignores key t1
      row_topk(row0.data(), t0 + 1, K, scratch, candidates, out0);
      row_topk(row1.data(), t1 + 1, K, scratch, candidates, out0 + K);
    }
  });
}

}  // namespace

at::Tensor causal_index_topk(const at::Tensor& q, const at::Tensor& k, const at::Tensor& w, int64_t top_k) {
  TORCH_CHECK(top_k >= 1, "top_k must be >= 1");
  check_indexer(q, k, w, /*bfloat16_rows=*/true);
  if (q.scalar_type() == at::kBFloat16 && !dpbf16_scores(q.size(2), q.size(3)))
    return causal_index_topk(q.to(at::kFloat), k.to(at::kFloat), w, top_k);  // widened exactly: the same products
  const int64_t B = q.size(0), T = q.size(1), HI = q.size(2), DI = q.size(3);
  const int64_t K = std::min(top_k, T);
  const int64_t T_pad = (T + 31) / 32 * 32;  // whole tiles of keys; the padding keys are never selected
  auto selected = at::empty({B, T, K}, q.options().dtype(at::kLong));
#ifdef SPARSE_VIZ_DPBF16
  if (q.scalar_type() == at::kBFloat16) {
    // Keys as pairs of dimensions: k2[b, p, s, j] = k[b, s, 2p + j].
    auto k2 = at::zeros({B, DI / 2, T_pad, 2}, k.options());
    k2.narrow(2, 0, T).copy_(k.view({B, T, DI / 2, 2}).permute({0, 2, 1, 3}));
    index_topk<at::BFloat16, float>(q.data_ptr<at::BFloat16>(), k2.data_ptr<at::BFloat16>(), w.data_ptr<float>(),
                                    selected.data_ptr<int64_t>(), B, T, T_pad, HI, DI, K);
    return selected;
  }
#endif
  auto k_t = at::zeros({B, DI, T_pad}, k.options());
  k_t.narrow(2, 0, T).copy_(k.transpose(1, 2));
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "causal_index_topk", [&] {
    index_topk<scalar_t, scalar_t>(q.data_ptr<scalar_t>(), k_t.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                         selected.data_ptr<int64_t>(), B, T, T_pad, HI, DI, K);
  });
  return selected;
}

}  // namespace sparse_viz_fused

TORCH_LIBRARY_FRAGMENT(sparse_viz_fused, m) {
  m.def("causal_index_topk", &sparse_viz_fused::causal_index_topk);
}
