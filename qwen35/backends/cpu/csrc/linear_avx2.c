/* Matmuls against packed weights on x86-64 with AVX2 + FMA, fp32 accumulation.
 *
 * A weight [N, K] is packed by qwen35/ops/linear.py as [N/4][K/8][4][8]: for each block of 4 output rows, the
 * 8-wide chunks of the 4 rows sit next to each other, so a block is one contiguous stream the prefetcher follows
 * (row-major rows are 4 streams per block and reach ~60% of the read bandwidth on the machines we measured; one
 * stream ~85-90%). Weights are bfloat16 (widened to fp32 by a 16-bit shift) or fp32; N % 4 == 0, K % 8 == 0 (the
 * packer pads). `block` computes one packed block against M input rows given by pointers:
 *   M <= 2: the block's 4 rows against both inputs in one pass (8 accumulators): weight bytes bound it;
 *   M > 2:  the block widened to fp32 once into a thread buffer (L1), then 3 inputs at a time against its 4 rows
 *           (12 accumulators): FMA throughput bounds it; the next block is prefetched meanwhile.
 * Both paths sum an output in the same order (per lane over K in steps of 8, then one fixed horizontal sum), so a
 * row's result is bit for bit the same whatever rows share its call: outputs do not depend on the batch.
 * qwen35_linear_* spreads the blocks of one weight over OpenMP threads (dynamically, 16 blocks at a time: a VM
 * may stall one vCPU); qwen35_moe_* runs the routed experts of a batch: the (token, expert) pairs are sorted by
 * expert, every hit expert multiplies all its tokens (in tiles) in one pass over its weights (gate_up,
 * SiLU(gate) * up, down), and nothing touches the experts nobody chose; this serves a prompt's experts too.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

static inline __m256 load_bf16(const uint16_t *p) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
static inline __m256 load_f32(const float *p) { return _mm256_loadu_ps(p); }

#define FMA(a, w, v) a = _mm256_fmadd_ps(w, v, a)

/* The 8 lanes of 4 accumulators summed into the 4 outputs, in one fixed order that every path uses: an output's
 * value must not depend on how many rows were multiplied with it (batch invariance). */
