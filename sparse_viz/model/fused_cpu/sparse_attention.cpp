// Sparse attention over each query's selected keys, forward and backward, on CPU (loaded by
// fused_kernels.py; its readable meaning: `masked_sparse_attention` in attention.py).
// It keeps one log-sum-exp per (query, head) for backward instead of the (B, H, T, k)
// probabilities, as flash attention does.
// Layouts (contiguous): q, out, grad_out (B, T, H, D); k, v (B, T, HKV, D) with HKV dividing H
// (grouped-query attention: query head h reads key/value head h / (H / HKV)); lse (B, T, H);
// selected (B, T, K) int64 or int32.
// q, k, v, out and grad_out are float64, float32 or bfloat16 (stored as given: a bfloat16 row
// gathered is half a float32 one's bytes); scores, softmax, lse, probabilities and every sum are
// in the compute type (float for bfloat16), and gradients are summed there before their one
// rounding to the inputs' dtype.

#include <torch/library.h>

#include <tuple>

#include "selection.h"
#include "vector_ops.h"

namespace sparse_viz_fused {
namespace {

// Where a row of an output is summed: the row itself when it is stored in the compute type, else
// `buffer` (compute type), which round_into rounds into the row once the sums are complete.
template <typename scalar_t, typename acc_t>
inline acc_t* sums_of_row(scalar_t* row, std::vector<acc_t>& buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>)
    return row;
  else
    return buffer.data();
}

// The row's sums, rounded to the stored dtype (bfloat16: to nearest even); nothing to do where the
// sums were made in the row itself.
template <typename scalar_t, typename acc_t>
inline void round_into(const acc_t* sums, int64_t n, scalar_t* row) {
  if constexpr (!std::is_same_v<scalar_t, acc_t>)
    for (int64_t i = 0; i < n; ++i) row[i] = scalar_t(sums[i]);
}

// Token-major layouts: a selected key's rows of every head are one contiguous HKV * D block. The
// G = H / HKV query heads of a group read their key/value head's gathered rows together, once.

template <typename scalar_t, typename idx_t, typename acc_t = compute_type<scalar_t>>
void attention_forward(const scalar_t* q, const scalar_t* k, const scalar_t* v, const idx_t* selected,
                       scalar_t* out, acc_t* lse, acc_t* probs, bool per_head_probs, int64_t B, int64_t H,
                       int64_t HKV, int64_t T, int64_t D, int64_t K, acc_t scale) {
  constexpr bool stored_as_computed = std::is_same_v<scalar_t, acc_t>;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const int64_t Kp = round8(K), HD = H * D, KD = HKV * D, G = H / HKV;
  // Rows (b, t) in parallel: every output of a row is its own, so no two threads write one place.
  at::parallel_for(0, B * T, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> s(G * Kp);  // (G, Kp) scores, then probabilities, of one group's heads
    std::vector<acc_t> o_sums(stored_as_computed ? 0 : HD);  // a bfloat16 row's output before rounding
    std::vector<int64_t> slot(K), offset(K);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / T;
      const int64_t n = valid_slots(selected + row * K, K, b * T, KD, slot.data(), offset.data());
      const scalar_t* q_row = q + row * HD;
      acc_t* o_row = sums_of_row(out + row * HD, o_sums);
      if (n == 0) {  // no valid key: zero output and probabilities
        std::fill(lse + row * H, lse + (row + 1) * H, neg_inf);
        std::fill(out + row * HD, out + (row + 1) * HD, scalar_t(0));
        continue;
      }
      for (int64_t g = 0; g < HKV; ++g) {
        dots_of_heads_with_rows(q_row + g * G * D, G, k + g * D, offset.data(), n, D, s.data(), Kp);
        for (int64_t i = 0; i < G; ++i) {
          acc_t* s_h = s.data() + i * Kp;
          for (int64_t j = 0; j < n; ++j) s_h[j] *= scale;
          const acc_t m = max_of(s_h, n);
          exp_shifted(s_h, n, m);
          const acc_t total = sum_of(s_h, n);
          const acc_t inv = acc_t(1) / total;
          for (int64_t j = 0; j < n; ++j) s_h[j] *= inv;
          const int64_t h = g * G + i;
          lse[row * H + h] = m + std::log(total);
          acc_t* p_row = per_head_probs ? probs + ((b * H + h) * T + row % T) * K : probs + row * K;
          for (int64_t j = 0; j < n; ++j) p_row[slot[j]] += s_h[j];  // per head: once; summed: over heads
        }
        weighted_rows_sum_of_heads(v + g * D, offset.data(), s.data(), Kp, G, n, D, o_row + g * G * D);
      }
      round_into(o_row, HD, out + row * HD);
    }
  });
}

