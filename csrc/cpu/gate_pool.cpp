// gate_pool on the CPU: channel gating fused with global average pooling.
//
// Image by image (so the image's activations stay in cache while its N copies are written):
//   pass 1  per-channel sums of A[b] in float64, parallel over channels (NCHW) or over runs of
//           kPixelsPerTask pixels (NHWC; per-run partial sums reduced in a fixed order, so z does
//           not depend on the number of threads). This is the one read of A[b] from memory.
//   pass 2  the N gated copies, parallel over the output in its own order, so every thread
//           writes one contiguous stretch; A[b] is re-read from cache.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../chip_ext.h"

namespace chip_ext {
namespace {

constexpr int64_t kPixelsPerTask = 16;
constexpr int64_t kGrainElements = 16384;  // output elements per parallel task, about

template <typename gate_t>
inline float gate_value(gate_t g) {
  return static_cast<float>(g);
}

template <typename scalar_t, typename gate_t>
void gate_pool_nchw(const scalar_t* A, const gate_t* gates, scalar_t* out, double* sums,
                    int64_t B, int64_t N, int64_t K, int64_t HW) {
  for (int64_t b = 0; b < B; ++b) {
    const scalar_t* A_b = A + b * K * HW;
    at::parallel_for(0, K, std::max<int64_t>(1, kGrainElements / HW), [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const scalar_t* src = A_b + k * HW;
        double s = 0.0;
        for (int64_t i = 0; i < HW; ++i) s += static_cast<double>(static_cast<float>(src[i]));
        sums[b * K + k] = s;
      }
    });
    // rows (n, k) of image b's N*K output planes, in memory order
    at::parallel_for(0, N * K, std::max<int64_t>(1, kGrainElements / HW), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t nn = r / K, k = r % K;
        const float gv = gate_value(gates[(b * N + nn) * K + k]);
        const scalar_t* src = A_b + k * HW;
        scalar_t* dst = out + ((b * N + nn) * K + k) * HW;
        for (int64_t i = 0; i < HW; ++i) dst[i] = static_cast<scalar_t>(static_cast<float>(src[i]) * gv);
      }
    });
  }
}

template <typename scalar_t, typename gate_t>
void gate_pool_nhwc(const scalar_t* A, const gate_t* gates, scalar_t* out, double* partial,
                    double* sums, int64_t B, int64_t N, int64_t K, int64_t HW) {
  const int64_t runs = (HW + kPixelsPerTask - 1) / kPixelsPerTask;
  for (int64_t b = 0; b < B; ++b) {
    const scalar_t* A_b = A + b * HW * K;
    at::parallel_for(0, runs, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        double* acc = partial + t * K;
        for (int64_t k = 0; k < K; ++k) acc[k] = 0.0;
        for (int64_t p = t * kPixelsPerTask; p < std::min(HW, (t + 1) * kPixelsPerTask); ++p) {
          const scalar_t* src = A_b + p * K;
          for (int64_t k = 0; k < K; ++k) acc[k] += static_cast<double>(static_cast<float>(src[k]));
        }
      }
    });
    for (int64_t k = 0; k < K; ++k) {
      double s = 0.0;
      for (int64_t t = 0; t < runs; ++t) s += partial[t * K + k];
      sums[b * K + k] = s;
    }
    // rows (n, pixel) of image b's output, in memory order; gates converted once per row
    at::parallel_for(0, N * HW, std::max<int64_t>(1, kGrainElements / K), [&](int64_t r0, int64_t r1) {
      std::vector<float> gate_row(K);
      int64_t row_n = -1;
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t nn = r / HW, p = r % HW;
        if (nn != row_n) {
          const gate_t* gn = gates + (b * N + nn) * K;
          for (int64_t k = 0; k < K; ++k) gate_row[k] = gate_value(gn[k]);
          row_n = nn;
        }
        const scalar_t* src = A_b + p * K;
        scalar_t* dst = out + ((b * N + nn) * HW + p) * K;
        for (int64_t k = 0; k < K; ++k)
          dst[k] = static_cast<scalar_t>(static_cast<float>(src[k]) * gate_row[k]);
      }
    });
  }
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
    const int64_t runs = (HW + kPixelsPerTask - 1) / kPixelsPerTask;
    at::Tensor partial = at::empty({runs, K}, A.options().dtype(at::kDouble));
    gate_pool_nhwc(a_ptr, g_ptr, o_ptr, partial.mutable_data_ptr<double>(),
                   sums.mutable_data_ptr<double>(), B, N, K, HW);
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
