// Centred batch covariance on CUDA: Sigma = Zc^T Zc / (B - correction), Zc = Z - mean(Z).
//
// Two passes, because the one-pass (Z^T Z - B m m^T) cancels catastrophically in fp32 when the
// feature mean is large against the spread (docs: shared spec kernels.md section 2):
//   1. column_sum_kernel + mean_from_partials_kernel: the mean, from per-chunk partial sums
//      combined in a fixed order (deterministic);
//   2. centred_gram_kernel: Zc^T Zc over the upper-triangular tile pairs only (Sigma is
//      symmetric), subtracting the mean while it stages each tile in shared memory - no centred
//      copy of Z exists - and converting fp16/bf16 to fp32 in the same load. The rows are split
//      into chunks (split-K) so that the few tile pairs of d = 512 still fill the GPU; each
//      (pair, chunk) block writes a partial tile and covariance_from_partials_kernel sums them in
//      a fixed order, scales, and mirrors the upper triangle into the lower one.
// Arithmetic is fp32 FMA on the CUDA cores (fp64 for fp64 input): the centred values keep their
// full fp32 precision, which is this kernel's point next to the Triton one (16-bit tensor-core
// operands, calrft_kernels/triton/covariance.py). All index maths is in covariance_tiles.cuh,
// which the CPU tests compile and check.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <tuple>

#include "common/registry.h"
#include "covariance_tiles.cuh"

namespace calrft {
namespace {

using namespace covariance;

template <typename scalar_t>
struct Accumulate {
  using type = float;
};
template <>
struct Accumulate<double> {
  using type = double;
};

// Four consecutive values as vector accesses (16-byte aligned by construction: micro_offset
// is a multiple of 4 and every tile row starts on a multiple of kTile elements).
__device__ __forceinline__ void load4(const float* src, float* dst) {
  const float4 v = *reinterpret_cast<const float4*>(src);
  dst[0] = v.x, dst[1] = v.y, dst[2] = v.z, dst[3] = v.w;
}
__device__ __forceinline__ void load4(const double* src, double* dst) {
  const double2 lo = *reinterpret_cast<const double2*>(src);
  const double2 hi = *reinterpret_cast<const double2*>(src + 2);
  dst[0] = lo.x, dst[1] = lo.y, dst[2] = hi.x, dst[3] = hi.y;
}
__device__ __forceinline__ void store4(float* dst, const float* src) {
  *reinterpret_cast<float4*>(dst) = make_float4(src[0], src[1], src[2], src[3]);
}
__device__ __forceinline__ void store4(double* dst, const double* src) {
  *reinterpret_cast<double2*>(dst) = make_double2(src[0], src[1]);
  *reinterpret_cast<double2*>(dst + 2) = make_double2(src[2], src[3]);
}

// ---- Pass 1: the mean ----------------------------------------------------------------------

// partial[chunk][c] = sum of z[r][c] over the rows of chunk blockIdx.y. Block: kSumCols columns
// (a warp reads a contiguous row segment) x kSumRows interleaved rows, reduced in shared memory.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kSumCols* kSumRows)
    column_sum_kernel(const scalar_t* __restrict__ z, int64_t n_rows, int64_t n_cols,
                      int64_t stride_row, int64_t stride_col, int64_t rows_per_chunk,
                      acc_t* __restrict__ partial) {
  __shared__ acc_t row_group_sums[kSumRows][kSumCols];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kSumCols + threadIdx.x;
  const int64_t row_start = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t row_end = min64(row_start + rows_per_chunk, n_rows);
  acc_t sum = 0;
  if (col < n_cols) {
    const scalar_t* column = z + col * stride_col;
    for (int64_t r = row_start + threadIdx.y; r < row_end; r += kSumRows) {
      sum += static_cast<acc_t>(column[r * stride_row]);
    }
  }
  row_group_sums[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && col < n_cols) {
    for (int y = 1; y < kSumRows; ++y) sum += row_group_sums[y][threadIdx.x];
    partial[static_cast<int64_t>(blockIdx.y) * n_cols + col] = sum;
  }
}

template <typename acc_t>
__global__ void mean_from_partials_kernel(const acc_t* __restrict__ partial, int64_t chunks,
                                          int64_t n_cols, int64_t n_rows,
                                          acc_t* __restrict__ mean) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= n_cols) return;
  acc_t sum = 0;
  for (int64_t chunk = 0; chunk < chunks; ++chunk) sum += partial[chunk * n_cols + col];
  mean[col] = sum / static_cast<acc_t>(n_rows);
}

// ---- Pass 2: Zc^T Zc on upper-triangular tile pairs ---------------------------------------

