// act(gate) * up over a fused [T, 2I] gate/up projection (gate first), for SwiGLU (silu) and GeGLU (tanh GELU).
// The reference is nbllm.models.layers.GatedMLP's torch path (F.silu / F.gelu(approximate="tanh"), then a product):
// at decode sizes those are three tensor ops a layer, here one pass.
#include "cpu_pool.h"
#include "cpu_simd.h"

namespace {

inline __m256 silu(__m256 x) {  // x / (1 + e^-x)
    return _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), nbllm::exp256(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

inline __m256 gelu_tanh(__m256 x) {  // x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), tanh(y) = 1 - 2 / (e^2y + 1)
    const __m256 x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
    const __m256 y = _mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f),
                                   _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), x3, x));
    const __m256 e = nbllm::exp256(_mm256_add_ps(y, y));
    const __m256 t = _mm256_sub_ps(_mm256_set1_ps(1.0f),
                                   _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(e, _mm256_set1_ps(1.0f))));
    return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x), _mm256_add_ps(_mm256_set1_ps(1.0f), t));
}

template <bool GELU>
void gated(const float* gate_up, int64_t rows, int64_t inner, float* out, int threads) {
    nbllm::parallel_for(rows, std::max<int64_t>(1, 16384 / inner), rows * inner >= 65536 ? threads : 1,
                        [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
            const float* g = gate_up + r * 2 * inner;
            const float* u = g + inner;
            float* o = out + r * inner;
            for (int64_t i = 0; i < inner; i += 8) {
                const __m256 gv = _mm256_loadu_ps(g + i);
                _mm256_storeu_ps(o + i, _mm256_mul_ps(GELU ? gelu_tanh(gv) : silu(gv), _mm256_loadu_ps(u + i)));
            }
        }
    });
}

}  // namespace

extern "C" {

// gate_up: [rows, 2 * inner] contiguous; out: [rows, inner]; inner a multiple of 8. gelu: 1 tanh GELU, 0 SiLU.
void nbllm_gated_activation(const float* gate_up, int64_t rows, int64_t inner, int gelu, float* out, int threads) {
    if (gelu)
        gated<true>(gate_up, rows, inner, out, threads);
    else
        gated<false>(gate_up, rows, inner, out, threads);
}

}  // extern "C"
