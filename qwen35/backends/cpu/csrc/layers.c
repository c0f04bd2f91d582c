/* The decoder's layers for a decode step (one new token per sequence, or the few a speculative step verifies, run one
 * after another through the recurrent state, which is kept after each where asked): each half of a layer (residual add + norm +
 * mixer, residual add + norm + FFN) is one native call, so a step is two calls per layer instead of dozens of
 * framework ops. Activations are fp32; weights any qw_t format (weights.h); caches are bf16 or fp32 (flag
 * `*_bf16`), rounded to nearest-even on write as torch's `.to(torch.bfloat16)` does. The references are the
 * modules of qwen35/models/qwen3_5.py and qwen35/layers/ (the Python faces are in ../layers.py).
 *
 *   qwen35_add_rmsnorm  h' = h + y; a = rms_norm(h') * w1                      (ops/norms.rms_norm, w1 = 1 + w)
 *   gdn_step            conv window + SiLU, q/k l2-norm, gates, gated-delta steps (a few tokens per sequence,
 *                       the state after each kept where asked), gated RMSNorm
 *   attn_decode         q/k RMSNorm, partial rotary, K/V written to the paged cache, attention over each
 *                       sequence's cached positions, sigmoid gate                   (Attention.forward)
 *   qwen35_causal_conv  causal depthwise conv + SiLU over packed prompt tokens      (ops/conv.causal_conv1d)
 *   qwen35_{gdn,attn,moe,mlp}_layer   the halves, each described by one struct (below)
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gdn_head.h"
#include "simd.h"
#include "weights.h"

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  /* quiet NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* element i of a cache tensor stored as bf16 or fp32 */
static inline float cache_get(const void *p, int bf16, int64_t i) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}
static inline void cache_put(void *p, int bf16, int64_t i, float x) {
    if (bf16) ((uint16_t *)p)[i] = f32_to_bf16(x);
    else ((float *)p)[i] = x;
}
/* x rounded to the cache's precision */
static inline float cache_round(int bf16, float x) { return bf16 ? bf16_to_f32(f32_to_bf16(x)) : x; }


/* 8-lane dot products, axpy, widening and exp over n (any n; AVX2 for the multiple-of-8 part) */
static inline float dot_f32(const float *a, const float *b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float s = hsum8(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}
static inline void widen_row(const uint16_t *x, float *y, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, load8_bf16(x + i));
    for (; i < n; i++) y[i] = bf16_to_f32(x[i]);
}
/* x[i] = exp(x[i] - mx) in place; returns their sum */
static inline float exp_shifted(float *x, int64_t n, float mx) {
    __m256 acc = _mm256_setzero_ps();
    const __m256 m = _mm256_set1_ps(mx);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), m));
        _mm256_storeu_ps(x + i, e);
        acc = _mm256_add_ps(acc, e);
    }
    float s = hsum8(acc);
    for (; i < n; i++) s += (x[i] = expf(x[i] - mx));
    return s;
}
static inline void axpy_f32(float w, const float *x, float *y, int64_t n) {
    const __m256 wv = _mm256_set1_ps(w);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += w * x[i];
}

