// Shape checks shared by the CPU and CUDA FFI bindings. Every call sees lattice arrays shaped
// (..., T, U1) and per-example arrays shaped (..., 1); all leading dimensions are batch, which is
// how vmap (broadcast_all) and batch sharding reach the kernels.
#pragma once

#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace jax_transducer {

namespace ffi = xla::ffi;

struct LatticeDims {
  int64_t batch = 1;
  int64_t nt = 0;  // T
  int64_t u1 = 0;  // U + 1
};

inline std::string dims_string(ffi::AnyBuffer::Dimensions dims) {
  std::string s = "(";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + ")";
}

// Reads (batch, T, U1) from a lattice array.
inline ffi::Error lattice_dims(const ffi::AnyBuffer& cells, LatticeDims* out) {
  auto dims = cells.dimensions();
  if (dims.size() < 2)
    return ffi::Error::InvalidArgument("jax_transducer: lattice array needs rank >= 2, got " +
                                       dims_string(dims));
  out->batch = 1;
  for (size_t i = 0; i + 2 < dims.size(); ++i) out->batch *= dims[i];
  out->nt = dims[dims.size() - 2];
  out->u1 = dims[dims.size() - 1];
  return ffi::Error::Success();
}

// Checks that another array has the lattice's batch and the given trailing shape.
inline ffi::Error expect_shape(const char* name, ffi::AnyBuffer::Dimensions dims,
                               const LatticeDims& d, int64_t d1, int64_t d2 = -1) {
  const size_t tail = d2 < 0 ? 1 : 2;
  bool ok = dims.size() >= tail;
  int64_t batch = 1;
  if (ok) {
    for (size_t i = 0; i + tail < dims.size(); ++i) batch *= dims[i];
    ok = batch == d.batch && dims[dims.size() - tail] == d1 &&
         (tail == 1 || dims[dims.size() - 1] == d2);
  }
  if (ok) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(std::string("jax_transducer: ") + name +
                                     " has an unexpected shape " + dims_string(dims));
}

inline ffi::Error unsupported_dtype(const char* op) {
  return ffi::Error::InvalidArgument(std::string("jax_transducer: ") + op +
                                     " supports float32 and float64 lattice arrays only");
}

}  // namespace jax_transducer
