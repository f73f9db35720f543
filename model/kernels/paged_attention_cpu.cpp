// Paged decode attention for CPU, fp32: one query token per sequence, keys and values read
// straight from the paged cache (no gather), GQA heads of a group together.
//
//   out[s, h] = sum_j softmax_j(scale * q[s, h] . K[j, h / G]) * V[j, h / G]
//
// for table columns j in [key_start[s], key_end[s]); column j of sequence s lives in physical
// block tables[s][j / B] at offset j % B. Parallel over sequences with at::parallel_for.
// Per sequence: all scores, then max, then exp (a branch-free polynomial the compiler
// vectorizes), then the weighted sum of values. The plain loops are written for auto-vectorization (-O3).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// exp(x) for x <= 0, relative error ~2e-7: x = n ln2 + r, |r| <= ln2/2, e^r by a degree-6
// polynomial, 2^n through the exponent bits. Inputs below -87 give 0.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

}  // namespace

torch::Tensor paged_decode_attention(
    torch::Tensor query,        // (S, H, D) fp32
    torch::Tensor key_cache,    // (NB, B, KVH, D) fp32
    torch::Tensor value_cache,  // (NB, B, KVH, D) fp32
    torch::Tensor block_tables, // (S, W) int64
    torch::Tensor key_start,    // (S,) int64, first visible column
    torch::Tensor key_end,      // (S,) int64, one past the last visible column
    double scale) {
  TORCH_CHECK(query.scalar_type() == torch::kFloat32 && key_cache.scalar_type() == torch::kFloat32 &&
                  value_cache.scalar_type() == torch::kFloat32,
              "paged_decode_attention: fp32 only");
  TORCH_CHECK(query.is_contiguous() && key_cache.is_contiguous() && value_cache.is_contiguous(),
              "paged_decode_attention: contiguous tensors only");
  const int64_t S = query.size(0), H = query.size(1), D = query.size(2);
  const int64_t B = key_cache.size(1), KVH = key_cache.size(2), W = block_tables.size(1);
  const int64_t G = H / KVH;
  auto out = torch::empty_like(query);
  auto tables = block_tables.to(torch::kInt64).contiguous();
  auto starts = key_start.to(torch::kInt64).contiguous();
  auto ends = key_end.to(torch::kInt64).contiguous();
  const float* q = query.data_ptr<float>();
  const float* kc = key_cache.data_ptr<float>();
  const float* vc = value_cache.data_ptr<float>();
  const int64_t* tb = tables.data_ptr<int64_t>();
  const int64_t* st = starts.data_ptr<int64_t>();
  const int64_t* en = ends.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);

  // One item per sequence: a token's K (and V) rows for all KV heads are contiguous
  // (KVH * D floats), so each block is read front to back once.
  at::parallel_for(0, S, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, acc(D);
    std::vector<int64_t> rows;
    for (int64_t s = begin; s < end; ++s) {
      const int64_t first = st[s], length = en[s] - st[s];
      rows.resize(length);
      for (int64_t j = 0; j < length; ++j) {
        const int64_t column = first + j;
        rows[j] = (tb[s * W + column / B] * B + column % B) * KVH * D;
      }
      scores.resize(H * length);
      for (int64_t j = 0; j < length; ++j) {
        const float* krow = kc + rows[j];
        for (int64_t h = 0; h < H; ++h) {
          const float* qh = q + (s * H + h) * D;
          const float* k = krow + (h / G) * D;
          float dot = 0.0f;
          for (int64_t d = 0; d < D; ++d) dot += qh[d] * k[d];
          scores[h * length + j] = dot * fscale;
        }
      }
      for (int64_t h = 0; h < H; ++h) {
        float* sc = scores.data() + h * length;
        float peak = sc[0];
        for (int64_t j = 1; j < length; ++j) peak = std::max(peak, sc[j]);
        float total = 0.0f;
        for (int64_t j = 0; j < length; ++j) {
          sc[j] = exp_nonpositive(sc[j] - peak);
          total += sc[j];
        }
        const float inv = length > 0 ? 1.0f / total : 0.0f;
        for (int64_t j = 0; j < length; ++j) sc[j] *= inv;
      }
      float* os = o + s * H * D;
      std::fill(os, os + H * D, 0.0f);
      for (int64_t j = 0; j < length; ++j) {
        const float* vrow = vc + rows[j];
        for (int64_t h = 0; h < H; ++h) {
          const float p = scores[h * length + j];
          const float* v = vrow + (h / G) * D;
          float* oh = os + h * D;
          for (int64_t d = 0; d < D; ++d) oh[d] += p * v[d];
        }
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "paged decode attention (CPU, fp32)");
}
