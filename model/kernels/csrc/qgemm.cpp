// Linear layers on quantized weights (see qgemm.h for the format and the layout).
//
// Work split as for PackedLinear: output pairs divided among torch's threads. Few rows (decode):
// the q-kernel reads each pair's quantized groups once per MR rows and prefetches the next
// pair's; its group sums run in separate even/odd accumulators so the FMA chains never wait on
// each other. Many rows (prefill): per block of rows, each pair is dequantized into an fp32 panel
// in L2 and the fp32 micro-kernel of gemm.cpp runs over the block's rows.
#include "qgemm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <type_traits>
#include <utility>
#include <vector>

#include "tile.h"
#include "vec.h"

namespace mskern {
namespace {

// Tiles: MR rows x P pairs. Few rows (the q-kernel): P = 2 for one row, so four independent
// FMA chains hide the FMA latency; many rows (panels): MR = 6, P = 1.
#if defined(__AVX512F__)
constexpr int kQRows = 4;      // q-kernel rows per tile (MR = 1 runs two pairs)
constexpr int kPanelRows = 8;  // 16 group sums + 4 loaded vectors of the 32 zmm (totals in memory)
#elif defined(__AVX2__)
constexpr int kQRows = 1;
constexpr int kPanelRows = 1;
#else
constexpr int kQRows = 2;
constexpr int kPanelRows = 2;
#endif
constexpr int64_t kSmallRows = 8;  // up to here the q-kernel; above, panels (measured)
constexpr int64_t kRowBlock = 256;

struct Layout {
  int64_t K, group, groups, value_bytes, scale_bytes, group_bytes;
  bool has_min, offset8, f16;
};

inline Vec16 load_scales(const uint8_t* p, bool f16) {
  return f16 ? Vec16::load_f16(reinterpret_cast<const uint16_t*>(p)) : Vec16::load(reinterpret_cast<const float*>(p));
}

// Where a tile's q values come from: the packed bytes (converted in registers) or a panel of
// them already converted to fp32 ([K][32], by QuantLinear::expand_pair). Both give the same
// floats, and the tile does the same arithmetic on them (per row and column: one sequential
// FMA chain over each group's inputs, then scale and min), so a row's result never depends on
// which path, or which other rows, it was computed with: results are batch-invariant.
template <int BITS>
struct PackedValues {
  // inputs i and i + 1 (i even) of the group at v: columns 0..15 and 16..31
  void load(const uint8_t* v, int64_t, int64_t i, bool both, Vec16& l0, Vec16& l1, Vec16& h0, Vec16& h1) const {
    if constexpr (BITS == 4) {
      Vec16::load_u4(v + i * 16, l0, h0);
      Vec16::load_u4(v + i * 16 + 16, l1, h1);
    } else {
      const auto* q = reinterpret_cast<const int8_t*>(v) + i * 32;
      l0 = Vec16::load_s8(q), l1 = Vec16::load_s8(q + 16);
      if (both) h0 = Vec16::load_s8(q + 32), h1 = Vec16::load_s8(q + 48);
    }
  }
};

struct PanelValues {
  const float* panel;  // [K][32] of one pair
  void load(const uint8_t*, int64_t k0, int64_t i, bool both, Vec16& l0, Vec16& l1, Vec16& h0, Vec16& h1) const {
    const float* p = panel + (k0 + i) * 32;
    l0 = Vec16::load(p), l1 = Vec16::load(p + 16);
    if (both) h0 = Vec16::load(p + 32), h1 = Vec16::load(p + 48);
  }
};

// x: MR rows (stride ldx); xsum: per row, the sum of x over each group (stride ldxs), or null;
// w[p]: pair p's packed groups (scales, mins, and the values unless the source is a panel);
// out[p]: where pair p's columns go (cols[p] of them).
template <int MR, int P, class Source>
void q_tile(const float* x, int64_t ldx, const float* xsum, int64_t ldxs, const uint8_t* const* w, const Layout& L,
            const Source* src, const uint8_t* next, float* const* out, int64_t ldo, const int64_t* cols,
            Epilogue epilogue) {
  // The totals live in memory (touched once per group), leaving the registers to the group sums.
  alignas(64) float a[MR][P][2][16] = {};
  for (int64_t g = 0; g < L.groups; ++g) {
    if (next != nullptr) {  // into L2 only (prefetcht2): read once, and L1's fill buffers stay free
      for (int64_t line = 0; line < L.group_bytes; line += 64) __builtin_prefetch(next + g * L.group_bytes + line, 0, 1);
    }
    const int64_t k0 = g * L.group, kn = std::min(L.group, L.K - k0);
    const float* xg = x + k0;
    Vec16 b[MR][P][2];  // the group's sums
    for (int r = 0; r < MR; ++r)
      for (int p = 0; p < P; ++p) b[r][p][0] = b[r][p][1] = Vec16::zero();
    const float* xr[MR];
    for (int r = 0; r < MR; ++r) xr[r] = xg + r * ldx;
    const int64_t full = kn & ~int64_t{1};
    for (int64_t i = 0; i < full; i += 2) {  // inputs i, i + 1: the same order as one input at a time
      Vec16 l[P][2], h[P][2];
      for (int p = 0; p < P; ++p) src[p].load(w[p] + g * L.group_bytes, k0, i, true, l[p][0], l[p][1], h[p][0], h[p][1]);
      for (int r = 0; r < MR; ++r) {
        const Vec16 xe = Vec16::broadcast(xr[r][i]);
        for (int p = 0; p < P; ++p) {
          b[r][p][0] = Vec16::fma(xe, l[p][0], b[r][p][0]);
          b[r][p][1] = Vec16::fma(xe, l[p][1], b[r][p][1]);
        }
      }
      for (int r = 0; r < MR; ++r) {
        const Vec16 xo = Vec16::broadcast(xr[r][i + 1]);
        for (int p = 0; p < P; ++p) {
          b[r][p][0] = Vec16::fma(xo, h[p][0], b[r][p][0]);
          b[r][p][1] = Vec16::fma(xo, h[p][1], b[r][p][1]);
        }
      }
    }
    if (full < kn) {  // an odd last input
      Vec16 l[P][2], h[P][2];
      for (int p = 0; p < P; ++p) src[p].load(w[p] + g * L.group_bytes, k0, full, false, l[p][0], l[p][1], h[p][0], h[p][1]);
      for (int r = 0; r < MR; ++r) {
        const Vec16 xe = Vec16::broadcast(xr[r][full]);
        for (int p = 0; p < P; ++p) {
          b[r][p][0] = Vec16::fma(xe, l[p][0], b[r][p][0]);
          b[r][p][1] = Vec16::fma(xe, l[p][1], b[r][p][1]);
        }
      }
    }
    for (int p = 0; p < P; ++p) {
      const uint8_t* s = w[p] + g * L.group_bytes + L.value_bytes;
      const Vec16 s0 = load_scales(s, L.f16), s1 = load_scales(s + L.scale_bytes / 2, L.f16);
      const bool mins = L.has_min || L.offset8;
      Vec16 m0 = Vec16::zero(), m1 = Vec16::zero();
      if (mins) {
        const uint8_t* m = s + L.scale_bytes;
        const Vec16 eight = Vec16::broadcast(-8.0f);
        m0 = L.has_min ? load_scales(m, L.f16) : s0 * eight;
        m1 = L.has_min ? load_scales(m + L.scale_bytes / 2, L.f16) : s1 * eight;
      }
      for (int r = 0; r < MR; ++r) {
        Vec16 t0 = Vec16::fma(b[r][p][0], s0, Vec16::load(a[r][p][0]));
        Vec16 t1 = Vec16::fma(b[r][p][1], s1, Vec16::load(a[r][p][1]));
        if (mins) {
          const Vec16 xs = Vec16::broadcast(xsum[r * ldxs + g]);
          t0 = Vec16::fma(xs, m0, t0);
          t1 = Vec16::fma(xs, m1, t1);
        }
        t0.store(a[r][p][0]);
        t1.store(a[r][p][1]);
      }
    }
  }
  for (int p = 0; p < P; ++p) {
    Acc<MR> acc;
    for (int r = 0; r < MR; ++r) acc.a0[r] = Vec16::load(a[r][p][0]), acc.a1[r] = Vec16::load(a[r][p][1]);
    write_tile<MR>(acc, out[p], ldo, cols[p], epilogue);
  }
}

template <class Source>
using QTileFn = void (*)(const float*, int64_t, const float*, int64_t, const uint8_t* const*, const Layout&,
                         const Source*, const uint8_t*, float* const*, int64_t, const int64_t*, Epilogue);

template <class Source, int P, int... Rows>
constexpr auto make_q_table(std::integer_sequence<int, Rows...>) {
  return std::array<QTileFn<Source>, sizeof...(Rows)>{&q_tile<Rows + 1, P, Source>...};
}
constexpr auto kQ4Tiles = make_q_table<PackedValues<4>, 1>(std::make_integer_sequence<int, kQRows>{});
constexpr auto kQ8Tiles = make_q_table<PackedValues<8>, 1>(std::make_integer_sequence<int, kQRows>{});
constexpr auto kPanelTiles = make_q_table<PanelValues, 1>(std::make_integer_sequence<int, kPanelRows>{});

}  // namespace

QuantLinear::QuantLinear(int64_t n, int64_t k, int64_t group, int64_t bits, bool has_min, bool offset8, bool fp16,
                         bool gated)
    : n_(n), k_(k), group_(group), bits_(bits), gated_(gated), has_min_(has_min), offset8_(offset8), f16_(fp16) {
  TORCH_CHECK(!(has_min && offset8), "QuantLinear: stored mins or offset8, not both");
  TORCH_CHECK(bits == 4 || bits == 8, "QuantLinear: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(n > 0 && k > 0, "QuantLinear: empty shape");
  TORCH_CHECK(group > 0 && (bits == 8 || group % 2 == 0), "QuantLinear: group must be positive (even for 4 bits)");
  TORCH_CHECK(!gated || n % 2 == 0, "QuantLinear: a gated weight stacks gate and up rows, N must be even");
  groups_ = (k + group - 1) / group;
  pairs_ = gated ? (n / 2 + 15) / 16 : (n + 31) / 32;
  value_bytes_ = bits == 4 ? group / 2 * 32 : group * 32;
  scale_bytes_ = 32 * (fp16 ? 2 : 4);
  group_bytes_ = (value_bytes_ + scale_bytes_ * (has_min ? 2 : 1) + 63) / 64 * 64;
  data_ = torch::zeros({pairs_ * groups_ * group_bytes_}, torch::kUInt8);
}

void QuantLinear::set_rows(int64_t start, const torch::Tensor& values, const torch::Tensor& scales,
                           const torch::Tensor& mins) {
  TORCH_CHECK(values.dim() == 2 && values.size(1) == k_, "set_rows: values must be (rows, ", k_, ")");
  TORCH_CHECK(values.scalar_type() == torch::kUInt8 || values.scalar_type() == torch::kInt8,
              "set_rows: values must be uint8 or int8");
  const int64_t rows = values.size(0);
  TORCH_CHECK(start >= 0 && start + rows <= n_, "set_rows: rows [", start, ", ", start + rows, ") outside [0, ", n_,
              ")");
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == rows && scales.size(1) == groups_, "set_rows: scales must be (",
              rows, ", ", groups_, ")");
  TORCH_CHECK(mins.numel() == 0 || mins.sizes() == scales.sizes(), "set_rows: mins must be empty or like scales");
  if (!has_min_ && mins.numel() > 0) {
    const auto implied = offset8_ ? scales.to(torch::kFloat32) * -8.0 : torch::zeros_like(scales, torch::kFloat32);
    TORCH_CHECK(mins.to(torch::kFloat32).equal(implied), "set_rows: mins other than ",
                offset8_ ? "-8 scale" : "zero", " in a layer without stored mins");
  }
  if (bits_ == 4) {
    TORCH_CHECK(values.scalar_type() == torch::kUInt8 && (rows == 0 || values.max().item<int>() <= 15),
                "set_rows: 4-bit values must be uint8 in 0..15");
  } else {
    TORCH_CHECK(values.scalar_type() == torch::kInt8 || rows == 0 || values.max().item<int>() <= 127,
                "set_rows: 8-bit values must fit int8");
  }
  const auto s32 = scales.to(torch::kFloat32).contiguous();
  const auto m32 = mins.numel() ? mins.to(torch::kFloat32).contiguous() : torch::zeros_like(s32);
  if (f16_) {
    const auto exact = [](const torch::Tensor& t) {
      return t.isfinite().all().item<bool>() && t.to(torch::kHalf).to(torch::kFloat32).equal(t);
    };
    TORCH_CHECK(exact(s32) && exact(m32), "set_rows: a scale or min is not exactly an fp16 in an fp16 layer");
  }
  const auto s16 = s32.to(torch::kHalf), m16 = m32.to(torch::kHalf);
  const auto v = values.contiguous();
  const auto* vsrc = static_cast<const uint8_t*>(v.data_ptr());
  uint8_t* base = data_.data_ptr<uint8_t>();
  // Pairs holding these rows (gated: a row's pair follows from its column within gate or up).
  at::parallel_for(0, pairs_, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      for (int64_t c = 0; c < 32; ++c) {
        const int64_t row = packed_row(gated_, n_, q, c / 16, c % 16);
        if (row < start || row >= start + rows) continue;
        const int64_t r = row - start;
        for (int64_t g = 0; g < groups_; ++g) {
          uint8_t* dst = base + (q * groups_ + g) * group_bytes_;
          for (int64_t i = 0; i < group_ && g * group_ + i < k_; ++i) {
            const uint8_t value = vsrc[r * k_ + g * group_ + i];
            if (bits_ == 4) {
              uint8_t& byte = dst[i / 2 * 32 + c];
              byte = static_cast<uint8_t>((byte & (0xF0 >> (4 * (i & 1)))) | (value << (4 * (i & 1))));
            } else {
              dst[i * 32 + c] = value;
            }
          }
          for (int which = 0; which < (has_min_ ? 2 : 1); ++which) {
            uint8_t* slot = dst + value_bytes_ + which * scale_bytes_;
            const int64_t index = r * groups_ + g;
            if (f16_) {
              reinterpret_cast<at::Half*>(slot)[c] = (which == 0 ? s16 : m16).data_ptr<at::Half>()[index];
            } else {
              reinterpret_cast<float*>(slot)[c] = (which == 0 ? s32 : m32).data_ptr<float>()[index];
            }
          }
        }
      }
    }
  });
}

