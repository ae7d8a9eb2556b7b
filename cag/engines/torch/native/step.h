/* The model and rows as cag_step (step.c) reads them. __init__.py mirrors these structures with ctypes
 * (same field order and types), nativestep.py fills them in from a transformers model. */
#ifndef CAG_STEP_H
#define CAG_STEP_H
#include <stdint.h>

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

/* logits[R][vocab] for the R rows' tokens on `threads` threads (< 1: OpenMP's default). Returns the number
 * of threads it ran on, or -1 if out of memory. */
int cag_step(const cag_model* m, const cag_shared* shared, const cag_row* rows, int64_t R, float* logits,
             int threads);
/* For tests: the step's own matvec alone, y[R][m->rows] = x[R][m->cols] @ m^T. */
void cag_step_matvec(const cag_mat* m, const float* x, int64_t R, float* y, int threads);

#endif
