// CPU schedule of the lattice recursions (the per-cell math is lib/lattice.h). Pointers address
// one example's row-major (T, U1) slab. Alpha and beta sweep anti-diagonals d = t + u: the cells
// of one diagonal are independent, so their log-adds vectorise instead of forming one long
// dependency chain. Each diagonal's values live in a scratch row indexed by u, in double: float
// roundings of values in the thousands, repeated over T + U diagonals, would cost the flows about
// three digits; the log-add's correction term still uses the fast float math.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../lattice.h"

namespace jax_transducer {
namespace cpu {

// The cells (d - u, u) of diagonal d inside a t_len x (u_len + 1) lattice: u in [lo, hi].
struct Diagonal {
  int64_t lo, hi;
  Diagonal(int64_t d, int64_t t_len, int64_t u_len)
      : lo(std::max<int64_t>(0, d - (t_len - 1))), hi(std::min<int64_t>(d, u_len)) {}
};

// Fills alpha (unused cells with -inf) and returns the cost, NaN for an invalid example.
template <typename T>
T forward_example(const T* blank, const T* emit, T* alpha, int64_t nt, int64_t u1, int32_t t_len,
                  int32_t u_len) {
  std::fill(alpha, alpha + nt * u1, neg_inf<T>());
  if (!lengths_valid(t_len, u_len, nt, u1)) return quiet_nan<T>();
  std::vector<double> rows(2 * u1);
  double* prev = rows.data();  // alpha on diagonal d - 1
  double* cur = prev + u1;
  cur[0] = 0.0;
  alpha[0] = T(0);
  for (int64_t d = 1; d < t_len + u_len; ++d) {
    std::swap(prev, cur);
    const Diagonal g(d, t_len, u_len);
    // Edge cells have one predecessor: u = 0 (from above) and t = 0 (from the left).
    const int64_t lo = g.lo == 0 ? 1 : g.lo;
    const int64_t hi = g.hi == d ? d - 1 : g.hi;
    if (g.lo == 0) cur[0] = prev[0] + blank[(d - 1) * u1];
    if (g.hi == d) cur[d] = prev[d - 1] + emit[d - 1];
    for (int64_t u = lo; u <= hi; ++u) {
      const int64_t c = (d - u) * u1 + u;
      cur[u] = alpha_cell<double, T>(prev[u] + blank[c - u1], prev[u - 1] + emit[c - 1]);
    }
    for (int64_t u = g.lo; u <= g.hi; ++u) alpha[(d - u) * u1 + u] = static_cast<T>(cur[u]);
  }
  const int64_t last = (t_len - 1) * u1 + u_len;
  return static_cast<T>(-(cur[u_len] + blank[last]));  // the last diagonal ends at (t_len-1, u_len)
}

// Writes the flows of every move (zero outside the lattice and for an invalid example), running
// beta backwards over diagonals.
template <typename T>
void backward_example(const T* blank, const T* emit, const T* alpha, T cost, T* flow_blank,
                      T* flow_emit, int64_t nt, int64_t u1, int32_t t_len, int32_t u_len) {
  std::fill(flow_blank, flow_blank + nt * u1, T(0));
  std::fill(flow_emit, flow_emit + nt * u1, T(0));
  if (!lengths_valid(t_len, u_len, nt, u1)) return;
  const double log_z = -static_cast<double>(cost);
  const int64_t t_last = t_len - 1;
  std::vector<double> rows(2 * u1);
  double* next = rows.data();  // beta on diagonal d + 1
  double* cur = next + u1;
  for (int64_t d = t_last + u_len; d >= 0; --d) {
    const Diagonal g(d, t_len, u_len);
    // Edge cells: the last row (only the final blank leaves it, at u = u_len) and the last
    // column (no label move).
    auto edge = [&](int64_t u) {
      const int64_t t = d - u, c = t * u1 + u;
      const bool last_row = t == t_last;
      const bool has_blank = !last_row || u == u_len;
      const double beta_below = last_row ? 0.0 : next[u];
      const double down = has_blank ? beta_below + blank[c] : neg_inf<double>();
      const double right = u < u_len ? next[u + 1] + emit[c] : neg_inf<double>();
      cur[u] = beta_cell<double, T>(down, right);
      if (has_blank)
        flow_blank[c] = move_flow<double, T>(alpha[c], blank[c], beta_below, log_z);
      if (u < u_len) flow_emit[c] = move_flow<double, T>(alpha[c], emit[c], next[u + 1], log_z);
    };
    const bool lo_edge = d - g.lo == t_last;
    const bool hi_edge = g.hi == u_len;
    if (lo_edge) edge(g.lo);
    if (hi_edge && !(lo_edge && g.lo == g.hi)) edge(g.hi);
    const int64_t lo = lo_edge ? g.lo + 1 : g.lo;
    const int64_t hi = hi_edge ? g.hi - 1 : g.hi;
    for (int64_t u = lo; u <= hi; ++u) {
      const int64_t c = (d - u) * u1 + u;
      cur[u] = beta_cell<double, T>(next[u] + blank[c], next[u + 1] + emit[c]);
    }
    for (int64_t u = lo; u <= hi; ++u) {
      const int64_t c = (d - u) * u1 + u;
      flow_blank[c] = move_flow<double, T>(alpha[c], blank[c], next[u], log_z);
      flow_emit[c] = move_flow<double, T>(alpha[c], emit[c], next[u + 1], log_z);
    }
    std::swap(cur, next);
  }
}

// Best path through the lattice whose label moves score `label`: writes decisions (1 = arrived by
// blank) and, per label position u, the frame of the path's label move from u to u + 1 into
// path[0..u1) (kNoFrame past u_len, and everywhere for an invalid example). By anti-diagonals, as
// alpha: the cells of one diagonal are independent, so their adds and compares vectorise instead
// of forming one dependency chain along each row.
template <typename T>
void viterbi_example(const T* blank, const T* label, uint8_t* decision, int32_t* path, int64_t nt,
                     int64_t u1, int32_t t_len, int32_t u_len) {
  std::fill(path, path + u1, kNoFrame);
  std::memset(decision, 0, static_cast<size_t>(nt * u1));
  if (!lengths_valid(t_len, u_len, nt, u1)) return;
  std::vector<T> rows(2 * u1);
  std::vector<uint8_t> by_blank(u1);  // diagonal d's decisions, by u
  T* prev = rows.data();  // path scores on diagonal d - 1
  T* cur = prev + u1;
  cur[0] = T(0);
  for (int64_t d = 1; d < t_len + u_len; ++d) {
    std::swap(prev, cur);
    const Diagonal g(d, t_len, u_len);
    // Edge cells have one predecessor: u = 0 (from above) and t = 0 (from the left).
    const int64_t lo = g.lo == 0 ? 1 : g.lo;
    const int64_t hi = g.hi == d ? d - 1 : g.hi;
    if (g.lo == 0) {
      cur[0] = prev[0] + blank[(d - 1) * u1];
      by_blank[0] = 1;
    }
    if (g.hi == d) {
      cur[d] = prev[d - 1] + label[d - 1];
      by_blank[d] = 0;
    }
    for (int64_t u = lo; u <= hi; ++u) {
      const int64_t c = (d - u) * u1 + u;
      const T top = prev[u] + blank[c - u1];
      const T left = prev[u - 1] + label[c - 1];
      const bool b = viterbi_takes_blank(top, left);
      cur[u] = b ? top : left;
      by_blank[u] = b;
    }
    for (int64_t u = g.lo; u <= g.hi; ++u) decision[(d - u) * u1 + u] = by_blank[u];
  }
  for (int64_t t = t_len - 1, u = u_len; u > 0;) {
    if (decision[t * u1 + u]) {
      --t;
    } else {
      --u;
      path[u] = static_cast<int32_t>(t);
    }
  }
}

}  // namespace cpu
}  // namespace jax_transducer
