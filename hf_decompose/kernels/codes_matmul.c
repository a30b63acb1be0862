/* A CPU kernel for split execution: a base matrix, low-bit codes and low-rank factors read in one pass (AVX2, FMA, BMI2).

   y[i, o] = bias[o] + W[o] . x[i] + sum_g s[o, g] (q[o, g] . x[i, g]) + sum_f sum_k U_f[k, o] t_f[i, k],   t_f[i] = V_f x[i]

   x (m, n_in); W (n_out, n_in) or NULL; s (n_out, n_in / group) the codes' bfloat16 scales; bias (n_out) or NULL; x, W,
   bias float32. Codes with a step multiplier per column c (n_in) read xc = x * c (m, n_in) instead of x (xc NULL: x);
   W and the factors read x, then each in its own pass over the row's inputs. The codes q come in one of three layouts
   (`codes`), or none (q NULL):
   - nibbles (esc NULL): (n_out, n_in / 2) bytes, each 16 codes in 8, byte b holding q[b] + 8 in its low and
     q[b + 8] + 8 in its high nibble;
   - two bits with escapes (esc not NULL, sign NULL): (n_out, n_in / 4) bytes, each 16 codes in 4 read as a little-endian word whose field i
     (bits 2i, 2i + 1) holds code i / 2 + 8 (i % 2) (the nibble layout's order) as q + 1 for q in -1..1, 3 for any
     other code; those escaped codes follow one another in `esc`, a stream of nibbles (q + 8, two to a byte, low
     nibble first) in field order, row o's starting at nibble off[o] (int32), with 8 bytes of padding at its end; at most
     15 of each 16 codes escape;
   - masked (sign not NULL): (n_out, n_in / 8) bytes, bit i of byte b (in order) set where code 8 b + i is -1 or 1; a bit
     each for those, 1 for 1, in the stream `sign` (bit i of byte b the (8 b + i)-th), row o's from bit off[2 o + 1],
     with 8 bytes of padding at its end; the other nonzero codes (escapes) in a list of little-endian uint16 entries,
     each the code + 8 in its low 4 bits and the step from the previous entry's column (from column 0 for a row's
     first) in its high 12, an entry of code 0 a step alone (for steps beyond 4095), row o's from entry off[2 o] (int32
     off), with 8 bytes of padding at its end. Codes -1, 0 and 1 take 1 bit each and 1 more when nonzero, the rarer
     codes 16 bits each (added after the row): fewer bits than two a code where most codes are 0 or +-1 (1.41 bits on
     the default pair's annealed embedding, 1.74 in most of its layers), decoded faster than two bits (no table, no
     branch).
   Low-rank factors (`factors`, up to two sets): U (r, n_out) at strides (u_sk, u_so) and V (r, n_in), float32, or int8
   half codes h standing for the odd integers 2h + 1 (low-bit factors' codes), the directions' scales (U's times V's,
   float32) in s; each set as FACTORS int64 fields (the address of U, u_sk, u_so, the address of V, r, the address of s
   or 0 for float32); t: room for m x (the sets' r summed) floats.
   n_in and group are multiples of 16 (n_in of 8 without codes, W included). Output rows run in blocks of eight, split across OpenMP
   threads (the low-rank sums of a block as one vector, where U runs along the outputs); input rows in blocks of up to
   four, each output row's weights and codes read once per block (AVX2 + FMA). The projections t are shared out first.

   hfd_rows_codes_matmul is the same for rows that each have parts of their own (many fine-tunes of one base in one
   batch): row i's are those of table row which[i / per] (of n_table), whose ROW fields hold its codes (the addresses
   of q, esc, off, sign: esc 0 for nibbles, sign 0 but for masked codes; q 0 for no codes), the address of their
   scales, their group, the address of their columns' float32 step multipliers c (0: none), then two sets of low-rank
   factors (r 0 for none); all 0: the base alone. r_max: the largest sum of a row's r (t: room for m x r_max floats).
   There the rows of one fine-tune run side by side (copied so where they are not: `grouped_order`), the base first
   for every row, then each run of up to four rows of one fine-tune decodes its codes once per output row
   (`row_block`), a lone row two output rows at a time (`row_pair`); where any row's codes have columns' multipliers,
   every row's codes read their own copy of x (times them, where they have them).
   Both return 0, or 1 where their scratch could not be allocated; hfd_rows_codes_matmul 2 where a row names no table
   row. */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct { const uint8_t *q, *esc; const int32_t *off; const uint8_t *sign; } codes;
