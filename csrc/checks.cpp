// Input checks shared by both devices. Every message names the argument, what was expected and
// what was given, with the actual values.
#include "chip_ext.h"

#include <atomic>
#include <limits>
#include <sstream>

namespace chip_ext {

namespace {
std::atomic<bool> g_poison{false};

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

bool is_gate_type(at::ScalarType t) {
  return t == at::kBool || t == at::kByte || t == at::kFloat || t == at::kDouble ||
         t == at::kHalf || t == at::kBFloat16;
}

void check_same_device(const at::Tensor& ref, const char* ref_name, const at::Tensor& t,
                       const char* name) {
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device(), "; move all arguments to one device");
}

void check_dim(const at::Tensor& t, const char* name, int64_t dim, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must be a ", dim, "-D tensor ", layout, "; got shape ",
                    shape_str(t), " (", t.dim(), "-D)");
}

void check_dtype(const at::Tensor& t, const char* name, at::ScalarType want) {
  TORCH_CHECK_TYPE(t.scalar_type() == want, name, " must be ", c10::toString(want), "; got ",
                   c10::toString(t.scalar_type()));
}

void check_accumulator(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kDouble, name,
                   " is a running sum and must be float64 (float32 sums lose precision over many "
                   "images); got ",
                   c10::toString(t.scalar_type()));
  TORCH_CHECK_VALUE(t.is_contiguous(), name,
                    " is updated in place and must be contiguous; got strides ", t.strides());
}
}  // namespace

std::string shape_str(const at::Tensor& t) {
  std::ostringstream s;
  s << "[";
  for (int64_t d = 0; d < t.dim(); ++d) s << (d ? ", " : "") << t.size(d);
  s << "]";
  return s.str();
}

bool poison_outputs() { return g_poison.load(); }
void set_poison_outputs(bool on) { g_poison.store(on); }

void check_gate_pool_inputs(const at::Tensor& A, const at::Tensor& gates) {
  check_dim(A, "A", 4, "[B, K, H, W]");
  TORCH_CHECK_TYPE(is_float_type(A.scalar_type()),
                   "A must be float32, float16 or bfloat16; got ", c10::toString(A.scalar_type()));
  check_dim(gates, "gates", 3, "[B, N, K]");
  TORCH_CHECK_TYPE(is_gate_type(gates.scalar_type()),
                   "gates must be bool, uint8 or floating point; got ",
                   c10::toString(gates.scalar_type()));
  check_same_device(A, "A", gates, "gates");
  const int64_t B = A.size(0), K = A.size(1), H = A.size(2), W = A.size(3);
  TORCH_CHECK_VALUE(B >= 1, "A is an empty batch (B=0, shape ", shape_str(A),
                    "); gate_pool needs at least one image");
  TORCH_CHECK_VALUE(K >= 1 && H >= 1 && W >= 1, "A must have K, H, W >= 1; got shape ",
                    shape_str(A));
  TORCH_CHECK_VALUE(gates.size(0) == B && gates.size(2) == K, "gates must be [B, N, K] with B=", B,
                    ", K=", K, " to match A; got ", shape_str(gates));
  TORCH_CHECK_VALUE(gates.size(1) >= 1, "gates must have N >= 1 perturbations; got ",
                    shape_str(gates));
  // Each image's slab of the output is addressed with 32-bit offsets inside the CUDA kernel.
  TORCH_CHECK_VALUE(K * H * W < (int64_t(1) << 31), "A has K*H*W=", K * H * W,
                    " elements per image; at most 2^31-1 are supported");
}

