// CUDA schedule of the lattice recursions: the same results as lib/cpu/lattice_cpu.h, the per-cell
// math from lib/lattice.h. The only file nvcc compiles; the launchers are declared in
// lattice_cuda.h.
//
// One block per example (grid = batch). A lattice is swept by anti-diagonals d = t + u: the cells
// of one diagonal depend only on the previous one, so the block's threads stride over a diagonal's
// cells and __syncthreads() separates consecutive diagonals. What the previous diagonal computed
// is read back from memory the block owns:
//   forward   alpha, from the alpha output itself;
//   backward  beta, from the flow_blank output, used as scratch before it receives the flows;
//   viterbi   the path scores, from a ring of min(T, U1) + 1 values in dynamic shared memory.
// Per example, only memory inside its own slabs (and its own shared memory) is touched, and an
// example's lengths are used only after lengths_valid() accepted them.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "../lattice.h"
#include "lattice_cuda.h"

namespace jax_transducer {
namespace cuda {
namespace {

constexpr int kMaxThreads = 512;
// Dynamic shared memory a block gets without opting in.
constexpr size_t kDefaultSharedBytes = 48 * 1024;

// Threads per block: enough for the longest diagonal an (nt, u1) slab can hold (min(nt, u1)
// cells), in whole warps, at most kMaxThreads (longer diagonals are strided over).
int block_threads(int64_t nt, int64_t u1) {
  const int64_t longest = std::min(nt, u1);
  const int64_t warps = (longest + 31) / 32;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(warps, 1) * 32, kMaxThreads));
}

// The cells of anti-diagonal d of a lattice with rows t < t_len and columns u <= u_len are
// (d - u, u) for u in [lo, hi] (empty when lo > hi, which no d in [0, t_len + u_len) gives).
struct Diagonal {
  int64_t lo;
  int64_t hi;
};

__device__ __forceinline__ Diagonal diagonal(int64_t d, int32_t t_len, int32_t u_len) {
  const int64_t first = d - (t_len - 1);
  return {first > 0 ? first : 0, d < u_len ? d : static_cast<int64_t>(u_len)};
}

template <typename V>
__device__ __forceinline__ void fill(V* p, int64_t n, V value) {
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) p[i] = value;
}

// ---------------------------------------------------------------------------------------------
// Forward: alpha by diagonals from (0, 0), then the cost.

