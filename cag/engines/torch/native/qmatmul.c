/* y[M,N] = x[M,K] @ W^T where W's values are stored in ggml's Q4_1 or Q8_0 block form.
 *
 * Why: decoding on a CPU reads every weight once per token, so its speed is memory bandwidth divided
 * by weight bytes. The default model's weights *are* Q4_1/Q8_0 values (it ships as a GGUF file), so
 * keeping them in that form reads ~7x fewer bytes than float32 while every weight used is bit for bit
 * the float32 value (d*q + m is exact in float32). Only the order of the float32 sums differs from a
 * BLAS matmul. Rows are computed the same way whatever M is and whichever thread runs them, so a
 * row's result never depends on the batch it is in.
 *
 * Built at first use by cag/native/__init__.py with the machine's C compiler (-O3 -march=native
 * -fopenmp); AVX-512 when the CPU has it, portable C otherwise (or when CAG_PORTABLE is defined).
 */
#include "qblocks.h"

int cag_qmatmul_avx512(void) {
#ifdef CAG_AVX512
  return 1;
#else
  return 0;
#endif
}

/* One switch per weight row so R is a constant inside q*_rows and the accumulators stay in registers. */
#define DISPATCH(fn, R, ...) switch (R) { \
  case 1: fn(__VA_ARGS__, 1, nb, row, out, N); break; case 2: fn(__VA_ARGS__, 2, nb, row, out, N); break; \
  case 3: fn(__VA_ARGS__, 3, nb, row, out, N); break; case 4: fn(__VA_ARGS__, 4, nb, row, out, N); break; \
  case 5: fn(__VA_ARGS__, 5, nb, row, out, N); break; case 6: fn(__VA_ARGS__, 6, nb, row, out, N); break; \
  case 7: fn(__VA_ARGS__, 7, nb, row, out, N); break; default: fn(__VA_ARGS__, 8, nb, row, out, N); break; }

/* y[M,N] = x[M,K] @ W^T, one weight row per iteration, split across OpenMP threads. */
#define MATMUL(name, block, rows_fn)                                                   \
  void name(const float* x, int64_t M, int64_t K, const block* w, int64_t N, float* y) { \
    const int64_t nb = K / 32;                                                         \
    _Pragma("omp parallel for schedule(static)")                                      \
    for (int64_t n = 0; n < N; n++) {                                                  \
      const block* row = w + n * nb;                                                   \
      for (int64_t m0 = 0; m0 < M; m0 += ROWS) {                                       \
        const int R = (int)(M - m0 < ROWS ? M - m0 : ROWS);                            \
        float* out = y + m0 * N + n;                                                   \
        DISPATCH(rows_fn, R, x + m0 * K, K)                                            \
      }                                                                                \
    }                                                                                  \
  }

MATMUL(cag_q41_matmul, q41_block, q41_rows)
MATMUL(cag_q80_matmul, q80_block, q80_rows)
