// Linear layers on quantized weights (see qgemm.h for the format and the layout).
//
// Work split as for PackedLinear: output pairs divided among torch's threads. Few rows (decode):
// the q-kernel reads each pair's quantized groups once per MR rows and prefetches the next
// pair's; its group sums run in separate even/odd accumulators so the FMA chains never wait on
// each other. Many rows (prefill): per block of rows, each pair is dequantized into an fp32 panel
// in L2 and the fp32 micro-kernel of gemm.cpp runs over the block's rows. 4-bit layers on a CPU
// with AVX512-VNNI take integer products for every row count instead (qgemm.h): x split into two
// int8 parts per row and group, vpdpbusd over the quads, each pair's stream prefetched ahead.
#include "qgemm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
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

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
constexpr bool kIntegerProducts = true;
#else
constexpr bool kIntegerProducts = false;
#endif

struct Layout {
  int64_t K, group, groups, value_bytes, scale_bytes, group_bytes;
  bool has_min, offset8, f16;
};

// Where 4-bit value (input i, column c) of a group lies: its byte and the shift of its nibble.
inline std::pair<int64_t, int> nibble_at(bool quads, int64_t i, int64_t c) {
  if (quads) return {i / 4 * 64 + c % 16 * 4 + i % 4, 4 * static_cast<int>(c / 16)};
  return {i / 2 * 32 + c, 4 * static_cast<int>(i & 1)};
}

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
  bool quads = false;  // 4-bit values in quads (qgemm.h)
  // inputs i and i + 1 (i even) of the group at v: columns 0..15 and 16..31
  void load(const uint8_t* v, int64_t, int64_t i, bool both, Vec16& l0, Vec16& l1, Vec16& h0, Vec16& h1) const {
#if defined(__AVX512F__)
    if (BITS == 4 && quads) {
      Vec16::load_u4_quad(v + i / 4 * 64, static_cast<int>(i % 4), l0, l1);
      if (both) Vec16::load_u4_quad(v + i / 4 * 64, static_cast<int>(i % 4) + 1, h0, h1);
      return;
    }
#endif
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
    const auto add = [&](const Vec16 (&v)[P][2], int64_t i) {  // input i's values, every row
      for (int r = 0; r < MR; ++r) {
        const Vec16 xi = Vec16::broadcast(xr[r][i]);
        for (int p = 0; p < P; ++p) {
          b[r][p][0] = Vec16::fma(xi, v[p][0], b[r][p][0]);
          b[r][p][1] = Vec16::fma(xi, v[p][1], b[r][p][1]);
        }
      }
    };
    const int64_t full = kn & ~int64_t{1};
    for (int64_t i = 0; i < full; i += 2) {  // inputs i, i + 1: the same order as one input at a time
      Vec16 l[P][2], h[P][2];
      for (int p = 0; p < P; ++p) src[p].load(w[p] + g * L.group_bytes, k0, i, true, l[p][0], l[p][1], h[p][0], h[p][1]);
      add(l, i);
      add(h, i + 1);
    }
    if (full < kn) {  // an odd last input
      Vec16 l[P][2], h[P][2];
      for (int p = 0; p < P; ++p) src[p].load(w[p] + g * L.group_bytes, k0, full, false, l[p][0], l[p][1], h[p][0], h[p][1]);
      add(l, full);
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

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
constexpr int kIntRows = 4;  // 6 x 4 int32 accumulators + two value vectors of the 32 zmm
constexpr int64_t kIntPrefetch = 4;  // groups
constexpr int64_t kIntChunk = 16;    // pairs a thread takes at a time at batch 1

// Rows of x split per group for the integer products (qgemm.h): parts [M][3][Kp] int8 (x1, x2,
// x3; zero past K), and per row and group: fx, 8 (254 S1 + S2) and 8 S3 where Sp is the sum of
// part p (for offset8 layers), and 254^2 S1 + 254 S2 + S3 = sum(x) / fx (for layers with mins).
struct SplitRows {
  int64_t kp = 0;
  std::vector<int8_t> parts;
  std::vector<float> fx, offset12, offset3, sum;
};

// acc += the products of a's unsigned and b's signed bytes, four per lane, in place (GCC copies
// the accumulators around the intrinsic every iteration: 24 extra moves per quad, measured at
// half the speed)
inline __m512i dpbusd(__m512i acc, __m512i a, __m512i b) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
  return acc;
}

// One group of one row: kn inputs at x into the three parts (zero past kn, as they start).
// v = x inv is held as v + lo exactly (lo from an FMA), so the parts carry x to their own
// precision and fx = 1 / (inv 254^2), rounded once, is the only systematic error.
void split_group(const float* x, int64_t kn, int8_t* p1, int8_t* p2, int8_t* p3, SplitRows& s, int64_t at) {
  __m512 amax = _mm512_setzero_ps();
  __mmask16 bad = 0;
  for (int64_t k = 0; k < kn; k += 16) {
    const __mmask16 m = k + 16 <= kn ? __mmask16{0xFFFF} : static_cast<__mmask16>((1u << (kn - k)) - 1u);
    const __m512 v = _mm512_maskz_loadu_ps(m, x + k);
    amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
    bad |= _mm512_fpclass_ps_mask(v, 0x01 | 0x08 | 0x10 | 0x80);  // NaN or infinity
  }
  if (bad != 0) {  // NaN or inf reaches the row's output as NaN, as the fp32 product would give
    s.fx[at] = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  const float top = _mm512_reduce_max_ps(amax);
  if (top == 0.0f) return;
  const float inv = 127.0f / top;
  const __m512 vinv = _mm512_set1_ps(inv), k254 = _mm512_set1_ps(254.0f);
  const __m512 hi = _mm512_set1_ps(127.0f), lo = _mm512_set1_ps(-127.0f);
  const auto nearest = [&](__m512 v) {
    return _mm512_min_ps(hi, _mm512_max_ps(lo, _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
  };
  __m512i s1 = _mm512_setzero_si512(), s2 = s1, s3 = s1;
  for (int64_t k = 0; k < kn; k += 16) {
    const __mmask16 m = k + 16 <= kn ? __mmask16{0xFFFF} : static_cast<__mmask16>((1u << (kn - k)) - 1u);
    const __m512 xv = _mm512_maskz_loadu_ps(m, x + k);
    const __m512 v = _mm512_mul_ps(xv, vinv);
    const __m512 err = _mm512_fmsub_ps(xv, vinv, v);  // x inv - v, exactly
    const __m512 a = nearest(v);
    const __m512 r = _mm512_mul_ps(_mm512_add_ps(_mm512_sub_ps(v, a), err), k254);
    const __m512 b = nearest(r);
    const __m512 c = nearest(_mm512_mul_ps(_mm512_sub_ps(r, b), k254));
    const __m512i ai = _mm512_cvtps_epi32(a), bi = _mm512_cvtps_epi32(b), ci = _mm512_cvtps_epi32(c);
    _mm512_mask_cvtepi32_storeu_epi8(p1 + k, m, ai);
    _mm512_mask_cvtepi32_storeu_epi8(p2 + k, m, bi);
    _mm512_mask_cvtepi32_storeu_epi8(p3 + k, m, ci);
    s1 = _mm512_add_epi32(s1, ai), s2 = _mm512_add_epi32(s2, bi), s3 = _mm512_add_epi32(s3, ci);
  }
  s.fx[at] = static_cast<float>(1.0 / (static_cast<double>(inv) * 254.0 * 254.0));
  const int32_t sum12 = 254 * _mm512_reduce_add_epi32(s1) + _mm512_reduce_add_epi32(s2);
  const int32_t sum3 = _mm512_reduce_add_epi32(s3);
  s.offset12[at] = 8.0f * static_cast<float>(sum12);
  s.offset3[at] = 8.0f * static_cast<float>(sum3);
  s.sum[at] = static_cast<float>(254.0 * sum12 + sum3);
}

void split_rows(const float* x, int64_t ldx, int64_t M, const Layout& L, SplitRows& s) {
  s.kp = L.groups * L.group;
  s.parts.assign(static_cast<size_t>(M * 3 * s.kp), 0);
  s.fx.assign(static_cast<size_t>(M * L.groups), 0.0f);
  s.offset12.assign(s.fx.size(), 0.0f);
  s.offset3.assign(s.fx.size(), 0.0f);
  s.sum.assign(s.fx.size(), 0.0f);
  at::parallel_for(0, M, 4, [&](int64_t r0, int64_t r1) {
    for (int64_t m = r0; m < r1; ++m) {
      int8_t* p1 = s.parts.data() + m * 3 * s.kp;
      for (int64_t g = 0; g < L.groups; ++g) {
        const int64_t k0 = g * L.group;
        split_group(x + m * ldx + k0, std::min(L.group, L.K - k0), p1 + k0, p1 + s.kp + k0, p1 + 2 * s.kp + k0, s,
                    m * L.groups + g);
      }
    }
  });
}

// MR rows (from row m of the split x) x NP pairs, 4-bit quads: exact int32 group sums per part,
// then per row the same fp32 steps whatever MR and NP are (batch-invariant).
// QUADS: the group's quads when known at compile time (8: G = 32, every GGUF 4-bit type), else 0.
template <int MR, int NP, int QUADS>
void int_tile(const SplitRows& xs, int64_t m, const uint8_t* const* w, const Layout& L, float* const* out, int64_t ldo, const int64_t* cols, Epilogue epilogue) {
  alignas(64) float a[MR][NP][2][16] = {};
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const __m512 k254 = _mm512_set1_ps(254.0f);
  for (int64_t g = 0; g < L.groups; ++g) {
    // the group kIntPrefetch ahead in each pair's own stream, into L2 (measured best: ~0.95 of
    // torch.sum's read bandwidth streaming 2.6 GB of Q4 layers at batch 1, against ~0.8 without)
    for (int p = 0; p < NP; ++p) {
      const uint8_t* ahead = w[p] + (g + kIntPrefetch) * L.group_bytes;
      for (int64_t line = 0; line < L.group_bytes; line += 64) __builtin_prefetch(ahead + line, 0, 2);
    }
    __m512i acc[MR][NP][6];  // [2 part + panel]: parts 1, 2, 3 x panels 0, 1
    for (int r = 0; r < MR; ++r)
      for (int p = 0; p < NP; ++p)
        for (int i = 0; i < 6; ++i) acc[r][p][i] = _mm512_setzero_si512();
    const int8_t* xg[MR];
    for (int r = 0; r < MR; ++r) xg[r] = xs.parts.data() + (m + r) * 3 * xs.kp + g * L.group;
    const int64_t quads = QUADS > 0 ? QUADS : L.group / 4;
#pragma GCC unroll 8
    for (int64_t t = 0; t < quads; ++t) {
      __m512i lo[NP], hi[NP];
      for (int p = 0; p < NP; ++p) {
        const __m512i d = _mm512_loadu_si512(w[p] + g * L.group_bytes + t * 64);
        lo[p] = _mm512_and_si512(d, low4);
        hi[p] = _mm512_and_si512(_mm512_srli_epi16(d, 4), low4);
      }
      for (int r = 0; r < MR; ++r) {
        for (int part = 0; part < 3; ++part) {
          int32_t four;  // inputs 4t..4t+3 of this part
          std::memcpy(&four, xg[r] + part * xs.kp + t * 4, 4);
          const __m512i b = _mm512_set1_epi32(four);
          for (int p = 0; p < NP; ++p) {
            acc[r][p][2 * part] = dpbusd(acc[r][p][2 * part], lo[p], b);
            acc[r][p][2 * part + 1] = dpbusd(acc[r][p][2 * part + 1], hi[p], b);
          }
        }
      }
    }
    for (int p = 0; p < NP; ++p) {
      const uint8_t* sp = w[p] + g * L.group_bytes + L.value_bytes;
      const Vec16 scale[2] = {load_scales(sp, L.f16), load_scales(sp + L.scale_bytes / 2, L.f16)};
      Vec16 mins[2] = {Vec16::zero(), Vec16::zero()};
      if (L.has_min) {
        mins[0] = load_scales(sp + L.scale_bytes, L.f16);
        mins[1] = load_scales(sp + L.scale_bytes + L.scale_bytes / 2, L.f16);
      }
      for (int r = 0; r < MR; ++r) {
        const int64_t at = (m + r) * L.groups + g;
        const Vec16 f = Vec16::broadcast(xs.fx[at]);
        for (int h = 0; h < 2; ++h) {
          __m512 c2 = _mm512_cvtepi32_ps(acc[r][p][2 + h]), c3 = _mm512_cvtepi32_ps(acc[r][p][4 + h]);
          if (L.offset8) {
            c2 = _mm512_sub_ps(c2, _mm512_set1_ps(xs.offset12[at]));
            c3 = _mm512_sub_ps(c3, _mm512_set1_ps(xs.offset3[at]));
          }
          const __m512 sum12 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][p][h]), k254, c2);  // exact
          const Vec16 sum{_mm512_fmadd_ps(sum12, k254, c3)};  // rounded once
          if (L.has_min) {  // scale sum + min sum(x) share fx, whose rounding then scales only the result
            const Vec16 group = Vec16::fma(Vec16::broadcast(xs.sum[at]), mins[h], scale[h] * sum);
            Vec16::fma(group, f, Vec16::load(a[r][p][h])).store(a[r][p][h]);
          } else {
            Vec16::fma(sum, scale[h] * f, Vec16::load(a[r][p][h])).store(a[r][p][h]);
          }
        }
      }
    }
  }
  for (int p = 0; p < NP; ++p) {
    Acc<MR> tile;
    for (int r = 0; r < MR; ++r) tile.a0[r] = Vec16::load(a[r][p][0]), tile.a1[r] = Vec16::load(a[r][p][1]);
    write_tile<MR>(tile, out[p], ldo, cols[p], epilogue);
  }
}

using IntTileFn = void (*)(const SplitRows&, int64_t, const uint8_t* const*, const Layout&, float* const*, int64_t,
                           const int64_t*, Epilogue);
template <int QUADS, int... Rows>
constexpr auto make_int_table(std::integer_sequence<int, Rows...>) {
  return std::array<IntTileFn, sizeof...(Rows) + 1>{&int_tile<1, 2, QUADS>, &int_tile<Rows + 1, 1, QUADS>...};
}
// [0]: one row, two pairs; [r]: r rows, one pair
constexpr auto kIntTiles = make_int_table<0>(std::make_integer_sequence<int, kIntRows>{});
constexpr auto kIntTiles32 = make_int_table<8>(std::make_integer_sequence<int, kIntRows>{});
#endif

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
  quads_ = kIntegerProducts && bits == 4 && group % 4 == 0;
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
              const auto [at, shift] = nibble_at(quads_, i, c);
              dst[at] = static_cast<uint8_t>((dst[at] & (0xF0 >> shift)) | (value << shift));
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

QuantLinear::PairTile QuantLinear::pair_tile(int64_t q, int npairs, float* out) const {
  const int64_t width = gated_ ? 16 : 32;
  PairTile tile;
  for (int p = 0; p < npairs; ++p) {
    const int64_t col0 = (q + p) * width;
    tile.w[p] = group_ptr(q + p, 0);
    tile.cols[p] = std::min(width, out_features() - col0);
    tile.out[p] = out + col0;
  }
  return tile;
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
        PackedValues<4>{quads_}.load(v, k0, i, both, l0, l1, h0, h1);
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
  if (quads_) {
    forward_integer(xp, ldx, M, o, ldo, epilogue);
    return;
  }
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
        const PairTile tile = pair_tile(q, npairs, o);
        const uint8_t* const* w = tile.w;
        const int64_t* cols = tile.cols;
        const uint8_t* next = q + npairs < q1 ? group_ptr(q + npairs, 0) : nullptr;
        for (int64_t m = 0; m < M; m += kQRows) {
          const int64_t rows = std::min<int64_t>(kQRows, M - m);
          const float* xs = sums ? xsum.data() + m * groups_ : nullptr;
          float* at_row[2] = {tile.out[0] + m * ldo, npairs == 2 ? tile.out[1] + m * ldo : nullptr};
          const uint8_t* prefetch = m == 0 ? next : nullptr;
          if (bits_ == 4) {
            const PackedValues<4> src[2] = {{quads_}, {quads_}};
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
        const PairTile tile = pair_tile(q, 1, o);
        expand_pair(q, panel.data(), false);
        for (int64_t m = m0; m < m1; m += kPanelRows) {
          const int64_t rows = std::min<int64_t>(kPanelRows, m1 - m);
          float* dst[1] = {tile.out[0] + m * ldo};
          kPanelTiles[rows - 1](xp + m * ldx, ldx, sums ? xsum.data() + m * groups_ : nullptr, groups_, tile.w, L, src,
                                nullptr, dst, ldo, tile.cols, epilogue);
        }
      }
    }
  });
}

