// gate_pool on CUDA: channel gating fused with global average pooling.
//
// Each image is one slab of L = K*H*W elements; element e of the slab belongs to channel
//   e / HW (NCHW)   or   e % K (NHWC).
// One block owns a tile of whole channels (NCHW) or whole pixels (NHWC) of one image:
//   phase 1  per-channel sums of the tile, in a fixed order (deterministic), to `partial`;
//   phase 2  the tile is loaded into registers, VEC elements (16 bytes) at a time, and written
//            N times, gated, with 16-byte stores.
// Phase 2 re-reads the tile that phase 1 just touched, so it comes from L1/L2: A is read from
// DRAM once. A last small kernel turns the partial sums into z = gates * mean.
// When images x tiles are too few blocks to fill the GPU (small pieces of a batch), a third grid
// dimension splits the N copies into groups: group 0 also does phase 1, the others only write their
// copies (each re-reads the tile: A is read once per group, against N writes of it).
// The copies are written with streaming stores (__stcs, evict-first): nothing reads them back soon
// from L2, so they should not evict the tile being read.
// The 16-byte path needs the tile and slab offsets to be multiples of VEC and A/out aligned;
// otherwise the same kernel runs with VEC = 1.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../chip_ext.h"

namespace chip_ext {
namespace {

constexpr int kThreads = 256;
constexpr int kVecPerThread = 4;
constexpr int64_t kTileTarget = 8192;  // elements per block tile, about

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

template <typename scalar_t, typename gate_t, int VEC, bool NHWC>
__global__ void gate_pool_kernel(const scalar_t* __restrict__ A, const gate_t* __restrict__ gates,
                                 scalar_t* __restrict__ out, float* __restrict__ partial,
                                 int N, int K, int HW, int units_per_tile, int tiles_per_image,
                                 int copies_per_block) {
  const int b = blockIdx.y;
  const int n_begin = int(blockIdx.z) * copies_per_block;
  const int n_end = min(N, n_begin + copies_per_block);
  const int tile = blockIdx.x;
  const uint32_t L = uint32_t(K) * uint32_t(HW);
  const scalar_t* A_img = A + int64_t(b) * L;
  const gate_t* gates_b = gates + int64_t(b) * N * K;

  // ---- phase 1: per-channel sums of the tile (the first group of copies only; uniform per block) ----
  if (blockIdx.z != 0) {
    // the partial sums are another block's work
  } else if (!NHWC) {
    // tile = channels [c0, c1).
    const int c0 = tile * units_per_tile, c1 = min(K, c0 + units_per_tile);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (c1 - c0 >= kThreads / 32) {
      // Small planes, many per tile: one warp per channel, lanes stride over the plane.
      for (int c = c0 + warp; c < c1; c += kThreads / 32) {
        const scalar_t* plane = A_img + uint32_t(c) * uint32_t(HW);
        float s = 0.f;
        for (int i = lane; i < HW; i += 32) s += static_cast<float>(plane[i]);
        for (int off = 16; off > 0; off /= 2) s += __shfl_down_sync(0xffffffffu, s, off);
        if (lane == 0) partial[int64_t(b) * K + c] = s;
      }
    } else {
      // Large planes, few per tile: the whole block reduces each plane (fixed order).
      __shared__ float warp_sums[kThreads / 32];
      for (int c = c0; c < c1; ++c) {
        const scalar_t* plane = A_img + uint32_t(c) * uint32_t(HW);
        float s = 0.f;
        for (int i = threadIdx.x; i < HW; i += kThreads) s += static_cast<float>(plane[i]);
        for (int off = 16; off > 0; off /= 2) s += __shfl_down_sync(0xffffffffu, s, off);
        if (lane == 0) warp_sums[warp] = s;
        __syncthreads();
        if (threadIdx.x == 0) {
          float t = 0.f;
          for (int w = 0; w < kThreads / 32; ++w) t += warp_sums[w];
          partial[int64_t(b) * K + c] = t;
        }
        __syncthreads();
      }
    }
  } else {
    // tile = pixels [p0, p1); threads over channels (coalesced), loop over the tile's pixels.
    const int p0 = tile * units_per_tile, p1 = min(HW, p0 + units_per_tile);
    float* dst = partial + (int64_t(b) * tiles_per_image + tile) * K;
    for (int c = threadIdx.x; c < K; c += kThreads) {
      float s = 0.f;
      for (int p = p0; p < p1; ++p) s += static_cast<float>(A_img[uint32_t(p) * uint32_t(K) + c]);
      dst[c] = s;
    }
  }

  // ---- phase 2: N gated copies of the tile ----
  const uint32_t unit = NHWC ? uint32_t(K) : uint32_t(HW);  // elements per channel/pixel unit
  const uint32_t start = uint32_t(tile) * uint32_t(units_per_tile) * unit;
  const uint32_t end = min(L, start + uint32_t(units_per_tile) * unit);
  constexpr uint32_t step = kThreads * VEC;
  using V = Vec<scalar_t, VEC>;
  for (uint32_t base = start + threadIdx.x * VEC; base < end; base += step * kVecPerThread) {
    V r[kVecPerThread];
    uint32_t ch[kVecPerThread];     // channel of the vector's first element
    uint32_t split[kVecPerThread];  // index inside the vector where the channel changes (VEC: none)
#pragma unroll
    for (int j = 0; j < kVecPerThread; ++j) {
      const uint32_t e = base + j * step;
      if (e < end) {
        r[j] = *reinterpret_cast<const V*>(A_img + e);
        if (NHWC) {
          ch[j] = e % uint32_t(K);
          split[j] = min(uint32_t(VEC), uint32_t(K) - ch[j]);
        } else {
          ch[j] = e / uint32_t(HW);
          split[j] = min(uint32_t(VEC), uint32_t(HW) - (e - ch[j] * uint32_t(HW)));
        }
      }
    }
    for (int nn = n_begin; nn < n_end; ++nn) {
      const gate_t* gn = gates_b + int64_t(nn) * K;
      scalar_t* out_n = out + (int64_t(b) * N + nn) * L;
#pragma unroll
      for (int j = 0; j < kVecPerThread; ++j) {
        const uint32_t e = base + j * step;
        if (e < end) {
          // NHWC: consecutive elements are consecutive channels (wrapping at K to the next pixel).
          // NCHW: at most two channels in one vector, the second starting at split.
          V w;
          if (NHWC) {
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
              uint32_t c = ch[j] + i;
              if (c >= uint32_t(K)) c -= uint32_t(K);
              w.v[i] = static_cast<scalar_t>(static_cast<float>(r[j].v[i]) * static_cast<float>(gn[c]));
            }
          } else {
            // the vector's (at most) two gates, read once each rather than once per element
            const float g0 = static_cast<float>(gn[ch[j]]);
            const float g1 = split[j] < uint32_t(VEC) ? static_cast<float>(gn[ch[j] + 1]) : g0;
#pragma unroll
            for (int i = 0; i < VEC; ++i)
              w.v[i] = static_cast<scalar_t>(static_cast<float>(r[j].v[i]) * (uint32_t(i) < split[j] ? g0 : g1));
          }
          if constexpr (sizeof(V) == 16) {
            __stcs(reinterpret_cast<int4*>(out_n + e), *reinterpret_cast<const int4*>(&w));
          } else {
            *reinterpret_cast<V*>(out_n + e) = w;
          }
        }
      }
    }
  }
}

// z[b,n,k] = gates[b,n,k] * (sum over tiles of partial[b,t,k]) / HW
template <typename gate_t>
__global__ void write_z_kernel(const gate_t* __restrict__ gates, const float* __restrict__ partial,
                               float* __restrict__ z, int N, int K, int HW, int tiles) {
  const int64_t total = int64_t(gridDim.y) * N * K;
  const int b = blockIdx.y;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < int64_t(N) * K;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int k = int(i % K);
    float s = 0.f;
    for (int t = 0; t < tiles; ++t) s += partial[(int64_t(b) * tiles + t) * K + k];
    const int64_t idx = int64_t(b) * N * K + i;
    z[idx] = static_cast<float>(gates[idx]) * (s / float(HW));
  }
  (void)total;
}