enum { NIBBLES, TWO_BITS, MASKED }; /* the codes' layouts */
typedef struct { const void *u; int64_t u_sk, u_so; const void *v; int64_t r; const float *s; } factors;

enum { FACTORS = 6, ROW = 7 + 2 * FACTORS }; /* int64 fields of a set of factors, of a row of hfd_rows_codes_matmul's table */
enum { OB = 8, IB = 64 }; /* output rows per block (the low-rank sums run across them as one vector), input rows per pass */

static inline factors factors_at(const int64_t *f) {
    return (factors){(const void *)f[0], f[1], f[2], (const void *)f[3], f[4], (const float *)f[5]};
}

static inline int layout_of(codes c) { return c.sign ? MASKED : c.esc ? TWO_BITS : NIBBLES; }
static inline const uint8_t *codes_row(codes c, int64_t o, int64_t n_in) { return c.q + o * (n_in / (c.sign ? 8 : c.esc ? 4 : 2)); }
static inline int64_t escapes_from(codes c, int64_t o) { return c.off[c.sign ? 2 * o : o]; } /* row o's first escape */
static inline int64_t signs_from(codes c, int64_t o) { return c.sign ? c.off[2 * o + 1] : 0; } /* row o's first sign bit */
static inline const uint8_t *escape_bytes(codes c, int64_t k) { return c.esc + (c.sign ? 2 * k : k >> 1); } /* escape k's first byte */

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

static inline float dot_half(const float *a, const int8_t *h, int64_t n) { /* a . (2h + 1) */
    const __m256 two = _mm256_set1_ps(2.0f), one = _mm256_set1_ps(1.0f);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; j += 8) {
        const __m256 c = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(h + j)))), two, one);
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), c, acc);
    }
    return hsum(acc);
}

/* V[k] . x for direction k of a set of factors (times its scale for half codes). */
static inline float project1(const float *x, int64_t n_in, factors f, int64_t k) {
    return f.s ? f.s[k] * dot_half(x, (const int8_t *)f.v + k * n_in, n_in) : dot(x, (const float *)f.v + k * n_in, n_in);
}

/* Direction k of two sets of factors taken one after the other (f[0]'s r first). */
static inline float project_at(const float *x, int64_t n_in, const factors *f, int64_t k) {
    return k < f[0].r ? project1(x, n_in, f[0], k) : project1(x, n_in, f[1], k - f[0].r);
}

/* sum_k U[k, o] t[k] for a set of factors. */
static inline float expand(factors f, int64_t o, const float *t) {
    float v = 0.0f;
    if (f.s)
        for (int64_t k = 0; k < f.r; k++) v += (float)(2 * ((const int8_t *)f.u)[k * f.u_sk + o * f.u_so] + 1) * t[k];
    else
        for (int64_t k = 0; k < f.r; k++) v += ((const float *)f.u)[k * f.u_sk + o * f.u_so] * t[k];
    return v;
}

/* v[e] += sum_k U[k, o + e] t[k] for the ne <= OB outputs from o on, every set's (t: one row's, the sets' one after
   the other); where a set's U runs along the outputs (u_so 1) and the block is whole, eight outputs in one vector. */
