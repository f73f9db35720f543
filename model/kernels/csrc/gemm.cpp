// Linear layers on prepacked weights (see gemm.h for the layouts).
//
// Work split: output pairs are divided among the threads (at::parallel_for, torch's own
// threads); each thread walks x in blocks of kRowBlock rows, and for each of its pairs runs
// the micro-kernel over MR rows at a time, so the pair's weights stay in L1/L2 while x rows
// stream past. With M = 1 this is a matrix-vector product that reads every weight once, and
// prefetches the next pair's while it does.
#include "gemm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <utility>

#include "tile.h"
#include "vec.h"

namespace mskern {
namespace {

#if defined(__AVX512F__)
constexpr int kMaxRows = 8;  // 16 accumulators + 4 weight vectors of the 32 zmm registers
#elif defined(__AVX2__)
constexpr int kMaxRows = 2;  // 16 ymm registers: 8 accumulators, 4 weight halves
#else
constexpr int kMaxRows = 4;
#endif
constexpr int64_t kRowBlock = 256;

inline const uint16_t* bf16_ptr(const torch::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>());
}

// The kernels keep accumulators in locals: through the Acc reference, which may alias x as
// far as the compiler knows, they would be stored to memory at every step.
template <int MR>
inline void kernel_f32(const float* x, int64_t ldx, const float* w, int64_t K, Acc<MR>& acc, const char* next) {
  Vec16 a0[MR], a1[MR];
  for (int r = 0; r < MR; ++r) a0[r] = a1[r] = Vec16::zero();
  for (int64_t k = 0; k < K; ++k) {
    if (next != nullptr) {  // the next pair's same two lines
      __builtin_prefetch(next + k * 128, 0, 3);
      __builtin_prefetch(next + k * 128 + 64, 0, 3);
    }
    const Vec16 b0 = Vec16::load(w + k * 32);
    const Vec16 b1 = Vec16::load(w + k * 32 + 16);
    for (int r = 0; r < MR; ++r) {
      const Vec16 a = Vec16::broadcast(x[r * ldx + k]);
      a0[r] = Vec16::fma(a, b0, a0[r]);
      a1[r] = Vec16::fma(a, b1, a1[r]);
    }
  }
  for (int r = 0; r < MR; ++r) acc.a0[r] = a0[r], acc.a1[r] = a1[r];
}

// bf16 weights widened to fp32 in registers (exact), fp32 products.
template <int MR>
inline void kernel_bf16_widen(const float* x, int64_t ldx, const uint16_t* w, int64_t K, Acc<MR>& acc,
                              const char* next) {
  Vec16 a0[MR], a1[MR];
  for (int r = 0; r < MR; ++r) a0[r] = a1[r] = Vec16::zero();
  const int64_t full = K / 2;
  for (int64_t kk = 0; kk < full; ++kk) {
    if (next != nullptr) {
      __builtin_prefetch(next + kk * 128, 0, 3);
      __builtin_prefetch(next + kk * 128 + 64, 0, 3);
    }
    Vec16 e0, o0, e1, o1;
    Vec16::load_bf16_pairs(w + kk * 64, e0, o0);
    Vec16::load_bf16_pairs(w + kk * 64 + 32, e1, o1);
    for (int r = 0; r < MR; ++r) {
      const Vec16 xe = Vec16::broadcast(x[r * ldx + 2 * kk]);
      const Vec16 xo = Vec16::broadcast(x[r * ldx + 2 * kk + 1]);
      a0[r] = Vec16::fma(xo, o0, Vec16::fma(xe, e0, a0[r]));
      a1[r] = Vec16::fma(xo, o1, Vec16::fma(xe, e1, a1[r]));
    }
  }
  if (K & 1) {  // the last pair holds w[K-1] and a zero
    Vec16 e0, o0, e1, o1;
    Vec16::load_bf16_pairs(w + full * 64, e0, o0);
    Vec16::load_bf16_pairs(w + full * 64 + 32, e1, o1);
    for (int r = 0; r < MR; ++r) {
      const Vec16 xe = Vec16::broadcast(x[r * ldx + K - 1]);
      a0[r] = Vec16::fma(xe, e0, a0[r]);
      a1[r] = Vec16::fma(xe, e1, a1[r]);
    }
  }
  for (int r = 0; r < MR; ++r) acc.a0[r] = a0[r], acc.a1[r] = a1[r];
}

#if defined(__AVX512BF16__)
// x already rounded to bf16 pairs (one uint32 per k pair); vdpbf16ps sums both products.
template <int MR>
inline void kernel_bf16_dot(const uint32_t* xp, int64_t ldxp, const uint16_t* w, int64_t pairs, Acc<MR>& acc) {
  __m512 a0[MR], a1[MR];
  for (int r = 0; r < MR; ++r) a0[r] = a1[r] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < pairs; ++kk) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(w + kk * 64);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(w + kk * 64 + 32);
    for (int r = 0; r < MR; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(xp[r * ldxp + kk]));
      a0[r] = _mm512_dpbf16_ps(a0[r], a, b0);
      a1[r] = _mm512_dpbf16_ps(a1[r], a, b1);
    }
  }
  for (int r = 0; r < MR; ++r) acc.a0[r].v = a0[r], acc.a1[r].v = a1[r];
}
#endif

