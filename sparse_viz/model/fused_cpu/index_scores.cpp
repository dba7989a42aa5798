// The Lightning Indexer's scores at each query's selected keys, forward and backward, on CPU
// (loaded by fused_kernels.py; readable meaning: the full score matrix of
// `LightningIndexer.forward` read at the selection):
//   I[t, s] = sum_h w[t, h] * ReLU(q[t, h] . k[s])
// Layouts (contiguous): q (B, T, HI, DI), k (B, T, DI), w (B, T, HI); selected (B, T, K).

#include <torch/library.h>

#include <tuple>

#include "selection.h"
#include "vector_ops.h"

namespace sparse_viz_fused {
namespace {

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

}  // namespace

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

}  // namespace sparse_viz_fused

TORCH_LIBRARY_FRAGMENT(sparse_viz_fused, m) {
  m.def("selected_index_scores_forward", &sparse_viz_fused::selected_index_scores_forward);
  m.def("selected_index_scores_backward", &sparse_viz_fused::selected_index_scores_backward);
}
