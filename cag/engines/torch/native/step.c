/* One decoding step of a Llama-family model in one call, for any number of rows (answers) at once:
 * every layer, the final norm and the LM head.
 *
 * Why: decoding one token runs ~30 layers of small operations. Driven from Python, each layer costs a few
 * dozen tensor calls (~0.2 ms per layer on a 2-core CPU), as much as its matmuls; and attention over a
 * long cached prefix must read every key and value once, which a generic kernel does with several passes.
 * Here the whole step is a single OpenMP region: rows of each matmul are split over the threads and every
 * weight row is read once for all answers, attention reads each key/value chunk once for all query heads
 * that share it (grouped-query attention) and all answers that share it (the knowledge base's prefix),
 * and each answer's new key/value is written in place in its own buffer.
 *
 * Each answer's keys/values are two segments: the shared prefix (one read-only buffer per layer, never
 * copied per answer) and the answer's own positions after it (its question and answer so far). Attention
 * runs over fixed 128-key chunks of absolute positions, whichever segment a key is in, merged in order.
 *
 * The arithmetic is float32 throughout, in a fixed order per answer: an answer's logits are the same bits
 * whatever other answers share the call, in whatever order, and whatever the thread count, because each
 * (weight row, answer) dot product and each (chunk, answer) attention piece is computed by the same code
 * with the same operands, and per-thread scratch is recomputed identically. A single answer is simply a
 * call with one row. It is not transformers' order of operations (its sums, exp and softmax differ in the
 * last bits), so cag checks its logits against transformers' forward within a tolerance on first use
 * (cag/fastdecode.py), and every generated token of every mode (cached, no-cache) goes through this step.
 *
 * Weights: float32 rows, or Q4_1/Q8_0 blocks (qblocks.h).
 * KV: float32 [kv_heads, positions, head_dim] per layer, for the shared prefix and for each answer.
 */
#include <math.h>
#include <stdlib.h>

#include "qblocks.h"

#ifdef _OPENMP
#include <omp.h>
#endif

enum { CAG_F32 = 0, CAG_Q41 = 1, CAG_Q80 = 2 };

typedef struct {
  int64_t kind, rows, cols;
  const void* data;
} cag_mat;

typedef struct {
  const float* in_norm;
  const float* post_norm;
  cag_mat q, k, v, o, gate, up, down;
} cag_layer;

typedef struct {
  int64_t n_layers, hidden, inter, heads, kv_heads, head_dim, vocab;
  float eps, scale;
  const cag_layer* layers;
  const float* final_norm;
  cag_mat lm_head;
} cag_model;

/* The prefix every row may read: per layer keys/values [kv_heads, stride, head_dim] (k/v NULL: none). */
typedef struct {
  const float* const* k;
  const float* const* v;
  int64_t stride; /* positions from one kv head's rows to the next */
} cag_shared;

/* One answer's new token. Its keys are positions 0..pos: 0..shared-1 from the shared prefix, the rest from
 * its own buffers (position p at index p - shared), where this step writes the token's key/value. */
typedef struct {
  const float* embedding; /* the token's embedding row [hidden] */
  const float* cos;       /* the rotary table's row for pos [head_dim] */
  const float* sin;
  int64_t pos, shared;
  float* const* k; /* per layer [kv_heads, cap, head_dim] */
  float* const* v;
  int64_t cap;
} cag_row;

#define CHUNK 128 /* keys per attention work item; fixed, so the result never depends on the thread count */
#define GROUP 4   /* rows of x per pass over a weight row in the multi-row dot products */

/* ---- small vector helpers ---------------------------------------------------------------------- */

static inline float dot_f32(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#ifdef CAG_AVX512
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  s = _mm512_reduce_add_ps(acc);
#endif
  for (; i < n; i++) s += a[i] * b[i];
  return s;
}

