/* The one-line vector operations vec.h's kernels are written with, made from a SIMD file's intrinsics:
 * x86/avx2.c, x86/avx512.c and arm/neon.c each name theirs in one VEC_MAP line (after typedef ... vec). */
#ifndef CAG_VEC_MAP_H
#define CAG_VEC_MAP_H

#define VEC_MAP(set1, load, store, add, sub, mul, div, fma, min, max)           \
  static inline vec vset1(float f) { return set1(f); }                        \
  static inline vec vzero(void) { return set1(0.f); }                         \
  static inline vec vload(const float* p) { return load(p); }                 \
  static inline void vstore(float* p, vec v) { store(p, v); }                 \
  static inline vec vadd(vec a, vec b) { return add(a, b); }                  \
  static inline vec vsub(vec a, vec b) { return sub(a, b); }                  \
  static inline vec vmul(vec a, vec b) { return mul(a, b); }                  \
  static inline vec vdiv(vec a, vec b) { return div(a, b); }                  \
  /* a*b + c, rounded once */                                                 \
  static inline vec vfma(vec a, vec b, vec c) { return fma(a, b, c); }        \
  /* x limited to [lo, hi]; NaN stays NaN (x86's max/min return their second \
   * operand when either is NaN, Arm's return NaN) */                         \
  static inline vec vclamp(vec x, vec lo, vec hi) { return min(hi, max(lo, x)); }

#endif
