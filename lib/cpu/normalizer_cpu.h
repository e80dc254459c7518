// The additive joiner's normaliser matmuls on the CPU, fused with their exponentials (float32).
//
// For one example, with a[t, v] = exp(E[t, v] - mE[t]) and p[u, v] = exp(P[u, v] - mP[u]):
//   forward:   S[t, u] = sum_v a[t, v] p[u, v], finished block by block into log_norm =
//              mE + mP + log S and the move log-probabilities (finished_moves_rows; viterbi's
//              best label score M[t, u] = max_{v != blank} E[t, v] + P[u, v] from BestLabels);
//              only the lattice's used cells are computed
//   backward:  dE[t, v] = a[t, v] * sum_u W[t, u] p[u, v]       + g_blank[t, :] summed at blank
//                                                              + g_emit[t, u] at v = label[u]
//              dP[u, v] = p[u, v] * sum_t W[t, u] a[t, v]       + the same sums over t
// XLA would store a (B, T, V) array of exponentials and make separate passes over it for the
// max, the exp, the masks, the products and the column scatters; here each row of E is read
// once per pass, its exponentials live in a small tile that stays in L1, and the only (B, T, V)
// array written is dE itself. Register tiles use GCC vector extensions (8 floats: one AVX
// register in the x86-64-v3 clone, two SSE registers in the baseline one).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "../lattice.h"

