// XLA FFI bindings of the CPU kernels, and the pybind11 module that hands their capsules to Python.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "../cpu/best_labels_cpu.h"
#include "../cpu/lattice_cpu.h"
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
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define JT_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default"), flatten))
#else
#define JT_CPU_CLONES
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
                 ffi::AnyBuffer best, const int32_t* best_label, const int32_t* in_len,
                 const int32_t* lab_len, int32_t blank_id, int32_t* path, uint8_t* decision) {
  const int64_t slab = d.nt * d.u1;
  const T* bl = blank.typed_data<T>();
  const T* be = best.typed_data<T>();
  parallel_for(pool, d.batch, [&](int64_t b) {
    cpu::viterbi_example(bl + b * slab, be + b * slab, best_label + b * slab,
                         decision + b * slab, path + b * d.u1, d.nt, d.u1, in_len[b], lab_len[b],
                         blank_id);
  });
}

ffi::Error Viterbi(ffi::ThreadPool pool, ffi::AnyBuffer blank, ffi::AnyBuffer best,
                   ffi::Buffer<ffi::S32> best_label, ffi::Buffer<ffi::S32> in_len,
                   ffi::Buffer<ffi::S32> lab_len, int32_t blank_id,
                   ffi::Result<ffi::Buffer<ffi::S32>> path,
                   ffi::Result<ffi::Buffer<ffi::U8>> decision) {
  LatticeDims d;
  if (auto e = check_viterbi(blank, best, best_label.dimensions(), in_len.dimensions(),
                             lab_len.dimensions(), path->dimensions(), decision->dimensions(), &d);
      e.failure())
    return e;
  return dispatch_float(blank.element_type(), "viterbi", [&](auto x) {
    viterbi_all<decltype(x)>(pool, d, blank, best, best_label.typed_data(), in_len.typed_data(),
                             lab_len.typed_data(), blank_id, path->typed_data(),
                             decision->typed_data());
    return ffi::Error::Success();
  });
}

template <typename T>
void best_labels_tile(const T* e, int rows, const T* pred, int64_t u1, int64_t nv, int32_t blank,
                      T* best, int32_t* label) {
  cpu::best_labels_rows(e, rows, pred, u1, nv, blank, best, label);
}

template <>
JT_CPU_CLONES void best_labels_tile(const float* e, int rows, const float* pred, int64_t u1,
                                    int64_t nv, int32_t blank, float* best, int32_t* label) {
  cpu::best_labels_rows(e, rows, pred, u1, nv, blank, best, label);
}

template <typename T>
void best_labels_all(ffi::ThreadPool& pool, int64_t batch, int64_t nt, int64_t u1, int64_t nv,
                     ffi::AnyBuffer emissions, ffi::AnyBuffer predictions, int32_t blank,
                     ffi::Result<ffi::AnyBuffer>& best, int32_t* label) {
  const T* e = emissions.typed_data<T>();
  const T* p = predictions.typed_data<T>();
  T* out = best->typed_data<T>();
  // One item per tile of kRows emission rows: enough items to keep every thread busy at B = 1.
  const int64_t tiles = (nt + cpu::kRows - 1) / cpu::kRows;
  parallel_for(pool, batch * tiles, [&](int64_t item) {
    const int64_t b = item / tiles, t = (item % tiles) * cpu::kRows;
    const int rows = static_cast<int>(std::min<int64_t>(cpu::kRows, nt - t));
    const int64_t row = b * nt + t;
    best_labels_tile(e + row * nv, rows, p + b * u1 * nv, u1, nv, blank, out + row * u1,
                     label + row * u1);
  });
}

// Per-cell best non-blank label of the additive joiner (viterbi's label moves).
ffi::Error BestLabels(ffi::ThreadPool pool, ffi::AnyBuffer emissions, ffi::AnyBuffer predictions,
                      int32_t blank, ffi::Result<ffi::AnyBuffer> best,
                      ffi::Result<ffi::Buffer<ffi::S32>> label) {
  auto e = emissions.dimensions();
  auto p = predictions.dimensions();
  if (e.size() < 3 || p.size() != e.size() || e.back() != p.back())
    return ffi::Error::InvalidArgument("jax_transducer: best_labels expects (..., T, V) and "
                                       "(..., U1, V) scores");
  LatticeDims d;
  d.nt = e[e.size() - 2];
  d.u1 = p[p.size() - 2];
  const int64_t nv = e.back();
  d.batch = emissions.element_count() / std::max<int64_t>(1, d.nt * nv);
  for (auto err : {expect_shape("predictions", p, d, d.u1, nv),
                   expect_shape("best", best->dimensions(), d, d.nt, d.u1),
                   expect_shape("best_label", label->dimensions(), d, d.nt, d.u1)})
    if (err.failure()) return err;
  if (blank < 0 || blank >= nv)
    return ffi::Error::InvalidArgument("jax_transducer: blank outside [0, V)");
  if (!same_dtype({&emissions, &predictions})) return unsupported_dtype("best_labels");
  return dispatch_float(emissions.element_type(), "best_labels", [&](auto x) {
    best_labels_all<decltype(x)>(pool, d.batch, d.nt, d.u1, nv, emissions, predictions, blank, best,
                                 label->typed_data());
    return ffi::Error::Success();
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JtBestLabelsCpu, BestLabels,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Attr<int32_t>("blank")
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

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
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<int32_t>("blank")
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::U8>>());

}  // namespace jax_transducer

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "jax_transducer CPU kernels (XLA FFI handlers)";
  // For tests/test_kernels.py: the float math the CPU kernels use, elementwise.
  m.def("host_math", [](pybind11::array_t<float, pybind11::array::c_style> x) {
    pybind11::array_t<float> e(x.size()), l(x.size());
    for (pybind11::ssize_t i = 0; i < x.size(); ++i) {
      e.mutable_at(i) = jax_transducer::jt_exp(x.at(i));
      l.mutable_at(i) = jax_transducer::log1p_exp(x.at(i));
    }
    return pybind11::make_tuple(e, l);
  });
  m.def("log_add", [](float a, float b) { return jax_transducer::log_add(a, b); });
  m.def("registrations", []() {
    namespace py = pybind11;
    py::dict d;
    d["jax_transducer_forward"] =
        py::capsule(reinterpret_cast<void*>(jax_transducer::JtForwardCpu));
    d["jax_transducer_backward"] =
        py::capsule(reinterpret_cast<void*>(jax_transducer::JtBackwardCpu));
    d["jax_transducer_viterbi"] =
        py::capsule(reinterpret_cast<void*>(jax_transducer::JtViterbiCpu));
    d["jax_transducer_best_labels"] =
        py::capsule(reinterpret_cast<void*>(jax_transducer::JtBestLabelsCpu));
    return d;
  });
}
