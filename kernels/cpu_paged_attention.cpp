// Paged attention on the CPU: every query reads its keys straight through its sequence's block table, with an
// online softmax, so nothing is gathered or padded and no OpenMP region runs (the reference is
// `paged_attention.py`'s torch path).
//
// Layout as in paged_attention.py: q, out [T, Hq, D]; k_cache, v_cache [blocks, block_size, Hkv, D]; sequence i owns
// queries cu[i]..cu[i+1], which are its last positions of ctx[i] keys (this step's included); query head h reads kv
// head h / (Hq / Hkv); a query at position t sees keys p with t - window < p <= t (window 0: no window).
//
// Work items are (sequence, kv head, block of kQueryBlock queries, key chunk): a kv head's query rows in a block
// share each key and value load, a block reads keys only up to its last query, and long contexts are split into
// chunks so both cores work on one sequence (flash-decoding); the chunks' partial softmax states are merged at
// the end. Key tiles and chunks sit at fixed positions (multiples of kTile and kChunkKeys) and a query's arithmetic
// depends only on its own position and context: the same query gives the same bits whether it comes alone in a
// decode step or inside a long prefill chunk, so greedy output does not depend on chunking or batching.
#include <cmath>
#include <limits>
#include <vector>

#include "cpu_pool.h"
#include "cpu_simd.h"

namespace {

constexpr int64_t kTile = 16;         // keys scored before their values are accumulated
constexpr int64_t kChunkKeys = 512;   // keys per work item of a long context (a multiple of kTile)
constexpr int64_t kQueryBlock = 16;   // queries per work item
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
    // Tiles at multiples of kTile: keys below lo in the first tile lie outside every row's window.
    for (int64_t t0 = lo - lo % kTile; t0 < hi; t0 += kTile) {
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
    int64_t seq, head, q0, nq, lo, hi;  // queries q0..q0+nq of the sequence, keys [lo, hi)
};

struct Group {  // the chunks of one (sequence, head, query block): items first..first+chunks
    int64_t first, chunks;
};

}  // namespace

extern "C" {

// Attention of the queries of sequences `seqs[0..num_seqs)`; other rows of `out` are left as they are. D must be a
// multiple of 8; all tensors contiguous fp32 (tables and lengths int32).
void nbllm_paged_attention(const float* q, float* out, const float* k_cache, const float* v_cache, int64_t block_size,
                           int64_t hq, int64_t hkv, int64_t d, const int32_t* block_tables, int64_t bt_stride,
                           const int32_t* cu_query_lens, const int32_t* context_lens, const int64_t* seqs,
                           int64_t num_seqs, float scale, int64_t window, int threads) {
    const Shape sh{hq, hkv, d, block_size, bt_stride, window, scale};
    const int64_t group = hq / hkv, rows_max = kQueryBlock * group;
    std::vector<Item> items;
    std::vector<Group> groups;
    for (int64_t i = 0; i < num_seqs; ++i) {
        const int64_t s = seqs[i], ctx = context_lens[s], nq = cu_query_lens[s + 1] - cu_query_lens[s];
        for (int64_t h = 0; h < hkv; ++h)
            for (int64_t q0 = 0; q0 < nq; q0 += kQueryBlock) {
                const int64_t n = std::min(kQueryBlock, nq - q0), first_pos = ctx - nq + q0, hi = first_pos + n;
                const int64_t lo = window ? std::max<int64_t>(0, first_pos - window + 1) : 0;
                const Group g{static_cast<int64_t>(items.size()), 0};
                groups.push_back(g);
                for (int64_t c = lo / kChunkKeys; c * kChunkKeys < hi; ++c, ++groups.back().chunks)
                    items.push_back({s, h, q0, n, std::max(lo, c * kChunkKeys), std::min(hi, (c + 1) * kChunkKeys)});
            }
    }
    const int64_t state_floats = rows_max * (d + 2);  // per item: m, l and acc of each row
    std::vector<float> states(items.size() * state_floats);

    nbllm::parallel_for(static_cast<int64_t>(items.size()), 1, threads, [&](int64_t begin, int64_t end) {
        std::vector<const float*> qrows(rows_max);
        std::vector<int64_t> qpos(rows_max);
        for (int64_t it = begin; it < end; ++it) {
            const Item& item = items[it];
            const int64_t start = cu_query_lens[item.seq], ctx = context_lens[item.seq];
            const int64_t nq = cu_query_lens[item.seq + 1] - start;
            for (int64_t j = 0; j < item.nq; ++j)
                for (int64_t g = 0; g < group; ++g) {
                    qrows[j * group + g] = q + (start + item.q0 + j) * hq * d + (item.head * group + g) * d;
                    qpos[j * group + g] = ctx - nq + item.q0 + j;
                }
            const int rows = static_cast<int>(item.nq * group);
            float* st = states.data() + it * state_floats;
            attend(sh, qrows.data(), qpos.data(), rows, k_cache, v_cache, block_tables + item.seq * bt_stride,
                   item.head, item.lo, item.hi, st, st + rows, st + 2 * rows);
        }
    });

    // Merge each group's chunks, in chunk order: out = sum_c acc_c e^(m_c - M) / sum_c l_c e^(m_c - M).
    nbllm::parallel_for(static_cast<int64_t>(groups.size()), 1, threads, [&](int64_t begin, int64_t end) {
        std::vector<float> w;
        for (int64_t gi = begin; gi < end; ++gi) {
            const Group& grp = groups[gi];
            const Item& item = items[grp.first];
            const int64_t rows = item.nq * group, start = cu_query_lens[item.seq];
            const float* base = states.data() + grp.first * state_floats;
            w.resize(grp.chunks);
            for (int64_t r = 0; r < rows; ++r) {
                float top = -std::numeric_limits<float>::infinity();
                for (int64_t c = 0; c < grp.chunks; ++c) top = std::max(top, base[c * state_floats + r]);
                float total = 0.0f;
                for (int64_t c = 0; c < grp.chunks; ++c) {
                    const float mc = base[c * state_floats + r];
                    w[c] = mc == top ? 1.0f : std::exp(mc - top);  // a chunk this row sees nothing of: e^-inf = 0
                    total += w[c] * base[c * state_floats + rows + r];
                }
                const int64_t j = r / group, g = r % group;
                float* o = out + (start + item.q0 + j) * hq * d + (item.head * group + g) * d;
                const float* acc = base + 2 * rows + r * d;
                for (int64_t x = 0; x < d; ++x) {
                    float sum = 0.0f;
                    for (int64_t c = 0; c < grp.chunks; ++c) sum += w[c] * acc[c * state_floats + x];
                    o[x] = sum / total;
                }
            }
        }
    });
}

}  // extern "C"
