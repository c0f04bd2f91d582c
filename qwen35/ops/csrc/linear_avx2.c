/* y[M, N] = x[M, K] @ w[N, K]^T on x86-64 with AVX2 + FMA, fp32 accumulation, for the small M of decoding.
 *
 * w is packed by qwen35/ops/linear.py as [N/4][K/8][4][8]: for each block of 4 output rows, the 8-wide chunks of
 * the 4 rows sit next to each other, so a block is one contiguous stream the prefetcher follows (plain row-major
 * rows are 4 streams per block and reach ~60% of the read bandwidth on the machines we measured; one stream
 * ~90%). w is bfloat16 (widened to fp32 by a 16-bit shift) or fp32. N % 4 == 0 and K % 8 == 0 (the packer pads).
 *
 * M <= 2: every block computes its 4 rows against both inputs in one pass (8 accumulators); weight bytes bound it.
 * M > 2:  each half block (2 rows) is widened once per 8-chunk and used against up to 6 inputs (12 accumulators);
 *         FMA throughput bounds it, the block stays in L1 across the passes over the inputs.
 * Blocks are split across OpenMP threads (the OpenMP runtime torch already loaded).
 */
#include <immintrin.h>
#include <stdint.h>

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

#define DEFINE_KERNEL(NAME, T, LOAD, PREFETCH)                                                                    \
    void NAME(const float *x, const T *w, float *y, int64_t M, int64_t N, int64_t K) {                        \
        const int64_t NB = N / 4, KB = K / 8;                                                                \
        _Pragma("omp parallel for schedule(static)")                                                         \
        for (int64_t b = 0; b < NB; b++) {                                                                   \
            const T *wb = w + b * K * 4;                                                                     \
            if (M <= 2) {                                                                                    \
                const float *x0 = x, *x1 = x + (M - 1) * K;                                                  \
                __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, c0 = a0, c1 = a0, c2 = a0, c3 = a0; \
                for (int64_t kb = 0; kb < KB; kb++) {                                                        \
                    const T *p = wb + kb * 32;                                                               \
                    _mm_prefetch((const char *)p + PREFETCH, _MM_HINT_T0);                                   \
                    __m256 w0 = LOAD(p), w1 = LOAD(p + 8), w2 = LOAD(p + 16), w3 = LOAD(p + 24);             \
                    __m256 v = _mm256_loadu_ps(x0 + kb * 8);                                                 \
                    FMA(a0, w0, v); FMA(a1, w1, v); FMA(a2, w2, v); FMA(a3, w3, v);                          \
                    if (M == 2) {                                                                            \
                        v = _mm256_loadu_ps(x1 + kb * 8);                                                    \
                        FMA(c0, w0, v); FMA(c1, w1, v); FMA(c2, w2, v); FMA(c3, w3, v);                      \
                    }                                                                                        \
                }                                                                                            \
                float *y0 = y + b * 4;                                                                       \
                y0[0] = hsum(a0); y0[1] = hsum(a1); y0[2] = hsum(a2); y0[3] = hsum(a3);                      \
                if (M == 2) {                                                                                \
                    y0 += N;                                                                                 \
                    y0[0] = hsum(c0); y0[1] = hsum(c1); y0[2] = hsum(c2); y0[3] = hsum(c3);                  \
                }                                                                                            \
                continue;                                                                                    \
            }                                                                                                \
            for (int half = 0; half < 2; half++) {                                                           \
                for (int64_t m0 = 0; m0 < M; m0 += 6) {                                                      \
                    const int64_t mr = M - m0 < 6 ? M - m0 : 6;                                              \
                    const float *xs[6];                                                                      \
                    for (int i = 0; i < 6; i++) xs[i] = x + (m0 + (i < mr ? i : mr - 1)) * K;                \
                    __m256 r00 = _mm256_setzero_ps(), r01 = r00, r10 = r00, r11 = r00, r20 = r00, r21 = r00;  \
                    __m256 r30 = r00, r31 = r00, r40 = r00, r41 = r00, r50 = r00, r51 = r00;                 \
                    for (int64_t kb = 0; kb < KB; kb++) {                                                    \
                        const T *p = wb + kb * 32 + half * 16;                                               \
                        __m256 w0 = LOAD(p), w1 = LOAD(p + 8), v;                                            \
                        const int64_t o = kb * 8;                                                            \
                        v = _mm256_loadu_ps(xs[0] + o); FMA(r00, w0, v); FMA(r01, w1, v);                    \
                        v = _mm256_loadu_ps(xs[1] + o); FMA(r10, w0, v); FMA(r11, w1, v);                    \
                        v = _mm256_loadu_ps(xs[2] + o); FMA(r20, w0, v); FMA(r21, w1, v);                    \
                        v = _mm256_loadu_ps(xs[3] + o); FMA(r30, w0, v); FMA(r31, w1, v);                    \
                        v = _mm256_loadu_ps(xs[4] + o); FMA(r40, w0, v); FMA(r41, w1, v);                    \
                        v = _mm256_loadu_ps(xs[5] + o); FMA(r50, w0, v); FMA(r51, w1, v);                    \
                    }                                                                                        \
                    float s[6][2] = {{hsum(r00), hsum(r01)}, {hsum(r10), hsum(r11)}, {hsum(r20), hsum(r21)},  \
                                     {hsum(r30), hsum(r31)}, {hsum(r40), hsum(r41)}, {hsum(r50), hsum(r51)}}; \
                    for (int64_t i = 0; i < mr; i++) {                                                       \
                        float *yi = y + (m0 + i) * N + b * 4 + half * 2;                                     \
                        yi[0] = s[i][0];                                                                     \
                        yi[1] = s[i][1];                                                                     \
                    }                                                                                        \
                }                                                                                            \
            }                                                                                                \
        }                                                                                                    \
    }

DEFINE_KERNEL(qwen35_linear_bf16, uint16_t, load_bf16, 512)
DEFINE_KERNEL(qwen35_linear_f32, float, load_f32, 1024)
