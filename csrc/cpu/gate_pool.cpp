// gate_pool on the CPU: channel gating fused with global average pooling.
//
// NCHW: one task per (image b, channel k) plane. The plane is read once (its sum is taken in
// float64 on the way), then written N times, gated, while it sits in cache.
// NHWC: one task per (image b, run of kPixelsPerTask pixels). Each pixel's K channels are read
// once and written N times; per-task channel sums go to a small float64 scratch that is reduced
// in a fixed order, so z does not depend on the number of threads.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../chip_ext.h"

namespace chip_ext {
namespace {

constexpr int64_t kPixelsPerTask = 16;

template <typename gate_t>
inline float gate_value(gate_t g) {
  return static_cast<float>(g);
}

template <typename scalar_t, typename gate_t>
void gate_pool_nchw(const scalar_t* A, const gate_t* gates, scalar_t* out, double* sums,
                    int64_t B, int64_t N, int64_t K, int64_t HW) {
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, HW * N / 64));
  at::parallel_for(0, B * K, grain, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t b = plane / K, k = plane % K;
      const scalar_t* src = A + plane * HW;
      double s = 0.0;
      for (int64_t i = 0; i < HW; ++i) s += static_cast<double>(static_cast<float>(src[i]));
      sums[plane] = s;
      for (int64_t nn = 0; nn < N; ++nn) {
        const float gv = gate_value(gates[(b * N + nn) * K + k]);
        scalar_t* dst = out + ((b * N + nn) * K + k) * HW;
        for (int64_t i = 0; i < HW; ++i) dst[i] = static_cast<scalar_t>(static_cast<float>(src[i]) * gv);
      }
    }
  });
}

template <typename scalar_t, typename gate_t>
void gate_pool_nhwc(const scalar_t* A, const gate_t* gates, scalar_t* out, double* partial,
                    int64_t B, int64_t N, int64_t K, int64_t HW, int64_t tasks_per_image) {
  at::parallel_for(0, B * tasks_per_image, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> gate_row(K);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / tasks_per_image, t = task % tasks_per_image;
      const int64_t p0 = t * kPixelsPerTask, p1 = std::min(HW, p0 + kPixelsPerTask);
      double* acc = partial + task * K;
      for (int64_t k = 0; k < K; ++k) acc[k] = 0.0;
      for (int64_t p = p0; p < p1; ++p) {
        const scalar_t* src = A + (b * HW + p) * K;
        for (int64_t k = 0; k < K; ++k) acc[k] += static_cast<double>(static_cast<float>(src[k]));
      }
      for (int64_t nn = 0; nn < N; ++nn) {
        const gate_t* gn = gates + (b * N + nn) * K;
        for (int64_t k = 0; k < K; ++k) gate_row[k] = gate_value(gn[k]);
        for (int64_t p = p0; p < p1; ++p) {
          const scalar_t* src = A + (b * HW + p) * K;
          scalar_t* dst = out + ((b * N + nn) * HW + p) * K;
          for (int64_t k = 0; k < K; ++k)
            dst[k] = static_cast<scalar_t>(static_cast<float>(src[k]) * gate_row[k]);
        }
      }
    }
  });
}

// z[b,n,k] = gates[b,n,k] * sums[b,k] / HW, the product taken in float64 and rounded once.
template <typename gate_t>
void write_z(const gate_t* gates, const double* sums, float* z, int64_t B, int64_t N, int64_t K,
             int64_t HW) {
  at::parallel_for(0, B * N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t bn = begin; bn < end; ++bn) {
      const int64_t b = bn / N;
      for (int64_t k = 0; k < K; ++k)
        z[bn * K + k] = static_cast<float>(static_cast<double>(gate_value(gates[bn * K + k])) *
                                           (sums[b * K + k] / static_cast<double>(HW)));
    }
  });
}

template <typename scalar_t, typename gate_t>
void run(const at::Tensor& A, Layout layout, const at::Tensor& gates, at::Tensor& out,
         at::Tensor& z) {
  const int64_t B = A.size(0), K = A.size(1), HW = A.size(2) * A.size(3), N = gates.size(1);
  const auto* a_ptr = A.const_data_ptr<scalar_t>();
  const auto* g_ptr = gates.const_data_ptr<gate_t>();
  auto* o_ptr = out.mutable_data_ptr<scalar_t>();
  at::Tensor sums = at::empty({B, K}, A.options().dtype(at::kDouble));
  if (layout == Layout::kNCHW) {
    gate_pool_nchw(a_ptr, g_ptr, o_ptr, sums.mutable_data_ptr<double>(), B, N, K, HW);
  } else {
    const int64_t tasks = (HW + kPixelsPerTask - 1) / kPixelsPerTask;
    at::Tensor partial = at::empty({B, tasks, K}, A.options().dtype(at::kDouble));
    gate_pool_nhwc(a_ptr, g_ptr, o_ptr, partial.mutable_data_ptr<double>(), B, N, K, HW, tasks);
    at::sum_out(sums, partial, {1});
  }
  write_z(g_ptr, sums.const_data_ptr<double>(), z.mutable_data_ptr<float>(), B, N, K, HW);
}

template <typename scalar_t>
void dispatch_gate(const at::Tensor& A, Layout layout, const at::Tensor& gates, at::Tensor& out,
                   at::Tensor& z) {
  switch (gates.scalar_type()) {
    case at::kBool:  // stored as one byte holding 0 or 1
    case at::kByte:
      run<scalar_t, uint8_t>(A, layout, gates.scalar_type() == at::kBool ? gates.view(at::kByte) : gates,
                             out, z);
      break;
    case at::kFloat:
      run<scalar_t, float>(A, layout, gates, out, z);
      break;
    default:  // float64 / float16 / bfloat16 gates: read as float32
      run<scalar_t, float>(A, layout, gates.to(at::kFloat), out, z);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gate_pool_cpu(const at::Tensor& A_in, const at::Tensor& gates_in) {
  check_gate_pool_inputs(A_in, gates_in);
  TORCH_CHECK(A_in.device().is_cpu(), "gate_pool_cpu: A is on ", A_in.device());
  Layout layout;
  const at::Tensor A = gate_pool_layout(A_in, &layout);
  const at::Tensor gates = gates_in.contiguous();
  auto [out, z] = new_gate_pool_outputs(A, layout, gates.size(1));
  switch (A.scalar_type()) {
    case at::kFloat: dispatch_gate<float>(A, layout, gates, out, z); break;
    case at::kHalf: dispatch_gate<at::Half>(A, layout, gates, out, z); break;
    case at::kBFloat16: dispatch_gate<at::BFloat16>(A, layout, gates, out, z); break;
    default: TORCH_CHECK(false, "unreachable: A dtype ", A.scalar_type());
  }
  return {out, z};
}

TORCH_LIBRARY_IMPL(chip_ext, CPU, m) { m.impl("gate_pool", &gate_pool_cpu); }

}  // namespace chip_ext
