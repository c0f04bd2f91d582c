/* Matmuls against packed weights on x86-64 with AVX2 + FMA, fp32 accumulation, for every weight format behind
 * one description (weights.h: qw_t): fp32, bf16, int8 and int4.
 *
 * Layouts (made by qwen35/backends/cpu/weights.py). Every format stores one contiguous stream per block of 4 output
 * rows (row-major rows are 4 streams per block and reach ~60% of the read bandwidth on the machines we measured;
 * one stream ~85-90%); n % 4 == 0 (the packer pads rows):
 *   fp32 / bf16: [n/4][k/8][4][8], k % 8 == 0: the 8-wide chunks of the block's 4 rows side by side;
 *   int8:        [n/4][k/8][4][8] int8, as the float formats (k % 32 == 0);
 *   int4:        [n/4][k/64][4][8 lanes of 32 bits], k % 64 == 0: a row's 64 columns in 8 lanes, nibble j of lane
 *                l (bits 4j..4j+3) holding column 8j + l;
 *   scales (int8/int4): fp32 [n/4][k/group][4]; zero points (int4): uint8 [n/4][k/group][4], NULL meaning 8.
 * A quantized weight is w = (q - z) * s (int8: z = 0), group a multiple of 32 dividing k.
 *
 * `block` computes one block against M input rows given by pointers:
 *   M <= 2: the block's 4 rows against both inputs in one pass (8 accumulators): weight bytes bound it;
 *   M > 2:  the block widened to fp32 once into a thread buffer (L1), then 3 inputs at a time against its 4 rows
 *           (12 accumulators): FMA throughput bounds it; the next block is prefetched meanwhile.
 * Every path sums an output in the same order (per lane over k in steps of 8, then one fixed horizontal sum; for
 * quantized weights per group, see below), so a row's result is bit for bit the same whatever rows share its call:
 * outputs do not depend on the batch.
 *
 * Quantized weights: the integers are converted to fp32 exactly and summed against the inputs per group; scale and
 * zero point are applied once per group (T += s * (A - z * sum of the group's inputs)). So the result is the exact
 * product of dequantize() up to fp32 rounding (tests/backends/test_matmul.py: within 16 eps of |x| @ |w|^T; F.linear
 * measures 1-4 eps there). One step of 8 int4 weights costs an and, a convert and an fma (per input): no shuffles,
 * since nibble j masked in place is q * 2^(4j), exact, against an input prescaled by 2^(-4j) once per call. The
 * alternative, llama.cpp's (activations quantized to int8 per 32 columns, integer dot products with maddubs), does
 * fewer vector ops per byte but rounds the activations to 8 bits, which is not fp32 rounding: it is the opt-in
 * many-row path below (qwen35_matmul_q8in, qwen35_experts_q8in) for prompts, where the products bound the time.
 * Measured with benchmarks/matmul_bench.py on one Zen 3 core of the shared 2-core VM (OMP_NUM_THREADS=1: with both
 * threads, other processes on the VM quantized every time to the 4 ms scheduler tick), weight [32768, 1024], groups
 * of 128, against a 10-11 GB/s one-core read probe: 1 row: bf16 7.6 GB/s (74%), int8 8.0 GB/s (79%, 2.06x bf16's
 * speed), int4 5.4 GB/s (53%, 2.64x); 2 rows: int8 1.75x, int4 2.06x; 16 rows 0.95-0.98x bf16; 512 rows int8 0.91x,
 * int4 0.83x (the per-group ends; groups of 32 cost ~2x that). int4 is bound by its 3 vector ops per 8 weights on
 * one core; the integer (llama.cpp) scheme would need ~1, at the price of 8-bit activations.
 *
 * qwen35_matmul spreads the blocks of one weight over OpenMP threads (dynamically, 16 blocks at a time: a VM may
 * stall one vCPU); qwen35_experts runs the routed experts of a batch: the (token, expert) pairs are sorted by
 * expert, every hit expert multiplies all its tokens (in tiles) in one pass over its weights (gate_up,
 * SiLU(gate) * up, down), and nothing touches the experts nobody chose; this serves a prompt's experts too.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"
#include "weights.h"

static inline __m256 load_f32(const float *p) { return _mm256_loadu_ps(p); }

#define FMA(a, w, v) a = _mm256_fmadd_ps(w, v, a)
/* One step of a 4-row x 3-input tile: 8 columns of the block's 4 rows (fp32 at p) against 3 inputs, into the
 * accumulators a0..a3, b0..b3, c0..c3 (one per row and input). */
#define STEP_4x3(p, x0, x1, x2, kb)                                                                                \
    do {                                                                                                      \
        const __m256 v0 = _mm256_loadu_ps((x0) + (kb) * 8), v1 = _mm256_loadu_ps((x1) + (kb) * 8),            \
                     v2 = _mm256_loadu_ps((x2) + (kb) * 8);                                                   \
        __m256 w = _mm256_loadu_ps(p);                                                                        \
        FMA(a0, w, v0); FMA(b0, w, v1); FMA(c0, w, v2);                                                       \
        w = _mm256_loadu_ps((p) + 8);                                                                         \
        FMA(a1, w, v0); FMA(b1, w, v1); FMA(c1, w, v2);                                                       \
        w = _mm256_loadu_ps((p) + 16);                                                                        \
        FMA(a2, w, v0); FMA(b2, w, v1); FMA(c2, w, v2);                                                       \
        w = _mm256_loadu_ps((p) + 24);                                                                        \
        FMA(a3, w, v0); FMA(b3, w, v1); FMA(c3, w, v2);                                                       \
    } while (0)

/* The 8 lanes of 4 accumulators summed into the 4 outputs, in one fixed order that every path uses: an output's
 * value must not depend on how many rows were multiplied with it (batch invariance). */
