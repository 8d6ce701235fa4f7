/* Product kernels torch does not ship, for decoding a few rows at a time on x86-64 CPUs with AVX512-BF16.
 *
 * Decoding one token reads every weight once, so a one-row product should take what reading its weight
 * takes. oneDNN's packed bfloat16 product for one row reads SmolLM2's weights ~1.2-2x slower than a plain
 * sum of the same bytes; this loop reads each weight row once, straight from the row-major (out, in)
 * layout nn.Linear keeps, and multiplies it against every input row while it sits in L1.
 *
 * Built by eco_guard/backends/native.py with the system C compiler, loaded with ctypes after torch, so
 * its OpenMP regions run on torch's own libgomp (the same thread pool and thread count torch.set_num_threads
 * gives the calling thread).
 */
#include <immintrin.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define ROWS 4 /* weight rows read together: four independent accumulator chains */

int eco_abi_version(void) { return 2; }

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

/* y (m, n) = x . w^T in float32, or y += x . w^T with accumulate (a residual connection). */
static void product(const uint16_t *x, const uint16_t *w, float *y, int64_t m, int64_t n, int64_t k, int accumulate) {
    const int64_t blocks = (n + ROWS - 1) / ROWS;
#pragma omp parallel for schedule(static) if (n * k >= (1 << 18))
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t first = b * ROWS, rows = n - first < ROWS ? n - first : ROWS;
        for (int64_t r = 0; r < m; r++) {
            float out[ROWS];
            dot_rows(x + r * k, w + first * k, rows, k, out);
            float *yr = y + r * n + first;
            for (int64_t i = 0; i < rows; i++) yr[i] = accumulate ? yr[i] + out[i] : out[i];
        }
    }
}

/* LlamaRMSNorm as transformers computes it in bfloat16: normalised in float32, cast, then scaled and cast. */
static void rms_norm_bf16(const float *x, const uint16_t *weight, uint16_t *y, int64_t m, int64_t h, float eps) {
    for (int64_t r = 0; r < m; r++) {
        const float *xr = x + r * h;
        double squares = 0.0;
        for (int64_t j = 0; j < h; j++) squares += (double)xr[j] * xr[j];
        const float inv = 1.0f / sqrtf((float)(squares / (double)h) + eps);
        for (int64_t j = 0; j < h; j++) y[r * h + j] = to_bf16(from_bf16(to_bf16(xr[j] * inv)) * from_bf16(weight[j]));
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

typedef struct { /* one decoder layer: bfloat16 weights, and its cache buffers (rows, kv heads, columns, d) */
    const uint16_t *input_norm, *qkv, *o, *post_norm, *gate_up, *down;
    uint16_t *keys, *values;
} eco_layer;

typedef struct { /* the shapes of a step */
    int64_t rows, hidden, intermediate, q_heads, kv_heads, head_dim, vocab;
    int64_t column, columns, mask_stride; /* column written this step; buffers' columns; mask row stride */
    float eps, scale;
} eco_shape;

/* sum of q[j] * key[j] over one head: q in float32, the key in bfloat16 */
static inline float dot_f32_bf16(const float *q, const uint16_t *key, int64_t d) {
    int64_t j = 0;
    __m512 acc = _mm512_setzero_ps();
    for (; j + 16 <= d; j += 16) {
        const __m512 kv = _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256((const __m256i *)(key + j)));
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + j), kv, acc);
    }
    float sum = _mm512_reduce_add_ps(acc);
    for (; j < d; j++) sum += q[j] * from_bf16(key[j]);
    return sum;
}

/* acc[j] += p * value[j] over one head, the value in bfloat16 */
static inline void add_scaled_bf16(float *acc, float p, const uint16_t *value, int64_t d) {
    int64_t j = 0;
    const __m512 pv = _mm512_set1_ps(p);
    for (; j + 16 <= d; j += 16) {
        const __m512 vv = _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256((const __m256i *)(value + j)));
        _mm512_storeu_ps(acc + j, _mm512_fmadd_ps(pv, vv, _mm512_loadu_ps(acc + j)));
    }
    for (; j < d; j++) acc[j] += p * from_bf16(value[j]);
}

