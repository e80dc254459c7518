// XLA FFI bindings of the CUDA kernels, and the pybind11 module that hands their capsules to
// Python. Host compiler only: the kernels are reached through lib/cuda/lattice_cuda.h. The
// arguments, results and target names are those of the CPU bindings (cpu.cc); the handlers only
// enqueue kernels on XLA's stream, so they are safe to capture in a CUDA graph.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <initializer_list>
#include <string>

#include "../cuda/lattice_cuda.h"
#include "common.h"

namespace jax_transducer {
namespace {

ffi::Error cuda_status(cudaError_t e, const char* op) {
  if (e == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(std::string("jax_transducer: CUDA ") + op +
                              " failed: " + cudaGetErrorString(e));
}

template <typename T>
ffi::Error forward_all(cudaStream_t stream, const LatticeDims& d, ffi::AnyBuffer blank,
                       ffi::AnyBuffer emit, const int32_t* in_len, const int32_t* lab_len,
                       ffi::Result<ffi::AnyBuffer>& costs, ffi::Result<ffi::AnyBuffer>& alpha) {
  return cuda_status(
      cuda::launch_forward<T>(stream, blank.typed_data<T>(), emit.typed_data<T>(), in_len,
                              lab_len, costs->typed_data<T>(), alpha->typed_data<T>(), d.batch,
                              d.nt, d.u1),
      "forward");
}

ffi::Error Forward(cudaStream_t stream, ffi::AnyBuffer blank, ffi::AnyBuffer emit,
                   ffi::Buffer<ffi::S32> in_len, ffi::Buffer<ffi::S32> lab_len,
                   ffi::Result<ffi::AnyBuffer> costs, ffi::Result<ffi::AnyBuffer> alpha) {
  LatticeDims d;
  if (auto e = check_forward(blank, emit, in_len.dimensions(), lab_len.dimensions(), &d);
      e.failure())
    return e;
  return dispatch_float(blank.element_type(), "forward", [&](auto x) {
    return forward_all<decltype(x)>(stream, d, blank, emit, in_len.typed_data(),
                                    lab_len.typed_data(), costs, alpha);
  });
}

template <typename T>
ffi::Error backward_all(cudaStream_t stream, const LatticeDims& d, ffi::AnyBuffer blank,
                        ffi::AnyBuffer emit, ffi::AnyBuffer alpha, ffi::AnyBuffer costs,
                        const int32_t* in_len, const int32_t* lab_len,
                        ffi::Result<ffi::AnyBuffer>& flow_blank,
                        ffi::Result<ffi::AnyBuffer>& flow_emit) {
  return cuda_status(
      cuda::launch_backward<T>(stream, blank.typed_data<T>(), emit.typed_data<T>(),
                               alpha.typed_data<T>(), costs.typed_data<T>(), in_len, lab_len,
                               flow_blank->typed_data<T>(), flow_emit->typed_data<T>(), d.batch,
                               d.nt, d.u1),
      "backward");
}

ffi::Error Backward(cudaStream_t stream, ffi::AnyBuffer blank, ffi::AnyBuffer emit,
                    ffi::AnyBuffer alpha, ffi::AnyBuffer costs, ffi::Buffer<ffi::S32> in_len,
                    ffi::Buffer<ffi::S32> lab_len, ffi::Result<ffi::AnyBuffer> flow_blank,
                    ffi::Result<ffi::AnyBuffer> flow_emit) {
  LatticeDims d;
  if (auto e = check_backward(blank, emit, alpha, costs, in_len.dimensions(),
                              lab_len.dimensions(), &d);
      e.failure())
    return e;
  return dispatch_float(blank.element_type(), "backward", [&](auto x) {
    return backward_all<decltype(x)>(stream, d, blank, emit, alpha, costs, in_len.typed_data(),
                                     lab_len.typed_data(), flow_blank, flow_emit);
  });
}

template <typename T>
ffi::Error viterbi_all(cudaStream_t stream, const LatticeDims& d, ffi::AnyBuffer blank,
                       ffi::AnyBuffer label, const int32_t* in_len, const int32_t* lab_len,
                       int32_t* path, uint8_t* decision) {
  // The kernel keeps one lattice diagonal of scores in shared memory: say so when it cannot.
  const size_t need = cuda::viterbi_shared_bytes(d.nt, d.u1, sizeof(T));
  size_t limit = 0;
  if (auto e = cuda_status(cuda::max_shared_bytes_per_block(&limit), "viterbi"); e.failure())
    return e;
  if (need > limit)
    return ffi::Error::InvalidArgument(
        "jax_transducer: CUDA viterbi keeps min(T, U + 1) + 1 = " +
        std::to_string(need / sizeof(T)) + " scores in shared memory (" + std::to_string(need) +
        " bytes); this GPU grants a block " + std::to_string(limit) + " bytes");
  return cuda_status(cuda::launch_viterbi<T>(stream, blank.typed_data<T>(),
                                             label.typed_data<T>(), in_len, lab_len, path,
                                             decision, d.batch, d.nt, d.u1),
                     "viterbi");
}

ffi::Error Viterbi(cudaStream_t stream, ffi::AnyBuffer blank, ffi::AnyBuffer label,
                   ffi::Buffer<ffi::S32> in_len, ffi::Buffer<ffi::S32> lab_len,
                   ffi::Result<ffi::Buffer<ffi::S32>> path,
                   ffi::Result<ffi::Buffer<ffi::U8>> decision) {
  LatticeDims d;
  if (auto e = check_viterbi(blank, label, in_len.dimensions(), lab_len.dimensions(),
                             path->dimensions(), decision->dimensions(), &d);
      e.failure())
    return e;
  return dispatch_float(blank.element_type(), "viterbi", [&](auto x) {
    return viterbi_all<decltype(x)>(stream, d, blank, label, in_len.typed_data(),
                                    lab_len.typed_data(), path->typed_data(),
                                    decision->typed_data());
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JtForwardCuda, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>(),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JtBackwardCuda, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>(),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JtViterbiCuda, Viterbi,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::U8>>(),
                              {ffi::Traits::kCmdBufferCompatible});

}  // namespace jax_transducer

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "jax_transducer CUDA kernels (XLA FFI handlers)";
  m.def("registrations", []() {
    namespace py = pybind11;
    py::dict d;
    d["jax_transducer_forward"] =
        py::capsule(reinterpret_cast<void*>(jax_transducer::JtForwardCuda));
    d["jax_transducer_backward"] =
        py::capsule(reinterpret_cast<void*>(jax_transducer::JtBackwardCuda));
    d["jax_transducer_viterbi"] =
        py::capsule(reinterpret_cast<void*>(jax_transducer::JtViterbiCuda));
    return d;
  });
}
