// Paged attention for sequences with a few queries each (decode, speculative verification) on the CPU: every
// query reads its keys straight through its sequence's block table, with an online softmax, so nothing is
// gathered or padded and no OpenMP region runs (the reference is `paged_attention.py`'s torch path).
//
// Layout as in paged_attention.py: q, out [T, Hq, D]; k_cache, v_cache [blocks, block_size, Hkv, D]; sequence i owns
// queries cu[i]..cu[i+1], which are its last positions of ctx[i] keys (this step's included); query head h reads kv
// head h / (Hq / Hkv); a query at position t sees keys p with t - window < p <= t (window 0: no window).
//
// Work items are (sequence, kv head, key split): a kv head's whole query group (all its query heads, all the
// sequence's queries) shares each key and value load. Long contexts split their keys (flash-decoding) so both
// cores work on one sequence; the splits' partial softmax states are merged at the end.
#include <cmath>
#include <limits>
#include <vector>

#include "cpu_pool.h"
#include "cpu_simd.h"

namespace {

constexpr int64_t kTile = 16;         // keys scored before their values are accumulated
constexpr int64_t kSplitKeys = 512;   // keys per work item of a long context
constexpr int kRowGroup = 4;          // query rows sharing one pass over a key or value vector

struct Shape {
    int64_t hq, hkv, d, block_size, bt_stride, window;
    float scale;
};

// Partial attention of `rows` query vectors over keys [lo, hi) of one sequence and kv head: the running max `m`,
// the sum of exp(score - m) `l`, and the unnormalised output `acc` (rows x d), per row.
void attend(const Shape& sh, const float* const* qrows, const int64_t* qpos, int rows, const float* k_cache,
            const float* v_cache, const int32_t* table, int64_t head, int64_t lo, int64_t hi, float* m, float* l,
            float* acc) {
    const int64_t d = sh.d, row_stride = sh.hkv * d;
    const float neg_inf = -std::numeric_limits<float>::infinity();
    for (int r = 0; r < rows; ++r) {
        m[r] = neg_inf;
        l[r] = 0.0f;
        std::fill(acc + r * d, acc + (r + 1) * d, 0.0f);
    }
    std::vector<float> score(static_cast<size_t>(rows) * kTile);
    int64_t kv_offset[kTile];  // where key p's vector starts in k_cache and v_cache
    for (int64_t t0 = lo; t0 < hi; t0 += kTile) {
        const int64_t n = std::min(kTile, hi - t0);
        for (int64_t j = 0; j < n; ++j) {
            const int64_t p = t0 + j;
            kv_offset[j] =
                (static_cast<int64_t>(table[p / sh.block_size]) * sh.block_size + p % sh.block_size) * row_stride +
                head * d;
        }
        for (int r0 = 0; r0 < rows; r0 += kRowGroup) {
            const int rn = std::min(kRowGroup, rows - r0);
            for (int64_t j = 0; j < n; ++j) {
                const float* k = k_cache + kv_offset[j];
                __m256 a[kRowGroup] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                                       _mm256_setzero_ps()};
                for (int64_t x = 0; x < d; x += 8) {
                    const __m256 kv = _mm256_loadu_ps(k + x);
                    for (int r = 0; r < rn; ++r) a[r] = _mm256_fmadd_ps(_mm256_loadu_ps(qrows[r0 + r] + x), kv, a[r]);
                }
                for (int r = 0; r < rn; ++r) {
                    const int64_t p = t0 + j, t = qpos[r0 + r];
                    const bool seen = p <= t && (sh.window == 0 || p > t - sh.window);
                    score[(r0 + r) * kTile + j] = seen ? nbllm::hsum(a[r]) * sh.scale : neg_inf;
                }
            }
        }
        for (int r = 0; r < rows; ++r) {
            float* s = score.data() + r * kTile;
            float top = m[r];
            for (int64_t j = 0; j < n; ++j) top = std::max(top, s[j]);
            if (top == neg_inf) continue;  // no visible key in this tile yet
            const float correction = std::exp(m[r] - top);  // exp(-inf) = 0 on the first visible tile
            l[r] *= correction;
            for (int64_t j = 0; j < n; ++j) {
                s[j] = std::exp(s[j] - top);
                l[r] += s[j];
            }
            m[r] = top;
            if (correction != 1.0f) {
                const __m256 c = _mm256_set1_ps(correction);
                for (int64_t x = 0; x < d; x += 8)
                    _mm256_storeu_ps(acc + r * d + x, _mm256_mul_ps(_mm256_loadu_ps(acc + r * d + x), c));
            }
        }
        for (int r0 = 0; r0 < rows; r0 += kRowGroup) {
            const int rn = std::min(kRowGroup, rows - r0);
            for (int64_t x = 0; x < d; x += 8) {
                __m256 a[kRowGroup];
                for (int r = 0; r < rn; ++r) a[r] = _mm256_loadu_ps(acc + (r0 + r) * d + x);
                for (int64_t j = 0; j < n; ++j) {
                    const __m256 v = _mm256_loadu_ps(v_cache + kv_offset[j] + x);
                    for (int r = 0; r < rn; ++r) {
                        const float w = m[r0 + r] == neg_inf ? 0.0f : score[(r0 + r) * kTile + j];
                        a[r] = _mm256_fmadd_ps(_mm256_set1_ps(w), v, a[r]);
                    }
                }
                for (int r = 0; r < rn; ++r) _mm256_storeu_ps(acc + (r0 + r) * d + x, a[r]);
            }
        }
    }
}