static inline void expand_block(const factors *f, int sets, int64_t o, int64_t ne, const float *t, float *v) {
    const __m256 two = _mm256_set1_ps(2.0f), one = _mm256_set1_ps(1.0f);
    for (int j = 0; j < sets; t += f[j].r, j++) {
        if (ne == OB && f[j].u_so == 1) {
            __m256 acc = _mm256_loadu_ps(v);
            for (int64_t k = 0; k < f[j].r; k++) {
                const int64_t at = k * f[j].u_sk + o;
                const __m256 u = f[j].s ? _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)f[j].u + at)))), two, one)
                                        : _mm256_loadu_ps((const float *)f[j].u + at);
                acc = _mm256_fmadd_ps(u, _mm256_set1_ps(t[k]), acc);
            }
            _mm256_storeu_ps(v, acc);
        } else {
            for (int64_t e = 0; e < ne; e++) v[e] += expand(f[j], o + e, t);
        }
    }
}

/* 8 times each group's sum of x (n_in / group of them). */
static inline void group_sums8(const float *x, int64_t n_in, int64_t group, float *xs8) {
    for (int64_t g0 = 0; g0 < n_in; g0 += group) {
        __m256 acc = _mm256_setzero_ps();
        for (int64_t j = g0; j < g0 + group; j += 8) acc = _mm256_add_ps(acc, _mm256_loadu_ps(x + j));
        xs8[g0 / group] = 8.0f * hsum(acc);
    }
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

/* Eight lanes of 1, -1 or 0: 1 where the bit of `bits` that `to_one` shifts into the lane's sign bit is set, else -1
   where the one `to_minus` shifts there is (each lane's sign bit picks, no table and no branch). */
static inline __m256 ternary8(__m256i bits, __m256i to_one, __m256i to_minus) {
    const __m256 one = _mm256_blendv_ps(_mm256_setzero_ps(), _mm256_set1_ps(1.0f), _mm256_castsi256_ps(_mm256_sllv_epi32(bits, to_one)));
    return _mm256_blendv_ps(one, _mm256_set1_ps(-1.0f), _mm256_castsi256_ps(_mm256_sllv_epi32(bits, to_minus)));
}

/* Codes j .. j + 15 of a row (q: the row's first byte; *k: the row's next escape, *ks its next sign bit) plus 8 (masked:
   their -1, 0 and 1 alone, without the offset), as two vectors of eight floats (the offset comes off once per group:
   `row_block`). */
static inline __attribute__((always_inline)) void codes16(const int LAYOUT, const uint8_t *q, codes c, int64_t *k, int64_t *ks, int64_t j,
                                                         __m256 *q0, __m256 *q1) {
    const __m128i low = _mm_set1_epi8(0x0f);
    __m128i v;
    if (LAYOUT == MASKED) { /* the sign bits deposited on the mask's: the ones, the rest of the mask the minus ones */
        uint16_t mask;
        uint64_t signs;
        memcpy(&mask, q + (j >> 3), 2);
        memcpy(&signs, c.sign + (*ks >> 3), 8);
        const uint32_t plus = (uint32_t)_pdep_u64(signs >> (*ks & 7), mask), minus = mask ^ plus; /* at least 57 bits from ks */
        *ks += __builtin_popcount(mask);
        const __m256i bits = _mm256_set1_epi32((int)(plus | minus << 16)); /* code i: a one at bit i, a minus one at 16 + i */
        *q0 = ternary8(bits, _mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24), _mm256_setr_epi32(15, 14, 13, 12, 11, 10, 9, 8));
        *q1 = ternary8(bits, _mm256_setr_epi32(23, 22, 21, 20, 19, 18, 17, 16), _mm256_setr_epi32(7, 6, 5, 4, 3, 2, 1, 0));
        return;
    }
    if (LAYOUT == TWO_BITS) {
        uint32_t fields;
        memcpy(&fields, q + (j >> 2), 4);
        v = _mm_cvtsi64_si128((long long)escaped16(fields, c.esc, k));
    } else {
        v = _mm_loadl_epi64((const __m128i *)(q + (j >> 1)));
    }
    *q0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(v, low)));
    *q1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(v, 4), low)));
}