#ifdef CAG_AVX512
/* e^x, ~1 ulp (Cephes' expf polynomial); exact 0 far below, +inf above the float range. */
static inline __m512 exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.f)), _mm512_set1_ps(88.7f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

/* Lane j of the result is the sum of the 16 lanes of v[j]. */
static inline __m512 hsum16(const __m512 v[16]) {
  __m512 x[8], y[4];
  for (int i = 0; i < 8; i++) /* 256-bit halves added: vector i holds v[2i] in lanes 0-7, v[2i+1] in 8-15 */
    x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; i++) /* 128-bit lane L of y[i] holds 4 partial sums of v[4i+L] */
    y[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0xDD));
  const __m512 z0 = _mm512_add_ps(_mm512_unpacklo_ps(y[0], y[1]), _mm512_unpackhi_ps(y[0], y[1]));
  const __m512 z1 = _mm512_add_ps(_mm512_unpacklo_ps(y[2], y[3]), _mm512_unpackhi_ps(y[2], y[3]));
  const __m512 w = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(z0), _mm512_castps_pd(z1))),
                                 _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(z0), _mm512_castps_pd(z1))));
  /* lane 4L+e of w holds the sum of v[4e+L] */
  const __m512i order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  return _mm512_permutexvar_ps(order, w);
}
#endif

/* s[i] = e^(s[i] - shift) in place; returns their sum. */
static inline float exp_sum(float* s, int64_t n, float shift) {
  int64_t i = 0;
  float sum = 0.f;
#ifdef CAG_AVX512
  const __m512 sh = _mm512_set1_ps(shift);
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + i), sh));
    _mm512_storeu_ps(s + i, e);
    acc = _mm512_add_ps(acc, e);
  }
  sum = _mm512_reduce_add_ps(acc);
  if (i < n) {
    const __mmask16 k = (__mmask16)((1u << (n - i)) - 1);
    const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + i), sh));
    _mm512_mask_storeu_ps(s + i, k, e);
    sum += _mm512_mask_reduce_add_ps(k, e);
    i = n;
  }
#endif
  for (; i < n; i++) {
    s[i] = expf(s[i] - shift);
    sum += s[i];
  }
  return sum;
}

/* The largest of s[0..n), n >= 1. */
static inline float max_of(const float* s, int64_t n) {
  int64_t i = 0;
  float m = s[0];
#ifdef CAG_AVX512
  if (n >= 16) {
    __m512 v = _mm512_loadu_ps(s);
    for (i = 16; i + 16 <= n; i += 16) v = _mm512_max_ps(v, _mm512_loadu_ps(s + i));
    m = _mm512_reduce_max_ps(v);
  }
#endif
  for (; i < n; i++) m = s[i] > m ? s[i] : m;
  return m;
}

/* ---- the pieces of a layer ----------------------------------------------------------------------- */

/* Dot products of one weight row with R rows of x (K apart), y[r] for r < R. Each row's products are
 * summed exactly as for R = 1 (its own accumulators, the same operations in the same order); only the
 * decoding of the weight blocks is shared, so a row's result never depends on the other rows. */
#ifdef CAG_AVX512
/* Q4_1: per block the 16 weight values d*i + m (i = 0..15) are made once and looked up by the 4-bit codes
 * (vpermps reads only the low 4 bits of each index), two blocks per iteration, four accumulators per row. */
