/* One gated-delta step of one head, from state src to state dst (both [K, V] fp32; the same pointer: in place):
 *     S = decay S;  u = beta (v - S^T k);  S = S + k u^T;  o = S^T q   (o reads after the write)
 * `fresh`: the sequence has no earlier tokens, its state starts from zeros (a stale src is never read).
 * `next` (may be NULL): a state to prefetch into L2 while this one is rewritten. Used by layers.c; the
 * reference is ops/gated_delta.gated_delta_rule_recurrent. */
#pragma once
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

static inline void gdn_head_step(float *dst, const float *src, const float *qh, const float *kh, const float *vh,
                                 float decay, float beta, float *oh, int64_t K, int64_t V, int fresh,
                                 const char *next) {
    float kv[V], u[V];
    if (fresh) {
        memset(dst, 0, sizeof(float) * K * V);
        src = dst;
    }
    for (int64_t j = 0; j < V; j++) kv[j] = 0.0f;
    for (int64_t i = 0; i < K; i++) {
        const float ki = kh[i], *srow = src + i * V;
        for (int64_t j = 0; j < V; j++) kv[j] += srow[j] * ki;
    }
    for (int64_t j = 0; j < V; j++) {
        u[j] = beta * (vh[j] - decay * kv[j]);
        oh[j] = 0.0f;
    }
    for (int64_t i = 0; i < K; i++) {
        const float ki = kh[i], qi = qh[i], *srow = src + i * V;
        float *drow = dst + i * V;
        if (next)
            for (int64_t l = 0; l < V * 4; l += 64) _mm_prefetch(next + i * V * 4 + l, _MM_HINT_T1);
        for (int64_t j = 0; j < V; j++) {
            drow[j] = decay * srow[j] + ki * u[j];
            oh[j] += drow[j] * qi;
        }
    }
}
