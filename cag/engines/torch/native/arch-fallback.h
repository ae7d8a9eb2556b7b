/* Which implementation each kernel of kernels.h resolves to in this build.
 *
 * A build is for exactly one kernel set (__init__.py passes -DCAG_SIMD_<SET> and the instruction-set flags
 * it needs) and compiles generic.c plus the set's own file. Every kernel the set's file does not define
 * is listed here as `#define cag_<kernel>_generic cag_<kernel>`: generic.c's portable function is then
 * compiled under the public name. The kernels a set does define keep their generic twin as
 * cag_<kernel>_generic (a reference the tests compare against).
 *
 * The SIMD sets' kernels are vec.h's, built on each set's own vector mapping and block decoders
 * (x86/avx2.c, x86/avx512.c, arm/neon.c); scores and weighted_sum also fall back to generic.c at run time
 * for a head dimension that is not a multiple of the set's vector width.
 *
 *   kernel            portable   avx2 (x86/avx2.c)   avx512 (x86/avx512.c)   neon (arm/neon.c)
 *   dots_q41          generic    avx2                avx512                  neon
 *   dots_q80          generic    avx2                avx512                  neon
 *   dots_f32          generic    avx2                avx512                  neon
 *   rmsnorm           generic    avx2                avx512                  neon
 *   silu_mul          generic    avx2                avx512                  neon
 *   scores            generic    avx2                avx512                  neon
 *   exp_sum           generic    avx2                avx512                  neon
 *   weighted_sum      generic    avx2                avx512                  neon
 *   max               generic    generic             generic                 generic
 *
 * (max is a few compares per chunk of 128 scores; generic.c writes it so compilers vectorize it.)
 */
#ifndef CAG_ARCH_FALLBACK_H
#define CAG_ARCH_FALLBACK_H

#if defined(CAG_SIMD_AVX512)
#if !(defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#error "CAG_SIMD_AVX512 needs -mavx512f -mavx2 -mfma -mf16c"
#endif
#define CAG_SIMD_NAME "AVX-512"
#define cag_max_generic cag_max

#elif defined(CAG_SIMD_AVX2)
#if !(defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#error "CAG_SIMD_AVX2 needs -mavx2 -mfma -mf16c"
#endif
#define CAG_SIMD_NAME "AVX2+FMA+F16C"
#define cag_max_generic cag_max

#elif defined(CAG_SIMD_NEON)
#if !(defined(__aarch64__) && defined(__ARM_NEON))
#error "CAG_SIMD_NEON needs an AArch64 target (NEON is part of its base instruction set)"
#endif
#define CAG_SIMD_NAME "NEON"
#define cag_max_generic cag_max

#elif defined(CAG_SIMD_PORTABLE)
#define CAG_SIMD_NAME "portable C"
#define cag_dots_q41_generic cag_dots_q41
#define cag_dots_q80_generic cag_dots_q80
#define cag_dots_f32_generic cag_dots_f32
#define cag_rmsnorm_generic cag_rmsnorm
#define cag_silu_mul_generic cag_silu_mul
#define cag_scores_generic cag_scores
#define cag_max_generic cag_max
#define cag_exp_sum_generic cag_exp_sum
#define cag_weighted_sum_generic cag_weighted_sum

#else
#error "define one kernel set: CAG_SIMD_PORTABLE, CAG_SIMD_AVX2, CAG_SIMD_AVX512 or CAG_SIMD_NEON"
#endif

#endif