static inline __m128 reduce4(__m256 a, __m256 b, __m256 c, __m256 d) {
    __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
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
        STEP_4x3(p, x0, x1, x2, kb);
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

/* The block's inputs after the first two (or all of them): the widened block against 3 inputs at a time. */
static void many_rows(const float *wf, const float *const *xs, int64_t M, int64_t KB, float *dst, int64_t stride,
                      const char *next) {
    int64_t m = 0;
    for (; m + 3 <= M; m += 3)
        rows4x3(wf, xs[m], xs[m + 1], xs[m + 2], KB, dst + m * stride, stride, m == 0 ? next : NULL);
    if (m < M) rows4x2(wf, xs[m], xs[M - 1], M - m, KB, dst + m * stride, stride);
}

/* This thread's buffer for a widened block (kept between calls). */
static float *block_buffer(int64_t n) {
    static __thread float *buf = NULL;
    static __thread int64_t cap = 0;
    if (n > cap) {
        free(buf);
        cap = n;
        buf = aligned_alloc(32, sizeof(float) * cap);
    }
    return buf;
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
        many_rows(WIDEN(wb, KB), xs, M, KB, dst, stride, sizeof(T) == 2 ? (const char *)(wb + KB * 32) : NULL); \
    }

/* A bf16 block widened into this thread's buffer; fp32 blocks are used where they lie. */
static const float *widen_bf16(const uint16_t *wb, int64_t KB) {
    float *buf = block_buffer(KB * 32);
    for (int64_t i = 0; i < KB * 4; i += 4) {
        _mm_prefetch((const char *)(wb + i * 8) + 1024, _MM_HINT_T0);
        _mm256_store_ps(buf + i * 8, load8_bf16(wb + i * 8));
        _mm256_store_ps(buf + i * 8 + 8, load8_bf16(wb + i * 8 + 8));
        _mm256_store_ps(buf + i * 8 + 16, load8_bf16(wb + i * 8 + 16));
        _mm256_store_ps(buf + i * 8 + 24, load8_bf16(wb + i * 8 + 24));
    }
    return buf;
}
static const float *widen_f32(const float *wb, int64_t KB) { (void)KB; return wb; }

DEFINE_BLOCK(block_bf16, uint16_t, load8_bf16, 512, widen_bf16)
DEFINE_BLOCK(block_f32, float, load_f32, 1024, widen_f32)

/* Quantized blocks. Both formats sum per group of columns: the 4 rows' integers (int4: before their zero point is
 * taken off) times an input, in lanes over the group's steps of 8 (A); then per row and lane
 * T = fma(s, A - z * X, T) from T = 0, X the input's sums over the group by lane (int4 only). Every path does exactly this
 * arithmetic (lane-wise until one reduce4 at the end). int4 nibble j (< 7) is used masked in place, q * 2^(4j), against the input scaled by 2^(-4j)
 * (prepare_q4): the same products as q * x, bit for bit. The top nibble is shifted down instead (a mask there would
 * set the sign bit) and its input is not scaled. */

/* The 4 zero points of a group as floats */
static inline void zeros4(const uint8_t *z, float *zf) {
    int32_t v;
    memcpy(&v, z, 4);
    _mm_storeu_ps(zf, _mm_cvtepi32_ps(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(v))));
}

/* The end of a group for one input against the block's 4 rows, lane-wise: T[r] += s_r * (A_r - z_r * X), X the
 * input's group sums by lane (z: the zero points as floats; NULL: none). */
static inline void group_end(__m256 *T, __m256 a0, __m256 a1, __m256 a2, __m256 a3, const float *s,
                             const float *z, const float *X) {
    if (z) {
        const __m256 x = _mm256_loadu_ps(X);
        a0 = _mm256_fnmadd_ps(_mm256_set1_ps(z[0]), x, a0);
        a1 = _mm256_fnmadd_ps(_mm256_set1_ps(z[1]), x, a1);
        a2 = _mm256_fnmadd_ps(_mm256_set1_ps(z[2]), x, a2);
        a3 = _mm256_fnmadd_ps(_mm256_set1_ps(z[3]), x, a3);
    }
    T[0] = _mm256_fmadd_ps(_mm256_set1_ps(s[0]), a0, T[0]);
    T[1] = _mm256_fmadd_ps(_mm256_set1_ps(s[1]), a1, T[1]);
    T[2] = _mm256_fmadd_ps(_mm256_set1_ps(s[2]), a2, T[2]);
    T[3] = _mm256_fmadd_ps(_mm256_set1_ps(s[3]), a3, T[3]);
}

/* A widened quantized block wf [KB][4][8] (the integers as floats) against any number of inputs, 3 at a time;
 * sc, zp: the block's [groups][4] scales and zero points (group g's at zp + g * zstride; zp NULL: none); gs[i]:
 * input i's group sums. */
static void grouped_rows(const float *wf, const float *sc, const uint8_t *zp, int64_t zstride, int64_t GS,
                         const float *const *xs, const float *const *gs, int64_t M, int64_t KB, float *dst,
                         int64_t stride) {
    for (int64_t m = 0; m < M; m += 3) {
        const int64_t n = M - m < 3 ? M - m : 3, i1 = m + (n > 1), i2 = m + n - 1;
        const float *x0 = xs[m], *x1 = xs[i1], *x2 = xs[i2];
        __m256 T[12];
        for (int i = 0; i < 12; i++) T[i] = _mm256_setzero_ps();
        for (int64_t g = 0; g < KB / GS; g++) {
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
            __m256 c0 = a0, c1 = a0, c2 = a0, c3 = a0;
            for (int64_t kb = g * GS; kb < (g + 1) * GS; kb++) {
                const float *p = wf + kb * 32;
                STEP_4x3(p, x0, x1, x2, kb);
            }
            float zf[4], *z = NULL;
            if (zp) zeros4(zp + g * zstride, z = zf);
            group_end(T, a0, a1, a2, a3, sc + g * 4, z, zp ? gs[m] + g * 8 : NULL);
            group_end(T + 4, b0, b1, b2, b3, sc + g * 4, z, zp ? gs[i1] + g * 8 : NULL);
            group_end(T + 8, c0, c1, c2, c3, sc + g * 4, z, zp ? gs[i2] + g * 8 : NULL);
        }
        _mm_storeu_ps(dst + m * stride, reduce4(T[0], T[1], T[2], T[3]));
        if (n > 1) _mm_storeu_ps(dst + i1 * stride, reduce4(T[4], T[5], T[6], T[7]));
        if (n > 2) _mm_storeu_ps(dst + i2 * stride, reduce4(T[8], T[9], T[10], T[11]));
    }
}

