// The Lightning Indexer's scores at each query's selected keys, forward and backward, on CPU
// (loaded by fused_kernels.py; readable meaning: the full score matrix of
// `LightningIndexer.forward` read at the selection):
//   I[t, s] = sum_h w[t, h] * ReLU(q[t, h] . k[s])
// and the sparse stage's loss on them, KL(p || softmax(I)) per row over the selected keys
// (readable meaning: `indexer_kl` of those scores), so that neither the (B, T, K) scores nor the
// loss's (B, T, K) intermediates are ever stored.
// Layouts (contiguous): q (B, T, HI, DI), k (B, T, DI), w (B, T, HI); selected, target (B, T, K).

#include <torch/library.h>

#include <tuple>

#include "selection.h"
#include "vector_ops.h"

namespace sparse_viz_fused {
namespace {

// One row's logits, every head: logits[h * Kp + i] = q[row, h] . k[key i], for its n valid keys.
template <typename scalar_t>
inline void row_logits(const scalar_t* q, const scalar_t* k, int64_t row, const int64_t* offset, int64_t n,
                       int64_t HI, int64_t DI, int64_t Kp, scalar_t* logits) {
  for (int64_t h = 0; h < HI; ++h) dots_with_rows(q + (row * HI + h) * DI, k, offset, n, DI, logits + h * Kp);
}

// One row's scores from its logits: scores[i] = sum_h w[row, h] * ReLU(logits[h, i]).
template <typename scalar_t>
inline void row_scores(const scalar_t* logits, const scalar_t* w, int64_t row, int64_t n, int64_t HI, int64_t Kp,
                       scalar_t* scores) {
  std::fill(scores, scores + n, scalar_t(0));
  for (int64_t h = 0; h < HI; ++h) {
    const scalar_t weight = w[row * HI + h];
    for (int64_t i = 0; i < n; ++i) scores[i] += weight * std::max(logits[h * Kp + i], scalar_t(0));
  }
}

template <typename scalar_t, typename idx_t>
void index_scores_forward(const scalar_t* q, const scalar_t* k, const scalar_t* w, const idx_t* selected,
                          scalar_t* scores, int64_t B, int64_t T, int64_t HI, int64_t DI, int64_t K) {
  const int64_t Kp = round8(K);
  at::parallel_for(0, B * T, 64, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> slot(K), offset(K);
    std::vector<scalar_t> logits(HI * Kp), values(K);  // values: the row's scores, valid slots in order
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = valid_slots(selected + row * K, K, (row / T) * T, DI, slot.data(), offset.data());
      row_logits(q, k, row, offset.data(), n, HI, DI, Kp, logits.data());
      row_scores(logits.data(), w, row, n, HI, Kp, values.data());
      scalar_t* out = scores + row * K;
      std::fill(out, out + K, scalar_t(0));  // unfilled slots score 0
      for (int64_t i = 0; i < n; ++i) out[slot[i]] = values[i];
    }
  });
}

// The indexer's KL at the selected keys, one row: KL(p || softmax(I)) over its n valid keys, p the
// target read at them and L1-normalised (0 where the target sums to 0 or n = 0, as `indexer_kl`).
// Writes the scores' log-sum-exp (for backward) and returns the KL. scores, p and e hold round8(n)
// entries; p and e are scratch.
//   KL = sum_{p_i > 0} (p_i / mass) (log p_i - log mass - (I_i - lse))
template <typename scalar_t>
inline scalar_t kl_terms(const scalar_t* p, const scalar_t* scores, int64_t n, scalar_t shift) {
  scalar_t kl = 0;
  for (int64_t i = 0; i < n; ++i)
    if (p[i] > scalar_t(0)) kl += p[i] * (std::log(p[i]) - scores[i] + shift);  // 0 log 0 = 0
  return kl;
}

template <>
inline float kl_terms<float>(const float* p, const float* scores, int64_t n, float shift) {
  v8f sum = splat8(0.f);
  const v8f s = splat8(shift), zero = splat8(0.f), one = splat8(1.f);
  for (int64_t i = 0; i < n; i += 8) {  // entries past n: p is 0 there
    const v8f pi = load8(p + i);
    const v8i positive = pi > 0.f;
    const v8f term = pi * (log8(positive ? pi : one) - load8(scores + i) + s);
    sum += positive ? term : zero;
  }
  return sum8(sum);
}