static inline __attribute__((always_inline)) void q41_dots(const float* x, int64_t K, const q41_block* w,
                                                           int64_t nb, float* y, const int R) {
  __m512 a[GROUP][4];
  for (int r = 0; r < R; r++) a[r][0] = a[r][1] = a[r][2] = a[r][3] = _mm512_setzero_ps();
  const __m512 iota = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  int64_t b = 0;
#define CAG_Q41_LUT(blk) ({ int32_t dm_; memcpy(&dm_, &(blk), 4); \
    const __m512 f_ = _mm512_cvtph_ps(_mm256_set1_epi32(dm_)); /* d, m, d, m, ... */ \
    _mm512_fmadd_ps(_mm512_moveldup_ps(f_), iota, _mm512_movehdup_ps(f_)); })
  for (; b + 2 <= nb; b += 2) {
    const __m512 lut0 = CAG_Q41_LUT(w[b]), lut1 = CAG_Q41_LUT(w[b + 1]);
    const __m512i q0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)w[b].q));
    const __m512i q1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)w[b + 1].q));
    const __m512 w0 = _mm512_permutexvar_ps(q0, lut0), w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(q0, 4), lut0);
    const __m512 w2 = _mm512_permutexvar_ps(q1, lut1), w3 = _mm512_permutexvar_ps(_mm512_srli_epi32(q1, 4), lut1);
    for (int r = 0; r < R; r++) {
      const float* xr = x + r * K + b * 32;
      a[r][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr), a[r][0]);
      a[r][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr + 16), a[r][1]);
      a[r][2] = _mm512_fmadd_ps(w2, _mm512_loadu_ps(xr + 32), a[r][2]);
      a[r][3] = _mm512_fmadd_ps(w3, _mm512_loadu_ps(xr + 48), a[r][3]);
    }
  }
  if (b < nb) {
    const __m512 lut = CAG_Q41_LUT(w[b]);
    const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)w[b].q));
    const __m512 w0 = _mm512_permutexvar_ps(q, lut), w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), lut);
    for (int r = 0; r < R; r++) {
      const float* xr = x + r * K + b * 32;
      a[r][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr), a[r][0]);
      a[r][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr + 16), a[r][1]);
    }
  }
#undef CAG_Q41_LUT
  for (int r = 0; r < R; r++)
    y[r] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[r][0], a[r][2]), _mm512_add_ps(a[r][1], a[r][3])));
}

/* Q8_0: d * (q . x) per block, two blocks per iteration, two accumulators per row. */
static inline __attribute__((always_inline)) void q80_dots(const float* x, int64_t K, const q80_block* w,
                                                           int64_t nb, float* y, const int R) {
  __m512 a[GROUP][2];
  for (int r = 0; r < R; r++) a[r][0] = a[r][1] = _mm512_setzero_ps();
#define CAG_Q80_HALF(blk, off) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)((blk).q + (off)))))
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    const __m512 d0 = _mm512_set1_ps(half_to_float(w[b].d)), d1 = _mm512_set1_ps(half_to_float(w[b + 1].d));
    const __m512 lo0 = CAG_Q80_HALF(w[b], 0), hi0 = CAG_Q80_HALF(w[b], 16);
    const __m512 lo1 = CAG_Q80_HALF(w[b + 1], 0), hi1 = CAG_Q80_HALF(w[b + 1], 16);
    for (int r = 0; r < R; r++) {
      const float* xr = x + r * K + b * 32;
      a[r][0] = _mm512_fmadd_ps(d0, _mm512_fmadd_ps(hi0, _mm512_loadu_ps(xr + 16),
                                                    _mm512_mul_ps(lo0, _mm512_loadu_ps(xr))), a[r][0]);
      a[r][1] = _mm512_fmadd_ps(d1, _mm512_fmadd_ps(hi1, _mm512_loadu_ps(xr + 48),
                                                    _mm512_mul_ps(lo1, _mm512_loadu_ps(xr + 32))), a[r][1]);
    }
  }
  if (b < nb) {
    const __m512 d0 = _mm512_set1_ps(half_to_float(w[b].d));
    const __m512 lo0 = CAG_Q80_HALF(w[b], 0), hi0 = CAG_Q80_HALF(w[b], 16);
    for (int r = 0; r < R; r++) {
      const float* xr = x + r * K + b * 32;
      a[r][0] = _mm512_fmadd_ps(d0, _mm512_fmadd_ps(hi0, _mm512_loadu_ps(xr + 16),
                                                    _mm512_mul_ps(lo0, _mm512_loadu_ps(xr))), a[r][0]);
    }
  }