static inline __m256 q8x8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* An int8 block (layout [KB][4][8], scales sc [groups][4], GS = group / 8 steps per group): as DEFINE_BLOCK. */
static void block_q8(const int8_t *wb, const float *sc, int64_t GS, const float *const *xs, int64_t M, int64_t KB,
                     float *dst, int64_t stride) {
    if (M > 2) {
        float *wf = block_buffer(KB * 32);
        for (int64_t kb = 0; kb < KB; kb++) {
            const int8_t *p = wb + kb * 32;
            if (kb % 2 == 0) _mm_prefetch((const char *)p + 1024, _MM_HINT_T0);
            _mm256_store_ps(wf + kb * 32, q8x8(p));
            _mm256_store_ps(wf + kb * 32 + 8, q8x8(p + 8));
            _mm256_store_ps(wf + kb * 32 + 16, q8x8(p + 16));
            _mm256_store_ps(wf + kb * 32 + 24, q8x8(p + 24));
        }
        grouped_rows(wf, sc, NULL, 0, GS, xs, NULL, M, KB, dst, stride);
        return;
    }
    const float *x0 = xs[0], *x1 = xs[M - 1];
    __m256 T[8];
    for (int i = 0; i < 8; i++) T[i] = _mm256_setzero_ps();
    for (int64_t g = 0; g < KB / GS; g++) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, c0 = a0, c1 = a0, c2 = a0, c3 = a0;
        for (int64_t kb = g * GS; kb < (g + 1) * GS; kb++) {
            const int8_t *p = wb + kb * 32;
            _mm_prefetch((const char *)p + 512, _MM_HINT_NTA);
            const __m256 w0 = q8x8(p), w1 = q8x8(p + 8), w2 = q8x8(p + 16), w3 = q8x8(p + 24);
            __m256 v = _mm256_loadu_ps(x0 + kb * 8);
            FMA(a0, w0, v); FMA(a1, w1, v); FMA(a2, w2, v); FMA(a3, w3, v);
            if (M == 2) {
                v = _mm256_loadu_ps(x1 + kb * 8);
                FMA(c0, w0, v); FMA(c1, w1, v); FMA(c2, w2, v); FMA(c3, w3, v);
            }
        }
        group_end(T, a0, a1, a2, a3, sc + g * 4, NULL, NULL);
        if (M == 2) group_end(T + 4, c0, c1, c2, c3, sc + g * 4, NULL, NULL);
    }
    _mm_storeu_ps(dst, reduce4(T[0], T[1], T[2], T[3]));
    if (M == 2) _mm_storeu_ps(dst + stride, reduce4(T[4], T[5], T[6], T[7]));
}

/* Steps j of a row's 64-column chunk v as floats q * 2^(4j) (j = 7: q) */
static inline __m256 q4_step(__m256i v, int j) {
    const __m256i q = j == 7 ? _mm256_srli_epi32(v, 28)
                             : _mm256_and_si256(v, _mm256_set1_epi32((int)(0xFu << (4 * j))));
    return _mm256_cvtepi32_ps(q);
}

/* Steps j0..j1-1 of the 4 rows' 64-column chunk at p against one prepared input (y0 at the chunk), or, two, of
 * rows 2h and 2h + 1 against two inputs (register pressure: 4 accumulators a pass either way) */
static inline __attribute__((always_inline)) void q4_steps(const uint8_t *p, const float *y0, const float *y1,
                                                           int two, int h, int j0, int j1, __m256 *a, __m256 *c) {
    const __m256i *q = (const __m256i *)p;
    if (!two) {
        const __m256i v0 = _mm256_loadu_si256(q), v1 = _mm256_loadu_si256(q + 1), v2 = _mm256_loadu_si256(q + 2),
                      v3 = _mm256_loadu_si256(q + 3);
#pragma GCC unroll 8
        for (int j = j0; j < j1; j++) {
            const __m256 x = _mm256_loadu_ps(y0 + 8 * j);
            FMA(a[0], q4_step(v0, j), x);
            FMA(a[1], q4_step(v1, j), x);
            FMA(a[2], q4_step(v2, j), x);
            FMA(a[3], q4_step(v3, j), x);
        }
        return;
    }
    const __m256i v0 = _mm256_loadu_si256(q + 2 * h), v1 = _mm256_loadu_si256(q + 2 * h + 1);
    __m256 a0 = a[2 * h], a1 = a[2 * h + 1], c0 = c[2 * h], c1 = c[2 * h + 1];
#pragma GCC unroll 8
    for (int j = j0; j < j1; j++) {
        const __m256 xa = _mm256_loadu_ps(y0 + 8 * j), xb = _mm256_loadu_ps(y1 + 8 * j);
        __m256 w = q4_step(v0, j);
        FMA(a0, w, xa);
        FMA(c0, w, xb);
        w = q4_step(v1, j);
        FMA(a1, w, xa);
        FMA(c1, w, xb);
    }
    a[2 * h] = a0, a[2 * h + 1] = a1, c[2 * h] = c0, c[2 * h + 1] = c1;
}

/* q4_steps over the whole block (both row pairs when two) */
static inline __attribute__((always_inline)) void q4_chunk(const uint8_t *p, const float *y0, const float *y1,
                                                           int two, int j0, int j1, __m256 *a, __m256 *c) {
    q4_steps(p, y0, y1, two, 0, j0, j1, a, c);
    if (two) q4_steps(p, y0, y1, two, 1, j0, j1, a, c);
}

/* The few-row path of an int4 block, one or two inputs: groups of a multiple of 64 columns go a chunk at a time,
 * other groups half a chunk at a time. */