struct Item {
    int64_t seq, head, lo, hi, state;  // state: index of this item's (m, l, acc) block in the scratch
};

}  // namespace

extern "C" {

// Attention of the queries of sequences `seqs[0..num_seqs)` (meant for a few queries each: a kv head's query rows
// are scored together); other rows of `out` are left as they are. D must be a multiple of 8; all tensors
// contiguous fp32 (tables and lengths int32).
void nbllm_paged_decode_attention(const float* q, float* out, const float* k_cache, const float* v_cache,
                                  int64_t block_size, int64_t hq, int64_t hkv, int64_t d, const int32_t* block_tables,
                                  int64_t bt_stride, const int32_t* cu_query_lens, const int32_t* context_lens,
                                  const int64_t* seqs, int64_t num_seqs, float scale, int64_t window, int threads) {
    const Shape sh{hq, hkv, d, block_size, bt_stride, window, scale};
    const int64_t group = hq / hkv;
    std::vector<Item> items;
    std::vector<int64_t> first_item(num_seqs + 1);
    int64_t max_rows = 0;
    for (int64_t i = 0; i < num_seqs; ++i) {
        const int64_t s = seqs[i], ctx = context_lens[s], nq = cu_query_lens[s + 1] - cu_query_lens[s];
        const int64_t lo = window ? std::max<int64_t>(0, ctx - nq - window + 1) : 0;
        const int64_t splits = std::max<int64_t>(1, (ctx - lo + kSplitKeys - 1) / kSplitKeys);
        const int64_t per = (ctx - lo + splits - 1) / splits;
        max_rows = std::max(max_rows, nq * group);
        first_item[i] = static_cast<int64_t>(items.size());
        for (int64_t h = 0; h < hkv; ++h)
            for (int64_t c = 0; c < splits; ++c)
                items.push_back({s, h, lo + c * per, std::min(ctx, lo + (c + 1) * per),
                                 static_cast<int64_t>(items.size())});
    }
    first_item[num_seqs] = static_cast<int64_t>(items.size());
    const int64_t state_floats = max_rows * (d + 2);
    std::vector<float> states(items.size() * state_floats);

    nbllm::parallel_for(static_cast<int64_t>(items.size()), 1, threads, [&](int64_t begin, int64_t end) {
        std::vector<const float*> qrows(max_rows);
        std::vector<int64_t> qpos(max_rows);
        for (int64_t it = begin; it < end; ++it) {
            const Item& item = items[it];
            const int64_t start = cu_query_lens[item.seq], nq = cu_query_lens[item.seq + 1] - start;
            const int64_t ctx = context_lens[item.seq];
            for (int64_t j = 0; j < nq; ++j)
                for (int64_t g = 0; g < group; ++g) {
                    qrows[j * group + g] = q + (start + j) * hq * d + (item.head * group + g) * d;
                    qpos[j * group + g] = ctx - nq + j;
                }
            const int rows = static_cast<int>(nq * group);
            float* st = states.data() + item.state * state_floats;
            attend(sh, qrows.data(), qpos.data(), rows, k_cache, v_cache, block_tables + item.seq * bt_stride,
                   item.head, item.lo, item.hi, st, st + rows, st + 2 * rows);
        }
    });

    // Merge each (sequence, head)'s splits: out = sum_c acc_c e^(m_c - M) / sum_c l_c e^(m_c - M).
    for (int64_t i = 0; i < num_seqs; ++i) {
        const int64_t s = seqs[i], start = cu_query_lens[s], nq = cu_query_lens[s + 1] - start;
        const int64_t rows = nq * group, splits = (first_item[i + 1] - first_item[i]) / hkv;
        for (int64_t h = 0; h < hkv; ++h) {
            const float* base = states.data() + (first_item[i] + h * splits) * state_floats;
            for (int64_t r = 0; r < rows; ++r) {
                float top = -std::numeric_limits<float>::infinity();
                for (int64_t c = 0; c < splits; ++c) top = std::max(top, base[c * state_floats + r]);
                float total = 0.0f;
                std::vector<float> w(splits);
                for (int64_t c = 0; c < splits; ++c) {
                    const float mc = base[c * state_floats + r];
                    w[c] = mc == top ? 1.0f : std::exp(mc - top);
                    total += w[c] * base[c * state_floats + rows + r];
                }
                const int64_t j = r / group, g = r % group;
                float* o = out + (start + j) * hq * d + (h * group + g) * d;
                for (int64_t x = 0; x < d; ++x) {
                    float sum = 0.0f;
                    for (int64_t c = 0; c < splits; ++c) sum += w[c] * base[c * state_floats + 2 * rows + r * d + x];
                    o[x] = sum / total;
                }
            }
        }
    }
}

}  // extern "C"
