/* Matmuls against packed weights on x86-64 with AVX2 + FMA, fp32 accumulation, for the few rows of decoding.
 *
 * A weight [N, K] is packed by qwen35/ops/linear.py as [N/4][K/8][4][8]: for each block of 4 output rows, the
 * 8-wide chunks of the 4 rows sit next to each other, so a block is one contiguous stream the prefetcher follows
 * (row-major rows are 4 streams per block and reach ~60% of the read bandwidth on the machines we measured; one
 * stream ~85-90%). Weights are bfloat16 (widened to fp32 by a 16-bit shift) or fp32; N % 4 == 0, K % 8 == 0 (the
 * packer pads). `block` computes one packed block against M input rows given by pointers:
 *   M <= 2: the block's 4 rows against both inputs in one pass (8 accumulators): weight bytes bound it;
 *   M > 2:  each half block (2 rows) widened once per 8-chunk and used against up to 6 inputs (12 accumulators):
 *           FMA throughput bounds it; the 8 KiB block stays in L1 across the passes over the inputs.
 * qwen35_linear_* spreads the blocks of one weight over OpenMP threads; qwen35_moe_* runs the routed experts of a
 * batch: the (token, expert) pairs arrive sorted by expert, every hit expert multiplies all its tokens in one
 * pass over its weights (gate_up, SiLU(gate) * up, down), and nothing touches the experts nobody chose.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

static inline __m256 load_bf16(const uint16_t *p) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
static inline __m256 load_f32(const float *p) { return _mm256_loadu_ps(p); }

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s);
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(s);
}

#define FMA(a, w, v) a = _mm256_fmadd_ps(w, v, a)

/* dst[i * stride + r] = <x_i, row r of block wb> for i < M, r < 4 */
#define DEFINE_BLOCK(NAME, T, LOAD, PREFETCH)                                                                     \
    static void NAME(const T *wb, const float *const *xs, int64_t M, int64_t KB, float *dst, int64_t stride) {  \
        if (M <= 2) {                                                                                        \
            const float *x0 = xs[0], *x1 = xs[M - 1];                                                        \
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, c0 = a0, c1 = a0, c2 = a0, c3 = a0;   \
            for (int64_t kb = 0; kb < KB; kb++) {                                                            \
                const T *p = wb + kb * 32;                                                                   \
                _mm_prefetch((const char *)p + PREFETCH, _MM_HINT_T0);                                       \
                __m256 w0 = LOAD(p), w1 = LOAD(p + 8), w2 = LOAD(p + 16), w3 = LOAD(p + 24);                 \
                __m256 v = _mm256_loadu_ps(x0 + kb * 8);                                                     \
                FMA(a0, w0, v); FMA(a1, w1, v); FMA(a2, w2, v); FMA(a3, w3, v);                              \
                if (M == 2) {                                                                                \
                    v = _mm256_loadu_ps(x1 + kb * 8);                                                        \
                    FMA(c0, w0, v); FMA(c1, w1, v); FMA(c2, w2, v); FMA(c3, w3, v);                          \
                }                                                                                            \
            }                                                                                                \
            dst[0] = hsum(a0); dst[1] = hsum(a1); dst[2] = hsum(a2); dst[3] = hsum(a3);                      \
            if (M == 2) {                                                                                    \
                dst += stride;                                                                               \
                dst[0] = hsum(c0); dst[1] = hsum(c1); dst[2] = hsum(c2); dst[3] = hsum(c3);                  \
            }                                                                                                \
            return;                                                                                          \
        }                                                                                                    \
        for (int half = 0; half < 2; half++) {                                                               \
            for (int64_t m0 = 0; m0 < M; m0 += 6) {                                                          \
                const int64_t mr = M - m0 < 6 ? M - m0 : 6;                                                  \
                const float *x[6];                                                                           \
                for (int i = 0; i < 6; i++) x[i] = xs[m0 + (i < mr ? i : mr - 1)];                           \
                __m256 r00 = _mm256_setzero_ps(), r01 = r00, r10 = r00, r11 = r00, r20 = r00, r21 = r00;      \
                __m256 r30 = r00, r31 = r00, r40 = r00, r41 = r00, r50 = r00, r51 = r00;                     \
                for (int64_t kb = 0; kb < KB; kb++) {                                                        \
                    const T *p = wb + kb * 32 + half * 16;                                                   \
                    __m256 w0 = LOAD(p), w1 = LOAD(p + 8), v;                                                \
                    const int64_t o = kb * 8;                                                                \
                    v = _mm256_loadu_ps(x[0] + o); FMA(r00, w0, v); FMA(r01, w1, v);                         \
                    v = _mm256_loadu_ps(x[1] + o); FMA(r10, w0, v); FMA(r11, w1, v);                         \
                    v = _mm256_loadu_ps(x[2] + o); FMA(r20, w0, v); FMA(r21, w1, v);                         \
                    v = _mm256_loadu_ps(x[3] + o); FMA(r30, w0, v); FMA(r31, w1, v);                         \
                    v = _mm256_loadu_ps(x[4] + o); FMA(r40, w0, v); FMA(r41, w1, v);                         \
                    v = _mm256_loadu_ps(x[5] + o); FMA(r50, w0, v); FMA(r51, w1, v);                         \
                }                                                                                            \
                float s[6][2] = {{hsum(r00), hsum(r01)}, {hsum(r10), hsum(r11)}, {hsum(r20), hsum(r21)},      \
                                 {hsum(r30), hsum(r31)}, {hsum(r40), hsum(r41)}, {hsum(r50), hsum(r51)}};     \
                for (int64_t i = 0; i < mr; i++) {                                                           \
                    dst[(m0 + i) * stride + half * 2] = s[i][0];                                             \
                    dst[(m0 + i) * stride + half * 2 + 1] = s[i][1];                                         \
                }                                                                                            \
            }                                                                                                \
        }                                                                                                    \
    }

