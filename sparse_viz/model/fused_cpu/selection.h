// The selection as the fused CPU kernels read it, and the checks of their tensor arguments.
//   selected: (B, T, K) int64 or int32 (half the memory where a backward keeps it), -1 =
//   unfilled slot; shared by every head; any order
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace sparse_viz_fused {

// The valid slots of one selection row: slot[i] = j and offset[i] = (b * T + selected[j]) * HD,
// for the n valid slots in order.
template <typename idx_t>
inline int64_t valid_slots(const idx_t* sel, int64_t K, int64_t first_row, int64_t HD, int64_t* slot,
                           int64_t* offset) {
  int64_t n = 0;
  for (int64_t j = 0; j < K; ++j) {
    if (sel[j] < 0) continue;
    slot[n] = j;
    offset[n++] = (first_row + sel[j]) * HD;
  }
  return n;
}

inline void check_selection(const at::Tensor& selected, int64_t B, int64_t T) {
  TORCH_CHECK((selected.scalar_type() == at::kLong || selected.scalar_type() == at::kInt) && selected.dim() == 3 &&
                  selected.size(0) == B && selected.size(1) == T && selected.is_contiguous(),
              "selected must be a contiguous (B, T, K) int64 or int32 tensor");
}

// Calls run(p) with the selection's entries, p a const int64_t* or const int32_t*.
template <typename Run>
inline void with_selection(const at::Tensor& selected, Run&& run) {
  if (selected.scalar_type() == at::kInt)
    run(selected.data_ptr<int32_t>());
  else
    run(selected.data_ptr<int64_t>());
}

// A tensor with one entry per selection slot (an upstream gradient, a target): (B, T, K) like
// selected, contiguous, in q's dtype.
inline void check_per_slot(const at::Tensor& t, const at::Tensor& selected, const at::Tensor& q, const char* name) {
  TORCH_CHECK(t.is_contiguous() && t.sizes() == selected.sizes() && t.scalar_type() == q.scalar_type(), name,
              " must be a contiguous (B, T, K) tensor of q's dtype");
}

// q, k and w of one dtype; where bfloat16_rows, also q and k bfloat16 with w float32.
inline void check_indexer(const at::Tensor& q, const at::Tensor& k, const at::Tensor& w, bool bfloat16_rows = false) {
  const bool one_dtype = k.scalar_type() == q.scalar_type() && w.scalar_type() == q.scalar_type();
  const bool bfloat16 = bfloat16_rows && q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 &&
                        w.scalar_type() == at::kFloat;
  TORCH_CHECK(q.dim() == 4 && k.dim() == 3 && w.dim() == 3 && q.is_contiguous() && k.is_contiguous() &&
                  w.is_contiguous() && (one_dtype || bfloat16),
              "indexer q (B, T, HI, DI), k (B, T, DI), w (B, T, HI) must be contiguous and of one dtype",
              bfloat16_rows ? " (or q and k bfloat16, w float32)" : "");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(2) == q.size(3) &&
                  w.size(0) == q.size(0) && w.size(1) == q.size(1) && w.size(2) == q.size(2),
              "indexer q, k and w disagree in shape");
}

// The sizes the selected-key indexer kernels run on, after checking the indexer's tensors and the
// selection: batch, tokens, indexer heads, indexer dims, selection slots.
struct IndexerSelectionSizes {
  int64_t B, T, HI, DI, K;
};

inline IndexerSelectionSizes check_indexer_selection(const at::Tensor& q, const at::Tensor& k, const at::Tensor& w,
                                                     const at::Tensor& selected) {
  check_indexer(q, k, w);
  check_selection(selected, q.size(0), q.size(1));
  return {q.size(0), q.size(1), q.size(2), q.size(3), selected.size(2)};
}

}  // namespace sparse_viz_fused