// This thread's kLoadsPerThread values of the stage starting at row r0, for its one column:
// converted to acc_t and centred here. Rows past the chunk (and a column past d) give exactly
// 0 - not -mean - so ragged edges add nothing to the sums.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_centred_stage(const scalar_t* __restrict__ column,
                                                   bool column_ok, acc_t column_mean,
                                                   int64_t r0, int64_t row_end,
                                                   int64_t stride_row, int tid,
                                                   acc_t (&values)[kLoadsPerThread]) {
#pragma unroll
  for (int slot = 0; slot < kLoadsPerThread; ++slot) {
    const int64_t r = r0 + stage_row(tid, slot);
    values[slot] = (column_ok && r < row_end)
                       ? static_cast<acc_t>(column[r * stride_row]) - column_mean
                       : acc_t(0);
  }
}

// Block (pair, chunk): workspace[chunk][pair] = sum over the chunk's rows r of
// Zc[r, tile i]^T Zc[r, tile j] (a kTile x kTile partial, unscaled).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    centred_gram_kernel(const scalar_t* __restrict__ z, const acc_t* __restrict__ mean,
                        int64_t n_rows, int64_t n_cols, int64_t stride_row, int64_t stride_col,
                        int64_t rows_per_chunk, int64_t pairs, acc_t* __restrict__ workspace) {
  // stage[0]: kStageRows rows of Zc restricted to tile i's columns; stage[1]: to tile j's.
  // A diagonal pair (i == j) loads and reads stage[0] only.
  __shared__ __align__(16) acc_t stage[2][kStageRows][kTile];

  const int tid = threadIdx.x;
  const TilePair tiles = upper_tile_pair(blockIdx.x);
  const bool diagonal = tiles.i == tiles.j;
  const int b_stage = diagonal ? 0 : 1;
  const int64_t row_start = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t row_end = min64(row_start + rows_per_chunk, n_rows);

  // Each thread stages one fixed column of each operand: its mean stays in a register.
  const int load_col = stage_column(tid);
  const int64_t col_a = tiles.i * kTile + load_col;
  const int64_t col_b = tiles.j * kTile + load_col;
  const bool ok_a = col_a < n_cols;
  const bool ok_b = col_b < n_cols;
  const acc_t mean_a = ok_a ? mean[col_a] : acc_t(0);
  const acc_t mean_b = ok_b ? mean[col_b] : acc_t(0);
  const scalar_t* column_a = z + (ok_a ? col_a : 0) * stride_col;
  const scalar_t* column_b = z + (ok_b ? col_b : 0) * stride_col;

  acc_t next_a[kLoadsPerThread];
  acc_t next_b[kLoadsPerThread];
  load_centred_stage(column_a, ok_a, mean_a, row_start, row_end, stride_row, tid, next_a);
  if (!diagonal) {
    load_centred_stage(column_b, ok_b, mean_b, row_start, row_end, stride_row, tid, next_b);
  }

  const int micro_r = micro_row_thread(tid);
  const int micro_c = micro_col_thread(tid);
  acc_t acc[kMicro][kMicro];
#pragma unroll
  for (int x = 0; x < kMicro; ++x) {
#pragma unroll
    for (int y = 0; y < kMicro; ++y) acc[x][y] = acc_t(0);
  }

  for (int64_t r0 = row_start; r0 < row_end; r0 += kStageRows) {
#pragma unroll
    for (int slot = 0; slot < kLoadsPerThread; ++slot) {
      stage[0][stage_row(tid, slot)][load_col] = next_a[slot];
      if (!diagonal) stage[1][stage_row(tid, slot)][load_col] = next_b[slot];
    }
    __syncthreads();
    // The next stage's global loads are in flight while this stage is multiplied.
    if (r0 + kStageRows < row_end) {
      load_centred_stage(column_a, ok_a, mean_a, r0 + kStageRows, row_end, stride_row, tid,
                         next_a);
      if (!diagonal) {
        load_centred_stage(column_b, ok_b, mean_b, r0 + kStageRows, row_end, stride_row, tid,
                           next_b);
      }
    }
#pragma unroll
    for (int k = 0; k < kStageRows; ++k) {
      acc_t a[kMicro];
      acc_t b[kMicro];
      load4(&stage[0][k][micro_offset(micro_r, 0)], a);
      load4(&stage[0][k][micro_offset(micro_r, 4)], a + 4);
      load4(&stage[b_stage][k][micro_offset(micro_c, 0)], b);
      load4(&stage[b_stage][k][micro_offset(micro_c, 4)], b + 4);
#pragma unroll
      for (int x = 0; x < kMicro; ++x) {
#pragma unroll
        for (int y = 0; y < kMicro; ++y) acc[x][y] = fma(a[x], b[y], acc[x][y]);
      }
    }
    __syncthreads();  // the stage is overwritten next iteration
  }

#pragma unroll
  for (int x = 0; x < kMicro; ++x) {
    const int p = micro_offset(micro_r, x);
    store4(workspace + workspace_offset(blockIdx.y, pairs, blockIdx.x, p, micro_offset(micro_c, 0)),
           acc[x]);
    store4(workspace + workspace_offset(blockIdx.y, pairs, blockIdx.x, p, micro_offset(micro_c, 4)),
           acc[x] + 4);
  }
}

