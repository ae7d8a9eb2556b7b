/* Checks of cag's CPU kernels (cag/engines/torch/native) as one program, for kernel sets Python cannot
 * load on the machine at hand: tests/engines/test_simd_kernels.py builds it for every set this CPU runs, and for NEON
 * with an AArch64 cross compiler, run under qemu. The same build also times a decoding step.
 *
 *   kernel_check kernels
 *       every kernel of the build's set against its portable twin (cag_*_generic, in the same binary) on
 *       random inputs, within float32 reordering tolerance; a row's block dot products the same bits alone
 *       as in any batch or tile; a key's attention score the same bits at any place in its chunk.
 *   kernel_check step LAYERS HIDDEN INTER HEADS KV_HEADS HEAD_DIM VOCAB PREFIX ROWS STEPS
 *       a random Q4_1 model (Q8_0 LM head) decodes STEPS tokens on a random PREFIX of keys/values: row 0
 *       alone on 1 thread, then beside ROWS-1 other rows on 2 threads, whose row-0 logits must be the same
 *       bits at every step; prints the last step's logits of row 0 as hex floats.
 *   kernel_check bench LAYERS ... STEPS (the same arguments)
 *       milliseconds per step of ROWS rows on OpenMP's default thread count (median of STEPS).
 *
 * Exit status 0 when every check passed; each failure is one line on stderr.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels.h"
#include "step.h"

static int failures = 0;

#define FAIL(...)                       \
  do {                                  \
    fprintf(stderr, "FAIL: " __VA_ARGS__); \
    fputc('\n', stderr);                \
    failures++;                         \
  } while (0)

/* ---- deterministic random inputs ----------------------------------------------------------------- */

static uint64_t rng = 0x9E3779B97F4A7C15ull;

static float uniform(float lo, float hi) { /* xorshift64* */
  rng ^= rng >> 12;
  rng ^= rng << 25;
  rng ^= rng >> 27;
  return lo + (hi - lo) * (float)((rng * 0x2545F4914F6CDD1Dull) >> 40) / 16777216.0f;
}

static uint16_t to_half(float f) { /* normal values only, mantissa truncated: enough for test data */
  uint32_t b;
  memcpy(&b, &f, 4);
  const uint32_t sign = (b >> 16) & 0x8000;
  const int32_t e = (int32_t)((b >> 23) & 0xff) - 127 + 15;
  if (e <= 0) return (uint16_t)sign;
  return (uint16_t)(sign | ((uint32_t)e << 10) | ((b >> 13) & 0x3ff));
}

static float* floats(int64_t n, float lo, float hi) {
  float* p = malloc((size_t)n * sizeof(float));
  for (int64_t i = 0; i < n; i++) p[i] = uniform(lo, hi);
  return p;
}

static void fill_q41(q41_block* b, int64_t count) {
  for (int64_t i = 0; i < count; i++) {
    const float d = uniform(0.001f, 0.02f);
    b[i].d = to_half(d);
    b[i].m = to_half(-d * uniform(4.f, 11.f));
    for (int j = 0; j < 16; j++) b[i].q[j] = (uint8_t)uniform(0.f, 256.f);
  }
}

static void fill_q80(q80_block* b, int64_t count) {
  for (int64_t i = 0; i < count; i++) {
    b[i].d = to_half(uniform(0.0005f, 0.005f));
    for (int j = 0; j < 32; j++) b[i].q[j] = (int8_t)uniform(-127.f, 128.f);
  }
}

/* The weights of a block row, for the reference magnitudes. */
static void decode(int kind, const void* row, int64_t nb, float* w) {
  for (int64_t b = 0; b < nb; b++) {
    if (kind == CAG_Q41) {
      const q41_block* k = (const q41_block*)row + b;
      for (int j = 0; j < 16; j++) {
        w[b * 32 + j] = cag_half(k->d) * (float)(k->q[j] & 15) + cag_half(k->m);
        w[b * 32 + j + 16] = cag_half(k->d) * (float)(k->q[j] >> 4) + cag_half(k->m);
      }
    } else {
      const q80_block* k = (const q80_block*)row + b;
      for (int j = 0; j < 32; j++) w[b * 32 + j] = cag_half(k->d) * (float)k->q[j];
    }
  }
}

static double abs_dot(const float* a, const float* b, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; i++) s += fabs((double)a[i] * b[i]);
  return s;
}

/* float32 sums in another order: within 1e-5 of the sum of the magnitudes of the terms. */
static int close(float got, float want, double magnitude) {
  return isfinite(got) && fabs((double)got - want) <= 1e-5 * magnitude + 1e-30;
}

