/* A CPU kernel for split execution: a base matrix, low-bit codes and low-rank factors read in one pass (AVX2, FMA, BMI2).

   y[i, o] = bias[o] + W[o] . x[i] + sum_g s[o, g] (q[o, g] . x[i, g]) + sum_k U[k, o] t[i, k],   t[i] = V x[i]

   x (m, n_in); W (n_out, n_in) or NULL (the codes alone); s (n_out, n_in / group) the codes' bfloat16 scales; U (r,
   n_out) at strides (u_sk, u_so) and V (r, n_in), or NULL (t: room for m x r floats); bias (n_out) or NULL; x, W, U,
   V, bias float32. The codes q come in one of two layouts (`codes`), or none (q NULL, W given):
   - nibbles (esc NULL): (n_out, n_in / 2) bytes, each 16 codes in 8, byte b holding q[b] + 8 in its low and
     q[b + 8] + 8 in its high nibble;
   - two bits with escapes: (n_out, n_in / 4) bytes, each 16 codes in 4 read as a little-endian word whose field i
     (bits 2i, 2i + 1) holds code i / 2 + 8 (i % 2) (the nibble layout's order) as q + 1 for q in -1..1, 3 for any
     other code; those escaped codes follow one another in `esc`, a stream of nibbles (q + 8, two to a byte, low
     nibble first) in field order, row o's starting at nibble off[o] (int32), with 8 bytes of padding at its end; at most
     15 of each 16 codes escape.
   n_in and group are multiples of 16. Rows run in blocks of up to four, each output row's weights and codes read
   once per block (AVX2 + FMA; output rows split across OpenMP threads).

   hfd_rows_codes_matmul is the same for rows that each have parts of their own (many fine-tunes of one base in one
   batch): row i's are those of table row which[i / per], whose ROW fields hold its codes (the addresses of q, esc,
   off: esc 0 for nibbles; q 0 for no codes), the address of their scales, their group, then its low-rank factors
   (the address of U, u_sk, u_so, the address of V, r: U 0 for none); all 0: the base alone. r_max: the largest r
   (t: room for m x r_max floats). */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

typedef struct { const uint8_t *q, *esc; const int32_t *off; } codes;

enum { ROW = 10 }; /* int64 fields of a row of hfd_rows_codes_matmul's table */

static inline const uint8_t *codes_row(codes c, int64_t o, int64_t n_in) { return c.q + o * (n_in / (c.esc ? 4 : 2)); }

int hfd_supported(void) { /* whether this CPU runs the instructions the rest is compiled for */
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2");
}

static inline float bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

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

/* Sixteen two-bit codes (a little-endian word) in the nibble layout, the escaped ones (field 3) read from the stream at
   nibble *k, which moves past them: two-bit fields spread to nibbles and the escapes deposited into theirs with BMI2's
   pdep, no branch (whether codes hold an escape is too random to predict). */
static inline uint64_t escaped16(uint32_t fields, const uint8_t *esc, int64_t *k) {
    const uint64_t spread = _pdep_u64(fields, 0x3333333333333333ull); /* field i in nibble i */
    const uint64_t escaped = spread & (spread >> 1) & 0x1111111111111111ull;
    const uint64_t mask = (escaped << 4) - escaped; /* 0xf on the escaped nibbles */
    uint64_t stream;
    memcpy(&stream, esc + (*k >> 1), 8);
    stream >>= 4 * (*k & 1); /* from nibble k on: at least 15 nibbles, and at most 15 of 16 codes escape (`pack_escaped`) */
    *k += __builtin_popcountll(escaped);
    return ((spread + 0x7777777777777777ull) & ~mask) | _pdep_u64(stream, mask);
}

/* Codes j .. j + 15 of a row (q: the row's first byte; *k: the row's next escape) as two vectors of eight floats. */
static inline __attribute__((always_inline)) void codes16(const int ESCAPES, const uint8_t *q, const uint8_t *esc, int64_t *k, int64_t j,
                                                         __m256 *q0, __m256 *q1) {
    const __m128i low = _mm_set1_epi8(0x0f);
    const __m256i eight = _mm256_set1_epi32(8);
    __m128i v;
    if (ESCAPES) {
        uint32_t fields;
        memcpy(&fields, q + (j >> 2), 4);
        v = _mm_cvtsi64_si128((long long)escaped16(fields, esc, k));
    } else {
        v = _mm_loadl_epi64((const __m128i *)(q + (j >> 1)));
    }
    *q0 = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_and_si128(v, low)), eight));
    *q1 = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(v, 4), low)), eight));
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

/* One output row o (its weights w, codes c, scales s) for a block of NB rows of x (NB and ESCAPES constants after
   inlining, so the accumulators stay in registers; up to two rows, each half of a chunk has its own, which halves the
   chains of dependent FMAs). */
