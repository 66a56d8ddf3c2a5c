// y[M, N] = x[M, K] · W[N, K]^T with the weights as int8 codes + per-group fp32 scales/offsets (the layout of
// cpu_int8_gemm.cpp) and the activations quantized to int8 first, exactly as llama.cpp's CPU backend quantizes a
// matmul's input for the weight's type (its vec_dot_type):
//   Q8_0 (blocks of 32; Q4_0/Q5_0/Q8_0 ... weights): d = max|x| / 127 rounded to fp16, codes round(x * 127 / max|x|);
//   Q8_K (blocks of 256; K-quant weights): iscale = -127 / (signed max), codes min(127, round(iscale * x)),
//   d = 1 / iscale in fp32 (quantize_row_q8_K_ref). Rounding is half to even in both.
//
// Why: converting every weight to fp32 costs ~2.5 instructions per weight, which makes the exact kernel
// compute-bound at batch 1 on these cores. Integer products of 32 weights with 32 activations take one
// maddubs + one madd (llama.cpp's sign trick: |w| unsigned times x with w's sign), so the call runs at memory
// speed. The result differs from the exact one by the activations' rounding -- the rounding llama.cpp itself
// makes; within a block of 32 the products are summed exactly in integers.
//
//   y[m, n] = sum_b d_x[m, b] * sum_{g in b} s[n, g] * (q[n, g] · q_x[m, g])  -  sum_g o[n, g] * d_x * sum(q_x[m, g])
//
// Rows are batch-invariant (each row of x is quantized and summed the same way whatever M is).
#include <cmath>
#include <vector>

#include "cpu_pool.h"
#include "cpu_simd.h"

namespace {

constexpr int64_t kBlock = 32;

// x quantized: codes [M, K], per-block scales [M, K / 32] and, for offset weights, per-group sums d * sum(codes).
struct Q8Rows {
    std::vector<int8_t> q;
    std::vector<float> d;
    std::vector<float> group_sums;
    std::vector<int32_t> neg_sums;  // -128 * (sum of codes 4i..4i+3), [M, K / 4]: the wide path's starting sums
};

inline float fp16_round(float v) { return _cvtsh_ss(_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT)); }

// The d and codes of one block of `n` activations (n = 32: Q8_0, n = 256: Q8_K), as llama.cpp computes them.
inline float quantize_block(const float* x, int64_t n, bool q8_k, int8_t* codes) {
    float amax = 0.0f, signed_max = 0.0f;
    for (int64_t j = 0; j < n; ++j) {
        const float a = std::fabs(x[j]);
        if (a > amax) {
            amax = a;
            signed_max = x[j];
        }
    }
    if (amax == 0.0f) {
        std::fill(codes, codes + n, 0);
        return 0.0f;
    }
    const float mul = q8_k ? -127.0f / signed_max : 127.0f / amax;
    for (int64_t j = 0; j < n; ++j) {
        const float v = std::nearbyint(x[j] * mul);  // the default rounding mode: half to even
        codes[j] = static_cast<int8_t>(std::min(127.0f, v));
    }
    return q8_k ? 1.0f / mul : fp16_round(amax / 127.0f);
}

Q8Rows quantize(const float* x, int64_t M, int64_t ldx, int64_t K, int64_t G, int64_t act_block, bool sums) {
    const int64_t blocks = K / kBlock, groups = K / G, per = act_block / kBlock;
    Q8Rows r{std::vector<int8_t>(M * K), std::vector<float>(M * blocks), std::vector<float>(sums ? M * groups : 0),
             std::vector<int32_t>(M * K / 4)};
    for (int64_t m = 0; m < M; ++m) {
        for (int64_t b = 0; b < K / act_block; ++b) {
            const float d = quantize_block(x + m * ldx + b * act_block, act_block, act_block != kBlock,
                                           r.q.data() + m * K + b * act_block);
            std::fill(r.d.begin() + m * blocks + b * per, r.d.begin() + m * blocks + (b + 1) * per, d);
        }
        for (int64_t i = 0; i < K / 4; ++i) {
            const int8_t* c = r.q.data() + m * K + 4 * i;
            r.neg_sums[m * (K / 4) + i] = -128 * (c[0] + c[1] + c[2] + c[3]);
        }
        if (sums) {
            for (int64_t g = 0; g < groups; ++g) {
                int32_t total = 0;
                for (int64_t k = g * G; k < (g + 1) * G; ++k) total += r.q[m * K + k];
                r.group_sums[m * groups + g] = r.d[m * blocks + g * G / kBlock] * static_cast<float>(total);
            }
        }
    }
    return r;
}

