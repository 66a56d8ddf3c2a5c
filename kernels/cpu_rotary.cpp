// Rotary embedding (NeoX rotate-half) of [T, H, D] heads at their tokens' positions, optionally after a per-head
// RMSNorm (Qwen3/Gemma 3 q/k norms): out = rot(norm(x)). The reference is nbllm.models.layers' RotaryEmbedding and
// RMSNorm torch paths; in torch this is ~12 tensor ops a layer at decode, here one call for q and one for k.
#include <cmath>

#include "cpu_pool.h"
#include "cpu_simd.h"

extern "C" {

// x: [T, H, D] with strides (ldt, ldh, 1); out: [T, H, D] contiguous; positions: [T] int64; cos, sin: [P, D / 2]
// tables; norm_w: [D] or null. D must be a multiple of 16.
void nbllm_norm_rotary(const float* x, int64_t ldt, int64_t ldh, int64_t T, int64_t H, int64_t D,
                       const float* norm_w, float eps, const int64_t* positions, const float* cos_table,
                       const float* sin_table, float* out) {
    const int64_t half = D / 2;
    for (int64_t t = 0; t < T; ++t) {
        const float* c = cos_table + positions[t] * half;
        const float* s = sin_table + positions[t] * half;
        for (int64_t h = 0; h < H; ++h) {
            const float* xr = x + t * ldt + h * ldh;
            float* o = out + (t * H + h) * D;
            __m256 scale = _mm256_set1_ps(1.0f);
            if (norm_w != nullptr) {
                __m256 sq = _mm256_setzero_ps();
                for (int64_t d = 0; d < D; d += 8) {
                    const __m256 v = _mm256_loadu_ps(xr + d);
                    sq = _mm256_fmadd_ps(v, v, sq);
                }
                scale = _mm256_set1_ps(1.0f / std::sqrt(nbllm::hsum(sq) / static_cast<float>(D) + eps));
            }
            for (int64_t d = 0; d < half; d += 8) {
                __m256 x1 = _mm256_mul_ps(_mm256_loadu_ps(xr + d), scale);
                __m256 x2 = _mm256_mul_ps(_mm256_loadu_ps(xr + half + d), scale);
                if (norm_w != nullptr) {
                    x1 = _mm256_mul_ps(x1, _mm256_loadu_ps(norm_w + d));
                    x2 = _mm256_mul_ps(x2, _mm256_loadu_ps(norm_w + half + d));
                }
                const __m256 cv = _mm256_loadu_ps(c + d), sv = _mm256_loadu_ps(s + d);
                _mm256_storeu_ps(o + d, _mm256_sub_ps(_mm256_mul_ps(x1, cv), _mm256_mul_ps(x2, sv)));
                _mm256_storeu_ps(o + half + d, _mm256_add_ps(_mm256_mul_ps(x2, cv), _mm256_mul_ps(x1, sv)));
            }
        }
    }
}

}  // extern "C"
