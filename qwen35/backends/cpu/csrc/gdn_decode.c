/* One decode step of the gated delta rule, in place on the recurrent-state pool (no gather, no scatter).
 *
 * For sequence s (state slot slots[s]) and v-head h (q/k head h / (Hv / Hk)), with S = pool[slots[s], h] [K, V]:
 *     S = exp(g) S;  u = beta (v - S^T k);  S = S + k u^T;  o = S^T q
 * q and k arrive l2-normalised (q also scaled by K^-1/2), everything in fp32. A sequence without earlier tokens
 * (has_state[s] == 0) starts from zeros. Each head: gdn_head.h (two passes over its 64 KiB state, vectorised over V
 * by the compiler); sequences x heads are spread over OpenMP threads. The reference is gated_delta_rule_recurrent.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "gdn_head.h"

void qwen35_gdn_decode(float *pool, const int64_t *slots, const uint8_t *has_state, const float *q, const float *k,
                       const float *v, const float *g, const float *beta, float *o, int64_t S, int64_t Hk,
                       int64_t Hv, int64_t K, int64_t V) {
    const int64_t group = Hv / Hk;
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t s = 0; s < S; s++) {
        for (int64_t h = 0; h < Hv; h++) {
            float *st = pool + (slots[s] * Hv + h) * K * V;
            const float *qh = q + (s * Hk + h / group) * K, *kh = k + (s * Hk + h / group) * K;
            const float *vh = v + (s * Hv + h) * V;
            float *oh = o + (s * Hv + h) * V;
            const float decay = expf(g[s * Hv + h]), b = beta[s * Hv + h];
            gdn_head_step(st, qh, kh, vh, decay, b, oh, K, V, !has_state[s], NULL);
        }
    }
}
