// The C entry points of the CPU kernels, for kernels that chain others (cpu_decoder.cpp). Each is documented
// where it is defined.
#pragma once
#include <stdint.h>

extern "C" {
void nbllm_rms_norm(const float* x, int64_t ldx, const float* residual, float* residual_out, const float* w,
                    int64_t rows, int64_t cols, float eps, float* out, int64_t ldo, int threads);
void nbllm_norm_rotary(const float* x, int64_t ldt, int64_t ldh, int64_t T, int64_t H, int64_t D,
                       const float* norm_w, float eps, const int64_t* positions, const float* cos_table,
                       const float* sin_table, float* out);
void nbllm_paged_attention(const float* q, float* out, const float* k_cache, const float* v_cache, int64_t block_size,
                           int64_t hq, int64_t hkv, int64_t d, const int32_t* block_tables, int64_t bt_stride,
                           const int32_t* cu_query_lens, const int32_t* context_lens, const int64_t* seqs,
                           int64_t num_seqs, float scale, int64_t window, int threads);
void nbllm_gated_activation(const float* gate_up, int64_t rows, int64_t inner, int gelu, float* out, int threads);
void nbllm_q8_gemm(const float* x, int64_t M, int64_t ldx, const uint8_t* packed, int64_t N, int64_t K, int64_t G,
                   int scale_half, int has_offsets, int width, int bias, float* y, int64_t ldy, int threads,
                   int64_t act_block);
}
