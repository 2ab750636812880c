// gram_accumulate on CUDA.
//
// For a chunk of images s (temporaries bounded by kGramWorkspaceBytes, or a quarter of G's bytes if more):
//   M_s = pack_triu((D_s^T diag(h_s) D_s) ⊙ a_s a_s^T)   weighted_gram_kernel, float32   [Bc, P]
//   G  += F^T M                                          float64 GEMM straight into the sums
//   b  += U^T Z,  n += F^T sum_n h,  zs += F^T (sum_n h_sn z_sn)     float64 GEMM/GEMV
//   y  += sum U ⊙ g,  gs += sum U                                    float32 reductions, added in float64
// The GEMMs run in float64, not float32 with TF32 switched off: the TF32 switch is process-wide
// (another thread's matmul would change precision), and on the GPUs we target (H100/H200, A100)
// float64 GEMMs run at the float32 non-TF32 rate.
// All on the current stream; launch errors checked.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../chip_ext.h"

namespace chip_ext {
namespace {

constexpr int kTile = 32;  // output tile kTile x kTile of the K x K matrix
constexpr int kStage = 16; // perturbations per shared-memory stage

// M[s, packed(i,j)] = a_si a_sj sum_n h_sn d_sni d_snj, for the upper-triangle tiles (ti <= tj).
// grid = (number of upper tiles, Bc), block = 16 x 16 threads, 2 x 2 outputs per thread.
__global__ void weighted_gram_kernel(const float* __restrict__ d, const float* __restrict__ h,
                                     const float* __restrict__ a, float* __restrict__ M, int N,
                                     int K, int ntiles) {
  const int s = blockIdx.y;
  int t = blockIdx.x, ti = 0, row_len = ntiles;
  while (t >= row_len) {
    t -= row_len;
    ++ti;
    --row_len;
  }
  const int tj = ti + t;
  const int i0 = ti * kTile, j0 = tj * kTile;
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * 16 + tx;

  __shared__ float si[kStage][kTile];  // h_n * d_n,i
  __shared__ float sj[kStage][kTile];  // d_n,j
  const float* ds = d + int64_t(s) * N * K;
  const float* hs = h + int64_t(s) * N;
  float acc[2][2] = {{0.f, 0.f}, {0.f, 0.f}};

  for (int n0 = 0; n0 < N; n0 += kStage) {
    for (int l = tid; l < kStage * kTile; l += 256) {
      const int nn = l / kTile, c = l % kTile, n = n0 + nn;
      const bool ok = n < N;
      const float hv = ok ? hs[n] : 0.f;
      si[nn][c] = (ok && i0 + c < K) ? ds[int64_t(n) * K + i0 + c] * hv : 0.f;
      sj[nn][c] = (ok && j0 + c < K) ? ds[int64_t(n) * K + j0 + c] : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int nn = 0; nn < kStage; ++nn) {
      const float x0 = si[nn][ty], x1 = si[nn][ty + 16];
      const float y0 = sj[nn][tx], y1 = sj[nn][tx + 16];
      acc[0][0] += x0 * y0;
      acc[0][1] += x0 * y1;
      acc[1][0] += x1 * y0;
      acc[1][1] += x1 * y1;
    }
    __syncthreads();
  }

  const int64_t P = int64_t(K) * (K + 1) / 2;
  const float* as = a + int64_t(s) * K;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const int i = i0 + ty + 16 * r, j = j0 + tx + 16 * q;
      if (i < K && j < K && j >= i)
        M[int64_t(s) * P + packed_index(i, j, K)] = acc[r][q] * as[i] * as[j];
    }
  }
}

}  // namespace

void gram_accumulate_cuda(at::Tensor& G, at::Tensor& b, at::Tensor& y, at::Tensor& n,
                          at::Tensor& zs, at::Tensor& gs, const at::Tensor& a_in,
                          const at::Tensor& gates_in, const at::Tensor& h_in, const at::Tensor& f_in,
                          const at::Tensor& g_in) {
  check_gram_inputs(G, b, y, n, zs, gs, a_in, gates_in, h_in, f_in, g_in);
  TORCH_CHECK(G.is_cuda(), "gram_accumulate_cuda: G is on ", G.device());
  const c10::cuda::CUDAGuard guard(G.device());
  const int64_t B = a_in.size(0), K = a_in.size(1), N = gates_in.size(1), C = f_in.size(1);
  const int64_t P = packed_size(K);
  TORCH_CHECK_VALUE(K <= 46340, "gram_accumulate: K=", K, " is too large (K^2 must fit in 31 bits)");

  // bytes of temporaries per image: M (float32 and float64), d, Z (both), U (both), U*g, f (float64).
  // Every chunk reads and writes all of G ([C, P] float64) once in G += F^T M, a GEMM whose inner
  // dimension is the chunk: with few images per chunk it is bound by G's traffic, not arithmetic
  // (ResNet-50 layer4, C=1000: G is 16.8 GB; 256 MiB gave chunks of 8 images, 8 passes over G for 64
  // images, 87 ms on an H200). So the workspace grows with G, up to a quarter of G's own size.
  const int64_t per_image = 12 * P + 16 * N * K + 16 * N * C + 8 * C;
  const int64_t workspace = std::max<int64_t>(kGramWorkspaceBytes, G.numel() * int64_t(sizeof(double)) / 4);
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>({B, workspace / per_image, 65535}));
  const int ntiles = int((K + kTile - 1) / kTile);
  const int64_t tile_pairs = int64_t(ntiles) * (ntiles + 1) / 2;
  auto stream = at::cuda::getCurrentCUDAStream();

  for (int64_t s0 = 0; s0 < B; s0 += chunk) {
    const int64_t bc = std::min(chunk, B - s0);
    const at::Tensor a = a_in.narrow(0, s0, bc).contiguous();                      // [bc, K]
    const at::Tensor d = gates_in.narrow(0, s0, bc).to(at::kFloat).contiguous();   // [bc, N, K]
    const at::Tensor h = h_in.narrow(0, s0, bc).contiguous();                      // [bc, N]
    const at::Tensor f = f_in.narrow(0, s0, bc).contiguous();                      // [bc, C]
    const at::Tensor g = g_in.narrow(0, s0, bc).contiguous();                      // [bc, N, C]

    at::Tensor M = at::empty({bc, P}, a.options());
    if (poison_outputs()) M.fill_(std::numeric_limits<float>::quiet_NaN());
    weighted_gram_kernel<<<dim3(unsigned(tile_pairs), unsigned(bc)), dim3(16, 16), 0, stream>>>(
        d.const_data_ptr<float>(), h.const_data_ptr<float>(), a.const_data_ptr<float>(),
        M.mutable_data_ptr<float>(), int(N), int(K), ntiles);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    const at::Tensor ft = f.t().to(at::kDouble);  // [C, bc]
    G.addmm_(ft, M.to(at::kDouble));

    const at::Tensor U = (g * h.unsqueeze(2) * f.unsqueeze(1)).reshape({bc * N, C});
    const at::Tensor Z = (d * a.unsqueeze(1)).reshape({bc * N, K});
    b.addmm_(U.t().to(at::kDouble), Z.to(at::kDouble));
    y.add_((U * g.reshape({bc * N, C})).sum(0));
    n.addmv_(ft, h.sum(1).to(at::kDouble));
    zs.addmm_(ft, ((d * h.unsqueeze(2)).sum(1) * a).to(at::kDouble));
    gs.add_(U.sum(0));
  }
}

TORCH_LIBRARY_IMPL(chip_ext, CUDA, m) { m.impl("gram_accumulate", &gram_accumulate_cuda); }

}  // namespace chip_ext
