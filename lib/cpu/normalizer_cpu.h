// The additive joiner's normaliser matmuls on the CPU, fused with their exponentials (float32).
//
// For one example, with a[t, v] = exp(E[t, v] - mE[t]) and p[u, v] = exp(P[u, v] - mP[u]):
//   forward:   S[t, u] = sum_v a[t, v] p[u, v]   (and, for viterbi, M[t, u] = max_{v != blank}
//              a[t, v] p[u, v], the best label's probability up to the shifts)
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
#include <cstdint>
#include <cstring>
#include <vector>

#include "../lattice.h"

namespace jax_transducer {
namespace cpu {

typedef float v8f __attribute__((vector_size(32)));
constexpr int64_t kLanes = 8;

inline int64_t padded(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }
inline v8f load8(const float* p) {
  v8f r;
  std::memcpy(&r, p, sizeof r);
  return r;
}
inline void store8(float* p, v8f x) { std::memcpy(p, &x, sizeof x); }
inline v8f splat8(float x) { return v8f{} + x; }
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

// max over x[0, nv), NaN if any is NaN. Eight lanes at a time.
inline float row_max(const float* x, int64_t nv) {
  const int64_t vec_end = nv / kLanes * kLanes;
  float m = x[0];
  if (vec_end > 0) {
    v8f acc = load8(x);
    for (int64_t v = kLanes; v < vec_end; v += kLanes) {
      const v8f xv = load8(x + v);
      acc = (xv > acc) | (xv != xv) ? xv : acc;
    }
    for (int i = 0; i < kLanes; ++i) m = (acc[i] > m || acc[i] != acc[i]) ? acc[i] : m;
  }
  for (int64_t v = vec_end; v < nv; ++v) m = (x[v] > m || x[v] != x[v]) ? x[v] : m;
  return m;
}

// out[0, nv) = exp(x - max x), zeros up to nv_pad; returns max x (NaN rows give NaN).
inline float exp_row(const float* x, int64_t nv, float* out, int64_t nv_pad) {
  const float m = row_max(x, nv);
  for (int64_t v = 0; v < nv; ++v) out[v] = norm_exp(x[v] - m);
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

// S (and M) for rows a[0..MT) against prediction rows [u0, u0 + MU) (clamped to u_end - 1),
// over nv_pad lanes; the blank column of `a` has been zeroed (so that M skips it) and is added
// back by the caller.
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
        const v8f prod = av[i] * bv;
        acc[i][j] += prod;
        if constexpr (kBest) best[i][j] = max8(best[i][j], prod);
      }
    }
  }
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < MU; ++j) {
      s[i][j] = sum8(acc[i][j]);
      if constexpr (kBest) m[i][j] = max8_reduce(best[i][j]);
    }
}

// Forward for frames [t0, t1) of one example: S rows, mE, and (kBest) M rows. Only the used cells
// (t < e_len, u < p_len) are computed; the others get 0, as do mE past e_len.
template <bool kBest>
void normalizer_forward_rows(const float* E, const PredictionRows& p, int64_t u1, int64_t nv,
                             int32_t e_len, int32_t p_len, int32_t blank, int64_t t0, int64_t t1,
                             float* sums, float* max_e, float* best) {
  constexpr int MT = kBest ? 2 : 3, MU = kBest ? 3 : 4;
  const int64_t t_end = std::min<int64_t>(t1, std::max<int64_t>(t0, e_len));
  for (int64_t t = t_end; t < t1; ++t) max_e[t] = 0.0f;
  for (float* out : {sums, best}) {
    if (!out) continue;
    std::fill(out + t_end * u1, out + t1 * u1, 0.0f);
    for (int64_t t = t0; t < t_end; ++t) std::fill(out + t * u1 + p_len, out + (t + 1) * u1, 0.0f);
  }
  if (p_len <= 0) {  // no columns: mE still describes the used frames
    for (int64_t t = t0; t < t_end; ++t) max_e[t] = row_max(E + t * nv, nv);
    return;
  }
  std::vector<float> tile(static_cast<size_t>(MT * p.nv_pad));
  for (int64_t t = t0; t < t_end; t += MT) {
    const int rows = static_cast<int>(std::min<int64_t>(MT, t_end - t));
    const float* a[MT];
    float a_blank[MT];
    for (int i = 0; i < MT; ++i) {
      const int r = std::min(i, rows - 1);
      float* row = &tile[r * p.nv_pad];
      a[i] = row;
      if (i >= rows) continue;
      max_e[t + i] = exp_row(E + (t + i) * nv, nv, row, p.nv_pad);
      a_blank[i] = row[blank];
      row[blank] = 0.0f;
    }
    for (int64_t u = 0; u < p_len; u += MU) {
      float s[MT][MU], m[MT][MU];
      sums_tile<MT, MU, kBest>(a, p, u, p_len, s, m);
      for (int i = 0; i < rows; ++i)
        for (int j = 0; j < MU && u + j < p_len; ++j) {
          const int64_t c = (t + i) * u1 + u + j;
          sums[c] = s[i][j] + a_blank[i] * p.row(u + j)[blank];
          if constexpr (kBest) best[c] = m[i][j];
        }
    }
  }
}

