/* Kernels torch does not ship, for decoding one row at a time on x86-64 CPUs with AVX512-BF16.
 *
 * Decoding one token reads every weight once, so a one-row product should take what reading its weight
 * takes. oneDNN's packed bfloat16 product for one row reads SmolLM2's weights ~1.2-2x slower than a plain
 * sum of the same bytes; the products here read each weight once, in the layout eco-guard keeps it in
 * (bfloat16 and int8 row-major (out, in), float32 transposed (in, out)), and eco_llama_step runs a whole
 * Llama decoding step in one call, where a step in torch dispatches ~40 small operations a layer.
 *
 * Built by eco_guard/backends/native.py with the system C compiler, loaded with ctypes after torch, so
 * its OpenMP regions run on torch's own libgomp (the same thread pool and thread count torch.set_num_threads
 * gives the calling thread).
 */
#include <immintrin.h>
#include <stdint.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#define ROWS 4 /* weight rows read together: four independent accumulator chains */

int eco_abi_version(void) { return 4; }

static inline uint16_t to_bf16(float f) { /* round to nearest even, as torch's float -> bfloat16 cast */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline __m512bh load_bh(const uint16_t *p) { return (__m512bh)_mm512_loadu_si512((const void *)p); }

/* out[0..rows) = the dot products of x with weight rows wb[0..rows) (rows <= ROWS, each k long, k % 32 == 0) */
static inline void dot_rows(const uint16_t *x, const uint16_t *wb, int64_t rows, int64_t k, float *out) {
    if (rows == ROWS) {
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t j = 0; j < k; j += 32) {
            const __m512bh xv = load_bh(x + j);
            for (int i = 0; i < ROWS; i++) /* the next block's rows: the hardware prefetcher follows four
                                              streams poorly (one thread: 24-29 -> 20 ms a token) */
                _mm_prefetch((const char *)(wb + (ROWS + i) * k + j), _MM_HINT_T0);
            a0 = _mm512_dpbf16_ps(a0, load_bh(wb + j), xv);
            a1 = _mm512_dpbf16_ps(a1, load_bh(wb + k + j), xv);
            a2 = _mm512_dpbf16_ps(a2, load_bh(wb + 2 * k + j), xv);
            a3 = _mm512_dpbf16_ps(a3, load_bh(wb + 3 * k + j), xv);
        }
        out[0] = _mm512_reduce_add_ps(a0);
        out[1] = _mm512_reduce_add_ps(a1);
        out[2] = _mm512_reduce_add_ps(a2);
        out[3] = _mm512_reduce_add_ps(a3);
        return;
    }
    for (int64_t i = 0; i < rows; i++) {
        __m512 a = _mm512_setzero_ps();
        for (int64_t j = 0; j < k; j += 32) a = _mm512_dpbf16_ps(a, load_bh(wb + i * k + j), load_bh(x + j));
        out[i] = _mm512_reduce_add_ps(a);
    }
}

/* y (m, n) = x (m, k) . w (n, k)^T + bias (n, may be NULL); bfloat16 in and out, float32 sums; k % 32 == 0.
 * Each block of ROWS weight rows is read from memory once and multiplied against the m input rows (meant for
 * one or a few rows: a batch is compute-bound, and oneDNN's blocked kernels do that better). */
void eco_bf16_linear(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y,
                     int64_t m, int64_t n, int64_t k) {
    const int64_t blocks = (n + ROWS - 1) / ROWS;
#pragma omp parallel for schedule(static) if (n * k >= (1 << 18))
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t first = b * ROWS, rows = n - first < ROWS ? n - first : ROWS;
        for (int64_t r = 0; r < m; r++) {
            float out[ROWS];
            dot_rows(x + r * k, w + first * k, rows, k, out);
            for (int64_t i = 0; i < rows; i++)
                y[r * n + first + i] = to_bf16(bias ? out[i] + from_bf16(bias[first + i]) : out[i]);
        }
    }
}

/* dot_rows for four input rows (x rows k apart) at once: 16 accumulators, so each loaded weight vector feeds
 * four products (several rows are compute-bound). Every sum is added in the same order as dot_rows adds it, so
 * a row's result does not depend on the rows beside it. */