const uint8_t* QuantLinear::group_ptr(int64_t pair, int64_t g) const {
  return data_.data_ptr<uint8_t>() + (pair * groups_ + g) * group_bytes_;
}

float QuantLinear::scale_of(const uint8_t* group, int64_t c, bool min) const {
  const uint8_t* slot = group + value_bytes_ + (min ? scale_bytes_ : 0);
  return f16_ ? f16_to_float(reinterpret_cast<const uint16_t*>(slot)[c]) : reinterpret_cast<const float*>(slot)[c];
}

void QuantLinear::expand_pair(int64_t pair, float* panel, bool scaled) const {
  for (int64_t g = 0; g < groups_; ++g) {
    const uint8_t* v = group_ptr(pair, g);
    const uint8_t* s = v + value_bytes_;
    Vec16 s0 = Vec16::broadcast(1.0f), s1 = s0, m0 = Vec16::zero(), m1 = m0;
    if (scaled) {
      s0 = load_scales(s, f16_), s1 = load_scales(s + scale_bytes_ / 2, f16_);
      const Vec16 eight = Vec16::broadcast(offset8_ ? -8.0f : 0.0f);
      m0 = has_min_ ? load_scales(s + scale_bytes_, f16_) : s0 * eight;
      m1 = has_min_ ? load_scales(s + scale_bytes_ + scale_bytes_ / 2, f16_) : s1 * eight;
    }
    const int64_t k0 = g * group_, kn = std::min(group_, k_ - k0);
    for (int64_t i = 0; i < kn; i += 2) {
      const bool both = i + 1 < kn;
      Vec16 l0, l1, h0, h1;
      if (bits_ == 4) {
        PackedValues<4>{}.load(v, k0, i, both, l0, l1, h0, h1);
      } else {
        PackedValues<8>{}.load(v, k0, i, both, l0, l1, h0, h1);
      }
      float* p = panel + (k0 + i) * 32;
      Vec16::fma(l0, s0, m0).store(p);
      Vec16::fma(l1, s1, m1).store(p + 16);
      if (both) {
        Vec16::fma(h0, s0, m0).store(p + 32);
        Vec16::fma(h1, s1, m1).store(p + 48);
      }
    }
  }
}

