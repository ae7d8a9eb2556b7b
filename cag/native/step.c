/* One decoding step of a Llama-family model in one call: every layer, the final norm and the LM head.
 *
 * Why: decoding one token runs ~30 layers of small operations. Driven from Python, each layer costs a few
 * dozen tensor calls (~0.2 ms per layer on a 2-core CPU), as much as its matmuls; and attention over a
 * long cached prefix must read every key and value once, which a generic kernel does with several passes.
 * Here the whole step is a single OpenMP region over preallocated KV buffers: rows of each matmul are
 * split over the threads, attention reads each key/value row once for all query heads that share it
 * (grouped-query attention), and the new key/value is written in place at its position.
 *
 * The arithmetic is float32 throughout, in a fixed order: the same token at the same position gives
 * the same bits whatever the thread count, because matmul rows are independent, attention works on
 * fixed 128-key chunks merged in order, and per-thread scratch is recomputed identically. It is not
 * transformers' order of operations (its sums, exp and softmax differ in the last bits), so cag checks
 * its logits against transformers' forward within a tolerance on first use (cag/fastdecode.py), and
 * every generated token of every mode (cached, no-cache) goes through this same step.
 *
 * Weights: float32 rows, or Q4_1/Q8_0 blocks (qblocks.h, the same row kernels as qmatmul.c).
 * KV buffers: float32 [kv_heads, capacity, head_dim] per layer (cag's workspace layout).
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

#define CHUNK 128 /* keys per attention work item; fixed, so the result never depends on the thread count */

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

#ifdef CAG_AVX512
/* One Q4_1 row times x. Per block the 16 weight values d*i + m (i = 0..15) are made once and looked up
 * by the 4-bit codes (vpermps reads only the low 4 bits of each index), two blocks per iteration with
 * four accumulators. Exact weights; only the order of the float32 sums is this kernel's own. */
static inline float q41_dot(const float* x, const q41_block* w, int64_t nb) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  const __m512 iota = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  int64_t b = 0;
#define CAG_Q41_LUT(blk) ({ int32_t dm_; memcpy(&dm_, &(blk), 4); \
    const __m512 f_ = _mm512_cvtph_ps(_mm256_set1_epi32(dm_)); /* d, m, d, m, ... */ \
    _mm512_fmadd_ps(_mm512_moveldup_ps(f_), iota, _mm512_movehdup_ps(f_)); })
  for (; b + 2 <= nb; b += 2) {
    const __m512 lut0 = CAG_Q41_LUT(w[b]), lut1 = CAG_Q41_LUT(w[b + 1]);
    const __m512i q0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)w[b].q));
    const __m512i q1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)w[b + 1].q));
    a0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(q0, lut0), _mm512_loadu_ps(x + b * 32), a0);
    a1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(q0, 4), lut0), _mm512_loadu_ps(x + b * 32 + 16), a1);
    a2 = _mm512_fmadd_ps(_mm512_permutexvar_ps(q1, lut1), _mm512_loadu_ps(x + b * 32 + 32), a2);
    a3 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(q1, 4), lut1), _mm512_loadu_ps(x + b * 32 + 48), a3);
  }
  if (b < nb) {
    const __m512 lut = CAG_Q41_LUT(w[b]);
    const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)w[b].q));
    a0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(q, lut), _mm512_loadu_ps(x + b * 32), a0);
    a1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), lut), _mm512_loadu_ps(x + b * 32 + 16), a1);
  }
#undef CAG_Q41_LUT
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a2), _mm512_add_ps(a1, a3)));
}

/* One Q8_0 row times x: d * (q . x) per block, two blocks per iteration. */
static inline float q80_dot(const float* x, const q80_block* w, int64_t nb) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0;
  int64_t b = 0;
#define CAG_Q80_PART(blk, xb) _mm512_fmadd_ps( \
    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)((blk).q + 16)))), _mm512_loadu_ps((xb) + 16), \
    _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(blk).q))), _mm512_loadu_ps(xb)))
  for (; b + 2 <= nb; b += 2) {
    a0 = _mm512_fmadd_ps(_mm512_set1_ps(half_to_float(w[b].d)), CAG_Q80_PART(w[b], x + b * 32), a0);
    a1 = _mm512_fmadd_ps(_mm512_set1_ps(half_to_float(w[b + 1].d)), CAG_Q80_PART(w[b + 1], x + b * 32 + 32), a1);
  }
  if (b < nb) a0 = _mm512_fmadd_ps(_mm512_set1_ps(half_to_float(w[b].d)), CAG_Q80_PART(w[b], x + b * 32), a0);