/* One output row o for a block of NB rows of x, the base matrix alone (n_in a multiple of 8: 16 at a time, then 8). */
static inline __attribute__((always_inline)) void base_block(const int NB, const float *x, int64_t n_in, const float *w, float *out) {
    __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    int64_t j = 0;
    for (; j + 16 <= n_in; j += 16) {
        __m256 w0 = _mm256_loadu_ps(w + j), w1 = _mm256_loadu_ps(w + j + 8);
        for (int b = 0; b < NB; b++)
            a[b] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + b * n_in + j + 8), _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + b * n_in + j), a[b]));
    }
    if (j < n_in) {
        __m256 w0 = _mm256_loadu_ps(w + j);
        for (int b = 0; b < NB; b++) a[b] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + b * n_in + j), a[b]);
    }
    for (int b = 0; b < NB; b++) out[b] = hsum(a[b]);
}

/* The escaped codes of masked row o (their scales s) for NB rows of x (row b's at x + b * n_in), added to out. */
static inline __attribute__((always_inline)) void escapes_block(const int NB, const float *x, int64_t n_in, codes c, int64_t o,
                                                               const uint16_t *s, int64_t group, float *out) {
    int64_t col = 0;
    for (int64_t e = escapes_from(c, o), end = escapes_from(c, o + 1); e < end; e++) {
        uint16_t entry;
        memcpy(&entry, c.esc + 2 * e, 2);
        col += entry >> 4;
        const int code = (entry & 15) - 8;
        if (!code) continue; /* a step alone */
        const float v = (float)code * bf16(s[col / group]);
        for (int b = 0; b < NB; b++) out[b] += v * x[b * n_in + col];
    }
}

/* One output row o (its weights w, codes c, scales s) for a block of NB rows of x (NB and LAYOUT constants after
   inlining, so the accumulators stay in registers; up to two rows, each half of a chunk has its own, which halves the
   chains of dependent FMAs). The codes are summed plus 8, then 8 times the group's sum of x (xs8, row b's at
   xs8 + b * xs_row) comes off: two instructions fewer per 16 codes (masked codes: -1, 0 and 1 as they are, then the
   escapes). Each group's sums times its scale add up lane by lane: one horizontal sum per row, not per group. */
