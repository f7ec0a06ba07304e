/**
 * @file atoms.h
 * @brief The SM80 tensor-core instructions the tile GEMM uses, emulated warp-
 *        cooperatively, as drop-in CuTe atoms (FMOE_ARCH_ATOM in prelude.cuh).
 *
 * Each instruction is a warp collective (runtime.h): every lane deposits its
 * registers, the last lane to arrive rebuilds the whole operand matrices and computes
 * every lane's destination registers. The fragment layouts below are written from the
 * PTX ISA ("Matrix Fragments for mma.m16n8k16 / mma.m16n8k8", "ldmatrix"), not taken
 * from CuTe, so that a disagreement between the project's use of CuTe and the
 * hardware would show; mma_layout_mismatches() compares both at start-up.
 *
 * The traits of each emulated atom inherit CuTe's SM80 / SM75 traits, so TiledMMA and
 * the tiled copies partition exactly as for the GPU.
 */
#pragma once

#include <cute/tensor.hpp>

#include "runtime.h"

namespace fmoe_emu {

// Operand decoders of the emulated instructions (runtime code: no cutlass calls, which
// checked builds could not inline here).
FMOE_EMU_RT inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
FMOE_EMU_RT inline float bf16_bits_to_float(uint32_t bits16) { return bits_to_float(bits16 << 16); }
FMOE_EMU_RT inline float half_bits_to_float(uint32_t bits16) {
  const uint32_t sign = (bits16 & 0x8000u) << 16, exp = (bits16 >> 10) & 0x1fu;
  const uint32_t man = bits16 & 0x3ffu;
  if (exp == 0x1fu) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / NaN
  if (exp != 0) return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
  const float sub = float(man) * 5.9604644775390625e-8f;  // subnormal: man * 2^-24
  return sign ? -sub : sub;
}
/// A TF32 operand: the tensor core reads sign, exponent and the top 10 mantissa bits.
FMOE_EMU_RT inline float tf32_operand(uint32_t bits) { return bits_to_float(bits & 0xffffe000u); }

struct MmaIn {
  uint32_t a[4];
  uint32_t b[2];
  float c[4];
};
static_assert(sizeof(MmaIn) <= 64, "an MMA's registers must fit a lane's exchange slot");

// Lane l holds group g = l / 4 and thread-in-group t = l % 4 (PTX ISA).
// m16n8k16, 16-bit A/B (two elements per 32-bit register, low half first):
//   A(m, k): lane (m % 8) * 4 + (k % 8) / 2, register (m / 8) + 2 * (k / 8), half k % 2
//   B(k, n): lane n * 4 + (k % 8) / 2,       register k / 8,                 half k % 2
// m16n8k8, TF32 A/B (one element per register):
//   A(m, k): lane (m % 8) * 4 + k % 4,       register (m / 8) + 2 * (k / 4)
//   B(k, n): lane n * 4 + k % 4,             register k / 4
// C/D (both): lane l, register r holds (m, n) = (g + 8 * (r / 2), 2 * t + r % 2).
template <int kK, float (*Operand)(uint32_t)>
FMOE_EMU_RT inline void complete_mma(Block& blk, int w) {
  WarpState& ws = blk.warps[size_t(w)];
  MmaIn in[32];
  for (int l = 0; l < 32; ++l) std::memcpy(&in[l], ws.in[l], sizeof(MmaIn));
  float A[16][kK], B[kK][8];
  for (int m = 0; m < 16; ++m) {
    for (int k = 0; k < kK; ++k) {
      if constexpr (kK == 16) {
        const uint32_t reg = in[(m % 8) * 4 + (k % 8) / 2].a[(m / 8) + 2 * (k / 8)];
        A[m][k] = Operand((reg >> (16 * (k % 2))) & 0xffffu);
      } else {
        A[m][k] = Operand(in[(m % 8) * 4 + k % 4].a[(m / 8) + 2 * (k / 4)]);
      }
    }
  }
  for (int k = 0; k < kK; ++k) {
    for (int n = 0; n < 8; ++n) {
      if constexpr (kK == 16) {
        const uint32_t reg = in[n * 4 + (k % 8) / 2].b[k / 8];
        B[k][n] = Operand((reg >> (16 * (k % 2))) & 0xffffu);
      } else {
        B[k][n] = Operand(in[n * 4 + k % 4].b[k / 4]);
      }
    }
  }
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, t = l & 3;
    float d[4];
    for (int r = 0; r < 4; ++r) {
      const int m = g + 8 * (r / 2), n = 2 * t + r % 2;
      float acc = in[l].c[r];
      for (int k = 0; k < kK; ++k) acc = std::fma(A[m][k], B[k][n], acc);
      d[r] = acc;
    }
    std::memcpy(ws.out[l], d, sizeof d);
  }
}

