// Shape checks shared by the CPU and CUDA FFI bindings. Every call sees lattice arrays shaped
// (..., T, U1) and per-example arrays shaped (..., 1); all leading dimensions are batch, which is
// how vmap (broadcast_all) and batch sharding reach the kernels.
#pragma once

#include <cstdint>
#include <initializer_list>
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

// Returns f(T{}) with T the C++ type of a float32 or float64 buffer: one dtype dispatch for all.
template <typename F>
ffi::Error dispatch_float(ffi::DataType dtype, const char* op, F&& f) {
  switch (dtype) {
    case ffi::F32:
      return f(float{});
    case ffi::F64:
      return f(double{});
    default:
      return unsupported_dtype(op);
  }
}

inline bool same_dtype(std::initializer_list<const ffi::AnyBuffer*> bufs) {
  for (auto* b : bufs)
    if (b->element_type() != (*bufs.begin())->element_type()) return false;
  return true;
}

using Dims = ffi::AnyBuffer::Dimensions;

inline ffi::Error first_failure(std::initializer_list<ffi::Error> errors) {
  for (const auto& e : errors)
    if (e.failure()) return e;
  return ffi::Error::Success();
}

// The buffer checks of each target, for every platform's binding. On success, *d holds the dims.
inline ffi::Error check_forward(const ffi::AnyBuffer& blank, const ffi::AnyBuffer& emit,
                                Dims in_len, Dims lab_len, LatticeDims* d) {
  if (auto e = lattice_dims(blank, d); e.failure()) return e;
  if (auto e = first_failure({expect_shape("emit", emit.dimensions(), *d, d->nt, d->u1),
                              expect_shape("input_lengths", in_len, *d, 1),
                              expect_shape("label_lengths", lab_len, *d, 1)});
      e.failure())
    return e;
  return same_dtype({&blank, &emit}) ? ffi::Error::Success() : unsupported_dtype("forward");
}

inline ffi::Error check_backward(const ffi::AnyBuffer& blank, const ffi::AnyBuffer& emit,
                                 const ffi::AnyBuffer& alpha, const ffi::AnyBuffer& costs,
                                 Dims in_len, Dims lab_len, LatticeDims* d) {
  if (auto e = lattice_dims(blank, d); e.failure()) return e;
  if (auto e = first_failure({expect_shape("emit", emit.dimensions(), *d, d->nt, d->u1),
                              expect_shape("alpha", alpha.dimensions(), *d, d->nt, d->u1),
                              expect_shape("costs", costs.dimensions(), *d, 1),
                              expect_shape("input_lengths", in_len, *d, 1),
                              expect_shape("label_lengths", lab_len, *d, 1)});
      e.failure())
    return e;
  return same_dtype({&blank, &emit, &alpha, &costs}) ? ffi::Error::Success()
                                                     : unsupported_dtype("backward");
}

inline ffi::Error check_viterbi(const ffi::AnyBuffer& blank, const ffi::AnyBuffer& label,
                                Dims in_len, Dims lab_len, Dims path, Dims decision,
                                LatticeDims* d) {
  if (auto e = lattice_dims(blank, d); e.failure()) return e;
  if (auto e = first_failure({expect_shape("label", label.dimensions(), *d, d->nt, d->u1),
                              expect_shape("input_lengths", in_len, *d, 1),
                              expect_shape("label_lengths", lab_len, *d, 1),
                              expect_shape("path", path, *d, d->u1),
                              expect_shape("decision", decision, *d, d->nt, d->u1)});
      e.failure())
    return e;
  return same_dtype({&blank, &label}) ? ffi::Error::Success() : unsupported_dtype("viterbi");
}

}  // namespace jax_transducer