#undef CAG_Q80_PART
  return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}
#endif

static inline float row_dot(const cag_mat* m, int64_t n, const float* x) {
  const int64_t K = m->cols, nb = K / 32;
  float y;
  switch (m->kind) {
#ifdef CAG_AVX512
    case CAG_Q41: y = q41_dot(x, (const q41_block*)m->data + n * nb, nb); break;
    case CAG_Q80: y = q80_dot(x, (const q80_block*)m->data + n * nb, nb); break;
#else
    case CAG_Q41: q41_rows(x, K, 1, nb, (const q41_block*)m->data + n * nb, &y, 1); break;
    case CAG_Q80: q80_rows(x, K, 1, nb, (const q80_block*)m->data + n * nb, &y, 1); break;
#endif
    default: y = dot_f32((const float*)m->data + n * K, x, K);
  }
  return y;
}

/* y = [mats stacked] @ x (or y += when accumulate), rows split over the team. Ends with a barrier. */
static void matvec(const cag_mat* const* mats, int count, const float* x, float* y, int accumulate) {
  int64_t total = 0;
  for (int c = 0; c < count; c++) total += mats[c]->rows;
#pragma omp for schedule(static)
  for (int64_t n = 0; n < total; n++) {
    int c = 0;
    int64_t r = n;
    while (r >= mats[c]->rows) r -= mats[c++]->rows;
    const float v = row_dot(mats[c], r, x);
    y[n] = accumulate ? y[n] + v : v;
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

/* Attention of G query heads over n keys/values of one KV head (rows hd apart): per head, the chunk's
 * running max m, sum of exponentials l and unnormalized output o, written to part[g*pstride ...]. */
static void attend_chunk(const float* q, int64_t G, const float* K, const float* V, int64_t n, int64_t hd,
                         float scale, float* part, int64_t pstride) {
  float s[CHUNK];
  for (int64_t g = 0; g < G; g++) {
    const float* qg = q + g * hd;
    int64_t t = 0;
#ifdef CAG_AVX512
    if (hd % 16 == 0) {
      for (; t + 16 <= n; t += 16) {
        __m512 acc[16];
        for (int j = 0; j < 16; j++) {
          const float* k = K + (t + j) * hd;
          __m512 a = _mm512_mul_ps(_mm512_loadu_ps(qg), _mm512_loadu_ps(k));
          for (int64_t i = 16; i < hd; i += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(qg + i), _mm512_loadu_ps(k + i), a);
          acc[j] = a;
        }
        _mm512_storeu_ps(s + t, _mm512_mul_ps(hsum16(acc), _mm512_set1_ps(scale)));
      }
    }
#endif
    for (; t < n; t++) s[t] = dot_f32(qg, K + t * hd, hd) * scale;
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
          const float* v = V + t * hd + i;
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
      const float p = s[t], *v = V + t * hd;
      for (int64_t i = 0; i < hd; i++) o[i] += p * v[i];
    }
  }
}

/* ---- the step ------------------------------------------------------------------------------------ */

/* Bytes of scratch cag_step needs at a given position (the caller may pass NULL to let it allocate). */
int64_t cag_step_scratch(const cag_model* m, int64_t pos, int64_t threads) {
  const int64_t hd = m->head_dim, chunks = (pos + CHUNK) / CHUNK;
  return (int64_t)sizeof(float) * (m->hidden + (m->heads + 2 * m->kv_heads) * hd + m->heads * hd +
                                   m->heads * chunks * (hd + 2) + m->inter + threads * m->hidden);
}

/* logits[vocab] for the token whose embedding row is `embedding`, at position `pos` after pos cached
 * positions; writes that token's keys/values at `pos` in every layer's k/v buffer ([kv_heads, capacity,
 * head_dim] each). cos/sin: the rotary table's row for `pos`. Returns 0, or -1 if out of memory. */
int cag_step(const cag_model* m, float* const* k_cache, float* const* v_cache, int64_t capacity,
             const float* embedding, int64_t pos, const float* cos, const float* sin, float* logits) {
  const int64_t H = m->hidden, hd = m->head_dim, nq = m->heads * hd, nkv = m->kv_heads * hd;
  const int64_t G = m->heads / m->kv_heads, keys = pos + 1, chunks = (keys + CHUNK - 1) / CHUNK;
  const int64_t pstride = hd + 2;
  int threads = 1;
#ifdef _OPENMP
  threads = omp_get_max_threads();
#endif
  float* buf = malloc((size_t)cag_step_scratch(m, pos, threads));
  if (!buf) return -1;
  float* h = buf;
  float* qkv = h + H;
  float* attn = qkv + nq + 2 * nkv;
  float* part = attn + nq;
  float* act = part + m->heads * chunks * pstride;
  float* scratch = act + m->inter;
  memcpy(h, embedding, (size_t)H * sizeof(float));
  const cag_mat* lm[1] = {&m->lm_head};

#pragma omp parallel num_threads(threads)
  {
    int me = 0;
#ifdef _OPENMP
    me = omp_get_thread_num();
#endif
    float* x = scratch + (int64_t)me * H;
    for (int64_t l = 0; l < m->n_layers; l++) {
      const cag_layer* L = m->layers + l;
      float *kc = k_cache[l], *vc = v_cache[l];
      const cag_mat* qkv_mats[3] = {&L->q, &L->k, &L->v};
      rmsnorm(h, L->in_norm, H, m->eps, x);
      matvec(qkv_mats, 3, x, qkv, 0);
#pragma omp for schedule(static)
      for (int64_t i = 0; i < m->heads + m->kv_heads; i++) { /* q heads, then k heads (contiguous in qkv) */
        rope(qkv + i * hd, cos, sin, hd);
        if (i >= m->heads) {
          const int64_t g = i - m->heads;
          memcpy(kc + (g * capacity + pos) * hd, qkv + i * hd, (size_t)hd * sizeof(float));
          memcpy(vc + (g * capacity + pos) * hd, qkv + nq + nkv + g * hd, (size_t)hd * sizeof(float));
        }
      }
#pragma omp for schedule(static)
      for (int64_t it = 0; it < m->kv_heads * chunks; it++) {
        const int64_t g = it / chunks, c = it % chunks, t0 = c * CHUNK;
        const int64_t n = keys - t0 < CHUNK ? keys - t0 : CHUNK;
        attend_chunk(qkv + g * G * hd, G, kc + (g * capacity + t0) * hd, vc + (g * capacity + t0) * hd, n, hd,
                     m->scale, part + (g * G * chunks + c) * pstride, chunks * pstride);
      }
#pragma omp for schedule(static)
      for (int64_t head = 0; head < m->heads; head++) { /* merge the chunks in order */
        const float* p = part + head * chunks * pstride;
        float mx = p[0];
        for (int64_t c = 1; c < chunks; c++) mx = p[c * pstride] > mx ? p[c * pstride] : mx;
        float total = 0.f, *o = attn + head * hd;
        memset(o, 0, (size_t)hd * sizeof(float));
        for (int64_t c = 0; c < chunks; c++) {
          const float* pc = p + c * pstride;
          const float w = expf(pc[0] - mx);
          total += pc[1] * w;
          for (int64_t i = 0; i < hd; i++) o[i] += pc[2 + i] * w;
        }
        for (int64_t i = 0; i < hd; i++) o[i] /= total;
      }
      const cag_mat* o_mat[1] = {&L->o};
      matvec(o_mat, 1, attn, h, 1);
      rmsnorm(h, L->post_norm, H, m->eps, x);
#pragma omp for schedule(static)
      for (int64_t b = 0; b < (m->inter + 15) / 16; b++) { /* act = silu(gate x) * (up x), 16 rows at a time */
        const int64_t r0 = b * 16, n = m->inter - r0 < 16 ? m->inter - r0 : 16;
        float g[16], u[16], e[16];
        for (int64_t j = 0; j < n; j++) {
          g[j] = row_dot(&L->gate, r0 + j, x);
          u[j] = row_dot(&L->up, r0 + j, x);
          e[j] = -g[j];
        }
        exp_sum(e, n, 0.f);
        for (int64_t j = 0; j < n; j++) act[r0 + j] = g[j] / (1.f + e[j]) * u[j];
      }
      const cag_mat* down[1] = {&L->down};
      matvec(down, 1, act, h, 1);
    }
    rmsnorm(h, m->final_norm, H, m->eps, x);
    matvec(lm, 1, x, logits, 0);
  }
  free(buf);
  return 0;
}