/* ---- the kernels against their portable twins ------------------------------------------------------ */

typedef void (*block_dots)(const void*, int64_t, int64_t, const float*, int64_t, int64_t, float*, int64_t);

static void check_block_dots(const char* name, int kind, block_dots simd, block_dots generic) {
  const int64_t sizes[] = {1, 2, 3, 18, 48};
  const size_t bytes = kind == CAG_Q41 ? sizeof(q41_block) : sizeof(q80_block);
  for (size_t s = 0; s < sizeof sizes / sizeof *sizes; s++) {
    const int64_t nb = sizes[s], K = nb * 32, N = 5, R = 7, xs = K + 3, ys = N + 2;
    char* w = malloc((size_t)(N * nb) * bytes);
    if (kind == CAG_Q41) fill_q41((q41_block*)w, N * nb);
    else fill_q80((q80_block*)w, N * nb);
    float* x = floats(R * xs, -2.f, 2.f);
    float *y = calloc((size_t)(R * ys), sizeof(float)), *ref = calloc((size_t)(R * ys), sizeof(float));
    float* wf = malloc((size_t)K * sizeof(float));
    simd(w, nb, N, x, xs, R, y, ys);
    generic(w, nb, N, x, xs, R, ref, ys);
    for (int64_t i = 0; i < N; i++) {
      decode(kind, w + (size_t)(i * nb) * bytes, nb, wf);
      for (int64_t r = 0; r < R; r++) {
        const float got = y[r * ys + i], want = ref[r * ys + i];
        if (!close(got, want, abs_dot(wf, x + r * xs, K)))
          FAIL("%s nb=%ld row %ld x %ld: %.9g vs %.9g", name, (long)nb, (long)i, (long)r, got, want);
        float alone;
        simd(w + (size_t)(i * nb) * bytes, nb, 1, x + r * xs, xs, 1, &alone, 1);
        if (memcmp(&alone, &got, 4))
          FAIL("%s nb=%ld: row %ld x %ld alone %a, in a batch %a", name, (long)nb, (long)i, (long)r, alone, got);
      }
    }
    for (int64_t r0 = 0; r0 < R; r0 += 3) { /* other batch shapes: 3 rows from r0, all weight rows */
      float part[3 * 5];
      const int64_t g = R - r0 < 3 ? R - r0 : 3;
      simd(w, nb, N, x + r0 * xs, xs, g, part, N);
      for (int64_t r = 0; r < g; r++)
        if (memcmp(part + r * N, y + (r0 + r) * ys, (size_t)N * 4))
          FAIL("%s nb=%ld: rows from %ld differ in a batch of %ld", name, (long)nb, (long)r0, (long)g);
    }
    free(w), free(x), free(y), free(ref), free(wf);
  }
  printf("ok %s\n", name);
}

/* The block kernels as block_dots (untyped blocks), for check_block_dots. */
#define AS_BLOCK_DOTS(fn, block)                                                                      \
  static void fn##_untyped(const void* w, int64_t nb, int64_t n, const float* x, int64_t xs, int64_t R, \
                           float* y, int64_t ys) {                                                   \
    fn((const block*)w, nb, n, x, xs, R, y, ys);                                                     \
  }
AS_BLOCK_DOTS(cag_dots_q41, q41_block)
AS_BLOCK_DOTS(cag_dots_q41_generic, q41_block)
AS_BLOCK_DOTS(cag_dots_q80, q80_block)
AS_BLOCK_DOTS(cag_dots_q80_generic, q80_block)

static void check_dots_f32(void) {
  const int64_t sizes[] = {1, 7, 8, 33, 64, 100, 576};
  for (size_t s = 0; s < sizeof sizes / sizeof *sizes; s++) {
    const int64_t K = sizes[s], N = 3, R = 5;
    float *w = floats(N * K, -1.f, 1.f), *x = floats(R * K, -1.f, 1.f), y[15], ref[15];
    cag_dots_f32(w, K, N, x, K, R, y, N);
    cag_dots_f32_generic(w, K, N, x, K, R, ref, N);
    for (int64_t r = 0; r < R; r++)
      for (int64_t i = 0; i < N; i++) {
        if (!close(y[r * N + i], ref[r * N + i], abs_dot(w + i * K, x + r * K, K)))
          FAIL("dots_f32 K=%ld: %.9g vs %.9g", (long)K, y[r * N + i], ref[r * N + i]);
        float alone;
        cag_dots_f32(w + i * K, K, 1, x + r * K, K, 1, &alone, 1);
        if (memcmp(&alone, y + r * N + i, 4)) FAIL("dots_f32 K=%ld: a row alone differs from the batch", (long)K);
      }
    free(w), free(x);
  }
  printf("ok dots_f32\n");
}