template <typename scalar_t>
inline scalar_t row_kl(const scalar_t* scores, const scalar_t* target, const int64_t* slot, int64_t n, scalar_t* p,
                       scalar_t* e, scalar_t* lse) {
  if (n == 0) {
    *lse = 0;
    return 0;
  }
  const scalar_t m = max_of(scores, n);
  std::copy(scores, scores + n, e);
  exp_shifted(e, n, m);
  *lse = m + std::log(sum_of(e, n));
  for (int64_t i = 0; i < round8(n); ++i) p[i] = i < n ? target[slot[i]] : scalar_t(0);
  const scalar_t mass = sum_of(p, n);
  if (!(mass > scalar_t(0))) return 0;
  // sum_i (p_i / mass) (log p_i - log mass - I_i + lse), the p_i / mass summing to 1
  return kl_terms(p, scores, n, *lse) / mass - std::log(mass);
}

template <typename scalar_t, typename idx_t>
void index_kl_forward(const scalar_t* q, const scalar_t* k, const scalar_t* w, const idx_t* selected,
                      const scalar_t* target, scalar_t* kl, scalar_t* lse, int64_t B, int64_t T, int64_t HI,
                      int64_t DI, int64_t K) {
  const int64_t Kp = round8(K);
  at::parallel_for(0, B * T, 64, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> slot(K), offset(K);
    std::vector<scalar_t> logits(HI * Kp), scores(Kp), p(Kp), e(Kp);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = valid_slots(selected + row * K, K, (row / T) * T, DI, slot.data(), offset.data());
      row_logits(q, k, row, offset.data(), n, HI, DI, Kp, logits.data());
      row_scores(logits.data(), w, row, n, HI, Kp, scores.data());
      kl[row] = row_kl(scores.data(), target + row * K, slot.data(), n, p.data(), e.data(), lse + row);
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

// dk[key i] += sum_h coeff[h, i] q[h] for a row's n keys: q_row (HI, DI), coeff (HI, stride).
// (No test for a zero coefficient: ReLU is active about half the time, so a branch on it would be
// mispredicted about half the time, and adding zero is cheaper.)
template <typename scalar_t>
inline void add_head_combinations(const scalar_t* q_row, const scalar_t* coeff, int64_t stride, const int64_t* offset,
                                  int64_t n, int64_t HI, int64_t DI, scalar_t* grad_k) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t h = 0; h < HI; ++h) axpy(coeff[h * stride + i], q_row + h * DI, grad_k + offset[i], DI);
}

// For float: the key's sum over heads in U registers, then one read-modify-write of its gradient.
template <int U>
inline void add_head_combinations_tiles(const float* q_row, const float* coeff, int64_t stride, const int64_t* offset,
                                        int64_t n, int64_t HI, float* grad_k) {
  for (int64_t i = 0; i < n; ++i) {
    v8f acc[U];
    for (int u = 0; u < U; ++u) acc[u] = splat8(0.f);
    for (int64_t h = 0; h < HI; ++h) {
      const v8f c = splat8(coeff[h * stride + i]);
      for (int u = 0; u < U; ++u) acc[u] += c * load8(q_row + h * 8 * U + 8 * u);
    }
    float* gk = grad_k + offset[i];
    for (int u = 0; u < U; ++u) store8(gk + 8 * u, load8(gk + 8 * u) + acc[u]);
  }
}

template <>
inline void add_head_combinations<float>(const float* q_row, const float* coeff, int64_t stride, const int64_t* offset,
                                         int64_t n, int64_t HI, int64_t DI, float* grad_k) {
  switch (DI) {
    case 16: return add_head_combinations_tiles<2>(q_row, coeff, stride, offset, n, HI, grad_k);
    case 32: return add_head_combinations_tiles<4>(q_row, coeff, stride, offset, n, HI, grad_k);
    case 64: return add_head_combinations_tiles<8>(q_row, coeff, stride, offset, n, HI, grad_k);
    default:
      for (int64_t i = 0; i < n; ++i)
        for (int64_t h = 0; h < HI; ++h) axpy(coeff[h * stride + i], q_row + h * DI, grad_k + offset[i], DI);
  }
}

