// Sparse attention over each query's selected keys, forward and backward, on CPU (loaded by
// fused_kernels.py; its readable meaning: `masked_sparse_attention` in attention.py).
// It keeps one log-sum-exp per (query, head) for backward instead of the (B, H, T, k)
// probabilities, as flash attention does.
// Layouts (contiguous): q, k, v, out, grad_out (B, T, H, D); lse (B, T, H); selected (B, T, K).

#include <torch/library.h>

#include <tuple>

#include "selection.h"
#include "vector_ops.h"

namespace sparse_viz_fused {
namespace {

// Token-major layouts: q, k, v, out, grad_out (B, T, H, D); a selected key's rows of every head
// are one contiguous H * D block, read once per query for all heads.

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

}  // namespace

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

}  // namespace sparse_viz_fused

TORCH_LIBRARY_FRAGMENT(sparse_viz_fused, m) {
  m.def("sparse_attention_forward", &sparse_viz_fused::sparse_attention_forward);
  m.def("sparse_attention_backward", &sparse_viz_fused::sparse_attention_backward);
}