static void check_rmsnorm_silu(void) {
  const int64_t sizes[] = {1, 5, 8, 16, 17, 40, 576};
  for (size_t s = 0; s < sizeof sizes / sizeof *sizes; s++) {
    const int64_t n = sizes[s];
    float *h = floats(n, -3.f, 3.f), *w = floats(n, 0.5f, 1.5f), *u = floats(n, -1.f, 1.f);
    float *out = malloc((size_t)n * 4), *ref = malloc((size_t)n * 4);
    cag_rmsnorm(h, w, n, 1e-5f, out);
    cag_rmsnorm_generic(h, w, n, 1e-5f, ref);
    for (int64_t i = 0; i < n; i++)
      if (!close(out[i], ref[i], fabs(ref[i])))
        FAIL("rmsnorm n=%ld [%ld]: %.9g vs %.9g", (long)n, (long)i, out[i], ref[i]);
    for (int64_t i = 0; i < n; i++) h[i] *= 7.f; /* gates in [-21, 21], and the far ends */
    h[0] = -100.f;
    if (n > 1) h[1] = 100.f;
    if (n > 2) h[2] = 0.f;
    cag_silu_mul(h, u, n, out);
    cag_silu_mul_generic(h, u, n, ref);
    for (int64_t i = 0; i < n; i++)
      if (!close(out[i], ref[i], fabs(ref[i])))
        FAIL("silu_mul n=%ld [%ld] (g=%g): %.9g vs %.9g", (long)n, (long)i, h[i], out[i], ref[i]);
    free(h), free(w), free(u), free(out), free(ref);
  }
  printf("ok rmsnorm\nok silu_mul\n");
}

static void check_attention(void) {
  const int64_t dims[] = {8, 16, 32, 64, 96, 128, 7};
  const int64_t counts[] = {1, 7, 8, 9, 16, 17, 100, 128};
  for (size_t a = 0; a < sizeof dims / sizeof *dims; a++)
    for (size_t c = 0; c < sizeof counts / sizeof *counts; c++) {
      const int64_t hd = dims[a], n = counts[c];
      float *q = floats(hd, -1.f, 1.f), *kv = floats(2 * 128 * hd, -1.f, 1.f);
      const float* keys[128];
      const float* values[128];
      for (int64_t t = 0; t < n; t++) { /* scattered rows: the kernels see only their addresses */
        keys[t] = kv + ((t * 37) % 128) * hd;
        values[t] = kv + (128 + (t * 11) % 128) * hd;
      }
      const float scale = 0.125f;
      float s[128], ref[128], p[128], o[128], oref[128];
      cag_scores(q, keys, n, hd, scale, s);
      cag_scores_generic(q, keys, n, hd, scale, ref);
      for (int64_t t = 0; t < n; t++) {
        if (!close(s[t], ref[t], abs_dot(q, keys[t], hd) * scale))
          FAIL("scores hd=%ld n=%ld [%ld]: %.9g vs %.9g", (long)hd, (long)n, (long)t, s[t], ref[t]);
        float alone;
        cag_scores(q, keys + t, 1, hd, scale, &alone);
        if (memcmp(&alone, s + t, 4))
          FAIL("scores hd=%ld n=%ld: key %ld alone %a, in the chunk %a", (long)hd, (long)n, (long)t, alone, s[t]);
      }
      if (cag_max(s, n) != cag_max_generic(s, n)) FAIL("max n=%ld", (long)n);
      for (int64_t t = 0; t < n; t++) s[t] = ref[t] = t % 5 == 4 ? -100.f : uniform(-30.f, 0.f);
      const float sum = cag_exp_sum(s, n, -1.f), sum_ref = cag_exp_sum_generic(ref, n, -1.f);
      if (!close(sum, sum_ref, sum_ref)) FAIL("exp_sum n=%ld: %.9g vs %.9g", (long)n, sum, sum_ref);
      for (int64_t t = 0; t < n; t++) {
        if (!close(s[t], ref[t], 0.1 * fabs(ref[t])))
          FAIL("exp n=%ld [%ld]: %.9g vs %.9g", (long)n, (long)t, s[t], ref[t]);
        p[t] = uniform(0.f, 1.f);
      }
      cag_weighted_sum(p, values, n, hd, o);
      cag_weighted_sum_generic(p, values, n, hd, oref);
      for (int64_t i = 0; i < hd; i++) {
        double magnitude = 0;
        for (int64_t t = 0; t < n; t++) magnitude += fabs((double)p[t] * values[t][i]);
        if (!close(o[i], oref[i], magnitude))
          FAIL("weighted_sum hd=%ld n=%ld [%ld]: %.9g vs %.9g", (long)hd, (long)n, (long)i, o[i], oref[i]);
      }
      free(q), free(kv);
    }
  printf("ok scores\nok max\nok exp_sum\nok weighted_sum\n");
}

