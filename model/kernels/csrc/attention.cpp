// Paged attention on CPU for prefill and decode chunks alike, fp32 or bf16 KV cache.
//
// Cache layout of the cpu backend (head-major, keys transposed within a block):
//   keys   (blocks, KVH, D, B): the B keys of a block and head, one row per dimension
//   values (blocks, KVH, B, D)
// so the scores of up to 16 keys against one query are a single vector: sum over d of
// q[d] * keys[block, h, d, j0 : j0 + 16]. No transposes, no horizontal sums.
//
// A batch packs chunks: chunk c owns query rows [row_start[c], row_start[c] + num_queries[c])
// at positions start_pos[c] + i, and its keys are read through its block table in place (no
// gather). Key position kp lives in physical block table[kp / B - first_block[c]] at offset
// kp % B; a query at position p sees kp when p - W < kp <= p (W: the sliding window, or all).
// Example, B = 4, first_block 1, table [7, 2]: key position 6 is in block 2 (table[6/4 - 1])
// at offset 2.
//
// Work items: (chunk, KV head, tile of up to kTile queries). The G query heads that share a KV
// head are computed together, so each key and value is read once per item. Online softmax
// over groups of up to 16 keys: running max, running sum, rescaled accumulators.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "vec.h"

namespace mskern {
namespace {

constexpr int64_t kTile = 16;  // queries per work item
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Up to 16 consecutive keys of one dimension, as fp32 lanes (missing lanes zero).
inline Vec16 load_keys(const float* p, int64_t n) {
  return n == 16 ? Vec16::load(p) : Vec16::load_partial(p, static_cast<int>(n));
}
inline Vec16 load_keys(const uint16_t* p, int64_t n) {
  if (n == 16) return Vec16::load_bf16(p);
  uint16_t tmp[16] = {};
  std::memcpy(tmp, p, sizeof(uint16_t) * n);
  return Vec16::load_bf16(tmp);
}

// One row of D values as fp32.
inline float to_float(float x) { return x; }
inline float to_float(uint16_t x) { return bf16_to_float(x); }
inline void to_float(const float* src, float* dst, int64_t D) { std::memcpy(dst, src, sizeof(float) * D); }
inline void to_float(const uint16_t* src, float* dst, int64_t D) {
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) Vec16::load_bf16(src + d).store(dst + d);
  for (; d < D; ++d) dst[d] = bf16_to_float(src[d]);
}

struct Chunks {
  const int64_t* row_start;
  const int64_t* num_queries;
  const int64_t* start_pos;
  const int64_t* first_block;
  const int64_t* table_offset;  // into tables
  const int64_t* table_len;
  const int64_t* tables;
};

constexpr int kRows = 8;  // query rows per micro-tile: 8 accumulators share each key / value load

struct Scratch {
  std::vector<float> q, acc, m, l, p, k, v;
  Scratch(int64_t rows, int64_t D)
      : q(rows * D), acc(rows * D), m(rows), l(rows), p(rows * 16), k(D * 16), v(16 * D) {}
};

inline Vec16 load16(const float* p) { return Vec16::load(p); }
inline Vec16 load16(const uint16_t* p) { return Vec16::load_bf16(p); }

// scores[r] = q[r] . keys, for RB rows of q (stride D) against 16 keys (k: D rows of 16 lanes,
// row stride ldk).
template <int RB, typename T>
inline void score_tile(const float* q, const T* k, int64_t ldk, int64_t D, Vec16* scores) {
  Vec16 a[RB], b[RB];  // even and odd dimensions: two chains per row
  for (int r = 0; r < RB; ++r) a[r] = b[r] = Vec16::zero();
  int64_t d = 0;
  for (; d + 2 <= D; d += 2) {
    const Vec16 k0 = load16(k + d * ldk), k1 = load16(k + (d + 1) * ldk);
    for (int r = 0; r < RB; ++r) {
      a[r] = Vec16::fma(Vec16::broadcast(q[r * D + d]), k0, a[r]);
      b[r] = Vec16::fma(Vec16::broadcast(q[r * D + d + 1]), k1, b[r]);
    }
  }
  if (d < D) {
    const Vec16 k0 = load16(k + d * ldk);
    for (int r = 0; r < RB; ++r) a[r] = Vec16::fma(Vec16::broadcast(q[r * D + d]), k0, a[r]);
  }
  for (int r = 0; r < RB; ++r) scores[r] = a[r] + b[r];
}

// acc[r] += sum_j p[r][j] * v[j] for RB rows (p stride 16, acc stride D), nk values (rows of D).
template <int RB, typename T>
inline void value_tile(const float* p, const T* v, int64_t nk, float* acc, int64_t D) {
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    Vec16 a[RB];
    for (int r = 0; r < RB; ++r) a[r] = Vec16::load(acc + r * D + d);
    for (int64_t j = 0; j < nk; ++j) {
      const Vec16 vv = load16(v + j * D + d);
      for (int r = 0; r < RB; ++r) a[r] = Vec16::fma(Vec16::broadcast(p[r * 16 + j]), vv, a[r]);
    }
    for (int r = 0; r < RB; ++r) a[r].store(acc + r * D + d);
  }
  for (; d < D; ++d) {
    for (int r = 0; r < RB; ++r) {
      float s = acc[r * D + d];
      for (int64_t j = 0; j < nk; ++j) s += p[r * 16 + j] * to_float(v[j * D + d]);
      acc[r * D + d] = s;
    }
  }
}