// The queries that selected each key, ascending: the selection transposed (a counting sort).
// queries[offsets[b * T + s] .. offsets[b * T + s + 1]) are the rows (b, t) whose selection holds s.
template <typename idx_t>
inline void transpose_selection(const idx_t* selected, int64_t B, int64_t T, int64_t K,
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

// Backward, by query: P and dS of the row's selected keys again, dQ = scale * sum_j dS_j K_j.
// The key and value gradients, dK = scale * sum_t dS_t Q_t and dV = sum_t P_t dO_t, go one of two
// ways:
//   one query head per key/value head: a second pass by key, over the queries that selected it,
//     recomputing P and dS there; it only gathers (a scatter from every query would read, add to
//     and write back rows all over dK and dV, one multiply-add per float moved: memory-bound);
//   a group of G >= 2 query heads: that scatter, in the query pass, while P and dS are at hand;
//     each row of dK and dV moved then takes G multiply-adds per float, and the key pass's two
//     recomputed products are gone. (With G = 1 the scatter was the slower of the two, with G >= 2
//     the faster, timed side by side on the long-context shapes.)
//     Threads beyond the first add into their own copies of dK and dV, summed at the end.
// dS_j = P_j (dP_j - delta), dP_j = dO . V_j, delta = sum_i P_i dP_i = dO . O.
// Every gradient entry is summed in the compute type and rounded once to the inputs' dtype: a row
// of dQ (and, by key, of dK and dV) when it is complete; scattered dK and dV at the end, from
// copies in the compute type (every thread's, for bfloat16).
template <typename scalar_t, typename idx_t, typename acc_t = compute_type<scalar_t>>
void attention_backward(const scalar_t* grad_out, const scalar_t* q, const scalar_t* k, const scalar_t* v,
                        const scalar_t* out, const acc_t* lse, const idx_t* selected, scalar_t* grad_q,
                        scalar_t* grad_k, scalar_t* grad_v, int64_t B, int64_t H, int64_t HKV, int64_t T, int64_t D,
                        int64_t K, acc_t scale) {
  constexpr bool stored_as_computed = std::is_same_v<scalar_t, acc_t>;
  const int64_t Kp = round8(K), HD = H * D, KD = HKV * D, G = H / HKV;
  std::vector<acc_t> delta(B * T * H);  // (B, T, H)
  at::parallel_for(0, B * T * H, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) delta[i] = dot(grad_out + i * D, out + i * D, D);
  });
  const bool scatter = G >= 2;
  // By query: dQ (and, scattered, dK and dV).
  const int threads = at::get_num_threads();
  // (B, T, HKV, D) sums of dK and dV by thread; thread 0 adds into the gradients themselves where
  // they are in the compute type.
  std::vector<std::vector<acc_t>> sums_k(threads), sums_v(threads);
  at::parallel_for(0, B * T, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> p(G * Kp), ds(G * Kp);  // (G, Kp) of one group's heads
    std::vector<acc_t> gq_sums(stored_as_computed ? 0 : HD);  // a bfloat16 row of dQ before rounding
    std::vector<int64_t> slot(K), offset(K);
    const int tid = at::get_thread_num();
    TORCH_CHECK(tid < threads, "sparse_attention_backward: thread ", tid, " of ", threads);
    acc_t *gk = nullptr, *gv = nullptr;  // where this thread's scattered dK and dV go
    if constexpr (stored_as_computed)
      if (tid == 0) gk = grad_k, gv = grad_v;
    if (scatter && gk == nullptr) {
      if (sums_k[tid].empty()) {
        sums_k[tid].assign(B * T * KD, acc_t(0));
        sums_v[tid].assign(B * T * KD, acc_t(0));
      }
      gk = sums_k[tid].data();
      gv = sums_v[tid].data();
    }
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / T;
      const int64_t n = valid_slots(selected + row * K, K, b * T, KD, slot.data(), offset.data());
      acc_t* gq_row = sums_of_row(grad_q + row * HD, gq_sums);
      for (int64_t g = 0; g < HKV; ++g) {
        const int64_t at = row * HD + g * G * D;  // the group's first query head
        dots_of_heads_with_rows(q + at, G, k + g * D, offset.data(), n, D, p.data(), Kp);
        dots_of_heads_with_rows(grad_out + at, G, v + g * D, offset.data(), n, D, ds.data(), Kp);
        for (int64_t i = 0; i < G; ++i) {
          acc_t *p_h = p.data() + i * Kp, *ds_h = ds.data() + i * Kp;
          const int64_t h = g * G + i;
          const acc_t row_lse = lse[row * H + h], row_delta = delta[row * H + h];
          for (int64_t j = 0; j < n; ++j) p_h[j] *= scale;
          exp_shifted(p_h, n, row_lse);  // the forward's probabilities, recomputed
          for (int64_t j = 0; j < n; ++j) ds_h[j] = p_h[j] * (ds_h[j] - row_delta) * scale;
        }
        weighted_rows_sum_of_heads(k + g * D, offset.data(), ds.data(), Kp, G, n, D, gq_row + g * G * D);
        if (scatter) {
          add_weighted_heads_to_rows(q + at, G, ds.data(), Kp, n, D, gk + g * D, offset.data());
          add_weighted_heads_to_rows(grad_out + at, G, p.data(), Kp, n, D, gv + g * D, offset.data());
        }
      }
      round_into(gq_row, HD, grad_q + row * HD);
    }
  });
  if (scatter) {  // the threads' sums, rounded once
    at::parallel_for(0, B * T * KD, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        acc_t dk = 0, dv = 0;
        if constexpr (stored_as_computed) dk = grad_k[i], dv = grad_v[i];
        for (int t = 0; t < threads; ++t) {
          if (sums_k[t].empty()) continue;
          dk += sums_k[t][i];
          dv += sums_v[t][i];
        }
        grad_k[i] = scalar_t(dk);
        grad_v[i] = scalar_t(dv);
      }
    });
    return;
  }
  // By key (one query head per key/value head: HKV == H, KD == HD): dK and dV.
  TORCH_INTERNAL_ASSERT(G == 1, "the key pass reads one query head per key/value head");
  std::vector<int64_t> offsets;
  std::vector<int32_t> queries;
  transpose_selection(selected, B, T, K, offsets, queries);
  at::parallel_for(0, B * T, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> p, ds;  // (n) for the n queries of a key
    std::vector<acc_t> row_sums(stored_as_computed ? 0 : D);  // a bfloat16 head row of dK or dV
    std::vector<int64_t> offset, query;
    for (int64_t key_row = begin; key_row < end; ++key_row) {
      const int64_t b = key_row / T;
      const int32_t* rows = queries.data() + offsets[key_row];
      const int64_t n = offsets[key_row + 1] - offsets[key_row];
      p.resize(round8(n));
      ds.resize(round8(n));
      offset.resize(n);
      query.resize(n);
      for (int64_t i = 0; i < n; ++i) {
        query[i] = (b * T + rows[i]) * H;  // + h: the (query, head) entry of lse and delta
        offset[i] = query[i] * D;
      }
      for (int64_t h = 0; h < H; ++h) {
        const int64_t at = key_row * HD + h * D;
        dots_with_rows(k + at, q + h * D, offset.data(), n, D, p.data());
        dots_with_rows(v + at, grad_out + h * D, offset.data(), n, D, ds.data());
        for (int64_t i = 0; i < n; ++i) {
          p[i] = p[i] * scale - lse[query[i] + h];  // each entry has its own query's log-sum-exp
          ds[i] -= delta[query[i] + h];
        }
        exp_shifted(p.data(), n, acc_t(0));
        for (int64_t i = 0; i < n; ++i) ds[i] *= p[i] * scale;
        acc_t* dv = sums_of_row(grad_v + at, row_sums);
        weighted_rows_sum(grad_out + h * D, offset.data(), p.data(), n, D, dv);
        round_into(dv, D, grad_v + at);
        acc_t* dk = sums_of_row(grad_k + at, row_sums);
        weighted_rows_sum(q + h * D, offset.data(), ds.data(), n, D, dk);
        round_into(dk, D, grad_k + at);
      }
    }
  });
}

