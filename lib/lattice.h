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
#include <cstring>

#if defined(__CUDACC__)
#define JT_HD __host__ __device__ __forceinline__
#else
#define JT_HD inline
#endif

namespace jax_transducer {


template <typename T>
JT_HD T neg_inf() { return -static_cast<T>(INFINITY); }

template <typename T>
JT_HD T quiet_nan() { return static_cast<T>(NAN); }

#if !defined(__CUDA_ARCH__)
// Host float exp and log1p without libm calls, so that loops over independent cells vectorise
// (compiled with -fno-trapping-math, which lets the compiler turn the selects into blends).
// Relative error below 1e-6 (tests/test_kernels.py).

// exp(xc) = 2^k exp(r): k = round(xc / ln2) (returned in *k) and exp(r), |r| <= ln2/2, by a
// degree-7 Taylor polynomial. F is float or a GCC vector of floats (the CPU normaliser's rows).
template <typename F>
inline F exp_reduced(F xc, F* k) {
  *k = (xc * 1.44269504f + 12582912.0f) - 12582912.0f;
  const F r = (xc - *k * 0.693145751953125f) - *k * 1.428606765330187e-06f;
  F e = F{} + 1.0f / 5040.0f;
  e = e * r + 1.0f / 720.0f;
  e = e * r + 1.0f / 120.0f;
  e = e * r + 1.0f / 24.0f;
  e = e * r + 1.0f / 6.0f;
  e = e * r + 0.5f;
  e = e * r + 1.0f;
  return e * r + 1.0f;
}

// exp(x): exp_reduced of x clamped to [-87, 88], where 2^k stays a normal float; NaN stays NaN.
inline float host_exp(float x) {
  const float xc = x >= -87.0f ? (x <= 88.0f ? x : 88.0f) : -87.0f;  // NaN -> -87, fixed below
  float k;
  const float e = exp_reduced(xc, &k);
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;  // 2^k, k in [-126, 127]
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x != x ? x : e * scale;
}

// log(m) = 2 atanh((m-1)/(m+1)) for m in [sqrt(1/2), sqrt(2)]: |s| <= 0.172, so the series to
// s^9 is good to 1e-9.
inline float log_near_one(float m) {
  const float s = (m - 1.0f) / (m + 1.0f);
  const float s2 = s * s;
  float p = 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  return 2.0f * s * p;
}

// log1p(y) for y in [0, 1]: log_near_one of 1 + y (halved above sqrt(2)), with Goldberg's
// correction y / ((1+y) - 1) for the rounding of 1 + y.
inline float host_log1p(float y) {
  const float u = 1.0f + y;
  const bool big = u > 1.41421356f;
  const float log_u = (big ? 0.693147181f : 0.0f) + log_near_one(big ? 0.5f * u : u);
  const float d = u - 1.0f;
  const float ratio = y / (d == 0.0f ? 1.0f : d);  // computed unconditionally: no branch
  return d == 0.0f ? y : log_u * ratio;
}

// log(x) for positive normal floats: x = m 2^e with m in [sqrt(1/2), sqrt(2)), log_near_one(m)
// + e ln 2. 0 gives -inf, NaN and negatives NaN; subnormals are not handled (a finite, wrong
// value).
inline float host_log(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const int32_t mantissa_bits = (bits & 0x007fffff) | 0x3f800000;  // m in [1, 2)
  float m;
  std::memcpy(&m, &mantissa_bits, sizeof m);
  const bool big = m > 1.41421356f;
  const float e = static_cast<float>(((bits >> 23) & 0xff) - 127 + (big ? 1 : 0));
  const float r = e * 0.693145751953125f +
                  (log_near_one(big ? 0.5f * m : m) + e * 1.428606765330187e-06f);
  return x > 0.0f ? r : (x == 0.0f ? neg_inf<float>() : quiet_nan<float>());
}
#endif

JT_HD float jt_exp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return host_exp(x);
#endif
}
JT_HD double jt_exp(double x) { return exp(x); }

// log1p(exp(x)) for x <= 0.
JT_HD float log1p_exp(float x) {
#if defined(__CUDA_ARCH__)
  return log1pf(expf(x));
#else
  return host_log1p(host_exp(x));
#endif
}
JT_HD double log1p_exp(double x) { return log1p(exp(x)); }

// log(exp(a) + exp(b)), branch-free so that it vectorises. NaN in either operand gives NaN (so a
// bad value poisons only its own example), and -inf + -inf stays -inf. A is the type the values
// accumulate in, M the type of the correction term log1p(exp(-|a - b|)) <= log 2: the CPU float
// kernels accumulate in double (a long recursion of float roundings at magnitudes of thousands
// costs digits) while evaluating the correction with the fast float math.
template <typename A, typename M = A>
JT_HD A log_add(A a, A b) {
  const A hi = a > b ? a : b;
  const A lo = a > b ? b : a;
  const bool special = !(hi > neg_inf<A>()) | (a != a) | (b != b);
  const A sum = hi + static_cast<A>(log1p_exp(static_cast<M>(special ? A(0) : lo - hi)));
  return special ? a + b : sum;  // -inf, or NaN if either is NaN
}

// Whether an example's lengths describe a lattice inside the (T, U1) arrays. Kernels treat any
// other example as invalid: NaN cost, zero flows, an all-kNoFrame viterbi row; they never index with
// its lengths.
JT_HD bool lengths_valid(int32_t t_len, int32_t u_len, int64_t T, int64_t U1) {
  return t_len >= 1 && t_len <= T && u_len >= 0 && u_len < U1;
}

// alpha[t, u]: log-probability of reaching (t, u) from (0, 0).
// top = alpha[t-1, u] + blank[t-1, u] (or -inf at t = 0); left = alpha[t, u-1] + emit[t, u-1].
template <typename A, typename M = A>
JT_HD A alpha_cell(A top, A left) { return log_add<A, M>(top, left); }

// beta[t, u]: log-probability of finishing from (t, u), its last blank included.
// down = beta[t+1, u] + blank[t, u]; right = beta[t, u+1] + emit[t, u].
template <typename A, typename M = A>
JT_HD A beta_cell(A down, A right) { return log_add<A, M>(down, right); }

// Posterior share of the paths through one move: the derivative of -cost w.r.t. its
// log-probability. alpha_from is alpha at the move's start, beta_to beta at its end (0 for the
// final blank), log_z = log of the total probability (= -cost).
// The sum is formed in A, the exponential evaluated in M.
template <typename A, typename M = A>
JT_HD M move_flow(A alpha_from, A log_prob, A beta_to, A log_z) {
  return jt_exp(static_cast<M>(alpha_from + log_prob + beta_to - log_z));
}

// The frame reported by the viterbi kernels for label positions the best path never reaches
// (those >= the label length) and for every position of an invalid example.
constexpr int32_t kNoFrame = -1;

// Viterbi decision at (t, u): true when the best path arrives by the blank move from (t-1, u).
// Ties go to blank; a NaN on the emit side loses so the path stays well formed.
template <typename T>
JT_HD bool viterbi_takes_blank(T top, T left) { return !(left > top); }

// Row-major offset of (t, u) in example b's (T, U1) slab, in 64 bits: B*T*U1 can pass 2^31.
JT_HD int64_t cell_offset(int64_t b, int64_t t, int64_t u, int64_t T, int64_t U1) {
  return (b * T + t) * U1 + u;
}

}  // namespace jax_transducer