static void rmsnorm_row(const float *x, const float *w1, float *out, int64_t n, float eps) {
    const float r = 1.0f / sqrtf(dot_f32(x, x, n) / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = x[i] * r * w1[i];
}

/* h_out = h + y (y may be NULL: h_out = h); a = rms_norm(h_out) * w1. All [M, H]. */
void qwen35_add_rmsnorm(const float *h, const float *y, const float *w1, float *h_out, float *a, int64_t M,
                        int64_t H, float eps) {
    for (int64_t m = 0; m < M; m++) {
        const float *hm = h + m * H;
        float *om = h_out + m * H;
        for (int64_t i = 0; i < H; i++) om[i] = y ? hm[i] + y[m * H + i] : hm[i];
        rmsnorm_row(om, w1, a + m * H, H, eps);
    }
}

/* One Gated DeltaNet step for S rows, from the input projections to the gated norm. The rows are nseq sequences of
 * consecutive rows (cu [nseq+1]; NULL: one row each), each a few new tokens run one after another (a decode step; a
 * speculative step's k + 1 tokens).
 * proj [S, stride]: [q (Hk*K) | k (Hk*K) | v (Hv*V) | z (Hv*V)] (in_proj_qkv, in_proj_z); ba [S, ba_stride]:
 * [b (Hv) | a (Hv)] (in_proj_b, in_proj_a).
 * conv_pool [slots, C, Kw-1], conv_w [C, Kw] fp32; ssm_pool [slots, Hv, K, V] fp32. Sequence q starts from slot
 * slots[q] (history present when has_state[q], otherwise zeros: stale slots are never read) and ends there; the
 * state after a row that is not its sequence's last goes to slot ring[row] when ring is given and that is >= 0
 * (the states a speculative step may roll back to). A_log, dt_bias [Hv], norm_w [V] fp32.
 * out [S, Hv*V]: norm(o) * w * silu(z), ready for out_proj. */
static void gdn_step(const float *proj, int64_t stride, const float *ba, int64_t ba_stride, void *conv_pool,
                     int64_t conv_bf16, const float *conv_w, float *ssm_pool, int64_t nseq, const int64_t *cu,
                     const int64_t *slots, const uint8_t *has_state, const int64_t *ring, const float *A_log,
                     const float *dt_bias, const float *norm_w, float eps, float *out, int64_t S, int64_t Hk,
                     int64_t Hv, int64_t K, int64_t V, int64_t Kw) {
    const int64_t key_dim = Hk * K, value_dim = Hv * V, C = 2 * key_dim + value_dim, Wh = Kw - 1;
    const int64_t group = Hv / Hk;
    const float q_scale = 1.0f / sqrtf((float)K);
    const int bf = (int)conv_bf16;
    float *mixed = malloc(sizeof(float) * S * C);
#define FIRST_ROW(q) (cu ? cu[q] : (q))
#define END_ROW(q) (cu ? cu[(q) + 1] : (q) + 1)
/* where the state after row r of sequence q goes: its own slot after its last row, else its ring slot if any, else
 * its own slot too (the state it started from is no longer needed) */
#define DST_SLOT(q, r) ((r) + 1 < END_ROW(q) && ring && ring[r] >= 0 ? ring[r] : slots[q])
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t q = 0; q < nseq; q++) {  /* conv window: [history | tokens rounded to the cache's precision] */
            const int64_t r0 = FIRST_ROW(q), r1 = END_ROW(q), base = slots[q] * C * Wh;
            for (int64_t c = 0; c < C; c++) {
                float hist[Wh > 0 ? Wh : 1];
                for (int64_t i = 0; i < Wh; i++)
                    hist[i] = has_state[q] ? cache_get(conv_pool, bf, base + c * Wh + i) : 0.0f;
                for (int64_t r = r0; r < r1; r++) {
                    const float cur = cache_round(bf, proj[r * stride + c]);
                    float acc = 0.0f;
                    for (int64_t i = 0; i < Wh; i++) acc += hist[i] * conv_w[c * Kw + i];
                    acc += cur * conv_w[c * Kw + Wh];
                    mixed[r * C + c] = silu1(acc);
                    for (int64_t i = 0; i + 1 < Wh; i++) hist[i] = hist[i + 1];
                    if (Wh > 0) hist[Wh - 1] = cur;
                    const int64_t dst = DST_SLOT(q, r) * C * Wh;
                    if (r + 1 == r1 || dst != base)
                        for (int64_t i = 0; i < Wh; i++) cache_put(conv_pool, bf, dst + c * Wh + i, hist[i]);
                }
            }
        }
#pragma omp for schedule(static)
        for (int64_t item = 0; item < S * 2 * Hk; item++) {  /* l2-normalise q and k heads; q also * K^-1/2 */
            const int64_t s = item / (2 * Hk), j = item % (2 * Hk);
            float *x = mixed + s * C + j * K;
            const float r = 1.0f / sqrtf(dot_f32(x, x, K) + 1e-6f);
            for (int64_t i = 0; i < K; i++) x[i] = j < Hk ? x[i] * r * q_scale : x[i] * r;
        }
#pragma omp for collapse(2) schedule(static)
        for (int64_t q = 0; q < nseq; q++) {
            for (int64_t h = 0; h < Hv; h++) {
                const float da = dt_bias[h], A = expf(A_log[h]);
                const float *src = ssm_pool + (slots[q] * Hv + h) * K * V;
                /* the state this thread takes next, prefetched while this one is rewritten */
                const int64_t nq = h + 1 < Hv ? q : q + 1, nh = h + 1 < Hv ? h + 1 : 0;
                const char *next = nq < nseq && has_state[nq] ? (const char *)(ssm_pool + (slots[nq] * Hv + nh) * K * V)
                                                              : NULL;
                for (int64_t r = FIRST_ROW(q); r < END_ROW(q); r++) {
                    const float *row = proj + r * stride;
                    const float *qh = mixed + r * C + (h / group) * K, *kh = mixed + r * C + key_dim + (h / group) * K;
                    const float *vh = mixed + r * C + 2 * key_dim + h * V, *zh = row + C + h * V;
                    const float b = ba[r * ba_stride + h], a = ba[r * ba_stride + Hv + h] + da;
                    const float softplus = a > 20.0f ? a : log1pf(expf(a));
                    const float decay = expf(-A * softplus), beta = 1.0f / (1.0f + expf(-b));
                    float *dst = ssm_pool + (DST_SLOT(q, r) * Hv + h) * K * V, *oh = out + r * value_dim + h * V;
                    gdn_head_step(dst, src, qh, kh, vh, decay, beta, oh, K, V, r == FIRST_ROW(q) && !has_state[q],
                                  next);
                    src = dst;
                    const float rr = 1.0f / sqrtf(dot_f32(oh, oh, V) / (float)V + eps);  /* w * norm(o) * silu(z) */
                    for (int64_t j = 0; j < V; j++) oh[j] = norm_w[j] * (oh[j] * rr) * silu1(zh[j]);
                }
            }
        }
    }