namespace jax_transducer {
namespace cpu {

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
constexpr int64_t kLanes = 8;

inline int64_t padded(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }
inline v8f load8(const float* p) {
  v8f r;
  std::memcpy(&r, p, sizeof r);
  return r;
}
inline void store8(float* p, v8f x) { std::memcpy(p, &x, sizeof x); }
// A broadcast. This spelling becomes one vbroadcastss from memory in the target_clones build;
// v8f{} + x is a real add (0 + -0 is +0) and a shuffle, v8f{x, x, ...} lane inserts: with either,
// the broadcasts in the backward's GEMM-like loops took the FMAs' ports (that kernel took 14.1-14.5
// instead of 11.9-12.2 ms on a 2000 x 101 x 1000 example).
inline v8f splat8(float x) {
  const v8f r = {x};
  return __builtin_shufflevector(r, r, 0, 0, 0, 0, 0, 0, 0, 0);
}
inline float sum8(v8f x) {
  return ((x[0] + x[4]) + (x[1] + x[5])) + ((x[2] + x[6]) + (x[3] + x[7]));
}
inline v8f max8(v8f a, v8f b) { return a > b ? a : b; }
inline float max8_reduce(v8f x) {  // halves, quarters, pairs: three shuffles and maxima
  x = max8(x, __builtin_shufflevector(x, x, 4, 5, 6, 7, 0, 1, 2, 3));
  x = max8(x, __builtin_shufflevector(x, x, 2, 3, 0, 1, 6, 7, 4, 5));
  x = max8(x, __builtin_shufflevector(x, x, 1, 0, 3, 2, 5, 4, 7, 6));
  return x[0];
}

// exp(x) for the normaliser: 0 where the true value is below the smallest normal float (the
// lattice's host_exp clamps there instead, which is harmless for log-adds but not for sums of
// products). NaN stays NaN.
inline float norm_exp(float x) { return x < -87.3f ? 0.0f : host_exp(x); }

// norm_exp of eight lanes, the same arithmetic as host_exp written on vectors: the compiler's
// own vectorisation of the scalar clamps made 47 instructions of selects and constant reloads,
// against about 30 here (the row exponentials were a fifth of the forward normaliser's time).
inline v8f norm_exp8(v8f x) {
  const v8f lo = splat8(-87.0f), hi = splat8(88.0f);
  v8f xc = x > lo ? x : lo;  // NaN -> -87, fixed below
  xc = xc < hi ? xc : hi;
  v8f k;
  const v8f e = exp_reduced(xc, &k);
  const v8i bits = (__builtin_convertvector(k, v8i) + 127) << 23;  // 2^k, k in [-126, 127]
  v8f scale;
  std::memcpy(&scale, &bits, sizeof scale);
  const v8f y = e * scale;
  return x != x ? x : (x < -87.3f ? v8f{} : y);
}

// out[v] = norm_exp(x[v] - m) for v < nv.
inline void exp_shifted(const float* x, int64_t nv, float m, float* out) {
  int64_t v = 0;
  for (; v + kLanes <= nv; v += kLanes) store8(out + v, norm_exp8(load8(x + v) - m));
  for (; v < nv; ++v) out[v] = norm_exp(x[v] - m);
}

// max over x[0, nv), NaN if any is NaN. Four vectors at a time, in independent maxima.
inline float row_max(const float* x, int64_t nv) {
  auto take = [](v8f acc, v8f xv) { return (xv > acc) | (xv != xv) ? xv : acc; };
  float m = x[0];
  int64_t v = 0;
  if (nv >= 4 * kLanes) {
    v8f acc[4];
    for (int q = 0; q < 4; ++q) acc[q] = load8(x + q * kLanes);
    for (v = 4 * kLanes; v + 4 * kLanes <= nv; v += 4 * kLanes)
      for (int q = 0; q < 4; ++q) acc[q] = take(acc[q], load8(x + v + q * kLanes));
    const v8f all = take(take(acc[0], acc[1]), take(acc[2], acc[3]));
    for (int i = 0; i < kLanes; ++i) m = (all[i] > m || all[i] != all[i]) ? all[i] : m;
  }
  for (; v < nv; ++v) m = (x[v] > m || x[v] != x[v]) ? x[v] : m;
  return m;
}

// out[0, nv) = exp(x - max x), zeros up to nv_pad; returns max x (NaN rows give NaN).
inline float exp_row(const float* x, int64_t nv, float* out, int64_t nv_pad) {
  const float m = row_max(x, nv);
  exp_shifted(x, nv, m, out);
  std::fill(out + nv, out + nv_pad, 0.0f);
  return m;
}

// One example's prediction side: padded exponentials p (u1 x nv_pad; rows u >= p_len are zero)
// and row maxima (0 for rows u >= p_len).
struct PredictionRows {
  std::vector<float> exp;
  int64_t nv_pad;
  PredictionRows(const float* P, float* max_p, int64_t u1, int64_t nv, int32_t p_len)
      : exp(static_cast<size_t>(u1 * padded(nv)), 0.0f), nv_pad(padded(nv)) {
    for (int64_t u = 0; u < u1; ++u) {
      if (u < p_len) {
        const float m = exp_row(P + u * nv, nv, &exp[u * nv_pad], nv_pad);
        if (max_p) max_p[u] = m;
      } else if (max_p) {
        max_p[u] = 0.0f;
      }
    }
  }
  const float* row(int64_t u) const { return &exp[u * nv_pad]; }
};

// S (and, kBest, M' = max_{v != blank} a[t, v] p[u, v]) for rows a[0..MT) against prediction
// rows [u0, u0 + MU) (clamped to u_end - 1), over nv_pad lanes. With kBest the blank column of `a`
// has been zeroed (so that M' skips it) and is added back by the caller.
template <int MT, int MU, bool kBest>
inline void sums_tile(const float* const* a, const PredictionRows& p, int64_t u0, int64_t u_end,
                      float (&s)[MT][MU], float (&m)[MT][MU]) {
  const float* b[MU];
  for (int j = 0; j < MU; ++j) b[j] = p.row(std::min<int64_t>(u0 + j, u_end - 1));
  v8f acc[MT][MU] = {};
  v8f best[MT][kBest ? MU : 1] = {};
  for (int64_t v = 0; v < p.nv_pad; v += kLanes) {
    v8f av[MT];
    for (int i = 0; i < MT; ++i) av[i] = load8(a[i] + v);
    for (int j = 0; j < MU; ++j) {
      const v8f bv = load8(b[j] + v);
      for (int i = 0; i < MT; ++i) {
        if constexpr (kBest) {
          const v8f prod = av[i] * bv;
          acc[i][j] += prod;
          best[i][j] = max8(best[i][j], prod);
        } else {
          acc[i][j] += av[i] * bv;
        }
      }
    }
  }
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < MU; ++j) {
      s[i][j] = sum8(acc[i][j]);
      if constexpr (kBest) m[i][j] = max8_reduce(best[i][j]);
    }
}

// Reads the next rows of E into the cache while the current ones are multiplied, a slice per
// step: streaming E from memory was a tenth of the forward normaliser's time.
struct Prefetch {
  const char* base;
  int64_t bytes, per_step;
  Prefetch(const float* x, int64_t n, int64_t steps)
      : base(reinterpret_cast<const char*>(x)), bytes(n * 4),
        per_step((bytes + 64 * steps - 1) / (64 * steps) * 64) {}
  void step(int64_t k) const {
    for (int64_t b = k * per_step; b < std::min(bytes, (k + 1) * per_step); b += 64)
      __builtin_prefetch(base + b);
  }
};

// Forward for frames [t0, t1) of one example: S rows, mE and (kBest) M' rows (sums_tile), each
// pointer at frame t0's row. Only the used cells (t < e_len, u < p_len) are computed; the others
// get 0, as does mE past e_len. on_row(row) sees each used row of E, in order, while it is in L1.
struct NoRowHook {
  void operator()(const float*) const {}
};
template <bool kBest, typename OnRow = NoRowHook>
void normalizer_forward_rows(const float* E, const PredictionRows& p, int64_t u1, int64_t nv,
                             int32_t e_len, int32_t p_len, int32_t blank, int64_t t0, int64_t t1,
                             float* sums, float* max_e, float* best, const OnRow& on_row = {}) {
  constexpr int MT = kBest ? 2 : 3, MU = kBest ? 3 : 4;
  const int64_t used = std::min<int64_t>(t1, std::max<int64_t>(t0, e_len)) - t0;  // frames
  std::fill(max_e + used, max_e + (t1 - t0), 0.0f);
  for (float* out : {sums, best}) {
    if (!out) continue;
    std::fill(out + used * u1, out + (t1 - t0) * u1, 0.0f);
    for (int64_t r = 0; r < used; ++r) std::fill(out + r * u1 + p_len, out + (r + 1) * u1, 0.0f);
  }
  if (p_len <= 0) {  // no columns: mE still describes the used frames
    for (int64_t r = 0; r < used; ++r) max_e[r] = row_max(E + (t0 + r) * nv, nv);
    return;
  }
  std::vector<float> tile(static_cast<size_t>(MT * p.nv_pad));
  for (int64_t r0 = 0; r0 < used; r0 += MT) {
    const int rows = static_cast<int>(std::min<int64_t>(MT, used - r0));
    const float* a[MT];
    float a_blank[MT] = {};
    for (int i = 0; i < MT; ++i) {
      float* row = &tile[std::min(i, rows - 1) * p.nv_pad];
      a[i] = row;
      if (i >= rows) continue;
      max_e[r0 + i] = exp_row(E + (t0 + r0 + i) * nv, nv, row, p.nv_pad);
      on_row(E + (t0 + r0 + i) * nv);
      if constexpr (kBest) std::swap(a_blank[i], row[blank]);
    }
    // The next rows, past t1 too (the caller's next block), within the example's used rows.
    const int64_t next = std::min<int64_t>(e_len - t0, r0 + 2 * MT) - (r0 + MT);
    const Prefetch ahead(next > 0 ? E + (t0 + r0 + MT) * nv : E, std::max<int64_t>(next, 0) * nv,
                         p_len / MU + 1);
    for (int64_t u = 0; u < p_len; u += MU) {
      ahead.step(u / MU);
      float s[MT][MU], m[MT][MU];
      sums_tile<MT, MU, kBest>(a, p, u, p_len, s, m);
      for (int i = 0; i < rows; ++i)
        for (int j = 0; j < MU && u + j < p_len; ++j) {
          const int64_t c = (r0 + i) * u1 + u + j;
          sums[c] = s[i][j];
          if constexpr (kBest) {
            sums[c] += a_blank[i] * p.row(u + j)[blank];
            best[c] = m[i][j];
          }
        }
    }
  }
}

// ---- Viterbi's best label, M[t, u] = max_{v != blank} (E[t, v] + P[u, v]), without a dense max ----
//
// A dense max over V costs a multiply and a max per product on top of the sums' FMA: 1.6-1.8x the
// sums-only pass. Instead each row of E and of P keeps as candidates the non-blank labels scoring
// at least a threshold tau (the row's mean plus z deviations, z chosen for about sqrt(V) candidates
// on Gaussian-like rows). A label that is a candidate of neither row t nor row u scores below
// tau_e[t] + tau_p[u] (float addition is monotone, so also after rounding): where the best
// candidate reaches that bound it is M. The other cells (0.2-0.5% on Gaussian scores, more on
// adversarial ones) take the dense max. Thresholds only steer the speed, never the result.

// The z for rows of nv labels (blank included): a Gaussian row's tail beyond z holds about
// 1.2 sqrt(nv) of them (Abramowitz-Stegun 26.2.23, within 5e-4).
inline float candidate_z(int64_t nv) {
  const double n = static_cast<double>(std::max<int64_t>(nv - 1, 1));
  const double q = std::min(0.5, std::max(8.0, 1.2 * std::sqrt(n)) / n);
  const double t = std::sqrt(-2.0 * std::log(q));
  return static_cast<float>(t - (2.515517 + 0.802853 * t + 0.010328 * t * t) /
                                    (1.0 + 1.432788 * t + 0.189269 * t * t + 0.001308 * t * t * t));
}

// mean + z * deviation of the row's finite scores (the blank excluded), from every fourth vector
// of a long row (tau only steers the speed); -inf where that is not a finite number (all labels
// become candidates).
inline float candidate_threshold(const float* x, int64_t nv, int32_t blank, float z) {
  const float c = std::isfinite(x[0]) ? x[0] : 0.0f;  // shift: the variance loses no digits
  const int64_t vec_end = nv / kLanes * kLanes;
  const int64_t step = nv >= 32 * kLanes ? 4 * kLanes : kLanes;
  v8f sum = {}, sq = {};
  v8i n = {};
  for (int64_t v = 0; v < vec_end; v += step) {
    const v8f d = load8(x + v) - c;
    const v8i finite = (d - d) == 0;  // inf - inf and NaN are NaN
    const v8f f = finite ? d : v8f{};
    sum += f;
    sq += f * f;
    n -= finite;
  }
  double s = sum8(sum), s2 = sum8(sq);
  int64_t count = 0;
  for (int i = 0; i < kLanes; ++i) count += n[i];
  const bool blank_sampled = blank >= vec_end || blank % step < kLanes;
  for (int64_t v = vec_end; v <= nv; ++v) {  // the tail, then (v == nv) the blank taken out
    if (v == nv && !blank_sampled) break;
    const float d = v < nv ? x[v] - c : x[blank] - c;
    if (!std::isfinite(d)) continue;
    const int sign = v < nv ? 1 : -1;
    s += sign * d;
    s2 += sign * double(d) * d;
    count += sign;
  }
  if (count < 1) return -INFINITY;
  const double mean = s / count, var = std::max(0.0, s2 / count - mean * mean);
  const float tau = static_cast<float>(c + mean + z * std::sqrt(var));
  return std::isfinite(tau) ? tau : -INFINITY;
}

inline bool any8(v8i x) {  // some lane nonzero
  x |= __builtin_shufflevector(x, x, 4, 5, 6, 7, 0, 1, 2, 3);
  x |= __builtin_shufflevector(x, x, 2, 3, 0, 1, 6, 7, 4, 5);
  x |= __builtin_shufflevector(x, x, 1, 0, 3, 2, 5, 4, 7, 6);
  return x[0] != 0;
}

// Lane permutations that pack the lanes set in an 8-bit mask to the front, for every mask.
struct PackLanes {
  v8i perm[256];
  PackLanes() {
    for (int bits = 0; bits < 256; ++bits) {
      int n = 0;
      perm[bits] = v8i{};
      for (int lane = 0; lane < kLanes; ++lane)
        if (bits >> lane & 1) perm[bits][n++] = lane;
    }
  }
};
inline const PackLanes pack_lanes;

// Candidate labels of score rows, row after row (their scores are read from the rows themselves).
struct Candidates {
  std::vector<float> tau;                // per row
  std::vector<int32_t> start{0}, index;  // row r's candidates: [start[r], start[r + 1])

