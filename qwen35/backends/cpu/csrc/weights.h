/* One description of a packed weight for every native matmul (layouts: matmul.c's header comment). */
#pragma once
#include <stdint.h>
enum { QW_F32 = 0, QW_BF16 = 1, QW_Q8 = 2, QW_Q4 = 3 };
typedef struct {
    int64_t format;       /* QW_* */
    int64_t n, k;         /* rows (outputs) and columns (inputs) of one matrix, as packed (n % 4 == 0; float k % 8 == 0,
                             quantized k % 32 == 0) */
    int64_t group;        /* q8/q4: columns per scale group (a multiple of 32 that divides k); 0 for float formats */
    int64_t count;        /* matrices (experts); 1 for a plain linear */
    const void *data;     /* packed values; matrix e at (const char *)data + e * data_stride */
    const float *scales;  /* q8/q4 scales in the packer's layout; matrix e at scales + e * scale_stride */
    const uint8_t *zeros; /* q4 zero points in the packer's layout (NULL: 8); matrix e at zeros + e * zero_stride */
    int64_t data_stride, scale_stride, zero_stride;   /* bytes, floats, bytes */
} qw_t;
/* y[M, n] = x[M, k] @ W_e^T, fp32 in and out. Batch invariant: row i's outputs are bit-identical whatever M is and
 * whatever the other rows hold. OpenMP inside. */
void qwen35_matmul(const float *x, const qw_t *w, int64_t e, float *y, int64_t M);
/* routed experts, ADDING into out [T, H]: out[t] += sum_j weights[t, j] * down_e(silu(gate) * up), e = ids[t, j];
 * gate_up: count = E matrices [2I, H] (gate rows first), down: E matrices [H, I]. Batch invariant as above. */
void qwen35_experts(const float *x, const int64_t *ids, const float *weights, int64_t T, int64_t k,
                    const qw_t *gate_up, const qw_t *down, float *out);
/* The same products with the inputs rounded to int8 per 32 columns first (s = max|x| / 127, q = round(x / s)) and
 * integer dot products: faster for many rows, exact to the rounded inputs; float weights take the plain path. Batch
 * invariant within these functions. */
void qwen35_matmul_q8in(const float *x, const qw_t *w, int64_t e, float *y, int64_t M);
void qwen35_experts_q8in(const float *x, const int64_t *ids, const float *weights, int64_t T, int64_t k,
                         const qw_t *gate_up, const qw_t *down, float *out);
/* that rounding alone: q [M, K] int8, s [M, K / 32] (K % 32 == 0) */
void qwen35_quantize_q8(const float *x, int64_t M, int64_t K, int8_t *q, float *s);