static inline __attribute__((always_inline)) void q4_few(const uint8_t *wb, const float *sc, const uint8_t *zp,
                                                         int64_t GU, const float *const *xs, const float *const *gs,
                                                         int two, int64_t NG, float *dst, int64_t stride) {
    static const uint8_t eights[4] = {8, 8, 8, 8};
    const float *x0 = xs[0], *x1 = xs[two];
    __m256 T[8];
    for (int i = 0; i < 8; i++) T[i] = _mm256_setzero_ps();
    for (int64_t g = 0; g < NG; g++) {
        __m256 a[4], c[4];
        for (int r = 0; r < 4; r++) a[r] = c[r] = _mm256_setzero_ps();
        if (GU % 2 == 0) {
            for (int64_t ch = g * GU / 2; ch < (g + 1) * GU / 2; ch++) {
                const uint8_t *p = wb + ch * 128;
                _mm_prefetch((const char *)p + 1024, _MM_HINT_NTA);
                _mm_prefetch((const char *)p + 1024 + 64, _MM_HINT_NTA);
                q4_chunk(p, x0 + ch * 64, x1 + ch * 64, two, 0, 8, a, c);
            }
        } else {  /* an odd number of 32-column units: half chunks */
            for (int64_t u = g * GU; u < (g + 1) * GU; u++) {
                const uint8_t *p = wb + (u >> 1) * 128;
                const float *y0 = x0 + (u >> 1) * 64, *y1 = x1 + (u >> 1) * 64;
                _mm_prefetch((const char *)p + 1024 + (u & 1) * 64, _MM_HINT_NTA);
                if (u & 1) q4_chunk(p, y0, y1, two, 4, 8, a, c);
                else q4_chunk(p, y0, y1, two, 0, 4, a, c);
            }
        }
        float z[4];
        zeros4(zp ? zp + g * 4 : eights, z);
        group_end(T, a[0], a[1], a[2], a[3], sc + g * 4, z, gs[0] + g * 8);
        if (two) group_end(T + 4, c[0], c[1], c[2], c[3], sc + g * 4, z, gs[1] + g * 8);
    }
    _mm_storeu_ps(dst, reduce4(T[0], T[1], T[2], T[3]));
    if (two) _mm_storeu_ps(dst + stride, reduce4(T[4], T[5], T[6], T[7]));
}

/* An int4 block (layout [KB/8][4][8 lanes of 8 nibbles], scales sc and zero points zp [groups][4], zp NULL meaning
 * 8; GU = group / 32 units per group); xs: the inputs prepared by prepare_q4, gs their group sums. */
static void block_q4(const uint8_t *wb, const float *sc, const uint8_t *zp, int64_t GU, const float *const *xs,
                     const float *const *gs, int64_t M, int64_t KB, float *dst, int64_t stride) {
    static const uint8_t eights[4] = {8, 8, 8, 8};
    const int64_t NG = KB / 4 / GU;
    if (M > 2) {
        float *wf = block_buffer(KB * 32);
        for (int64_t ch = 0; ch < KB / 8; ch++) {
            const uint8_t *p = wb + ch * 128;
            _mm_prefetch((const char *)p + 1024, _MM_HINT_T0);
            _mm_prefetch((const char *)p + 1024 + 64, _MM_HINT_T0);
            for (int r = 0; r < 4; r++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(p + r * 32));
#pragma GCC unroll 8
                for (int j = 0; j < 8; j++) _mm256_store_ps(wf + (ch * 8 + j) * 32 + r * 8, q4_step(v, j));
            }
        }
        grouped_rows(wf, sc, zp ? zp : eights, zp ? 4 : 0, GU * 4, xs, gs, M, KB, dst, stride);
        return;
    }
    if (M == 2) q4_few(wb, sc, zp, GU, xs, gs, 1, NG, dst, stride);
    else q4_few(wb, sc, zp, GU, xs, gs, 0, NG, dst, stride);
}

/* An input row for int4 blocks: xp = x with step j of each 64-column chunk scaled by 2^(-4j) (j < 7; exact), xg its
 * sums over each group of columns by lane (8 floats a group). */
static void prepare_q4(const float *x, int64_t K, int64_t group, float *xp, float *xg) {
    for (int64_t kb = 0; kb < K / 8; kb++) {
        const int j = kb % 8;
        const __m256 s = _mm256_set1_ps(j == 7 ? 1.0f : ldexpf(1.0f, -4 * j));
        _mm256_storeu_ps(xp + kb * 8, _mm256_mul_ps(_mm256_loadu_ps(x + kb * 8), s));
    }
    for (int64_t g = 0; g < K / group; g++) {
        __m256 a = _mm256_setzero_ps();
        for (int64_t i = g * group; i < (g + 1) * group; i += 8) a = _mm256_add_ps(a, _mm256_loadu_ps(x + i));
        _mm256_storeu_ps(xg + g * 8, a);
    }
}

/* Inputs as a block reads them: xs[i] = rows (int4: prepared into xp, with group sums in xg; gs[i] points there). */
static void prepare(const qw_t *w, const float *const *rows, int64_t M, float *xp, float *xg, const float **xs,
                    const float **gs) {
    const int64_t K = w->k, G = w->group ? K / w->group * 8 : 0;
    if (w->format != QW_Q4) {
        for (int64_t i = 0; i < M; i++) xs[i] = rows[i];
        return;
    }
#pragma omp parallel for schedule(static) if (M > 8)
    for (int64_t i = 0; i < M; i++) {
        prepare_q4(rows[i], K, w->group, xp + i * K, xg + i * G);
        xs[i] = xp + i * K;
        gs[i] = xg + i * G;
    }
}

/* Block b of matrix e of w against M inputs (prepared): dst[i * stride + r] = <xs[i], row 4b + r> */
static void block(const qw_t *w, int64_t e, int64_t b, const float *const *xs, const float *const *gs, int64_t M,
                  float *dst, int64_t stride) {
    const char *d = (const char *)w->data + e * w->data_stride;
    const int64_t K = w->k, KB = K / 8;
    if (w->format == QW_F32) {
        block_f32((const float *)d + b * K * 4, xs, M, KB, dst, stride);
    } else if (w->format == QW_BF16) {
        block_bf16((const uint16_t *)d + b * K * 4, xs, M, KB, dst, stride);
    } else {
        const int64_t NG = K / w->group;
        const float *s = w->scales + e * w->scale_stride + b * NG * 4;
        if (w->format == QW_Q8) {
            block_q8((const int8_t *)d + b * K * 4, s, w->group / 8, xs, M, KB, dst, stride);
        } else {
            const uint8_t *z = w->zeros ? w->zeros + e * w->zero_stride + b * NG * 4 : NULL;
            block_q4((const uint8_t *)d + b * K * 2, s, z, w->group / 32, xs, gs, M, KB, dst, stride);
        }
    }
}