template <typename T>
struct Tiles {
  using ScoreFn = void (*)(const float*, const T*, int64_t, int64_t, Vec16*);
  using ValueFn = void (*)(const float*, const T*, int64_t, float*, int64_t);
  static constexpr ScoreFn score[kRows] = {score_tile<1, T>, score_tile<2, T>, score_tile<3, T>, score_tile<4, T>,
                                           score_tile<5, T>, score_tile<6, T>, score_tile<7, T>, score_tile<8, T>};
  static constexpr ValueFn value[kRows] = {value_tile<1, T>, value_tile<2, T>, value_tile<3, T>, value_tile<4, T>,
                                           value_tile<5, T>, value_tile<6, T>, value_tile<7, T>, value_tile<8, T>};
};

template <typename T>
void attend_item(const float* q, int64_t ldq, const T* kc, const T* vc, const Chunks& ch, int64_t c, int64_t g,
                 int64_t tile, int64_t G, int64_t KVH, int64_t D, int64_t B, int64_t window, float softmax_scale,
                 float* out, int64_t ldo, Scratch& s) {
  const int64_t q0 = tile * kTile, nq = std::min(kTile, ch.num_queries[c] - q0);
  const int64_t rows = nq * G;  // row r: query q0 + r / G, head g * G + r % G
  const int64_t p_first = ch.start_pos[c] + q0, p_last = p_first + nq - 1;
  const int64_t k_begin = window > 0 ? std::max<int64_t>(0, p_first - window + 1) : 0;
  const int64_t* table = ch.tables + ch.table_offset[c];
  for (int64_t r = 0; r < rows; ++r) {
    const float* src = q + (ch.row_start[c] + q0 + r / G) * ldq + (g * G + r % G) * D;
    for (int64_t d = 0; d < D; ++d) s.q[r * D + d] = src[d] * softmax_scale;
  }
  std::fill(s.acc.begin(), s.acc.begin() + rows * D, 0.0f);
  std::fill(s.m.begin(), s.m.begin() + rows, kNegInf);
  std::fill(s.l.begin(), s.l.begin() + rows, 0.0f);
  Vec16 scores[kRows];
  // one micro-tile of rows (decode): keys and values straight from the cache; else through an
  // fp32 copy that every micro-tile reuses
  const bool direct = rows <= kRows;
  for (int64_t kb = k_begin / B; kb * B <= p_last; ++kb) {
    const int64_t slot = kb - ch.first_block[c];
    TORCH_CHECK(slot >= 0 && slot < ch.table_len[c], "paged_attention: key block ", kb,
                " is outside the block table of chunk ", c);
    const int64_t block = table[slot];
    const T* kt = kc + (block * KVH + g) * D * B;  // (D, B)
    const T* vb = vc + (block * KVH + g) * B * D;  // (B, D)
    if ((kb + 1) * B <= p_last && slot + 1 < ch.table_len[c]) {  // the next block: it is cold in cache
      const int64_t next = table[slot + 1];
      const char* nk_ = reinterpret_cast<const char*>(kc + (next * KVH + g) * D * B);
      const char* nv_ = reinterpret_cast<const char*>(vc + (next * KVH + g) * B * D);
      for (int64_t i = 0; i < D * B * static_cast<int64_t>(sizeof(T)); i += 64) {
        __builtin_prefetch(nk_ + i, 0, 3);
        __builtin_prefetch(nv_ + i, 0, 3);
      }
    }
    for (int64_t j0 = 0; j0 < B; j0 += 16) {
      const int64_t kp0 = kb * B + j0;  // key position of lane 0
      const int64_t nk = std::min<int64_t>(16, B - j0);
      if (kp0 > p_last || kp0 + nk <= k_begin) continue;
      const bool from_cache = direct && nk == 16;
      if (!from_cache) {
        for (int64_t d = 0; d < D; ++d) load_keys(kt + d * B + j0, nk).store(s.k.data() + d * 16);
        for (int64_t j = 0; j < nk; ++j) to_float(vb + (j0 + j) * D, s.v.data() + j * D, D);
      }
      for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
        const int64_t n = std::min<int64_t>(kRows, rows - r0);
        if (from_cache) {
          Tiles<T>::score[n - 1](s.q.data() + r0 * D, kt + j0, B, D, scores);
        } else {
          Tiles<float>::score[n - 1](s.q.data() + r0 * D, s.k.data(), 16, D, scores);
        }
        for (int64_t i = 0; i < n; ++i) {
          const int64_t r = r0 + i, p = p_first + r / G;
          // visible lanes: kp0 + j in (p - W, p]
          const int lo = static_cast<int>(std::max<int64_t>(0, window > 0 ? p - window + 1 - kp0 : 0));
          const int hi = static_cast<int>(std::max<int64_t>(std::min<int64_t>(nk, p - kp0 + 1), lo));
          float* pr = s.p.data() + r * 16;
          if (hi == lo) {
            Vec16::zero().store(pr);
            continue;
          }
          const Vec16 masked = scores[i].keep_lanes(lo, hi, kNegInf);
          const float peak = std::max(s.m[r], masked.hmax());
          const Vec16 e = exp(masked - Vec16::broadcast(peak)).keep_lanes(lo, hi, 0.0f);
          const float correction = std::exp(s.m[r] - peak);  // 0 on the first visible group
          if (correction != 1.0f) {
            float* a = s.acc.data() + r * D;
            int64_t d = 0;
            for (; d + 16 <= D; d += 16) (Vec16::load(a + d) * Vec16::broadcast(correction)).store(a + d);
            for (; d < D; ++d) a[d] *= correction;
          }
          s.l[r] = s.l[r] * correction + e.sum();
          s.m[r] = peak;
          e.store(pr);
        }
        if (from_cache) {
          Tiles<T>::value[n - 1](s.p.data() + r0 * 16, vb + j0 * D, nk, s.acc.data() + r0 * D, D);
        } else {
          Tiles<float>::value[n - 1](s.p.data() + r0 * 16, s.v.data(), nk, s.acc.data() + r0 * D, D);
        }
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* o = out + (ch.row_start[c] + q0 + r / G) * ldo + (g * G + r % G) * D;
    const float inv = s.l[r] > 0.0f ? 1.0f / s.l[r] : 0.0f;
    for (int64_t d = 0; d < D; ++d) o[d] = s.acc[r * D + d] * inv;
  }
}

template <typename T>
void attend(const float* q, int64_t ldq, const T* kc, const T* vc, const Chunks& ch, int64_t num_chunks, int64_t H,
            int64_t KVH, int64_t D, int64_t B, int64_t window, float softmax_scale, float* out, int64_t ldo) {
  const int64_t G = H / KVH;
  std::vector<int64_t> item_start(num_chunks + 1, 0);  // items of chunk c: KVH x its query tiles
  for (int64_t c = 0; c < num_chunks; ++c) {
    item_start[c + 1] = item_start[c] + KVH * ((ch.num_queries[c] + kTile - 1) / kTile);
  }
  at::parallel_for(0, item_start[num_chunks], 1, [&](int64_t i0, int64_t i1) {
    Scratch scratch(kTile * G, D);
    int64_t c = std::upper_bound(item_start.begin(), item_start.end(), i0) - item_start.begin() - 1;
    for (int64_t item = i0; item < i1; ++item) {
      while (item >= item_start[c + 1]) ++c;
      const int64_t local = item - item_start[c];
      const int64_t tiles = (ch.num_queries[c] + kTile - 1) / kTile;
      attend_item<T>(q, ldq, kc, vc, ch, c, local / tiles, local % tiles, G, KVH, D, B, window, softmax_scale, out,
                     ldo, scratch);
    }
  });
}

}  // namespace

