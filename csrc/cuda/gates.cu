// sample_gates on CUDA: one block per (image, perturbation) row, nothing copied from the host. The row's
// round(rK)-th smallest channel key is found by a radix select (four 8-bit digits, most significant first,
// a shared histogram per digit; keys are distinct and recomputed from the hash each pass, so K is not
// bounded by shared memory), then every channel whose key is at most that one is off. Mirrors
// cpu/gates.cpp; both follow chip_ext.h's gate_row / channel_key. All on the current stream.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../chip_ext.h"

namespace chip_ext {
namespace {

constexpr int kThreads = 256;

__global__ void sample_gates_kernel(bool* __restrict__ out, uint64_t base, int64_t start, int64_t stride,
                                    int64_t N, int64_t K, double max_drop) {
  const int64_t row = blockIdx.x;
  const int64_t b = row / N, n = row % N;
  bool* g = out + row * K;
  __shared__ uint32_t hist[256];
  __shared__ uint32_t s_prefix, s_want;
  const GateRow r = n == 0 ? GateRow{0, 0} : gate_row(base, start + b * stride, n, K, max_drop);
  if (r.n_off <= 0 || r.n_off >= K) {
    const bool on = r.n_off <= 0;
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) g[k] = on;
    return;
  }
  uint32_t prefix = 0, mask = 0;
  if (threadIdx.x == 0) s_want = static_cast<uint32_t>(r.n_off);  // 1-based rank of the last key off
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
      const uint32_t key = channel_key(r.key, k);
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      uint32_t want = s_want, digit = 0;
      while (hist[digit] < want) want -= hist[digit++];  // the digit holding the want-th smallest key
      s_want = want;
      s_prefix = prefix | (digit << shift);
    }
    __syncthreads();
    prefix = s_prefix;
    mask |= 255u << shift;
    __syncthreads();  // s_prefix / s_want read before the next pass's thread 0 writes them
  }
  const uint32_t last_off = prefix;  // the round(rK)-th smallest key, exactly
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) g[k] = channel_key(r.key, k) > last_off;
}

}  // namespace

void sample_gates_cuda(at::Tensor& gates, int64_t base, int64_t start, int64_t stride, double max_drop) {
  check_sample_gates_inputs(gates, stride, max_drop);
  TORCH_CHECK(gates.is_cuda(), "sample_gates_cuda: gates is on ", gates.device());
  const int64_t B = gates.size(0), N = gates.size(1), K = gates.size(2);
  if (B == 0) return;
  const c10::cuda::CUDAGuard guard(gates.device());
  sample_gates_kernel<<<static_cast<unsigned>(B * N), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      gates.mutable_data_ptr<bool>(), static_cast<uint64_t>(base), start, stride, N, K, max_drop);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

TORCH_LIBRARY_IMPL(chip_ext, CUDA, m) { m.impl("sample_gates", &sample_gates_cuda); }

}  // namespace chip_ext