/* Quantized weights against int8 activations (the opt-in many-row path, qwen35_matmul_q8in / qwen35_experts_q8in).
 * Each input row is rounded per 32 columns to int8 (Q8_0: s = max|x| / 127, q = round(x / s), s = 0 giving q = 0),
 * and a 32-column unit of 4 weight rows against one input is an integer dot product (maddubs, then madd to int32):
 * int8 weights by the sign trick, int4 as unsigned nibbles with the zero point taken off exactly as z * (sum of q)
 * per half unit; the result is one vector of (row, half unit) sums. Those are exact integers; each unit adds them
 * times the input's scale (one fma), each weight group times the weight's scale. So the result is the exact product
 * of the rounded input and dequantize() up to fp32 rounding, and every row runs the same arithmetic alone or in any
 * batch. The block is unpacked once into L1 as 32 bytes per row and unit in column order, then 4 inputs at a time
 * run against it. One Zen 3 core, [6144, 1024] x 512 rows (CPU time, best of 10): int8 (groups of 128) 1.07-1.11x
 * bf16's speed, int4 groups of 128 1.22-1.29x, of 32 1.16-1.24x (the fp32-input paths: 0.86-0.91x, 0.8x, 0.55x). */

/* An input row rounded to int8: q [K], its scales s [K/32], and (int4) the sums of q per half unit as the kernel
 * subtracts them, h [K/32][8] = (lo, lo, lo, lo, hi, hi, hi, hi). */
static void quantize_row(const float *x, int64_t K, int8_t *q, float *s, int32_t *h) {
    const __m256 sign = _mm256_set1_ps(-0.0f), lim = _mm256_set1_ps(127.0f);
    for (int64_t u = 0; u < K / 32; u++) {
        const float *p = x + u * 32;
        __m256 v[4], m = _mm256_setzero_ps();
        for (int i = 0; i < 4; i++) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[i] = _mm256_loadu_ps(p + 8 * i)));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
        const float sc = _mm_cvtss_f32(m4) / 127.0f;
        s[u] = sc;
        __m256i qi[4];
        for (int i = 0; i < 4; i++) {
            const __m256 r = sc > 0 ? _mm256_div_ps(v[i], _mm256_set1_ps(sc)) : _mm256_setzero_ps();
            qi[i] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, _mm256_sub_ps(_mm256_setzero_ps(), lim)), lim));
        }
        /* packs interleave the 128-bit halves; the permute restores column order */
        const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]), _mm256_packs_epi32(qi[2], qi[3]));
        const __m256i qv = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(q + u * 32), qv);
        if (h) {
            int32_t lo = 0, hi = 0;
            for (int i = 0; i < 16; i++) lo += q[u * 32 + i], hi += q[u * 32 + 16 + i];
            for (int i = 0; i < 4; i++) h[u * 8 + i] = lo, h[u * 8 + 4 + i] = hi;
        }
    }
}

/* The inputs of a q8in call: rows quantized into (q, s, h), pointers per input (OpenMP over rows when many). */
typedef struct { const int8_t *q; const float *s; const int32_t *h; } qrow_t;

static void quantize_rows(const float *const *rows, int64_t M, int64_t K, int sums, int8_t *q, float *s, int32_t *h,
                          qrow_t *out) {
#pragma omp parallel for schedule(static) if (M > 8)
    for (int64_t i = 0; i < M; i++) {
        quantize_row(rows[i], K, q + i * K, s + i * (K / 32), sums ? h + i * (K / 32) * 8 : NULL);
        out[i] = (qrow_t){q + i * K, s + i * (K / 32), sums ? h + i * (K / 32) * 8 : NULL};
    }
}

/* Block b of a quantized weight unpacked into buf: per unit 4 rows of 32 bytes (int8 values or int4 nibbles) in
 * column order. */
static void unpack_block(const qw_t *w, const char *d, int64_t b, int8_t *buf) {
    const int64_t K = w->k, U = K / 32;
    if (w->format == QW_Q8) {
        const int8_t *p = (const int8_t *)d + b * K * 4;
        for (int64_t u = 0; u < U; u++) {  /* [4 steps of 8 columns][4 rows][8]: a 4x4 transpose of 8-byte pieces */
            const __m256i *s = (const __m256i *)(p + u * 128);
            const __m256i a = _mm256_loadu_si256(s), c = _mm256_loadu_si256(s + 1), e = _mm256_loadu_si256(s + 2),
                          f = _mm256_loadu_si256(s + 3);
            const __m256i t0 = _mm256_unpacklo_epi64(a, c), t1 = _mm256_unpackhi_epi64(a, c),
                          t2 = _mm256_unpacklo_epi64(e, f), t3 = _mm256_unpackhi_epi64(e, f);
            const __m256i r[4] = {_mm256_permute2x128_si256(t0, t2, 0x20), _mm256_permute2x128_si256(t1, t3, 0x20),
                                  _mm256_permute2x128_si256(t0, t2, 0x31), _mm256_permute2x128_si256(t1, t3, 0x31)};
            for (int i = 0; i < 4; i++) _mm256_store_si256((__m256i *)(buf + u * 128 + i * 32), r[i]);
        }
        return;
    }
    /* int4: lane l of a row's 64-column chunk holds column 8j + l in nibble j. Low nibbles of its bytes (j even)
     * and high (j odd) are interleaved so each 32-bit lane holds one unit's columns l, 16+l, 8+l, 24+l; a byte
     * shuffle and a lane permute put them in column order. */
    const uint8_t *p = (const uint8_t *)d + b * K * 2;
    const __m256i m4 = _mm256_set1_epi8(0x0F), lo16 = _mm256_set1_epi32(0xFFFF);
    const __m256i shuf = _mm256_setr_epi8(0, 4, 8, 12, 2, 6, 10, 14, 1, 5, 9, 13, 3, 7, 11, 15,
                                          0, 4, 8, 12, 2, 6, 10, 14, 1, 5, 9, 13, 3, 7, 11, 15);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t ch = 0; ch < K / 64; ch++)
        for (int r = 0; r < 4; r++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(p + ch * 128 + r * 32));
            const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi32(v, 4), m4);
            const __m256i u0 = _mm256_or_si256(_mm256_and_si256(lo, lo16), _mm256_slli_epi32(hi, 16));
            const __m256i u1 = _mm256_or_si256(_mm256_srli_epi32(lo, 16), _mm256_andnot_si256(lo16, hi));
            _mm256_store_si256((__m256i *)(buf + (2 * ch) * 128 + r * 32),
                               _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(u0, shuf), perm));
            _mm256_store_si256((__m256i *)(buf + (2 * ch + 1) * 128 + r * 32),
                               _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(u1, shuf), perm));
        }
}