template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    forward_kernel(const T* __restrict__ blank_all, const T* __restrict__ emit_all,
                   const int32_t* __restrict__ in_len, const int32_t* __restrict__ lab_len,
                   T* __restrict__ costs, T* alpha_all, int64_t nt, int64_t u1) {
  const int64_t b = blockIdx.x;
  const int64_t base = cell_offset(b, 0, 0, nt, u1);
  const T* blank = blank_all + base;
  const T* emit = emit_all + base;
  T* alpha = alpha_all + base;  // written and read back: no __restrict__, no read-only cache
  const int32_t t_len = in_len[b];
  const int32_t u_len = lab_len[b];

  fill(alpha, nt * u1, neg_inf<T>());
  if (!lengths_valid(t_len, u_len, nt, u1)) {  // uniform over the block
    if (threadIdx.x == 0) costs[b] = quiet_nan<T>();
    return;
  }
  __syncthreads();  // the -inf fill before any thread writes a lattice cell

  const int64_t diagonals = static_cast<int64_t>(t_len) + u_len;
  for (int64_t d = 0; d < diagonals; ++d) {
    const Diagonal diag = diagonal(d, t_len, u_len);
    for (int64_t u = diag.lo + threadIdx.x; u <= diag.hi; u += blockDim.x) {
      const int64_t t = d - u;
      const int64_t c = t * u1 + u;
      // As the CPU rows: (0, 0) starts at 0, column 0 only takes the blank move, every other
      // cell combines the blank move from above (-inf on row 0) with the label move from the left.
      T value;
      if (u == 0) {
        value = t == 0 ? T(0) : alpha[c - u1] + blank[c - u1];
      } else {
        const T top = t > 0 ? alpha[c - u1] + blank[c - u1] : neg_inf<T>();
        const T left = alpha[c - 1] + emit[c - 1];
        value = alpha_cell(top, left);
      }
      alpha[c] = value;
    }
    __syncthreads();  // diagonal d complete before d + 1 reads it
  }

  if (threadIdx.x == 0) {
    const int64_t last = static_cast<int64_t>(t_len - 1) * u1 + u_len;
    costs[b] = -(alpha[last] + blank[last]);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward: beta by diagonals from the end, then the flows.
//
// flow_blank is beta's scratch, shifted one row up: beta[t, u] (t >= 1) is stored at cell
// (t - 1, u), which is exactly where the blank flow of (t - 1, u) needs it. Row 0's beta has no
// row above; only its right neighbour on row 0 reads it, one diagonal later, so a single shared
// value carries it. On diagonal d a thread reads slots of diagonal d (cells (t, u) and
// (t - 1, u + 1)) and writes a slot of diagonal d - 1 (cell (t - 1, u)): no two threads of one
// diagonal touch the same slot. The last row's slots are never written and keep their 0.
// The emit flows are final as soon as beta[t, u + 1] is known, in the same sweep; the blank
// flows follow in an elementwise pass, each cell turning its own slot into its flow.

template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    backward_kernel(const T* __restrict__ blank_all, const T* __restrict__ emit_all,
                    const T* __restrict__ alpha_all, const T* __restrict__ costs,
                    const int32_t* __restrict__ in_len, const int32_t* __restrict__ lab_len,
                    T* flow_blank_all, T* __restrict__ flow_emit_all, int64_t nt, int64_t u1) {
  __shared__ T beta_row0;  // beta[0, d] of the diagonal last processed

  const int64_t b = blockIdx.x;
  const int64_t base = cell_offset(b, 0, 0, nt, u1);
  const T* blank = blank_all + base;
  const T* emit = emit_all + base;
  const T* alpha = alpha_all + base;
  T* flow_blank = flow_blank_all + base;  // beta scratch, then the blank flows
  T* flow_emit = flow_emit_all + base;
  const int32_t t_len = in_len[b];
  const int32_t u_len = lab_len[b];

  fill(flow_blank, nt * u1, T(0));
  fill(flow_emit, nt * u1, T(0));
  if (!lengths_valid(t_len, u_len, nt, u1)) return;  // uniform over the block
  __syncthreads();  // the zero fill before any thread writes a lattice cell
  const T log_z = -costs[b];

  const int64_t diagonals = static_cast<int64_t>(t_len) + u_len;
  for (int64_t d = diagonals - 1; d >= 0; --d) {
    const Diagonal diag = diagonal(d, t_len, u_len);
    for (int64_t u = diag.lo + threadIdx.x; u <= diag.hi; u += blockDim.x) {
      const int64_t t = d - u;
      const int64_t c = t * u1 + u;
      const bool last_row = t == t_len - 1;
      // Only the final blank leaves the last row; its beta_to is 0.
      const bool has_blank = !last_row || u == u_len;
      const bool has_emit = u < u_len;
      const T beta_below = last_row ? T(0) : flow_blank[c];  // beta[t + 1, u]
      const T beta_right =                                    // beta[t, u + 1]
          !has_emit ? T(0) : (t > 0 ? flow_blank[c - u1 + 1] : beta_row0);
      const T down = has_blank ? beta_below + blank[c] : neg_inf<T>();
      const T right = has_emit ? beta_right + emit[c] : neg_inf<T>();
      const T beta = beta_cell(down, right);
      if (has_emit) flow_emit[c] = move_flow(alpha[c], emit[c], beta_right, log_z);
      if (t > 0) {
        flow_blank[c - u1] = beta;
      } else {
        beta_row0 = beta;  // one row-0 cell per diagonal: a single writer and reader
      }
    }
    __syncthreads();  // diagonal d's betas stored before d - 1 reads them
  }

  // flow_blank[t, u] now holds beta[t + 1, u] (0 on the last row).
  const int64_t width = static_cast<int64_t>(u_len) + 1;
  // Each thread visits lattice cells i = threadIdx.x + k * blockDim.x as (t, u) = (i / width,
  // i % width), stepping without a division; it reads and rewrites only its own cells.
  const int64_t step_t = blockDim.x / width;
  const int64_t step_u = blockDim.x % width;
  int64_t t = threadIdx.x / width;
  int64_t u = threadIdx.x % width;
  while (t < t_len) {
    const int64_t c = t * u1 + u;
    const bool last_row = t == t_len - 1;
    const bool has_blank = !last_row || u == u_len;
    const T beta_below = last_row ? T(0) : flow_blank[c];
    flow_blank[c] = has_blank ? move_flow(alpha[c], blank[c], beta_below, log_z) : T(0);
    t += step_t;
    u += step_u;
    if (u >= width) {
      u -= width;
      ++t;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Viterbi: best-path scores by diagonals, then a one-thread backtrack.
//
// The scores live in a shared ring of `ring` = min(nt, u1) + 1 slots, cell (t, u) at slot
// u % ring. Two consecutive diagonals span at most min(t_len + 1, u_len + 1) <= ring columns, so
// the slots of diagonal d and those of d - 1 it reads never collide except for the same column.
// A diagonal is updated in place in chunks of blockDim.x cells, from its highest column down:
// each chunk reads (column u and u - 1 of the previous diagonal), syncs, writes (column u), syncs.
// A write to column u only replaces what cells u and u + 1 read, both in this chunk or in one
// already done.

template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    viterbi_kernel(const T* __restrict__ blank_all, const T* __restrict__ label_all,
                   const int32_t* __restrict__ in_len, const int32_t* __restrict__ lab_len,
                   int32_t* __restrict__ path_all, uint8_t* decision_all, int64_t nt, int64_t u1,
                   uint32_t ring) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  T* score = reinterpret_cast<T*>(shared_bytes);
  // Columns are < 2^31 and the ring fits in shared memory: 32-bit remainders suffice.
  const auto slot = [ring](int64_t u) { return static_cast<uint32_t>(u) % ring; };

  const int64_t b = blockIdx.x;
  const int64_t base = cell_offset(b, 0, 0, nt, u1);
  const T* blank = blank_all + base;
  const T* label = label_all + base;
  uint8_t* decision = decision_all + base;  // written and read back by the backtrack
  int32_t* path = path_all + b * u1;
  const int32_t t_len = in_len[b];
  const int32_t u_len = lab_len[b];

  fill(path, u1, kNoFrame);
  fill(decision, nt * u1, uint8_t(0));
  if (!lengths_valid(t_len, u_len, nt, u1)) return;  // uniform over the block
  __syncthreads();  // the fills before any thread writes a lattice cell or a label

  const int64_t diagonals = static_cast<int64_t>(t_len) + u_len;
  for (int64_t d = 0; d < diagonals; ++d) {
    const Diagonal diag = diagonal(d, t_len, u_len);
    for (int64_t top_u = diag.hi; top_u >= diag.lo; top_u -= blockDim.x) {  // uniform bounds
      const int64_t u = top_u - threadIdx.x;
      const bool active = u >= diag.lo;
      const int64_t t = d - u;
      const int64_t c = t * u1 + u;
      T value = T(0);
      bool by_blank = false;
      if (active && !(t == 0 && u == 0)) {  // (0, 0) starts at 0, decision 0
        const T top = t > 0 ? score[slot(u)] + blank[c - u1] : neg_inf<T>();
        const T left = u > 0 ? score[slot(u - 1)] + label[c - 1] : neg_inf<T>();
        by_blank = t > 0 && (u == 0 || viterbi_takes_blank(top, left));
        value = by_blank ? top : left;
      }
      __syncthreads();  // every read of this chunk before its writes
      if (active) {
        score[slot(u)] = value;
        decision[c] = static_cast<uint8_t>(by_blank);
      }
      __syncthreads();  // this chunk's writes before the next chunk (or diagonal) reads
    }
  }

  // The decisions are in global memory, written by the whole block before the last barrier.
  if (threadIdx.x == 0) {
    for (int64_t t = t_len - 1, u = u_len; u > 0;) {
      if (decision[t * u1 + u]) {  // 1 only where t > 0: t stays in the lattice
        --t;
      } else {
        --u;
        path[u] = static_cast<int32_t>(t);
      }
    }
  }
}

// Launch geometry shared by the three kernels; false when the batch does not fit a grid.
bool grid_for(int64_t batch, unsigned* blocks) {
  if (batch < 0 || batch > INT_MAX) return false;
  *blocks = static_cast<unsigned>(batch);
  return true;
}

}  // namespace

cudaError_t max_shared_bytes_per_block(size_t* bytes) {
  int device = 0;
  if (cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) return e;
  int value = 0;
  if (cudaError_t e = cudaDeviceGetAttribute(&value, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                             device);
      e != cudaSuccess)
    return e;
  *bytes = static_cast<size_t>(value);
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_forward(cudaStream_t stream, const T* blank, const T* emit,
                           const int32_t* in_len, const int32_t* lab_len, T* costs, T* alpha,
                           int64_t batch, int64_t nt, int64_t u1) {
  unsigned blocks = 0;
  if (!grid_for(batch, &blocks)) return cudaErrorInvalidValue;
  if (blocks == 0) return cudaSuccess;
  forward_kernel<T><<<blocks, block_threads(nt, u1), 0, stream>>>(blank, emit, in_len, lab_len,
                                                                  costs, alpha, nt, u1);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward(cudaStream_t stream, const T* blank, const T* emit, const T* alpha,
                            const T* costs, const int32_t* in_len, const int32_t* lab_len,
                            T* flow_blank, T* flow_emit, int64_t batch, int64_t nt, int64_t u1) {
  unsigned blocks = 0;
  if (!grid_for(batch, &blocks)) return cudaErrorInvalidValue;
  if (blocks == 0) return cudaSuccess;
  backward_kernel<T><<<blocks, block_threads(nt, u1), 0, stream>>>(
      blank, emit, alpha, costs, in_len, lab_len, flow_blank, flow_emit, nt, u1);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_viterbi(cudaStream_t stream, const T* blank, const T* label,
                           const int32_t* in_len, const int32_t* lab_len, int32_t* path,
                           uint8_t* decision, int64_t batch, int64_t nt, int64_t u1) {
  unsigned blocks = 0;
  if (!grid_for(batch, &blocks)) return cudaErrorInvalidValue;
  if (blocks == 0) return cudaSuccess;
  const size_t shared = viterbi_shared_bytes(nt, u1, sizeof(T));
  if (shared > kDefaultSharedBytes) {
    size_t limit = 0;
    if (cudaError_t e = max_shared_bytes_per_block(&limit); e != cudaSuccess) return e;
    if (shared > limit) return cudaErrorInvalidValue;
    if (cudaError_t e = cudaFuncSetAttribute(viterbi_kernel<T>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(shared));
        e != cudaSuccess)
      return e;
  }
  // shared <= limit bounds the ring far below 2^32.
  const uint32_t ring = static_cast<uint32_t>(std::min(nt, u1) + 1);
  viterbi_kernel<T><<<blocks, block_threads(nt, u1), shared, stream>>>(
      blank, label, in_len, lab_len, path, decision, nt, u1, ring);
  return cudaGetLastError();
}

#define JT_INSTANTIATE(T)                                                                        \
  template cudaError_t launch_forward<T>(cudaStream_t, const T*, const T*, const int32_t*,      \
                                         const int32_t*, T*, T*, int64_t, int64_t, int64_t);   \
  template cudaError_t launch_backward<T>(cudaStream_t, const T*, const T*, const T*,           \
                                          const T*, const int32_t*, const int32_t*, T*, T*,     \
                                          int64_t, int64_t, int64_t);                           \
  template cudaError_t launch_viterbi<T>(cudaStream_t, const T*, const T*, const int32_t*,      \
                                         const int32_t*, int32_t*, uint8_t*, int64_t, int64_t,  \
                                         int64_t);

JT_INSTANTIATE(float)
JT_INSTANTIATE(double)

#undef JT_INSTANTIATE

}  // namespace cuda
}  // namespace jax_transducer
