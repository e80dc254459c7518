// XLA FFI bindings of the CPU kernels, and the pybind11 module that hands their capsules to Python.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "../cpu/lattice_cpu.h"
#include "../cpu/normalizer_cpu.h"
#include "common.h"

namespace jax_transducer {
namespace {

// Runs fn(0..n-1) on XLA's CPU thread pool, the calling thread working too. XLA's pool has no
// join, so completion is counted per item; a task that starts after all items are taken only
// touches the shared counters, which it keeps alive.
template <typename F>
void parallel_for(ffi::ThreadPool& pool, int64_t n, const F& fn) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  const F* body = &fn;
  auto work = [state, body, n]() {
    int64_t finished = 0;
    for (int64_t i; (i = state->next.fetch_add(1)) < n; ++finished) (*body)(i);
    if (finished && state->done.fetch_add(finished) + finished == n) {
      std::lock_guard<std::mutex> lock(state->mu);
      state->cv.notify_all();
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n - 1);
  for (int64_t k = 0; k < helpers; ++k) pool.Schedule(std::function<void()>(work));
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == n; });
}

// The lattice loops vectorise; builds must run on any x86-64 CPU, so float versions are also
// compiled for x86-64-v3 (AVX2, FMA) and picked at load time (no -march=native).
// JT_NO_CPU_CLONES (setup.py's JAX_TRANSDUCER_CPU_CLONES=0) leaves only the baseline build, so
// that tests can run what CPUs without AVX2 run (.ci/baseline).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(JT_NO_CPU_CLONES)
#define JT_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default"), flatten))
#define JT_HAS_CPU_CLONES true
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define JT_CPU_CLONES __attribute__((flatten))  // as the default clone is compiled
#define JT_HAS_CPU_CLONES false
#else
#define JT_CPU_CLONES
#define JT_HAS_CPU_CLONES false
#endif

template <typename T>
T forward_one(const T* blank, const T* emit, T* alpha, int64_t nt, int64_t u1, int32_t t_len,
              int32_t u_len) {
  return cpu::forward_example(blank, emit, alpha, nt, u1, t_len, u_len);
}

template <>
JT_CPU_CLONES float forward_one(const float* blank, const float* emit, float* alpha, int64_t nt,
                                int64_t u1, int32_t t_len, int32_t u_len) {
  return cpu::forward_example(blank, emit, alpha, nt, u1, t_len, u_len);
}

template <typename T>
void backward_one(const T* blank, const T* emit, const T* alpha, T cost, T* flow_blank,
                  T* flow_emit, int64_t nt, int64_t u1, int32_t t_len, int32_t u_len) {
  cpu::backward_example(blank, emit, alpha, cost, flow_blank, flow_emit, nt, u1, t_len, u_len);
}

template <>
JT_CPU_CLONES void backward_one(const float* blank, const float* emit, const float* alpha,
                                float cost, float* flow_blank, float* flow_emit, int64_t nt,
                                int64_t u1, int32_t t_len, int32_t u_len) {
  cpu::backward_example(blank, emit, alpha, cost, flow_blank, flow_emit, nt, u1, t_len, u_len);
}

template <typename T>
void viterbi_one(const T* blank, const T* label, uint8_t* decision, int32_t* path, int64_t nt,
                 int64_t u1, int32_t t_len, int32_t u_len) {
  cpu::viterbi_example(blank, label, decision, path, nt, u1, t_len, u_len);
}

template <>
JT_CPU_CLONES void viterbi_one(const float* blank, const float* label, uint8_t* decision,
                               int32_t* path, int64_t nt, int64_t u1, int32_t t_len,
                               int32_t u_len) {
  cpu::viterbi_example(blank, label, decision, path, nt, u1, t_len, u_len);
}

