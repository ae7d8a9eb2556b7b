/* The SIMD kernels of kernels.h, written once over a vector type that each SIMD file maps onto its
 * instructions (as ggml-cpu does with simd-mappings.h and vec.h). x86/avx2.c, x86/avx512.c and arm/neon.c
 * define, then include this file:
 *
 *   vec, LANES            the register type and how many floats it holds
 *   vzero vset1 vload vstore vadd vsub vmul vdiv, vfma(a, b, c) = a*b + c rounded once, vclamp(x, lo, hi)
 *                         with NaN staying NaN: vec-map.h's VEC_MAP makes these from intrinsics
 *   vround(x)             to the nearest integer (ties to even)
 *   vpow2(p, n)           p * 2^n for integral n in [-126, 127]
 *   vzero_below(v, x, b)  v, with 0 in the lanes where x < b (NaN lanes of x keep v)
 *   vsum(v)               the sum of v's lanes, as a fixed tree
 *   vsum_lanes(v[LANES])  a vector whose lane j is vsum(v[j]), bit for bit
 *   q41_decode(blk, v)    a Q4_1 block's 32 weights, exactly, into v[VPB]
 *   q80_decode(blk, q)    a Q8_0 block's 32 codes as floats into q[VPB], returning its scale d in every lane
 *   Q41_SETS              accumulator sets per row that blocks take turns on (1; 2 when a block is only
 *                         two registers, so that a row's chain of additions is still one FMA per block)
 *   ROWS                  rows of x that share one decoding of a weight block (their accumulators and the
 *                         decoded block must fit the registers)
 *
 * Results are exactly the ones the comments promise in kernels.h: each row of x gets the same operations
 * in the same order whatever else shares the call, and a value computed in a vector's tail is computed by
 * the same lanes' arithmetic as in its body.
 */
#ifndef CAG_VEC_H
#define CAG_VEC_H
#include <math.h>

#define VPB (32 / LANES) /* vectors per block of 32 weights */
#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* ---- e^x --------------------------------------------------------------------------------------------
 * Cephes' expf: n = round(x / ln2), r = x - n*ln2 (in two steps, exactly enough), e^r by a polynomial
 * (~1 ulp), times 2^n. EXP_LOW: below it e^x would be a denormal, slow to compute with on many cores and
 * unable to change a softmax or a silu, so it is 0. Above EXP_HIGH it saturates near 1.7e38 (neither
 * ever gets there). */
#define EXP_LOW -87.f
#define EXP_HIGH 88.f

ALWAYS_INLINE vec vexp(vec x) {
  const vec c = vclamp(x, vset1(EXP_LOW), vset1(EXP_HIGH));
  const vec n = vround(vmul(c, vset1(1.44269504088896341f)));
  vec r = vfma(n, vset1(-0.693359375f), c);
  r = vfma(n, vset1(2.12194440e-4f), r);
  vec p = vset1(1.9875691500E-4f);
  p = vfma(p, r, vset1(1.3981999507E-3f));
  p = vfma(p, r, vset1(8.3334519073E-3f));
  p = vfma(p, r, vset1(4.1665795894E-2f));
  p = vfma(p, r, vset1(1.6666665459E-1f));
  p = vfma(p, r, vset1(5.0000001201E-1f));
  p = vfma(vmul(p, r), r, vadd(r, vset1(1.f)));
  return vzero_below(vpow2(p, n), x, vset1(EXP_LOW));
}

/* ---- dot products ---------------------------------------------------------------------------------- */

/* Four accumulators over 4*LANES floats, then LANES at a time into the first, then the scalar rest. */
static inline float vdot(const float* a, const float* b, int64_t n) {
  vec acc[4] = {vzero(), vzero(), vzero(), vzero()};
  int64_t i = 0;
  for (; i + 4 * LANES <= n; i += 4 * LANES)
    for (int k = 0; k < 4; k++) acc[k] = vfma(vload(a + i + k * LANES), vload(b + i + k * LANES), acc[k]);
  for (; i + LANES <= n; i += LANES) acc[0] = vfma(vload(a + i), vload(b + i), acc[0]);
  float s = vsum(vadd(vadd(acc[0], acc[1]), vadd(acc[2], acc[3])));
  for (; i < n; i++) s += a[i] * b[i];
  return s;
}

/* v[0] + ... + v[count-1] as a halving tree (count a power of two), in place. */
ALWAYS_INLINE vec vtree(vec* v, const int count) {
  for (int w = count / 2; w >= 1; w /= 2)
    for (int k = 0; k < w; k++) v[k] = vadd(v[k], v[k + w]);
  return v[0];
}