// The backward of I at the selected keys, given each row's gradient dL/dI at its valid keys:
// row_grad(row, n, slot, logits, g) writes g[0 .. n) from the row's recomputed logits (HI, Kp).
template <typename scalar_t, typename idx_t, typename RowGrad>
void index_scores_backward(const scalar_t* q, const scalar_t* k, const scalar_t* w, const idx_t* selected,
                           scalar_t* grad_q, scalar_t* grad_k, scalar_t* grad_w, int64_t B, int64_t T, int64_t HI,
                           int64_t DI, int64_t K, const RowGrad& row_grad) {
  const int64_t Kp = round8(K);
  // Rows in parallel; keys are shared by many rows, so each thread scatters into its own copy of
  // grad_k (B * T * DI: small, it stays in cache) and the copies are summed at the end.
  const int64_t n_threads = at::get_num_threads();
  std::vector<std::vector<scalar_t>> grad_k_copies(n_threads);
  at::parallel_for(0, B * T, 64, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t>& gk = grad_k_copies[at::get_thread_num()];
    if (gk.empty()) gk.assign(B * T * DI, scalar_t(0));
    std::vector<int64_t> slot(K), offset(K);
    std::vector<scalar_t> logits(HI * Kp), coeff(HI * K), g(Kp);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = valid_slots(selected + row * K, K, (row / T) * T, DI, slot.data(), offset.data());
      row_logits(q, k, row, offset.data(), n, HI, DI, Kp, logits.data());  // recomputed, not saved
      row_grad(row, n, slot.data(), logits.data(), g.data());
      for (int64_t h = 0; h < HI; ++h) {
        scalar_t* c_h = coeff.data() + h * K;
        grad_w[row * HI + h] = relu_backward(logits.data() + h * Kp, g.data(), w[row * HI + h], n, c_h);
        weighted_rows_sum(k, offset.data(), c_h, n, DI, grad_q + (row * HI + h) * DI);
      }
      add_head_combinations(q + row * HI * DI, coeff.data(), K, offset.data(), n, HI, DI, gk.data());
    }
  });
  for (const auto& copy : grad_k_copies)
    if (!copy.empty()) axpy(scalar_t(1), copy.data(), grad_k, B * T * DI);
}

}  // namespace

at::Tensor selected_index_scores_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& w,
                                         const at::Tensor& selected) {
  const auto [B, T, HI, DI, K] = check_indexer_selection(q, k, w, selected);
  auto scores = at::empty({B, T, K}, q.options());
  with_selection(selected, [&](const auto* sel) {
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "selected_index_scores_forward", [&] {
      index_scores_forward<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), sel,
                                     scores.data_ptr<scalar_t>(), B, T, HI, DI, K);
    });
  });
  return scores;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> selected_index_scores_backward(const at::Tensor& grad,
                                                                              const at::Tensor& q,
                                                                              const at::Tensor& k,
                                                                              const at::Tensor& w,
                                                                              const at::Tensor& selected) {
  const auto [B, T, HI, DI, K] = check_indexer_selection(q, k, w, selected);
  check_per_slot(grad, selected, q, "grad");
  auto grad_q = at::zeros_like(q);
  auto grad_k = at::zeros_like(k);
  auto grad_w = at::zeros_like(w);
  with_selection(selected, [&](const auto* sel) {
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "selected_index_scores_backward", [&] {
      const scalar_t* upstream = grad.data_ptr<scalar_t>();
      auto read_upstream = [&](int64_t row, int64_t n, const int64_t* slot, const scalar_t*, scalar_t* g) {
        for (int64_t i = 0; i < n; ++i) g[i] = upstream[row * K + slot[i]];
      };
      index_scores_backward<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), sel,
                                      grad_q.data_ptr<scalar_t>(), grad_k.data_ptr<scalar_t>(),
                                      grad_w.data_ptr<scalar_t>(), B, T, HI, DI, K, read_upstream);
    });
  });
  return {grad_q, grad_k, grad_w};
}

