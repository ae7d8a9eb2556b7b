/* Portable C of every kernel in kernels.h: the whole "portable" kernel set, the fallback of the others
 * (arch-fallback.h), and the reference the SIMD kernels are tested against.
 *
 * Written for compilers to vectorize without changing a single result: sums run in fixed lanes
 * (acc[j] += a[i+j] * b[i+j] is elementwise in j) closed by a fixed tree, never in one long chain the
 * compiler may not reorder. The build passes -ffp-contract=off, so every a*b+c here rounds twice,
 * exactly as written.
 */
#include <math.h>

#include "kernels.h"

const char cag_simd_name[] = CAG_SIMD_NAME;

#define LANES 16

/* a[0] + ... + a[n-1] for n a power of two, halving: (a0 + a(n/2)) + ..., the same tree every time. */
static inline float tree_sum(float* a, int n) {
  for (int w = n / 2; w >= 1; w /= 2)
    for (int j = 0; j < w; j++) a[j] += a[j + w];
  return a[0];
}

static inline float dot(const float* a, const float* b, int64_t n) {
  float acc[LANES] = {0};
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES)
    for (int j = 0; j < LANES; j++) acc[j] += a[i + j] * b[i + j];
  for (int j = 0; i + j < n; j++) acc[j] += a[i + j] * b[i + j];
  return tree_sum(acc, LANES);
}

/* One weight row . one row of x in sixteen lanes of sums: per block, weights j and 16+j go to lane j (d*q + m
 * is the weight itself: d*q is exact in float32, so the sum rounds once, to it). */
static float q41_dot(const q41_block* w, int64_t nb, const float* x) {
  float acc[16] = {0};
  for (int64_t b = 0; b < nb; b++, x += 32) {
    const float d = cag_half(w[b].d), m = cag_half(w[b].m);
    float lo[16], hi[16];
    for (int j = 0; j < 16; j++) {
      lo[j] = d * (float)(w[b].q[j] & 15) + m;
      hi[j] = d * (float)(w[b].q[j] >> 4) + m;
    }
    for (int j = 0; j < 16; j++) acc[j] += lo[j] * x[j];
    for (int j = 0; j < 16; j++) acc[j] += hi[j] * x[16 + j];
  }
  return tree_sum(acc, 16);
}

static float q80_dot(const q80_block* w, int64_t nb, const float* x) {
  float acc[16] = {0};
  for (int64_t b = 0; b < nb; b++, x += 32) {
    const float d = cag_half(w[b].d);
    float v[32];
    for (int j = 0; j < 32; j++) v[j] = d * (float)w[b].q[j];
    for (int j = 0; j < 16; j++) acc[j] += v[j] * x[j];
    for (int j = 0; j < 16; j++) acc[j] += v[16 + j] * x[16 + j];
  }
  return tree_sum(acc, 16);
}

/* Each (weight row, x row) pair on its own: nothing is shared between rows, so nothing can differ. */
void cag_dots_q41_generic(const q41_block* w, int64_t nb, int64_t n, const float* x, int64_t xs, int64_t R, float* y,
                          int64_t ys) {
  for (int64_t r = 0; r < R; r++)
    for (int64_t i = 0; i < n; i++) y[r * ys + i] = q41_dot(w + i * nb, nb, x + r * xs);
}

void cag_dots_q80_generic(const q80_block* w, int64_t nb, int64_t n, const float* x, int64_t xs, int64_t R, float* y,
                          int64_t ys) {
  for (int64_t r = 0; r < R; r++)
    for (int64_t i = 0; i < n; i++) y[r * ys + i] = q80_dot(w + i * nb, nb, x + r * xs);
}

void cag_dots_f32_generic(const float* w, int64_t K, int64_t n, const float* x, int64_t xs, int64_t R, float* y,
                          int64_t ys) {
  for (int64_t r = 0; r < R; r++)
    for (int64_t i = 0; i < n; i++) y[r * ys + i] = dot(w + i * K, x + r * xs, K);
}

void cag_rmsnorm_generic(const float* h, const float* w, int64_t n, float eps, float* out) {
  const float r = 1.0f / sqrtf(dot(h, h, n) / (float)n + eps);
  for (int64_t i = 0; i < n; i++) out[i] = w[i] * (h[i] * r);
}

void cag_silu_mul_generic(const float* g, const float* u, int64_t n, float* out) {
  for (int64_t i = 0; i < n; i++) out[i] = g[i] / (1.f + expf(-g[i])) * u[i];
}

void cag_scores_generic(const float* q, const float* const* keys, int64_t n, int64_t hd, float scale, float* s) {
  for (int64_t t = 0; t < n; t++) s[t] = dot(q, keys[t], hd) * scale;
}

float cag_max_generic(const float* s, int64_t n) {
  float m[LANES];
  int64_t i = 0;
  for (int j = 0; j < LANES; j++) m[j] = s[0];
  for (; i + LANES <= n; i += LANES)
    for (int j = 0; j < LANES; j++) m[j] = s[i + j] > m[j] ? s[i + j] : m[j];
  for (int j = 0; i + j < n; j++) m[j] = s[i + j] > m[j] ? s[i + j] : m[j];
  float best = m[0];
  for (int j = 1; j < LANES; j++) best = m[j] > best ? m[j] : best;
  return best;
}

float cag_exp_sum_generic(float* s, int64_t n, float shift) {
  float acc[LANES] = {0};
  for (int64_t t = 0; t < n; t++) {
    s[t] = expf(s[t] - shift);
    acc[t % LANES] += s[t];
  }
  return tree_sum(acc, LANES);
}

void cag_weighted_sum_generic(const float* p, const float* const* values, int64_t n, int64_t hd, float* o) {
  memset(o, 0, (size_t)hd * sizeof(float));
  for (int64_t t = 0; t < n; t++) {
    const float pt = p[t], *v = values[t];
    for (int64_t i = 0; i < hd; i++) o[i] += pt * v[i];
  }
}