void QuantLinear::forward_integer(const float* x, int64_t ldx, int64_t M, float* o, int64_t ldo,
                                  Epilogue epilogue) const {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  const Layout L{k_, group_, groups_, value_bytes_, scale_bytes_, group_bytes_, has_min_, offset8_, f16_};
  SplitRows xs;
  split_rows(x, ldx, M, L, xs);
  const auto pairs = [&](int64_t q0, int64_t q1) {
    for (int64_t m0 = 0; m0 < M; m0 += kRowBlock) {
      const int64_t m1 = std::min(M, m0 + kRowBlock);
      for (int64_t q = q0; q < q1;) {
        // one row: two pairs per tile (twelve vpdpbusd chains); more rows: one pair, up to 4 rows
        const int npairs = (M == 1 && q + 1 < q1) ? 2 : 1;
        const PairTile tile = pair_tile(q, npairs, o);
        for (int64_t m = m0; m < m1; m += kIntRows) {
          const int64_t rows = std::min<int64_t>(kIntRows, m1 - m);
          float* at_row[2] = {tile.out[0] + m * ldo, npairs == 2 ? tile.out[1] + m * ldo : nullptr};
          const auto& tiles = group_ == 32 ? kIntTiles32 : kIntTiles;
          tiles[npairs == 2 ? 0 : rows](xs, m, tile.w, L, at_row, ldo, tile.cols, epilogue);
        }
        q += npairs;
      }
    }
  };
  if (M > 1) {
    at::parallel_for(0, pairs_, 1, pairs);
    return;
  }
  // One row is bound by reading the weights: the threads take chunks of pairs as they go, so one
  // slowed (by another tenant, say) does not leave the other waiting at the end of the layer.
  std::atomic<int64_t> next{0};
  const int64_t chunks = (pairs_ + kIntChunk - 1) / kIntChunk;
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    for (int64_t c = next++; c < chunks; c = next++) pairs(c * kIntChunk, std::min(pairs_, (c + 1) * kIntChunk));
  });
#else
  (void)x, (void)ldx, (void)M, (void)o, (void)ldo, (void)epilogue;
  TORCH_CHECK(false, "QuantLinear: integer products need AVX512-VNNI");
#endif
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
          float value;
          if (bits_ == 4) {
            const auto [at, shift] = nibble_at(quads_, i, c);
            value = static_cast<float>((v[at] >> shift) & 15);
          } else {
            value = static_cast<float>(static_cast<int8_t>(v[i * 32 + c]));
          }
          dst[g * group_ + i] = std::fma(value, s, m);
        }
      }
    }
  });
}

}  // namespace mskern