/* 4 rows' int32 sums by 16-column half, as (r0 lo, r1 lo, r2 lo, r3 lo, r0 hi, ..., r3 hi) */
static inline __m256i sums4(__m256i p0, __m256i p1, __m256i p2, __m256i p3) {
    const __m256i one = _mm256_set1_epi16(1);
    p0 = _mm256_madd_epi16(p0, one), p1 = _mm256_madd_epi16(p1, one);
    p2 = _mm256_madd_epi16(p2, one), p3 = _mm256_madd_epi16(p3, one);
    const __m256i a = _mm256_add_epi32(_mm256_unpacklo_epi32(p0, p1), _mm256_unpackhi_epi32(p0, p1));
    const __m256i b = _mm256_add_epi32(_mm256_unpacklo_epi32(p2, p3), _mm256_unpackhi_epi32(p2, p3));
    return _mm256_add_epi32(_mm256_unpacklo_epi64(a, b), _mm256_unpackhi_epi64(a, b));
}

/* The 4 rows of a unit (w: 32 bytes each) against input x: int32 sums by (row, half). int8 by the sign trick
 * (maddubs(|x|, sign(w, x)): |x|, |w| <= 127, so a pair of products fits in int16; int8 weights are in [-127, 127]
 * as quantize() and the converters make them, -128 would not negate), int4 nibbles directly. */
static inline __m256i dot4(const __m256i *w, __m256i x, int q8) {
    if (q8) {
        const __m256i ax = _mm256_abs_epi8(x);
        return sums4(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(w[0], x)), _mm256_maddubs_epi16(ax, _mm256_sign_epi8(w[1], x)),
                     _mm256_maddubs_epi16(ax, _mm256_sign_epi8(w[2], x)), _mm256_maddubs_epi16(ax, _mm256_sign_epi8(w[3], x)));
    }
    /* int4: a product pair is at most 2 * 15 * 127, so 8 of them add up in int16: two hadds, then one madd */
    const __m256i h01 = _mm256_hadd_epi16(_mm256_maddubs_epi16(w[0], x), _mm256_maddubs_epi16(w[1], x));
    const __m256i h23 = _mm256_hadd_epi16(_mm256_maddubs_epi16(w[2], x), _mm256_maddubs_epi16(w[3], x));
    return _mm256_madd_epi16(_mm256_hadd_epi16(h01, h23), _mm256_set1_epi16(1));
}

/* NI inputs against an unpacked block (its units loaded once for all): per group, acc += float(integer sums) *
 * input scale per unit; then T += weight scale * acc; each row's two halves added last. d[i] NULL: x[i] repeats an
 * earlier input and is not stored (every row runs the same arithmetic wherever it sits). */
#define NI 4
static inline __attribute__((always_inline)) void q8in_rows(const int8_t *buf, int q8, const float *sc,
                                                            const uint8_t *zp, int64_t NG, int64_t GU,
                                                            const qrow_t *x, float *const *d) {
    __m256 T[NI];
    for (int i = 0; i < NI; i++) T[i] = _mm256_setzero_ps();
    for (int64_t g = 0; g < NG; g++) {
        __m256 acc[NI];
        for (int i = 0; i < NI; i++) acc[i] = _mm256_setzero_ps();
        __m256i z = _mm256_set1_epi32(8);
        if (!q8 && zp) {
            int32_t v;
            memcpy(&v, zp + g * 4, 4);
            z = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(v)));
        }
        for (int64_t u = g * GU; u < (g + 1) * GU; u++) {
            const __m256i *wu = (const __m256i *)(buf + u * 128);
            const __m256i w[4] = {_mm256_load_si256(wu), _mm256_load_si256(wu + 1), _mm256_load_si256(wu + 2),
                                  _mm256_load_si256(wu + 3)};
#pragma GCC unroll 4
            for (int i = 0; i < NI; i++) {
                __m256i s = dot4(w, _mm256_loadu_si256((const __m256i *)(x[i].q + u * 32)), q8);
                if (!q8)  /* the zero point, exactly: z * (sum of the input's integers) per half */
                    s = _mm256_sub_epi32(s, _mm256_mullo_epi32(z, _mm256_loadu_si256((const __m256i *)(x[i].h + u * 8))));
                acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(x[i].s[u]), acc[i]);
            }
        }
        const __m256 ws = _mm256_broadcast_ps((const __m128 *)(sc + g * 4));
        for (int i = 0; i < NI; i++) T[i] = _mm256_fmadd_ps(ws, acc[i], T[i]);
    }
    for (int i = 0; i < NI; i++)
        if (d[i]) _mm_storeu_ps(d[i], _mm_add_ps(_mm256_castps256_ps128(T[i]), _mm256_extractf128_ps(T[i], 1)));
}

/* The rounding on its own (tests): q [M, K] int8, s [M, K/32] */
void qwen35_quantize_q8(const float *x, int64_t M, int64_t K, int8_t *q, float *s) {
    for (int64_t i = 0; i < M; i++) quantize_row(x + i * K, K, q + i * K, s + i * (K / 32), NULL);
}