void QuantLinear::forward(const torch::Tensor& x, torch::Tensor& out, int64_t epilogue_code) const {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && out.scalar_type() == torch::kFloat32,
              "QuantLinear: x and out must be float32");
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2, "QuantLinear: x and out must be 2-d");
  TORCH_CHECK(x.size(1) == k_, "QuantLinear: x has ", x.size(1), " features, expected ", k_);
  TORCH_CHECK(out.size(0) == x.size(0) && out.size(1) == out_features(), "QuantLinear: out must be (", x.size(0),
              ", ", out_features(), ")");
  TORCH_CHECK(x.stride(1) == 1 && out.stride(1) == 1, "QuantLinear: rows must be contiguous");
  TORCH_CHECK(epilogue_code >= 0 && epilogue_code <= 2, "QuantLinear: epilogue must be 0, 1 or 2");
  const auto epilogue = static_cast<Epilogue>(epilogue_code);
  TORCH_CHECK((epilogue == Epilogue::kSiluMul) == gated_, "QuantLinear: the silu-mul epilogue is for gated weights");
  const int64_t M = x.size(0);
  if (M == 0) return;
  const float* xp = x.data_ptr<float>();
  const int64_t ldx = x.stride(0), ldo = out.stride(0);
  float* o = out.data_ptr<float>();
  const int64_t width = gated_ ? 16 : 32, limit = out_features();
  const Layout L{k_, group_, groups_, value_bytes_, scale_bytes_, group_bytes_, has_min_, offset8_, f16_};
  const bool sums = has_min_ || offset8_;
  std::vector<float> xsum(sums ? M * groups_ : 0);
  at::parallel_for(0, sums ? M : 0, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t m = r0; m < r1; ++m) {
      for (int64_t g = 0; g < groups_; ++g) {
        float sum = 0.0f;
        for (int64_t k = g * group_; k < std::min(k_, (g + 1) * group_); ++k) sum += xp[m * ldx + k];
        xsum[m * groups_ + g] = sum;
      }
    }
  });
  if (M <= kSmallRows) {
    at::parallel_for(0, pairs_, 1, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1;) {
        // one row: two pairs per tile (four FMA chains); more rows: one pair, MR rows
        const int npairs = (M == 1 && q + 1 < q1) ? 2 : 1;
        const uint8_t* w[2] = {group_ptr(q, 0), npairs == 2 ? group_ptr(q + 1, 0) : nullptr};
        const uint8_t* next = q + npairs < q1 ? group_ptr(q + npairs, 0) : nullptr;
        int64_t cols[2];
        float* dst[2];
        for (int p = 0; p < npairs; ++p) {
          const int64_t col0 = (q + p) * width;
          cols[p] = std::min(width, limit - col0);
          dst[p] = o + col0;
        }
        for (int64_t m = 0; m < M; m += kQRows) {
          const int64_t rows = std::min<int64_t>(kQRows, M - m);
          const float* xs = sums ? xsum.data() + m * groups_ : nullptr;
          float* at_row[2] = {dst[0] + m * ldo, npairs == 2 ? dst[1] + m * ldo : nullptr};
          const uint8_t* prefetch = m == 0 ? next : nullptr;
          if (bits_ == 4) {
            const PackedValues<4> src[2];
            if (npairs == 2) {
              q_tile<1, 2>(xp, ldx, xs, groups_, w, L, src, prefetch, at_row, ldo, cols, epilogue);
            } else {
              kQ4Tiles[rows - 1](xp + m * ldx, ldx, xs, groups_, w, L, src, prefetch, at_row, ldo, cols, epilogue);
            }
          } else {
            const PackedValues<8> src[2];
            if (npairs == 2) {
              q_tile<1, 2>(xp, ldx, xs, groups_, w, L, src, prefetch, at_row, ldo, cols, epilogue);
            } else {
              kQ8Tiles[rows - 1](xp + m * ldx, ldx, xs, groups_, w, L, src, prefetch, at_row, ldo, cols, epilogue);
            }
          }
        }
        q += npairs;
      }
    });
    return;
  }
  at::parallel_for(0, pairs_, 1, [&](int64_t q0, int64_t q1) {
    std::vector<float> panel(static_cast<size_t>(k_) * 32);
    const PanelValues src[1] = {PanelValues{panel.data()}};
    for (int64_t m0 = 0; m0 < M; m0 += kRowBlock) {
      const int64_t m1 = std::min(M, m0 + kRowBlock);
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t col0 = q * width;
        const int64_t cols[1] = {std::min(width, limit - col0)};
        const uint8_t* w[1] = {group_ptr(q, 0)};
        expand_pair(q, panel.data(), false);
        for (int64_t m = m0; m < m1; m += kPanelRows) {
          const int64_t rows = std::min<int64_t>(kPanelRows, m1 - m);
          float* dst[1] = {o + m * ldo + col0};
          kPanelTiles[rows - 1](xp + m * ldx, ldx, sums ? xsum.data() + m * groups_ : nullptr, groups_, w, L, src,
                                nullptr, dst, ldo, cols, epilogue);
        }
      }
    }
  });
}

