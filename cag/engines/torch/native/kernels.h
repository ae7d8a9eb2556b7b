/* The kernels every decoding step and packed matmul is built from, and the one place that says what
 * each must compute.
 *
 * Layout (modelled on ggml-cpu's arch/ folders):
 *   generic.c        portable C of every kernel: the "portable" kernel set, and the reference for the others
 *   vec.h            the SIMD kernels, written once over a vector type (vec-map.h: its one-line operations)
 *   x86/avx2.c       AVX2+FMA+F16C: vec.h mapped onto 256-bit registers, and its block decoders
 *   x86/avx512.c     AVX-512: the same on 512-bit registers
 *   arm/neon.c       NEON (AArch64): the same on 128-bit registers
 *   arch-fallback.h  which implementation each kernel resolves to in a build
 *   qmatmul.c, step.c  the library's entry points, which call only the kernels below
 * A build is for one kernel set (CAG_SIMD_PORTABLE, _AVX2, _AVX512 or _NEON, chosen by __init__.py) and
 * compiles generic.c plus that set's file. The generic versions a set replaces stay in the library under
 * their *_generic names, so tests can hold the two side by side.
 *
 * qmatmul.c and step.c call the same functions: a (weight row, input row) pair goes through the same dot
 * product whichever of them asks, so it gives the same bits from both.
 */
#ifndef CAG_KERNELS_H
#define CAG_KERNELS_H
#include <stdint.h>
#include <string.h>

#include "arch-fallback.h"

/* ggml's block formats: 32 weights per block, scales as IEEE half floats. */
typedef struct { uint16_t d, m; uint8_t q[16]; } q41_block; /* w[j] = d*(q[j]&15) + m, w[j+16] = d*(q[j]>>4) + m */
typedef struct { uint16_t d; int8_t q[32]; } q80_block;      /* w[j] = d*q[j] */

/* The kernel set this library was built with, for people: "AVX2+FMA+F16C", "portable C", ... */
extern const char cag_simd_name[];

/* Every kernel's signature, once: under its public name (cag_<kernel>, what qmatmul.c and step.c call) and
 * as its portable twin (cag_<kernel>_generic, generic.c; arch-fallback.h makes the two one function where a
 * set has no SIMD version of it).
 *
 * dots_q41, dots_q80, dots_f32: y[r*ys + i] = (weight row i) . (x row r) for i < n weight rows (row i at
 *   w + i*nb blocks, or w + i*K floats) and r < R rows of x (x + r*xs), K = 32*nb. The contract that makes a
 *   row's result independent of its batch: every implementation computes each (weight row, x row) pair
 *   with the same operations in the same order whatever R, n, the other rows or the calling thread are.
 *   Work on the weights (decoding a block) may be shared between rows; sums are not. Each kernel set has
 *   its own order (results differ between sets in the last bits).
 * rmsnorm: transformers' LlamaRMSNorm, out = w * (h * 1/sqrt(mean(h^2) + eps)).
 * silu_mul: out = silu(g) * u = g / (1 + e^-g) * u (the Llama MLP's gate).
 * Attention over one chunk of keys, given as pointer arrays (hd floats each) so that a chunk may span the
 *   shared prefix and a row's own positions; a key's score is computed the same way wherever it sits:
 *   scores: s[t] = (q . keys[t]) * scale for t < n.
 *   max: the largest of s[0..n), n >= 1.
 *   exp_sum: s[t] = e^(s[t] - shift) in place; returns their sum (results below ~1e-38 may be flushed to 0).
 *   weighted_sum: o[i] = sum over t < n of p[t] * values[t][i], for i < hd. */
#define CAG_KERNELS(NAME)                                                                                        \
  void NAME(dots_q41)(const q41_block* w, int64_t nb, int64_t n, const float* x, int64_t xs, int64_t R,        \
                      float* y, int64_t ys);                                                                     \
  void NAME(dots_q80)(const q80_block* w, int64_t nb, int64_t n, const float* x, int64_t xs, int64_t R,        \
                      float* y, int64_t ys);                                                                     \
  void NAME(dots_f32)(const float* w, int64_t K, int64_t n, const float* x, int64_t xs, int64_t R, float* y,     \
                      int64_t ys);                                                                               \
  void NAME(rmsnorm)(const float* h, const float* w, int64_t n, float eps, float* out);                          \
  void NAME(silu_mul)(const float* g, const float* u, int64_t n, float* out);                                    \
  void NAME(scores)(const float* q, const float* const* keys, int64_t n, int64_t hd, float scale, float* s);     \
  float NAME(max)(const float* s, int64_t n);                                                                    \
  float NAME(exp_sum)(float* s, int64_t n, float shift);                                                         \
  void NAME(weighted_sum)(const float* p, const float* const* values, int64_t n, int64_t hd, float* o);
#define CAG_PUBLIC(kernel) cag_##kernel
#define CAG_GENERIC(kernel) cag_##kernel##_generic
CAG_KERNELS(CAG_PUBLIC)
CAG_KERNELS(CAG_GENERIC)

/* IEEE half -> float, exactly (the scales of the blocks). Portable: SIMD files convert whole vectors. */
static inline float cag_half(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) bits = sign;
    else { /* subnormal: normalize */
      int e = -1;
      uint32_t m = man;
      do { e++; m <<= 1; } while (!(m & 0x400));
      bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((m & 0x3ff) << 13);
    }
  } else if (exp == 31) bits = sign | 0x7f800000 | (man << 13);
  else bits = sign | ((exp + 112) << 23) | (man << 13);
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

#endif
