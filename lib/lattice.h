// The RNN-T lattice math, written once for the CPU loops and the CUDA kernels.
//
// One example's lattice has nodes (t, u), 0 <= t < T_b, 0 <= u <= U_b. Its compact inputs are
// row-major (T, U1) arrays (U1 = U + 1 >= U_b + 1):
//   blank[t, u]  log-probability of the blank move (t, u) -> (t + 1, u)
//   emit[t, u]   log-probability of the label move (t, u) -> (t, u + 1), used for u < U_b
// The blank out of (T_b - 1, U_b) ends every path.
//
// No XLA or CUDA headers here: only small inline functions that both compilers accept.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define JT_HD __host__ __device__ __forceinline__
#else
#define JT_HD inline
#endif

namespace jax_transducer {

JT_HD float jt_exp(float x) { return expf(x); }
JT_HD double jt_exp(double x) { return exp(x); }
JT_HD float jt_log1p(float x) { return log1pf(x); }
JT_HD double jt_log1p(double x) { return log1p(x); }

template <typename T>
JT_HD T neg_inf() { return -static_cast<T>(INFINITY); }

template <typename T>
JT_HD T quiet_nan() { return static_cast<T>(NAN); }

// log(exp(a) + exp(b)). NaN in either operand gives NaN (so a bad value poisons only its own
// example), and -inf + -inf stays -inf without evaluating inf - inf.
template <typename T>
JT_HD T log_add(T a, T b) {
  const T hi = a > b ? a : b;
  const T lo = a > b ? b : a;
  if (hi == neg_inf<T>()) return a + b;  // -inf, or NaN if either is NaN
  return hi + jt_log1p(jt_exp(lo - hi));
}

// Whether an example's lengths describe a lattice inside the (T, U1) arrays. Kernels treat any
// other example as invalid: NaN cost, zero flows, an all-blank viterbi row; they never index with
// its lengths.
JT_HD bool lengths_valid(int32_t t_len, int32_t u_len, int64_t T, int64_t U1) {
  return t_len >= 1 && t_len <= T && u_len >= 0 && u_len < U1;
}

// alpha[t, u]: log-probability of reaching (t, u) from (0, 0).
// top = alpha[t-1, u] + blank[t-1, u] (or -inf at t = 0); left = alpha[t, u-1] + emit[t, u-1].
template <typename T>
JT_HD T alpha_cell(T top, T left) { return log_add(top, left); }

// beta[t, u]: log-probability of finishing from (t, u), its last blank included.
// down = beta[t+1, u] + blank[t, u]; right = beta[t, u+1] + emit[t, u].
template <typename T>
JT_HD T beta_cell(T down, T right) { return log_add(down, right); }

// Posterior share of the paths through one move: the derivative of -cost w.r.t. its
// log-probability. alpha_from is alpha at the move's start, beta_to beta at its end (0 for the
// final blank), log_z = log of the total probability (= -cost).
template <typename T>
JT_HD T move_flow(T alpha_from, T log_prob, T beta_to, T log_z) {
  return jt_exp(alpha_from + log_prob + beta_to - log_z);
}

// Viterbi decision at (t, u): true when the best path arrives by the blank move from (t-1, u).
// Ties go to blank; a NaN on the emit side loses so the path stays well formed.
template <typename T>
JT_HD bool viterbi_takes_blank(T top, T left) { return !(left > top); }

// Row-major offset of (t, u) in example b's (T, U1) slab, in 64 bits: B*T*U1 can pass 2^31.
JT_HD int64_t cell_offset(int64_t b, int64_t t, int64_t u, int64_t T, int64_t U1) {
  return (b * T + t) * U1 + u;
}

}  // namespace jax_transducer