template <int kK, float (*Operand)(uint32_t)>
FMOE_EMU_RT
inline void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4],
                const Site& site) {
  MmaIn in;
  std::memcpy(in.a, a, sizeof in.a);
  std::memcpy(in.b, b, sizeof in.b);
  std::memcpy(in.c, c, sizeof in.c);
  std::memcpy(lane_in(), &in, sizeof in);
  warp_collective(0xffffffffu, &complete_mma<kK, Operand>, site);
  std::memcpy(d, lane_out(), sizeof d);
}

/// ldmatrix.sync.aligned.m8n8.x4.shared.b16: lanes 8j..8j+7 give the row addresses of
/// matrix j; lane l receives in register j the 32-bit word l % 4 of row l / 4 of it.
FMOE_EMU_RT inline void complete_ldmatrix_x4(Block& blk, int w) {
  WarpState& ws = blk.warps[size_t(w)];
  const unsigned char* rows[32];
  for (int l = 0; l < 32; ++l) std::memcpy(&rows[l], ws.in[l], sizeof(void*));
  for (int l = 0; l < 32; ++l) {
    uint32_t d[4];
    for (int j = 0; j < 4; ++j) std::memcpy(&d[j], rows[8 * j + l / 4] + 4 * (l % 4), 4);
    std::memcpy(ws.out[l], d, sizeof d);
  }
}

FMOE_EMU_RT inline void ldmatrix_x4(const void* row, uint32_t& d0, uint32_t& d1, uint32_t& d2,
                                    uint32_t& d3, uintptr_t pc) {
  const Site site{__FILE__, __LINE__, "ldmatrix.x4"};
  if (reinterpret_cast<uintptr_t>(row) % 16) fatal("ldmatrix row address not 16-byte aligned");
#if FMOE_EMU_CHECKED
  on_access(row, 16, Access::Read, pc);  // the row this lane names, read by the warp
#else
  (void)pc;
#endif
  std::memcpy(lane_in(), &row, sizeof row);
  warp_collective(0xffffffffu, &complete_ldmatrix_x4, site);
  uint32_t d[4];
  std::memcpy(d, lane_out(), sizeof d);
  d0 = d[0];
  d1 = d[1];
  d2 = d[2];
  d3 = d[3];
}

}  // namespace fmoe_emu