static inline __m128 reduce4(__m256 a, __m256 b, __m256 c, __m256 d) {
    __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

/* dst[i * stride + r] = <x_i, row r of block wb> for i < M, r < 4 */
#define DEFINE_BLOCK(NAME, T, LOAD, PREFETCH, WIDEN)                                                              \
    static void NAME(const T *wb, const float *const *xs, int64_t M, int64_t KB, float *dst, int64_t stride) {  \
        if (M <= 2) {                                                                                        \
            const float *x0 = xs[0], *x1 = xs[M - 1];                                                        \
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, c0 = a0, c1 = a0, c2 = a0, c3 = a0;   \
            for (int64_t kb = 0; kb < KB; kb++) {                                                            \
                const T *p = wb + kb * 32;                                                                   \
                _mm_prefetch((const char *)p + PREFETCH, _MM_HINT_NTA);                                       \
                __m256 w0 = LOAD(p), w1 = LOAD(p + 8), w2 = LOAD(p + 16), w3 = LOAD(p + 24);                 \
                __m256 v = _mm256_loadu_ps(x0 + kb * 8);                                                     \
                FMA(a0, w0, v); FMA(a1, w1, v); FMA(a2, w2, v); FMA(a3, w3, v);                              \
                if (M == 2) {                                                                                \
                    v = _mm256_loadu_ps(x1 + kb * 8);                                                        \
                    FMA(c0, w0, v); FMA(c1, w1, v); FMA(c2, w2, v); FMA(c3, w3, v);                          \
                }                                                                                            \
            }                                                                                                \
            _mm_storeu_ps(dst, reduce4(a0, a1, a2, a3));                                                     \
            if (M == 2) _mm_storeu_ps(dst + stride, reduce4(c0, c1, c2, c3));                                \
            return;                                                                                          \
        }                                                                                                    \
        const float *wf = WIDEN(wb, KB);                                                                     \
        int64_t m = 0;                                                                                       \
        for (; m + 3 <= M; m += 3)                                                                           \
            rows4x3(wf, xs[m], xs[m + 1], xs[m + 2], KB, dst + m * stride, stride,                           \
                    m == 0 && sizeof(T) == 2 ? (const char *)(wb + KB * 32) : NULL);                         \
        if (m < M) rows4x2(wf, xs[m], xs[M - 1], M - m, KB, dst + m * stride, stride);                        \
    }

/* Many inputs (M > 2): the 4-row block, widened to fp32 once (it stays in L1), against 3 inputs at a time: 12
 * accumulators, 4 weight loads + 3 input loads per 12 FMAs, so FMA throughput bounds it. */
static void rows4x3(const float *wf, const float *x0, const float *x1, const float *x2, int64_t KB, float *dst,
                    int64_t stride, const char *next) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    __m256 c0 = a0, c1 = a0, c2 = a0, c3 = a0;
    for (int64_t kb = 0; kb < KB; kb++) {
        const float *p = wf + kb * 32;
        if (next) _mm_prefetch(next + kb * 64, _MM_HINT_T1);  /* bf16 blocks: the next block, one line per step */
        const __m256 v0 = _mm256_loadu_ps(x0 + kb * 8), v1 = _mm256_loadu_ps(x1 + kb * 8),
                     v2 = _mm256_loadu_ps(x2 + kb * 8);
        __m256 w = _mm256_loadu_ps(p);
        FMA(a0, w, v0); FMA(b0, w, v1); FMA(c0, w, v2);
        w = _mm256_loadu_ps(p + 8);
        FMA(a1, w, v0); FMA(b1, w, v1); FMA(c1, w, v2);
        w = _mm256_loadu_ps(p + 16);
        FMA(a2, w, v0); FMA(b2, w, v1); FMA(c2, w, v2);
        w = _mm256_loadu_ps(p + 24);
        FMA(a3, w, v0); FMA(b3, w, v1); FMA(c3, w, v2);
    }
    _mm_storeu_ps(dst, reduce4(a0, a1, a2, a3));
    _mm_storeu_ps(dst + stride, reduce4(b0, b1, b2, b3));
    _mm_storeu_ps(dst + 2 * stride, reduce4(c0, c1, c2, c3));
}

/* the last 1 or 2 inputs (n) */
static void rows4x2(const float *wf, const float *x0, const float *x1, int64_t n, int64_t KB, float *dst,
                    int64_t stride) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    for (int64_t kb = 0; kb < KB; kb++) {
        const float *p = wf + kb * 32;
        const __m256 v0 = _mm256_loadu_ps(x0 + kb * 8), v1 = _mm256_loadu_ps(x1 + kb * 8);
        __m256 w = _mm256_loadu_ps(p);
        FMA(a0, w, v0); FMA(b0, w, v1);
        w = _mm256_loadu_ps(p + 8);
        FMA(a1, w, v0); FMA(b1, w, v1);
        w = _mm256_loadu_ps(p + 16);
        FMA(a2, w, v0); FMA(b2, w, v1);
        w = _mm256_loadu_ps(p + 24);
        FMA(a3, w, v0); FMA(b3, w, v1);
    }
    _mm_storeu_ps(dst, reduce4(a0, a1, a2, a3));
    if (n == 2) _mm_storeu_ps(dst + stride, reduce4(b0, b1, b2, b3));
}

/* A bf16 block widened into this thread's buffer (kept between calls); fp32 blocks are used where they lie. */
static const float *widen_bf16(const uint16_t *wb, int64_t KB) {
    static __thread float *buf = NULL;
    static __thread int64_t cap = 0;
    if (KB * 32 > cap) {
        free(buf);
        cap = KB * 32;
        buf = aligned_alloc(32, sizeof(float) * cap);
    }
    for (int64_t i = 0; i < KB * 4; i += 4) {
        _mm_prefetch((const char *)(wb + i * 8) + 1024, _MM_HINT_T0);
        _mm256_store_ps(buf + i * 8, load_bf16(wb + i * 8));
        _mm256_store_ps(buf + i * 8 + 8, load_bf16(wb + i * 8 + 8));
        _mm256_store_ps(buf + i * 8 + 16, load_bf16(wb + i * 8 + 16));
        _mm256_store_ps(buf + i * 8 + 24, load_bf16(wb + i * 8 + 24));
    }
    return buf;
}
static const float *widen_f32(const float *wb, int64_t KB) { (void)KB; return wb; }

