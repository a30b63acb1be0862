/* The criterion's entry-wise statistics of a float32 residual (plain C, vectorized by the compiler where it can be).

   hfd_select_f32 writes to result the k-th smallest (0-based) of n < 2^32 values x_i, or of |x_i - center| (float32
   arithmetic: PyTorch's `(x - center).abs()`) when `absdev`: the value `np.partition` puts at k (NaN last). Two passes
   over the values, each a histogram of 16 bits of an order-preserving key (the high half, then the low half among the
   values in the bin that holds the k-th), on `threads` OpenMP threads from 2^17 values: exact, in linear time. It returns
   0 where its histograms could not be allocated.

   hfd_z_candidates writes z = |r_i| / sigma (float32 division, as PyTorch's) for the n values of r with z >= threshold,
   in order, the first `capacity` of them to out, and returns how many there are. */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math", "fp-contract=off")
#elif defined(__clang__)
#pragma clang fp contract(off)
#endif

enum { BINS = 1 << 16, CHUNK = 1 << 12, WAYS = 4 };

static inline uint32_t order_key(float v)
{
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    if (v != v)
        return 0xffffffffu; /* NaN sorts last, as numpy's */
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

static inline float key_value(uint32_t key)
{
    uint32_t u = (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key;
    float v;
    memcpy(&v, &u, sizeof v);
    return v;
}

/* counts (BINS) of the keys' high half (`high` < 0), or of the low half among keys whose high half is `high`; 0 where
   the threads' histograms could not be allocated. Each thread keeps WAYS interleaved histograms: runs of one bin (the
   values of a residual share a few exponents) do not wait on one counter. */
static int histogram(const float *x, int64_t n, float center, int absdev, int64_t high, int threads, int64_t *counts)
{
    threads = n >= (1 << 17) ? threads : 1;
    uint32_t *local = calloc((size_t)threads * WAYS * BINS, sizeof *local); /* n < 2^32: no count overflows */
    if (!local)
        return 0;
#pragma omp parallel num_threads(threads)
    {
        uint32_t *mine = local + (size_t)omp_get_thread_num() * WAYS * BINS, keys[CHUNK];
#pragma omp for schedule(static)
        for (int64_t i0 = 0; i0 < n; i0 += CHUNK) {
            int64_t len = n - i0 < CHUNK ? n - i0 : CHUNK, j = 0;
            if (absdev) /* two loops: each vectorized */
                for (j = 0; j < len; j++)
                    keys[j] = order_key(fabsf(x[i0 + j] - center));
            else
                for (j = 0; j < len; j++)
                    keys[j] = order_key(x[i0 + j]);
            if (high < 0) {
                for (j = 0; j + WAYS <= len; j += WAYS)
                    for (int w = 0; w < WAYS; w++)
                        mine[w * BINS + (keys[j + w] >> 16)]++;
                for (; j < len; j++)
                    mine[keys[j] >> 16]++;
            } else {
                for (j = 0; j < len; j++)
                    if ((keys[j] >> 16) == (uint32_t)high)
                        mine[keys[j] & 0xffffu]++;
            }
        }
    }
    for (int64_t b = 0; b < BINS; b++) {
        counts[b] = 0;
        for (int t = 0; t < threads * WAYS; t++)
            counts[b] += local[(size_t)t * BINS + b];
    }
    free(local);
    return 1;
}

/* the bin holding the k-th smallest, k reduced to its rank within the bin */
static int64_t bin_of(const int64_t *counts, int64_t *k)
{
    int64_t b = 0;
    while (*k >= counts[b])
        *k -= counts[b++];
    return b;
}

int hfd_select_f32(const float *x, int64_t n, float center, int absdev, int64_t k, int threads, float *result)
{
    int64_t *counts = malloc(BINS * sizeof *counts), high = 0, low = 0;
    int ok = counts && histogram(x, n, center, absdev, -1, threads, counts);
    if (ok)
        high = bin_of(counts, &k);
    ok = ok && histogram(x, n, center, absdev, high, threads, counts);
    if (ok)
        low = bin_of(counts, &k);
    free(counts);
    if (ok)
        *result = key_value((uint32_t)(high << 16 | low));
    return ok;
}

int64_t hfd_z_candidates(const float *restrict r, int64_t n, float sigma, float threshold, float *restrict out, int64_t capacity)
{
    int64_t found = 0;
    float z[CHUNK];
    for (int64_t i0 = 0; i0 < n; i0 += CHUNK) {
        int64_t len = n - i0 < CHUNK ? n - i0 : CHUNK, kept = 0;
        for (int64_t j = 0; j < len; j++) {
            z[j] = fabsf(r[i0 + j]) / sigma;
            kept += z[j] >= threshold;
        }
        if (kept && found + len <= capacity) /* room for every value: written without branches, kept ones advance */
            for (int64_t j = 0, at = found; j < len; j++) {
                out[at] = z[j];
                at += z[j] >= threshold;
            }
        else if (kept)
            for (int64_t j = 0, at = found; j < len; j++)
                if (z[j] >= threshold && at < capacity)
                    out[at++] = z[j];
        found += kept;
    }
    return found;
}