// One frame of viterbi_moves_rows from its S and M rows, branch-free so that it vectorises; true
// when some cell needs the exact pass.
inline bool finish_viterbi_row(const float* __restrict s, const float* __restrict m,
                               const float* __restrict max_p, const float* __restrict p_blank,
                               float max_e, float e_blank, float s_floor, float tiny, int64_t n,
                               float* __restrict blank_lp, float* __restrict best_lp) {
  int inexact = 0;
  for (int64_t u = 0; u < n; ++u) {
    const float shift = max_e + max_p[u];
    const float log_norm = shift + host_log(s[u]);
    blank_lp[u] = (e_blank + p_blank[u]) - log_norm;
    best_lp[u] = (shift + host_log(m[u])) - log_norm;
    inexact |= (s[u] < s_floor) | (m[u] < tiny);
  }
  return inexact != 0;
}

// Viterbi's move scores for frames [t0, t1) of one example, finished in log space ((t, u) cells of
// blank_lp and best_lp; 0 outside the used rows):
//   blank_lp = E[t, blank] + P[u, blank] - log_norm,  log_norm = mE[t] + mP[u] + log S[t, u]
//   best_lp  = best - log_norm,                        best     = mE[t] + mP[u] + log M[t, u]
// with best = max_{v != blank} (E[t, v] + P[u, v]). Where products may have been flushed (S below
// sqrt(tiny) * V, M below sqrt(tiny)), log_norm or best is recomputed from the cell's own scores,
// as the XLA path does (_normalizer.py). max_p: the prediction rows' maxima (PredictionRows).
inline void viterbi_moves_rows(const float* E, const float* P, const PredictionRows& p,
                               const float* max_p, int64_t u1, int64_t nv, int32_t e_len,
                               int32_t p_len, int32_t blank, int64_t t0, int64_t t1,
                               float* blank_lp, float* best_lp) {
  constexpr int64_t kBlock = 16;  // frames finished while their S and M rows are in cache
  const float tiny = 1.08420217e-19f;  // sqrt(FLT_MIN)
  const float s_floor = tiny * static_cast<float>(nv);
  std::vector<float> max_e(static_cast<size_t>(t1)), p_blank(u1), s_row(u1), m_row(u1);
  for (int64_t u = 0; u < p_len; ++u) p_blank[u] = P[u * nv + blank];
  for (int64_t tb = t0; tb < t1; tb += kBlock) {
    const int64_t te = std::min(tb + kBlock, t1);
    normalizer_forward_rows<true>(E, p, u1, nv, e_len, p_len, blank, tb, te, blank_lp,
                                  max_e.data(), best_lp);
    for (int64_t t = tb; t < std::min<int64_t>(te, e_len); ++t) {
      const float* e = E + t * nv;
      float* bl = blank_lp + t * u1;
      float* be = best_lp + t * u1;
      std::copy(bl, bl + p_len, s_row.data());
      std::copy(be, be + p_len, m_row.data());
      if (!finish_viterbi_row(s_row.data(), m_row.data(), max_p, p_blank.data(), max_e[t],
                              e[blank], s_floor, tiny, p_len, bl, be))
        continue;
      for (int64_t u = 0; u < p_len; ++u) {
        if (!(s_row[u] < s_floor) && !(m_row[u] < tiny)) continue;
        const float* pr = P + u * nv;
        const float shift = max_e[t] + max_p[u];
        double log_norm = shift + std::log(static_cast<double>(s_row[u]));
        if (s_row[u] < s_floor) {  // log sum_v exp(E + P), in double
          double top = -INFINITY, sum = 0.0;
          for (int64_t v = 0; v < nv; ++v) top = std::max(top, double(e[v]) + double(pr[v]));
          for (int64_t v = 0; v < nv; ++v) sum += std::exp(double(e[v]) + double(pr[v]) - top);
          log_norm = top + std::log(sum);
        }
        double best = shift + std::log(static_cast<double>(m_row[u]));
        if (m_row[u] < tiny) {  // -inf when the blank is the only label
          best = -INFINITY;
          for (int64_t v = 0; v < nv; ++v)
            if (v != blank) best = std::max(best, double(e[v]) + double(pr[v]));
        }
        bl[u] = static_cast<float>((double(e[blank]) + double(p_blank[u])) - log_norm);
        be[u] = static_cast<float>(best - log_norm);
      }
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
  std::vector<float> tile(static_cast<size_t>(2 * MT * nv_pad));
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
        for (int64_t v = 0; v < nv; ++v) row[v] = norm_exp(e[v] - m);
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
    // y += W^T a for these rows (rows past `rows` are zero in a; y's rows past p_len are unused).
    for (int64_t u = 0; u < p_len; ++u) {
      v8f wv[MT];
      for (int i = 0; i < MT; ++i) wv[i] = splat8(i < rows ? w[(t + i) * u1 + u] : 0.0f);
      float* yr = y + u * nv_pad;
      for (int64_t c = 0; c < nv_pad; c += kLanes) {
        v8f acc = load8(yr + c);
        for (int i = 0; i < MT; ++i) acc += wv[i] * load8(a + i * nv_pad + c);
        store8(yr + c, acc);
      }
    }
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
