// Vec16: sixteen fp32 lanes behind one interface, whatever the ISA the kernels are built for.
//
//   AVX-512: one zmm register.  AVX2 + FMA: two ymm registers.  Otherwise: a plain array
//   the compiler may vectorise.  Kernels are written once against this interface, so a
//   machine with AVX2 only builds and runs the same code paths as an AVX-512 one.
//
// bf16 weights are widened in registers: a bf16 is the top half of an fp32, so a 32-bit word
// holding the pair (w[k], w[k+1]) (k in the low half, the "VNNI" layout) gives
// fp32(w[k]) = word << 16 and fp32(w[k+1]) = word & 0xffff0000: two integer ops for 32 weights.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace mskern {

#if defined(__AVX512F__)
#define MSKERN_ISA "avx512"

struct Vec16 {
  __m512 v;
  static Vec16 zero() { return {_mm512_setzero_ps()}; }
  static Vec16 broadcast(float x) { return {_mm512_set1_ps(x)}; }
  static Vec16 load(const float* p) { return {_mm512_loadu_ps(p)}; }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  // lanes [0, n) only
  static Vec16 load_partial(const float* p, int n) {
    return {_mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1u), p)};
  }
  void store_partial(float* p, int n) const { _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1u), v); }
  // 16 bf16 (uint16) -> fp32
  static Vec16 load_bf16(const uint16_t* p) {
    __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16))};
  }
  // 16 pairs (32 bf16, VNNI layout) -> fp32 of the even and the odd members
  static void load_bf16_pairs(const uint16_t* p, Vec16& even, Vec16& odd) {
    __m512i raw = _mm512_loadu_si512(p);
    even.v = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
    odd.v = _mm512_castsi512_ps(_mm512_and_si512(raw, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
  }
  // 16 fp16 -> fp32
  static Vec16 load_f16(const uint16_t* p) {
    return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
  }
  // 16 int8 -> fp32
  static Vec16 load_s8(const int8_t* p) {
    return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))))};
  }
  // 16 bytes of two 4-bit values each -> fp32 of the low and of the high nibbles
  // (vpermps reads only the low 4 bits of each index: a table lookup replaces mask + convert)
  static void load_u4(const uint8_t* p, Vec16& low, Vec16& high) {
    const __m512 table = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    low.v = _mm512_permutexvar_ps(b, table);
    high.v = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
  }
  // 64 bytes = 16 dwords of four bytes each, two 4-bit values per byte -> fp32 of byte j's low
  // and of its high nibbles (qgemm.h's layout for integer products)
  static void load_u4_quad(const uint8_t* p, int j, Vec16& low, Vec16& high) {
    const __m512 table = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i d = _mm512_srl_epi32(_mm512_loadu_si512(p), _mm_cvtsi32_si128(8 * j));
    low.v = _mm512_permutexvar_ps(d, table);
    high.v = _mm512_permutexvar_ps(_mm512_srli_epi32(d, 4), table);
  }
  // fp32 -> bf16, round to nearest even (NaN stays NaN)
  void store_bf16(uint16_t* p) const {
    __m512i bits = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), lsb);
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    rounded = _mm512_mask_or_epi32(rounded, nan, bits, _mm512_set1_epi32(0x00400000));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
  }
  friend Vec16 operator+(Vec16 a, Vec16 b) { return {_mm512_add_ps(a.v, b.v)}; }
  friend Vec16 operator-(Vec16 a, Vec16 b) { return {_mm512_sub_ps(a.v, b.v)}; }
  friend Vec16 operator*(Vec16 a, Vec16 b) { return {_mm512_mul_ps(a.v, b.v)}; }
  static Vec16 fma(Vec16 a, Vec16 b, Vec16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }  // a * b + c
  static Vec16 max(Vec16 a, Vec16 b) { return {_mm512_max_ps(a.v, b.v)}; }
  float sum() const { return _mm512_reduce_add_ps(v); }
  float hmax() const { return _mm512_reduce_max_ps(v); }
  // lanes outside [lo, hi) replaced by fill (0 <= lo <= hi <= 16)
  Vec16 keep_lanes(int lo, int hi, float fill) const {
    const __mmask16 keep = static_cast<__mmask16>(((1u << hi) - 1u) & ~((1u << lo) - 1u));
    return {_mm512_mask_blend_ps(keep, _mm512_set1_ps(fill), v)};
  }
};

#elif defined(__AVX2__) && defined(__FMA__)
#define MSKERN_ISA "avx2"

