// RMSNorm over the last dimension, optionally after a residual add: total = x + residual (written back to
// `residual_out`), out = total / sqrt(mean(total^2) + eps) * w. The reference is nbllm.models.layers.RMSNorm's torch
// path; at decode sizes its six tensor ops cost ~50 us a call in a forward, this ~2 us.
#include <cmath>

#include "cpu_pool.h"
#include "cpu_simd.h"

extern "C" {

// x, out: [rows, cols] (row strides ldx, ldo); w: [cols]; residual / residual_out: [rows, cols] contiguous or null.
// cols must be a multiple of 8.
void nbllm_rms_norm(const float* x, int64_t ldx, const float* residual, float* residual_out, const float* w,
                    int64_t rows, int64_t cols, float eps, float* out, int64_t ldo, int threads) {
    const int64_t grain = std::max<int64_t>(1, 16384 / cols);  // rows per chunk: small calls stay on one thread
    nbllm::parallel_for(rows, grain, rows * cols >= 65536 ? threads : 1, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
            const float* xr = x + r * ldx;
            float* orow = out + r * ldo;
            const float* src = xr;
            if (residual != nullptr) {
                float* tr = residual_out + r * cols;
                for (int64_t c = 0; c < cols; c += 8)
                    _mm256_storeu_ps(tr + c, _mm256_add_ps(_mm256_loadu_ps(xr + c),
                                                           _mm256_loadu_ps(residual + r * cols + c)));
                src = tr;
            }
            __m256 sq = _mm256_setzero_ps();
            for (int64_t c = 0; c < cols; c += 8) {
                const __m256 v = _mm256_loadu_ps(src + c);
                sq = _mm256_fmadd_ps(v, v, sq);
            }
            const __m256 inv = _mm256_set1_ps(1.0f / std::sqrt(nbllm::hsum(sq) / static_cast<float>(cols) + eps));
            for (int64_t c = 0; c < cols; c += 8)
                _mm256_storeu_ps(orow + c, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(src + c), inv),
                                                         _mm256_loadu_ps(w + c)));
        }
    });
}

}  // extern "C"