void check_gram_inputs(const at::Tensor& G, const at::Tensor& b, const at::Tensor& y,
                       const at::Tensor& n, const at::Tensor& zs, const at::Tensor& gs,
                       const at::Tensor& a, const at::Tensor& gates, const at::Tensor& h,
                       const at::Tensor& f, const at::Tensor& g) {
  check_dim(a, "a", 2, "[B, K] (pooled activations)");
  check_dim(gates, "gates", 3, "[B, N, K]");
  check_dim(h, "h", 2, "[B, N] (proximity weights)");
  check_dim(f, "f", 2, "[B, C] (unperturbed scores)");
  check_dim(g, "g", 3, "[B, N, C] (perturbed scores)");
  check_dim(G, "G", 2, "[C, K(K+1)/2] (packed Gram)");
  check_dim(b, "b", 2, "[C, K]");
  check_dim(y, "y", 1, "[C]");
  check_dim(n, "n", 1, "[C]");
  check_dim(zs, "zs", 2, "[C, K] (sum of f h z)");
  check_dim(gs, "gs", 1, "[C] (sum of f h g)");

  check_dtype(a, "a", at::kFloat);
  TORCH_CHECK_TYPE(is_gate_type(gates.scalar_type()),
                   "gates must be bool, uint8 or floating point; got ",
                   c10::toString(gates.scalar_type()));
  check_dtype(h, "h", at::kFloat);
  check_dtype(f, "f", at::kFloat);
  check_dtype(g, "g", at::kFloat);
  check_accumulator(G, "G");
  check_accumulator(b, "b");
  check_accumulator(y, "y");
  check_accumulator(n, "n");
  check_accumulator(zs, "zs");
  check_accumulator(gs, "gs");

  check_same_device(G, "G", b, "b");
  check_same_device(G, "G", y, "y");
  check_same_device(G, "G", n, "n");
  check_same_device(G, "G", zs, "zs");
  check_same_device(G, "G", gs, "gs");
  check_same_device(G, "G", a, "a");
  check_same_device(G, "G", gates, "gates");
  check_same_device(G, "G", h, "h");
  check_same_device(G, "G", f, "f");
  check_same_device(G, "G", g, "g");

  const int64_t B = a.size(0), K = a.size(1);
  TORCH_CHECK_VALUE(B >= 1, "a is an empty batch (B=0, shape ", shape_str(a),
                    "); gram_accumulate needs at least one image");
  TORCH_CHECK_VALUE(K >= 1, "a must have K >= 1 channels; got shape ", shape_str(a));
  TORCH_CHECK_VALUE(gates.size(0) == B && gates.size(2) == K, "gates must be [B, N, K] with B=", B,
                    ", K=", K, " to match a; got ", shape_str(gates));
  const int64_t N = gates.size(1);
  TORCH_CHECK_VALUE(N >= 1, "gates must have N >= 1 perturbations; got ", shape_str(gates));
  TORCH_CHECK_VALUE(h.size(0) == B && h.size(1) == N, "h must be [B, N] = [", B, ", ", N,
                    "] to match gates; got ", shape_str(h));
  TORCH_CHECK_VALUE(f.size(0) == B, "f must be [B, C] with B=", B, " to match a; got ",
                    shape_str(f));
  const int64_t C = f.size(1);
  TORCH_CHECK_VALUE(C >= 1, "f must have C >= 1 classes; got shape ", shape_str(f));
  TORCH_CHECK_VALUE(g.size(0) == B && g.size(1) == N && g.size(2) == C, "g must be [B, N, C] = [",
                    B, ", ", N, ", ", C, "] to match gates and f; got ", shape_str(g));
  TORCH_CHECK_VALUE(G.size(0) == C && G.size(1) == packed_size(K), "G must be [C, K(K+1)/2] = [",
                    C, ", ", packed_size(K), "] for C=", C, ", K=", K, "; got ", shape_str(G));
  TORCH_CHECK_VALUE(b.size(0) == C && b.size(1) == K, "b must be [C, K] = [", C, ", ", K,
                    "]; got ", shape_str(b));
  TORCH_CHECK_VALUE(y.size(0) == C, "y must be [C] = [", C, "]; got ", shape_str(y));
  TORCH_CHECK_VALUE(n.size(0) == C, "n must be [C] = [", C, "]; got ", shape_str(n));
  TORCH_CHECK_VALUE(zs.size(0) == C && zs.size(1) == K, "zs must be [C, K] = [", C, ", ", K,
                    "]; got ", shape_str(zs));
  TORCH_CHECK_VALUE(gs.size(0) == C, "gs must be [C] = [", C, "]; got ", shape_str(gs));
}

at::Tensor gate_pool_layout(const at::Tensor& A, Layout* layout) {
  if (A.is_contiguous()) {
    *layout = Layout::kNCHW;
    return A;
  }
  if (A.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    *layout = Layout::kNHWC;
    return A;
  }
  *layout = Layout::kNCHW;
  return A.contiguous();
}

std::tuple<at::Tensor, at::Tensor> new_gate_pool_outputs(const at::Tensor& A, Layout layout, int64_t N) {
  const int64_t B = A.size(0), K = A.size(1), H = A.size(2), W = A.size(3);
  const auto fmt = layout == Layout::kNHWC ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor gated = at::empty({B * N, K, H, W}, A.options().memory_format(fmt));
  at::Tensor z = at::empty({B, N, K}, A.options().dtype(at::kFloat));
  if (poison_outputs()) {
    gated.fill_(std::numeric_limits<float>::quiet_NaN());
    z.fill_(std::numeric_limits<float>::quiet_NaN());
  }
  return {gated, z};
}

void check_sample_gates_inputs(const at::Tensor& gates, int64_t stride, double max_drop) {
  check_dim(gates, "gates", 3, "[B, N, K]");
  check_dtype(gates, "gates", at::kBool);
  TORCH_CHECK_VALUE(gates.is_contiguous(), "gates is filled in place and must be contiguous; got strides ",
                    gates.strides());
  TORCH_CHECK_VALUE(gates.size(1) >= 1 && gates.size(2) >= 1, "gates must be [B, N, K] with N >= 1 and K >= 1; got ",
                    shape_str(gates));
  TORCH_CHECK_VALUE(stride >= 1, "stride (between the images' global indices) must be >= 1; got ", stride);
  TORCH_CHECK_VALUE(max_drop >= 0.0 && max_drop <= 1.0, "max_drop must be in [0, 1]; got ", max_drop);
}

}  // namespace chip_ext