  void clear() {
    tau.clear();
    start.assign(1, 0);
  }
  void add_row(const float* x, int64_t nv, int32_t blank, float z) {
    float t = candidate_threshold(x, nv, blank, z);
    const int64_t first = start.back();
    if (static_cast<int64_t>(index.size()) < first + nv + kLanes)  // room for a whole row
      index.resize(2 * (first + nv + kLanes));
    // Branch-free: every vector stores its candidate lanes' indices packed at the end of the
    // list; one reduction finds the candidate lanes of four vectors.
    const v8u bit = {1, 2, 4, 8, 16, 32, 64, 128};
    int32_t* idx = index.data();
    int64_t n = first;
    int64_t v = 0;
    for (; v + 4 * kLanes <= nv; v += 4 * kLanes) {
      v8u hit = {};
      for (int q = 0; q < 4; ++q)
        hit |= reinterpret_cast<v8u>(load8(x + v + q * kLanes) >= t) & (bit << (8 * q));
      hit |= __builtin_shufflevector(hit, hit, 4, 5, 6, 7, 0, 1, 2, 3);
      hit |= __builtin_shufflevector(hit, hit, 2, 3, 0, 1, 6, 7, 4, 5);
      hit |= __builtin_shufflevector(hit, hit, 1, 0, 3, 2, 5, 4, 7, 6);
      uint32_t bits = hit[0];
      if (blank >= v && blank < v + 4 * kLanes) bits &= ~(1u << (blank - v));
      for (int q = 0; q < 4; ++q) {
        const uint32_t b = bits >> (8 * q) & 255;
        const v8i iv = pack_lanes.perm[b] + static_cast<int32_t>(v + q * kLanes);
        std::memcpy(idx + n, &iv, sizeof iv);
        n += __builtin_popcount(b);
      }
    }
    for (; v < nv; ++v) {
      idx[n] = static_cast<int32_t>(v);
      n += x[v] >= t && v != blank;
    }
    // A row far from Gaussian can have many labels above tau: keep the 4 sqrt(V) best or so
    // (ties may keep more).
    const int64_t cap = static_cast<int64_t>(4.0 * std::sqrt(static_cast<double>(nv))) + 8;
    if (n - first > cap) {
      std::vector<float> top(n - first);
      for (int64_t k = first; k < n; ++k) top[k - first] = x[idx[k]];
      std::nth_element(top.begin(), top.begin() + (cap - 1), top.end(), std::greater<float>());
      t = top[cap - 1];
      int64_t kept = first;
      for (int64_t k = first; k < n; ++k)
        if (x[idx[k]] >= t) idx[kept++] = idx[k];
      n = kept;
    }
    tau.push_back(t);
    start.push_back(static_cast<int32_t>(n));
  }
  // The candidates' scores, contiguous, for rows x, x + ld, ... (one spare entry: out->data() + k
  // is a valid pointer for every k <= start.back(), even with no candidates at all).
  void gather(const float* x, int64_t ld, std::vector<float>* out) const {
    out->resize(start.back() + 1);
    for (size_t r = 0; r + 1 < start.size(); ++r)
      for (int32_t k = start[r]; k < start[r + 1]; ++k) (*out)[k] = x[r * ld + index[k]];
  }
};

// dst[v * ld + i] = rows[i][v] for i < 8, v < nv: an 8 x 8 block at a time through registers.
inline void transpose8(const float* const* rows, int64_t nv, float* dst, int64_t ld) {
  const int64_t vec_end = nv / kLanes * kLanes;
  for (int64_t v = 0; v < vec_end; v += kLanes) {
    v8f r[8], t[8], q[8];
    for (int i = 0; i < 8; ++i) r[i] = load8(rows[i] + v);
    for (int i = 0; i < 8; i += 2) {
      t[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
      t[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
    }
    for (int i = 0; i < 8; i += 4)
      for (int h = 0; h < 2; ++h) {
        q[i + 2 * h] = __builtin_shufflevector(t[i + h], t[i + h + 2], 0, 1, 8, 9, 4, 5, 12, 13);
        q[i + 2 * h + 1] =
            __builtin_shufflevector(t[i + h], t[i + h + 2], 2, 3, 10, 11, 6, 7, 14, 15);
      }
    for (int j = 0; j < 4; ++j) {  // q[j] and q[j + 4] hold column j and j + 4 of both halves
      store8(dst + (v + j) * ld, __builtin_shufflevector(q[j], q[j + 4], 0, 1, 2, 3, 8, 9, 10, 11));
      store8(dst + (v + j + 4) * ld,
             __builtin_shufflevector(q[j], q[j + 4], 4, 5, 6, 7, 12, 13, 14, 15));
    }
  }
  for (int64_t v = vec_end; v < nv; ++v)
    for (int i = 0; i < 8; ++i) dst[v * ld + i] = rows[i][v];
}

// out[0, 8 NU) = max over the k < count candidates of val[k] + cols[idx[k] * ld + (0, 8 NU)].
// Short rows (NU < 4) take two candidates per step, so that they still have independent maxima.
template <int NU>
inline void candidates_max(const int32_t* idx, const float* val, int32_t count, const float* cols,
                           int64_t ld, float* out) {
  constexpr int H = NU < 4 ? 2 : 1;
  v8f acc[H][NU];
  for (int h = 0; h < H; ++h)
    for (int j = 0; j < NU; ++j) acc[h][j] = splat8(-INFINITY);
  int32_t k = 0;
  for (; k + H <= count; k += H)
    for (int h = 0; h < H; ++h) {
      const v8f xv = splat8(val[k + h]);
      const float* r = cols + idx[k + h] * ld;
      for (int j = 0; j < NU; ++j) acc[h][j] = max8(acc[h][j], xv + load8(r + j * kLanes));
    }
  if (k < count) {
    const v8f xv = splat8(val[k]);
    const float* r = cols + idx[k] * ld;
    for (int j = 0; j < NU; ++j) acc[0][j] = max8(acc[0][j], xv + load8(r + j * kLanes));
  }
  for (int j = 0; j < NU; ++j) {
    for (int h = 1; h < H; ++h) acc[0][j] = max8(acc[0][j], acc[h][j]);
    store8(out + j * kLanes, acc[0][j]);
  }
}

// max_{v != blank} (e[v] + p[v]): the cells the candidates do not settle.
inline float dense_best(const float* e, const float* p, int64_t nv, int32_t blank) {
  float best = -INFINITY;
  for (auto [lo, hi] : {std::pair<int64_t, int64_t>{0, blank}, {blank + 1, nv}}) {
    v8f acc = splat8(-INFINITY);
    int64_t v = lo;
    for (; v + kLanes <= hi; v += kLanes) acc = max8(acc, load8(e + v) + load8(p + v));
    best = std::max(best, max8_reduce(acc));
    for (; v < hi; ++v) best = std::max(best, e[v] + p[v]);
  }
  return best;
}

// The first v with e[v] + p[v] (-inf at the blank) equal to its maximum, or the first NaN if
// any: jnp.argmax's choice, which the XLA path makes. Two vector passes: the maximum and whether
// a NaN occurs, then the first lane that matches (viterbi's U cells per example; three scalar
// passes took as long as its lattice kernel at V = 500-1000).
inline int32_t first_best_label(const float* e, const float* p, int64_t nv, int32_t blank) {
  const v8i lane = {0, 1, 2, 3, 4, 5, 6, 7};
  const int64_t vec_end = nv / kLanes * kLanes;
  auto scores = [&](int64_t v) {  // lanes v..v+7
    const v8f s = load8(e + v) + load8(p + v);
    return lane + static_cast<int32_t>(v) == blank ? splat8(-INFINITY) : s;
  };
  auto score = [&](int64_t v) { return v == blank ? -INFINITY : e[v] + p[v]; };
  v8f top8 = splat8(-INFINITY);
  v8i nan8 = {};
  for (int64_t v = 0; v < vec_end; v += kLanes) {
    const v8f s = scores(v);
    nan8 |= s != s;
    top8 = max8(top8, s);  // a NaN lane may stay NaN or not: only a nan-free maximum is used
  }
  bool nan = any8(nan8);
  float top = max8_reduce(top8);
  for (int64_t v = vec_end; v < nv; ++v) {
    const float s = score(v);
    nan |= s != s;
    top = std::max(top, s);
  }
  for (int64_t v = 0; v < vec_end; v += kLanes) {
    const v8f s = scores(v);
    const v8i hit = nan ? s != s : s == top;
    if (any8(hit))
      for (int j = 0; j < kLanes; ++j)
        if (hit[j]) return static_cast<int32_t>(v + j);
  }
  for (int64_t v = vec_end; v < nv; ++v) {
    const float s = score(v);
    if (nan ? s != s : s == top) return static_cast<int32_t>(v);
  }
  return blank;  // not reached: some v scores the maximum
}

// M for one work item: the prediction side (rows u < p_len transposed, their candidates) is
// prepared once; block() serves up to kFrames frames at a time.
class BestLabels {
 public:
  // A multiple of 8 (the transposes) and of the sums tiles' 2 and 3 rows (16 left a one-row
  // tile per block: the forward kernel ran 4-5% slower).
  static constexpr int64_t kFrames = 24;
  // Below it the dense max in the sums pass is as cheap (measured, 2026-12-01: equal at V = 100,
  // the candidates 5-20% faster from V = 127 to 500).
  static constexpr int64_t kCandidatesFromV = 128;

  BestLabels(const float* P, int64_t nv, int32_t p_len, int32_t blank)
      : P_(P), nv_(nv), ld_(padded(p_len)), p_len_(p_len), blank_(blank), z_(candidate_z(nv)),
        pt_(static_cast<size_t>(nv * ld_)), et_(static_cast<size_t>(nv * kFrames)),
        a_(static_cast<size_t>(kFrames * ld_)), b_(static_cast<size_t>(p_len * kFrames)),
        bt_(a_.size()), tau_p_(static_cast<size_t>(ld_), -INFINITY),
        none_(static_cast<size_t>(std::max(nv, kFrames)), -INFINITY) {
    for (int32_t u = 0; u < p_len; ++u) pc_.add_row(P + u * nv, nv, blank, z_);
    pc_.gather(P, nv, &pv_);
    std::copy(pc_.tau.begin(), pc_.tau.end(), tau_p_.begin());
    for (int64_t u0 = 0; u0 < ld_; u0 += kLanes)
      transpose8(rows(P, u0, p_len, nv), nv, &pt_[u0], ld_);
  }

  // A block's frames, in order, first given to add_frame (from the sums pass, while each row is
  // in L1), then to block().
  void begin_block() { ec_.clear(); }
  void add_frame(const float* e_row) { ec_.add_row(e_row, nv_, blank_, z_); }

  // m[i * u1 + u] = M[t0 + i, u] for the n <= kFrames frames from t0 given to add_frame and
  // u < p_len; m has room for (n - 1) * u1 + padded(p_len) floats (lanes past p_len are
  // overwritten or unused).
  void block(const float* E, int64_t t0, int64_t n, int64_t u1, float* m) {
    const float* e = E + t0 * nv_;
    ec_.gather(e, nv_, &ev_);
    for (int64_t i0 = 0; i0 < kFrames; i0 += kLanes)
      transpose8(rows(e, i0, n, nv_), nv_, &et_[i0], kFrames);
    for (int64_t i = 0; i < n; ++i) {  // E's candidates against every column, 64 at a time
      const int32_t k0 = ec_.start[i], count = ec_.start[i + 1] - k0;
      for (int64_t c = 0; c < ld_; c += 8 * kLanes)
        chunk_max(static_cast<int>(std::min<int64_t>(8, (ld_ - c) / kLanes)),
                  ec_.index.data() + k0, ev_.data() + k0, count, &pt_[c], ld_, &a_[i * ld_ + c]);
    }
    for (int32_t u = 0; u < p_len_; ++u) {  // P's candidates against every frame
      const int32_t k0 = pc_.start[u];
      candidates_max<kFrames / kLanes>(pc_.index.data() + k0, pv_.data() + k0,
                                       pc_.start[u + 1] - k0, et_.data(), kFrames,
                                       &b_[u * kFrames]);
    }
    for (int64_t u0 = 0; u0 < ld_; u0 += kLanes)  // b_ to frame-major, like a_
      transpose8(rows(b_.data(), u0, p_len_, kFrames), kFrames, &bt_[u0], ld_);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t u = 0; u < ld_; u += kLanes) {
        const v8f best = max8(load8(&a_[i * ld_ + u]), load8(&bt_[i * ld_ + u]));
        store8(m + i * u1 + u, best);  // m has room for the lanes past p_len
        const v8i open = ~(best >= ec_.tau[i] + load8(&tau_p_[u])) &
                         (lane_ + static_cast<int32_t>(u) < p_len_);
        if (any8(open))  // rare: the candidates did not settle some cell
          for (int j = 0; j < kLanes; ++j)
            if (open[j])
              m[i * u1 + u + j] = dense_best(e + i * nv_, P_ + (u + j) * nv_, nv_, blank_);
      }
  }

 private:
  const float* P_;
  int64_t nv_, ld_;
  int32_t p_len_, blank_;
  float z_;
  std::vector<float> pt_, et_, a_, b_, bt_, tau_p_, none_;  // none_: -inf for absent rows
  std::vector<float> pv_, ev_;  // the candidates' scores
  Candidates pc_, ec_;
  const float* row_ptr_[8];
  static constexpr v8i lane_ = {0, 1, 2, 3, 4, 5, 6, 7};

  // Rows r0 + (0..8) of x (row length ld), absent ones (from n on) read as -inf.
  const float* const* rows(const float* x, int64_t r0, int64_t n, int64_t ld) {
    for (int i = 0; i < 8; ++i) row_ptr_[i] = r0 + i < n ? x + (r0 + i) * ld : none_.data();
    return row_ptr_;
  }
  static void chunk_max(int nvec, const int32_t* idx, const float* val, int32_t count,
                        const float* cols, int64_t ld, float* out) {
    switch (nvec) {
      case 1: return candidates_max<1>(idx, val, count, cols, ld, out);
      case 2: return candidates_max<2>(idx, val, count, cols, ld, out);
      case 3: return candidates_max<3>(idx, val, count, cols, ld, out);
      case 4: return candidates_max<4>(idx, val, count, cols, ld, out);
      case 5: return candidates_max<5>(idx, val, count, cols, ld, out);
      case 6: return candidates_max<6>(idx, val, count, cols, ld, out);
      case 7: return candidates_max<7>(idx, val, count, cols, ld, out);
      default: return candidates_max<8>(idx, val, count, cols, ld, out);
    }
  }
};

// Where the finished move log-probabilities of frames [t0, t1) go, each pointer at frame t0's
// row; cells outside the used ones get 0. The last three are optional (null): what the gradient
// needs.
struct MoveRows {
  float* blank_lp;  // E[t, blank] + P[u, blank] - log_norm[t, u]
  float* label_lp;  // the label move's, likewise: labels[u]'s, or the best non-blank label's
  float* log_norm;  // mE[t] + mP[u] + log S[t, u]
  float* sums;      // S
  float* max_e;     // mE
};

// The label and the blank move's scores of one example's cells, from the prediction side.
struct LabelColumns {
  std::vector<int32_t> label;  // labels[u], the blank where out of [0, V) (never read past V)
  std::vector<float> p_blank, p_label;
  LabelColumns(const float* P, const int32_t* labels, int64_t u1, int64_t nv, int32_t p_len,
               int32_t blank)
      : label(u1, blank), p_blank(u1, 0.0f), p_label(u1, 0.0f) {
    for (int64_t u = 0; u < p_len; ++u) {
      if (labels) label[u] = labels[u] >= 0 && labels[u] < nv ? labels[u] : blank;
      p_blank[u] = P[u * nv + blank];
      p_label[u] = P[u * nv + label[u]];
    }
  }
};

// One frame's used cells, branch-free so that it vectorises; true when some cell's S is below
// sqrt(tiny) * V (products may have been flushed) and needs the exact pass. kBest: m holds M.
template <bool kBest>
inline bool finish_frame(const float* __restrict s, const float* __restrict m,
                         const float* __restrict max_p, const LabelColumns& cols,
                         const float* __restrict e, float max_e, int32_t blank, float s_floor,
                         int64_t n, float* __restrict log_norm, float* __restrict blank_lp,
                         float* __restrict label_lp) {
  const float* __restrict p_blank = cols.p_blank.data();
  const float* __restrict p_label = cols.p_label.data();
  const int32_t* __restrict label = cols.label.data();
  const float e_blank = e[blank];
  int inexact = 0;
  for (int64_t u = 0; u < n; ++u) {
    const float ln = (max_e + max_p[u]) + host_log(s[u]);
    log_norm[u] = ln;
    blank_lp[u] = (e_blank + p_blank[u]) - ln;
    label_lp[u] = (kBest ? m[u] : e[label[u]] + p_label[u]) - ln;
    inexact |= s[u] < s_floor;
  }
  return inexact != 0;
}

// out[u] = max_e + max_p[u] + log m[u] (M from the dense path's M'), branch-free so that it
// vectorises; true when some m[u] is below tiny (products may have been flushed).
inline bool best_from_products(const float* __restrict m, float max_e,
                               const float* __restrict max_p, int64_t n, float tiny,
                               float* __restrict out) {
  int lost = 0;
  for (int64_t u = 0; u < n; ++u) {
    out[u] = (max_e + max_p[u]) + host_log(m[u]);
    lost |= m[u] < tiny;
  }
  return lost != 0;
}

// The move log-probabilities of frames [t0, t1) of one example, finished here rather than in XLA
// passes over (B, T, U+1) arrays. kBest (viterbi): the label move takes the best non-blank label,
// M[t, u] - log_norm (M from BestLabels, or for small V from the sums pass's dense max);
// otherwise labels[u] (labels may be null when kBest). Cells
// whose S may have lost digits to flushed products are recomputed from their own scores, as the
// XLA path does (_normalizer.py). max_p: the prediction rows' maxima.
template <bool kBest>
void finished_moves_rows(const float* E, const float* P, const PredictionRows& p,
                         const float* max_p, const int32_t* labels, int64_t u1, int64_t nv,
                         int32_t e_len, int32_t p_len, int32_t blank, int64_t t0, int64_t t1,
                         const MoveRows& out) {
  constexpr int64_t kBlock = BestLabels::kFrames;  // frames finished while their rows are in cache
  const float tiny = 1.08420217e-19f;  // sqrt(FLT_MIN)
  const float s_floor = tiny * static_cast<float>(nv);
  const LabelColumns cols(P, labels, u1, nv, p_len, blank);
  std::vector<float> s(kBlock * u1), m(kBest ? kBlock * u1 + kLanes : 1), me(kBlock), ln(u1);
  std::vector<float> m_log(kBest ? u1 : 0);  // the dense path's M, one frame at a time
  const bool dense = kBest && nv < BestLabels::kCandidatesFromV;
  std::optional<BestLabels> best;
  if (kBest && !dense && p_len > 0) best.emplace(P, nv, p_len, blank);
  const int64_t used = std::min<int64_t>(t1, std::max<int64_t>(t0, e_len)) - t0;
  for (float* o : {out.blank_lp, out.label_lp, out.log_norm, out.sums}) {
    if (!o) continue;
    std::fill(o + used * u1, o + (t1 - t0) * u1, 0.0f);
    for (int64_t r = 0; r < used; ++r) std::fill(o + r * u1 + p_len, o + (r + 1) * u1, 0.0f);
  }
  if (out.max_e) std::fill(out.max_e + used, out.max_e + (t1 - t0), 0.0f);
  for (int64_t rb = 0; rb < used; rb += kBlock) {
    const int64_t n = std::min(kBlock, used - rb);
    if (dense) {
      normalizer_forward_rows<true>(E, p, u1, nv, e_len, p_len, blank, t0 + rb, t0 + rb + n,
                                    s.data(), me.data(), m.data());
      for (int64_t i = 0; i < n; ++i) {  // M from M'; where M' may have been flushed, from scratch
        float* row = &m[i * u1];
        if (best_from_products(row, me[i], max_p, p_len, tiny, m_log.data()))
          for (int64_t u = 0; u < p_len; ++u)
            if (row[u] < tiny) m_log[u] = dense_best(E + (t0 + rb + i) * nv, P + u * nv, nv, blank);
        std::copy(m_log.begin(), m_log.begin() + p_len, row);
      }
    } else {
      if (best) best->begin_block();
      auto add_frame = [&](const float* row) {
        if (best) best->add_frame(row);
      };
      normalizer_forward_rows<false>(E, p, u1, nv, e_len, p_len, blank, t0 + rb, t0 + rb + n,
                                     s.data(), me.data(), nullptr, add_frame);
      if (best) best->block(E, t0 + rb, n, u1, m.data());
    }
    for (int64_t i = 0; i < n; ++i) {
      const int64_t r = rb + i;
      const float* e = E + (t0 + r) * nv;
      const float* sr = &s[i * u1];
      const float* mr = &m[kBest ? i * u1 : 0];
      float* bl = out.blank_lp + r * u1;
      float* la = out.label_lp + r * u1;
      if (out.max_e) out.max_e[r] = me[i];
      if (out.sums) std::copy(sr, sr + p_len, out.sums + r * u1);
      if (finish_frame<kBest>(sr, mr, max_p, cols, e, me[i], blank, s_floor, p_len, ln.data(), bl,
                              la)) {
        for (int64_t u = 0; u < p_len; ++u) {
          if (!(sr[u] < s_floor)) continue;
          const float* pr = P + u * nv;
          double top = -INFINITY, sum = 0.0;  // log sum_v exp(E + P), in double
          for (int64_t v = 0; v < nv; ++v) top = std::max(top, double(e[v]) + double(pr[v]));
          for (int64_t v = 0; v < nv; ++v) sum += std::exp(double(e[v]) + double(pr[v]) - top);
          const double log_norm = top + std::log(sum);
          ln[u] = static_cast<float>(log_norm);
          bl[u] = static_cast<float>(double(e[blank]) + double(cols.p_blank[u]) - log_norm);
          const double label = kBest ? double(mr[u])
                                     : double(e[cols.label[u]]) + double(cols.p_label[u]);
          la[u] = static_cast<float>(label - log_norm);
        }
      }
      if (out.log_norm) std::copy(ln.data(), ln.data() + p_len, out.log_norm + r * u1);
    }
  }
}

// x[i, :] = sum_u W[i, u] p[u, :] for kRowsX rows (w[i] points at row i of W), NV vectors of
// columns at a time: each prediction load serves kRowsX rows.
constexpr int kRowsX = 4;
inline void weighted_prediction_rows(const float* const* w, const PredictionRows& p, int64_t u1,
                                     float* x) {
  constexpr int NV = 3;  // 12 accumulators + 3 prediction vectors + 1 broadcast: 16 registers
  const int64_t nv_pad = p.nv_pad;
  int64_t v = 0;
  for (; v + NV * kLanes <= nv_pad; v += NV * kLanes) {
    v8f acc[kRowsX][NV] = {};
    for (int64_t u = 0; u < u1; ++u) {
      const float* pr = p.row(u) + v;
      v8f bv[NV];
      for (int k = 0; k < NV; ++k) bv[k] = load8(pr + k * kLanes);
      for (int i = 0; i < kRowsX; ++i) {
        const v8f wv = splat8(w[i][u]);
        for (int k = 0; k < NV; ++k) acc[i][k] += wv * bv[k];
      }
    }
    for (int i = 0; i < kRowsX; ++i)
      for (int k = 0; k < NV; ++k) store8(x + i * nv_pad + v + k * kLanes, acc[i][k]);
  }
  for (; v < nv_pad; v += kLanes) {
    v8f acc[kRowsX] = {};
    for (int64_t u = 0; u < u1; ++u) {
      const v8f bv = load8(p.row(u) + v);
      for (int i = 0; i < kRowsX; ++i) acc[i] += splat8(w[i][u]) * bv;
    }
    for (int i = 0; i < kRowsX; ++i) store8(x + i * nv_pad + v, acc[i]);
  }
}

// y[j, :] += sum_{i < MT} wt[j * MT + i] a[i, :] for NU rows j of y (row length nv_pad, as a's):
// NU x 2 accumulators per step of 16 columns, each load of `a` serving NU rows (one row at a time
// chained 8 FMAs on one register; this is 10% faster on the whole backward kernel, 6 rows 3% more
// than 4). Same order of additions per element as one row at a time.
constexpr int kRowsY = 6;
template <int NU, int MT>
inline void add_weighted_rows(const float* wt, const float* a, int64_t nv_pad, float* y) {
  auto step = [&](int64_t c, auto nc) {
    constexpr int NC = decltype(nc)::value;
    v8f acc[NU][NC];
    for (int j = 0; j < NU; ++j)
      for (int k = 0; k < NC; ++k) acc[j][k] = load8(y + j * nv_pad + c + k * kLanes);
    for (int i = 0; i < MT; ++i) {
      v8f av[NC];
      for (int k = 0; k < NC; ++k) av[k] = load8(a + i * nv_pad + c + k * kLanes);
      for (int j = 0; j < NU; ++j) {
        const v8f wv = splat8(wt[j * MT + i]);
        for (int k = 0; k < NC; ++k) acc[j][k] += wv * av[k];
      }
    }
    for (int j = 0; j < NU; ++j)
      for (int k = 0; k < NC; ++k) store8(y + j * nv_pad + c + k * kLanes, acc[j][k]);
  };
  int64_t c = 0;
  for (; c + 2 * kLanes <= nv_pad; c += 2 * kLanes) step(c, std::integral_constant<int, 2>{});
  if (c < nv_pad) step(c, std::integral_constant<int, 1>{});
}

// Backward for frames [t0, t1) of one example: writes dE rows (exponential part plus the blank
// and label columns) and adds sum_t W[t, u] a[t, v] into y (u1 x nv_pad, zeroed by the caller).
//
// Cells whose S was inexact (see _normalizer.py) have W = 0 and their cotangent g_exact[t, u] != 0:
// their share, g_exact * exp(E[t, :] + P[u, :] - log_norm[t, u]), is computed from the scores
// themselves, added to dE and, for dP, to `extra` (u1 x nv_pad, zeroed by the caller; *has_extra
// tells whether any was added).
struct ExactCells {
  const float* P;         // raw prediction rows (u1 x nv)
  const float* log_norm;  // (nt x u1)
  const float* g_exact;   // (nt x u1)
  float* extra;
  bool* has_extra;
};

inline void exact_cell_shares(const float* e, int64_t t, int64_t u1, int64_t nv, int64_t nv_pad,
                              int32_t p_len, const ExactCells& x, float* d_e_row) {
  for (int64_t u = 0; u < p_len; ++u) {
    const float g = x.g_exact[t * u1 + u];
    if (g == 0.0f) continue;
    *x.has_extra = true;
    const float* pr = x.P + u * nv;
    const float ln = x.log_norm[t * u1 + u];
    float* er = x.extra + u * nv_pad;
    for (int64_t v = 0; v < nv; ++v) {
      const float q = g * norm_exp((e[v] + pr[v]) - ln);
      d_e_row[v] += q;
      er[v] += q;
    }
  }
}

inline void normalizer_backward_rows(const float* E, const PredictionRows& p, const float* max_e,
                                     const float* w, const float* g_blank, const float* g_emit,
                                     const int32_t* labels, int64_t u1, int64_t nv, int32_t e_len,
                                     int32_t p_len, int32_t blank, int64_t t0, int64_t t1,
                                     const ExactCells& exact, float* d_e, float* y) {
  constexpr int MT = 2 * kRowsX;  // frames per tile: each y row is read and written once per tile
  const int64_t nv_pad = p.nv_pad;
  std::vector<float> tile(static_cast<size_t>(2 * MT * nv_pad)), wt(static_cast<size_t>(u1 * MT));
  float* a = tile.data();                 // MT rows of exponentials
  float* x = tile.data() + MT * nv_pad;   // MT rows of sum_u W[t, u] p[u, :]
  for (int64_t t = t0; t < t1; t += MT) {
    const int64_t tile_end = std::min<int64_t>(t + MT, t1);
    const int rows = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(tile_end, e_len) - t));
    std::fill(d_e + (t + rows) * nv, d_e + tile_end * nv, 0.0f);  // frames past the input length
    if (rows == 0) continue;
    for (int i = 0; i < MT; ++i) {
      float* row = a + i * nv_pad;
      if (i < rows) {
        const float* e = E + (t + i) * nv;
        const float m = max_e[t + i];
        exp_shifted(e, nv, m, row);
        std::fill(row + nv, row + nv_pad, 0.0f);
      } else {
        std::fill(row, row + nv_pad, 0.0f);
      }
    }
    for (int h = 0; h < rows; h += kRowsX) {
      const float* wr[kRowsX];
      for (int i = 0; i < kRowsX; ++i) wr[i] = w + (t + std::min(h + i, rows - 1)) * u1;
      weighted_prediction_rows(wr, p, p_len, x + h * nv_pad);  // p's rows past p_len are 0
    }
    // dE rows: exponentials times x, then the blank and label columns.
    for (int i = 0; i < rows; ++i) {
      float* out = d_e + (t + i) * nv;
      const float* ar = a + i * nv_pad;
      const float* xr = x + i * nv_pad;
      for (int64_t c = 0; c < nv; ++c) out[c] = ar[c] * xr[c];
      const int64_t cell = (t + i) * u1;
      float gb = 0.0f;
      for (int64_t u = 0; u < u1; ++u) {
        gb += g_blank[cell + u];
        const int32_t l = labels[u];
        if (l >= 0 && l < nv) out[l] += g_emit[cell + u];
      }
      out[blank] += gb;
      exact_cell_shares(E + (t + i) * nv, t + i, u1, nv, nv_pad, p_len, exact, out);
    }
    // y += W^T a for these rows (rows past `rows` are zero in a and in wt; y's rows past p_len
    // are unused): kRowsY prediction rows at a time, so that each load of `a` serves several.
    for (int64_t u = 0; u < p_len; ++u)
      for (int i = 0; i < MT; ++i) wt[u * MT + i] = i < rows ? w[(t + i) * u1 + u] : 0.0f;
    int64_t u = 0;
    for (; u + kRowsY <= p_len; u += kRowsY)
      add_weighted_rows<kRowsY, MT>(&wt[u * MT], a, nv_pad, y + u * nv_pad);
    for (; u < p_len; ++u) add_weighted_rows<1, MT>(&wt[u * MT], a, nv_pad, y + u * nv_pad);
  }
}