static inline void dot_4x4(const uint16_t *x, const uint16_t *wb, int64_t k, float out[4][ROWS]) {
    __m512 acc[4][ROWS];
    for (int r = 0; r < 4; r++)
        for (int i = 0; i < ROWS; i++) acc[r][i] = _mm512_setzero_ps();
    for (int64_t j = 0; j < k; j += 32) {
        __m512bh w[ROWS];
        for (int i = 0; i < ROWS; i++) {
            _mm_prefetch((const char *)(wb + (ROWS + i) * k + j), _MM_HINT_T0);
            w[i] = load_bh(wb + i * k + j);
        }
        for (int r = 0; r < 4; r++) {
            const __m512bh xv = load_bh(x + r * k + j);
            for (int i = 0; i < ROWS; i++) acc[r][i] = _mm512_dpbf16_ps(acc[r][i], w[i], xv);
        }
    }
    for (int r = 0; r < 4; r++)
        for (int i = 0; i < ROWS; i++) out[r][i] = _mm512_reduce_add_ps(acc[r][i]);
}

/* y (m, n) = x . w^T in float32, or y += x . w^T with accumulate (a residual connection). */
static void product(const uint16_t *x, const uint16_t *w, float *y, int64_t m, int64_t n, int64_t k, int accumulate) {
    const int64_t blocks = (n + ROWS - 1) / ROWS;
#pragma omp parallel for schedule(static) if (n * k >= (1 << 18))
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t first = b * ROWS, rows = n - first < ROWS ? n - first : ROWS;
        int64_t r = 0;
        if (rows == ROWS)
            for (; r + 4 <= m; r += 4) {
                float out[4][ROWS];
                dot_4x4(x + r * k, w + first * k, k, out);
                for (int q = 0; q < 4; q++) {
                    float *yr = y + (r + q) * n + first;
                    for (int64_t i = 0; i < ROWS; i++) yr[i] = accumulate ? yr[i] + out[q][i] : out[q][i];
                }
            }
        for (; r < m; r++) {
            float out[ROWS];
            dot_rows(x + r * k, w + first * k, rows, k, out);
            float *yr = y + r * n + first;
            for (int64_t i = 0; i < rows; i++) yr[i] = accumulate ? yr[i] + out[i] : out[i];
        }
    }
}

#define COLS 2048 /* columns of a transposed float32 weight summed into at once: 8 KB of output, in L1 */

/* y (m, n) = x . wt, or y += x . wt with accumulate: float32, the weight stored transposed (k, n), as
 * packing.py lays out float32 weights. Each weight row is streamed in segments of COLS columns (contiguous, a
 * page or two), four rows at a time into the same output segment. */
static void product_t(const float *x, const float *wt, float *y, int64_t m, int64_t n, int64_t k, int accumulate) {
    const int parallel = n * k >= (1 << 17), threads = parallel ? omp_get_max_threads() : 1;
    int64_t width = COLS; /* narrower segments where the columns would not give every thread one */
    if (n < (int64_t)threads * COLS) width = ((n + threads - 1) / threads + 15) / 16 * 16;
    const int64_t blocks = (n + width - 1) / width;
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t first = b * width, cols = n - first < width ? n - first : width;
        for (int64_t r = 0; r < m; r++) {
            const float *xr = x + r * k;
            float *restrict yr = y + r * n + first;
            if (!accumulate)
                for (int64_t c = 0; c < cols; c++) yr[c] = 0.0f;
            int64_t j = 0;
            for (; j + 4 <= k; j += 4) {
                const float x0 = xr[j], x1 = xr[j + 1], x2 = xr[j + 2], x3 = xr[j + 3];
                const float *restrict w0 = wt + j * n + first, *restrict w1 = w0 + n, *restrict w2 = w1 + n,
                                      *restrict w3 = w2 + n;
                for (int64_t c = 0; c < cols; c++) yr[c] += x0 * w0[c] + x1 * w1[c] + x2 * w2[c] + x3 * w3[c];
            }
            for (; j < k; j++) {
                const float xj = xr[j], *restrict wj = wt + j * n + first;
                for (int64_t c = 0; c < cols; c++) yr[c] += xj * wj[c];
            }
        }
    }
}

/* The cache's and the norms' precision (the model's floating-point dtype), and the layouts of the weights. */
enum { BF16 = 0, F32 = 1 };
enum { W_BF16 = 0, W_F32T = 1, W_INT8 = 2 }; /* bf16 (out, in); float32 transposed (in, out); int8 (out, in) */