template <typename T>
void forward_all(ffi::ThreadPool& pool, const LatticeDims& d, ffi::AnyBuffer blank,
                 ffi::AnyBuffer emit, const int32_t* in_len, const int32_t* lab_len,
                 ffi::Result<ffi::AnyBuffer>& costs, ffi::Result<ffi::AnyBuffer>& alpha) {
  const int64_t slab = d.nt * d.u1;
  const T* bl = blank.typed_data<T>();
  const T* em = emit.typed_data<T>();
  T* al = alpha->typed_data<T>();
  T* co = costs->typed_data<T>();
  parallel_for(pool, d.batch, [&](int64_t b) {
    co[b] = forward_one(bl + b * slab, em + b * slab, al + b * slab, d.nt, d.u1, in_len[b],
                        lab_len[b]);
  });
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::AnyBuffer blank, ffi::AnyBuffer emit,
                   ffi::Buffer<ffi::S32> in_len, ffi::Buffer<ffi::S32> lab_len,
                   ffi::Result<ffi::AnyBuffer> costs, ffi::Result<ffi::AnyBuffer> alpha) {
  LatticeDims d;
  if (auto e = check_forward(blank, emit, in_len.dimensions(), lab_len.dimensions(), &d);
      e.failure())
    return e;
  return dispatch_float(blank.element_type(), "forward", [&](auto x) {
    forward_all<decltype(x)>(pool, d, blank, emit, in_len.typed_data(), lab_len.typed_data(), costs,
                             alpha);
    return ffi::Error::Success();
  });
}

template <typename T>
void backward_all(ffi::ThreadPool& pool, const LatticeDims& d, ffi::AnyBuffer blank,
                  ffi::AnyBuffer emit, ffi::AnyBuffer alpha, ffi::AnyBuffer costs,
                  const int32_t* in_len, const int32_t* lab_len,
                  ffi::Result<ffi::AnyBuffer>& flow_blank, ffi::Result<ffi::AnyBuffer>& flow_emit) {
  const int64_t slab = d.nt * d.u1;
  const T* bl = blank.typed_data<T>();
  const T* em = emit.typed_data<T>();
  const T* al = alpha.typed_data<T>();
  const T* co = costs.typed_data<T>();
  T* fb = flow_blank->typed_data<T>();
  T* fe = flow_emit->typed_data<T>();
  parallel_for(pool, d.batch, [&](int64_t b) {
    backward_one(bl + b * slab, em + b * slab, al + b * slab, co[b], fb + b * slab,
                 fe + b * slab, d.nt, d.u1, in_len[b], lab_len[b]);
  });
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::AnyBuffer blank, ffi::AnyBuffer emit,
                    ffi::AnyBuffer alpha, ffi::AnyBuffer costs, ffi::Buffer<ffi::S32> in_len,
                    ffi::Buffer<ffi::S32> lab_len, ffi::Result<ffi::AnyBuffer> flow_blank,
                    ffi::Result<ffi::AnyBuffer> flow_emit) {
  LatticeDims d;
  if (auto e = check_backward(blank, emit, alpha, costs, in_len.dimensions(),
                              lab_len.dimensions(), &d);
      e.failure())
    return e;
  return dispatch_float(blank.element_type(), "backward", [&](auto x) {
    backward_all<decltype(x)>(pool, d, blank, emit, alpha, costs, in_len.typed_data(),
                              lab_len.typed_data(), flow_blank, flow_emit);
    return ffi::Error::Success();
  });
}

template <typename T>
void viterbi_all(ffi::ThreadPool& pool, const LatticeDims& d, ffi::AnyBuffer blank,
                 ffi::AnyBuffer label, const int32_t* in_len, const int32_t* lab_len,
                 int32_t* path, uint8_t* decision) {
  const int64_t slab = d.nt * d.u1;
  const T* bl = blank.typed_data<T>();
  const T* la = label.typed_data<T>();
  parallel_for(pool, d.batch, [&](int64_t b) {
    viterbi_one(bl + b * slab, la + b * slab, decision + b * slab, path + b * d.u1, d.nt, d.u1,
                in_len[b], lab_len[b]);
  });
}

ffi::Error Viterbi(ffi::ThreadPool pool, ffi::AnyBuffer blank, ffi::AnyBuffer label,
                   ffi::Buffer<ffi::S32> in_len, ffi::Buffer<ffi::S32> lab_len,
                   ffi::Result<ffi::Buffer<ffi::S32>> path,
                   ffi::Result<ffi::Buffer<ffi::U8>> decision) {
  LatticeDims d;
  if (auto e = check_viterbi(blank, label, in_len.dimensions(), lab_len.dimensions(),
                             path->dimensions(), decision->dimensions(), &d);
      e.failure())
    return e;
  return dispatch_float(blank.element_type(), "viterbi", [&](auto x) {
    viterbi_all<decltype(x)>(pool, d, blank, label, in_len.typed_data(), lab_len.typed_data(),
                             path->typed_data(), decision->typed_data());
    return ffi::Error::Success();
  });
}