// dP rows of one example from y = sum_t W[t, u] a[t, :] (u1 x nv_pad): the exponential part, the
// exact cells' shares (extra, u1 x nv_pad, or null) and the blank and label columns; rows
// u >= p_len are zero.
inline void normalizer_prediction_grad(const PredictionRows& p, const float* y, const float* extra,
                                       const float* g_blank, const float* g_emit,
                                       const int32_t* labels, int64_t nt, int64_t u1, int64_t nv,
                                       int32_t p_len, int32_t blank, float* d_p) {
  std::vector<float> col_blank(u1, 0.0f), col_label(u1, 0.0f);
  for (int64_t t = 0; t < nt; ++t)
    for (int64_t u = 0; u < u1; ++u) {
      col_blank[u] += g_blank[t * u1 + u];
      col_label[u] += g_emit[t * u1 + u];
    }
  for (int64_t u = 0; u < u1; ++u) {
    float* out = d_p + u * nv;
    if (u >= p_len) {
      std::fill(out, out + nv, 0.0f);
      continue;
    }
    const float* pr = p.row(u);
    const float* yr = y + u * p.nv_pad;
    for (int64_t v = 0; v < nv; ++v) out[v] = pr[v] * yr[v];
    if (extra)
      for (int64_t v = 0; v < nv; ++v) out[v] += extra[u * p.nv_pad + v];
    out[blank] += col_blank[u];
    if (labels[u] >= 0 && labels[u] < nv) out[labels[u]] += col_label[u];
  }
}

}  // namespace cpu
}  // namespace jax_transducer
