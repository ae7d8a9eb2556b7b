/* y[M,N] = x[M,K] @ W^T where W's values are stored in ggml's Q4_1 or Q8_0 block form, and the library's
 * other small entry points (which kernel set it is, the OpenMP runtime it sees).
 *
 * Why: decoding on a CPU reads every weight once per token, so its speed is memory bandwidth divided by
 * weight bytes. The default model's weights *are* Q4_1/Q8_0 values (it ships as a GGUF file), so keeping
 * them in that form reads ~7x fewer bytes than float32 while every weight used is bit for bit the float32
 * value (d*q + m is exact in float32). Only the order of the float32 sums differs from a BLAS matmul.
 *
 * Each (weight row, x row) pair goes through the block dot product of kernels.h, the same one the
 * decoding step (step.c) uses: a row's result is the same bits from either, whatever M is and whichever
 * thread computes it.
 */
#include "kernels.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#define TILE 16 /* weight rows per work item: they stay in the core's cache while every row of x meets them */

/* The name of the kernel set this library was built with (kernels.h). */
const char* cag_kernel_set(void) { return cag_simd_name; }

/* omp_get_max_threads() as this library's OpenMP runtime sees it in the calling thread, or 0 without
 * OpenMP: torch is imported before the library is loaded, so this is torch's runtime, and in the thread
 * that called torch.set_num_threads(n) it says n. (Other threads keep the runtime's default, which is why
 * every entry point takes its thread count explicitly.) */
int cag_openmp_threads(void) {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 0;
#endif
}

/* y[M,N] = x[M,K] @ W^T on `threads` threads (< 1: OpenMP's default), tiles of weight rows split over them. */
#define MATMUL(name, block, dots)                                                                    \
  void name(const float* x, int64_t M, int64_t K, const block* w, int64_t N, float* y, int threads) {  \
    const int64_t nb = K / 32, tiles = (N + TILE - 1) / TILE;                                        \
    (void)threads;                                                                                   \
    _Pragma("omp parallel for schedule(static) num_threads(threads > 0 ? threads : omp_get_max_threads())") \
    for (int64_t t = 0; t < tiles; t++) {                                                            \
      const int64_t n0 = t * TILE;                                                                   \
      dots(w + n0 * nb, nb, N - n0 < TILE ? N - n0 : TILE, x, K, M, y + n0, N);                      \
    }                                                                                                \
  }

MATMUL(cag_q41_matmul, q41_block, cag_dots_q41)
MATMUL(cag_q80_matmul, q80_block, cag_dots_q80)