/* Q4_1 for R <= ROWS rows of x (a constant once inlined): each block decoded once for all of them. Blocks
 * take turns on Q41_SETS sets of VPB accumulators per row, the odd block at the end on the first set. */
ALWAYS_INLINE void q41_rows(const q41_block* w, int64_t nb, const float* x, int64_t xs, const int R, float* y,
                            int64_t ys) {
  vec a[ROWS][Q41_SETS][VPB];
  for (int r = 0; r < R; r++)
    for (int s = 0; s < Q41_SETS; s++)
      for (int k = 0; k < VPB; k++) a[r][s][k] = vzero();
  int64_t b = 0;
  for (; b + Q41_SETS <= nb; b += Q41_SETS)
    for (int s = 0; s < Q41_SETS; s++) {
      vec v[VPB];
      q41_decode(w + b + s, v);
      for (int r = 0; r < R; r++)
        for (int k = 0; k < VPB; k++) a[r][s][k] = vfma(v[k], vload(x + r * xs + (b + s) * 32 + k * LANES), a[r][s][k]);
    }
  for (; b < nb; b++) {
    vec v[VPB];
    q41_decode(w + b, v);
    for (int r = 0; r < R; r++)
      for (int k = 0; k < VPB; k++) a[r][0][k] = vfma(v[k], vload(x + r * xs + b * 32 + k * LANES), a[r][0][k]);
  }
  for (int r = 0; r < R; r++) {
    for (int s = 1; s < Q41_SETS; s++)
      for (int k = 0; k < VPB; k++) a[r][0][k] = vadd(a[r][0][k], a[r][s][k]);
    y[r * ys] = vsum(vtree(a[r][0], VPB));
  }
}

/* q . x for one Q8_0 block of one row (its scale is applied by the caller, once per block). */
ALWAYS_INLINE vec q80_dot(const vec q[VPB], const float* x) {
  vec t = vmul(q[0], vload(x));
  for (int k = 1; k < VPB; k++) t = vfma(q[k], vload(x + k * LANES), t);
  return t;
}

/* Q8_0 for R <= ROWS rows of x: the codes converted once for all of them; even and odd blocks go to two
 * accumulators per row, so a row's chain is one FMA per two blocks. */
ALWAYS_INLINE void q80_rows(const q80_block* w, int64_t nb, const float* x, int64_t xs, const int R, float* y,
                            int64_t ys) {
  vec a[ROWS][2], q[VPB], d;
  for (int r = 0; r < R; r++) a[r][0] = a[r][1] = vzero();
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2)
    for (int s = 0; s < 2; s++) {
      d = q80_decode(w + b + s, q);
      for (int r = 0; r < R; r++) a[r][s] = vfma(d, q80_dot(q, x + r * xs + (b + s) * 32), a[r][s]);
    }
  if (b < nb) {
    d = q80_decode(w + b, q);
    for (int r = 0; r < R; r++) a[r][0] = vfma(d, q80_dot(q, x + r * xs + b * 32), a[r][0]);
  }
  for (int r = 0; r < R; r++) y[r * ys] = vsum(vadd(a[r][0], a[r][1]));
}

/* Rows of x ROWS at a time (then fewer), against every weight row while those stay in cache. The count is
 * a constant inside q*_rows, so their accumulators stay in registers (ROWS is at most 4). */
#define UP_TO_ROWS(k) ((k) < ROWS ? (k) : ROWS)
#define BY_ROWS(rows_fn)                                                                            \
  for (int64_t r0 = 0; r0 < R; r0 += ROWS)                                                          \
    for (int64_t i = 0; i < n; i++) {                                                               \
      const float* xr = x + r0 * xs;                                                                \
      float* yr = y + r0 * ys + i;                                                                  \
      switch (R - r0 < ROWS ? R - r0 : ROWS) {                                                      \
        case 1: rows_fn(w + i * nb, nb, xr, xs, 1, yr, ys); break;                                  \
        case 2: rows_fn(w + i * nb, nb, xr, xs, UP_TO_ROWS(2), yr, ys); break;                      \
        case 3: rows_fn(w + i * nb, nb, xr, xs, UP_TO_ROWS(3), yr, ys); break;                      \
        default: rows_fn(w + i * nb, nb, xr, xs, ROWS, yr, ys); break;                              \
      }                                                                                             \
    }

void cag_dots_q41(const q41_block* w, int64_t nb, int64_t n, const float* x, int64_t xs, int64_t R, float* y,
                  int64_t ys) {
  BY_ROWS(q41_rows)
}

void cag_dots_q80(const q80_block* w, int64_t nb, int64_t n, const float* x, int64_t xs, int64_t R, float* y,
                  int64_t ys) {
  BY_ROWS(q80_rows)
}