static inline __attribute__((always_inline)) void row_block(
    const int NB, const int ESCAPES, const float *x, int64_t n_in, const float *w, codes c, int64_t o, const uint16_t *s,
    int64_t group, float *out) {
    const int H = NB <= 2; /* the second half's accumulators */
    const uint8_t *q = codes_row(c, o, n_in);
    int64_t k = ESCAPES ? c.off[o] : 0;
    __m256 base[2][4], d[2][4];
    float delta[4] = {0, 0, 0, 0};
    for (int b = 0; b < NB; b++) base[0][b] = base[1][b] = _mm256_setzero_ps();
    for (int64_t g0 = 0; g0 < n_in; g0 += group) {
        for (int b = 0; b < NB; b++) d[0][b] = d[1][b] = _mm256_setzero_ps();
        for (int64_t j = g0; j < g0 + group; j += 16) {
            __m256 q0, q1;
            codes16(ESCAPES, q, c.esc, &k, j, &q0, &q1);
            const __m256 w0 = w ? _mm256_loadu_ps(w + j) : q0, w1 = w ? _mm256_loadu_ps(w + j + 8) : q1;
            for (int b = 0; b < NB; b++) {
                __m256 x0 = _mm256_loadu_ps(x + b * n_in + j), x1 = _mm256_loadu_ps(x + b * n_in + j + 8);
                if (w) {
                    base[0][b] = _mm256_fmadd_ps(w0, x0, base[0][b]);
                    base[H][b] = _mm256_fmadd_ps(w1, x1, base[H][b]);
                }
                d[0][b] = _mm256_fmadd_ps(q0, x0, d[0][b]);
                d[H][b] = _mm256_fmadd_ps(q1, x1, d[H][b]);
            }
        }
        const float scale = bf16(s[g0 / group]);
        for (int b = 0; b < NB; b++) delta[b] += scale * hsum(H ? _mm256_add_ps(d[0][b], d[1][b]) : d[0][b]);
    }
    for (int b = 0; b < NB; b++) out[b] = (w ? hsum(H ? _mm256_add_ps(base[0][b], base[1][b]) : base[0][b]) : 0.0f) + delta[b];
}

static inline __attribute__((always_inline)) void codes_block(int nb, const float *x, int64_t n_in, const float *w, codes c, int64_t o,
                                                             const uint16_t *s, int64_t group, float *out) {
    if (!c.q) {
        switch (nb) {
            case 1: base_block(1, x, n_in, w, out); break;
            case 2: base_block(2, x, n_in, w, out); break;
            case 3: base_block(3, x, n_in, w, out); break;
            default: base_block(4, x, n_in, w, out); break;
        }
    } else if (c.esc) {
        switch (nb) {
            case 1: row_block(1, 1, x, n_in, w, c, o, s, group, out); break;
            case 2: row_block(2, 1, x, n_in, w, c, o, s, group, out); break;
            case 3: row_block(3, 1, x, n_in, w, c, o, s, group, out); break;
            default: row_block(4, 1, x, n_in, w, c, o, s, group, out); break;
        }
    } else {
        switch (nb) {
            case 1: row_block(1, 0, x, n_in, w, c, o, s, group, out); break;
            case 2: row_block(2, 0, x, n_in, w, c, o, s, group, out); break;
            case 3: row_block(3, 0, x, n_in, w, c, o, s, group, out); break;
            default: row_block(4, 0, x, n_in, w, c, o, s, group, out); break;
        }
    }
}

void hfd_codes_matmul(const float *x, int64_t m, int64_t n_in, int64_t n_out, const float *W, const uint8_t *q, const uint8_t *esc,
                      const int32_t *off, const uint16_t *s, int64_t group, const float *U, int64_t u_sk, int64_t u_so, const float *V,
                      int64_t r, const float *bias, float *y, float *t, int threads) {
    const codes c = {q, esc, off};
    const int64_t n_groups = q ? n_in / group : 0;
    if (U) /* t (m, r) = x V^T, before the rows that read it */
        for (int64_t i = 0; i < m; i++)
            for (int64_t k = 0; k < r; k++) t[i * r + k] = dot(x + i * n_in, V + k * n_in, n_in);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o = 0; o < n_out; o++) {
        for (int64_t i = 0; i < m; i += 4) {
            float out[4];
            codes_block(m - i < 4 ? m - i : 4, x + i * n_in, n_in, W ? W + o * n_in : 0, c, o, q ? s + o * n_groups : 0, group, out);
            for (int b = 0; b < 4 && i + b < m; b++) {
                float v = out[b] + (bias ? bias[o] : 0.0f);
                for (int64_t k = 0; U && k < r; k++) v += U[k * u_sk + o * u_so] * t[(i + b) * r + k];
                y[(i + b) * n_out + o] = v;
            }
        }
    }
}

void hfd_rows_codes_matmul(const float *x, int64_t m, int64_t n_in, int64_t n_out, const float *W, const int64_t *table,
                           const int64_t *which, int64_t per, const float *bias, float *y, float *t, int64_t r_max, int threads) {
    for (int64_t i = 0; i < m; i++) { /* t (m, r_max): each row's x V^T, before the rows that read it */
        const int64_t *row = table + ROW * which[i / per];
        for (int64_t k = 0; row[8] && k < row[9]; k++) t[i * r_max + k] = dot(x + i * n_in, (const float *)row[8] + k * n_in, n_in);
    }
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
                const int64_t *row = table + ROW * which[(i + b) / per];
                const codes c = {(const uint8_t *)row[0], (const uint8_t *)row[1], (const int32_t *)row[2]};
                if (c.q && o + 2 < n_out) { /* the next rows' codes of this fine-tune: many streams outrun the prefetcher */
                    const uint8_t *next = codes_row(c, o + 2, n_in), *after = codes_row(c, o + 3, n_in);
                    for (const uint8_t *l = next; l < after; l += 64) _mm_prefetch((const char *)l, _MM_HINT_T0);
                    if (c.esc) _mm_prefetch((const char *)(c.esc + (c.off[o + 2] >> 1)), _MM_HINT_T0);
                }
                float v = hsum(a[b]) + (bias ? bias[o] : 0.0f);
                if (c.q) {
                    float d;
                    const int64_t group = row[4];
                    codes_block(1, x + (i + b) * n_in, n_in, 0, c, o, (const uint16_t *)row[3] + o * (n_in / group), group, &d);
                    v += d;
                }
                const float *U = (const float *)row[5];
                for (int64_t k = 0; U && k < row[9]; k++) v += U[k * row[6] + o * row[7]] * t[(i + b) * r_max + k];
                y[(i + b) * n_out + o] = v;
            }
        }
    }
}