// ---- The normaliser's fused matmuls (float32; see lib/cpu/normalizer_cpu.h) ----

// XLA hands out a fresh (B, T, V) result buffer on every call, and first touches of fresh memory
// fault page by page (4 KiB): at B*T*V = 16M floats that costs more than computing the gradient.
// Asking for transparent huge pages on the buffer's whole 2 MiB pages makes it ~500 times fewer
// faults; it is only a hint (ignored where THP is off) and ends with the buffer's mapping.
void prefer_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

// Rows of E and P that example b uses, clamped to the arrays whatever the lengths hold.
struct NormDims {
  int64_t batch, nt, u1, nv;
  int32_t e_len(const int32_t* lengths, int64_t b) const {
    return static_cast<int32_t>(std::clamp<int64_t>(lengths[b], 0, nt));
  }
  int32_t p_len(const int32_t* lengths, int64_t b) const {
    return static_cast<int32_t>(std::clamp<int64_t>(lengths[b], 0, u1));
  }
  // Work items per example: enough to keep every thread busy when B is small.
  int64_t chunks(const ffi::ThreadPool& pool) const {
    const int64_t threads = std::max<int64_t>(1, pool.num_threads());
    if (batch <= 0) return 1;  // an empty batch has no items at all
    return std::min<int64_t>(std::max<int64_t>(1, nt), (threads + batch - 1) / batch);
  }
};

// Float32 scores (B, T, V) and (B, U1, V), and blank in [0, V).
ffi::Error score_dims(const ffi::AnyBuffer& emissions, const ffi::AnyBuffer& predictions,
                      int32_t blank, NormDims* n) {
  auto e = emissions.dimensions();
  auto p = predictions.dimensions();
  if (e.size() < 3 || p.size() != e.size() || e.back() != p.back())
    return ffi::Error::InvalidArgument("jax_transducer: the normaliser expects (..., T, V) and "
                                       "(..., U1, V) scores");
  if (emissions.element_type() != ffi::F32 || predictions.element_type() != ffi::F32)
    return ffi::Error::InvalidArgument("jax_transducer: the CPU normaliser takes float32 scores");
  LatticeDims d;
  d.nt = e[e.size() - 2];
  d.u1 = p[p.size() - 2];
  const int64_t nv = e.back();
  d.batch = emissions.element_count() / std::max<int64_t>(1, d.nt * nv);
  if (auto err = expect_shape("predictions", p, d, d.u1, nv); err.failure()) return err;
  if (blank < 0 || blank >= nv)
    return ffi::Error::InvalidArgument("jax_transducer: blank outside [0, V)");
  *n = NormDims{d.batch, d.nt, d.u1, nv};
  return ffi::Error::Success();
}

// score_dims, and the row counts (B, 1).
ffi::Error norm_dims(const ffi::AnyBuffer& emissions, const ffi::AnyBuffer& predictions,
                     Dims e_len, Dims p_len, int32_t blank, NormDims* n) {
  if (auto err = score_dims(emissions, predictions, blank, n); err.failure()) return err;
  LatticeDims d{n->batch, n->nt, n->u1};
  return first_failure({expect_shape("emission_rows", e_len, d, 1),
                        expect_shape("prediction_rows", p_len, d, 1)});
}

template <bool kBest>
JT_CPU_CLONES void norm_moves_item(const float* E, const float* P, const int32_t* labels,
                                   const NormDims& n, int32_t e_len, int32_t p_len, int32_t blank,
                                   int64_t t0, int64_t t1, float* max_p,
                                   const cpu::MoveRows& out) {
  std::vector<float> mp(n.u1);
  const cpu::PredictionRows p(P, mp.data(), n.u1, n.nv, p_len);
  if (max_p) std::copy(mp.begin(), mp.end(), max_p);
  cpu::finished_moves_rows<kBest>(E, P, p, mp.data(), labels, n.u1, n.nv, e_len, p_len, blank,
                                  t0, t1, out);
}

