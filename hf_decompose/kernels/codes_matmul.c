/* A CPU kernel for split execution: a base matrix, 4-bit codes and low-rank factors read in one pass.

   y[i, o] = bias[o] + W[o] . x[i] + sum_g s[o, g] (q[o, g] . x[i, g]) + sum_k U[k, o] t[i, k],   t[i] = V x[i]

   x (m, n_in); W (n_out, n_in) or NULL (the codes alone); q the codes nibble-packed (n_out, n_in / 2), or NULL where W
   is given (no codes): each 16 codes in 8 bytes, byte b holding q[b] + 8 in its low and q[b + 8] + 8 in its high
   nibble; s (n_out, n_in / group) the scales; U (r, n_out) at strides (u_sk, u_so) and V (r, n_in), or NULL (t: room
   for m x r floats); bias (n_out) or NULL; everything float32 but q. n_in and group are multiples of 16. Rows run in
   blocks of up to four, each output row's weights and codes read once per block (AVX2 + FMA; output rows split
   across OpenMP threads).

   hfd_rows_codes_matmul is the same without low rank for rows that each have codes of their own (many fine-tunes of
   one base in one batch): codes[3 i .. 3 i + 2] hold the address of row i's nibble-packed codes, of their scales and
   their group (0, 0, 0: the base alone). */
#include <immintrin.h>
#include <stdint.h>

static inline float hsum(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    return _mm_cvtss_f32(_mm_add_ss(lo, _mm_movehdup_ps(lo)));
}

static inline float dot(const float *a, const float *b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), acc);
    return hsum(acc);
}

/* sum_g s[g] (q[g] . x[g]) over one row of codes. */
static inline float codes_dot(const float *x, const uint8_t *q, const float *s, int64_t n_in, int64_t group) {
    const __m128i low = _mm_set1_epi8(0x0f);
    const __m256i eight = _mm256_set1_epi32(8);
    float sum = 0.0f;
    for (int64_t g0 = 0; g0 < n_in; g0 += group) {
        __m256 d0 = _mm256_setzero_ps(), d1 = _mm256_setzero_ps();
        for (int64_t j = g0; j < g0 + group; j += 16) {
            __m128i v = _mm_loadl_epi64((const __m128i *)(q + j / 2));
            __m256 q0 = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_and_si128(v, low)), eight));
            __m256 q1 = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(v, 4), low)), eight));
            d0 = _mm256_fmadd_ps(q0, _mm256_loadu_ps(x + j), d0);
            d1 = _mm256_fmadd_ps(q1, _mm256_loadu_ps(x + j + 8), d1);
        }
        sum += s[g0 / group] * hsum(_mm256_add_ps(d0, d1));
    }
    return sum;
}

/* One output row o for a block of NB rows of x, the base matrix alone. */
static inline __attribute__((always_inline)) void base_block(const int NB, const float *x, int64_t n_in, const float *w, float *out) {
    __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t j = 0; j < n_in; j += 16) {
        __m256 w0 = _mm256_loadu_ps(w + j), w1 = _mm256_loadu_ps(w + j + 8);
        for (int b = 0; b < NB; b++)
            a[b] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + b * n_in + j + 8), _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + b * n_in + j), a[b]));
    }
    for (int b = 0; b < NB; b++) out[b] = hsum(a[b]);
}

