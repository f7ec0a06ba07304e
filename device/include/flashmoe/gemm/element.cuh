/**
 * @file element.cuh
 * @brief Element types: what memory stores, what tensor cores consume, how to round.
 *
 * Type ids (FMOE_DTYPE) and activation ids (FMOE_ACT) are abi.cuh's DType and Act.
 */
#pragma once

#include <cuda/std/bit>

#include "../abi.cuh"
#include "../prelude.cuh"

namespace flashmoe {
namespace gemm {

using abi::DType;
using abi::kBFloat16;
using abi::kFloat16;
using abi::kFloat32;
using abi::kTFloat32;

/// Round a float to TF32, half away from zero (what the oracle does).
FMOE_DEVICE uint32_t tf32_rna_bits(float x) {
#if FMOE_HOST_EMU
  uint32_t r = __float_as_uint(x);
  if ((r & 0x7f800000u) == 0x7f800000u) return (r & 0x7fffffu) ? 0x7fffffffu : r;  // inf / NaN
  return (r + 0x1000u) & 0xffffe000u;  // half away from zero on the magnitude
#else
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
#endif
}

FMOE_DEVICE float round_tf32(float x) { return __uint_as_float(tf32_rna_bits(x)); }

template <int kDtype>
struct Element;

template <>
struct Element<kFloat32> {
  using Storage = float;
  using Operand = cute::tfloat32_t;  // shared memory and fragments hold the raw float bits
  using MmaAtom = FMOE_ARCH_ATOM(SM80_16x8x8_F32TF32TF32F32_TN);
  static constexpr int kMmaK = 8;
  FMOE_DEVICE static Storage from_float(float v) { return v; }
  FMOE_DEVICE static float to_float(Storage v) { return v; }
};

template <>
struct Element<kTFloat32> {
  using Storage = float;
  using Operand = cute::tfloat32_t;
  using MmaAtom = FMOE_ARCH_ATOM(SM80_16x8x8_F32TF32TF32F32_TN);
  static constexpr int kMmaK = 8;
  FMOE_DEVICE static Storage from_float(float v) { return round_tf32(v); }
  FMOE_DEVICE static float to_float(Storage v) { return v; }
};

template <>
struct Element<kBFloat16> {
  using Storage = cute::bfloat16_t;
  using Operand = cute::bfloat16_t;
  using MmaAtom = FMOE_ARCH_ATOM(SM80_16x8x16_F32BF16BF16F32_TN);
  static constexpr int kMmaK = 16;
  FMOE_DEVICE static Storage from_float(float v) { return Storage(v); }
  FMOE_DEVICE static float to_float(Storage v) { return float(v); }
};

template <>
struct Element<kFloat16> {
  using Storage = cute::half_t;
  using Operand = cute::half_t;
  using MmaAtom = FMOE_ARCH_ATOM(SM80_16x8x16_F32F16F16F32_TN);
  static constexpr int kMmaK = 16;
  FMOE_DEVICE static Storage from_float(float v) { return Storage(v); }
  FMOE_DEVICE static float to_float(Storage v) { return float(v); }
};

/// Eight elements, and the same bytes as 16-byte vectors (register images for bit_cast).
template <class S>
struct Elements8 {
  S e[8];
};
template <class S>
struct Vectors8 {
  static constexpr int kCount = int(8 * sizeof(S) / 16);
  uint4 v[kCount];
};

/// Convert 8 floats and store them with 16-byte stores (dst 16-byte aligned).
template <class E>
FMOE_DEVICE void store8(typename E::Storage* dst, const float (&v)[8]) {
  using S = typename E::Storage;
  Elements8<S> out;
#pragma unroll
  for (int j = 0; j < 8; ++j) out.e[j] = E::from_float(v[j]);
  // bit_cast, not a uint4 lvalue over S objects: that aliasing is undefined behaviour
  // (host compilers miscompile it, and the CPU emulator builds this code).
  const auto vec = cuda::std::bit_cast<Vectors8<S>>(out);
#pragma unroll
  for (int j = 0; j < Vectors8<S>::kCount; ++j) reinterpret_cast<uint4*>(dst)[j] = vec.v[j];
}

/// Load 8 elements (16-byte aligned) as floats; kL2Only reads through L2 (data written
/// by other blocks during the launch).
template <class E, bool kL2Only = false>
FMOE_DEVICE void load8(const typename E::Storage* src, float (&v)[8]) {
  using S = typename E::Storage;
  Vectors8<S> vec;
#pragma unroll
  for (int j = 0; j < Vectors8<S>::kCount; ++j) {
    const uint4* p = reinterpret_cast<const uint4*>(src) + j;
    vec.v[j] = kL2Only ? __ldcg(p) : *p;
  }
  const auto in = cuda::std::bit_cast<Elements8<S>>(vec);
#pragma unroll
  for (int j = 0; j < 8; ++j) v[j] = E::to_float(in.e[j]);
}

using abi::Act;
using abi::kGelu;
using abi::kIdentity;
using abi::kRelu;
using abi::kSilu;
using abi::kSwigluClamped;

template <int kAct>
FMOE_DEVICE float activate(float x) {
  if constexpr (kAct == kRelu) {
    // Not fmaxf(x, 0): that returns 0 for a NaN, hiding it; the oracle's relu keeps it.
    return x > 0.0f || x != x ? x : 0.0f;
  } else if constexpr (kAct == kGelu) {
    // erfc form: 1 + erf(x / sqrt 2) cancels for x < -3 (4% off at -5), erfc does not.
    return 0.5f * x * erfcf(-x * 0.70710678118654752f);
  } else if constexpr (kAct == kSilu) {
    return x / (1.0f + expf(-x));
  } else {
    return x;
  }
}

FMOE_DEVICE float activate_dyn(int act, float x) {
  switch (act) {
    case kRelu: return activate<kRelu>(x);
    case kGelu: return activate<kGelu>(x);
    case kSilu: return activate<kSilu>(x);
    default: return x;
  }
}

}  // namespace gemm
}  // namespace flashmoe