#undef CAG_Q80_HALF
  for (int r = 0; r < R; r++) y[r] = _mm512_reduce_add_ps(_mm512_add_ps(a[r][0], a[r][1]));
}

#define CAG_GROUPED(fn, R, ...) switch (R) { case 1: fn(__VA_ARGS__, 1); break; case 2: fn(__VA_ARGS__, 2); break; \
  case 3: fn(__VA_ARGS__, 3); break; default: fn(__VA_ARGS__, GROUP); break; }
#endif

/* y[r * ys] (+)= (row n of m) . x[r * K ...] for r < R (x's rows are m->cols apart). */
static void row_dots(const cag_mat* m, int64_t n, const float* x, int64_t R, float* y, int64_t ys, int accumulate) {
  const int64_t K = m->cols, nb = K / 32;
  for (int64_t r0 = 0; r0 < R; r0 += GROUP) {
    const int g = (int)(R - r0 < GROUP ? R - r0 : GROUP);
    const float* xs = x + r0 * K;
    float t[GROUP];
    switch (m->kind) {
#ifdef CAG_AVX512
      case CAG_Q41: CAG_GROUPED(q41_dots, g, xs, K, (const q41_block*)m->data + n * nb, nb, t) break;
      case CAG_Q80: CAG_GROUPED(q80_dots, g, xs, K, (const q80_block*)m->data + n * nb, nb, t) break;
#else
      case CAG_Q41:
        for (int r = 0; r < g; r++) q41_rows(xs + r * K, K, 1, nb, (const q41_block*)m->data + n * nb, t + r, 1);
        break;
      case CAG_Q80:
        for (int r = 0; r < g; r++) q80_rows(xs + r * K, K, 1, nb, (const q80_block*)m->data + n * nb, t + r, 1);
        break;
#endif
      default:
        for (int r = 0; r < g; r++) t[r] = dot_f32((const float*)m->data + n * K, xs + r * K, K);
    }
    for (int r = 0; r < g; r++) {
      float* out = y + (r0 + r) * ys;
      *out = accumulate ? *out + t[r] : t[r];
    }
  }
}

/* y[r * ys + n] (+)= [mats stacked] row n . x[r], for R rows of x. Tiles of TILE weight rows are split over
 * the team; within a tile, each group of rows of x meets every weight row of the tile while both are in the
 * core's cache. Ends with a barrier. */
#define TILE 16
static void matvec(const cag_mat* const* mats, int count, const float* x, int64_t R, float* y, int64_t ys,
                   int accumulate) {
  int64_t total = 0;
  for (int c = 0; c < count; c++) total += mats[c]->rows;
  const int64_t K = mats[0]->cols, tiles = (total + TILE - 1) / TILE;
#pragma omp for schedule(static)
  for (int64_t t = 0; t < tiles; t++) {
    const int64_t n0 = t * TILE, n1 = n0 + TILE < total ? n0 + TILE : total;
    for (int64_t r0 = 0; r0 < R; r0 += GROUP) {
      const int64_t g = R - r0 < GROUP ? R - r0 : GROUP;
      int c = 0;
      int64_t r = n0;
      while (r >= mats[c]->rows) r -= mats[c++]->rows;
      for (int64_t n = n0; n < n1; n++, r++) {
        if (r >= mats[c]->rows) r -= mats[c++]->rows;
        row_dots(mats[c], r, x + r0 * K, g, y + r0 * ys + n, ys, accumulate);
      }
    }
  }
}

/* transformers' LlamaRMSNorm: w * (h * rsqrt(mean(h^2) + eps)). Every thread computes its own copy. */
static void rmsnorm(const float* h, const float* w, int64_t n, float eps, float* out) {
  const float r = 1.0f / sqrtf(dot_f32(h, h, n) / (float)n + eps);
  for (int64_t i = 0; i < n; i++) out[i] = w[i] * (h[i] * r);
}