// q (B, T, H, D); k and v (B, T, HKV, D) with HKV dividing H; contiguous, one dtype.
void check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && q.is_contiguous() && k.is_contiguous() && v.is_contiguous() &&
                  k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(1) == q.size(1) &&
                  k.size(3) == q.size(3) && k.size(2) > 0 && q.size(2) % k.size(2) == 0 &&
                  k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "q (B, T, H, D), k and v (B, T, HKV, D) with HKV dividing H must be contiguous and of one dtype");
  TORCH_CHECK(q.scalar_type() == at::kDouble || q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
              "q, k and v must be float64, float32 or bfloat16");
}

// The options of what the kernels compute in, for lse and the probabilities.
at::TensorOptions compute_options(const at::Tensor& q) {
  return q.options().dtype(q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                                        const at::Tensor& v,
                                                                        const at::Tensor& selected, double scale,
                                                                        bool per_head_probs) {
  check_attention_inputs(q, k, v);
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), HKV = k.size(2), D = q.size(3);
  check_selection(selected, B, T);
  const int64_t K = selected.size(2);
  auto out = at::empty_like(q);
  auto lse = at::empty({B, T, H}, compute_options(q));
  auto probs = per_head_probs ? at::zeros({B, H, T, K}, compute_options(q)) : at::zeros({B, T, K}, compute_options(q));
  with_selection(selected, [&](const auto* sel) {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "sparse_attention_forward", [&] {
      using acc_t = compute_type<scalar_t>;
      attention_forward<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), sel,
                                  out.data_ptr<scalar_t>(), lse.data_ptr<acc_t>(), probs.data_ptr<acc_t>(),
                                  per_head_probs, B, H, HKV, T, D, K, acc_t(scale));
    });
  });
  return {out, lse, probs};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& selected, double scale) {
  TORCH_CHECK(grad_out.is_contiguous() && grad_out.sizes() == q.sizes() && out.is_contiguous(),
              "grad_out and out must be contiguous and shaped like q");
  check_attention_inputs(q, k, v);
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), HKV = k.size(2), D = q.size(3);
  check_selection(selected, B, T);
  const int64_t K = selected.size(2);
  auto grad_q = at::empty_like(q);
  auto grad_k = at::zeros_like(k);
  auto grad_v = at::zeros_like(v);
  with_selection(selected, [&](const auto* sel) {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "sparse_attention_backward", [&] {
      using acc_t = compute_type<scalar_t>;
      attention_backward<scalar_t>(grad_out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                                   v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), lse.data_ptr<acc_t>(), sel,
                                   grad_q.data_ptr<scalar_t>(), grad_k.data_ptr<scalar_t>(),
                                   grad_v.data_ptr<scalar_t>(), B, H, HKV, T, D, K, acc_t(scale));
    });
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace sparse_viz_fused

TORCH_LIBRARY_FRAGMENT(sparse_viz_fused, m) {
  m.def("sparse_attention_forward", &sparse_viz_fused::sparse_attention_forward);
  m.def("sparse_attention_backward", &sparse_viz_fused::sparse_attention_backward);
}