struct Operand {
  const float* x;
  int64_t ldx;
  const uint32_t* xpairs;  // bf16 pairs of x (dot path), or null
  int64_t ldxp;
};

template <int MR>
void run_tile(const Operand& a, int64_t row, const void* w, const char* next, bool bf16, Bf16Compute compute,
              int64_t K, float* out, int64_t ldo, int64_t cols, Epilogue epilogue) {
  Acc<MR> acc;
  if (!bf16) {
    kernel_f32<MR>(a.x + row * a.ldx, a.ldx, static_cast<const float*>(w), K, acc, next);
  } else if (compute == Bf16Compute::kDot && a.xpairs != nullptr) {
#if defined(__AVX512BF16__)
    kernel_bf16_dot<MR>(a.xpairs + row * a.ldxp, a.ldxp, static_cast<const uint16_t*>(w), (K + 1) / 2, acc);
#endif
  } else {
    kernel_bf16_widen<MR>(a.x + row * a.ldx, a.ldx, static_cast<const uint16_t*>(w), K, acc, next);
  }
  write_tile<MR>(acc, out + row * ldo, ldo, cols, epilogue);
}

using TileFn = void (*)(const Operand&, int64_t, const void*, const char*, bool, Bf16Compute, int64_t, float*, int64_t,
                        int64_t, Epilogue);

template <int... Rows>
constexpr auto make_table(std::integer_sequence<int, Rows...>) {
  return std::array<TileFn, sizeof...(Rows)>{&run_tile<Rows + 1>...};
}
constexpr auto kTiles = make_table(std::make_integer_sequence<int, kMaxRows>{});

}  // namespace

void check_gather(const torch::Tensor& ids, const torch::Tensor& out, int64_t n, int64_t k, bool gated) {
  TORCH_CHECK(!gated, "gather_rows: not for gated weights");
  TORCH_CHECK(ids.scalar_type() == torch::kInt64 && ids.is_contiguous(), "gather_rows: ids must be int64");
  TORCH_CHECK(out.scalar_type() == torch::kFloat32 && out.dim() == 2 && out.size(0) == ids.numel() &&
                  out.size(1) == k && out.stride(1) == 1,
              "gather_rows: out must be (len(ids), K) float32");
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t t = 0; t < ids.numel(); ++t) {
    TORCH_CHECK(id[t] >= 0 && id[t] < n, "gather_rows: id ", id[t], " outside [0, ", n, ")");
  }
}

bool has_bf16_dot() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

