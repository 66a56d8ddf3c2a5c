// A step of every decoder layer of a CPU model with int8-activation weights, in one call:
//   h += post_attn_norm(o(attention(rotary(norm(q), norm(k)), v)))   with q, k, v = qkv(attn_norm(h))
//   h += post_ffn_norm(down(act(gate) * up))                          with gate, up = gate_up(ffn_norm(h))
// (post norms optional: Gemma 3's sandwich layers have them, Llama-style pre-norm layers not).
//
// Why: at batch 1 the kernels of a layer take ~0.3 ms, and calling them one by one from Python cost as much
// again (~14 calls a layer, each a ctypes call plus tensor allocations: ~7 ms of an 18 ms token on the default
// model). Here the same kernels run in the same order on the same inputs, so the result is bit for bit the
// Python path's (nbllm.models.native_cpu checks nothing else may differ); the model code stays the reference.
#include <cstring>
#include <vector>

#include "cpu_kernels.h"

extern "C" {

struct NbllmQ8Linear {  // a weight packed by nbllm_q8_pack
    const uint8_t* packed;
    int64_t n, k, group, scale_half, offsets, width, bias, act_block;
};

struct NbllmDecoderLayer {
    const float *attn_norm, *post_attn_norm, *ffn_norm, *post_ffn_norm, *q_norm, *k_norm;  // post/q/k: or null
    const float *cos, *sin;                                                                 // rope tables [P, D / 2]
    float *k_cache, *v_cache;                                                               // [blocks, bs, Hkv, D]
    NbllmQ8Linear qkv, o, gate_up, down;
    int64_t heads, kv_heads, head_dim, block_size, window, gelu;                            // window 0: none
    float eps, scale;
};

struct NbllmStep {  // as nbllm.kernels.paged_attention describes them; slots -1: padding, not stored
    const int64_t *positions, *slots;
    const int32_t *block_tables, *cu_query_lens, *context_lens;
    const int64_t* seqs;
    int64_t tokens, block_table_stride, num_seqs;
};

}  // extern "C"

namespace {

void linear(const NbllmQ8Linear& w, const float* x, int64_t T, float* y, int threads) {
    nbllm_q8_gemm(x, T, w.k, w.packed, w.n, w.k, w.group, static_cast<int>(w.scale_half), static_cast<int>(w.offsets),
                  static_cast<int>(w.width), static_cast<int>(w.bias), y, w.n, threads, w.act_block);
}

void store_kv(const NbllmDecoderLayer& L, const NbllmStep& s, const float* k, const float* qkv, int64_t v_col,
              int64_t qkv_cols) {
    const int64_t row = L.kv_heads * L.head_dim;
    for (int64_t t = 0; t < s.tokens; ++t) {
        if (s.slots[t] < 0) continue;
        std::memcpy(L.k_cache + s.slots[t] * row, k + t * row, row * sizeof(float));
        std::memcpy(L.v_cache + s.slots[t] * row, qkv + t * qkv_cols + v_col, row * sizeof(float));
    }
}

}  // namespace

extern "C" {

// h: [tokens, hidden] fp32, updated in place through all `num_layers` layers.
void nbllm_decoder_layers(const NbllmDecoderLayer* layers, int64_t num_layers, const NbllmStep* step, float* h,
                          int64_t hidden, int threads) {
    const NbllmStep& s = *step;
    const int64_t T = s.tokens;
    std::vector<float> x, qkv, q, k, att, o, gate_up, act, down;
    for (int64_t i = 0; i < num_layers; ++i) {
        const NbllmDecoderLayer& L = layers[i];
        const int64_t q_cols = L.heads * L.head_dim, kv_cols = L.kv_heads * L.head_dim;
        const int64_t qkv_cols = q_cols + 2 * kv_cols, inner = L.gate_up.n / 2;
        x.resize(T * hidden), qkv.resize(T * qkv_cols), q.resize(T * q_cols), k.resize(T * kv_cols);
        att.resize(T * q_cols), o.resize(T * hidden), gate_up.resize(T * 2 * inner), act.resize(T * inner);
        down.resize(T * hidden);

        nbllm_rms_norm(h, hidden, nullptr, nullptr, L.attn_norm, T, hidden, L.eps, x.data(), hidden, threads);
        linear(L.qkv, x.data(), T, qkv.data(), threads);
        nbllm_norm_rotary(qkv.data(), qkv_cols, L.head_dim, T, L.heads, L.head_dim, L.q_norm, L.eps, s.positions,
                          L.cos, L.sin, q.data());
        nbllm_norm_rotary(qkv.data() + q_cols, qkv_cols, L.head_dim, T, L.kv_heads, L.head_dim, L.k_norm, L.eps,
                          s.positions, L.cos, L.sin, k.data());
        store_kv(L, s, k.data(), qkv.data(), q_cols + kv_cols, qkv_cols);
        nbllm_paged_attention(q.data(), att.data(), L.k_cache, L.v_cache, L.block_size, L.heads, L.kv_heads,
                              L.head_dim, s.block_tables, s.block_table_stride, s.cu_query_lens, s.context_lens,
                              s.seqs, s.num_seqs, L.scale, L.window, threads);
        linear(L.o, att.data(), T, o.data(), threads);
        if (L.post_attn_norm)
            nbllm_rms_norm(o.data(), hidden, nullptr, nullptr, L.post_attn_norm, T, hidden, L.eps, o.data(), hidden,
                           threads);
        // h += o, and x = ffn_norm(h): one pass
        nbllm_rms_norm(o.data(), hidden, h, h, L.ffn_norm, T, hidden, L.eps, x.data(), hidden, threads);
        linear(L.gate_up, x.data(), T, gate_up.data(), threads);
        nbllm_gated_activation(gate_up.data(), T, inner, static_cast<int>(L.gelu), act.data(), threads);
        linear(L.down, act.data(), T, down.data(), threads);
        if (L.post_ffn_norm)
            nbllm_rms_norm(down.data(), hidden, nullptr, nullptr, L.post_ffn_norm, T, hidden, L.eps, down.data(),
                           hidden, threads);
        for (int64_t j = 0; j < T * hidden; ++j) h[j] += down[j];
    }
}

}  // extern "C"
