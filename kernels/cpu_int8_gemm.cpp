// y[M, N] = x[M, K] · W[N, K]^T for fp32 activations and weights stored as int8 codes with per-group fp32 scales:
// W[n, k] = s[n, g] * q[n, k] - o[n, g], g = k / G (G = 16 or 32; o absent means 0).
//
// Every GGUF quant type is exactly this form (the codes fit int8, the scale and offset products are exact in fp32),
// and fmsub(q, s, o) rounds once, as the dequantizer's `(s * q) - o` does after an exact product: the weight this
// kernel multiplies by is bit for bit the dequantized fp32 weight. Only the summation order differs from a dense
// fp32 GEMM.
//
// AVX2 + FMA. A tile of R weight rows x C activation rows keeps R*C 8-lane accumulators; each 8 weights are converted
// once (sign-extend, int->float, scale) and feed C fused multiply-adds, so the int8 bytes are read once per tile and
// amortised over the batch. Rows of y do not depend on how the batch is tiled or threaded: a row is summed in the
// same order whatever M is (batch-invariant).
//
// Threads: chunks of weight rows go to the library's pool (cpu_pool.h).
#include "cpu_pool.h"
#include "cpu_simd.h"

namespace {

using nbllm::hsum;
using nbllm::parallel_for;

inline __m256 codes(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// R weight rows starting at q (row stride K; scales/offsets at s/o, row stride K / G) times C activation rows
// starting at x (row stride ldx), into y (row stride ldy; y[c * ldy + r]).
constexpr int64_t kPrefetchBytes = 4096;

template <int R, int C, bool OFFSET>
inline void tile(const float* x, int64_t ldx, const int8_t* q, const float* s, const float* o, int64_t K,
                 int64_t G, float* y, int64_t ldy) {
    const int64_t groups = K / G;
    __m256 acc[R][C];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
        __m256 sv[R], ov[R];
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
            // Rows are only K bytes long, too short for the hardware prefetchers to follow a tile's R streams:
            // fetch the rows a few tiles ahead (rows are contiguous, so that is simply further on).
            _mm_prefetch(reinterpret_cast<const char*>(q + r * K + g * G + kPrefetchBytes), _MM_HINT_T0);
            sv[r] = _mm256_set1_ps(s[r * groups + g]);
            ov[r] = OFFSET ? _mm256_set1_ps(o[r * groups + g]) : _mm256_setzero_ps();
        }
        for (int64_t k = g * G; k < (g + 1) * G; k += 8) {
            __m256 xv[C];
#pragma GCC unroll 8
            for (int c = 0; c < C; ++c) xv[c] = _mm256_loadu_ps(x + c * ldx + k);
#pragma GCC unroll 8
            for (int r = 0; r < R; ++r) {
                __m256 w = codes(q + r * K + k);
                w = OFFSET ? _mm256_fmsub_ps(w, sv[r], ov[r]) : _mm256_mul_ps(w, sv[r]);
#pragma GCC unroll 8
                for (int c = 0; c < C; ++c) acc[r][c] = _mm256_fmadd_ps(w, xv[c], acc[r][c]);
            }
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) y[c * ldy + r] = hsum(acc[r][c]);
}

constexpr int kRows = 4;  // weight rows per tile
constexpr int kCols = 3;  // activation rows per tile: 12 accumulators of the 16 ymm registers

template <int R, bool OFFSET>
inline void row_tile(const float* x, int64_t M, int64_t ldx, const int8_t* q, const float* s, const float* o,
                     int64_t K, int64_t G, float* y, int64_t ldy) {
    int64_t m = 0;
    for (; m + kCols <= M; m += kCols) tile<R, kCols, OFFSET>(x + m * ldx, ldx, q, s, o, K, G, y + m * ldy, ldy);
    if (M - m == 2) tile<R, 2, OFFSET>(x + m * ldx, ldx, q, s, o, K, G, y + m * ldy, ldy);
    if (M - m == 1) tile<R, 1, OFFSET>(x + m * ldx, ldx, q, s, o, K, G, y + m * ldy, ldy);
}

template <bool OFFSET>
void gemm(const float* x, int64_t M, int64_t ldx, const int8_t* q, const float* s, const float* o, int64_t N,
          int64_t K, int64_t G, float* y, int64_t ldy, int threads) {
    const int64_t groups = K / G;
    const int64_t tiles = (N + kRows - 1) / kRows;
    parallel_for(tiles, 4, threads, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
            const int64_t n = t * kRows;
            const float* on = OFFSET ? o + n * groups : nullptr;
            if (n + kRows <= N) {
                row_tile<kRows, OFFSET>(x, M, ldx, q + n * K, s + n * groups, on, K, G, y + n, ldy);
            } else {
                for (int64_t r = n; r < N; ++r)
                    row_tile<1, OFFSET>(x, M, ldx, q + r * K, s + r * groups, OFFSET ? o + r * groups : nullptr,
                                        K, G, y + r, ldy);
            }
        }
    });
}

}  // namespace

extern "C" {

// y[M, N] (row stride ldy) = x[M, K] (row stride ldx) · W^T; o may be null (no offsets). K must be a multiple of G,
// G a multiple of 8.
void nbllm_int8_gemm(const float* x, int64_t M, int64_t ldx, const int8_t* q, const float* s, const float* o,
                     int64_t N, int64_t K, int64_t G, float* y, int64_t ldy, int threads) {
    if (o != nullptr)
        gemm<true>(x, M, ldx, q, s, o, N, K, G, y, ldy, threads);
    else
        gemm<false>(x, M, ldx, q, s, o, N, K, G, y, ldy, threads);
}

// out[N, K] = W: the dense fp32 weights, bit for bit what the GGUF dequantizer produces.
void nbllm_int8_dequantize(const int8_t* q, const float* s, const float* o, int64_t N, int64_t K, int64_t G,
                           float* out, int threads) {
    const int64_t groups = K / G;
    parallel_for(N, 16, threads, [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n) {
            for (int64_t g = 0; g < groups; ++g) {
                const __m256 sv = _mm256_set1_ps(s[n * groups + g]);
                const __m256 ov = o != nullptr ? _mm256_set1_ps(o[n * groups + g]) : _mm256_setzero_ps();
                for (int64_t k = g * G; k < (g + 1) * G; k += 8)
                    _mm256_storeu_ps(out + n * K + k, _mm256_fmsub_ps(codes(q + n * K + k), sv, ov));
            }
        }
    });
}

}  // extern "C"