PackedLinear::PackedLinear(const torch::Tensor& weight, bool gated, bool bf16, int64_t bf16_compute)
    : gated_(gated), bf16_(bf16) {
  TORCH_CHECK(weight.dim() == 2, "PackedLinear: weight must be (N, K)");
  n_ = weight.size(0);
  k_ = weight.size(1);
  TORCH_CHECK(!gated || n_ % 2 == 0, "PackedLinear: a gated weight stacks gate and up rows, N must be even");
  set_bf16_compute(bf16_compute);
  pairs_ = gated ? (n_ / 2 + 15) / 16 : (n_ + 31) / 32;
  kp_ = bf16 ? (k_ + 1) / 2 * 2 : k_;
  auto opts = weight.options().device(torch::kCPU);
  data_ = bf16 ? torch::zeros({pairs_, kp_ / 2, 2, 16, 2}, opts.dtype(torch::kBFloat16))
               : torch::zeros({pairs_, kp_, 32}, opts.dtype(torch::kFloat32));
  const auto source = weight.to(torch::kFloat32).contiguous();
  const float* src = source.data_ptr<float>();
  const int64_t n = n_, k = k_, kp = kp_;
  float* dst32 = bf16 ? nullptr : data_.data_ptr<float>();
  uint16_t* dst16 = bf16 ? reinterpret_cast<uint16_t*>(data_.data_ptr<at::BFloat16>()) : nullptr;
  at::parallel_for(0, pairs_, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      for (int64_t j = 0; j < 2; ++j) {
        for (int64_t lane = 0; lane < 16; ++lane) {
          const int64_t row = packed_row(gated, n, q, j, lane);
          if (row < 0) continue;
          const float* w = src + row * k;
          for (int64_t kk = 0; kk < k; ++kk) {
            if (bf16) {
              dst16[(((q * (kp / 2) + kk / 2) * 2 + j) * 16 + lane) * 2 + (kk & 1)] = float_to_bf16(w[kk]);
            } else {
              dst32[(q * kp + kk) * 32 + 16 * j + lane] = w[kk];
            }
          }
        }
      }
    }
  });
}

void PackedLinear::set_bf16_compute(int64_t mode) {
  TORCH_CHECK(mode == 0 || mode == 1, "bf16_compute must be 0 (widen) or 1 (dot), got ", mode);
  TORCH_CHECK(mode == 0 || has_bf16_dot(), "bf16_compute 1 (vdpbf16ps) needs a build with AVX512-BF16");
  compute_ = static_cast<Bf16Compute>(mode);
}

torch::Tensor PackedLinear::unpack() const {
  auto w = torch::zeros({n_, k_}, torch::kFloat32);
  float* dst = w.data_ptr<float>();
  for (int64_t q = 0; q < pairs_; ++q) {
    for (int64_t j = 0; j < 2; ++j) {
      for (int64_t lane = 0; lane < 16; ++lane) {
        const int64_t row = packed_row(gated_, n_, q, j, lane);
        if (row < 0) continue;
        for (int64_t kk = 0; kk < k_; ++kk) {
          dst[row * k_ + kk] =
              bf16_ ? bf16_to_float(bf16_ptr(data_)[(((q * (kp_ / 2) + kk / 2) * 2 + j) * 16 + lane) * 2 + (kk & 1)])
                    : data_.data_ptr<float>()[(q * kp_ + kk) * 32 + 16 * j + lane];
        }
      }
    }
  }
  return w;
}

void PackedLinear::gather_rows(const torch::Tensor& ids, torch::Tensor& out) const {
  check_gather(ids, out, n_, k_, gated_);
  const int64_t* id = ids.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  const int64_t ldo = out.stride(0);
  at::parallel_for(0, ids.numel(), 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t row = id[t], q = row / 32, j = (row % 32) / 16, lane = row % 16;
      float* dst = o + t * ldo;
      if (bf16_) {
        const uint16_t* src = bf16_ptr(data_) + ((q * (kp_ / 2) * 2 + j) * 16 + lane) * 2;
        for (int64_t kk = 0; kk < k_; ++kk) dst[kk] = bf16_to_float(src[(kk / 2) * 64 + (kk & 1)]);
      } else {
        const float* src = data_.data_ptr<float>() + q * kp_ * 32 + 16 * j + lane;
        for (int64_t kk = 0; kk < k_; ++kk) dst[kk] = src[kk * 32];
      }
    }
  });
}