/* transformers' rotary embedding: v*cos + rotate_half(v)*sin (elementwise, the same roundings). */
static void rope(float* v, const float* cos, const float* sin, int64_t hd) {
  const int64_t half = hd / 2;
  float t[512];
  memcpy(t, v, (size_t)hd * sizeof(float));
  for (int64_t i = 0; i < half; i++) v[i] = t[i] * cos[i] + (-t[i + half]) * sin[i];
  for (int64_t i = half; i < hd; i++) v[i] = t[i] * cos[i] + t[i - half] * sin[i];
}

/* Attention of G query heads over n keys/values of one KV head (rows hd apart), the first n1 of them
 * at K1/V1 and the rest at K2/V2 (a chunk that starts in the shared prefix and ends in a row's own
 * positions); the scores do not depend on where the split is. Per head: the chunk's max m, sum of
 * exponentials l and unnormalized output o, written to part[g*pstride ...]. */
static void attend_chunk(const float* q, int64_t G, const float* K1, const float* V1, int64_t n1, const float* K2,
                         const float* V2, int64_t n, int64_t hd, float scale, float* part, int64_t pstride) {
#define CAG_KEY(t) ((t) < n1 ? K1 + (t) * hd : K2 + ((t) - n1) * hd)
#define CAG_VALUE(t) ((t) < n1 ? V1 + (t) * hd : V2 + ((t) - n1) * hd)
  float s[CHUNK];
  for (int64_t g = 0; g < G; g++) {
    const float* qg = q + g * hd;
    int64_t t = 0;
#ifdef CAG_AVX512
    if (hd % 16 == 0) {
      for (; t + 16 <= n; t += 16) {
        __m512 acc[16];
        for (int j = 0; j < 16; j++) {
          const float* k = CAG_KEY(t + j);
          __m512 a = _mm512_mul_ps(_mm512_loadu_ps(qg), _mm512_loadu_ps(k));
          for (int64_t i = 16; i < hd; i += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(qg + i), _mm512_loadu_ps(k + i), a);
          acc[j] = a;
        }
        _mm512_storeu_ps(s + t, _mm512_mul_ps(hsum16(acc), _mm512_set1_ps(scale)));
      }
    }
#endif
    for (; t < n; t++) s[t] = dot_f32(qg, CAG_KEY(t), hd) * scale;
    const float m = max_of(s, n);
    float* out = part + g * pstride;
    out[0] = m;
    out[1] = exp_sum(s, n, m);
    float* o = out + 2;
#ifdef CAG_AVX512
    if (hd % 64 == 0) { /* 64 output dims at a time in registers */
      for (int64_t i = 0; i < hd; i += 64) {
        __m512 o0 = _mm512_setzero_ps(), o1 = o0, o2 = o0, o3 = o0;
        for (t = 0; t < n; t++) {
          const __m512 p = _mm512_set1_ps(s[t]);
          const float* v = CAG_VALUE(t) + i;
          o0 = _mm512_fmadd_ps(p, _mm512_loadu_ps(v), o0);
          o1 = _mm512_fmadd_ps(p, _mm512_loadu_ps(v + 16), o1);
          o2 = _mm512_fmadd_ps(p, _mm512_loadu_ps(v + 32), o2);
          o3 = _mm512_fmadd_ps(p, _mm512_loadu_ps(v + 48), o3);
        }
        _mm512_storeu_ps(o + i, o0);
        _mm512_storeu_ps(o + i + 16, o1);
        _mm512_storeu_ps(o + i + 32, o2);
        _mm512_storeu_ps(o + i + 48, o3);
      }
      continue;
    }
#endif
    memset(o, 0, (size_t)hd * sizeof(float));
    for (t = 0; t < n; t++) {
      const float p = s[t], *v = CAG_VALUE(t);
      for (int64_t i = 0; i < hd; i++) o[i] += p * v[i];
    }
  }
#undef CAG_KEY
#undef CAG_VALUE
}

