/* Rounding with error feedback (GPTQ-style), the column loop of a block (plain C, vectorized by the compiler).

   hfd_feedback_columns rounds columns [c0, c1) of a block w1 (rows x nb floats, row stride nb) in order, each row on
   its own: y = w1[r, i] * inv[r] (`mode` 0, 1: the signed or full grid) or w1[r, i] (mode 2: one bit, the sign); the
   code q = rint(y) clamped to +-qmax (signed), 2 floor(y / 2) + 1 clamped to +-qmax (full), or +-1 (one bit) goes to
   codes[r * ldc + i]; the error e = w1[r, i] - q * step[r] to err1[r * nb + i]; and the later columns of the block take
   it through the block's upper Cholesky factor h1 (row stride ldh): w1[r, j] += (alpha[i] * e) * h1[i, j], j > i.
   Each operation is rounded once, in the order PyTorch's element-wise kernels round it (`quantize._error_feedback`
   runs the same loop through them where the kernels are off: the same codes). */
#include <math.h>
#include <stdint.h>

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off") /* no fused multiply-adds: each product rounded as PyTorch's are */
#elif defined(__clang__)
#pragma clang fp contract(off)
#endif

void hfd_feedback_columns(float *restrict w1, float *restrict err1, float *restrict codes, int64_t ldc, const float *restrict h1, int64_t ldh,
                          const float *restrict alpha, const float *restrict inv, const float *restrict step, int64_t rows, int64_t nb,
                          int64_t c0, int64_t c1, int mode, float qmax)
{
    for (int64_t r = 0; r < rows; r++) {
        float *w = w1 + r * nb;
        for (int64_t i = c0; i < c1; i++) {
            float y = mode == 2 ? w[i] : w[i] * inv[r], q;
            if (mode == 2)
                q = y >= 0.0f ? 1.0f : -1.0f;
            else {
                q = mode == 1 ? 2.0f * floorf(y / 2.0f) + 1.0f : rintf(y);
                q = q < -qmax ? -qmax : q > qmax ? qmax : q;
            }
            float product = q * step[r];
            float e = w[i] - product;
            codes[r * ldc + i] = q;
            err1[r * nb + i] = e;
            float scaled = alpha[i] * e;
            const float *h = h1 + i * ldh;
            for (int64_t j = i + 1; j < nb; j++)
                w[j] = w[j] + scaled * h[j];
        }
    }
}
