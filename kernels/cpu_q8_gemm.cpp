// y[M, N] = x[M, K] · W[N, K]^T with the weights as int8 codes + per-group scales/offsets (the layout of
// cpu_int8_gemm.cpp, repacked once into panels below) and the activations quantized to int8 first, exactly as
// llama.cpp's CPU backend quantizes a matmul's input for the weight's type (its vec_dot_type):
//   Q8_0 (blocks of 32; Q4_0/Q5_0/Q8_0 ... weights): d = max|x| / 127 rounded to fp16, codes round(x * 127 / max|x|);
//   Q8_K (blocks of 256; K-quant weights): iscale = -127 / (signed max), codes min(127, round(iscale * x)),
//   d = 1 / iscale in fp32 (quantize_row_q8_K_ref). Rounding is half to even in both.
//
// Why integers: converting every weight to fp32 costs ~2.5 instructions per weight, which makes an fp32 kernel
// compute-bound at batch 1 on these cores; integer products take one VNNI instruction per 64 weights. The result
// differs from the exact one by the activations' rounding -- the rounding llama.cpp itself makes; within a group
// of 16 or 32 the products are summed exactly in integers.
//
//   y[m, n] = sum_g (s[n, g] * d_x[m, g] * (q[n, g] · q_x[m, g])  -  o[n, g] * d_x[m, g] * sum(q_x[m, g]))
//
// summed over the groups g in order, one fp32 fma chain per output: every output's arithmetic is the same whatever
// M is and however the rows are tiled, so rows are batch-invariant.
//
// Why panels: the weights are repacked once into panels of 16 rows, each group stored as (G / 4) steps of
// 16 rows x 4 consecutive codes, then the panel's 16 scales (and offsets) of that group. One step feeds one VNNI
// dot product per activation row into 16 row sums at once (the activation's 4 codes broadcast): no horizontal
// sums, a weight read once per tile of activation rows, and a panel is one sequential stream (decode is
// memory-bound: the hardware prefetcher follows one stream per thread best).
//
// Codes are stored unsigned, u = q + bias, in as few bits as the weight needs (decode reads every weight once a
// token, so bytes are time): 8 bits (bias 128), 4 bits (Q4_K's 0..15, Q4_0's -8..7) or 5 bits (Q5_0's -16..15:
// 4-bit nibbles plus a plane of high bits) -- the GGUF file's own widths. A 64-byte vector of nibbles holds two
// steps (low nibbles the even one); a group's high bits are one 64-byte vector, bit s of byte i for byte i of
// step s (a shift and a mask put them in place, in the same byte, whatever the vector width). Each group's
// dot products start from -bias * sum(x), so they sum q * x exactly whatever the width.
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

#include "cpu_pool.h"

namespace {

constexpr int64_t kQ8Block = 32;
constexpr int64_t kLanes = 16;  // weight rows per panel

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

// x quantized: codes [M, K]; per weight group [M, K / G]: the activation block's d, the group's code sum and, for
// offset weights, d * that sum.
struct Activations {
    int64_t K, groups;
    std::vector<int8_t> q;
    std::vector<float> d;
    std::vector<int32_t> sum;
    std::vector<float> scaled_sum;