// The moves of every example, over (example, frame chunk) work items: enough items to keep every
// thread busy when B is small. `all` holds the whole (B, T, U+1) and (B, T) results (null where a
// kernel has none); max_p (B, U+1), or null, is written by each example's first chunk.
template <bool kBest>
void moves_all(ffi::ThreadPool& pool, const NormDims& n, const float* E, const float* P,
               const int32_t* labels, const int32_t* e_rows, const int32_t* p_rows,
               int32_t blank, const cpu::MoveRows& all, float* max_p) {
  const int64_t chunks = n.chunks(pool), span = (n.nt + chunks - 1) / chunks;
  auto at = [](float* x, int64_t offset) { return x ? x + offset : nullptr; };
  parallel_for(pool, n.batch * chunks, [&](int64_t i) {
    const int64_t b = i / chunks, t0 = std::min(n.nt, (i % chunks) * span);
    const int64_t row = (b * n.nt + t0) * n.u1;  // frame t0's row of example b
    const cpu::MoveRows out{all.blank_lp + row, all.label_lp + row, at(all.log_norm, row),
                            at(all.sums, row), at(all.max_e, b * n.nt + t0)};
    norm_moves_item<kBest>(E + b * n.nt * n.nv, P + b * n.u1 * n.nv,
                           labels ? labels + b * n.u1 : nullptr, n, n.e_len(e_rows, b),
                           n.p_len(p_rows, b), blank, t0, std::min(n.nt, t0 + span),
                           i % chunks == 0 ? at(max_p, b * n.u1) : nullptr, out);
  });
}

// The loss's forward: the move log-probabilities blank_lp and emit_lp (labels (B, U+1) int32; one
// outside [0, V) reads the blank), and for the gradient log_norm, S = exp(E - mE) @ exp(P - mP)^T
// and the row maxima mE, mP (cpu::finished_moves_rows). Rows past the given counts are read as
// absent: their cells and maxima are 0.
ffi::Error NormForward(ffi::ThreadPool pool, ffi::AnyBuffer emissions, ffi::AnyBuffer predictions,
                       ffi::Buffer<ffi::S32> e_rows, ffi::Buffer<ffi::S32> p_rows,
                       ffi::Buffer<ffi::S32> labels, int32_t blank,
                       ffi::Result<ffi::AnyBuffer> blank_lp, ffi::Result<ffi::AnyBuffer> emit_lp,
                       ffi::Result<ffi::AnyBuffer> log_norm, ffi::Result<ffi::AnyBuffer> sums,
                       ffi::Result<ffi::AnyBuffer> max_e, ffi::Result<ffi::AnyBuffer> max_p) {
  NormDims n;
  if (auto err = norm_dims(emissions, predictions, e_rows.dimensions(), p_rows.dimensions(),
                           blank, &n);
      err.failure())
    return err;
  LatticeDims d{n.batch, n.nt, n.u1};
  if (auto err = first_failure({expect_shape("labels", labels.dimensions(), d, n.u1),
                                expect_shape("blank_lp", blank_lp->dimensions(), d, n.nt, n.u1),
                                expect_shape("emit_lp", emit_lp->dimensions(), d, n.nt, n.u1),
                                expect_shape("log_norm", log_norm->dimensions(), d, n.nt, n.u1),
                                expect_shape("sums", sums->dimensions(), d, n.nt, n.u1),
                                expect_shape("max_e", max_e->dimensions(), d, n.nt),
                                expect_shape("max_p", max_p->dimensions(), d, n.u1)});
      err.failure())
    return err;
  moves_all<false>(pool, n, emissions.typed_data<float>(), predictions.typed_data<float>(),
                   labels.typed_data(), e_rows.typed_data(), p_rows.typed_data(), blank,
                   {blank_lp->typed_data<float>(), emit_lp->typed_data<float>(),
                    log_norm->typed_data<float>(), sums->typed_data<float>(),
                    max_e->typed_data<float>()},
                   max_p->typed_data<float>());
  return ffi::Error::Success();
}