int64_t gcd64(int64_t x, int64_t y) {
  while (y) {
    const int64_t t = x % y;
    x = y;
    y = t;
  }
  return x;
}

template <typename scalar_t, typename gate_t>
void launch(const at::Tensor& A, Layout layout, const at::Tensor& gates, at::Tensor& out,
            at::Tensor& z) {
  const int B = int(A.size(0)), K = int(A.size(1)), HW = int(A.size(2) * A.size(3));
  const int N = int(gates.size(1));
  const bool nhwc = layout == Layout::kNHWC;
  const int64_t unit = nhwc ? K : HW;      // elements of one channel plane / one pixel
  const int64_t units = nhwc ? HW : K;     // planes / pixels per image
  constexpr int VEC = 16 / sizeof(scalar_t);

  // Tile: a whole number of units, about kTileTarget elements; for the 16-byte path its length
  // must be a multiple of VEC so every tile starts aligned.
  int64_t per_tile = std::max<int64_t>(1, kTileTarget / unit);
  const int64_t align_units = VEC / gcd64(unit, VEC);
  per_tile = ((per_tile + align_units - 1) / align_units) * align_units;
  per_tile = std::min(per_tile, units);
  const int64_t tiles = (units + per_tile - 1) / per_tile;
  const int64_t L = int64_t(K) * HW;
  // A vector may straddle at most two units (NCHW) or one wrap at K (NHWC): needs unit >= VEC.
  const bool aligned = (unit >= VEC) && (L % VEC == 0) && ((per_tile * unit) % VEC == 0) &&
                       (reinterpret_cast<uintptr_t>(A.const_data_ptr()) % 16 == 0) &&
                       (reinterpret_cast<uintptr_t>(out.const_data_ptr()) % 16 == 0);

  const int64_t partial_rows = nhwc ? tiles : 1;
  at::Tensor partial = at::empty({B, partial_rows, K}, A.options().dtype(at::kFloat));
  auto stream = at::cuda::getCurrentCUDAStream();
  // Copy groups: enough blocks for about 4 per SM, at least 4 copies per group.
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = tiles * int64_t(B);
  int64_t groups = std::min<int64_t>((4 * sms + blocks - 1) / blocks, (int64_t(N) + 3) / 4);
  groups = std::max<int64_t>(1, groups);
  const int64_t copies_per_block = (int64_t(N) + groups - 1) / groups;
  groups = (int64_t(N) + copies_per_block - 1) / copies_per_block;
  const dim3 grid{unsigned(tiles), unsigned(B), unsigned(groups)};
  const auto* a_ptr = A.const_data_ptr<scalar_t>();
  const auto* g_ptr = gates.const_data_ptr<gate_t>();
  auto* o_ptr = out.mutable_data_ptr<scalar_t>();
  auto* p_ptr = partial.mutable_data_ptr<float>();

#define CHIP_LAUNCH(V, CL)                                                                  \
  gate_pool_kernel<scalar_t, gate_t, V, CL><<<grid, kThreads, 0, stream>>>(                 \
      a_ptr, g_ptr, o_ptr, p_ptr, N, K, HW, int(per_tile), int(tiles), int(copies_per_block))
  if (aligned) {
    if (nhwc) CHIP_LAUNCH(VEC, true); else CHIP_LAUNCH(VEC, false);
  } else {
    if (nhwc) CHIP_LAUNCH(1, true); else CHIP_LAUNCH(1, false);
  }
#undef CHIP_LAUNCH
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const int64_t nk = int64_t(N) * K;
  const dim3 zgrid{unsigned(std::min<int64_t>((nk + 255) / 256, 1024)), unsigned(B), 1u};
  write_z_kernel<gate_t><<<zgrid, 256, 0, stream>>>(g_ptr, p_ptr, z.mutable_data_ptr<float>(), N,
                                                    K, HW, int(partial_rows));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void dispatch_gate(const at::Tensor& A, Layout layout, const at::Tensor& gates, at::Tensor& out,
                   at::Tensor& z) {
  switch (gates.scalar_type()) {
    case at::kBool:  // one byte holding 0 or 1
    case at::kByte:
      launch<scalar_t, uint8_t>(A, layout,
                                gates.scalar_type() == at::kBool ? gates.view(at::kByte) : gates,
                                out, z);
      break;
    case at::kFloat:
      launch<scalar_t, float>(A, layout, gates, out, z);
      break;
    default:  // float64 / float16 / bfloat16 gates: read as float32
      launch<scalar_t, float>(A, layout, gates.to(at::kFloat), out, z);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gate_pool_cuda(const at::Tensor& A_in, const at::Tensor& gates_in) {
  check_gate_pool_inputs(A_in, gates_in);
  TORCH_CHECK(A_in.is_cuda(), "gate_pool_cuda: A is on ", A_in.device());
  const c10::cuda::CUDAGuard guard(A_in.device());
  Layout layout;
  const at::Tensor A = gate_pool_layout(A_in, &layout);
  const at::Tensor gates = gates_in.contiguous();
  const int64_t B = A.size(0), K = A.size(1), N = gates.size(1);
  TORCH_CHECK_VALUE(B <= 65535, "gate_pool on CUDA takes at most 65535 images per call; got B=", B);
  TORCH_CHECK_VALUE(B * N * K < (int64_t(1) << 31) && N < (int64_t(1) << 31),
                    "gate_pool: B*N*K=", B * N * K, " is too large for one call; split the batch");
  auto [out, z] = new_gate_pool_outputs(A, layout, gates.size(1));
  switch (A.scalar_type()) {
    case at::kFloat: dispatch_gate<float>(A, layout, gates, out, z); break;
    case at::kHalf: dispatch_gate<at::Half>(A, layout, gates, out, z); break;
    case at::kBFloat16: dispatch_gate<at::BFloat16>(A, layout, gates, out, z); break;
    default: TORCH_CHECK(false, "unreachable: A dtype ", A.scalar_type());
  }
  return {out, z};
}

TORCH_LIBRARY_IMPL(chip_ext, CUDA, m) { m.impl("gate_pool", &gate_pool_cuda); }

}  // namespace chip_ext