    Activations(const float* x, int64_t M, int64_t ldx, int64_t K_, int64_t G, int64_t block, bool offsets,
                int threads)
        : K(K_), groups(K_ / G), q(M * K_), d(M * groups), sum(M * groups), scaled_sum(offsets ? M * groups : 0) {
        nbllm::parallel_for(M, 4, threads, [&](int64_t begin, int64_t end) {
            for (int64_t m = begin; m < end; ++m) {
                int8_t* codes = q.data() + m * K;
                for (int64_t b = 0; b < K / block; ++b) {
                    const float db = quantize_block(x + m * ldx + b * block, block, block != kQ8Block,
                                                    codes + b * block);
                    std::fill(d.begin() + m * groups + b * block / G, d.begin() + m * groups + (b + 1) * block / G, db);
                }
                for (int64_t g = 0; g < groups; ++g) {
                    int32_t total = 0;
                    for (int64_t k = g * G; k < (g + 1) * G; ++k) total += codes[k];
                    sum[m * groups + g] = total;
                    if (offsets) scaled_sum[m * groups + g] = d[m * groups + g] * static_cast<float>(total);
                }
            }
        });
    }
};

// 16 int32 lanes of dot products over 4 codes each: u (a step of unsigned panel codes) with s (4 activation codes
// broadcast). With AVX-512 VNNI one instruction.
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
struct I16 {
    __m512i v;
};
struct F16 {
    __m512 v;
};
inline I16 load_codes(const uint8_t* p) { return {_mm512_loadu_si512(p)}; }
inline void split_nibbles(I16 v, I16& lo, I16& hi) {
    const __m512i mask = _mm512_set1_epi8(0x0F);
    lo = {_mm512_and_si512(v.v, mask)};
    hi = {_mm512_and_si512(_mm512_srli_epi16(v.v, 4), mask)};
}
template <int S>  // v | 16 * (bit S of each byte of `high`)
inline I16 add_high_bits(I16 v, I16 high) {
    const __m512i moved = S >= 4 ? _mm512_srli_epi16(high.v, S - 4) : _mm512_slli_epi16(high.v, 4 - S);
    return {_mm512_ternarylogic_epi32(v.v, moved, _mm512_set1_epi8(0x10), 0xF8)};  // a | (b & c)
}
inline I16 broadcast4(const int8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return {_mm512_set1_epi32(v)};
}
inline I16 splat(int32_t v) { return {_mm512_set1_epi32(v)}; }
constexpr bool kSignedInt8Dot = false;
inline I16 dot(I16 acc, I16 u, I16 s) { return {_mm512_dpbusd_epi32(acc.v, u.v, s.v)}; }
inline I16 dot_int8(I16 acc, I16 u, I16 s) { return dot(acc, u, s); }
inline F16 to_float(I16 a) { return {_mm512_cvtepi32_ps(a.v)}; }
inline F16 fzero() { return {_mm512_setzero_ps()}; }
inline F16 fset(float v) { return {_mm512_set1_ps(v)}; }
inline F16 fload(const float* p) { return {_mm512_loadu_ps(p)}; }
inline F16 fload(const uint16_t* p) { return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))}; }
inline F16 mul(F16 a, F16 b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline F16 fma(F16 a, F16 b, F16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline F16 fnma(F16 a, F16 b, F16 c) { return {_mm512_fnmadd_ps(a.v, b.v, c.v)}; }
inline void store(float* p, F16 a, int64_t n) {
    if (n == kLanes)
        _mm512_storeu_ps(p, a.v);
    else
        _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), a.v);
}
#else
// AVX2: two halves of 8 lanes. Small unsigned codes (4-5 bits) go straight into maddubs (int16 pairs cannot
// saturate); 8-bit ones go back to signed and take llama.cpp's sign trick (|w| unsigned times x with w's sign),
// so they sum q * x from a start of 0.
struct I16 {
    __m256i lo, hi;
};
struct F16 {
    __m256 lo, hi;
};
inline I16 load_codes(const uint8_t* p) {
    return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)),
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32))};
}
inline void split_nibbles(I16 v, I16& lo, I16& hi) {
    const __m256i mask = _mm256_set1_epi8(0x0F);
    lo = {_mm256_and_si256(v.lo, mask), _mm256_and_si256(v.hi, mask)};
    hi = {_mm256_and_si256(_mm256_srli_epi16(v.lo, 4), mask), _mm256_and_si256(_mm256_srli_epi16(v.hi, 4), mask)};
}
template <int S>
inline __m256i add_high_bits8(__m256i v, __m256i high) {
    const __m256i moved = S >= 4 ? _mm256_srli_epi16(high, S - 4) : _mm256_slli_epi16(high, 4 - S);
    return _mm256_or_si256(v, _mm256_and_si256(moved, _mm256_set1_epi8(0x10)));
}
template <int S>  // v | 16 * (bit S of each byte of `high`)
inline I16 add_high_bits(I16 v, I16 high) {
    return {add_high_bits8<S>(v.lo, high.lo), add_high_bits8<S>(v.hi, high.hi)};
}
inline I16 broadcast4(const int8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return {_mm256_set1_epi32(v), _mm256_set1_epi32(v)};
}
inline I16 splat(int32_t v) { return {_mm256_set1_epi32(v), _mm256_set1_epi32(v)}; }
constexpr bool kSignedInt8Dot = true;
inline __m256i dot8(__m256i acc, __m256i u, __m256i s) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}
inline __m256i dot8_int8(__m256i acc, __m256i u, __m256i s) {
    const __m256i w = _mm256_xor_si256(u, _mm256_set1_epi8(static_cast<char>(0x80)));
    const __m256i prod = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(s, w));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(prod, _mm256_set1_epi16(1)));
}
inline I16 dot(I16 acc, I16 u, I16 s) { return {dot8(acc.lo, u.lo, s.lo), dot8(acc.hi, u.hi, s.hi)}; }
inline I16 dot_int8(I16 acc, I16 u, I16 s) { return {dot8_int8(acc.lo, u.lo, s.lo), dot8_int8(acc.hi, u.hi, s.hi)}; }
inline F16 to_float(I16 a) { return {_mm256_cvtepi32_ps(a.lo), _mm256_cvtepi32_ps(a.hi)}; }
inline F16 fzero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline F16 fset(float v) { return {_mm256_set1_ps(v), _mm256_set1_ps(v)}; }
inline F16 fload(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline F16 fload(const uint16_t* p) {
    return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
            _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)))};
}
inline F16 mul(F16 a, F16 b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline F16 fma(F16 a, F16 b, F16 c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
inline F16 fnma(F16 a, F16 b, F16 c) {
    return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)};
}
inline void store(float* p, F16 a, int64_t n) {
    alignas(32) float t[kLanes];
    _mm256_store_ps(t, a.lo);
    _mm256_store_ps(t + 8, a.hi);
    std::copy(t, t + n, p);
}
#endif

