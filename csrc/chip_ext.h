// chip_ext kernels: declarations shared by the registration, the CPU and the CUDA implementations.
//
// Three operators (DESIGN.md §1, §3):
//   gate_pool(A [B,K,H,W], gates [B,N,K]) -> (gated [B*N,K,H,W], z [B,N,K] float32)
//   gram_accumulate(G [C,K(K+1)/2] f64!, b [C,K] f64!, y [C] f64!, n [C] f64!, zs [C,K] f64!,
//                   gs [C] f64!, a [B,K], gates [B,N,K], h [B,N], f [B,C], g [B,N,C]) -> ()
//   sample_gates(gates [B,N,K] bool!, base, start, stride, max_drop) -> ()   (the gate stream, gates.py)
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <string>

#ifdef __CUDACC__
#define CHIP_EXT_HD __host__ __device__
#else
#define CHIP_EXT_HD
#endif

namespace chip_ext {

// ---- input checks (device-independent; both devices' kernels call them first) ----

// Checks A and gates for gate_pool; throws c10::Error (Python: RuntimeError/ValueError) that names
// the argument, the expected and the actual shape/dtype/device.
void check_gate_pool_inputs(const at::Tensor& A, const at::Tensor& gates);

// Checks every argument of gram_accumulate; returns nothing, throws on the first problem.
void check_gram_inputs(const at::Tensor& G, const at::Tensor& b, const at::Tensor& y,
                       const at::Tensor& n, const at::Tensor& zs, const at::Tensor& gs,
                       const at::Tensor& a, const at::Tensor& gates, const at::Tensor& h,
                       const at::Tensor& f, const at::Tensor& g);

// "[8, 16, 256]"
std::string shape_str(const at::Tensor& t);

// Number of entries of the packed upper triangle of a K x K matrix: K(K+1)/2.
CHIP_EXT_HD inline int64_t packed_size(int64_t K) { return K * (K + 1) / 2; }

// Offset of (i, j), i <= j, in the packed upper triangle, in torch.triu_indices(K, K) order
// (row-major over the upper triangle).
CHIP_EXT_HD inline int64_t packed_index(int64_t i, int64_t j, int64_t K) {
  return i * K - i * (i - 1) / 2 + (j - i);
}

// ---- the gate stream (chip_ext/distillation/gates.py, GATE_STREAM "mix32-v2"): the same bits on every device ----

CHIP_EXT_HD inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

// lowbias32 (C. Wellons), a bijection of 32-bit words.
CHIP_EXT_HD inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352DU;
  x ^= x >> 15;
  x *= 0x846CA68BU;
  return x ^ (x >> 16);
}

// Row n >= 1 of the image with global index `index`: its row key w and how many channels are off.
struct GateRow {
  uint32_t key;
  int64_t n_off;
};

CHIP_EXT_HD inline GateRow gate_row(uint64_t base, int64_t index, int64_t n, int64_t K, double max_drop) {
  const uint64_t seed = splitmix64(base ^ static_cast<uint64_t>(index)) >> 1;  // image_seed
  const uint32_t lo = static_cast<uint32_t>(seed), hi = static_cast<uint32_t>(seed >> 32);
  const uint32_t w = mix32(mix32(lo ^ mix32(static_cast<uint32_t>(n))) ^ hi);
  const double r = static_cast<double>(mix32(w ^ 0x9E3779B9U)) * (max_drop / 4294967296.0);
  return {w, static_cast<int64_t>(rint(r * static_cast<double>(K)))};  // round half to even, as torch.round
}

// Channel k's key in a row: the round(rK) smallest keys are off. Distinct within a row (mix32 is a
// bijection), so the order needs no tie-break.
CHIP_EXT_HD inline uint32_t channel_key(uint32_t w, int64_t k) {
  return mix32(w ^ mix32(static_cast<uint32_t>(k) + 0x85EBCA6BU));
}

void check_sample_gates_inputs(const at::Tensor& gates, int64_t stride, double max_drop);

// ---- debugging aid for tests: fill freshly allocated outputs with NaN before the kernel writes ----
// With it on, any output element a kernel forgets to write is NaN, which the tests detect.
bool poison_outputs();
void set_poison_outputs(bool on);

// Which memory layout gate_pool uses for A.
enum class Layout { kNCHW, kNHWC };

// Picks the layout A is read in; A is made contiguous (NCHW) when it is neither NCHW- nor
// NHWC-dense. Returns the tensor to read (A itself or its contiguous copy).
at::Tensor gate_pool_layout(const at::Tensor& A, Layout* layout);

// Outputs of gate_pool for A (already in its read layout) and N perturbations:
// gated [B*N, K, H, W] in A's dtype and layout's memory format, z [B, N, K] float32.
// NaN-filled when poison_outputs() is on.
std::tuple<at::Tensor, at::Tensor> new_gate_pool_outputs(const at::Tensor& A, Layout layout, int64_t N);

// ---- implementations ----
std::tuple<at::Tensor, at::Tensor> gate_pool_cpu(const at::Tensor& A, const at::Tensor& gates);
void gram_accumulate_cpu(at::Tensor& G, at::Tensor& b, at::Tensor& y, at::Tensor& n,
                         at::Tensor& zs, at::Tensor& gs, const at::Tensor& a,
                         const at::Tensor& gates, const at::Tensor& h, const at::Tensor& f,
                         const at::Tensor& g);
void sample_gates_cpu(at::Tensor& gates, int64_t base, int64_t start, int64_t stride, double max_drop);

#ifdef CHIP_EXT_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> gate_pool_cuda(const at::Tensor& A, const at::Tensor& gates);
void gram_accumulate_cuda(at::Tensor& G, at::Tensor& b, at::Tensor& y, at::Tensor& n,
                          at::Tensor& zs, at::Tensor& gs, const at::Tensor& a,
                          const at::Tensor& gates, const at::Tensor& h, const at::Tensor& f,
                          const at::Tensor& g);
void sample_gates_cuda(at::Tensor& gates, int64_t base, int64_t start, int64_t stride, double max_drop);
#endif

// Byte budget for the temporaries of gram_accumulate (M_s chunks, partial products).
constexpr int64_t kGramWorkspaceBytes = int64_t(256) << 20;

}  // namespace chip_ext