namespace cute {

/// An emulated mma.sync atom with the register interface of CuTe's SM80 atoms.
template <int kK, float (*Operand)(uint32_t)>
struct EmuMma {
  using DRegisters = float[4];
  using ARegisters = uint32_t[4];
  using BRegisters = uint32_t[2];
  using CRegisters = float[4];
  FMOE_EMU_RT
  static void fma(float& d0, float& d1, float& d2, float& d3, uint32_t const& a0, uint32_t const& a1,
                  uint32_t const& a2, uint32_t const& a3, uint32_t const& b0, uint32_t const& b1,
                  float const& c0, float const& c1, float const& c2, float const& c3) {
    float d[4];
    ::fmoe_emu::mma<kK, Operand>(d, {a0, a1, a2, a3}, {b0, b1}, {c0, c1, c2, c3},
                                 {__FILE__, __LINE__, "mma.sync"});
    d0 = d[0];
    d1 = d[1];
    d2 = d[2];
    d3 = d[3];
  }
};

struct EMU_SM80_16x8x16_F32BF16BF16F32_TN : EmuMma<16, ::fmoe_emu::bf16_bits_to_float> {};
struct EMU_SM80_16x8x16_F32F16F16F32_TN : EmuMma<16, ::fmoe_emu::half_bits_to_float> {};
struct EMU_SM80_16x8x8_F32TF32TF32F32_TN : EmuMma<8, ::fmoe_emu::tf32_operand> {};

template <>
struct MMA_Traits<EMU_SM80_16x8x16_F32BF16BF16F32_TN> : MMA_Traits<SM80_16x8x16_F32BF16BF16F32_TN> {};
template <>
struct MMA_Traits<EMU_SM80_16x8x16_F32F16F16F32_TN> : MMA_Traits<SM80_16x8x16_F32F16F16F32_TN> {};
template <>
struct MMA_Traits<EMU_SM80_16x8x8_F32TF32TF32F32_TN> : MMA_Traits<SM80_16x8x8_F32TF32TF32F32_TN> {};

struct EMU_SM75_U32x4_LDSM_N {
  using SRegisters = uint128_t[1];
  using DRegisters = uint32_t[4];
  FMOE_EMU_RT static void copy(uint128_t const& smem_src, uint32_t& d0, uint32_t& d1, uint32_t& d2,
                   uint32_t& d3) {
    ::fmoe_emu::ldmatrix_x4(&smem_src, d0, d1, d2, d3, FMOE_EMU_PC());
  }
};
template <>
struct Copy_Traits<EMU_SM75_U32x4_LDSM_N> : Copy_Traits<SM75_U32x4_LDSM_N> {};

}  // namespace cute

namespace fmoe_emu {

/// (thread, value) entries where CuTe's MMA_Traits layout of an atom disagrees with
/// the PTX ISA formulas used above (0 expected).
template <class Traits, int M, int N, int K>
FMOE_EMU_RT inline int mma_traits_mismatches() {
  using namespace cute;
  int bad = 0;
  const auto la = typename Traits::ALayout{};
  const auto lb = typename Traits::BLayout{};
  const auto lc = typename Traits::CLayout{};
  constexpr bool k16 = K == 16;
  for (int thr = 0; thr < 32; ++thr) {
    const int g = thr >> 2, t = thr & 3;
    for (int v = 0; v < int(size<1>(la)); ++v) {  // A: (thr, v) -> m + M * k
      const int idx = la(thr, v), m = idx % M, k = idx / M;
      const int reg = k16 ? v / 2 : v;
      const int em = g + 8 * (reg % 2);
      const int ek = k16 ? 2 * t + v % 2 + 8 * (reg / 2) : t + 4 * (reg / 2);
      bad += (m != em) || (k != ek);
    }
    for (int v = 0; v < int(size<1>(lb)); ++v) {  // B: (thr, v) -> n + N * k
      const int idx = lb(thr, v), n = idx % N, k = idx / N;
      const int ek = k16 ? 2 * t + v % 2 + 8 * (v / 2) : t + 4 * v;
      bad += (n != g) || (k != ek);
    }
    for (int v = 0; v < int(size<1>(lc)); ++v) {  // C: (thr, v) -> m + M * n
      const int idx = lc(thr, v), m = idx % M, n = idx / M;
      bad += (m != g + 8 * (v / 2)) || (n != 2 * t + v % 2);
    }
  }
  return bad;
}

FMOE_EMU_RT inline int mma_layout_mismatches() {
  using namespace cute;
  return mma_traits_mismatches<MMA_Traits<SM80_16x8x16_F32BF16BF16F32_TN>, 16, 8, 16>() +
         mma_traits_mismatches<MMA_Traits<SM80_16x8x16_F32F16F16F32_TN>, 16, 8, 16>() +
         mma_traits_mismatches<MMA_Traits<SM80_16x8x8_F32TF32TF32F32_TN>, 16, 8, 8>();
}

}  // namespace fmoe_emu