// q: (T, >= H * D) fp32 rows (the q part of the fused qkv rows); out: (T, H * D) fp32.
// Chunk metadata: int64 tensors of length num_chunks; tables: the concatenated block tables.
void paged_attention(const torch::Tensor& q, const torch::Tensor& key_cache, const torch::Tensor& value_cache,
                     const torch::Tensor& row_start, const torch::Tensor& num_queries,
                     const torch::Tensor& start_pos, const torch::Tensor& first_block,
                     const torch::Tensor& table_offset, const torch::Tensor& table_len, const torch::Tensor& tables,
                     int64_t num_heads, int64_t window, double softmax_scale, torch::Tensor& out) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && out.scalar_type() == torch::kFloat32,
              "paged_attention: q and out must be float32");
  TORCH_CHECK(q.stride(1) == 1 && out.stride(1) == 1, "paged_attention: rows of q and out must be contiguous");
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(), "paged_attention: caches must be contiguous");
  TORCH_CHECK(key_cache.scalar_type() == value_cache.scalar_type(), "paged_attention: cache dtypes differ");
  for (const auto* t : {&row_start, &num_queries, &start_pos, &first_block, &table_offset, &table_len, &tables}) {
    TORCH_CHECK(t->scalar_type() == torch::kInt64 && t->is_contiguous(), "paged_attention: metadata must be int64");
  }
  // keys (blocks, KVH, D, B), values (blocks, KVH, B, D)
  const int64_t KVH = key_cache.size(1), D = key_cache.size(2), B = key_cache.size(3);
  TORCH_CHECK(value_cache.size(1) == KVH && value_cache.size(2) == B && value_cache.size(3) == D,
              "paged_attention: values must be (blocks, KVH, B, D) for keys (blocks, KVH, D, B)");
  TORCH_CHECK(num_heads % KVH == 0, "paged_attention: heads must be a multiple of KV heads");
  Chunks ch{row_start.data_ptr<int64_t>(),  num_queries.data_ptr<int64_t>(), start_pos.data_ptr<int64_t>(),
            first_block.data_ptr<int64_t>(), table_offset.data_ptr<int64_t>(), table_len.data_ptr<int64_t>(),
            tables.data_ptr<int64_t>()};
  const int64_t n = row_start.size(0);
  const float s = static_cast<float>(softmax_scale);
  if (key_cache.scalar_type() == torch::kFloat32) {
    attend<float>(q.data_ptr<float>(), q.stride(0), key_cache.data_ptr<float>(), value_cache.data_ptr<float>(), ch, n,
                  num_heads, KVH, D, B, window, s, out.data_ptr<float>(), out.stride(0));
  } else {
    TORCH_CHECK(key_cache.scalar_type() == torch::kBFloat16, "paged_attention: cache must be float32 or bfloat16");
    attend<uint16_t>(q.data_ptr<float>(), q.stride(0),
                     reinterpret_cast<const uint16_t*>(key_cache.data_ptr<at::BFloat16>()),
                     reinterpret_cast<const uint16_t*>(value_cache.data_ptr<at::BFloat16>()), ch, n, num_heads, KVH,
                     D, B, window, s, out.data_ptr<float>(), out.stride(0));
  }
}

}  // namespace mskern