// Sum of the products of 32 unsigned bytes and 32 signed bytes, in 8 int32 lanes of 4 products each: one VNNI
// instruction where the CPU has it, else maddubs + madd (the same sums: our operands never saturate int16).
inline __m256i dot_u8_s8(__m256i u, __m256i s) {
#if defined(__AVXVNNI__) || (defined(__AVX512VNNI__) && defined(__AVX512VL__))
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

// A weight scale as float: fp32 as stored, or fp16 bits (exact for Q8_0/Q5_0/Q4_0, whose scales are fp16 in the
// file: half the scale bytes a decode step reads).
inline float scale_at(const float* s, int64_t i) { return s[i]; }
inline float scale_at(const uint16_t* s, int64_t i) { return _cvtsh_ss(s[i]); }

// y[m, n] from its scaled integer products: minus the offsets' share, sum_g o[n, g] * d_x * sum(q_x[m, g]).
inline float finish(float products, const Q8Rows& xq, int64_t m, const float* o, int r, int64_t groups) {
    if (o == nullptr) return products;
    const float* sums = xq.group_sums.data() + m * groups;
    const float* offsets = o + r * groups;
    __m256 share = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 8 <= groups; g += 8)
        share = _mm256_fmadd_ps(_mm256_loadu_ps(offsets + g), _mm256_loadu_ps(sums + g), share);
    float total = nbllm::hsum(share);
    for (; g < groups; ++g) total += offsets[g] * sums[g];
    return products - total;
}

constexpr int kRows = 4;  // weight rows per tile
constexpr int kCols = 2;  // activation rows per tile

// R weight rows (codes q, row stride K; scales s, row stride K / G) times C quantized activation rows.
template <int R, int C, int G, typename S>
inline void tile(const Q8Rows& xq, int64_t m0, const int8_t* q, const S* s, const float* o, int64_t K,
                 float* y, int64_t ldy) {
    const int64_t blocks = K / kBlock, groups = K / G;
    __m256 acc[R][C];
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
        __m256i xv[C];
        __m256 dx[C];
        for (int c = 0; c < C; ++c) {
            xv[c] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq.q.data() + (m0 + c) * K + b * kBlock));
            dx[c] = _mm256_set1_ps(xq.d[(m0 + c) * blocks + b]);
        }
        for (int r = 0; r < R; ++r) {
            const int8_t* wp = q + r * K + b * kBlock;
            _mm_prefetch(reinterpret_cast<const char*>(wp + 4096), _MM_HINT_T0);
            const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp));
            const __m256i aw = _mm256_sign_epi8(w, w);
            // int32 lane i of the products covers codes 4i..4i+3: lanes 0-3 the block's first 16, 4-7 the rest.
            const __m256 sv = G == kBlock ? _mm256_set1_ps(scale_at(s, r * groups + b))
                                          : _mm256_set_m128(_mm_set1_ps(scale_at(s, r * groups + 2 * b + 1)),
                                                            _mm_set1_ps(scale_at(s, r * groups + 2 * b)));
            for (int c = 0; c < C; ++c) {
                const __m256i dot = dot_u8_s8(aw, _mm256_sign_epi8(xv[c], w));
                acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(sv, dx[c]), acc[r][c]);
            }
        }
    }
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) y[c * ldy + r] = finish(nbllm::hsum(acc[r][c]), xq, m0 + c, o, r, groups);
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
// The same sums with 512-bit vectors, two blocks of 32 at a time (K a multiple of 64): half the instructions, and
// 32 registers hold a 4 x 4 tile. Whether a weight takes this path depends on its K, never on M, so rows stay
// batch-invariant. Instead of the sign trick, weights are made unsigned (w + 128, one xor per weight vector,
// shared by the tile's columns) and each dot product starts from -128 * sum(x): VNNI's accumulator input makes
// the correction free, four instructions per weight vector and activation row instead of five.
constexpr int kWideCols = 4;

// 16 lanes of scales: lanes 4i..4i+3 cover codes 16i..16i+15, i.e. group i for G = 16, group i / 2 for G = 32.
template <int G, typename S>
inline __m512 wide_scales(const S* s) {
    if (G == kBlock) return _mm512_insertf32x8(_mm512_set1_ps(scale_at(s, 0)), _mm256_set1_ps(scale_at(s, 1)), 1);
    const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    const __m128 four = _mm_setr_ps(scale_at(s, 0), scale_at(s, 1), scale_at(s, 2), scale_at(s, 3));
    return _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(four));
}