// How a panel stores its codes (bits per code).
enum Width : int { kBits8 = 8, kBits4 = 4, kBits5 = 5 };

// Where a panel's parts lie: per group, its codes (16 * G bytes at 8 bits, 16 * G / 2 at 4, and 64 more bytes of
// high bits at 5), then 16 scales, then 16 offsets if the weight has them.
struct PanelLayout {
    int64_t G, groups, scale_bytes;
    bool offsets;
    int width, bias;
    int64_t code_bytes() const { return width == kBits5 ? kLanes * G / 2 + 64 : kLanes * G * width / 8; }
    int64_t group_bytes() const { return code_bytes() + kLanes * (scale_bytes + (offsets ? 4 : 0)); }
    int64_t panel_bytes() const { return groups * group_bytes(); }
};

// Steps 2J and 2J + 1 of a group's codes (`group` its first byte; `high` its high bits, for 5-bit codes).
template <int W, int J>
inline void load_pair(const uint8_t* group, I16 high, I16& even, I16& odd) {
    if (W == kBits8) {
        even = load_codes(group + 2 * J * 64);
        odd = load_codes(group + (2 * J + 1) * 64);
        return;
    }
    split_nibbles(load_codes(group + J * 64), even, odd);
    if (W == kBits5) {
        even = add_high_bits<2 * J>(even, high);
        odd = add_high_bits<2 * J + 1>(odd, high);
    }
}

template <int W>
inline I16 dot_codes(I16 acc, I16 u, I16 s) {
    return W == kBits8 ? dot_int8(acc, u, s) : dot(acc, u, s);
}