/* ---- a random model decoding ---------------------------------------------------------------------- */

typedef struct {
  cag_model m;
  cag_layer* layers;
  float* embed;
  float *cos, *sin;
  float **shared_k, **shared_v;
  cag_shared shared;
  int64_t prefix;
} random_model;

static cag_mat q41_mat(int64_t rows, int64_t cols) {
  q41_block* b = malloc((size_t)(rows * cols / 32) * sizeof(q41_block));
  fill_q41(b, rows * cols / 32);
  return (cag_mat){CAG_Q41, rows, cols, b};
}

static float* norm_weights(int64_t n) { return floats(n, 0.8f, 1.2f); }

static void build(random_model* r, char** a) {
  cag_model* m = &r->m;
  m->n_layers = atol(a[0]), m->hidden = atol(a[1]), m->inter = atol(a[2]), m->heads = atol(a[3]);
  m->kv_heads = atol(a[4]), m->head_dim = atol(a[5]), m->vocab = atol(a[6]);
  r->prefix = atol(a[7]);
  m->eps = 1e-5f, m->scale = 1.f / sqrtf((float)m->head_dim);
  const int64_t H = m->hidden, hd = m->head_dim, L = m->n_layers;
  r->layers = calloc((size_t)L, sizeof(cag_layer));
  for (int64_t l = 0; l < L; l++) {
    cag_layer* y = r->layers + l;
    y->in_norm = norm_weights(H), y->post_norm = norm_weights(H);
    y->q = q41_mat(m->heads * hd, H), y->k = q41_mat(m->kv_heads * hd, H), y->v = q41_mat(m->kv_heads * hd, H);
    y->o = q41_mat(H, m->heads * hd), y->gate = q41_mat(m->inter, H), y->up = q41_mat(m->inter, H);
    y->down = q41_mat(H, m->inter);
  }
  m->layers = r->layers;
  m->final_norm = norm_weights(H);
  q80_block* lm = malloc((size_t)(m->vocab * H / 32) * sizeof(q80_block));
  fill_q80(lm, m->vocab * H / 32);
  m->lm_head = (cag_mat){CAG_Q80, m->vocab, H, lm};
  r->embed = floats(m->vocab * H, -0.1f, 0.1f);
  const int64_t positions = r->prefix + 4096;
  r->cos = malloc((size_t)(positions * hd) * 4), r->sin = malloc((size_t)(positions * hd) * 4);
  for (int64_t p = 0; p < positions; p++)
    for (int64_t i = 0; i < hd; i++) {
      const float angle = (float)p * powf(10000.f, -(float)(2 * (i % (hd / 2))) / (float)hd);
      r->cos[p * hd + i] = cosf(angle), r->sin[p * hd + i] = sinf(angle);
    }
  r->shared_k = malloc((size_t)L * sizeof(float*)), r->shared_v = malloc((size_t)L * sizeof(float*));
  for (int64_t l = 0; l < L; l++) {
    r->shared_k[l] = floats(m->kv_heads * (r->prefix + 1) * hd, -2.f, 2.f);
    r->shared_v[l] = floats(m->kv_heads * (r->prefix + 1) * hd, -1.f, 1.f);
  }
  r->shared = (cag_shared){(const float* const*)r->shared_k, (const float* const*)r->shared_v, r->prefix + 1};
}

typedef struct {
  float **k, **v;
  int64_t length;
} own_kv;

static own_kv fresh(const random_model* r, int64_t cap) {
  own_kv o = {malloc((size_t)r->m.n_layers * sizeof(float*)), malloc((size_t)r->m.n_layers * sizeof(float*)), 0};
  for (int64_t l = 0; l < r->m.n_layers; l++) {
    o.k[l] = calloc((size_t)(r->m.kv_heads * cap * r->m.head_dim), 4);
    o.v[l] = calloc((size_t)(r->m.kv_heads * cap * r->m.head_dim), 4);
  }
  return o;
}