static inline __attribute__((always_inline)) void row_block(
    const int NB, const int LAYOUT, const float *x, int64_t n_in, const float *w, codes c, int64_t o, const uint16_t *s,
    int64_t group, const float *xs8, int64_t xs_row, float *out) {
    const int H = NB <= 2; /* the second half's accumulators */
    const uint8_t *q = codes_row(c, o, n_in);
    int64_t k = LAYOUT != NIBBLES ? escapes_from(c, o) : 0, ks = signs_from(c, o);
    __m256 base[2][4], d[2][4], total[4]; /* total: the groups' sums times their scales, lane by lane (one sum per row) */
    float delta[4] = {0, 0, 0, 0}; /* minus the offsets' sums, then the sums themselves */
    for (int b = 0; b < NB; b++) base[0][b] = base[1][b] = total[b] = _mm256_setzero_ps();
    for (int64_t g0 = 0; g0 < n_in; g0 += group) {
        for (int b = 0; b < NB; b++) d[0][b] = d[1][b] = _mm256_setzero_ps();
        for (int64_t j = g0; j < g0 + group; j += 16) {
            __m256 q0, q1;
            codes16(LAYOUT, q, c, &k, &ks, j, &q0, &q1);
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
        for (int b = 0; b < NB; b++) {
            total[b] = _mm256_fmadd_ps(_mm256_set1_ps(scale), H ? _mm256_add_ps(d[0][b], d[1][b]) : d[0][b], total[b]);
            if (LAYOUT != MASKED) delta[b] -= scale * xs8[b * xs_row + g0 / group];
        }
    }
    for (int b = 0; b < NB; b++) delta[b] += hsum(total[b]);
    if (LAYOUT == MASKED) escapes_block(NB, x, n_in, c, o, s, group, delta);
    for (int b = 0; b < NB; b++) out[b] = (w ? hsum(H ? _mm256_add_ps(base[0][b], base[1][b]) : base[0][b]) : 0.0f) + delta[b];
}

/* `row_block` of LAYOUT for nb rows of x (1 to 4; a constant in each call, so that its accumulators stay in registers). */
static inline __attribute__((always_inline)) void layout_block(const int LAYOUT, int nb, const float *x, int64_t n_in, const float *w, codes c,
                                                              int64_t o, const uint16_t *s, int64_t group, const float *xs8, int64_t xs_row,
                                                              float *out) {
    switch (nb) {
        case 1: row_block(1, LAYOUT, x, n_in, w, c, o, s, group, xs8, xs_row, out); break;
        case 2: row_block(2, LAYOUT, x, n_in, w, c, o, s, group, xs8, xs_row, out); break;
        case 3: row_block(3, LAYOUT, x, n_in, w, c, o, s, group, xs8, xs_row, out); break;
        default: row_block(4, LAYOUT, x, n_in, w, c, o, s, group, xs8, xs_row, out); break;
    }
}

static inline __attribute__((always_inline)) void codes_block(int nb, const float *x, int64_t n_in, const float *w, codes c, int64_t o,
                                                             const uint16_t *s, int64_t group, const float *xs8, int64_t xs_row, float *out) {
    if (!c.q) {
        switch (nb) {
            case 1: base_block(1, x, n_in, w, out); break;
            case 2: base_block(2, x, n_in, w, out); break;
            case 3: base_block(3, x, n_in, w, out); break;
            default: base_block(4, x, n_in, w, out); break;
        }
    } else if (layout_of(c) == MASKED) {
        layout_block(MASKED, nb, x, n_in, w, c, o, s, group, xs8, xs_row, out);
    } else if (layout_of(c) == TWO_BITS) {
        layout_block(TWO_BITS, nb, x, n_in, w, c, o, s, group, xs8, xs_row, out);
    } else {
        layout_block(NIBBLES, nb, x, n_in, w, c, o, s, group, xs8, xs_row, out);
    }
}

/* Codes of output rows o and o + 1 (their scales s, s + n_in / group) for one row of x: the two rows' codes decoded
   side by side against the same loads of x (four independent chains of FMAs). */
static inline __attribute__((always_inline)) void row_pair(const int LAYOUT, const float *x, int64_t n_in, codes c, int64_t o,
                                                          const uint16_t *s, int64_t group, const float *xs8, float *out) {
    const uint8_t *qa = codes_row(c, o, n_in), *qb = codes_row(c, o + 1, n_in);
    int64_t ka = LAYOUT != NIBBLES ? escapes_from(c, o) : 0, kb = LAYOUT != NIBBLES ? escapes_from(c, o + 1) : 0;
    int64_t ksa = signs_from(c, o), ksb = signs_from(c, o + 1);
    const int64_t n_groups = n_in / group;
    float da = 0.0f, db = 0.0f; /* minus the offsets' sums, then the sums themselves */
    __m256 ta = _mm256_setzero_ps(), tb = _mm256_setzero_ps(); /* the groups' sums times their scales, lane by lane */
    for (int64_t g0 = 0; g0 < n_in; g0 += group) {
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
        for (int64_t j = g0; j < g0 + group; j += 16) {
            __m256 qa0, qa1, qb0, qb1;
            codes16(LAYOUT, qa, c, &ka, &ksa, j, &qa0, &qa1);
            codes16(LAYOUT, qb, c, &kb, &ksb, j, &qb0, &qb1);
            const __m256 x0 = _mm256_loadu_ps(x + j), x1 = _mm256_loadu_ps(x + j + 8);
            a0 = _mm256_fmadd_ps(qa0, x0, a0);
            a1 = _mm256_fmadd_ps(qa1, x1, a1);
            b0 = _mm256_fmadd_ps(qb0, x0, b0);
            b1 = _mm256_fmadd_ps(qb1, x1, b1);
        }
        const float sa = bf16(s[g0 / group]), sb = bf16(s[n_groups + g0 / group]), xs = LAYOUT == MASKED ? 0.0f : xs8[g0 / group];
        ta = _mm256_fmadd_ps(_mm256_set1_ps(sa), _mm256_add_ps(a0, a1), ta);
        tb = _mm256_fmadd_ps(_mm256_set1_ps(sb), _mm256_add_ps(b0, b1), tb);
        da -= sa * xs, db -= sb * xs;
    }
    da += hsum(ta), db += hsum(tb);
    if (LAYOUT == MASKED) {
        escapes_block(1, x, n_in, c, o, s, group, &da);
        escapes_block(1, x, n_in, c, o + 1, s + n_groups, group, &db);
    }
    out[0] = da;
    out[1] = db;
}

int hfd_codes_matmul(const float *x, const float *xc, int64_t m, int64_t n_in, int64_t n_out, const float *W, const uint8_t *q, const uint8_t *esc,
                     const int32_t *off, const uint8_t *sign, const uint16_t *s, int64_t group, const int64_t *lowrank, int64_t sets, const float *bias, float *y,
                     float *t, int threads) {
    const codes c = {q, esc, off, sign};
    const int64_t n_groups = q ? n_in / group : 0;
    factors f[2] = {{0}, {0}};
    int64_t r = 0;
    for (int64_t j = 0; j < sets; j++) f[j] = factors_at(lowrank + j * FACTORS), r += f[j].r;
    float *xs8 = q ? malloc((m * n_groups + 1) * sizeof(float)) : 0; /* + 1: never a request of 0 bytes (no rows) */
    if (q && !xs8) return 1; /* out of memory */
    const float *xq = xc ? xc : x; /* the codes' inputs */
    for (int64_t i = 0; q && !sign && i < m; i++) group_sums8(xq + i * n_in, n_in, group, xs8 + i * n_groups); /* masked codes: no offset */
    #pragma omp parallel num_threads(threads)
    {
    #pragma omp for schedule(static)
    for (int64_t p = 0; p < m * r; p++) /* t (m, r) = x V^T, before the rows that read it (the loop's end waits) */
        t[p] = project_at(x + (p / r) * n_in, n_in, f, p % r);
    #pragma omp for schedule(static)
    for (int64_t o0 = 0; o0 < n_out; o0 += OB) {
        const int64_t ne = n_out - o0 < OB ? n_out - o0 : OB;
        for (int64_t i0 = 0; i0 < m; i0 += IB) {
            const int64_t mi = m - i0 < IB ? m - i0 : IB;
            float v[IB][OB];
            for (int64_t e = 0; e < ne; e++) {
                const int64_t o = o0 + e;
                for (int64_t i = 0; i < mi; i += 4) {
                    const int64_t nb = mi - i < 4 ? mi - i : 4;
                    float out[4] = {0, 0, 0, 0};
                    if (W && q && xc) { /* the base reads x, the codes xc: a pass each over the row's inputs */
                        float d[4];
                        codes_block(nb, x + (i0 + i) * n_in, n_in, W + o * n_in, (codes){0}, o, 0, 0, 0, 0, out);
                        codes_block(nb, xc + (i0 + i) * n_in, n_in, 0, c, o, s + o * n_groups, group, xs8 + (i0 + i) * n_groups, n_groups, d);
                        for (int64_t b = 0; b < nb; b++) out[b] += d[b];
                    } else if (W || q)
                        codes_block(nb, (W ? x : xq) + (i0 + i) * n_in, n_in, W ? W + o * n_in : 0, c, o, q ? s + o * n_groups : 0, group,
                                    q ? xs8 + (i0 + i) * n_groups : 0, n_groups, out);
                    for (int64_t b = 0; b < nb; b++) v[i + b][e] = out[b] + (bias ? bias[o] : 0.0f);
                }
            }
            for (int64_t i = 0; i < mi; i++) {
                expand_block(f, (int)sets, o0, ne, t + (i0 + i) * r, v[i]);
                memcpy(y + (i0 + i) * n_out + o0, v[i], ne * sizeof(float));
            }
        }
    }
    }
    free(xs8);
    return 0;
}

/* A stable order of the rows that puts each table row's together (a counting sort): order[i] is the row run i-th.
   NULL where they already are together or where memory ran out (*status 1) or a row names no table row (*status 2). */
static int64_t *grouped_order(const int64_t *which, int64_t m, int64_t per, int64_t n_table, int *status) {
    int64_t *count = calloc(n_table + 1, sizeof(int64_t)), *order = NULL;
    int together = 1;
    if (!count) return *status = 1, NULL;
    for (int64_t g = 0; g < m / per; g++) {
        if (which[g] < 0 || which[g] >= n_table) {
            free(count);
            return *status = 2, NULL;
        }
        together &= g == 0 || which[g] == which[g - 1] || !count[which[g] + 1]; /* a table row seen before, not just before */
        count[which[g] + 1] += per;
    }
    if (!together && !(order = malloc(m * sizeof(int64_t)))) *status = 1;
    if (order) {
        for (int64_t k = 1; k <= n_table; k++) count[k] += count[k - 1];
        for (int64_t i = 0; i < m; i++) order[count[which[i / per]]++] = i;
    }
    free(count);
    return order;
}

int hfd_rows_codes_matmul(const float *x, int64_t m, int64_t n_in, int64_t n_out, const float *W, const int64_t *table,
                          int64_t n_table, const int64_t *which, int64_t per, const float *bias, float *y, float *t, int64_t r_max,
                          int threads) {
    if (m == 0) return 0; /* no rows (per 0) */
    int status = 0;
    int64_t *order = grouped_order(which, m, per, n_table, &status); /* rows of one fine-tune side by side: codes decode once */
    float *xo = order ? malloc((m * n_in + 1) * sizeof(float)) : 0, *xs8 = malloc((m * (n_in / 16) + 1) * sizeof(float));
    int64_t *tab = malloc((m + 1) * sizeof(int64_t)); /* the table row of each row, in the order they run */
    if (status || (order && !xo) || !xs8 || !tab) {
        free(order), free(xo), free(xs8), free(tab);
        return status ? status : 1;
    }
    for (int64_t i = 0; i < m; i++) {
        const int64_t from = order ? order[i] : i;
        tab[i] = which[from / per];
        if (order) memcpy(xo + i * n_in, x + from * n_in, n_in * sizeof(float));
    }
    if (order) x = xo;
    int scaled = 0; /* whether a row's codes read x times their columns' multipliers: then every row's codes read xq */
    for (int64_t i = 0; i < m; i++) scaled |= table[ROW * tab[i] + 6] != 0;
    float *xq = scaled ? malloc((m * n_in + 1) * sizeof(float)) : 0;
    if (scaled && !xq) {
        free(order), free(xo), free(xs8), free(tab);
        return 1;
    }
    for (int64_t i = 0; xq && i < m; i++) {
        const float *col = (const float *)table[ROW * tab[i] + 6];
        for (int64_t j = 0; j < n_in; j++) xq[i * n_in + j] = col ? x[i * n_in + j] * col[j] : x[i * n_in + j];
    }
    const float *xcodes = xq ? xq : x;
    for (int64_t i = 0; i < m; i++) { /* row i's group sums (its fine-tune's group) at xs8 + i * n_in / 16 */
        const int64_t *row = table + ROW * tab[i];
        if (row[0] && !row[3]) group_sums8(xcodes + i * n_in, n_in, row[5], xs8 + i * (n_in / 16)); /* masked codes: no offset */
    }
    #pragma omp parallel num_threads(threads)
    {
    #pragma omp for schedule(static)
    for (int64_t p = 0; p < m * r_max; p++) { /* t (m, r_max): each row's x V^T, before the rows that read it */
        const int64_t i = p / r_max, k = p % r_max, *row = table + ROW * tab[i];
        const factors f[2] = {factors_at(row + 7), factors_at(row + 7 + FACTORS)};
        if (k < f[0].r + f[1].r) t[p] = project_at(x + i * n_in, n_in, f, k);
    }
    #pragma omp for schedule(static)
    for (int64_t o0 = 0; o0 < n_out; o0 += OB) {
        const int64_t ne = n_out - o0 < OB ? n_out - o0 : OB;
        for (int64_t i0 = 0; i0 < m; i0 += IB) {
            const int64_t mi = m - i0 < IB ? m - i0 : IB;
            float v[IB][OB];
            for (int64_t e = 0; e < ne; e++) { /* the base, every row at once */
                const int64_t o = o0 + e;
                const float *w = W + o * n_in;
                for (int64_t i = 0; i < mi; i += 4) {
                    const int64_t nb = mi - i < 4 ? mi - i : 4;
                    float out[4];
                    codes_block(nb, x + (i0 + i) * n_in, n_in, w, (codes){0}, o, 0, 0, 0, 0, out); /* no codes: `base_block` */
                    for (int64_t b = 0; b < nb; b++) v[i + b][e] = out[b] + (bias ? bias[o] : 0.0f);
                }
            }
            for (int64_t i = 0, nb; i < mi; i += nb) { /* each run of up to four rows of one fine-tune: its codes once */
                const int64_t *row = table + ROW * tab[i0 + i];
                for (nb = 1; nb < 4 && i + nb < mi && tab[i0 + i + nb] == tab[i0 + i];) nb++;
                const codes c = {(const uint8_t *)row[0], (const uint8_t *)row[1], (const int32_t *)row[2], (const uint8_t *)row[3]};
                if (!c.q)
                    continue;
                if (o0 + OB < n_out) { /* this fine-tune's codes of the next block: many streams outrun the prefetcher */
                    const int64_t last = o0 + 2 * OB < n_out ? o0 + 2 * OB : n_out;
                    for (const uint8_t *l = codes_row(c, o0 + OB, n_in), *end = codes_row(c, last, n_in); l < end; l += 64)
                        _mm_prefetch((const char *)l, _MM_HINT_T0);
                    if (c.off)
                        for (const uint8_t *l = escape_bytes(c, escapes_from(c, o0 + OB)), *end = escape_bytes(c, escapes_from(c, last)) + 2; l < end; l += 64)
                            _mm_prefetch((const char *)l, _MM_HINT_T0);
                    for (int64_t at = signs_from(c, o0 + OB) >> 3, end = c.sign ? (signs_from(c, last) >> 3) + 1 : 0; at < end; at += 64)
                        _mm_prefetch((const char *)(c.sign + at), _MM_HINT_T0);
                }
                const int64_t group = row[5];
                const float *xi = xcodes + (i0 + i) * n_in, *xs = xs8 + (i0 + i) * (n_in / 16);
                const uint16_t *s = (const uint16_t *)row[4] + o0 * (n_in / group);
                int64_t e = 0;
                if (nb > 1) { /* several rows: each output row's codes against all of them */
                    for (; e < ne; e++, s += n_in / group) {
                        float d[4];
                        codes_block((int)nb, xi, n_in, 0, c, o0 + e, s, group, xs, n_in / 16, d);
                        for (int64_t b = 0; b < nb; b++) v[i + b][e] += d[b];
                    }
                    continue;
                }
                for (; e + 1 < ne; e += 2, s += 2 * (n_in / group)) { /* one row: two output rows at a time */
                    float d[2];
                    if (layout_of(c) == MASKED)
                        row_pair(MASKED, xi, n_in, c, o0 + e, s, group, xs, d);
                    else if (layout_of(c) == TWO_BITS)
                        row_pair(TWO_BITS, xi, n_in, c, o0 + e, s, group, xs, d);
                    else
                        row_pair(NIBBLES, xi, n_in, c, o0 + e, s, group, xs, d);
                    v[i][e] += d[0];
                    v[i][e + 1] += d[1];
                }
                if (e < ne) {
                    float d;
                    codes_block(1, xi, n_in, 0, c, o0 + e, s, group, xs, n_in / 16, &d);
                    v[i][e] += d;
                }
            }
            for (int64_t i = 0; i < mi; i++) {
                const int64_t *row = table + ROW * tab[i0 + i];
                const factors f[2] = {factors_at(row + 7), factors_at(row + 7 + FACTORS)};
                expand_block(f, 2, o0, ne, t + (i0 + i) * r_max, v[i]);
                memcpy(y + (order ? order[i0 + i] : i0 + i) * n_out + o0, v[i], ne * sizeof(float));
            }
        }
    }
    }
    free(order), free(xo), free(xs8), free(tab), free(xq);
    return 0;
}