// Steps 2J and 2J + 1 of a group for P panels (`groups`) and C activation rows (`x`, row stride K).
template <int P, int C, int W, int J>
inline void pair_step(const uint8_t* const* groups, const I16* high, const int8_t* x, int64_t K, I16 (&part)[P][C]) {
    I16 even[P], odd[P];
    for (int p = 0; p < P; ++p) load_pair<W, J>(groups[p], high[p], even[p], odd[p]);
    for (int c = 0; c < C; ++c) {
        const I16 x0 = broadcast4(x + c * K + 8 * J), x1 = broadcast4(x + c * K + 8 * J + 4);
        for (int p = 0; p < P; ++p) part[p][c] = dot_codes<W>(dot_codes<W>(part[p][c], even[p], x0), odd[p], x1);
    }
}

template <int P, int C, int W, int... J>  // every pair of steps of a group, unrolled (the high bits' shifts are constants)
inline void group_steps(std::integer_sequence<int, J...>, const uint8_t* const* groups, const I16* high,
                        const int8_t* x, int64_t K, I16 (&part)[P][C]) {
    (pair_step<P, C, W, J>(groups, high, x, K, part), ...);
}

constexpr int kPanels = 2;            // weight panels per tile (32 rows)
constexpr int kCols = 4;              // activation rows per tile
constexpr int64_t kPrefetch = 4096;  // bytes a panel's stream is requested ahead of its use

// P panels (`panel`, stride `stride` bytes; rows[p] valid rows each) times C activation rows from m0.
template <int P, int C, int G, typename S, bool Offsets, int W>
inline void tile(const Activations& a, int64_t m0, const uint8_t* panel, int64_t stride, const PanelLayout& L,
                 const int64_t* rows, float* y, int64_t ldy) {
    const int64_t group_bytes = L.group_bytes(), code_bytes = L.code_bytes();
    // The sum of q * x from dot products of u = q + bias: start at -bias * sum(x) (0 where the dot is signed).
    const int32_t bias = W == kBits8 && kSignedInt8Dot ? 0 : L.bias;
    F16 acc[P][C];
    for (int p = 0; p < P; ++p)
        for (int c = 0; c < C; ++c) acc[p][c] = fzero();
    for (int64_t g = 0; g < L.groups; ++g) {
        I16 part[P][C];
        for (int c = 0; c < C; ++c) {
            const I16 start = splat(-bias * a.sum[(m0 + c) * a.groups + g]);
            for (int p = 0; p < P; ++p) part[p][c] = start;
        }
        const uint8_t* groups[P];
        I16 high[P];
        for (int p = 0; p < P; ++p) {
            groups[p] = panel + p * stride + g * group_bytes;
            for (int64_t line = 0; line < group_bytes; line += 64)  // the group kPrefetch bytes ahead
                _mm_prefetch(reinterpret_cast<const char*>(groups[p] + kPrefetch + line), _MM_HINT_T0);
            high[p] = W == kBits5 ? load_codes(groups[p] + kLanes * G / 2) : splat(0);
        }
        group_steps<P, C, W>(std::make_integer_sequence<int, G / 8>{}, groups, high,
                             a.q.data() + m0 * a.K + g * G, a.K, part);
        for (int p = 0; p < P; ++p) {
            const uint8_t* tail = panel + p * stride + g * group_bytes + code_bytes;
            const F16 scale = fload(reinterpret_cast<const S*>(tail));
            const F16 offset = Offsets ? fload(reinterpret_cast<const float*>(tail + kLanes * sizeof(S))) : fzero();
            for (int c = 0; c < C; ++c) {
                const int64_t i = (m0 + c) * a.groups + g;
                acc[p][c] = fma(to_float(part[p][c]), mul(scale, fset(a.d[i])), acc[p][c]);
                if (Offsets) acc[p][c] = fnma(offset, fset(a.scaled_sum[i]), acc[p][c]);
            }
        }
    }
    for (int p = 0; p < P; ++p)
        for (int c = 0; c < C; ++c) store(y + c * ldy + p * kLanes, acc[p][c], rows[p]);
}