#undef FIRST_ROW
#undef END_ROW
#undef DST_SLOT
    free(mixed);
}

/* Gated full attention for S sequences of one new token each, over a paged K/V cache [blocks, bs, Hkv, D].
 * qkv [S, stride]: [q_proj (per head: query D | gate D) | k (Hkv*D) | v (Hkv*D)]. qn1, kn1 [D]: 1 + the q/k norm
 * weights. cos, sin [S, rd]: rotary on the first rd channels of each head, NeoX halves. The new K/V go to flat
 * position slot_mapping[s]; sequence s then attends to its first context_lens[s] positions through its row of
 * block_tables [S, max_blocks]. out [S, Hq*D] = attention * sigmoid(gate). */
static void attn_decode(const float *qkv, int64_t stride, const float *qn1, const float *kn1, float eps,
                        const float *cos_, const float *sin_, int64_t rd, void *k_cache, void *v_cache,
                        int64_t cache_bf16, const int64_t *slot_mapping, const int64_t *block_tables,
                        int64_t max_blocks, const int64_t *context_lens, int64_t block_size, float *out, int64_t S,
                        int64_t Hq, int64_t Hkv, int64_t D, float scale) {
    const int bf = (int)cache_bf16;
    const int64_t G = Hq / Hkv, half = rd / 2;
    float *q = malloc(sizeof(float) * S * Hq * D);
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t item = 0; item < S * (Hq + Hkv); item++) {  /* norm + rotary; k and v into the cache */
            const int64_t s = item / (Hq + Hkv), j = item % (Hq + Hkv);
            const float *row = qkv + s * stride, *c = cos_ + s * rd, *sn = sin_ + s * rd;
            float x[D];
            if (j < Hq) rmsnorm_row(row + j * 2 * D, qn1, x, D, eps);
            else rmsnorm_row(row + 2 * Hq * D + (j - Hq) * D, kn1, x, D, eps);
            float r[D];
            memcpy(r, x, sizeof(float) * D);
            for (int64_t i = 0; i < half; i++) {
                r[i] = x[i] * c[i] - x[i + half] * sn[i];
                r[i + half] = x[i + half] * c[i + half] + x[i] * sn[i + half];
            }
            if (j < Hq) {
                memcpy(q + (s * Hq + j) * D, r, sizeof(float) * D);
            } else {
                const int64_t h = j - Hq, at = (slot_mapping[s] * Hkv + h) * D;
                const float *v = row + 2 * Hq * D + Hkv * D + h * D;
                for (int64_t i = 0; i < D; i++) {
                    cache_put(k_cache, bf, at + i, r[i]);
                    cache_put(v_cache, bf, at + i, v[i]);
                }
            }
        }