torch::Tensor QuantLinear::call(const torch::Tensor& x) const {
  auto out = torch::empty({x.size(0), out_features()}, x.options());
  forward(x, out, gated_ ? 2 : 0);
  return out;
}

torch::Tensor QuantLinear::unpack() const {
  auto w = torch::zeros({n_, k_}, torch::kFloat32);
  float* dst = w.data_ptr<float>();
  std::vector<float> panel(static_cast<size_t>(k_) * 32);
  for (int64_t q = 0; q < pairs_; ++q) {
    expand_pair(q, panel.data(), true);
    for (int64_t c = 0; c < 32; ++c) {
      const int64_t row = packed_row(gated_, n_, q, c / 16, c % 16);
      if (row < 0) continue;
      for (int64_t k = 0; k < k_; ++k) dst[row * k_ + k] = panel[k * 32 + c];
    }
  }
  return w;
}

void QuantLinear::gather_rows(const torch::Tensor& ids, torch::Tensor& out) const {
  check_gather(ids, out, n_, k_, gated_);
  const int64_t* id = ids.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  const int64_t ldo = out.stride(0);
  at::parallel_for(0, ids.numel(), 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t row = id[t], q = row / 32, c = row % 32;
      float* dst = o + t * ldo;
      for (int64_t g = 0; g < groups_; ++g) {
        const uint8_t* v = group_ptr(q, g);
        const float s = scale_of(v, c, false);
        const float m = has_min_ ? scale_of(v, c, true) : (offset8_ ? -8.0f * s : 0.0f);
        for (int64_t i = 0; i < group_ && g * group_ + i < k_; ++i) {
          const float value = bits_ == 4 ? static_cast<float>((v[i / 2 * 32 + c] >> (4 * (i & 1))) & 15)
                                         : static_cast<float>(static_cast<int8_t>(v[i * 32 + c]));
          dst[g * group_ + i] = std::fma(value, s, m);
        }
      }
    }
  });
}

}  // namespace mskern