static inline void put(void *buf, int64_t i, float v, int precision) {
    if (precision == F32) ((float *)buf)[i] = v;
    else ((uint16_t *)buf)[i] = to_bf16(v);
}

static inline float get(const void *buf, int64_t i, int precision) {
    return precision == F32 ? ((const float *)buf)[i] : from_bf16(((const uint16_t *)buf)[i]);
}

#define MAX_K 8192 /* inputs an int8 product quantises on the stack (more: on the heap) */

/* y (m, n) = (x . w^T) * scale, or y += with accumulate: int8 weights (n, k) with one scale per output row (in
 * `precision`), float32 inputs. Each input row is rounded to int16 with its own scale, as fine as the int32 sums
 * allow (|x| at most (2^31 - 1) / (127 k): 11,000 steps for k = 1536, 15 bits for k <= 516), and the products
 * run as int16 pairs (AVX512-VNNI): two instructions for 32 weights, so reading the int8 weights stays the limit. */
static void product_i8(const float *x, const int8_t *w, const void *scale, int precision, float *y, int64_t m,
                       int64_t n, int64_t k, int accumulate) {
    const int64_t blocks = (n + ROWS - 1) / ROWS;
    const int64_t top = (int64_t)(2147483647.0 / (127.0 * (double)k)) < 32767
                            ? (int64_t)(2147483647.0 / (127.0 * (double)k)) : 32767;
    int16_t small[MAX_K], *xq = k <= MAX_K ? small : malloc(sizeof(int16_t) * k); /* wider layers: the heap */
    for (int64_t r = 0; r < m; r++) {
        const float *xr = x + r * k;
        float amax = 0.0f;
        for (int64_t j = 0; j < k; j++) amax = fabsf(xr[j]) > amax ? fabsf(xr[j]) : amax;
        const float step = amax > 0.0f ? amax / (float)top : 1.0f, inv = 1.0f / step;
        int64_t j = 0;
        for (const __m512 iv = _mm512_set1_ps(inv); j + 16 <= k; j += 16) /* rounded to nearest, saturated */
            _mm256_storeu_si256((__m256i *)(xq + j),
                                _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xr + j), iv))));
        for (; j < k; j++) xq[j] = (int16_t)lrintf(xr[j] * inv);
        float *yr = y + r * n;
#pragma omp parallel for schedule(static) if (n * k >= (1 << 18))
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t first = b * ROWS, rows = n - first < ROWS ? n - first : ROWS;
            __m512i acc[ROWS];
            for (int i = 0; i < ROWS; i++) acc[i] = _mm512_setzero_si512();
            int64_t j = 0;
            for (; j + 32 <= k; j += 32) {
                const __m512i xv = _mm512_loadu_si512((const void *)(xq + j));
                for (int64_t i = 0; i < rows; i++) {
                    _mm_prefetch((const char *)(w + (first + ROWS + i) * k + j), _MM_HINT_T0); /* next block */
                    const __m256i bytes = _mm256_loadu_si256((const __m256i *)(w + (first + i) * k + j));
                    acc[i] = _mm512_dpwssd_epi32(acc[i], _mm512_cvtepi8_epi16(bytes), xv);
                }
            }
            for (int64_t i = 0; i < rows; i++) {
                int64_t sum = _mm512_reduce_add_epi32(acc[i]);
                for (int64_t t = j; t < k; t++) sum += (int64_t)w[(first + i) * k + t] * xq[t];
                const float value = (float)sum * step * get(scale, first + i, precision);
                yr[first + i] = accumulate ? yr[first + i] + value : value;
            }
        }
    }
    if (xq != small) free(xq);
}

/* y [+]= x . (the weight), whichever layout it has; x is bfloat16 for W_BF16 weights, float32 otherwise */
static void prod(const void *x, const void *w, const void *scale, float *y, int64_t m, int64_t n, int64_t k,
                 int accumulate, int weights, int precision) {
    if (weights == W_F32T) product_t(x, w, y, m, n, k, accumulate);
    else if (weights == W_INT8) product_i8(x, w, scale, precision, y, m, n, k, accumulate);
    else product(x, w, y, m, n, k, accumulate);
}

