// Operator schemas. Device kernels are registered beside their implementations
// (cpu/*.cpp, cuda/*.cu); fake (meta) kernels for torch.compile are in chip_ext/kernels/ops.py.
#include <torch/library.h>
#include <torch/version.h>

TORCH_LIBRARY(chip_ext, m) {
  // Fake kernels live in Python; tell the dispatcher which module registers them.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 5)
  m.set_python_module("chip_ext.kernels.ops");
#else
  m.impl_abstract_pystub("chip_ext.kernels.ops");
#endif
  // gated[b*N+n, k] = gates[b,n,k] * A[b,k]   (A's dtype and memory format)
  // z[b,n,k]        = gates[b,n,k] * mean_hw(A[b,k])   (float32)
  m.def("gate_pool(Tensor A, Tensor gates) -> (Tensor gated, Tensor z)");
  // Adds one batch to the float64 sufficient statistics of the per-class weighted Lasso:
  //   G_c += sum_sn f_s^c h_sn z_sn z_sn^T (packed upper triangle), b_c += sum f h g^c z,
  //   y_c += sum f h (g^c)^2, n_c += sum f h, with z_sn = gates_sn * a_s,
  //   and the first moments for an intercept: zs_c += sum f h z, gs_c += sum f h g^c.
  m.def(
      "gram_accumulate(Tensor(a!) G, Tensor(b!) b, Tensor(c!) y, Tensor(d!) n, Tensor(e!) zs, "
      "Tensor(f!) gs, Tensor a, Tensor gates, Tensor h, Tensor f, Tensor g) -> ()");
  // Fills gates [B, N, K] bool with the gate stream of the images start, start + stride, ... :
  // row 0 all ones; row n >= 1 switches off round(r K) channels, r = max_drop * u, the ones with the
  // smallest channel keys (chip_ext.distillation.gates.sample_gates, bit for bit). base: the 64-bit
  // key of (seed, layer) as a signed int.
  m.def("sample_gates(Tensor(a!) gates, int base, int start, int stride, float max_drop) -> ()");
}
