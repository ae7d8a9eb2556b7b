/* NEON kernels for AArch64 (Apple Silicon, Graviton, Ampere, Raspberry Pi 4/5 ...): 4 floats per register,
 * 32 registers, FMA and half-float conversion in the base instruction set. Built for the "neon" kernel
 * set. This file maps vec.h's vector operations onto these instructions and decodes the weight blocks;
 * the kernels themselves are vec.h's.
 */
#include <arm_neon.h>

#include "../kernels.h"
#include "../vec-map.h"

typedef float32x4_t vec;
#define LANES 4
/* A Q4_1 block is 8 registers, one accumulator each per row; two rows x 8 accumulators and the decoded
 * block fit the 32 registers. */
#define ROWS 2
#define Q41_SETS 1

#define fma_abc(a, b, c) vfmaq_f32(c, a, b) /* NEON takes the addend first */
VEC_MAP(vdupq_n_f32, vld1q_f32, vst1q_f32, vaddq_f32, vsubq_f32, vmulq_f32, vdivq_f32, fma_abc, vminq_f32, vmaxq_f32)
static inline vec vround(vec x) { return vrndnq_f32(x); }
static inline vec vpow2(vec p, vec n) { /* 2^n built in the exponent field */
  return vmulq_f32(p, vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23)));
}
static inline vec vzero_below(vec v, vec x, vec bound) { return vbslq_f32(vcltq_f32(x, bound), vzero(), v); }

/* Pairwise tree: (l0+l1) + (l2+l3). */
static inline float vsum(vec v) {
  const vec t = vpaddq_f32(v, v);
  return vgetq_lane_f32(vpaddq_f32(t, t), 0);
}

/* Lane j is vsum(v[j]), bit for bit. */
static inline vec vsum_lanes(const vec v[4]) { return vpaddq_f32(vpaddq_f32(v[0], v[1]), vpaddq_f32(v[2], v[3])); }

/* The first four half floats of a block as floats: a Q4_1 block's d and m in lanes 0 and 1, a Q8_0 block's
 * d in lane 0 (the conversion is exact; the other lanes are the codes' bytes, unused). */
static inline vec block_scales(const void* block) {
  uint16_t h[4];
  memcpy(h, block, 8);
  return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(h)));
}

static inline vec u8_to_f32(uint8x8_t q, int high) {
  const uint16x8_t wide = vmovl_u8(q);
  return vcvtq_f32_u32(high ? vmovl_high_u16(wide) : vmovl_u16(vget_low_u16(wide)));
}

/* A Q4_1 block's weights: d*q + m (d*q is exact, so the sum rounds once, to the weight itself), weights 0-15
 * from the low nibbles, 16-31 from the high ones, four per register. */
static inline void q41_decode(const q41_block* blk, vec v[8]) {
  const vec dm = block_scales(blk), d = vdupq_laneq_f32(dm, 0), m = vdupq_laneq_f32(dm, 1);
  const uint8x16_t q = vld1q_u8(blk->q);
  const uint8x16_t lo = vandq_u8(q, vdupq_n_u8(15)), hi = vshrq_n_u8(q, 4);
  const uint8x8_t parts[4] = {vget_low_u8(lo), vget_high_u8(lo), vget_low_u8(hi), vget_high_u8(hi)};
  for (int k = 0; k < 8; k++) v[k] = vfmaq_f32(m, d, u8_to_f32(parts[k / 2], k & 1));
}

static inline vec q80_decode(const q80_block* blk, vec q[8]) {
  for (int h = 0; h < 2; h++) {
    const int8x16_t codes = vld1q_s8(blk->q + 16 * h);
    const int16x8_t lo = vmovl_s8(vget_low_s8(codes)), hi = vmovl_high_s8(codes);
    q[4 * h + 0] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo)));
    q[4 * h + 1] = vcvtq_f32_s32(vmovl_high_s16(lo));
    q[4 * h + 2] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi)));
    q[4 * h + 3] = vcvtq_f32_s32(vmovl_high_s16(hi));
  }
  return vdupq_laneq_f32(block_scales(blk), 0);
}

#include "../vec.h"