/* LlamaRMSNorm, written to y in `format`: in a bfloat16 model as transformers computes it (normalised in float32,
 * cast, then scaled), in a float32 one the scaled value itself. */
static void rms_norm(const float *x, const void *weight, void *y, int64_t m, int64_t h, float eps, int precision,
                     int format) {
    for (int64_t r = 0; r < m; r++) {
        const float *xr = x + r * h;
        double squares = 0.0;
        for (int64_t j = 0; j < h; j++) squares += (double)xr[j] * xr[j];
        const float inv = 1.0f / sqrtf((float)(squares / (double)h) + eps);
        for (int64_t j = 0; j < h; j++) {
            const float normed = precision == F32 ? xr[j] * inv : from_bf16(to_bf16(xr[j] * inv));
            put(y, r * h + j, normed * get(weight, j, precision), format);
        }
    }
}

/* rotate_half rotary embedding of one head in place: cos and sin hold the head's d angles (two equal halves) */
static void rotate(float *x, const float *cos, const float *sin, int64_t d) {
    const int64_t half = d / 2;
    for (int64_t j = 0; j < half; j++) {
        const float a = x[j], b = x[j + half];
        x[j] = a * cos[j] - b * sin[j];
        x[j + half] = b * cos[j + half] + a * sin[j + half];
    }
}

typedef struct { /* one decoder layer: weights (in the step's layout), int8 scales (else NULL), cache buffers
                  * (rows, kv heads, columns, d) */
    const void *input_norm, *qkv, *o, *post_norm, *gate_up, *down;
    const void *qkv_scale, *o_scale, *gate_up_scale, *down_scale;
    void *keys, *values;
} eco_layer;

typedef struct { /* the shapes of a step */
    int64_t rows, hidden, intermediate, q_heads, kv_heads, head_dim, vocab;
    int64_t column, columns, mask_stride; /* column written this step; buffers' columns; mask row stride */
    int64_t precision;                    /* BF16 or F32: the cache, the norms and the int8 scales */
    int64_t weights;                      /* W_BF16, W_F32T or W_INT8 */
    float eps, scale;
} eco_shape;

static inline __m512 load16(const void *p, int64_t i, int precision) {
    if (precision == F32) return _mm512_loadu_ps((const float *)p + i);
    return _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i)));
}

/* sum of q[j] * key[j] over one head: q in float32, the key in the cache's precision */
static inline float dot_key(const float *q, const void *key, int64_t d, int precision) {
    int64_t j = 0;
    __m512 acc = _mm512_setzero_ps();
    for (; j + 16 <= d; j += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + j), load16(key, j, precision), acc);
    float sum = _mm512_reduce_add_ps(acc);
    for (; j < d; j++) sum += q[j] * get(key, j, precision);
    return sum;
}

/* acc[j] += p * value[j] over one head, the value in the cache's precision */
static inline void add_value(float *acc, float p, const void *value, int64_t d, int precision) {
    int64_t j = 0;
    const __m512 pv = _mm512_set1_ps(p);
    for (; j + 16 <= d; j += 16)
        _mm512_storeu_ps(acc + j, _mm512_fmadd_ps(pv, load16(value, j, precision), _mm512_loadu_ps(acc + j)));
    for (; j < d; j++) acc[j] += p * get(value, j, precision);
}

/* One query per (row, head) against the row's cached keys and values at columns 0..column where mask is set. */
static void attend(const float *qkv, const eco_layer *layer, const uint8_t *mask, float *out, const eco_shape *s) {
    const int precision = (int)s->precision;
    const int64_t d = s->head_dim, groups = s->q_heads / s->kv_heads, width = (s->q_heads + 2 * s->kv_heads) * d;
    const int64_t tasks = s->rows * s->q_heads, used = s->column + 1, size = precision == F32 ? 4 : 2;
#pragma omp parallel for schedule(static) if (tasks * used * d >= (1 << 16))
    for (int64_t task = 0; task < tasks; task++) {
        const int64_t r = task / s->q_heads, h = task % s->q_heads, g = h / groups;
        const float *q = qkv + r * width + h * d;
        const size_t base = (size_t)(r * s->kv_heads + g) * s->columns * d;
        const char *keys = (const char *)layer->keys + base * size, *values = (const char *)layer->values + base * size;
        const uint8_t *mr = mask + r * s->mask_stride;
        float best = -INFINITY, total = 0.0f, acc[256] = {0}; /* head_dim <= 256, checked by the caller */
        for (int64_t c = 0; c < used; c++) {
            if (!mr[c]) continue;
            const float score = dot_key(q, keys + c * d * size, d, precision) * s->scale;
            if (score > best) { /* online softmax: rescale what was summed so far */
                const float shrink = expf(best - score);
                total *= shrink;
                for (int64_t j = 0; j < d; j++) acc[j] *= shrink;
                best = score;
            }
            const float p = expf(score - best);
            total += p;
            add_value(acc, p, values + c * d * size, d, precision);
        }
        float *o = out + (r * s->q_heads + h) * d;
        for (int64_t j = 0; j < d; j++) o[j] = total > 0.0f ? acc[j] / total : 0.0f;
    }
}