/* One query per (row, head) against the row's cached keys and values at columns 0..column where mask is set. */
static void attend(const float *qkv, const eco_layer *layer, const uint8_t *mask, float *out, const eco_shape *s) {
    const int64_t d = s->head_dim, groups = s->q_heads / s->kv_heads, width = (s->q_heads + 2 * s->kv_heads) * d;
    const int64_t tasks = s->rows * s->q_heads, used = s->column + 1;
#pragma omp parallel for schedule(static) if (tasks * used * d >= (1 << 16))
    for (int64_t task = 0; task < tasks; task++) {
        const int64_t r = task / s->q_heads, h = task % s->q_heads, g = h / groups;
        const float *q = qkv + r * width + h * d;
        const size_t base = (size_t)(r * s->kv_heads + g) * s->columns * d;
        const uint16_t *keys = layer->keys + base, *values = layer->values + base;
        const uint8_t *mr = mask + r * s->mask_stride;
        float best = -INFINITY, total = 0.0f, acc[256] = {0}; /* head_dim <= 256, checked by the caller */
        for (int64_t c = 0; c < used; c++) {
            if (!mr[c]) continue;
            const float score = dot_f32_bf16(q, keys + c * d, d) * s->scale;
            if (score > best) { /* online softmax: rescale what was summed so far */
                const float shrink = expf(best - score);
                total *= shrink;
                for (int64_t j = 0; j < d; j++) acc[j] *= shrink;
                best = score;
            }
            const float p = expf(score - best);
            total += p;
            add_scaled_bf16(acc, p, values + c * d, d);
        }
        float *o = out + (r * s->q_heads + h) * d;
        for (int64_t j = 0; j < d; j++) o[j] = total > 0.0f ? acc[j] / total : 0.0f;
    }
}

/* One decoding step of a Llama-family model for s->rows rows: hidden (rows, hidden) holds the input embeddings
 * in float32 and is the residual stream throughout; cos and sin (rows, head_dim) the rotary angles of each row's
 * position; each row's key and value are written at s->column of its layer buffers; logits (rows, vocab). */
void eco_llama_step(float *hidden, const eco_layer *layers, int64_t n_layers, const float *cos, const float *sin,
                    const uint8_t *mask, const uint16_t *final_norm, const uint16_t *head, float *logits,
                    const eco_shape *s) {
    const int64_t m = s->rows, h = s->hidden, d = s->head_dim, nq = s->q_heads, nkv = s->kv_heads;
    const int64_t width = (nq + 2 * nkv) * d, inner = s->intermediate;
    const int64_t widest = h > inner ? (h > nq * d ? h : nq * d) : (inner > nq * d ? inner : nq * d);
    uint16_t *x = malloc(sizeof(uint16_t) * m * widest);
    float *qkv = malloc(sizeof(float) * m * width), *att = malloc(sizeof(float) * m * nq * d);
    float *gate_up = malloc(sizeof(float) * m * 2 * inner);
    for (int64_t l = 0; l < n_layers; l++) {
        const eco_layer *layer = layers + l;
        rms_norm_bf16(hidden, layer->input_norm, x, m, h, s->eps);
        product(x, layer->qkv, qkv, m, width, h, 0);
        for (int64_t r = 0; r < m; r++) {
            float *row = qkv + r * width;
            for (int64_t head_i = 0; head_i < nq + nkv; head_i++) rotate(row + head_i * d, cos + r * d, sin + r * d, d);
            for (int64_t g = 0; g < nkv; g++) {
                const size_t at = ((size_t)(r * nkv + g) * s->columns + s->column) * d;
                for (int64_t j = 0; j < d; j++) {
                    layer->keys[at + j] = to_bf16(row[(nq + g) * d + j]);
                    layer->values[at + j] = to_bf16(row[(nq + nkv + g) * d + j]);
                }
            }
        }
        attend(qkv, layer, mask, att, s);
        for (int64_t i = 0; i < m * nq * d; i++) x[i] = to_bf16(att[i]);
        product(x, layer->o, hidden, m, h, nq * d, 1);
        rms_norm_bf16(hidden, layer->post_norm, x, m, h, s->eps);
        product(x, layer->gate_up, gate_up, m, 2 * inner, h, 0);
        for (int64_t r = 0; r < m; r++)
            for (int64_t j = 0; j < inner; j++) {
                const float g = gate_up[r * 2 * inner + j], u = gate_up[r * 2 * inner + inner + j];
                x[r * inner + j] = to_bf16(g / (1.0f + expf(-g)) * u);
            }
        product(x, layer->down, hidden, m, h, inner, 1);
    }
    rms_norm_bf16(hidden, final_norm, x, m, h, s->eps);
    product(x, head, logits, m, s->vocab, h, 0);
    free(x);
    free(qkv);
    free(att);
    free(gate_up);
}