// Viterbi's move log-probabilities: the blank move's and the best non-blank label's.
ffi::Error NormViterbi(ffi::ThreadPool pool, ffi::AnyBuffer emissions, ffi::AnyBuffer predictions,
                       ffi::Buffer<ffi::S32> e_rows, ffi::Buffer<ffi::S32> p_rows, int32_t blank,
                       ffi::Result<ffi::AnyBuffer> blank_lp, ffi::Result<ffi::AnyBuffer> best_lp) {
  NormDims n;
  if (auto err = norm_dims(emissions, predictions, e_rows.dimensions(), p_rows.dimensions(),
                           blank, &n);
      err.failure())
    return err;
  LatticeDims d{n.batch, n.nt, n.u1};
  if (auto err = first_failure({expect_shape("blank_lp", blank_lp->dimensions(), d, n.nt, n.u1),
                                expect_shape("best_lp", best_lp->dimensions(), d, n.nt, n.u1)});
      err.failure())
    return err;
  moves_all<true>(pool, n, emissions.typed_data<float>(), predictions.typed_data<float>(),
                  nullptr, e_rows.typed_data(), p_rows.typed_data(), blank,
                  {blank_lp->typed_data<float>(), best_lp->typed_data<float>(), nullptr, nullptr,
                   nullptr},
                  nullptr);
  return ffi::Error::Success();
}

JT_CPU_CLONES void best_labels_example(const float* E, const float* P, const int32_t* frames,
                                       const NormDims& n, int64_t nu, int32_t blank,
                                       int32_t* labels) {
  for (int64_t u = 0; u < nu; ++u) {
    const int32_t t = frames[u];
    labels[u] = t >= 0 && t < n.nt ? cpu::first_best_label(E + t * n.nv, P + u * n.nv, n.nv, blank)
                                   : blank;
  }
}

// Viterbi's labels at its path's label moves: labels[b, u] (B, U) = the first argmax over
// v != blank of E[b, t, v] + P[b, u, v] (the first NaN if any) where t = frames[b, u] is a frame,
// the blank where it is not (NO_FRAME: no label move).
ffi::Error BestLabelsAt(ffi::ThreadPool pool, ffi::AnyBuffer emissions,
                        ffi::AnyBuffer predictions, ffi::Buffer<ffi::S32> frames, int32_t blank,
                        ffi::Result<ffi::Buffer<ffi::S32>> labels) {
  NormDims n;
  if (auto err = score_dims(emissions, predictions, blank, &n); err.failure()) return err;
  LatticeDims d{n.batch, n.nt, n.u1};
  const auto f = frames.dimensions();
  const int64_t nu = f.size() ? f.back() : 0;
  if (auto err = first_failure({nu <= n.u1 ? expect_shape("frames", f, d, nu)
                                           : ffi::Error::InvalidArgument(
                                                 "jax_transducer: frames has more than U1 columns"),
                                expect_shape("labels", labels->dimensions(), d, nu)});
      err.failure())
    return err;
  const float* E = emissions.typed_data<float>();
  const float* P = predictions.typed_data<float>();
  parallel_for(pool, n.batch, [&](int64_t b) {
    best_labels_example(E + b * n.nt * n.nv, P + b * n.u1 * n.nv, frames.typed_data() + b * nu, n,
                        nu, blank, labels->typed_data() + b * nu);
  });
  return ffi::Error::Success();
}

// Each item's sum_t W a (u1 x nv_pad) and its exact cells' dP shares (the same size; has_extra
// when the item has such cells).
struct PredictionPartial {
  std::vector<float> y, extra;
  bool has_extra = false;
};

JT_CPU_CLONES void norm_backward_item(const float* E, const float* P, const NormDims& n,
                                      int32_t e_len, int32_t p_len, int32_t blank, int64_t t0,
                                      int64_t t1, const float* max_e, const float* w,
                                      const float* g_blank, const float* g_emit,
                                      const float* log_norm, const float* g_exact,
                                      const int32_t* labels, float* d_e, PredictionPartial& part,
                                      float* d_p) {
  const cpu::PredictionRows p(P, nullptr, n.u1, n.nv, p_len);
  part.y.assign(static_cast<size_t>(n.u1 * p.nv_pad), 0.0f);
  part.extra.assign(part.y.size(), 0.0f);
  const cpu::ExactCells exact{P, log_norm, g_exact, part.extra.data(), &part.has_extra};
  cpu::normalizer_backward_rows(E, p, max_e, w, g_blank, g_emit, labels, n.u1, n.nv, e_len,
                                p_len, blank, t0, t1, exact, d_e, part.y.data());
  if (d_p)
    cpu::normalizer_prediction_grad(p, part.y.data(), part.has_extra ? part.extra.data() : nullptr,
                                    g_blank, g_emit, labels, n.nt, n.u1, n.nv, p_len, blank, d_p);
}

