/* AVX2 + FMA + F16C kernels (x86-64 since Intel Haswell and AMD Zen 1): 8 floats per register, 16
 * registers. Built with -mavx2 -mfma -mf16c for the "avx2" kernel set. This file maps vec.h's vector
 * operations onto these instructions and decodes the weight blocks; the kernels themselves are vec.h's.
 */
#include <immintrin.h>

#include "../kernels.h"
#include "../vec-map.h"

typedef __m256 vec;
#define LANES 8
/* A Q4_1 block is 4 registers, one accumulator each per row: a row's chain of dependent additions is one
 * FMA per block, so a single row (one answer decoding, the common case) runs at the FMA units' throughput
 * rather than their latency. Two rows x 4 accumulators, the decoded block and the constants fill the 16
 * registers: rows go in pairs. */
#define ROWS 2
#define Q41_SETS 1

VEC_MAP(_mm256_set1_ps, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_add_ps, _mm256_sub_ps, _mm256_mul_ps, _mm256_div_ps,
        _mm256_fmadd_ps, _mm256_min_ps, _mm256_max_ps)
static inline vec vround(vec x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vec vpow2(vec p, vec n) { /* 2^n built in the exponent field */
  return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n),
                                                                                  _mm256_set1_epi32(127)), 23)));
}
static inline vec vzero_below(vec v, vec x, vec bound) {
  return _mm256_andnot_ps(_mm256_cmp_ps(x, bound, _CMP_LT_OQ), v);
}

/* Halving tree: ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7)). */
static inline float vsum(vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1)); /* s_j = l_j + l_j+4 */
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));                                         /* s0+s2, s1+s3 */
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* Lane j is vsum(v[j]), bit for bit: the same additions, eight vectors at a time. */
static inline vec vsum_lanes(const vec v[8]) {
  __m256 s[4], t[2];
  for (int j = 0; j < 4; j++) /* [s(v_j) | s(v_j+4)]: each vector's 128-bit halves added */
    s[j] = _mm256_add_ps(_mm256_permute2f128_ps(v[j], v[j + 4], 0x20), _mm256_permute2f128_ps(v[j], v[j + 4], 0x31));
  for (int j = 0; j < 2; j++) /* [s0+s2, s1+s3] of two vectors per 128-bit half */
    t[j] = _mm256_add_ps(_mm256_shuffle_ps(s[2 * j], s[2 * j + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm256_shuffle_ps(s[2 * j], s[2 * j + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm256_add_ps(_mm256_shuffle_ps(t[0], t[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm256_shuffle_ps(t[0], t[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* The first four bytes of a block as floats: a Q4_1 block's d and m in lanes 0 and 1, a Q8_0 block's d in
 * lane 0 (F16C converts the half floats exactly). */
static inline __m128 block_scales(const void* block) {
  int32_t bits;
  memcpy(&bits, block, 4);
  return _mm_cvtph_ps(_mm_cvtsi32_si128(bits));
}

/* A Q4_1 block's weights: d*q + m (d*q is exact, so the sum rounds once, to the weight itself), weights 0-7,
 * 8-15 (low nibbles of bytes 0-7, 8-15), 16-23, 24-31 (their high nibbles). */
static inline void q41_decode(const q41_block* blk, vec v[4]) {
  const __m256i low = _mm256_set1_epi32(15);
  const __m128 dm = block_scales(blk);
  const __m256 d = _mm256_broadcastss_ps(dm), m = _mm256_broadcastss_ps(_mm_movehdup_ps(dm));
  const __m256i q0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)blk->q));       /* bytes 0-7 */
  const __m256i q1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(blk->q + 8))); /* bytes 8-15 */
  v[0] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_and_si256(q0, low)), m);
  v[1] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_and_si256(q1, low)), m);
  v[2] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_srli_epi32(q0, 4)), m);
  v[3] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_srli_epi32(q1, 4)), m);
}

static inline vec q80_decode(const q80_block* blk, vec q[4]) {
  for (int k = 0; k < 4; k++)
    q[k] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(blk->q + 8 * k))));
  return _mm256_broadcastss_ps(block_scales(blk));
}

#include "../vec.h"