static int64_t token(int64_t row, int64_t step, int64_t vocab) { return (7 * step + 3 + 101 * row) % vocab; }

/* One step of rows[0..R) (row i decodes token(i, its length)); logits[R][vocab]. */
static int run_step(const random_model* r, own_kv* own, int64_t R, int64_t cap, float* logits, int threads) {
  cag_row rows[64] = {{0}};
  const int64_t hd = r->m.head_dim;
  for (int64_t i = 0; i < R; i++) {
    const int64_t pos = r->prefix + own[i].length;
    rows[i] = (cag_row){r->embed + token(i, own[i].length, r->m.vocab) * r->m.hidden, r->cos + pos * hd,
                        r->sin + pos * hd, pos, r->prefix, (float* const*)own[i].k, (float* const*)own[i].v, cap};
  }
  const int team = cag_step(&r->m, &r->shared, rows, R, logits, threads);
  for (int64_t i = 0; i < R; i++) own[i].length++;
  return team;
}

static int step_check(char** a) {
  random_model r;
  build(&r, a);
  const int64_t R = atol(a[8]), steps = atol(a[9]), V = r.m.vocab;
  if (R < 1 || R > 64) return fprintf(stderr, "ROWS must be 1..64\n"), 2;
  own_kv alone = fresh(&r, steps), batch[64];
  for (int64_t i = 0; i < R; i++) batch[i] = fresh(&r, steps);
  float *one = malloc((size_t)V * 4), *many = malloc((size_t)(R * V) * 4);
  for (int64_t s = 0; s < steps; s++) {
    if (run_step(&r, &alone, 1, steps, one, 1) < 1 || run_step(&r, batch, R, steps, many, 2) < 1) return 3;
    if (memcmp(one, many, (size_t)V * 4))
      FAIL("step %ld: row 0 alone on 1 thread != beside %ld rows on 2 threads", (long)s, (long)(R - 1));
  }
  printf("logits %ld\n", (long)V);
  for (int64_t i = 0; i < V; i++) printf("%a\n", one[i]);
  return failures ? 1 : 0;
}

static double now_ms(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static int compare_doubles(const void* x, const void* y) {
  const double a = *(const double*)x, b = *(const double*)y;
  return (a > b) - (a < b);
}

static int bench(char** a) {
  random_model r;
  build(&r, a);
  const int64_t R = atol(a[8]), steps = atol(a[9]);
  if (R < 1 || R > 64 || steps < 1) return fprintf(stderr, "ROWS must be 1..64, STEPS at least 1\n"), 2;
  own_kv own[64];
  for (int64_t i = 0; i < R; i++) own[i] = fresh(&r, steps + 1);
  float* logits = malloc((size_t)(R * r.m.vocab) * 4);
  double* ms = malloc((size_t)steps * sizeof(double));
  int team = run_step(&r, own, R, steps + 1, logits, 0); /* warm-up */
  for (int64_t s = 0; s < steps; s++) {
    const double t0 = now_ms();
    run_step(&r, own, R, steps + 1, logits, 0);
    ms[s] = now_ms() - t0;
  }
  qsort(ms, (size_t)steps, sizeof(double), compare_doubles);
  printf("%s: %d threads, %ld rows: %.3f ms per step (median of %ld), best %.3f\n", cag_simd_name, team, (long)R,
         ms[steps / 2], (long)steps, ms[0]);
  return 0;
}

int main(int argc, char** argv) {
  if (argc == 2 && !strcmp(argv[1], "kernels")) {
    printf("kernel set: %s\n", cag_simd_name);
    check_block_dots("dots_q41", CAG_Q41, cag_dots_q41_untyped, cag_dots_q41_generic_untyped);
    check_block_dots("dots_q80", CAG_Q80, cag_dots_q80_untyped, cag_dots_q80_generic_untyped);
    check_dots_f32();
    check_rmsnorm_silu();
    check_attention();
    return failures ? 1 : 0;
  }
  if (argc == 12 && !strcmp(argv[1], "step")) return step_check(argv + 2);
  if (argc == 12 && !strcmp(argv[1], "bench")) return bench(argv + 2);
  fprintf(stderr, "usage: kernel_check kernels\n"
                  "       kernel_check step|bench LAYERS HIDDEN INTER HEADS KV_HEADS HEAD_DIM VOCAB PREFIX ROWS STEPS\n");
  return 2;
}
