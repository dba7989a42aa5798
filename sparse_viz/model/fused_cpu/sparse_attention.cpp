// Sparse attention over each query's selected keys, forward and backward, on CPU (loaded by
// fused_kernels.py; its readable meaning: `masked_sparse_attention` in attention.py).
// It keeps one log-sum-exp per (query, head) for backward instead of the (B, H, T, k)
// probabilities, as flash attention does.
// Layouts (contiguous): q, out, grad_out (B, T, H, D); k, v (B, T, HKV, D) with HKV dividing H
// (grouped-query attention: query head h reads key/value head h / (H / HKV)); lse (B, T, H);
// selected (B, T, K).

#include <torch/library.h>

#include <tuple>

#include "selection.h"
#include "vector_ops.h"

namespace sparse_viz_fused {
namespace {

// Token-major layouts: a selected key's rows of every head are one contiguous HKV * D block. The
// G = H / HKV query heads of a group read their key/value head's gathered rows together, once.

template <typename scalar_t>
void attention_forward(const scalar_t* q, const scalar_t* k, const scalar_t* v, const int64_t* selected,
                       scalar_t* out, scalar_t* lse, scalar_t* probs, bool per_head_probs, int64_t B,
                       int64_t H, int64_t HKV, int64_t T, int64_t D, int64_t K, scalar_t scale) {
  const scalar_t neg_inf = -std::numeric_limits<scalar_t>::infinity();
  const int64_t Kp = round8(K), HD = H * D, KD = HKV * D, G = H / HKV;
  // Rows (b, t) in parallel: every output of a row is its own, so no two threads write one place.
  at::parallel_for(0, B * T, 16, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> s(G * Kp);  // (G, Kp) scores, then probabilities, of one group's heads
    std::vector<int64_t> slot(K), offset(K);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / T;
      const int64_t n = valid_slots(selected + row * K, K, b * T, KD, slot.data(), offset.data());
      const scalar_t* q_row = q + row * HD;
      scalar_t* o_row = out + row * HD;
      if (n == 0) {  // no valid key: zero output and probabilities
        std::fill(lse + row * H, lse + (row + 1) * H, neg_inf);
        std::fill(o_row, o_row + HD, scalar_t(0));
        continue;
      }
      for (int64_t g = 0; g < HKV; ++g) {
        dots_of_heads_with_rows(q_row + g * G * D, G, k + g * D, offset.data(), n, D, s.data(), Kp);
        for (int64_t i = 0; i < G; ++i) {
          scalar_t* s_h = s.data() + i * Kp;
          for (int64_t j = 0; j < n; ++j) s_h[j] *= scale;
          const scalar_t m = max_of(s_h, n);
          exp_shifted(s_h, n, m);
          const scalar_t total = sum_of(s_h, n);
          const scalar_t inv = scalar_t(1) / total;
          for (int64_t j = 0; j < n; ++j) s_h[j] *= inv;
          const int64_t h = g * G + i;
          lse[row * H + h] = m + std::log(total);
          scalar_t* p_row = per_head_probs ? probs + ((b * H + h) * T + row % T) * K : probs + row * K;
          for (int64_t j = 0; j < n; ++j) p_row[slot[j]] += s_h[j];  // per head: once; summed: over heads
        }
        weighted_rows_sum_of_heads(v + g * D, offset.data(), s.data(), Kp, G, n, D, o_row + g * G * D);
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
template <typename scalar_t>
void attention_backward(const scalar_t* grad_out, const scalar_t* q, const scalar_t* k, const scalar_t* v,
                        const scalar_t* out, const scalar_t* lse, const int64_t* selected, scalar_t* grad_q,
                        scalar_t* grad_k, scalar_t* grad_v, int64_t B, int64_t H, int64_t HKV, int64_t T, int64_t D,
                        int64_t K, scalar_t scale) {
  const int64_t Kp = round8(K), HD = H * D, KD = HKV * D, G = H / HKV;
  std::vector<scalar_t> delta(B * T * H);  // (B, T, H)
  at::parallel_for(0, B * T * H, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) delta[i] = dot(grad_out + i * D, out + i * D, D);
  });
  const bool scatter = G >= 2;
  // By query: dQ (and, scattered, dK and dV).
  const int threads = at::get_num_threads();
  std::vector<std::vector<scalar_t>> extra_k(threads), extra_v(threads);  // (B, T, HKV, D) of threads > 0
  at::parallel_for(0, B * T, 16, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> p(G * Kp), ds(G * Kp);  // (G, Kp) of one group's heads
    std::vector<int64_t> slot(K), offset(K);
    const int tid = at::get_thread_num();
    TORCH_CHECK(tid < threads, "sparse_attention_backward: thread ", tid, " of ", threads);
    scalar_t *gk = grad_k, *gv = grad_v;
    if (scatter && tid > 0) {
      if (extra_k[tid].empty()) {
        extra_k[tid].assign(B * T * KD, scalar_t(0));
        extra_v[tid].assign(B * T * KD, scalar_t(0));
      }
      gk = extra_k[tid].data();
      gv = extra_v[tid].data();
    }
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / T;
      const int64_t n = valid_slots(selected + row * K, K, b * T, KD, slot.data(), offset.data());
      for (int64_t g = 0; g < HKV; ++g) {
        const int64_t at = row * HD + g * G * D;  // the group's first query head
        dots_of_heads_with_rows(q + at, G, k + g * D, offset.data(), n, D, p.data(), Kp);
        dots_of_heads_with_rows(grad_out + at, G, v + g * D, offset.data(), n, D, ds.data(), Kp);
        for (int64_t i = 0; i < G; ++i) {
          scalar_t *p_h = p.data() + i * Kp, *ds_h = ds.data() + i * Kp;
          const int64_t h = g * G + i;
          const scalar_t row_lse = lse[row * H + h], row_delta = delta[row * H + h];
          for (int64_t j = 0; j < n; ++j) p_h[j] *= scale;
          exp_shifted(p_h, n, row_lse);  // the forward's probabilities, recomputed
          for (int64_t j = 0; j < n; ++j) ds_h[j] = p_h[j] * (ds_h[j] - row_delta) * scale;
        }
        weighted_rows_sum_of_heads(k + g * D, offset.data(), ds.data(), Kp, G, n, D, grad_q + at);
        if (scatter) {
          add_weighted_heads_to_rows(q + at, G, ds.data(), Kp, n, D, gk + g * D, offset.data());
          add_weighted_heads_to_rows(grad_out + at, G, p.data(), Kp, n, D, gv + g * D, offset.data());
        }
      }
    }
  });
  if (scatter) {  // the other threads' terms
    for (int t = 1; t < threads; ++t) {
      if (extra_k[t].empty()) continue;
      at::parallel_for(0, B * T * KD, 4096, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          grad_k[i] += extra_k[t][i];
          grad_v[i] += extra_v[t][i];
        }
      });
    }
    return;
  }
  // By key (one query head per key/value head: HKV == H, KD == HD): dK and dV.
  TORCH_INTERNAL_ASSERT(G == 1, "the key pass reads one query head per key/value head");
  std::vector<int64_t> offsets;
  std::vector<int32_t> queries;
  transpose_selection(selected, B, T, K, offsets, queries);
  at::parallel_for(0, B * T, 16, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> p, ds;  // (n) for the n queries of a key
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
        exp_shifted(p.data(), n, scalar_t(0));
        weighted_rows_sum(grad_out + h * D, offset.data(), p.data(), n, D, grad_v + at);
        for (int64_t i = 0; i < n; ++i) ds[i] *= p[i] * scale;
        weighted_rows_sum(q + h * D, offset.data(), ds.data(), n, D, grad_k + at);
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
  auto lse = at::empty({B, T, H}, q.options());
  auto probs = per_head_probs ? at::zeros({B, H, T, K}, q.options()) : at::zeros({B, T, K}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "sparse_attention_forward", [&] {
    attention_forward<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                                selected.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(),
                                probs.data_ptr<scalar_t>(), per_head_probs, B, H, HKV, T, D, K, scalar_t(scale));
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
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "sparse_attention_backward", [&] {
    attention_backward<scalar_t>(grad_out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                                 v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(),
                                 selected.data_ptr<int64_t>(), grad_q.data_ptr<scalar_t>(),
                                 grad_k.data_ptr<scalar_t>(), grad_v.data_ptr<scalar_t>(), B, H, HKV, T, D, K,
                                 scalar_t(scale));
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace sparse_viz_fused

TORCH_LIBRARY_FRAGMENT(sparse_viz_fused, m) {
  m.def("sparse_attention_forward", &sparse_viz_fused::sparse_attention_forward);
  m.def("sparse_attention_backward", &sparse_viz_fused::sparse_attention_backward);
}