void PackedLinear::forward(const torch::Tensor& x, torch::Tensor& out, int64_t epilogue_code) const {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && out.scalar_type() == torch::kFloat32,
              "PackedLinear: x and out must be float32");
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2, "PackedLinear: x and out must be 2-d");
  TORCH_CHECK(x.size(1) == k_, "PackedLinear: x has ", x.size(1), " features, expected ", k_);
  TORCH_CHECK(out.size(0) == x.size(0) && out.size(1) == out_features(), "PackedLinear: out must be (",
              x.size(0), ", ", out_features(), ")");
  TORCH_CHECK(x.stride(1) == 1 && out.stride(1) == 1, "PackedLinear: rows must be contiguous");
  TORCH_CHECK(epilogue_code >= 0 && epilogue_code <= 2, "PackedLinear: epilogue must be 0, 1 or 2");
  const auto epilogue = static_cast<Epilogue>(epilogue_code);
  TORCH_CHECK((epilogue == Epilogue::kSiluMul) == gated_, "PackedLinear: the silu-mul epilogue is for gated weights");
  const int64_t M = x.size(0);
  if (M == 0) return;
  Operand a{x.data_ptr<float>(), x.stride(0), nullptr, 0};
  torch::Tensor xpairs;
  if (bf16_ && compute_ == Bf16Compute::kDot) {  // round x to bf16 pairs once for all tiles
    const int64_t np = kp_ / 2;
    xpairs = torch::empty({M, np}, torch::kInt32);
    auto* dst = reinterpret_cast<uint32_t*>(xpairs.data_ptr<int32_t>());
    for (int64_t m = 0; m < M; ++m) {
      const float* row = a.x + m * a.ldx;
      for (int64_t p = 0; p < np; ++p) {
        const uint32_t lo = float_to_bf16(row[2 * p]);
        const uint32_t hi = 2 * p + 1 < k_ ? float_to_bf16(row[2 * p + 1]) : 0u;
        dst[m * np + p] = lo | (hi << 16);
      }
    }
    a.xpairs = dst;
    a.ldxp = np;
  }
  float* o = out.data_ptr<float>();
  const int64_t ldo = out.stride(0);
  const int64_t pair_elems = bf16_ ? kp_ * 32 : kp_ * 32;
  const char* base = bf16_ ? reinterpret_cast<const char*>(bf16_ptr(data_))
                           : reinterpret_cast<const char*>(data_.data_ptr<float>());
  const int64_t pair_bytes = pair_elems * (bf16_ ? 2 : 4);
  const int64_t width = gated_ ? 16 : 32, limit = out_features();
  at::parallel_for(0, pairs_, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t m0 = 0; m0 < M; m0 += kRowBlock) {
      const int64_t m1 = std::min(M, m0 + kRowBlock);
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t col0 = q * width;
        const int64_t cols = std::min(width, limit - col0);
        const void* w = base + q * pair_bytes;
        for (int64_t m = m0; m < m1; m += kMaxRows) {
          const int64_t rows = std::min<int64_t>(kMaxRows, m1 - m);
          // The first tile of a pair streams the next pair's weights into cache at its own pace:
          // weights come from DRAM at every step, and without it the first tile of each pair
          // stalls on them (decode at batch 64: -10% step time, batch 1: -13%).
          const char* next = (m == m0 && q + 1 < q1) ? base + (q + 1) * pair_bytes : nullptr;
          kTiles[rows - 1](a, m, w, next, bf16_, compute_, k_, o + col0, ldo, cols, epilogue);
        }
      }
    }
  });
}

torch::Tensor PackedLinear::call(const torch::Tensor& x) const {
  auto out = torch::empty({x.size(0), out_features()}, x.options());
  forward(x, out, gated_ ? 2 : 0);
  return out;
}

}  // namespace mskern