#pragma omp for schedule(dynamic)
        for (int64_t item = 0; item < S * Hkv; item++) {  /* the G query heads of one kv head read its K/V once */
            const int64_t s = item / Hkv, kvh = item % Hkv, L = context_lens[s];
            const int64_t *table = block_tables + s * max_blocks;
            const float *qg = q + (s * Hq + kvh * G) * D;
            float *p = malloc(sizeof(float) * G * (L > 0 ? L : 1)), *acc = calloc(G * D, sizeof(float));
            float row[D];  /* one cached K or V row in fp32, widened once for the G query heads */
            for (int64_t l = 0; l < L; l++) {
                const int64_t at = ((table[l / block_size] * block_size + l % block_size) * Hkv + kvh) * D;
                const float *kr = bf ? row : (const float *)k_cache + at;
                if (bf) widen_row((const uint16_t *)k_cache + at, row, D);
                for (int64_t g = 0; g < G; g++) p[g * L + l] = scale * dot_f32(qg + g * D, kr, D);
            }
            for (int64_t g = 0; g < G; g++) {
                float *pg = p + g * L, mx = -INFINITY;
                for (int64_t l = 0; l < L; l++) mx = pg[l] > mx ? pg[l] : mx;
                const float sum = exp_shifted(pg, L, mx);
                for (int64_t l = 0; l < L; l++) pg[l] /= sum;
            }
            for (int64_t l = 0; l < L; l++) {
                const int64_t at = ((table[l / block_size] * block_size + l % block_size) * Hkv + kvh) * D;
                const float *vr = bf ? row : (const float *)v_cache + at;
                if (bf) widen_row((const uint16_t *)v_cache + at, row, D);
                for (int64_t g = 0; g < G; g++) axpy_f32(p[g * L + l], vr, acc + g * D, D);
            }
            for (int64_t g = 0; g < G; g++) {
                const int64_t h = kvh * G + g;
                const float *gate = qkv + s * stride + h * 2 * D + D;
                float *o = out + (s * Hq + h) * D;
                for (int64_t i = 0; i < D; i++) o[i] = acc[g * D + i] / (1.0f + expf(-gate[i]));
            }
            free(p);
            free(acc);
        }
    }
    free(q);
}

/* Causal depthwise conv + SiLU over packed sequences (prefill). x [N, C] fp32, sequence s owning rows
 * cu[s]:cu[s+1]; w [C, Kw]; hist [S, C, Kw-1] (the inputs before each sequence's first row; NULL: zeros).
 * y [N, C] = silu(sum_i w[c, i] x[t - Kw + 1 + i, c]); new_hist [S, C, Kw-1] = each sequence's last Kw-1 inputs. */
void qwen35_causal_conv(const float *x, const float *w, const int64_t *cu, const float *hist, float *y,
                        float *new_hist, int64_t S, int64_t C, int64_t Kw) {
    const int64_t Wh = Kw - 1, N = cu[S];
    float *wt = malloc(sizeof(float) * Kw * C);  /* [Kw, C]: one tap's weights contiguous over channels */
    int64_t *seq = malloc(sizeof(int64_t) * (N > 0 ? N : 1));
    for (int64_t c = 0; c < C; c++)
        for (int64_t i = 0; i < Kw; i++) wt[i * C + c] = w[c * Kw + i];
    for (int64_t s = 0; s < S; s++)
        for (int64_t t = cu[s]; t < cu[s + 1]; t++) seq[t] = s;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < N; t++) {
        const int64_t s = seq[t], j = t - cu[s];
        float *yt = y + t * C;
        if (j >= Wh) {  /* the whole window is in x */
            int64_t c = 0;
            for (; c + 8 <= C; c += 8) {
                __m256 acc = _mm256_setzero_ps();
                for (int64_t i = 0; i < Kw; i++)
                    acc = _mm256_fmadd_ps(_mm256_loadu_ps(wt + i * C + c),
                                          _mm256_loadu_ps(x + (t - Wh + i) * C + c), acc);
                _mm256_storeu_ps(yt + c, silu8(acc));
            }
            for (; c < C; c++) {
                float acc = 0.0f;
                for (int64_t i = 0; i < Kw; i++) acc += wt[i * C + c] * x[(t - Wh + i) * C + c];
                yt[c] = silu1(acc);
            }
        } else {  /* the first Kw-1 tokens reach into the history */
            for (int64_t c = 0; c < C; c++) {
                float acc = 0.0f;
                for (int64_t i = 0; i < Kw; i++) {
                    const int64_t jj = j - Wh + i;
                    const float v = jj >= 0 ? x[(cu[s] + jj) * C + c] : hist ? hist[(s * C + c) * Wh + Wh + jj] : 0.0f;
                    acc += wt[i * C + c] * v;
                }
                yt[c] = silu1(acc);
            }
        }
    }
    for (int64_t s = 0; s < S; s++) {
        const int64_t len = cu[s + 1] - cu[s];
        for (int64_t c = 0; c < C; c++)
            for (int64_t i = 0; i < Wh; i++) {
                const int64_t jj = len - Wh + i;
                new_hist[(s * C + c) * Wh + i] =
                    jj >= 0 ? x[(cu[s] + jj) * C + c] : hist ? hist[(s * C + c) * Wh + Wh + jj] : 0.0f;
            }
    }
    free(wt);
    free(seq);
}

