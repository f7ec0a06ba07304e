/**
 * @file shmem.cuh
 * @brief NVSHMEM device API, included only by kernels built with FLASHMOE_NVSHMEM=1.
 *
 * Those kernels are compiled to LTO-IR with relocatable device code and linked with
 * libnvshmem_device.a; NVSHMEM_ENABLE_ALL_DEVICE_INLINING (set by the host) makes
 * the headers define the transport entry points inline, so the symbol names NVRTC
 * produces match the archive's.
 */
#pragma once

#if !FLASHMOE_NVSHMEM
#error "shmem.cuh needs a kernel built with FLASHMOE_NVSHMEM=1 (KernelSpec.nvshmem)"
#endif

#if FMOE_HOST_EMU
#include <flashmoe_emu/nvshmem.h>  // CPU emulator: several PEs in one process
#else
#include <nvshmem.h>
#include <nvshmemx.h>
#endif