template <int P, int G, typename S, bool Offsets, int W>
inline void panel_rows(const Activations& a, int64_t M, const uint8_t* panel, const PanelLayout& L,
                       const int64_t* rows, float* y, int64_t ldy) {
    const int64_t stride = L.panel_bytes();
    int64_t m = 0;
    for (; m + kCols <= M; m += kCols) tile<P, kCols, G, S, Offsets, W>(a, m, panel, stride, L, rows, y + m * ldy, ldy);
    if (M - m == 3) tile<P, 3, G, S, Offsets, W>(a, m, panel, stride, L, rows, y + m * ldy, ldy);
    if (M - m == 2) tile<P, 2, G, S, Offsets, W>(a, m, panel, stride, L, rows, y + m * ldy, ldy);
    if (M - m == 1) tile<P, 1, G, S, Offsets, W>(a, m, panel, stride, L, rows, y + m * ldy, ldy);
}

template <int G, typename S, bool Offsets, int W>
void gemm(const Activations& a, int64_t M, const uint8_t* packed, const PanelLayout& L, int64_t N, float* y,
          int64_t ldy, int threads) {
    const int64_t panels = (N + kLanes - 1) / kLanes;
    const int64_t tiles = (panels + kPanels - 1) / kPanels;
    nbllm::parallel_for(tiles, 2, threads, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
            const int64_t p0 = t * kPanels, n0 = p0 * kLanes;
            const uint8_t* panel = packed + p0 * L.panel_bytes();
            int64_t rows[kPanels];
            for (int p = 0; p < kPanels; ++p) rows[p] = std::max<int64_t>(0, std::min(kLanes, N - n0 - p * kLanes));
            if (p0 + kPanels <= panels)
                panel_rows<kPanels, G, S, Offsets, W>(a, M, panel, L, rows, y + n0, ldy);
            else
                panel_rows<1, G, S, Offsets, W>(a, M, panel, L, rows, y + n0, ldy);
        }
    });
}

template <int G, int W>
void dispatch_scales(const Activations& a, int64_t M, const uint8_t* packed, const PanelLayout& L, int64_t N,
                     float* y, int64_t ldy, int threads) {
    if (L.offsets && L.scale_bytes == 2)
        gemm<G, uint16_t, true, W>(a, M, packed, L, N, y, ldy, threads);
    else if (L.offsets)
        gemm<G, float, true, W>(a, M, packed, L, N, y, ldy, threads);
    else if (L.scale_bytes == 2)
        gemm<G, uint16_t, false, W>(a, M, packed, L, N, y, ldy, threads);
    else
        gemm<G, float, false, W>(a, M, packed, L, N, y, ldy, threads);
}

template <int G>
void dispatch_width(const Activations& a, int64_t M, const uint8_t* packed, const PanelLayout& L, int64_t N,
                    float* y, int64_t ldy, int threads) {
    if (L.width == kBits4)
        dispatch_scales<G, kBits4>(a, M, packed, L, N, y, ldy, threads);
    else if (L.width == kBits5)
        dispatch_scales<G, kBits5>(a, M, packed, L, N, y, ldy, threads);
    else
        dispatch_scales<G, kBits8>(a, M, packed, L, N, y, ldy, threads);
}

PanelLayout layout(int64_t K, int64_t G, int scale_half, bool offsets, int width, int bias) {
    return PanelLayout{G, K / G, scale_half ? 2 : 4, offsets, width, bias};
}