/* ---- Whole decoder-layer halves of a decode step: one call each, the residual add and the norm included ----
 * Every function below starts with h += y_prev (the previous half's output; NULL for none), a = rms_norm(h) * w1,
 * then runs its block on a and writes the half's output y [S, H] (the caller adds it to h at the next half). A
 * layer's weights and cache tensors are one struct (mirrored by ctypes in ../layers.py); what changes every step
 * is the step_t. Input dimensions need no padding and output projections write exactly H columns (checked in
 * Python). */
typedef struct {
    int64_t S;                                   /* rows (new tokens) */
    const int64_t *slots;                        /* Gated DeltaNet state slot of each sequence */
    const uint8_t *has_state;                    /* 0: the sequence starts from zero state */
    const int64_t *slot_mapping;                 /* flat K/V position of each row */
    const int64_t *block_tables;                 /* [S, max_blocks]: each row's sequence's blocks */
    const int64_t *context_lens;                 /* positions each row attends to, its own included */
    int64_t max_blocks, block_size;
    const float *cos, *sin;                      /* rotary [S, rd] */
    int64_t rd;
    int64_t nseq;                                /* sequences: rows cu[q]..cu[q+1]-1 (cu NULL: one row each) */
    const int64_t *cu;
    const int64_t *ring;                         /* [S] or NULL: slot for the state after each row (gdn_step) */
} step_t;

typedef struct {
    const float *norm_w1; float norm_eps;        /* input_layernorm: 1 + weight */
    qw_t in_qkvz, in_ba, out;                    /* [in_proj_qkv | in_proj_z], [in_proj_b | in_proj_a], out_proj */
    const float *conv_w, *A_log, *dt_bias, *gnorm_w;   /* [C, Kw], [Hv], [Hv], [V], fp32 */
    float gnorm_eps;
    int64_t Hk, Hv, K, V, Kw;
    void *conv_pool; int64_t conv_bf16;          /* [slots, C, Kw-1] */
    float *ssm_pool;                             /* [slots, Hv, K, V] */
} gdn_layer_t;

typedef struct {
    const float *norm_w1; float norm_eps;
    qw_t qkv, out;                               /* [q_proj | k_proj | v_proj], o_proj */
    const float *qn1, *kn1; float qk_eps;        /* 1 + q_norm / k_norm weights */
    int64_t Hq, Hkv, D; float scale;
    void *k_cache, *v_cache; int64_t cache_bf16; /* [blocks, block_size, Hkv, D] */
} attn_layer_t;

typedef struct {
    const float *norm_w1; float norm_eps;        /* post_attention_layernorm */
    qw_t router;                                 /* [gate (E rows) | shared_expert_gate (1 row)] */
    qw_t shared_gate_up, shared_down;            /* [shared gate_proj | up_proj], shared down_proj */
    qw_t gate_up, down;                          /* the routed experts */
    int64_t E, top_k, renorm;
} moe_layer_t;

typedef struct {
    const float *norm_w1; float norm_eps;
    qw_t gate_up, down;                          /* [gate_proj | up_proj], down_proj */
} mlp_layer_t;

/* h += y_prev; returns a = norm(h) (malloc'd) */
static float *layer_in(float *h, const float *y_prev, const float *w1, float eps, int64_t S, int64_t H) {
    float *a = malloc(sizeof(float) * S * H);
    for (int64_t m = 0; m < S; m++) {
        float *hm = h + m * H;
        if (y_prev)
            for (int64_t i = 0; i < H; i++) hm[i] += y_prev[m * H + i];
        rmsnorm_row(hm, w1, a + m * H, H, eps);
    }
    return a;
}

/* out[m, :I] = silu(x[m, :I]) * x[m, I:2I] for rows of stride `stride` */
static void swiglu_rows(const float *x, int64_t stride, float *out, int64_t M, int64_t I) {
    for (int64_t m = 0; m < M; m++) swiglu(x + m * stride, x + m * stride + I, out + m * I, I);
}