DEFINE_BLOCK(block_bf16, uint16_t, load_bf16, 512, widen_bf16)
DEFINE_BLOCK(block_f32, float, load_f32, 1024, widen_f32)

/* out = silu(gate) * up over n */
static void swiglu(const float *gate, const float *up, float *out, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_mul_ps(silu8(_mm256_loadu_ps(gate + i)), _mm256_loadu_ps(up + i)));
    for (; i < n; i++) out[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

/* Reusable per-thread scratch buffers (freshly mapped pages cost a fault each on first touch: ~15% of a
 * 2048-token MoE layer when the buffers were malloc'd per call). Kept until the thread ends. */
static float *scratch(int which, int64_t n) {
    static __thread float *buf[3] = {NULL, NULL, NULL};
    static __thread int64_t cap[3] = {0, 0, 0};
    if (n > cap[which]) {
        free(buf[which]);
        cap[which] = n;
        buf[which] = malloc(sizeof(float) * n);
    }
    return buf[which];
}

#define LINEAR_TILE 96
#define MOE_TILE 48

/* y[M, N] = x[M, K] @ w^T */
/* y[M, N] = x[M, K] @ w^T. Rows go in tiles of LINEAR_TILE, whose inputs stay in L2 while every block passes. */
#define DEFINE_LINEAR(NAME, T, BLOCK)                                                                             \
    void NAME(const float *x, const T *w, float *y, int64_t M, int64_t N, int64_t K) {                        \
        const float **xs = malloc(sizeof(float *) * (M > 0 ? M : 1));                                        \
        for (int64_t i = 0; i < M; i++) xs[i] = x + i * K;                                                   \
        for (int64_t m0 = 0; m0 < M; m0 += LINEAR_TILE) {                                                    \
            const int64_t mt = M - m0 < LINEAR_TILE ? M - m0 : LINEAR_TILE;                                  \
            _Pragma("omp parallel for schedule(dynamic, 16)")                                                \
            for (int64_t b = 0; b < N / 4; b++) BLOCK(w + b * K * 4, xs + m0, mt, K / 8, y + m0 * N + b * 4, N); \
        }                                                                                                    \
        free(xs);                                                                                            \
    }

DEFINE_LINEAR(qwen35_linear_bf16, uint16_t, block_bf16)
DEFINE_LINEAR(qwen35_linear_f32, float, block_f32)

/* Routed experts of a batch. x [T, H]; ids, weights [T, k] (each token's experts and their weights); gate_up
 * [E][2I packed over H] (gate rows first), down [E][H packed over I]; out [T, H] = sum over a token's experts of
 * weight * down(SiLU(gate) * up). The (token, expert) pairs are counting-sorted by expert so each hit expert runs
 * once over all its tokens. */
#define DEFINE_MOE(NAME, T, BLOCK)                                                                                \
    void NAME(const float *x, const int64_t *ids, const float *weights, int64_t Tn, int64_t k, int64_t E,      \
              const T *gate_up, const T *down, float *out, int64_t H, int64_t I) {                           \
        const int64_t P = Tn * k;                                                                            \
        int64_t *start = calloc(E + 1, sizeof(int64_t)), *fill = malloc(sizeof(int64_t) * (E + 1));         \
        int64_t *pair_token = malloc(sizeof(int64_t) * P);                                                   \
        float *pair_weight = malloc(sizeof(float) * P);                                                      \
        float *hbuf = scratch(0, P * 2 * I), *abuf = scratch(1, P * I), *dbuf = scratch(2, P * H);             \
        int64_t *token_pairs = malloc(sizeof(int64_t) * P);  /* token t's pairs: token_pairs[t * k : t * k + k] */ \
        const float **xs = malloc(sizeof(float *) * P), **as = malloc(sizeof(float *) * P);                  \
        for (int64_t p = 0; p < P; p++) start[ids[p] + 1]++;                                                 \
        for (int64_t e = 0; e < E; e++) start[e + 1] += start[e];                                            \
        for (int64_t e = 0; e <= E; e++) fill[e] = start[e];                                                 \
        for (int64_t p = 0; p < P; p++) {                                                                    \
            const int64_t q = fill[ids[p]]++;                                                                \
            pair_token[q] = p / k;                                                                           \
            pair_weight[q] = weights[p];                                                                     \
            token_pairs[p] = q;                                                                              \
        }                                                                                                    \
        /* work units: an expert's tokens in tiles of up to MOE_TILE rows (their inputs stay in L2 while the    \
         * expert's blocks pass), each unit against every block of the expert's weight */                      \
        int64_t nu = 0, *ustart = malloc(sizeof(int64_t) * (P / MOE_TILE + E + 1));                         \
        int64_t *ulen = malloc(sizeof(int64_t) * (P / MOE_TILE + E + 1)), *uexp = malloc(sizeof(int64_t) * (P / MOE_TILE + E + 1)); \
        for (int64_t e = 0; e < E; e++)                                                                      \
            for (int64_t r = start[e]; r < start[e + 1]; r += MOE_TILE) {                                    \
                ustart[nu] = r;                                                                              \
                ulen[nu] = start[e + 1] - r < MOE_TILE ? start[e + 1] - r : MOE_TILE;                        \
                uexp[nu++] = e;                                                                              \
            }                                                                                                \
        for (int64_t p = 0; p < P; p++) {                                                                    \
            xs[p] = x + pair_token[p] * H;                                                                   \
            as[p] = abuf + p * I;                                                                            \
        }                                                                                                    \
        const int64_t nb1 = 2 * I / 4, nb2 = H / 4;                                                          \
        _Pragma("omp parallel")                                                                              \
        {                                                                                                    \
            _Pragma("omp for schedule(static)")                                                              \
            for (int64_t item = 0; item < nu * nb1; item++) {                                                \
                const int64_t u = item / nb1, b = item % nb1, p0 = ustart[u];                                \
                BLOCK(gate_up + (uexp[u] * nb1 + b) * H * 4, xs + p0, ulen[u], H / 8,                        \
                      hbuf + p0 * 2 * I + b * 4, 2 * I);                                                     \
            }                                                                                                \
            _Pragma("omp for schedule(static)")                                                              \
            for (int64_t p = 0; p < P; p++) swiglu(hbuf + p * 2 * I, hbuf + p * 2 * I + I, abuf + p * I, I);  \
            _Pragma("omp for schedule(static)")                                                              \
            for (int64_t item = 0; item < nu * nb2; item++) {                                                \
                const int64_t u = item / nb2, b = item % nb2, p0 = ustart[u];                                \
                BLOCK(down + (uexp[u] * nb2 + b) * I * 4, as + p0, ulen[u], I / 8, dbuf + p0 * H + b * 4, H);  \
            }                                                                                                \
        }                                                                                                    \
        _Pragma("omp parallel for schedule(static)")                                                         \
        for (int64_t t = 0; t < Tn; t++) /* in expert order, as the pairs were sorted */                     \
            for (int64_t e = 0, j = 0; j < k; j++) {                                                         \
                int64_t q = -1;                                                                              \
                for (int64_t i = 0; i < k; i++) /* this token's pair with the j-th smallest expert id */     \
                    if (token_pairs[t * k + i] >= 0 && (q < 0 || token_pairs[t * k + i] < q)) q = token_pairs[t * k + i], e = i; \
                token_pairs[t * k + e] = -1;                                                                 \
                float *o = out + t * H;                                                                      \
                const float wgt = pair_weight[q], *d = dbuf + q * H;                                         \
                for (int64_t h = 0; h < H; h++) o[h] += wgt * d[h];                                          \
            }                                                                                                \
        free(start); free(fill); free(pair_token); free(pair_weight); free(ustart); free(ulen); free(uexp);   \
        free(token_pairs); free(xs); free(as);                                                               \
    }

DEFINE_MOE(qwen35_moe_bf16, uint16_t, block_bf16)
DEFINE_MOE(qwen35_moe_f32, float, block_f32)

/* Softmax over E router logits, top-k (ties to the lower id), optionally renormalised: ids, weights [T, k].
 * Reference: ops/moe.route_logits. */
static void route(const float *logits, int64_t stride, int64_t Tn, int64_t E, int64_t k, int64_t renorm,
                  int64_t *ids, float *weights) {
    float *p = malloc(sizeof(float) * E);
    for (int64_t t = 0; t < Tn; t++) {
        const float *l = logits + t * stride;
        float mx = l[0], sum = 0.0f;
        for (int64_t e = 1; e < E; e++) mx = l[e] > mx ? l[e] : mx;
        for (int64_t e = 0; e < E; e++) sum += (p[e] = expf(l[e] - mx));
        for (int64_t e = 0; e < E; e++) p[e] /= sum;
        float total = 0.0f;
        for (int64_t j = 0; j < k; j++) {
            int64_t best = -1;
            for (int64_t e = 0; e < E; e++)
                if (p[e] >= 0.0f && (best < 0 || p[e] > p[best])) best = e;
            ids[t * k + j] = best;
            weights[t * k + j] = p[best];
            total += p[best];
            p[best] = -1.0f;
        }
        if (renorm)
            for (int64_t j = 0; j < k; j++) weights[t * k + j] /= total;
    }
    free(p);
}

/* The whole sparse-MoE block of a decode step, from its fused input projection. x [T, H] (the block's input);
 * proj [T, stride]: [router logits (E) | shared-expert gate (1) | shared gate_proj (Is) | shared up_proj (Is)];
 * experts as in qwen35_moe_*; shared_down packed [H, Is]. out [T, H] = routed + sigmoid(shared gate) * shared.
 * Reference: layers/mlp.SparseMoeBlock.forward. */
#define DEFINE_MOE_BLOCK(NAME, T, EXPERTS, BLOCK)                                                                 \
    void NAME(const float *x, const float *proj, int64_t stride, int64_t Tn, int64_t E, int64_t k, int64_t renorm, \
              const T *gate_up, const T *down, const T *shared_down, float *out, int64_t H, int64_t I,        \
              int64_t Is) {                                                                                  \
        int64_t *ids = malloc(sizeof(int64_t) * Tn * k);                                                     \
        float *wts = malloc(sizeof(float) * Tn * k), *act = malloc(sizeof(float) * Tn * Is);                  \
        float *sh = malloc(sizeof(float) * Tn * H);                                                          \
        const float **as = malloc(sizeof(float *) * Tn);                                                     \
        route(proj, stride, Tn, E, k, renorm, ids, wts);                                                     \
        for (int64_t t = 0; t < Tn; t++) {                                                                   \
            const float *g = proj + t * stride + E + 1, *u = g + Is;                                         \
            swiglu(g, u, act + t * Is, Is);                                                                  \
            as[t] = act + t * Is;                                                                            \
        }                                                                                                    \
        memset(out, 0, sizeof(float) * Tn * H);                                                              \
        EXPERTS(x, ids, wts, Tn, k, E, gate_up, down, out, H, I);                                            \
        _Pragma("omp parallel for schedule(static)")                                                         \
        for (int64_t b = 0; b < H / 4; b++) BLOCK(shared_down + b * Is * 4, as, Tn, Is / 8, sh + b * 4, H);   \
        for (int64_t t = 0; t < Tn; t++) {                                                                   \
            const float gate = 1.0f / (1.0f + expf(-proj[t * stride + E]));                                  \
            for (int64_t h = 0; h < H; h++) out[t * H + h] = out[t * H + h] + gate * sh[t * H + h];          \
        }                                                                                                    \
        free(ids); free(wts); free(act); free(sh); free(as);                                                 \
    }

DEFINE_MOE_BLOCK(qwen35_moe_block_bf16, uint16_t, qwen35_moe_bf16, block_bf16)
DEFINE_MOE_BLOCK(qwen35_moe_block_f32, float, qwen35_moe_f32, block_f32)
