/* One pass over a tensor: 16-bit checkpoint tensors on their bits, a residual's z histogram (plain C, vectorized by the
   compiler where it can be).

   hfd_all_finite_16 returns whether none of n values (bfloat16 or float16 bits) has every bit of `exponent` (its
   dtype's exponent field) set, i.e. none is NaN or Inf (on `threads` OpenMP threads from 2^20 values).

   hfd_exact_delta_bf16 reads base and ft (n_rows, n_cols), bfloat16 bits, and writes delta = rne(ft - base): the
   difference in float32 rounded once to bfloat16 (as PyTorch's bfloat16 subtraction rounds: to nearest, ties to
   even, NaN to 0x7fc0); with delta NULL it writes nothing (a survey of the difference). It counts each row's and
   each column's nonzero deltas (either zero counting as zero; either count array may be NULL; column counts are
   added to) and returns how many entries do not merge back, rne(base + delta) != ft bit for bit, writing the flat
   positions (within these rows) of the first `capacity` of them, in order, to `mismatch`.

   hfd_difference_bf16 writes out = ft - base for n bfloat16 values each, both widened to float32 and subtracted there (the
   values of PyTorch's float32 subtraction of the two upcast tensors), on `threads` OpenMP threads from 2^20 values.

   hfd_z_histogram adds to counts (bins) the histogram of z = min(max(r * inv_sigma, -range), range) over n float32
   values r, bin floor((z + range) * scale) with z = range in the last, NaN in none: float32 arithmetic, each operation rounded as
   PyTorch's element-wise float32 operations round (`criterion.z_histogram`'s fallback gives the same counts). */
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math") /* lets GCC vectorize the comparisons of floats (the values are the same) */
#endif

enum { BLOCK = 512 }; /* columns per block: a block's merge checks are ORed, and the rare mismatches gathered after */

static inline float bf16_to_f32(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint16_t rounded = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    return (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)0x7fc0 : rounded;
}

int hfd_all_finite_16(const uint16_t *restrict bits, int64_t n, uint16_t exponent, int threads)
{
    uint16_t hit = 0;
#pragma omp parallel for schedule(static) reduction(| : hit) num_threads(threads) if (n >= (1 << 20))
    for (int64_t i0 = 0; i0 < n; i0 += 8 * BLOCK) {
        int64_t len = n - i0 < 8 * BLOCK ? n - i0 : 8 * BLOCK;
        for (int64_t j = 0; j < len; j++)
            hit |= (uint16_t)((bits[i0 + j] & exponent) == exponent);
    }
    return !hit;
}

void hfd_difference_bf16(const uint16_t *restrict base, const uint16_t *restrict ft, float *restrict out, int64_t n, int threads)
{
#pragma omp parallel for schedule(static) num_threads(threads) if (n >= (1 << 20))
    for (int64_t i0 = 0; i0 < n; i0 += 8 * BLOCK) {
        int64_t len = n - i0 < 8 * BLOCK ? n - i0 : 8 * BLOCK;
        for (int64_t j = 0; j < len; j++)
            out[i0 + j] = bf16_to_f32(ft[i0 + j]) - bf16_to_f32(base[i0 + j]);
    }
}

int64_t hfd_exact_delta_bf16(const uint16_t *restrict base, const uint16_t *restrict ft, uint16_t *restrict delta, int64_t n_rows,
                             int64_t n_cols, int32_t *restrict row_nonzero, int32_t *restrict col_nonzero, int64_t *restrict mismatch,
                             int64_t capacity)
{
    int64_t found = 0;
    uint8_t bad[BLOCK] __attribute__((aligned(32)));
    uint16_t d[BLOCK] __attribute__((aligned(32)));
    for (int64_t r = 0; r < n_rows; r++) {
        const uint16_t *b = base + r * n_cols, *f = ft + r * n_cols;
        int32_t nonzero = 0;
        for (int64_t c0 = 0; c0 < n_cols; c0 += BLOCK) {
            int64_t len = n_cols - c0 < BLOCK ? n_cols - c0 : BLOCK;
            uint8_t any = 0;
            for (int64_t j = 0; j < len; j++) {
                float bj = bf16_to_f32(b[c0 + j]);
                uint16_t dj = f32_to_bf16(bf16_to_f32(f[c0 + j]) - bj);
                d[j] = dj;
                bad[j] = f32_to_bf16(bj + bf16_to_f32(dj)) != f[c0 + j];
                any |= bad[j];
                nonzero += (dj & 0x7fffu) != 0;
            }
            if (delta)
                memcpy(delta + r * n_cols + c0, d, (size_t)len * sizeof *d);
            if (col_nonzero)
                for (int64_t j = 0; j < len; j++)
                    col_nonzero[c0 + j] += (d[j] & 0x7fffu) != 0;
            if (any)
                for (int64_t w = 0; w < len; w += 8) {
                    uint64_t word = 0;
                    memcpy(&word, bad + w, len - w < 8 ? (size_t)(len - w) : 8);
                    for (; word; word &= word - 1) { /* each set byte: a mismatch */
                        if (found < capacity)
                            mismatch[found] = r * n_cols + c0 + w + __builtin_ctzll(word) / 8;
                        found++;
                    }
                }
        }
        if (row_nonzero)
            row_nonzero[r] = nonzero;
    }
    return found;
}

void hfd_z_histogram(const float *restrict r, int64_t n, float inv_sigma, float range, float scale, int64_t bins, int64_t *restrict counts)
{
    const int32_t last = (int32_t)bins - 1;
    int64_t partial[4][bins + 1]; /* four interleaved histograms (runs of one bin do not wait on one counter); bin `bins`: NaN */
    int32_t bin[BLOCK];
    memset(partial, 0, sizeof partial);
    for (int64_t i0 = 0; i0 < n; i0 += BLOCK) {
        int64_t len = n - i0 < BLOCK ? n - i0 : BLOCK, j = 0;
        for (j = 0; j < len; j++) { /* vectorized; z >= -range, so truncation is the floor */
            float z = r[i0 + j] * inv_sigma;
            z = z < -range ? -range : z > range ? range : z;
            int32_t b = (int32_t)((z + range) * scale);
            bin[j] = z != z ? last + 1 : b < last ? b : last;
        }
        for (j = 0; j + 4 <= len; j += 4) {
            partial[0][bin[j]]++;
            partial[1][bin[j + 1]]++;
            partial[2][bin[j + 2]]++;
            partial[3][bin[j + 3]]++;
        }
        for (; j < len; j++)
            partial[0][bin[j]]++;
    }
    for (int w = 0; w < 4; w++)
        for (int64_t b = 0; b < bins; b++)
            counts[b] += partial[w][b];
}