template <int R, int C, int G, typename S>
inline void wide_tile(const Q8Rows& xq, int64_t m0, const int8_t* q, const S* s, const float* o, int64_t K,
                      float* y, int64_t ldy) {
    const int64_t blocks = K / kBlock, groups = K / G;
    __m512 acc[R][C];
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; b += 2) {
        __m512i xv[C], start[C];
        __m512 dx[C];
        for (int c = 0; c < C; ++c) {
            xv[c] = _mm512_loadu_si512(xq.q.data() + (m0 + c) * K + b * kBlock);
            start[c] = _mm512_loadu_si512(xq.neg_sums.data() + (m0 + c) * (K / 4) + b * kBlock / 4);
            const float* d = xq.d.data() + (m0 + c) * blocks + b;
            dx[c] = _mm512_insertf32x8(_mm512_set1_ps(d[0]), _mm256_set1_ps(d[1]), 1);
        }
        for (int r = 0; r < R; ++r) {
            const int8_t* wp = q + r * K + b * kBlock;
            _mm_prefetch(reinterpret_cast<const char*>(wp + 4096), _MM_HINT_T0);
            const __m512i wu = _mm512_xor_si512(_mm512_loadu_si512(wp), _mm512_set1_epi8(static_cast<char>(0x80)));
            const __m512 sv = wide_scales<G>(s + r * groups + b * kBlock / G);
            for (int c = 0; c < C; ++c) {
                const __m512i dot = _mm512_dpbusd_epi32(start[c], wu, xv[c]);
                acc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(sv, dx[c]), acc[r][c]);
            }
        }
    }
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) y[c * ldy + r] = finish(_mm512_reduce_add_ps(acc[r][c]), xq, m0 + c, o, r, groups);
}
#endif

template <int R, int G, typename S>
inline void row_tile(const Q8Rows& xq, int64_t M, const int8_t* q, const S* s, const float* o, int64_t K,
                     float* y, int64_t ldy) {
    int64_t m = 0;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
    if (K % (2 * kBlock) == 0) {
        for (; m + kWideCols <= M; m += kWideCols) wide_tile<R, kWideCols, G, S>(xq, m, q, s, o, K, y + m * ldy, ldy);
        if (M - m == 3) wide_tile<R, 3, G, S>(xq, m, q, s, o, K, y + m * ldy, ldy);
        if (M - m == 2) wide_tile<R, 2, G, S>(xq, m, q, s, o, K, y + m * ldy, ldy);
        if (M - m == 1) wide_tile<R, 1, G, S>(xq, m, q, s, o, K, y + m * ldy, ldy);
        return;
    }
#endif
    for (; m + kCols <= M; m += kCols) tile<R, kCols, G, S>(xq, m, q, s, o, K, y + m * ldy, ldy);
    if (M - m == 1) tile<R, 1, G, S>(xq, m, q, s, o, K, y + m * ldy, ldy);
}

template <int G, typename S>
void gemm(const Q8Rows& xq, int64_t M, const int8_t* q, const S* s, const float* o, int64_t N, int64_t K,
          float* y, int64_t ldy, int threads) {
    const int64_t groups = K / G;
    const int64_t tiles = (N + kRows - 1) / kRows;
    nbllm::parallel_for(tiles, 4, threads, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
            const int64_t n = t * kRows;
            if (n + kRows <= N) {
                row_tile<kRows, G, S>(xq, M, q + n * K, s + n * groups, o ? o + n * groups : nullptr, K, y + n, ldy);
            } else {
                for (int64_t r = n; r < N; ++r)
                    row_tile<1, G, S>(xq, M, q + r * K, s + r * groups, o ? o + r * groups : nullptr, K, y + r, ldy);
            }
        }
    });
}

}  // namespace

extern "C" {

// As nbllm_int8_gemm, with x quantized first in blocks of act_block (32: Q8_0, 256: Q8_K). K must be a multiple
// of act_block and G 16 or 32. scale_half: s holds fp16 bits instead of floats.
void nbllm_q8_gemm(const float* x, int64_t M, int64_t ldx, const int8_t* q, const void* s, const float* o,
                   int64_t N, int64_t K, int64_t G, float* y, int64_t ldy, int threads, int64_t act_block,
                   int scale_half) {
    const Q8Rows xq = quantize(x, M, ldx, K, G, act_block, o != nullptr);
    const auto* s32 = static_cast<const float*>(s);
    const auto* s16 = static_cast<const uint16_t*>(s);
    if (G == kBlock && scale_half)
        gemm<32>(xq, M, q, s16, o, N, K, y, ldy, threads);
    else if (G == kBlock)
        gemm<32>(xq, M, q, s32, o, N, K, y, ldy, threads);
    else if (scale_half)
        gemm<16>(xq, M, q, s16, o, N, K, y, ldy, threads);
    else
        gemm<16>(xq, M, q, s32, o, N, K, y, ldy, threads);
}

}  // extern "C"
