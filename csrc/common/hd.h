// CALRFT_HD marks small math functions compiled for both the host (C++ CPU kernels, g++ test
// drivers) and the device (nvcc).
#pragma once

#if defined(__CUDACC__)
#define CALRFT_HD __host__ __device__ __forceinline__
#else
#define CALRFT_HD inline
#endif