/* One output row o for a block of NB rows of x (NB a constant after inlining, so the accumulators stay in registers). */
static inline __attribute__((always_inline)) void row_block(
    const int NB, const float *x, int64_t n_in, const float *w, const uint8_t *q, const float *s, int64_t group,
    float *out) {
    const __m128i low = _mm_set1_epi8(0x0f);
    const __m256i eight = _mm256_set1_epi32(8);
    __m256 base[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    float delta[4] = {0, 0, 0, 0};
    for (int64_t g0 = 0; g0 < n_in; g0 += group) {
        __m256 d[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int64_t j = g0; j < g0 + group; j += 16) {
            __m128i v = _mm_loadl_epi64((const __m128i *)(q + j / 2));
            __m256 q0 = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_and_si128(v, low)), eight));
            __m256 q1 = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(v, 4), low)), eight));
            if (w) {
                __m256 w0 = _mm256_loadu_ps(w + j), w1 = _mm256_loadu_ps(w + j + 8);
                for (int b = 0; b < NB; b++) {
                    __m256 x0 = _mm256_loadu_ps(x + b * n_in + j), x1 = _mm256_loadu_ps(x + b * n_in + j + 8);
                    base[b] = _mm256_fmadd_ps(w1, x1, _mm256_fmadd_ps(w0, x0, base[b]));
                    d[b] = _mm256_fmadd_ps(q1, x1, _mm256_fmadd_ps(q0, x0, d[b]));
                }
            } else {
                for (int b = 0; b < NB; b++) {
                    __m256 x0 = _mm256_loadu_ps(x + b * n_in + j), x1 = _mm256_loadu_ps(x + b * n_in + j + 8);
                    d[b] = _mm256_fmadd_ps(q1, x1, _mm256_fmadd_ps(q0, x0, d[b]));
                }
            }
        }
        const float scale = s[g0 / group];
        for (int b = 0; b < NB; b++) delta[b] += scale * hsum(d[b]);
    }
    for (int b = 0; b < NB; b++) out[b] = (w ? hsum(base[b]) : 0.0f) + delta[b];
}

void hfd_codes_matmul(const float *x, int64_t m, int64_t n_in, int64_t n_out, const float *W, const uint8_t *q,
                      const float *s, int64_t group, const float *U, int64_t u_sk, int64_t u_so, const float *V, int64_t r, const float *bias,
                      float *y, float *t, int threads) {
    const int64_t n_groups = q ? n_in / group : 0;
    if (U) /* t (m, r) = x V^T, before the rows that read it */
        for (int64_t i = 0; i < m; i++)
            for (int64_t k = 0; k < r; k++) t[i * r + k] = dot(x + i * n_in, V + k * n_in, n_in);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o = 0; o < n_out; o++) {
        const float *w = W ? W + o * n_in : 0;
        const uint8_t *qo = q ? q + o * (n_in / 2) : 0;
        const float *so = q ? s + o * n_groups : 0;
        for (int64_t i = 0; i < m; i += 4) {
            float out[4];
            const float *xi = x + i * n_in;
            const int nb = m - i < 4 ? m - i : 4;
            if (!q) {
                switch (nb) {
                    case 1: base_block(1, xi, n_in, w, out); break;
                    case 2: base_block(2, xi, n_in, w, out); break;
                    case 3: base_block(3, xi, n_in, w, out); break;
                    default: base_block(4, xi, n_in, w, out); break;
                }
            } else {
                switch (nb) {
                    case 1: row_block(1, xi, n_in, w, qo, so, group, out); break;
                    case 2: row_block(2, xi, n_in, w, qo, so, group, out); break;
                    case 3: row_block(3, xi, n_in, w, qo, so, group, out); break;
                    default: row_block(4, xi, n_in, w, qo, so, group, out); break;
                }
            }
            for (int b = 0; b < 4 && i + b < m; b++) {
                float v = out[b] + (bias ? bias[o] : 0.0f);
                for (int64_t k = 0; U && k < r; k++) v += U[k * u_sk + o * u_so] * t[(i + b) * r + k];
                y[(i + b) * n_out + o] = v;
            }
        }
    }
}

void hfd_rows_codes_matmul(const float *x, int64_t m, int64_t n_in, int64_t n_out, const float *W, const int64_t *codes,
                           const float *bias, float *y, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o = 0; o < n_out; o++) {
        const float *w = W + o * n_in;
        for (int64_t i = 0; i < m; i += 4) {
            const int64_t nb = m - i < 4 ? m - i : 4;
            __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
            for (int64_t j = 0; j < n_in; j += 8) {
                __m256 wj = _mm256_loadu_ps(w + j);
                for (int64_t b = 0; b < nb; b++) a[b] = _mm256_fmadd_ps(wj, _mm256_loadu_ps(x + (i + b) * n_in + j), a[b]);
            }
            for (int64_t b = 0; b < nb; b++) {
                const int64_t r = i + b;
                float v = hsum(a[b]) + (bias ? bias[o] : 0.0f);
                const uint8_t *q = (const uint8_t *)codes[3 * r];
                const int64_t group = codes[3 * r + 2];
                if (q) v += codes_dot(x + r * n_in, q + o * (n_in / 2), (const float *)codes[3 * r + 1] + o * (n_in / group), n_in, group);
                y[r * n_out + o] = v;
            }
        }
    }
}
