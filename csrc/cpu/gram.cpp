// gram_accumulate on the CPU, all in float64.
//
// For a chunk of images s (sized so the temporaries stay under kGramWorkspaceBytes):
//   Q_s = D_s^T diag(h_s) D_s                    batched GEMM   [Bc, K, K]
//   M_s = pack_triu(Q_s ⊙ a_s a_s^T)             parallel_for   [Bc, K(K+1)/2]
//   G  += F^T M                                  one GEMM       [C, Bc] x [Bc, P]
//   b  += U^T Z,  U[(s,n),c] = f_sc h_sn g_snc,  Z[(s,n),k] = d_snk a_sk     one GEMM
//   y  += sum_(s,n) U ⊙ g,    n += F^T (sum_n h_sn)
//   zs += F^T (sum_n h_sn z_sn),  gs += sum_(s,n) U      (first moments, for an intercept)
// No loop over classes or perturbations: those dimensions live inside GEMMs.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../chip_ext.h"

namespace chip_ext {
namespace {

// M[s, packed(i, j)] = Q[s, i, j] * a[s, i] * a[s, j] for i <= j.
void pack_weighted(const double* Q, const double* a, double* M, int64_t Bc, int64_t K) {
  const int64_t P = packed_size(K);
  at::parallel_for(0, Bc * K, std::max<int64_t>(1, 16384 / K), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task / K, i = task % K;
      const double* q = Q + (s * K + i) * K;
      const double* as = a + s * K;
      double* m = M + s * P + packed_index(i, i, K);
      const double ai = as[i];
      for (int64_t j = i; j < K; ++j) m[j - i] = q[j] * ai * as[j];
    }
  });
}

}  // namespace

void gram_accumulate_cpu(at::Tensor& G, at::Tensor& b, at::Tensor& y, at::Tensor& n,
                         at::Tensor& zs, at::Tensor& gs, const at::Tensor& a_in,
                         const at::Tensor& gates_in, const at::Tensor& h_in, const at::Tensor& f_in,
                         const at::Tensor& g_in) {
  check_gram_inputs(G, b, y, n, zs, gs, a_in, gates_in, h_in, f_in, g_in);
  TORCH_CHECK(G.device().is_cpu(), "gram_accumulate_cpu: G is on ", G.device());
  const int64_t B = a_in.size(0), K = a_in.size(1), N = gates_in.size(1), C = f_in.size(1);
  const int64_t P = packed_size(K);

  // float64 bytes of temporaries per image: Q, M, d, dh, Z, g, U, U*g.
  const int64_t per_image = 8 * (K * K + P + 3 * N * K + 3 * N * C + C);
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(B, kGramWorkspaceBytes / per_image));
  const auto f64 = at::TensorOptions().dtype(at::kDouble).device(at::kCPU);

  for (int64_t s0 = 0; s0 < B; s0 += chunk) {
    const int64_t bc = std::min(chunk, B - s0);
    const at::Tensor a = a_in.narrow(0, s0, bc).to(at::kDouble).contiguous();     // [bc, K]
    const at::Tensor d = gates_in.narrow(0, s0, bc).to(at::kDouble).contiguous(); // [bc, N, K]
    const at::Tensor h = h_in.narrow(0, s0, bc).to(at::kDouble).contiguous();     // [bc, N]
    const at::Tensor f = f_in.narrow(0, s0, bc).to(at::kDouble).contiguous();     // [bc, C]
    const at::Tensor g = g_in.narrow(0, s0, bc).to(at::kDouble).contiguous();     // [bc, N, C]

    // G += F^T M
    const at::Tensor Q = at::bmm((d * h.unsqueeze(2)).transpose(1, 2), d).contiguous();  // [bc,K,K]
    at::Tensor M = at::empty({bc, P}, f64);
    pack_weighted(Q.const_data_ptr<double>(), a.const_data_ptr<double>(),
                  M.mutable_data_ptr<double>(), bc, K);
    G.addmm_(f.t(), M);

    // b += U^T Z
    const at::Tensor U = (g * h.unsqueeze(2) * f.unsqueeze(1)).reshape({bc * N, C});
    const at::Tensor Z = (d * a.unsqueeze(1)).reshape({bc * N, K});
    b.addmm_(U.t(), Z);

    // y += sum f h g^2,  n += sum f h
    y.add_((U * g.reshape({bc * N, C})).sum(0));
    n.addmv_(f.t(), h.sum(1));

    // zs += F^T (sum_n h_sn z_sn),  gs += sum f h g
    zs.addmm_(f.t(), at::bmm(h.unsqueeze(1), d).squeeze(1) * a);
    gs.add_(U.sum(0));
  }
}

TORCH_LIBRARY_IMPL(chip_ext, CPU, m) { m.impl("gram_accumulate", &gram_accumulate_cpu); }

}  // namespace chip_ext