JT_CPU_CLONES void norm_prediction_item(const float* P, const NormDims& n, int32_t p_len,
                                        int32_t blank, const float* y, const float* extra,
                                        const float* g_blank, const float* g_emit,
                                        const int32_t* labels, float* d_p) {
  const cpu::PredictionRows p(P, nullptr, n.u1, n.nv, p_len);
  cpu::normalizer_prediction_grad(p, y, extra, g_blank, g_emit, labels, n.nt, n.u1, n.nv, p_len,
                                  blank, d_p);
}

// The normaliser's and the gathers' gradient: dE, dP for cotangents g_blank, g_emit of the move
// log-probabilities, with W = -(g_blank + g_emit) / S where S is exact, and g_exact =
// -(g_blank + g_emit) (0 elsewhere) at the cells whose share is computed from the scores and
// log_norm (cpu::exact_cell_shares).
ffi::Error NormBackward(ffi::ThreadPool pool, ffi::AnyBuffer emissions, ffi::AnyBuffer predictions,
                        ffi::Buffer<ffi::S32> e_rows, ffi::Buffer<ffi::S32> p_rows,
                        ffi::Buffer<ffi::F32> max_e, ffi::Buffer<ffi::F32> w,
                        ffi::Buffer<ffi::F32> g_blank, ffi::Buffer<ffi::F32> g_emit,
                        ffi::Buffer<ffi::F32> log_norm, ffi::Buffer<ffi::F32> g_exact,
                        ffi::Buffer<ffi::S32> labels, int32_t blank,
                        ffi::Result<ffi::AnyBuffer> d_e, ffi::Result<ffi::AnyBuffer> d_p) {
  NormDims n;
  if (auto err = norm_dims(emissions, predictions, e_rows.dimensions(), p_rows.dimensions(),
                           blank, &n);
      err.failure())
    return err;
  LatticeDims d{n.batch, n.nt, n.u1};
  if (auto err = first_failure({expect_shape("max_e", max_e.dimensions(), d, n.nt),
                                expect_shape("w", w.dimensions(), d, n.nt, n.u1),
                                expect_shape("g_blank", g_blank.dimensions(), d, n.nt, n.u1),
                                expect_shape("g_emit", g_emit.dimensions(), d, n.nt, n.u1),
                                expect_shape("log_norm", log_norm.dimensions(), d, n.nt, n.u1),
                                expect_shape("g_exact", g_exact.dimensions(), d, n.nt, n.u1),
                                expect_shape("labels", labels.dimensions(), d, n.u1),
                                expect_shape("d_e", d_e->dimensions(), d, n.nt, n.nv),
                                expect_shape("d_p", d_p->dimensions(), d, n.u1, n.nv)});
      err.failure())
    return err;
  const float* E = emissions.typed_data<float>();
  const float* P = predictions.typed_data<float>();
  prefer_huge_pages(d_e->untyped_data(), d_e->size_bytes());
  const int64_t chunks = n.chunks(pool), span = (n.nt + chunks - 1) / chunks;
  const int64_t cells = n.nt * n.u1;
  // With one chunk per example the item finishes dP itself; otherwise the chunks' partials are
  // summed per example afterwards.
  std::vector<PredictionPartial> partial(chunks > 1 ? n.batch * chunks : 0);
  parallel_for(pool, n.batch * chunks, [&](int64_t item) {
    const int64_t b = item / chunks, t0 = std::min(n.nt, (item % chunks) * span),
                  t1 = std::min(n.nt, t0 + span);
    PredictionPartial local;
    norm_backward_item(E + b * n.nt * n.nv, P + b * n.u1 * n.nv, n,
                       n.e_len(e_rows.typed_data(), b), n.p_len(p_rows.typed_data(), b), blank,
                       t0, t1, max_e.typed_data() + b * n.nt, w.typed_data() + b * cells,
                       g_blank.typed_data() + b * cells, g_emit.typed_data() + b * cells,
                       log_norm.typed_data() + b * cells, g_exact.typed_data() + b * cells,
                       labels.typed_data() + b * n.u1,
                       d_e->typed_data<float>() + b * n.nt * n.nv,
                       chunks > 1 ? partial[item] : local,
                       chunks > 1 ? nullptr : d_p->typed_data<float>() + b * n.u1 * n.nv);
  });
  if (chunks > 1) {
    parallel_for(pool, n.batch, [&](int64_t b) {
      PredictionPartial& sum = partial[b * chunks];
      for (int64_t k = 1; k < chunks; ++k) {
        const PredictionPartial& other = partial[b * chunks + k];
        for (size_t i = 0; i < sum.y.size(); ++i) sum.y[i] += other.y[i];
        if (!other.has_extra) continue;
        sum.has_extra = true;
        for (size_t i = 0; i < sum.extra.size(); ++i) sum.extra[i] += other.extra[i];
      }
      norm_prediction_item(P + b * n.u1 * n.nv, n, n.p_len(p_rows.typed_data(), b), blank,
                           sum.y.data(), sum.has_extra ? sum.extra.data() : nullptr,
                           g_blank.typed_data() + b * cells, g_emit.typed_data() + b * cells,
                           labels.typed_data() + b * n.u1,
                           d_p->typed_data<float>() + b * n.u1 * n.nv);
    });
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JtForwardCpu, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JtBackwardCpu, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JtViterbiCpu, Viterbi,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::U8>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JtNormForwardCpu, NormForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<int32_t>("blank")
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JtNormViterbiCpu, NormViterbi,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<int32_t>("blank")
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JtBestLabelsCpu, BestLabelsAt,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<int32_t>("blank")
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JtNormBackwardCpu, NormBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<int32_t>("blank")
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

// For tests: the normaliser's exponentials, in the clone the kernels run (x86-64-v3 where the CPU
// has it); the pybind function below also calls the baseline build directly.
JT_CPU_CLONES void norm_exp_dispatched(const float* x, int64_t n, float* out) {
  cpu::exp_shifted(x, n, 0.0f, out);
}

}  // namespace jax_transducer

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "jax_transducer CPU kernels (XLA FFI handlers)";
  // For tests/test_kernels.py: the float math the CPU kernels use, elementwise: exp(x),
  // log1p(exp(x)) and log(x).
  m.def("host_math", [](pybind11::array_t<float, pybind11::array::c_style> x) {
    pybind11::array_t<float> e(x.size()), l(x.size()), g(x.size());
    for (pybind11::ssize_t i = 0; i < x.size(); ++i) {
      e.mutable_at(i) = jax_transducer::jt_exp(x.at(i));
      l.mutable_at(i) = jax_transducer::log1p_exp(x.at(i));
      g.mutable_at(i) = jax_transducer::host_log(x.at(i));
    }
    return pybind11::make_tuple(e, l, g);
  });
  m.def("log_add", [](float a, float b) { return jax_transducer::log_add(a, b); });
  // The normaliser's exp(x) (vectors of 8 and a scalar tail; 0 below -87.3): the clone the
  // kernels run, and the baseline x86-64 build.
  m.def("norm_exp", [](pybind11::array_t<float, pybind11::array::c_style> x) {
    pybind11::array_t<float> a(x.size()), b(x.size());
    jax_transducer::norm_exp_dispatched(x.data(), x.size(), a.mutable_data());
    jax_transducer::cpu::exp_shifted(x.data(), x.size(), 0.0f, b.mutable_data());
    return pybind11::make_tuple(a, b);
  });
  // Whether the float kernels have their x86-64-v3 clones (false in .ci/baseline's build).
  m.def("has_clones", []() { return JT_HAS_CPU_CLONES; });
  m.def("registrations", []() {
    namespace py = pybind11;
    py::dict d;
    d["jax_transducer_forward"] =
        py::capsule(reinterpret_cast<void*>(jax_transducer::JtForwardCpu));
    d["jax_transducer_backward"] =
        py::capsule(reinterpret_cast<void*>(jax_transducer::JtBackwardCpu));
    d["jax_transducer_viterbi"] =
        py::capsule(reinterpret_cast<void*>(jax_transducer::JtViterbiCpu));
    d["jax_transducer_norm_forward"] =
        py::capsule(reinterpret_cast<void*>(jax_transducer::JtNormForwardCpu));
    d["jax_transducer_norm_backward"] =
        py::capsule(reinterpret_cast<void*>(jax_transducer::JtNormBackwardCpu));
    d["jax_transducer_norm_viterbi"] =
        py::capsule(reinterpret_cast<void*>(jax_transducer::JtNormViterbiCpu));
    d["jax_transducer_best_labels"] =
        py::capsule(reinterpret_cast<void*>(jax_transducer::JtBestLabelsCpu));
    return d;
  });
}
