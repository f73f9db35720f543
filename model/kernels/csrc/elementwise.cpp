// Element-wise work of a decoder layer as single passes over the rows: RMSNorm, and rotary
// embedding of q and k fused with writing k and v into their paged-cache slots.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>

#include "vec.h"

namespace mskern {

// out[t] = weight * x[t] / sqrt(mean(x[t]^2) + eps), fp32 (Hugging Face's RMSNorm in fp32).
void rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps, torch::Tensor& out) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && out.scalar_type() == torch::kFloat32 &&
                  weight.scalar_type() == torch::kFloat32,
              "rms_norm: float32 tensors only");
  TORCH_CHECK(x.dim() == 2 && out.sizes() == x.sizes() && x.stride(1) == 1 && out.stride(1) == 1,
              "rms_norm: x and out must be (T, H) with contiguous rows");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(1), "rms_norm: weight must be (H,)");
  const int64_t T = x.size(0), H = x.size(1), ldx = x.stride(0), ldo = out.stride(0);
  const float* xp = x.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const float feps = static_cast<float>(eps);
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* row = xp + t * ldx;
      float* dst = o + t * ldo;
      int64_t h = 0;
      Vec16 acc = Vec16::zero();
      for (; h + 16 <= H; h += 16) {
        const Vec16 v = Vec16::load(row + h);
        acc = Vec16::fma(v, v, acc);
      }
      float sum = acc.sum();
      for (; h < H; ++h) sum += row[h] * row[h];
      const float inv = 1.0f / std::sqrt(sum / static_cast<float>(H) + feps);
      const Vec16 vinv = Vec16::broadcast(inv);
      for (h = 0; h + 16 <= H; h += 16) (Vec16::load(w + h) * (Vec16::load(row + h) * vinv)).store(dst + h);
      for (; h < H; ++h) dst[h] = w[h] * (row[h] * inv);
    }
  });
}

namespace {

// x (D,) rotated in place by "rotate half": x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin.
inline void rotate(float* x, const float* cos, const float* sin, int64_t half) {
  int64_t i = 0;
  for (; i + 16 <= half; i += 16) {
    const Vec16 a = Vec16::load(x + i), b = Vec16::load(x + half + i);
    const Vec16 c = Vec16::load(cos + i), s = Vec16::load(sin + i);
    (a * c - b * s).store(x + i);
    (b * c + a * s).store(x + half + i);
  }
  for (; i < half; ++i) {
    const float a = x[i], b = x[half + i];
    x[i] = a * cos[i] - b * sin[i];
    x[half + i] = b * cos[i] + a * sin[i];
  }
}

inline void put(float v, float* dst) { *dst = v; }
inline void put(float v, uint16_t* dst) { *dst = float_to_bf16(v); }

template <typename T>
inline void store_row(const float* src, T* dst, int64_t D) {
  for (int64_t d = 0; d < D; ++d) put(src[d], dst + d);
}

// Cache layout of the cpu backend: keys (blocks, KVH, D, B), values (blocks, KVH, B, D).
template <typename T>
void rotary_cache_impl(float* qkv, int64_t ld, const int64_t* pos, const float* cos, const float* sin, int64_t half,
                       const int64_t* slots, T* kc, T* vc, int64_t T_, int64_t H, int64_t KVH, int64_t D, int64_t B) {
  at::parallel_for(0, T_, 8, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* row = qkv + t * ld;
      const float* c = cos + pos[t] * half;
      const float* s = sin + pos[t] * half;
      for (int64_t h = 0; h < H + KVH; ++h) rotate(row + h * D, c, s, half);  // q heads, then k heads
      const int64_t slot = slots[t];
      if (slot < 0) continue;
      const int64_t block = slot / B, offset = slot % B;
      for (int64_t h = 0; h < KVH; ++h) {
        const float* k = row + (H + h) * D;
        T* kdst = kc + (block * KVH + h) * D * B + offset;
        for (int64_t d = 0; d < D; ++d) put(k[d], kdst + d * B);
        store_row<T>(row + (H + KVH + h) * D, vc + ((block * KVH + h) * B + offset) * D, D);
      }
    }
  });
}

}  // namespace

// qkv: (T, (H + 2 KVH) D) fp32, q and k rotated in place; k and v then written to the cache rows
// slots[t] (block * B + offset) of key_cache (blocks, KVH, D, B) and value_cache (blocks, KVH, B, D),
// fp32 or bf16. cos, sin: (positions, D/2).
void rotary_cache(torch::Tensor& qkv, const torch::Tensor& positions, const torch::Tensor& cos,
                  const torch::Tensor& sin, const torch::Tensor& slots, torch::Tensor& key_cache,
                  torch::Tensor& value_cache, int64_t num_heads) {
  TORCH_CHECK(qkv.scalar_type() == torch::kFloat32 && qkv.stride(1) == 1, "rotary_cache: qkv must be float32 rows");
  TORCH_CHECK(cos.scalar_type() == torch::kFloat32 && cos.is_contiguous() && sin.is_contiguous(),
              "rotary_cache: cos/sin must be contiguous float32");
  TORCH_CHECK(positions.scalar_type() == torch::kInt64 && slots.scalar_type() == torch::kInt64 &&
                  positions.is_contiguous() && slots.is_contiguous(),
              "rotary_cache: positions and slots must be int64");
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(), "rotary_cache: caches must be contiguous");
  // keys (blocks, KVH, D, B), values (blocks, KVH, B, D)
  const int64_t KVH = key_cache.size(1), D = key_cache.size(2), B = key_cache.size(3), T = qkv.size(0);
  TORCH_CHECK(qkv.size(1) == (num_heads + 2 * KVH) * D, "rotary_cache: qkv width does not match the heads");
  TORCH_CHECK(cos.size(1) * 2 == D, "rotary_cache: cos/sin must have head_dim / 2 columns");
  TORCH_CHECK(positions.numel() == T && slots.numel() == T, "rotary_cache: one position and slot per row");
  if (T == 0) return;
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t num_slots = key_cache.size(0) * B;
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(pos[t] >= 0 && pos[t] < cos.size(0), "rotary_cache: position ", pos[t], " out of range");
    TORCH_CHECK(slot[t] < num_slots, "rotary_cache: slot ", slot[t], " out of range");
  }
  if (key_cache.scalar_type() == torch::kFloat32) {
    rotary_cache_impl<float>(qkv.data_ptr<float>(), qkv.stride(0), positions.data_ptr<int64_t>(),
                             cos.data_ptr<float>(), sin.data_ptr<float>(), D / 2, slots.data_ptr<int64_t>(),
                             key_cache.data_ptr<float>(), value_cache.data_ptr<float>(), T, num_heads, KVH, D, B);
  } else {
    TORCH_CHECK(key_cache.scalar_type() == torch::kBFloat16, "rotary_cache: cache must be float32 or bfloat16");
    rotary_cache_impl<uint16_t>(qkv.data_ptr<float>(), qkv.stride(0), positions.data_ptr<int64_t>(),
                                cos.data_ptr<float>(), sin.data_ptr<float>(), D / 2, slots.data_ptr<int64_t>(),
                                reinterpret_cast<uint16_t*>(key_cache.data_ptr<at::BFloat16>()),
                                reinterpret_cast<uint16_t*>(value_cache.data_ptr<at::BFloat16>()), T, num_heads, KVH,
                                D, B);
  }
}

}  // namespace mskern