DEFINE_BLOCK(block_bf16, uint16_t, load_bf16, 512)
DEFINE_BLOCK(block_f32, float, load_f32, 1024)

#define MAX_ROWS 4096

/* y[M, N] = x[M, K] @ w^T */
#define DEFINE_LINEAR(NAME, T, BLOCK)                                                                             \
    void NAME(const float *x, const T *w, float *y, int64_t M, int64_t N, int64_t K) {                        \
        const float *xs[MAX_ROWS];                                                                           \
        for (int64_t i = 0; i < M && i < MAX_ROWS; i++) xs[i] = x + i * K;                                   \
        _Pragma("omp parallel for schedule(static)")                                                         \
        for (int64_t b = 0; b < N / 4; b++) BLOCK(w + b * K * 4, xs, M, K / 8, y + b * 4, N);                 \
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
        int64_t *pair_token = malloc(sizeof(int64_t) * P), *hit = malloc(sizeof(int64_t) * E);              \
        float *pair_weight = malloc(sizeof(float) * P);                                                      \
        float *hbuf = malloc(sizeof(float) * P * 2 * I), *abuf = malloc(sizeof(float) * P * I);              \
        float *dbuf = malloc(sizeof(float) * P * H);                                                         \
        const float **xs = malloc(sizeof(float *) * P), **as = malloc(sizeof(float *) * P);                  \
        for (int64_t p = 0; p < P; p++) start[ids[p] + 1]++;                                                 \
        for (int64_t e = 0; e < E; e++) start[e + 1] += start[e];                                            \
        for (int64_t e = 0; e <= E; e++) fill[e] = start[e];                                                 \
        for (int64_t p = 0; p < P; p++) {                                                                    \
            const int64_t q = fill[ids[p]]++;                                                                \
            pair_token[q] = p / k;                                                                           \
            pair_weight[q] = weights[p];                                                                     \
        }                                                                                                    \
        int64_t nhit = 0;                                                                                    \
        for (int64_t e = 0; e < E; e++)                                                                      \
            if (start[e + 1] > start[e]) hit[nhit++] = e;                                                    \
        for (int64_t p = 0; p < P; p++) {                                                                    \
            xs[p] = x + pair_token[p] * H;                                                                   \
            as[p] = abuf + p * I;                                                                            \
        }                                                                                                    \
        const int64_t nb1 = 2 * I / 4, nb2 = H / 4;                                                          \
        _Pragma("omp parallel")                                                                              \
        {                                                                                                    \
            _Pragma("omp for schedule(static)")                                                              \
            for (int64_t item = 0; item < nhit * nb1; item++) {                                              \
                const int64_t e = hit[item / nb1], b = item % nb1, p0 = start[e];                            \
                BLOCK(gate_up + (e * nb1 + b) * H * 4, xs + p0, start[e + 1] - p0, H / 8,                    \
                      hbuf + p0 * 2 * I + b * 4, 2 * I);                                                     \
            }                                                                                                \
            _Pragma("omp for schedule(static)")                                                              \
            for (int64_t p = 0; p < P; p++)                                                                  \
                for (int64_t i = 0; i < I; i++) {                                                            \
                    const float g = hbuf[p * 2 * I + i];                                                     \
                    abuf[p * I + i] = g / (1.0f + expf(-g)) * hbuf[p * 2 * I + I + i];                        \
                }                                                                                            \
            _Pragma("omp for schedule(static)")                                                              \
            for (int64_t item = 0; item < nhit * nb2; item++) {                                              \
                const int64_t e = hit[item / nb2], b = item % nb2, p0 = start[e];                            \
                BLOCK(down + (e * nb2 + b) * I * 4, as + p0, start[e + 1] - p0, I / 8, dbuf + p0 * H + b * 4, \
                      H);                                                                                    \
            }                                                                                                \
        }                                                                                                    \
        for (int64_t p = 0; p < P; p++) {                                                                    \
            float *o = out + pair_token[p] * H;                                                              \
            const float wgt = pair_weight[p], *d = dbuf + p * H;                                             \
            for (int64_t h = 0; h < H; h++) o[h] += wgt * d[h];                                              \
        }                                                                                                    \
        free(start); free(fill); free(pair_token); free(hit); free(pair_weight);                             \
        free(hbuf); free(abuf); free(dbuf); free(xs); free(as);                                              \
    }

DEFINE_MOE(qwen35_moe_bf16, uint16_t, block_bf16)
DEFINE_MOE(qwen35_moe_f32, float, block_f32)
