/* Weight blocks in ggml's Q4_1 / Q8_0 form and the per-row dot kernels over them, shared by the
 * matmul entry points (qmatmul.c) and the whole-model decoding step (step.c), so a row computed by
 * either is computed the same way.
 */
#ifndef CAG_QBLOCKS_H
#define CAG_QBLOCKS_H
#include <stdint.h>
#include <string.h>

#if (defined(__AVX512F__) || defined(__F16C__)) && !defined(CAG_PORTABLE)
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && !defined(CAG_PORTABLE)
#define CAG_AVX512 1
#endif

typedef struct { uint16_t d, m; uint8_t q[16]; } q41_block;  /* w[j] = d*(q[j]&15) + m, w[j+16] = d*(q[j]>>4) + m */
typedef struct { uint16_t d; int8_t q[32]; } q80_block;       /* w[j] = d*q[j] */

#define ROWS 8 /* rows of x computed together from one read of a weight row */

static inline float half_to_float(uint16_t h) {
#if defined(__F16C__) && !defined(CAG_PORTABLE)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) bits = sign;
    else { /* subnormal: normalize */
      int e = -1; uint32_t m = man;
      do { e++; m <<= 1; } while (!(m & 0x400));
      bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((m & 0x3ff) << 13);
    }
  } else if (exp == 31) bits = sign | 0x7f800000 | (man << 13);
  else bits = sign | ((exp + 112) << 23) | (man << 13);
  float f; memcpy(&f, &bits, 4); return f;
#endif
}

#ifdef CAG_AVX512
static inline __attribute__((always_inline)) void q41_rows(const float* x, int64_t K, const int R, int64_t nb,
                                                           const q41_block* w, float* y, int64_t N) {
  __m512 acc[ROWS][2];
  for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi32(15);
  for (int64_t b = 0; b < nb; b++) {
    const __m512 d = _mm512_set1_ps(half_to_float(w[b].d)), m = _mm512_set1_ps(half_to_float(w[b].m));
    const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)w[b].q));
    const __m512 w0 = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_and_si512(q, low)), m);
    const __m512 w1 = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4)), m);
    for (int r = 0; r < R; r++) {
      acc[r][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + r * K + b * 32), acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + r * K + b * 32 + 16), acc[r][1]);
    }
  }
  for (int r = 0; r < R; r++) y[r * N] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
}

static inline __attribute__((always_inline)) void q80_rows(const float* x, int64_t K, const int R, int64_t nb,
                                                           const q80_block* w, float* y, int64_t N) {
  __m512 acc[ROWS][2];
  for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; b++) {
    const __m512 d = _mm512_set1_ps(half_to_float(w[b].d));
    const __m512 w0 = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)w[b].q))));
    const __m512 w1 = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w[b].q + 16)))));
    for (int r = 0; r < R; r++) {
      acc[r][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + r * K + b * 32), acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + r * K + b * 32 + 16), acc[r][1]);
    }
  }
  for (int r = 0; r < R; r++) y[r * N] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
}
#else
static inline void accumulate(float acc[ROWS][32], const float* v, const float* x, int64_t K, int R) {
  for (int r = 0; r < R; r++)
    for (int j = 0; j < 32; j++) acc[r][j] += v[j] * x[r * K + j];
}

static inline void store(float acc[ROWS][32], int R, float* y, int64_t N) {
  for (int r = 0; r < R; r++) {
    float s = 0.f;
    for (int j = 0; j < 32; j++) s += acc[r][j];
    y[r * N] = s;
  }
}

static inline void q41_rows(const float* x, int64_t K, const int R, int64_t nb, const q41_block* w, float* y,
                            int64_t N) {
  float acc[ROWS][32];
  memset(acc, 0, sizeof acc);
  for (int64_t b = 0; b < nb; b++) {
    const float d = half_to_float(w[b].d), m = half_to_float(w[b].m);
    float v[32];
    for (int j = 0; j < 16; j++) {
      v[j] = d * (float)(w[b].q[j] & 15) + m;
      v[j + 16] = d * (float)(w[b].q[j] >> 4) + m;
    }
    accumulate(acc, v, x + b * 32, K, R);
  }
  store(acc, R, y, N);
}

static inline void q80_rows(const float* x, int64_t K, const int R, int64_t nb, const q80_block* w, float* y,
                            int64_t N) {
  float acc[ROWS][32];
  memset(acc, 0, sizeof acc);
  for (int64_t b = 0; b < nb; b++) {
    const float d = half_to_float(w[b].d);
    float v[32];
    for (int j = 0; j < 32; j++) v[j] = d * (float)w[b].q[j];
    accumulate(acc, v, x + b * 32, K, R);
  }
  store(acc, R, y, N);
}
#endif

#endif
