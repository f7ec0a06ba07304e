/**
 * @file nvshmem_build_options.h
 * @brief NVSHMEM's build options, then IBGDA off: what NVSHMEM 3.5+ does itself under
 *        NVRTC with all device inlining.
 *
 * Earlier releases (3.4.5 is what some GPU images ship) leave NVSHMEM_IBGDA_SUPPORT on
 * under NVRTC, and transfer_device.cuh then includes <infiniband/mlx5dv.h>, which no
 * wheel carries. The kernels use NVLink/P2P transfers only, never IBGDA. This folder
 * comes before NVSHMEM's on the include path; headers that NVSHMEM includes from its
 * own folder get the original first, which #pragma once then keeps to one copy.
 */
#pragma once
#include_next "non_abi/nvshmem_build_options.h"
#include "non_abi/nvshmem_version.h"

#define NVSHMEM_COMPAT_BEFORE_3_5 \
  (NVSHMEM_VENDOR_MAJOR_VERSION < 3 ||  \
   (NVSHMEM_VENDOR_MAJOR_VERSION == 3 && NVSHMEM_VENDOR_MINOR_VERSION < 5))

#if defined(__CUDACC_RTC__) && defined(NVSHMEM_ENABLE_ALL_DEVICE_INLINING)
#undef NVSHMEM_IBGDA_SUPPORT
#undef NVSHMEM_IBGDA_SUPPORT_GPUMEM_ONLY
#undef NVSHMEM_GPUNETIO_SUPPORT
#endif

// NVSHMEM 3.4's reduce.cuh names std::is_integral/is_signed/is_unsigned, which CCCL 13
// under NVRTC declares only in cuda::std.
#if defined(__CUDACC_RTC__) && NVSHMEM_COMPAT_BEFORE_3_5 && !defined(FMOE_NVSHMEM_STD_TRAITS)
#define FMOE_NVSHMEM_STD_TRAITS
#include <cuda/std/type_traits>
namespace std {
using cuda::std::is_integral;
using cuda::std::is_signed;
using cuda::std::is_unsigned;
}  // namespace std
#endif