// Sigma[r][c] = (sum over chunks of the upper-triangle partial) / denominator. (r, c) and (c, r)
// read the same partials in the same order: Sigma is exactly symmetric.
template <typename acc_t>
__global__ void covariance_from_partials_kernel(const acc_t* __restrict__ workspace,
                                                int64_t chunks, int64_t pairs, int64_t n_cols,
                                                acc_t denominator, acc_t* __restrict__ cov) {
  const int64_t chunk_stride = pairs * kTile * kTile;
  const int64_t total = n_cols * n_cols;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += step) {
    const int64_t src = mirrored_source(e / n_cols, e % n_cols, pairs);
    acc_t sum = 0;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) sum += workspace[chunk * chunk_stride + src];
    cov[e] = sum / denominator;
  }
}

constexpr int kElementwiseThreads = 256;

std::tuple<at::Tensor, at::Tensor> covariance_cuda(const at::Tensor& z, int64_t correction) {
  // Shape, dtype and correction first, the device last: the CPU tests reach every check.
  TORCH_CHECK_VALUE(z.dim() == 2, "covariance_cuda: z must be 2-D [B, d], got ", z.dim(), " dims");
  const auto dtype = z.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 ||
                       dtype == at::kDouble,
                   "covariance_cuda: z must be float16, bfloat16, float32 or float64, got ", dtype);
  const int64_t n_rows = z.size(0);
  const int64_t n_cols = z.size(1);
  TORCH_CHECK_VALUE(n_rows >= 1 && n_cols >= 1,
                    "covariance_cuda: z must have at least one row and one column, got [", n_rows,
                    ", ", n_cols, "]");
  TORCH_CHECK_VALUE(correction >= 0 && n_rows - correction > 0,
                    "covariance_cuda: correction must satisfy 0 <= correction < B = ", n_rows,
                    ", got ", correction);
  TORCH_CHECK_VALUE(z.is_cuda(), "covariance_cuda: z must be a CUDA tensor, got ", z.device());

  const c10::cuda::CUDAGuard guard(z.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const auto acc_options = z.options().dtype(dtype == at::kDouble ? at::kDouble : at::kFloat);

  const int64_t col_blocks = ceil_div(n_cols, kSumCols);
  const RowChunks sum_chunks = plan_sum_chunks(n_rows, col_blocks, sms);
  const int64_t pairs = tile_pair_count(ceil_div(n_cols, kTile));
  const RowChunks gram_chunks = plan_gram_chunks(n_rows, pairs, sms);
  TORCH_CHECK_VALUE(pairs <= INT32_MAX, "covariance_cuda: d = ", n_cols, " is too large");

  at::Tensor sum_partial = at::empty({sum_chunks.count, n_cols}, acc_options);
  at::Tensor mean = at::empty({n_cols}, acc_options);
  at::Tensor workspace = at::empty({gram_chunks.count, pairs, kTile, kTile}, acc_options);
  at::Tensor cov = at::empty({n_cols, n_cols}, acc_options);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "covariance_cuda", [&] {
    using acc_t = typename Accumulate<scalar_t>::type;
    const scalar_t* z_data = z.const_data_ptr<scalar_t>();
    acc_t* partial_data = sum_partial.mutable_data_ptr<acc_t>();
    acc_t* mean_data = mean.mutable_data_ptr<acc_t>();
    acc_t* workspace_data = workspace.mutable_data_ptr<acc_t>();

    column_sum_kernel<scalar_t, acc_t>
        <<<dim3(col_blocks, sum_chunks.count), dim3(kSumCols, kSumRows), 0, stream>>>(
            z_data, n_rows, n_cols, z.stride(0), z.stride(1), sum_chunks.rows, partial_data);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    mean_from_partials_kernel<acc_t>
        <<<ceil_div(n_cols, kElementwiseThreads), kElementwiseThreads, 0, stream>>>(
            partial_data, sum_chunks.count, n_cols, n_rows, mean_data);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    centred_gram_kernel<scalar_t, acc_t>
        <<<dim3(pairs, gram_chunks.count), kThreads, 0, stream>>>(
            z_data, mean_data, n_rows, n_cols, z.stride(0), z.stride(1), gram_chunks.rows, pairs,
            workspace_data);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    const int64_t blocks = min64(ceil_div(n_cols * n_cols, kElementwiseThreads), 32 * sms);
    covariance_from_partials_kernel<acc_t><<<blocks, kElementwiseThreads, 0, stream>>>(
        workspace_data, gram_chunks.count, pairs, n_cols,
        static_cast<acc_t>(n_rows - correction), cov.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {cov, mean};
}

}  // namespace

void register_covariance_cuda(pybind11::module_& m) {
  m.def("covariance_cuda", &covariance_cuda, pybind11::arg("z"), pybind11::arg("correction") = 1,
        "Centred covariance of the rows of a CUDA tensor z [B, d] (fp16/bf16/fp32/fp64): returns "
        "(Sigma [d, d], mean [d]), fp32 (fp64 for fp64 input); two-pass accurate, mean "
        "subtracted in the tile loads, upper-triangular tiles mirrored.");
}

}  // namespace calrft
