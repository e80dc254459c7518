// Launchers of the CUDA lattice kernels (lattice_cuda.cu), with host types only: the FFI binding
// (lib/ffi/cuda.cc) includes this header with the host compiler and never sees device code.
//
// All pointers are device memory laid out as the CPU kernels expect (lib/cpu/lattice_cpu.h):
// lattice arrays are `batch` row-major (nt, u1) slabs, per-example arrays hold `batch` values,
// path holds `batch` rows of u1 labels. Each launcher only enqueues work on `stream` (nothing
// synchronises with the host, nothing is allocated) and returns cudaGetLastError() after the
// launch. T is float or double (explicitly instantiated in lattice_cuda.cu).
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace jax_transducer {
namespace cuda {

// Fills alpha (-inf outside each lattice) and costs (NaN for an example whose lengths are invalid).
template <typename T>
cudaError_t launch_forward(cudaStream_t stream, const T* blank, const T* emit,
                           const int32_t* in_len, const int32_t* lab_len, T* costs, T* alpha,
                           int64_t batch, int64_t nt, int64_t u1);

// Fills the flows of every cell (zero outside each lattice and for invalid examples) from the
// forward's alpha and costs.
template <typename T>
cudaError_t launch_backward(cudaStream_t stream, const T* blank, const T* emit, const T* alpha,
                            const T* costs, const int32_t* in_len, const int32_t* lab_len,
                            T* flow_blank, T* flow_emit, int64_t batch, int64_t nt, int64_t u1);

// Fills decision (1 = the best path arrives by blank; 0 outside each lattice) and path (the
// frame of each label move, kNoFrame past the label length and for invalid examples). Keeps one lattice
// diagonal of scores in shared memory: returns cudaErrorInvalidValue when
// viterbi_shared_bytes(nt, u1, sizeof(T)) exceeds what the device grants a block.
template <typename T>
cudaError_t launch_viterbi(cudaStream_t stream, const T* blank, const T* label,
                           const int32_t* in_len, const int32_t* lab_len, int32_t* path,
                           uint8_t* decision, int64_t batch, int64_t nt, int64_t u1);

// Shared memory of one viterbi block: a ring of min(nt, u1) + 1 scores, enough for two
// consecutive anti-diagonals of any lattice inside an (nt, u1) slab.
inline size_t viterbi_shared_bytes(int64_t nt, int64_t u1, size_t elem_bytes) {
  return static_cast<size_t>(std::min(nt, u1) + 1) * elem_bytes;
}

// The most shared memory the current device grants one block (after opting in).
cudaError_t max_shared_bytes_per_block(size_t* bytes);

}  // namespace cuda
}  // namespace jax_transducer
