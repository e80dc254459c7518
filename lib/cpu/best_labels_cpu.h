// Viterbi's per-cell label choice on the CPU: for every lattice cell (t, u), the max and the first
// argmax over v != blank of emissions[t, v] + predictions[u, v]. This is max-plus work of
// B*T*(U+1)*V operations, outside the sequential recursion. For float, kRows emission rows are
// matched against each prediction row at once (each prediction load serves kRows rows), with
// 8-lane running maxima that keep each lane's first index (GCC vector extensions: one AVX
// register in the x86-64-v3 clone, two SSE registers otherwise).
#pragma once

#include <cstdint>
#include <cstring>

#include "../lattice.h"

namespace jax_transducer {
namespace cpu {

constexpr int kRows = 4;

// Merges a candidate (value, index) into the running (best, label): larger value, or the lower
// index on a tie; index -1 means no candidate.
template <typename T>
inline void merge_best(T value, int32_t index, T& best, int32_t& label) {
  if (index >= 0 && (value > best || (value == best && (label < 0 || index < label)))) {
    best = value;
    label = index;
  }
}

// Rows e[0..rows) against one prediction row p over v in [begin, end), merged into best[r],
// label[r]. The generic version is plain scalar code.
template <typename T>
inline void max_plus(const T* const* e, int rows, const T* p, int64_t begin, int64_t end,
                     T* best, int32_t* label) {
  for (int r = 0; r < rows; ++r)
    for (int64_t v = begin; v < end; ++v)
      merge_best(e[r][v] + p[v], static_cast<int32_t>(v), best[r], label[r]);
}

template <>
inline void max_plus<float>(const float* const* e, int rows, const float* p, int64_t begin,
                            int64_t end, float* best, int32_t* label) {
  typedef float vf __attribute__((vector_size(32)));
  typedef int32_t vi __attribute__((vector_size(32)));
  constexpr int kLanes = 8;
  if (rows != kRows) {  // a remainder tile: plain code
    for (int r = 0; r < rows; ++r)
      for (int64_t v = begin; v < end; ++v)
        merge_best(e[r][v] + p[v], static_cast<int32_t>(v), best[r], label[r]);
    return;
  }
  vf acc[kRows];
  vi idx[kRows];
  for (int r = 0; r < kRows; ++r) {
    acc[r] = vf{} - static_cast<float>(INFINITY);
    idx[r] = vi{} - 1;
  }
  vi at = {0, 1, 2, 3, 4, 5, 6, 7};
  at += static_cast<int32_t>(begin);
  int64_t v = begin;
  for (; v + kLanes <= end; v += kLanes, at += kLanes) {
    vf y;
    std::memcpy(&y, p + v, sizeof y);
    for (int r = 0; r < kRows; ++r) {
      vf x;
      std::memcpy(&x, e[r] + v, sizeof x);
      const vf s = x + y;
      const vi better = s > acc[r];  // strict: each lane keeps its first maximum
      acc[r] = better ? s : acc[r];
      idx[r] = better ? at : idx[r];
    }
  }
  for (int r = 0; r < kRows; ++r) {
    for (int l = 0; l < kLanes; ++l) merge_best(acc[r][l], idx[r][l], best[r], label[r]);
    for (int64_t w = v; w < end; ++w)
      merge_best(e[r][w] + p[w], static_cast<int32_t>(w), best[r], label[r]);
  }
}

// `rows` (<= kRows) consecutive emission rows e (row stride nv) against every prediction row:
// best[r * u1 + u], label[r * u1 + u]. A cell whose scores are all -inf or NaN gets -inf and the
// lowest non-blank label (blank if V == 1).
template <typename T>
inline void best_labels_rows(const T* e, int rows, const T* pred, int64_t u1, int64_t nv,
                             int32_t blank, T* best, int32_t* label) {
  const int32_t fallback = blank == 0 && nv > 1 ? 1 : 0;
  const T* e_rows[kRows];
  for (int r = 0; r < rows; ++r) e_rows[r] = e + r * nv;
  for (int64_t u = 0; u < u1; ++u) {
    const T* p = pred + u * nv;
    T b[kRows];
    int32_t l[kRows];
    for (int r = 0; r < rows; ++r) {
      b[r] = neg_inf<T>();
      l[r] = -1;
    }
    max_plus(e_rows, rows, p, 0, blank, b, l);
    max_plus(e_rows, rows, p, blank + 1, nv, b, l);
    for (int r = 0; r < rows; ++r) {
      best[r * u1 + u] = b[r];
      label[r * u1 + u] = l[r] < 0 ? fallback : l[r];
    }
  }
}

}  // namespace cpu
}  // namespace jax_transducer
