// CPU schedule of the lattice recursions: one example at a time, row by row (the per-cell math is
// lib/lattice.h). Pointers address one example's (T, U1) slab; rows are U1 apart.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../lattice.h"

namespace jax_transducer {
namespace cpu {

// Fills alpha (unused cells with -inf) and returns the cost, NaN for an invalid example.
template <typename T>
T forward_example(const T* blank, const T* emit, T* alpha, int64_t nt, int64_t u1, int32_t t_len,
                  int32_t u_len) {
  std::fill(alpha, alpha + nt * u1, neg_inf<T>());
  if (!lengths_valid(t_len, u_len, nt, u1)) return quiet_nan<T>();
  for (int64_t t = 0; t < t_len; ++t) {
    T* a = alpha + t * u1;
    const T* em = emit + t * u1;
    // The blank moves from row t-1 are independent of each other: a vectorisable pass.
    if (t == 0) {
      a[0] = T(0);
    } else {
      const T* a_prev = a - u1;
      const T* bl_prev = blank + (t - 1) * u1;
      for (int64_t u = 0; u <= u_len; ++u) a[u] = a_prev[u] + bl_prev[u];
    }
    // The label moves along the row are a scan.
    for (int64_t u = 1; u <= u_len; ++u) a[u] = alpha_cell(a[u], a[u - 1] + em[u - 1]);
  }
  const int64_t last = (t_len - 1) * u1 + u_len;
  return -(alpha[last] + blank[last]);
}

// Writes the flows of every move (zero outside the lattice and for an invalid example), running
// beta from the end with two rows of scratch (2 * u1 values).
template <typename T>
void backward_example(const T* blank, const T* emit, const T* alpha, T cost, T* flow_blank,
                      T* flow_emit, int64_t nt, int64_t u1, int32_t t_len, int32_t u_len,
                      T* scratch) {
  std::fill(flow_blank, flow_blank + nt * u1, T(0));
  std::fill(flow_emit, flow_emit + nt * u1, T(0));
  if (!lengths_valid(t_len, u_len, nt, u1)) return;
  const T log_z = -cost;
  T* next = scratch;  // beta of row t + 1
  T* cur = scratch + u1;
  for (int64_t t = t_len - 1; t >= 0; --t) {
    const bool last_row = t == t_len - 1;
    const int64_t row = t * u1;
    for (int64_t u = u_len; u >= 0; --u) {
      const int64_t c = row + u;
      // Only the final blank leaves the last row; its beta_to is 0.
      const bool has_blank = !last_row || u == u_len;
      const T beta_below = last_row ? T(0) : next[u];
      const T down = has_blank ? beta_below + blank[c] : neg_inf<T>();
      const T right = u < u_len ? cur[u + 1] + emit[c] : neg_inf<T>();
      cur[u] = beta_cell(down, right);
      if (has_blank) flow_blank[c] = move_flow(alpha[c], blank[c], beta_below, log_z);
      if (u < u_len) flow_emit[c] = move_flow(alpha[c], emit[c], cur[u + 1], log_z);
    }
    std::swap(cur, next);
  }
}

// Best path with labels forced to the per-cell best: writes decisions (1 = arrived by blank) and
// the emitted labels into path[0..u1) (blank_id past u_len, and everywhere for an invalid example).
template <typename T>
void viterbi_example(const T* blank, const T* best, const int32_t* best_label, uint8_t* decision,
                     int32_t* path, int64_t nt, int64_t u1, int32_t t_len, int32_t u_len,
                     int32_t blank_id, T* scratch) {
  std::fill(path, path + u1, blank_id);
  std::memset(decision, 0, static_cast<size_t>(nt * u1));
  if (!lengths_valid(t_len, u_len, nt, u1)) return;
  T* prev = scratch;
  T* cur = scratch + u1;
  for (int64_t t = 0; t < t_len; ++t) {
    const int64_t row = t * u1;
    for (int64_t u = 0; u <= u_len; ++u) {
      if (t == 0 && u == 0) {
        cur[0] = T(0);
        continue;
      }
      const T top = t > 0 ? prev[u] + blank[row - u1 + u] : neg_inf<T>();
      const T left = u > 0 ? cur[u - 1] + best[row + u - 1] : neg_inf<T>();
      const bool by_blank = t > 0 && (u == 0 || viterbi_takes_blank(top, left));
      cur[u] = by_blank ? top : left;
      decision[row + u] = by_blank;
    }
    std::swap(prev, cur);
  }
  for (int64_t t = t_len - 1, u = u_len; u > 0;) {
    if (decision[t * u1 + u]) {
      --t;
    } else {
      --u;
      path[u] = best_label[t * u1 + u];
    }
  }
}

}  // namespace cpu
}  // namespace jax_transducer