void cag_dots_f32(const float* w, int64_t K, int64_t n, const float* x, int64_t xs, int64_t R, float* y, int64_t ys) {
  for (int64_t r = 0; r < R; r++)
    for (int64_t i = 0; i < n; i++) y[r * ys + i] = vdot(w + i * K, x + r * xs, K);
}

/* ---- elementwise -------------------------------------------------------------------------------- */

void cag_rmsnorm(const float* h, const float* w, int64_t n, float eps, float* out) {
  const float r = 1.0f / sqrtf(vdot(h, h, n) / (float)n + eps);
  for (int64_t i = 0; i < n; i++) out[i] = w[i] * (h[i] * r); /* elementwise: vectorized as written */
}

static inline vec silu_mul(vec g, vec u) {
  return vmul(vdiv(g, vadd(vset1(1.f), vexp(vsub(vzero(), g)))), u);
}

void cag_silu_mul(const float* g, const float* u, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES) vstore(out + i, silu_mul(vload(g + i), vload(u + i)));
  if (i < n) { /* the tail through zero-padded copies: the same lanes' arithmetic */
    float gt[LANES] = {0}, ut[LANES] = {0}, ot[LANES];
    memcpy(gt, g + i, (size_t)(n - i) * sizeof(float));
    memcpy(ut, u + i, (size_t)(n - i) * sizeof(float));
    vstore(ot, silu_mul(vload(gt), vload(ut)));
    memcpy(out + i, ot, (size_t)(n - i) * sizeof(float));
  }
}

/* ---- attention ---------------------------------------------------------------------------------- */

/* LANES keys at a time: LANES independent accumulators over the head dimension, summed together by
 * vsum_lanes; a leftover key alone, with the same operations. */
void cag_scores(const float* q, const float* const* keys, int64_t n, int64_t hd, float scale, float* s) {
  if (hd % LANES) {
    cag_scores_generic(q, keys, n, hd, scale, s);
    return;
  }
  int64_t t = 0;
  for (; t + LANES <= n; t += LANES) {
    const float* const* k = keys + t;
    vec acc[LANES];
    const vec q0 = vload(q);
    for (int j = 0; j < LANES; j++) acc[j] = vmul(q0, vload(k[j]));
    for (int64_t i = LANES; i < hd; i += LANES) {
      const vec qi = vload(q + i);
      for (int j = 0; j < LANES; j++) acc[j] = vfma(qi, vload(k[j] + i), acc[j]);
    }
    vstore(s + t, vmul(vsum_lanes(acc), vset1(scale)));
  }
  for (; t < n; t++) {
    vec acc = vmul(vload(q), vload(keys[t]));
    for (int64_t i = LANES; i < hd; i += LANES) acc = vfma(vload(q + i), vload(keys[t] + i), acc);
    s[t] = vsum(acc) * scale;
  }
}

float cag_exp_sum(float* s, int64_t n, float shift) {
  vec acc = vzero();
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES) {
    const vec e = vexp(vsub(vload(s + i), vset1(shift)));
    vstore(s + i, e);
    acc = vadd(acc, e);
  }
  if (i < n) { /* the tail through a copy padded with -inf, whose exponentials are 0 */
    float t[LANES];
    for (int j = 0; j < LANES; j++) t[j] = i + j < n ? s[i + j] : -INFINITY;
    const vec e = vexp(vsub(vload(t), vset1(shift)));
    vstore(t, e);
    memcpy(s + i, t, (size_t)(n - i) * sizeof(float));
    acc = vadd(acc, e);
  }
  return vsum(acc);
}

/* 64 output dimensions at a time in registers, one pass over the keys' values each, then LANES at a time. */
void cag_weighted_sum(const float* p, const float* const* values, int64_t n, int64_t hd, float* o) {
  if (hd % LANES) {
    cag_weighted_sum_generic(p, values, n, hd, o);
    return;
  }
  int64_t i = 0;
  for (; i + 64 <= hd; i += 64) {
    vec acc[64 / LANES];
    for (int k = 0; k < 64 / LANES; k++) acc[k] = vzero();
    for (int64_t t = 0; t < n; t++) {
      const vec pt = vset1(p[t]);
      const float* v = values[t] + i;
      for (int k = 0; k < 64 / LANES; k++) acc[k] = vfma(pt, vload(v + k * LANES), acc[k]);
    }
    for (int k = 0; k < 64 / LANES; k++) vstore(o + i + k * LANES, acc[k]);
  }
  for (; i < hd; i += LANES) {
    vec acc = vzero();
    for (int64_t t = 0; t < n; t++) acc = vfma(vset1(p[t]), vload(values[t] + i), acc);
    vstore(o + i, acc);
  }
}

#endif