/* ---- the step ------------------------------------------------------------------------------------ */

static int64_t chunks_of(const cag_row* rows, int64_t R) {
  int64_t chunks = 1;
  for (int64_t r = 0; r < R; r++) {
    const int64_t c = (rows[r].pos + CHUNK) / CHUNK; /* keys 0..pos */
    chunks = c > chunks ? c : chunks;
  }
  return chunks;
}

/* Bytes of scratch cag_step needs for these rows (it allocates them itself). */
int64_t cag_step_scratch(const cag_model* m, const cag_row* rows, int64_t R, int64_t threads) {
  const int64_t hd = m->head_dim, chunks = chunks_of(rows, R);
  return (int64_t)sizeof(float) * R * (m->hidden + (m->heads + 2 * m->kv_heads) * hd + m->heads * hd +
                                       m->heads * chunks * (hd + 2) + m->inter + threads * m->hidden);
}

/* logits[R][vocab] for the R rows' tokens; writes each token's keys/values in every layer of its row's own
 * buffers. Returns 0, or -1 if out of memory. */
int cag_step(const cag_model* m, const cag_shared* shared, const cag_row* rows, int64_t R, float* logits) {
  const int64_t H = m->hidden, hd = m->head_dim, nq = m->heads * hd, nkv = m->kv_heads * hd, nqkv = nq + 2 * nkv;
  const int64_t G = m->heads / m->kv_heads, chunks = chunks_of(rows, R), pstride = hd + 2;
  const int64_t heads_all = m->heads + m->kv_heads, rpart = m->heads * chunks * pstride;
  int threads = 1;
#ifdef _OPENMP
  threads = omp_get_max_threads();
#endif
  float* buf = malloc((size_t)cag_step_scratch(m, rows, R, threads));
  if (!buf) return -1;
  float* h = buf;
  float* qkv = h + R * H;
  float* attn = qkv + R * nqkv;
  float* part = attn + R * nq;
  float* act = part + R * rpart;
  float* scratch = act + R * m->inter;
  for (int64_t r = 0; r < R; r++) memcpy(h + r * H, rows[r].embedding, (size_t)H * sizeof(float));
  const cag_mat* lm[1] = {&m->lm_head};

#pragma omp parallel num_threads(threads)
  {
    int me = 0;
#ifdef _OPENMP
    me = omp_get_thread_num();
#endif
    float* x = scratch + (int64_t)me * R * H;
    for (int64_t l = 0; l < m->n_layers; l++) {
      const cag_layer* L = m->layers + l;
      const cag_mat* qkv_mats[3] = {&L->q, &L->k, &L->v};
      for (int64_t r = 0; r < R; r++) rmsnorm(h + r * H, L->in_norm, H, m->eps, x + r * H);
      matvec(qkv_mats, 3, x, R, qkv, nqkv, 0);
#pragma omp for schedule(static)
      for (int64_t it = 0; it < R * heads_all; it++) { /* q heads, then k heads (contiguous in qkv) */
        const int64_t r = it / heads_all, i = it % heads_all;
        const cag_row* row = rows + r;
        float* qr = qkv + r * nqkv;
        rope(qr + i * hd, row->cos, row->sin, hd);
        if (i >= m->heads) {
          const int64_t g = i - m->heads, at = (g * row->cap + row->pos - row->shared) * hd;
          memcpy(row->k[l] + at, qr + i * hd, (size_t)hd * sizeof(float));
          memcpy(row->v[l] + at, qr + nq + nkv + g * hd, (size_t)hd * sizeof(float));
        }
      }
#pragma omp for schedule(static)
      for (int64_t it = 0; it < m->kv_heads * chunks; it++) { /* one chunk of keys, for every row that has it */
        const int64_t g = it / chunks, c = it % chunks, t0 = c * CHUNK;
        for (int64_t r = 0; r < R; r++) {
          const cag_row* row = rows + r;
          const int64_t keys = row->pos + 1;
          if (t0 >= keys) continue;
          const int64_t n = keys - t0 < CHUNK ? keys - t0 : CHUNK;
          const int64_t in_shared = row->shared - t0 < 0 ? 0 : (row->shared - t0 < n ? row->shared - t0 : n);
          const float *k1 = NULL, *v1 = NULL;
          if (in_shared > 0) {
            k1 = shared->k[l] + (g * shared->stride + t0) * hd;
            v1 = shared->v[l] + (g * shared->stride + t0) * hd;
          }
          const int64_t own = (g * row->cap + (t0 > row->shared ? t0 - row->shared : 0)) * hd;
          attend_chunk(qkv + r * nqkv + g * G * hd, G, k1, v1, in_shared, row->k[l] + own, row->v[l] + own, n, hd,
                       m->scale, part + r * rpart + (g * G * chunks + c) * pstride, chunks * pstride);
        }
      }
#pragma omp for schedule(static)
      for (int64_t it = 0; it < R * m->heads; it++) { /* merge each row's chunks in order */
        const int64_t r = it / m->heads, head = it % m->heads, own_chunks = (rows[r].pos + CHUNK) / CHUNK;
        const float* p = part + r * rpart + head * chunks * pstride;
        float mx = p[0];
        for (int64_t c = 1; c < own_chunks; c++) mx = p[c * pstride] > mx ? p[c * pstride] : mx;
        float total = 0.f, *o = attn + r * nq + head * hd;
        memset(o, 0, (size_t)hd * sizeof(float));
        for (int64_t c = 0; c < own_chunks; c++) {
          const float* pc = p + c * pstride;
          const float w = expf(pc[0] - mx);
          total += pc[1] * w;
          for (int64_t i = 0; i < hd; i++) o[i] += pc[2 + i] * w;
        }
        for (int64_t i = 0; i < hd; i++) o[i] /= total;
      }
      const cag_mat* o_mat[1] = {&L->o};
      matvec(o_mat, 1, attn, R, h, H, 1);
      for (int64_t r = 0; r < R; r++) rmsnorm(h + r * H, L->post_norm, H, m->eps, x + r * H);
#pragma omp for schedule(static)
      for (int64_t b = 0; b < (m->inter + 15) / 16; b++) { /* act = silu(gate x) * (up x), 16 rows at a time */
        const int64_t r0 = b * 16, n = m->inter - r0 < 16 ? m->inter - r0 : 16;
        for (int64_t x0 = 0; x0 < R; x0 += GROUP) {
          const int64_t rows_here = R - x0 < GROUP ? R - x0 : GROUP;
          float g[GROUP][16], u[GROUP][16], e[16];
          for (int64_t j = 0; j < n; j++) {
            row_dots(&L->gate, r0 + j, x + x0 * H, rows_here, &g[0][j], 16, 0);
            row_dots(&L->up, r0 + j, x + x0 * H, rows_here, &u[0][j], 16, 0);
          }
          for (int64_t r = 0; r < rows_here; r++) {
            for (int64_t j = 0; j < n; j++) e[j] = -g[r][j];
            exp_sum(e, n, 0.f);
            for (int64_t j = 0; j < n; j++) act[(x0 + r) * m->inter + r0 + j] = g[r][j] / (1.f + e[j]) * u[r][j];
          }
        }
      }
      const cag_mat* down[1] = {&L->down};
      matvec(down, 1, act, R, h, H, 1);
    }
    for (int64_t r = 0; r < R; r++) rmsnorm(h + r * H, m->final_norm, H, m->eps, x + r * H);
    matvec(lm, 1, x, R, logits, m->vocab, 0);
  }
  free(buf);
  return 0;
}