// KL(p || softmax(I)) per query row over its valid selected keys (B, T), and the scores'
// log-sum-exp per row (B, T) for backward. target (B, T, K): non-negative, in selection layout.
std::tuple<at::Tensor, at::Tensor> selected_index_kl_forward(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& w, const at::Tensor& selected,
                                                             const at::Tensor& target) {
  const auto [B, T, HI, DI, K] = check_indexer_selection(q, k, w, selected);
  check_per_slot(target, selected, q, "target");
  auto kl = at::empty({B, T}, q.options());
  auto lse = at::empty({B, T}, q.options());
  with_selection(selected, [&](const auto* sel) {
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "selected_index_kl_forward", [&] {
      index_kl_forward<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), sel,
                                 target.data_ptr<scalar_t>(), kl.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), B,
                                 T, HI, DI, K);
    });
  });
  return {kl, lse};
}

// dKL_row / dI_i = softmax(I)_i * sum(p) - p_i over the row's valid keys (p normalised; sum(p) is
// 1, or 0 for a row whose target has no mass), times the row's upstream gradient.
std::tuple<at::Tensor, at::Tensor, at::Tensor> selected_index_kl_backward(
    const at::Tensor& grad_kl, const at::Tensor& q, const at::Tensor& k, const at::Tensor& w,
    const at::Tensor& selected, const at::Tensor& target, const at::Tensor& lse) {
  const auto [B, T, HI, DI, K] = check_indexer_selection(q, k, w, selected);
  check_per_slot(target, selected, q, "target");
  TORCH_CHECK(grad_kl.is_contiguous() && lse.is_contiguous() && grad_kl.sizes() == lse.sizes() && lse.dim() == 2 &&
                  lse.size(0) == B && lse.size(1) == T,
              "grad_kl and lse must be contiguous (B, T) tensors");
  auto grad_q = at::zeros_like(q);
  auto grad_k = at::zeros_like(k);
  auto grad_w = at::zeros_like(w);
  with_selection(selected, [&](const auto* sel) {
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "selected_index_kl_backward", [&] {
      const scalar_t *upstream = grad_kl.data_ptr<scalar_t>(), *p = target.data_ptr<scalar_t>(),
                     *row_lse = lse.data_ptr<scalar_t>(), *w_data = w.data_ptr<scalar_t>();
      const int64_t Kp = round8(K);
      auto kl_grad = [&](int64_t row, int64_t n, const int64_t* slot, const scalar_t* logits, scalar_t* g) {
        row_scores(logits, w_data, row, n, HI, Kp, g);  // g = I, then its gradient in place
        scalar_t mass = 0;
        for (int64_t i = 0; i < n; ++i) mass += p[row * K + slot[i]];
        const scalar_t inv = mass > scalar_t(0) ? scalar_t(1) / mass : scalar_t(0);
        const scalar_t has_mass = mass > scalar_t(0) ? scalar_t(1) : scalar_t(0);
        exp_shifted(g, n, row_lse[row]);  // softmax(I)
        for (int64_t i = 0; i < n; ++i) g[i] = upstream[row] * (g[i] * has_mass - p[row * K + slot[i]] * inv);
      };
      index_scores_backward<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), w_data, sel,
                                      grad_q.data_ptr<scalar_t>(), grad_k.data_ptr<scalar_t>(),
                                      grad_w.data_ptr<scalar_t>(), B, T, HI, DI, K, kl_grad);
    });
  });
  return {grad_q, grad_k, grad_w};
}

}  // namespace sparse_viz_fused

TORCH_LIBRARY_FRAGMENT(sparse_viz_fused, m) {
  m.def("selected_index_scores_forward", &sparse_viz_fused::selected_index_scores_forward);
  m.def("selected_index_scores_backward", &sparse_viz_fused::selected_index_scores_backward);
  m.def("selected_index_kl_forward", &sparse_viz_fused::selected_index_kl_forward);
  m.def("selected_index_kl_backward", &sparse_viz_fused::selected_index_kl_backward);
}