// Row r's G codes u (0 <= u < 2^width) of one group into the group's code bytes.
void put_codes(uint8_t* group, int64_t G, int width, int64_t r, const uint8_t* u) {
    if (width == kBits8) {
        for (int64_t step = 0; step < G / 4; ++step) std::memcpy(group + step * 64 + r * 4, u + 4 * step, 4);
        return;
    }
    for (int64_t j = 0; j < G / 8; ++j)  // steps 2j (low nibbles) and 2j + 1 (high nibbles) share a vector
        for (int64_t k = 0; k < 4; ++k)
            group[j * 64 + r * 4 + k] = static_cast<uint8_t>((u[8 * j + k] & 0x0F) | (u[8 * j + 4 + k] & 0x0F) << 4);
    if (width == kBits5) {
        uint8_t* high = group + kLanes * G / 2;
        for (int64_t k = 0; k < G; ++k)  // bit (step) of byte (lane)
            high[r * 4 + k % 4] |= static_cast<uint8_t>((u[k] >> 4 & 1) << (k / 4));
    }
}

}  // namespace

extern "C" {

// Bytes of the panel form of an N x K weight with groups of G (16 or 32) and codes of `width` bits (8, 4 or 5).
int64_t nbllm_q8_packed_bytes(int64_t N, int64_t K, int64_t G, int scale_half, int has_offsets, int width) {
    return (N + kLanes - 1) / kLanes * layout(K, G, scale_half, has_offsets, width, 0).panel_bytes();
}

// The panel form of codes q [N, K], scales s [N, K / G] (fp32, or fp16 bits if scale_half) and offsets o (fp32 or
// null), each code stored as q + bias in `width` bits (the caller checks they fit; 8 bits: bias 128). Rows past N
// in the last panel are zero.
void nbllm_q8_pack(const int8_t* q, const void* s, const float* o, int64_t N, int64_t K, int64_t G, int scale_half,
                   int width, int bias, uint8_t* out, int threads) {
    const PanelLayout L = layout(K, G, scale_half, o != nullptr, width, bias);
    const int64_t panels = (N + kLanes - 1) / kLanes;
    nbllm::parallel_for(panels, 16, threads, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
            uint8_t* dst = out + p * L.panel_bytes();
            std::memset(dst, 0, L.panel_bytes());
            for (int64_t r = 0; r < kLanes && p * kLanes + r < N; ++r) {
                const int64_t n = p * kLanes + r;
                for (int64_t g = 0; g < L.groups; ++g) {
                    uint8_t* grp = dst + g * L.group_bytes();
                    uint8_t u[32];
                    for (int64_t k = 0; k < G; ++k) u[k] = static_cast<uint8_t>(q[n * K + g * G + k] + bias);
                    put_codes(grp, G, width, r, u);
                    uint8_t* tail = grp + L.code_bytes();
                    std::memcpy(tail + r * L.scale_bytes, static_cast<const uint8_t*>(s) + (n * L.groups + g) * L.scale_bytes,
                                L.scale_bytes);
                    if (o) std::memcpy(tail + kLanes * L.scale_bytes + r * 4, o + n * L.groups + g, 4);
                }
            }
        }
    });
}

// y [M, N] (row stride ldy) = x [M, K] (row stride ldx) times the packed weight, x rounded to int8 in blocks of
// act_block (32: Q8_0, 256: Q8_K) first. K must be a multiple of act_block and G 16 or 32.
void nbllm_q8_gemm(const float* x, int64_t M, int64_t ldx, const uint8_t* packed, int64_t N, int64_t K, int64_t G,
                   int scale_half, int has_offsets, int width, int bias, float* y, int64_t ldy, int threads,
                   int64_t act_block) {
    const PanelLayout L = layout(K, G, scale_half, has_offsets, width, bias);
    const Activations a(x, M, ldx, K, G, act_block, has_offsets, threads);
    if (G == 32)
        dispatch_width<32>(a, M, packed, L, N, y, ldy, threads);
    else
        dispatch_width<16>(a, M, packed, L, N, y, ldy, threads);
}

}  // extern "C"