void qwen35_gdn_layer(const gdn_layer_t *L, const step_t *st, float *h, const float *y_prev, float *y) {
    const int64_t S = st->S, H = L->out.n;
    float *a = layer_in(h, y_prev, L->norm_w1, L->norm_eps, S, H);
    float *proj = malloc(sizeof(float) * S * L->in_qkvz.n), *ba = malloc(sizeof(float) * S * L->in_ba.n);
    float *o = malloc(sizeof(float) * S * L->Hv * L->V);
    qwen35_matmul(a, &L->in_qkvz, 0, proj, S);
    qwen35_matmul(a, &L->in_ba, 0, ba, S);
    gdn_step(proj, L->in_qkvz.n, ba, L->in_ba.n, L->conv_pool, L->conv_bf16, L->conv_w, L->ssm_pool,
             st->cu ? st->nseq : S, st->cu, st->slots, st->has_state, st->ring, L->A_log, L->dt_bias, L->gnorm_w,
             L->gnorm_eps, o, S, L->Hk, L->Hv, L->K, L->V, L->Kw);
    qwen35_matmul(o, &L->out, 0, y, S);
    free(a); free(proj); free(ba); free(o);
}

void qwen35_attn_layer(const attn_layer_t *L, const step_t *st, float *h, const float *y_prev, float *y) {
    const int64_t S = st->S, H = L->out.n;
    float *a = layer_in(h, y_prev, L->norm_w1, L->norm_eps, S, H);
    float *proj = malloc(sizeof(float) * S * L->qkv.n), *o = malloc(sizeof(float) * S * L->Hq * L->D);
    qwen35_matmul(a, &L->qkv, 0, proj, S);
    attn_decode(proj, L->qkv.n, L->qn1, L->kn1, L->qk_eps, st->cos, st->sin, st->rd, L->k_cache, L->v_cache,
                L->cache_bf16, st->slot_mapping, st->block_tables, st->max_blocks, st->context_lens, st->block_size,
                o, S, L->Hq, L->Hkv, L->D, L->scale);
    qwen35_matmul(o, &L->out, 0, y, S);
    free(a); free(proj); free(o);
}

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
            for (int64_t e = 0; best < 0 && e < E; e++)  /* NaN logits: an unchosen expert, as torch.topk takes NaN */
                if (p[e] != -1.0f) best = e;
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

/* routed experts + sigmoid(shared gate) * shared expert. Reference: layers/mlp.SparseMoeBlock.forward. */
void qwen35_moe_layer(const moe_layer_t *L, const step_t *st, float *h, const float *y_prev, float *y) {
    const int64_t S = st->S, H = L->shared_down.n, Is = L->shared_down.k, k = L->top_k;
    float *a = layer_in(h, y_prev, L->norm_w1, L->norm_eps, S, H);
    float *logits = malloc(sizeof(float) * S * L->router.n), *gu = malloc(sizeof(float) * S * L->shared_gate_up.n);
    float *act = malloc(sizeof(float) * S * Is), *sh = malloc(sizeof(float) * S * H), *wts = malloc(sizeof(float) * S * k);
    int64_t *ids = malloc(sizeof(int64_t) * S * k);
    qwen35_matmul(a, &L->router, 0, logits, S);
    qwen35_matmul(a, &L->shared_gate_up, 0, gu, S);
    route(logits, L->router.n, S, L->E, k, L->renorm, ids, wts);
    swiglu_rows(gu, L->shared_gate_up.n, act, S, Is);
    memset(y, 0, sizeof(float) * S * H);
    qwen35_experts(a, ids, wts, S, k, &L->gate_up, &L->down, y);
    qwen35_matmul(act, &L->shared_down, 0, sh, S);
    for (int64_t t = 0; t < S; t++) {
        const float gate = 1.0f / (1.0f + expf(-logits[t * L->router.n + L->E]));
        for (int64_t i = 0; i < H; i++) y[t * H + i] = y[t * H + i] + gate * sh[t * H + i];
    }
    free(a); free(logits); free(gu); free(act); free(sh); free(wts); free(ids);
}

/* dense SwiGLU MLP. Reference: layers/mlp.MLP.forward. */
void qwen35_mlp_layer(const mlp_layer_t *L, const step_t *st, float *h, const float *y_prev, float *y) {
    const int64_t S = st->S, H = L->down.n, I = L->down.k;
    float *a = layer_in(h, y_prev, L->norm_w1, L->norm_eps, S, H);
    float *proj = malloc(sizeof(float) * S * L->gate_up.n), *act = malloc(sizeof(float) * S * I);
    qwen35_matmul(a, &L->gate_up, 0, proj, S);
    swiglu_rows(proj, L->gate_up.n, act, S, I);
    qwen35_matmul(act, &L->down, 0, y, S);
    free(a); free(proj); free(act);
}
