/* TEMPORARY: the qw_t entry points for the float formats over the old kernels (replaced by matmul.c). */
#include "weights.h"
void qwen35_linear_bf16(const float *x, const uint16_t *w, float *y, int64_t M, int64_t N, int64_t K);
void qwen35_linear_f32(const float *x, const float *w, float *y, int64_t M, int64_t N, int64_t K);
void qwen35_moe_bf16(const float *x, const int64_t *ids, const float *weights, int64_t Tn, int64_t k, int64_t E,
                     const uint16_t *gate_up, const uint16_t *down, float *out, int64_t H, int64_t I);
void qwen35_moe_f32(const float *x, const int64_t *ids, const float *weights, int64_t Tn, int64_t k, int64_t E,
                    const float *gate_up, const float *down, float *out, int64_t H, int64_t I);
void qwen35_matmul(const float *x, const qw_t *w, int64_t e, float *y, int64_t M) {
    const char *d = (const char *)w->data + e * w->data_stride;
    if (w->format == QW_BF16) qwen35_linear_bf16(x, (const uint16_t *)d, y, M, w->n, w->k);
    else qwen35_linear_f32(x, (const float *)d, y, M, w->n, w->k);
}
void qwen35_experts(const float *x, const int64_t *ids, const float *weights, int64_t T, int64_t k,
                    const qw_t *gu, const qw_t *down, float *out) {
    if (gu->format == QW_BF16) qwen35_moe_bf16(x, ids, weights, T, k, gu->count, gu->data, down->data, out, down->n, down->k);
    else qwen35_moe_f32(x, ids, weights, T, k, gu->count, gu->data, down->data, out, down->n, down->k);
}
