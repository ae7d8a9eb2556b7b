/* AVX-512 kernels (Intel Skylake-SP and later server/workstation chips, AMD Zen 4 and later): 16 floats per
 * register, 32 registers. Built with -mavx512f -mavx2 -mfma -mf16c for the "avx512" kernel set. This file
 * maps vec.h's vector operations onto these instructions and decodes the weight blocks; the kernels
 * themselves are vec.h's.
 */
#include <immintrin.h>

#include "../kernels.h"
#include "../vec-map.h"

typedef __m512 vec;
#define LANES 16
/* A Q4_1 block is only 2 registers, so blocks alternate between two sets of accumulators (a row's chain
 * stays one FMA per block); 4 rows x 4 accumulators and the decoded blocks fit the 32 registers. */
#define ROWS 4
#define Q41_SETS 2

VEC_MAP(_mm512_set1_ps, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_add_ps, _mm512_sub_ps, _mm512_mul_ps, _mm512_div_ps,
        _mm512_fmadd_ps, _mm512_min_ps, _mm512_max_ps)
static inline vec vround(vec x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vec vpow2(vec p, vec n) { return _mm512_scalef_ps(p, n); }
static inline vec vzero_below(vec v, vec x, vec bound) {
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, bound, _CMP_NLT_UQ), v);
}

/* Halving tree: lanes j and j+8, then j and j+4, then j and j+2, then the last two. */
static inline float vsum(vec v) {
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* Lane j is vsum(v[j]), bit for bit: the same additions, sixteen vectors at a time. */
static inline vec vsum_lanes(const vec v[16]) {
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

/* A Q4_1 block's weights: the 16 values d*i + m (i = 0..15, exact) made once and looked up by the 4-bit
 * codes (vpermps reads only the low 4 bits of each index): weights 0-15 (low nibbles), 16-31 (high). */
static inline void q41_decode(const q41_block* blk, vec v[2]) {
  int32_t dm;
  memcpy(&dm, blk, 4);
  const __m512 f = _mm512_cvtph_ps(_mm256_set1_epi32(dm)); /* d, m, d, m, ... */
  const __m512 iota = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512 lut = _mm512_fmadd_ps(_mm512_moveldup_ps(f), iota, _mm512_movehdup_ps(f));
  const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)blk->q));
  v[0] = _mm512_permutexvar_ps(q, lut);
  v[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), lut);
}

static inline vec q80_decode(const q80_block* blk, vec q[2]) {
  for (int k = 0; k < 2; k++)
    q[k] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(blk->q + 16 * k))));
  return _mm512_set1_ps(cag_half(blk->d));
}

#include "../vec.h"