/* One decoding step of a Llama-family model for s->rows rows: hidden (rows, hidden) holds the input embeddings
 * in float32 and is the residual stream throughout; cos and sin (rows, head_dim) the rotary angles of each row's
 * position; each row's key and value are written at s->column of its layer buffers; logits (rows, vocab). */
void eco_llama_step(float *hidden, const eco_layer *layers, int64_t n_layers, const float *cos, const float *sin,
                    const uint8_t *mask, const void *final_norm, const void *head, const void *head_scale,
                    float *logits, const eco_shape *s) {
    const int precision = (int)s->precision, weights = (int)s->weights, format = weights == W_BF16 ? BF16 : F32;
    const int64_t m = s->rows, h = s->hidden, d = s->head_dim, nq = s->q_heads, nkv = s->kv_heads;
    const int64_t width = (nq + 2 * nkv) * d, inner = s->intermediate;
    const int64_t widest = h > inner ? (h > nq * d ? h : nq * d) : (inner > nq * d ? inner : nq * d);
    void *x = malloc((format == F32 ? sizeof(float) : sizeof(uint16_t)) * m * widest);
    float *qkv = malloc(sizeof(float) * m * width), *att = malloc(sizeof(float) * m * nq * d);
    float *gate_up = malloc(sizeof(float) * m * 2 * inner);
    for (int64_t l = 0; l < n_layers; l++) {
        const eco_layer *layer = layers + l;
        rms_norm(hidden, layer->input_norm, x, m, h, s->eps, precision, format);
        prod(x, layer->qkv, layer->qkv_scale, qkv, m, width, h, 0, weights, precision);
        for (int64_t r = 0; r < m; r++) {
            float *row = qkv + r * width;
            for (int64_t head_i = 0; head_i < nq + nkv; head_i++) rotate(row + head_i * d, cos + r * d, sin + r * d, d);
            for (int64_t g = 0; g < nkv; g++) {
                const int64_t at = ((r * nkv + g) * s->columns + s->column) * d;
                for (int64_t j = 0; j < d; j++) {
                    put(layer->keys, at + j, row[(nq + g) * d + j], precision);
                    put(layer->values, at + j, row[(nq + nkv + g) * d + j], precision);
                }
            }
        }
        attend(qkv, layer, mask, att, s);
        for (int64_t i = 0; i < m * nq * d; i++) put(x, i, att[i], format);
        prod(x, layer->o, layer->o_scale, hidden, m, h, nq * d, 1, weights, precision);
        rms_norm(hidden, layer->post_norm, x, m, h, s->eps, precision, format);
        prod(x, layer->gate_up, layer->gate_up_scale, gate_up, m, 2 * inner, h, 0, weights, precision);
        for (int64_t r = 0; r < m; r++)
            for (int64_t j = 0; j < inner; j++) {
                const float g = gate_up[r * 2 * inner + j], u = gate_up[r * 2 * inner + inner + j];
                put(x, r * inner + j, g / (1.0f + expf(-g)) * u, format);
            }
        prod(x, layer->down, layer->down_scale, hidden, m, h, inner, 1, weights, precision);
    }
    rms_norm(hidden, final_norm, x, m, h, s->eps, precision, format);
    prod(x, head, head_scale, logits, m, s->vocab, h, 0, weights, precision);
    free(x);
    free(qkv);
    free(att);
    free(gate_up);
}