/* Block b of matrix e of a quantized w against M quantized inputs: dst[i * stride + r] = <x_i, row 4b + r> */
static void block_q8in(const qw_t *w, int64_t e, int64_t b, const qrow_t *xs, int64_t M, float *dst,
                       int64_t stride) {
    const char *d = (const char *)w->data + e * w->data_stride;
    const int64_t K = w->k, NG = K / w->group, GU = w->group / 32, q8 = w->format == QW_Q8;
    const float *sc = w->scales + e * w->scale_stride + b * NG * 4;
    const uint8_t *zp = !q8 && w->zeros ? w->zeros + e * w->zero_stride + b * NG * 4 : NULL;
    int8_t *buf = (int8_t *)block_buffer(K);
    unpack_block(w, d, b, buf);
    for (int64_t i = 0; i < M; i += NI) {
        qrow_t x[NI];
        float *dd[NI];
        for (int j = 0; j < NI; j++) {
            x[j] = xs[i + j < M ? i + j : i];
            dd[j] = i + j < M ? dst + (i + j) * stride : NULL;
        }
        if (q8) q8in_rows(buf, 1, sc, NULL, NG, GU, x, dd);
        else if (GU == 1) q8in_rows(buf, 0, sc, zp, NG, 1, x, dd);  /* groups of 32 (the default): one unit each */
        else q8in_rows(buf, 0, sc, zp, NG, GU, x, dd);
    }
}

/* Reusable per-thread scratch buffers (freshly mapped pages cost a fault each on first touch: ~15% of a
 * 2048-token MoE layer when the buffers were malloc'd per call). Kept until the thread ends. */
static float *scratch(int which, int64_t n) {
    static __thread float *buf[11] = {NULL};
    static __thread int64_t cap[11] = {0};
    if (n > cap[which]) {
        free(buf[which]);
        cap[which] = n;
        buf[which] = malloc(sizeof(float) * n);
    }
    return buf[which];
}

#define LINEAR_TILE 96
#define MOE_TILE 48

/* Rows go in tiles of LINEAR_TILE, whose inputs stay in L2 while every block passes. */
void qwen35_matmul(const float *x, const qw_t *w, int64_t e, float *y, int64_t M) {
    const int64_t N = w->n, K = w->k, q4 = w->format == QW_Q4;
    const float **rows = malloc(sizeof(float *) * (M > 0 ? M : 1) * 3), **xs = rows + M, **gs = xs + M;
    float *xp = q4 ? scratch(3, M * K) : NULL, *xg = q4 ? scratch(4, M * (K / w->group) * 8) : NULL;
    for (int64_t i = 0; i < M; i++) rows[i] = x + i * K;
    prepare(w, rows, M, xp, xg, xs, gs);
    for (int64_t m0 = 0; m0 < M; m0 += LINEAR_TILE) {
        const int64_t mt = M - m0 < LINEAR_TILE ? M - m0 : LINEAR_TILE;
#pragma omp parallel for schedule(dynamic, 16)
        for (int64_t b = 0; b < N / 4; b++) block(w, e, b, xs + m0, gs + m0, mt, y + m0 * N + b * 4, N);
    }
    free(rows);
}

/* As qwen35_matmul, the inputs rounded to int8 first (float weights: qwen35_matmul itself). */
void qwen35_matmul_q8in(const float *x, const qw_t *w, int64_t e, float *y, int64_t M) {
    if (w->format != QW_Q8 && w->format != QW_Q4) {
        qwen35_matmul(x, w, e, y, M);
        return;
    }
    const int64_t N = w->n, K = w->k, U = K / 32, sums = w->format == QW_Q4;
    const float **rows = malloc(sizeof(float *) * (M > 0 ? M : 1));
    qrow_t *xs = malloc(sizeof(qrow_t) * (M > 0 ? M : 1));
    for (int64_t i = 0; i < M; i++) rows[i] = x + i * K;
    quantize_rows(rows, M, K, sums, (int8_t *)scratch(7, M * K / 4), scratch(8, M * U),
                  sums ? (int32_t *)scratch(9, M * U * 8) : NULL, xs);
    for (int64_t m0 = 0; m0 < M; m0 += LINEAR_TILE) {
        const int64_t mt = M - m0 < LINEAR_TILE ? M - m0 : LINEAR_TILE;
#pragma omp parallel for schedule(dynamic, 16)
        for (int64_t b = 0; b < N / 4; b++) block_q8in(w, e, b, xs + m0, mt, y + m0 * N + b * 4, N);
    }
    free(rows);
    free(xs);
}

/* The (token, expert) pairs are counting-sorted by expert so each hit expert runs once over all its tokens; with
 * q8in, quantized weights get their inputs rounded to int8 (each token's once, each SwiGLU output once). */