struct Vec16 {
  __m256 lo, hi;
  static Vec16 zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  static Vec16 broadcast(float x) {
    __m256 b = _mm256_set1_ps(x);
    return {b, b};
  }
  static Vec16 load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  void store(float* p) const {
    _mm256_storeu_ps(p, lo);
    _mm256_storeu_ps(p + 8, hi);
  }
  static Vec16 load_partial(const float* p, int n) {
    alignas(32) float tmp[16] = {};
    std::memcpy(tmp, p, sizeof(float) * n);
    return load(tmp);
  }
  void store_partial(float* p, int n) const {
    alignas(32) float tmp[16];
    store(tmp);
    std::memcpy(p, tmp, sizeof(float) * n);
  }
  static __m256 widen8(__m128i raw) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
  }
  static Vec16 load_bf16(const uint16_t* p) {
    return {widen8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
            widen8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)))};
  }
  static void load_bf16_pairs(const uint16_t* p, Vec16& even, Vec16& odd) {
    const __m256i mask = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
    __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16));
    even = {_mm256_castsi256_ps(_mm256_slli_epi32(a, 16)), _mm256_castsi256_ps(_mm256_slli_epi32(b, 16))};
    odd = {_mm256_castsi256_ps(_mm256_and_si256(a, mask)), _mm256_castsi256_ps(_mm256_and_si256(b, mask))};
  }
  static Vec16 load_f16(const uint16_t* p) {
    return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
            _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)))};
  }
  static Vec16 load_s8(const int8_t* p) {
    return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))),
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8))))};
  }
  static void load_u4(const uint8_t* p, Vec16& low, Vec16& high) {
    const __m256i a = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8)));
    const __m256i m = _mm256_set1_epi32(15);
    low = {_mm256_cvtepi32_ps(_mm256_and_si256(a, m)), _mm256_cvtepi32_ps(_mm256_and_si256(b, m))};
    high = {_mm256_cvtepi32_ps(_mm256_srli_epi32(a, 4)), _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4))};
  }
  void store_bf16(uint16_t* p) const {
    alignas(32) float tmp[16];
    store(tmp);
    for (int i = 0; i < 16; ++i) {
      uint32_t bits;
      std::memcpy(&bits, &tmp[i], 4);
      p[i] = (tmp[i] != tmp[i]) ? static_cast<uint16_t>((bits >> 16) | 0x40)
                                : static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
    }
  }
  friend Vec16 operator+(Vec16 a, Vec16 b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
  friend Vec16 operator-(Vec16 a, Vec16 b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
  friend Vec16 operator*(Vec16 a, Vec16 b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
  static Vec16 fma(Vec16 a, Vec16 b, Vec16 c) {
    return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
  }
  static Vec16 max(Vec16 a, Vec16 b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
  float sum() const {
    __m256 s = _mm256_add_ps(lo, hi);
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    q = _mm_add_ss(q, _mm_movehdup_ps(q));
    return _mm_cvtss_f32(q);
  }
  float hmax() const {
    __m256 m = _mm256_max_ps(lo, hi);
    __m128 q = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    q = _mm_max_ps(q, _mm_movehl_ps(q, q));
    q = _mm_max_ss(q, _mm_movehdup_ps(q));
    return _mm_cvtss_f32(q);
  }
  Vec16 keep_lanes(int first, int last, float fill) const {
    const __m256 iota0 = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), iota1 = _mm256_setr_ps(8, 9, 10, 11, 12, 13, 14, 15);
    const __m256 a = _mm256_set1_ps(static_cast<float>(first)), b = _mm256_set1_ps(static_cast<float>(last));
    const __m256 f = _mm256_set1_ps(fill);
    const __m256 k0 = _mm256_and_ps(_mm256_cmp_ps(iota0, a, _CMP_GE_OQ), _mm256_cmp_ps(iota0, b, _CMP_LT_OQ));
    const __m256 k1 = _mm256_and_ps(_mm256_cmp_ps(iota1, a, _CMP_GE_OQ), _mm256_cmp_ps(iota1, b, _CMP_LT_OQ));
    return {_mm256_blendv_ps(f, lo, k0), _mm256_blendv_ps(f, hi, k1)};
  }
};

#else
#define MSKERN_ISA "scalar"

struct Vec16 {
  float x[16];
  static Vec16 zero() { return broadcast(0.0f); }
  static Vec16 broadcast(float v) {
    Vec16 r;
    for (int i = 0; i < 16; ++i) r.x[i] = v;
    return r;
  }
  static Vec16 load(const float* p) {
    Vec16 r;
    std::memcpy(r.x, p, sizeof(r.x));
    return r;
  }
  void store(float* p) const { std::memcpy(p, x, sizeof(x)); }
  static Vec16 load_partial(const float* p, int n) {
    Vec16 r = zero();
    std::memcpy(r.x, p, sizeof(float) * n);
    return r;
  }
  void store_partial(float* p, int n) const { std::memcpy(p, x, sizeof(float) * n); }
  static float widen(uint16_t h) {
    uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
  static Vec16 load_bf16(const uint16_t* p) {
    Vec16 r;
    for (int i = 0; i < 16; ++i) r.x[i] = widen(p[i]);
    return r;
  }
  static void load_bf16_pairs(const uint16_t* p, Vec16& even, Vec16& odd) {
    for (int i = 0; i < 16; ++i) {
      even.x[i] = widen(p[2 * i]);
      odd.x[i] = widen(p[2 * i + 1]);
    }
  }
  static Vec16 load_f16(const uint16_t* p);  // defined below, after f16_to_float
  static Vec16 load_s8(const int8_t* p) {
    Vec16 r;
    for (int i = 0; i < 16; ++i) r.x[i] = static_cast<float>(p[i]);
    return r;
  }
  static void load_u4(const uint8_t* p, Vec16& low, Vec16& high) {
    for (int i = 0; i < 16; ++i) {
      low.x[i] = static_cast<float>(p[i] & 15);
      high.x[i] = static_cast<float>(p[i] >> 4);
    }
  }
  void store_bf16(uint16_t* p) const {
    for (int i = 0; i < 16; ++i) {
      uint32_t bits;
      std::memcpy(&bits, &x[i], 4);
      p[i] = (x[i] != x[i]) ? static_cast<uint16_t>((bits >> 16) | 0x40)
                            : static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
    }
  }
  friend Vec16 operator+(Vec16 a, Vec16 b) {
    for (int i = 0; i < 16; ++i) a.x[i] += b.x[i];
    return a;
  }
  friend Vec16 operator-(Vec16 a, Vec16 b) {
    for (int i = 0; i < 16; ++i) a.x[i] -= b.x[i];
    return a;
  }
  friend Vec16 operator*(Vec16 a, Vec16 b) {
    for (int i = 0; i < 16; ++i) a.x[i] *= b.x[i];
    return a;
  }
  static Vec16 fma(Vec16 a, Vec16 b, Vec16 c) {
    for (int i = 0; i < 16; ++i) c.x[i] += a.x[i] * b.x[i];
    return c;
  }
  static Vec16 max(Vec16 a, Vec16 b) {
    for (int i = 0; i < 16; ++i) a.x[i] = a.x[i] > b.x[i] ? a.x[i] : b.x[i];
    return a;
  }
  float sum() const {
    float s = 0.0f;
    for (int i = 0; i < 16; ++i) s += x[i];
    return s;
  }
  float hmax() const {
    float m = x[0];
    for (int i = 1; i < 16; ++i) m = x[i] > m ? x[i] : m;
    return m;
  }
  Vec16 keep_lanes(int lo, int hi, float fill) const {
    Vec16 r = *this;
    for (int i = 0; i < 16; ++i) r.x[i] = (i >= lo && i < hi) ? x[i] : fill;
    return r;
  }
};

#endif


// exp(x) for any x: x = n ln2 + r, |r| <= ln2/2, e^r by a degree-6 polynomial, 2^n through the
// exponent bits; inputs are clamped to [-87, 88] (e^-87 ~ 1.6e-38, e^88 ~ 1.6e38). Relative
// error ~2e-7. Written on Vec16 lanes through a scalar-free loop the compiler vectorises.
inline Vec16 exp(Vec16 x) {
  alignas(64) float in[16], out[16];
  x.store(in);
#pragma omp simd
  for (int i = 0; i < 16; ++i) {
    float v = in[i] < -87.0f ? -87.0f : (in[i] > 88.0f ? 88.0f : in[i]);
    const float n = __builtin_nearbyintf(v * 1.44269504088896341f);
    const float r = (v - n * 0.693359375f) + n * 2.12194440e-4f;
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
    float scale;
    __builtin_memcpy(&scale, &bits, sizeof(scale));
    out[i] = p * scale;
  }
  return Vec16::load(out);
}

// silu(x) = x / (1 + e^-x)
inline Vec16 silu(Vec16 x) {
  const Vec16 one = Vec16::broadcast(1.0f);
  alignas(64) float num[16], den[16];
  x.store(num);
  (one + exp(Vec16::zero() - x)).store(den);
#pragma omp simd
  for (int i = 0; i < 16; ++i) num[i] /= den[i];
  return Vec16::load(num);
}

// Scalar bf16 <-> fp32, for tails and packing.
inline float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// IEEE half -> fp32 (scales of quantized weights; exact)
inline float f16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu, bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);  // inf, NaN
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    exponent = 113;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    bits = sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

#if !defined(__AVX512F__) && !(defined(__AVX2__) && defined(__FMA__))
inline Vec16 Vec16::load_f16(const uint16_t* p) {
  Vec16 r;
  for (int i = 0; i < 16; ++i) r.x[i] = f16_to_float(p[i]);
  return r;
}
#endif

inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if (f != f) return static_cast<uint16_t>((bits >> 16) | 0x40);
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

}  // namespace mskern
