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
 * Weights: float32 rows, or Q4_1/Q8_0 blocks. The arithmetic is in the kernels of kernels.h (one kernel set
 * per build: portable C, AVX2, AVX-512 or NEON); this file only arranges it.
 * KV: float32 [kv_heads, positions, head_dim] per layer, for the shared prefix and for each answer.
 */
#include <math.h>
#include <stdlib.h>

#include "kernels.h"
#include "step.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#define CHUNK 128 /* keys per attention work item; fixed, so the result never depends on the thread count */
#define GROUP 4   /* rows of x per call of a block dot kernel (bounds the scratch on the stack) */
#define TILE 16   /* weight rows per work item of a matvec */

/* ---- the pieces of a layer ----------------------------------------------------------------------- */

/* y[r*ys + i] = (row n0+i of m) . x[r] for i < n, r < R (x's rows m->cols apart): the kernel of m's format. */
static void mat_dots(const cag_mat* m, int64_t n0, int64_t n, const float* x, int64_t R, float* y, int64_t ys) {
  const int64_t K = m->cols, nb = K / 32;
  switch (m->kind) {
    case CAG_Q41: cag_dots_q41((const q41_block*)m->data + n0 * nb, nb, n, x, K, R, y, ys); break;
    case CAG_Q80: cag_dots_q80((const q80_block*)m->data + n0 * nb, nb, n, x, K, R, y, ys); break;
    default: cag_dots_f32((const float*)m->data + n0 * K, K, n, x, K, R, y, ys);
  }
}

/* y[r * ys + n] (+)= [mats stacked] row n . x[r], for R rows of x. Tiles of TILE weight rows are split over
 * the team; within a tile, each group of rows of x meets every weight row of the tile while both are in the
 * core's cache. Ends with a barrier. */
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
      float out[GROUP * TILE];
      int c = 0;
      int64_t first = 0; /* mats[c]'s first row in the stack */
      for (int64_t n = n0; n < n1;) {
        while (n >= first + mats[c]->rows) first += mats[c++]->rows;
        const int64_t end = first + mats[c]->rows < n1 ? first + mats[c]->rows : n1;
        mat_dots(mats[c], n - first, end - n, x + r0 * K, g, out + (n - n0), TILE);
        n = end;
      }
      for (int64_t r = 0; r < g; r++) {
        float* yr = y + (r0 + r) * ys;
        for (int64_t n = n0; n < n1; n++) yr[n] = accumulate ? yr[n] + out[r * TILE + n - n0] : out[r * TILE + n - n0];
      }
    }
  }
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
 * positions); the kernels see only the keys' addresses, so the split changes nothing. Per head: the
 * chunk's max m, sum of exponentials l and unnormalized output o, written to part[g*pstride ...]. */
static void attend_chunk(const float* q, int64_t G, const float* K1, const float* V1, int64_t n1, const float* K2,
                         const float* V2, int64_t n, int64_t hd, float scale, float* part, int64_t pstride) {
  const float* keys[CHUNK];
  const float* values[CHUNK];
  for (int64_t t = 0; t < n; t++) {
    keys[t] = t < n1 ? K1 + t * hd : K2 + (t - n1) * hd;
    values[t] = t < n1 ? V1 + t * hd : V2 + (t - n1) * hd;
  }
  float s[CHUNK];
  for (int64_t g = 0; g < G; g++) {
    float* out = part + g * pstride;
    cag_scores(q + g * hd, keys, n, hd, scale, s);
    out[0] = cag_max(s, n);
    out[1] = cag_exp_sum(s, n, out[0]);
    cag_weighted_sum(s, values, n, hd, out + 2);
  }
}

/* ---- the step ------------------------------------------------------------------------------------ */

/* The threads to run on: as asked, or OpenMP's default for the calling thread when asked for < 1. */
static int team_size(int threads) {
#ifdef _OPENMP
  return threads > 0 ? threads : omp_get_max_threads();
#else
  (void)threads;
  return 1;
#endif
}

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

/* logits[R][vocab] for the R rows' tokens, on `threads` threads (< 1: OpenMP's default); writes each token's
 * keys/values in every layer of its row's own buffers. Returns the number of threads the step ran on, or -1
 * if out of memory. */
int cag_step(const cag_model* m, const cag_shared* shared, const cag_row* rows, int64_t R, float* logits,
             int threads) {
  const int64_t H = m->hidden, hd = m->head_dim, nq = m->heads * hd, nkv = m->kv_heads * hd, nqkv = nq + 2 * nkv;
  const int64_t G = m->heads / m->kv_heads, chunks = chunks_of(rows, R), pstride = hd + 2;
  const int64_t heads_all = m->heads + m->kv_heads, rpart = m->heads * chunks * pstride;
  threads = team_size(threads);
  int team = 1;
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
    if (me == 0) team = omp_get_num_threads();
#endif
    float* x = scratch + (int64_t)me * R * H;
    for (int64_t l = 0; l < m->n_layers; l++) {
      const cag_layer* L = m->layers + l;
      const cag_mat* qkv_mats[3] = {&L->q, &L->k, &L->v};
      for (int64_t r = 0; r < R; r++) cag_rmsnorm(h + r * H, L->in_norm, H, m->eps, x + r * H);
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
      for (int64_t r = 0; r < R; r++) cag_rmsnorm(h + r * H, L->post_norm, H, m->eps, x + r * H);
#pragma omp for schedule(static)
      for (int64_t b = 0; b < (m->inter + TILE - 1) / TILE; b++) { /* act = silu(gate x) * (up x), a tile at a time */
        const int64_t r0 = b * TILE, n = m->inter - r0 < TILE ? m->inter - r0 : TILE;
        for (int64_t x0 = 0; x0 < R; x0 += GROUP) {
          const int64_t g = R - x0 < GROUP ? R - x0 : GROUP;
          float gate[GROUP * TILE], up[GROUP * TILE];
          mat_dots(&L->gate, r0, n, x + x0 * H, g, gate, TILE);
          mat_dots(&L->up, r0, n, x + x0 * H, g, up, TILE);
          for (int64_t r = 0; r < g; r++)
            cag_silu_mul(gate + r * TILE, up + r * TILE, n, act + (x0 + r) * m->inter + r0);
        }
      }
      const cag_mat* down[1] = {&L->down};
      matvec(down, 1, act, R, h, H, 1);
    }
    for (int64_t r = 0; r < R; r++) cag_rmsnorm(h + r * H, m->final_norm, H, m->eps, x + r * H);
    matvec(lm, 1, x, R, logits, m->vocab, 0);
  }
  free(buf);
  return team;
}

/* For tests: step.c's own matvec alone, y[R][m->rows] = x[R][m->cols] @ m^T on `threads` threads, so the
 * bits of the step's projections can be compared with cag_q41_matmul's. */
void cag_step_matvec(const cag_mat* m, const float* x, int64_t R, float* y, int threads) {
  const cag_mat* mats[1] = {m};
#pragma omp parallel num_threads(team_size(threads))
  matvec(mats, 1, x, R, y, m->rows, 0);
}