static void experts_impl(const float *x, const int64_t *ids, const float *weights, int64_t Tn, int64_t k,
                         const qw_t *gate_up, const qw_t *down, float *out, int q8in) {
    const int64_t P = Tn * k, E = gate_up->count, H = gate_up->k, I = down->k;
    int64_t *start = calloc(E + 1, sizeof(int64_t)), *fill = malloc(sizeof(int64_t) * (E + 1));
    int64_t *pair_token = malloc(sizeof(int64_t) * P);
    float *pair_weight = malloc(sizeof(float) * P);
    float *hbuf = scratch(0, P * 2 * I), *abuf = scratch(1, P * I), *dbuf = scratch(2, P * H);
    int64_t *token_pairs = malloc(sizeof(int64_t) * P);  /* token t's pairs: token_pairs[t * k : t * k + k] */
    const float **xs = malloc(sizeof(float *) * P * 4), **as = xs + P, **gs1 = as + P, **gs2 = gs1 + P;
    for (int64_t p = 0; p < P; p++) start[ids[p] + 1]++;
    for (int64_t e = 0; e < E; e++) start[e + 1] += start[e];
    for (int64_t e = 0; e <= E; e++) fill[e] = start[e];
    for (int64_t p = 0; p < P; p++) {
        const int64_t q = fill[ids[p]]++;
        pair_token[q] = p / k;
        pair_weight[q] = weights[p];
        token_pairs[p] = q;
    }
    /* work units: an expert's tokens in tiles of up to MOE_TILE rows (their inputs stay in L2 while the expert's
     * blocks pass), each unit against every block of the expert's weight */
    const int64_t cap = P / MOE_TILE + E + 1;
    int64_t nu = 0, *ustart = malloc(sizeof(int64_t) * cap), *ulen = malloc(sizeof(int64_t) * cap);
    int64_t *uexp = malloc(sizeof(int64_t) * cap);
    for (int64_t e = 0; e < E; e++)
        for (int64_t r = start[e]; r < start[e + 1]; r += MOE_TILE) {
            ustart[nu] = r;
            ulen[nu] = start[e + 1] - r < MOE_TILE ? start[e + 1] - r : MOE_TILE;
            uexp[nu++] = e;
        }
    for (int64_t p = 0; p < P; p++) {
        xs[p] = x + pair_token[p] * H;
        as[p] = abuf + p * I;
    }
    /* group sums: 8 floats a group */
    const int64_t G1 = gate_up->group ? H / gate_up->group * 8 : 0, G2 = down->group ? I / down->group * 8 : 0;
    float *ap = NULL, *ag = NULL;
    if (gate_up->format == QW_Q4) {  /* each token's input prepared once; its pairs point there */
        const float **rows = malloc(sizeof(float *) * Tn * 2), **gts = rows + Tn;
        for (int64_t t = 0; t < Tn; t++) rows[t] = x + t * H;
        prepare(gate_up, rows, Tn, scratch(3, Tn * H), scratch(4, Tn * G1), rows, gts);
        for (int64_t p = 0; p < P; p++) {
            xs[p] = rows[pair_token[p]];
            gs1[p] = gts[pair_token[p]];
        }
        free(rows);
    }
    const int qa = q8in && gate_up->format >= QW_Q8, qb = q8in && down->format >= QW_Q8;
    qrow_t *xq = malloc(sizeof(qrow_t) * (P + Tn) * 2), *aq = xq + P, *tq = aq + P;
    if (qa) {  /* each token's input rounded once; its pairs point there */
        const float **rows = malloc(sizeof(float *) * Tn);
        for (int64_t t = 0; t < Tn; t++) rows[t] = x + t * H;
        quantize_rows(rows, Tn, H, gate_up->format == QW_Q4, (int8_t *)scratch(7, Tn * H / 4),
                      scratch(8, Tn * H / 32), (int32_t *)scratch(9, Tn * H / 4), tq);
        for (int64_t p = 0; p < P; p++) xq[p] = tq[pair_token[p]];
        free(rows);
    }
    int8_t *aqq = qb ? (int8_t *)scratch(5, P * I / 4) : NULL;
    float *aqs = qb ? scratch(6, P * I / 32) : NULL;
    int32_t *aqh = qb && down->format == QW_Q4 ? (int32_t *)scratch(10, P * I / 4) : NULL;
    if (down->format == QW_Q4 && !qb) {
        ap = scratch(5, P * I);
        ag = scratch(6, P * G2);
    }
    const int64_t nb1 = 2 * I / 4, nb2 = H / 4;
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t item = 0; item < nu * nb1; item++) {
            const int64_t u = item / nb1, b = item % nb1, p0 = ustart[u];
            if (qa) block_q8in(gate_up, uexp[u], b, xq + p0, ulen[u], hbuf + p0 * 2 * I + b * 4, 2 * I);
            else block(gate_up, uexp[u], b, xs + p0, gs1 + p0, ulen[u], hbuf + p0 * 2 * I + b * 4, 2 * I);
        }
#pragma omp for schedule(static)
        for (int64_t p = 0; p < P; p++) {
            swiglu(hbuf + p * 2 * I, hbuf + p * 2 * I + I, abuf + p * I, I);
            if (qb) {
                const int64_t U = I / 32;
                quantize_row(abuf + p * I, I, aqq + p * I, aqs + p * U, aqh ? aqh + p * U * 8 : NULL);
                aq[p] = (qrow_t){aqq + p * I, aqs + p * U, aqh ? aqh + p * U * 8 : NULL};
            } else if (ap) {
                prepare_q4(abuf + p * I, I, down->group, ap + p * I, ag + p * G2);
                as[p] = ap + p * I;
                gs2[p] = ag + p * G2;
            }
        }
#pragma omp for schedule(static)
        for (int64_t item = 0; item < nu * nb2; item++) {
            const int64_t u = item / nb2, b = item % nb2, p0 = ustart[u];
            if (qb) block_q8in(down, uexp[u], b, aq + p0, ulen[u], dbuf + p0 * H + b * 4, H);
            else block(down, uexp[u], b, as + p0, gs2 + p0, ulen[u], dbuf + p0 * H + b * 4, H);
        }
    }
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < Tn; t++) /* in expert order, as the pairs were sorted */
        for (int64_t e = 0, j = 0; j < k; j++) {
            int64_t q = -1;
            for (int64_t i = 0; i < k; i++) /* this token's pair with the j-th smallest expert id */
                if (token_pairs[t * k + i] >= 0 && (q < 0 || token_pairs[t * k + i] < q)) q = token_pairs[t * k + i], e = i;
            token_pairs[t * k + e] = -1;
            float *o = out + t * H;
            const float wgt = pair_weight[q], *d = dbuf + q * H;
            for (int64_t h = 0; h < H; h++) o[h] += wgt * d[h];
        }
    free(start); free(fill); free(pair_token); free(pair_weight); free(ustart); free(ulen); free(uexp);
    free(token_pairs); free(xs); free(xq);
}

void qwen35_experts(const float *x, const int64_t *ids, const float *weights, int64_t T, int64_t k,
                    const qw_t *gate_up, const qw_t *down, float *out) {
    experts_impl(x, ids, weights, T, k, gate_up, down, out, 0);
}

void qwen35_experts_q8in(const float *x, const int64_t *ids, const float *weights, int64_t T, int64_t k,
                         const qw_t *gate_up, const qw_t *down, float *out) {
    experts_impl(x, ids, weights, T, k, gate_up, down, out, 1);
}
