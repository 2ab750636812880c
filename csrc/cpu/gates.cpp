// sample_gates on the CPU: one task per (image, perturbation) row. The row's round(rK) smallest channel
// keys are found by nth_element on a copy (keys are distinct: no tie-break), then every channel whose key is
// at most that one is off. Mirrors cuda/gates.cu; both follow chip_ext.h's gate_row / channel_key.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../chip_ext.h"

namespace chip_ext {

void sample_gates_cpu(at::Tensor& gates, int64_t base, int64_t start, int64_t stride, double max_drop) {
  check_sample_gates_inputs(gates, stride, max_drop);
  TORCH_CHECK(gates.device().is_cpu(), "sample_gates_cpu: gates is on ", gates.device());
  const int64_t B = gates.size(0), N = gates.size(1), K = gates.size(2);
  bool* out = gates.mutable_data_ptr<bool>();
  const uint64_t key = static_cast<uint64_t>(base);
  at::parallel_for(0, B * N, std::max<int64_t>(1, 4096 / K), [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> keys(K), sorted(K);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / N, n = row % N;
      bool* g = out + row * K;
      const GateRow r = n == 0 ? GateRow{0, 0} : gate_row(key, start + b * stride, n, K, max_drop);
      if (r.n_off <= 0) {
        std::fill(g, g + K, true);
        continue;
      }
      if (r.n_off >= K) {
        std::fill(g, g + K, false);
        continue;
      }
      for (int64_t k = 0; k < K; ++k) keys[k] = channel_key(r.key, k);
      sorted = keys;
      std::nth_element(sorted.begin(), sorted.begin() + (r.n_off - 1), sorted.end());
      const uint32_t last_off = sorted[r.n_off - 1];
      for (int64_t k = 0; k < K; ++k) g[k] = keys[k] > last_off;
    }
  });
}

TORCH_LIBRARY_IMPL(chip_ext, CPU, m) { m.impl("sample_gates", &sample_gates_cpu); }

}  // namespace chip_ext
