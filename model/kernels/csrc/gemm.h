// Linear layers on prepacked weights: out = x @ W^T (+ out, or silu(gate) * up), fp32 activations,
// fp32 or bf16 weights, accumulation in fp32.
//
// Packing (once, at load). Output columns are grouped in pairs of 16-column panels; a pair is
// what the micro-kernel computes for MR rows of x at a time.
//   fp32 weights: [pairs][K][32]             (32 = panel 0's 16 columns, then panel 1's)
//   bf16 weights: [pairs][K/2][2][16][2]     (per k pair and panel: 16 columns x (w[k], w[k+1]))
// Plain layers: pair q holds output columns [32q, 32q + 32); N is padded to a multiple of 32.
// Gated layers (gate and up rows stacked, SwiGLU): pair q holds gate and up of output columns
// [16q, 16q + 16), so the epilogue writes silu(gate) * up without a second pass.
// Example, plain N = 40: pairs 0 (columns 0..31) and 1 (32..39, then 24 zero columns).
#pragma once

#include <torch/extension.h>

namespace mskern {

enum class Epilogue : int64_t { kStore = 0, kAccumulate = 1, kSiluMul = 2 };
enum class Bf16Compute : int64_t { kWiden = 0, kDot = 1 };  // widen to fp32 and FMA, or vdpbf16ps

class PackedLinear {
 public:
  // weight: (N, K) fp32 or bf16 (gated: gate rows then up rows); bf16: keep the weights in bf16
  PackedLinear(const torch::Tensor& weight, bool gated, bool bf16, int64_t bf16_compute);

  // x: (M, K) fp32, rows contiguous (any row stride); out: (M, out_features) fp32, same.
  void forward(const torch::Tensor& x, torch::Tensor& out, int64_t epilogue) const;
  torch::Tensor call(const torch::Tensor& x) const;  // a new output, plain or gated store
  torch::Tensor unpack() const;                       // back to (N, K) fp32, for tests
  // out[t] = W[ids[t]] as fp32: an embedding lookup in a tied output head (plain layout only)
  void gather_rows(const torch::Tensor& ids, torch::Tensor& out) const;

  int64_t in_features() const { return k_; }
  int64_t out_features() const { return gated_ ? n_ / 2 : n_; }
  bool gated() const { return gated_; }
  bool is_bf16() const { return bf16_; }
  int64_t bf16_compute() const { return static_cast<int64_t>(compute_); }
  void set_bf16_compute(int64_t mode);
  int64_t nbytes() const { return data_.nbytes(); }

 private:
  torch::Tensor data_;
  int64_t n_, k_, kp_, pairs_;
  bool gated_, bf16_;
  Bf16Compute compute_ = Bf16Compute::kWiden;
};

bool has_bf16_dot();  // the build has the vdpbf16ps path (AVX512-BF16)

// The checks both gather_rows share: a plain (not gated) layer, ids int64 in [0, n), out (len(ids), k) float32.
void check_gather(const torch::Tensor& ids, const torch::Tensor& out, int64_t n, int64_t k, bool gated);

// Output columns [16q, 16q + 16) of panel j (0, 1) of pair q hold which weight row, or -1 (padding)?
// Gated: panel 0 holds gate rows, panel 1 the matching up rows (see above).
inline int64_t packed_row(bool gated, int64_t n, int64_t q, int64_t j, int64_t lane) {
  if (gated) {
    const int64_t col = 16 * q + lane, half = n / 2;
    return col < half ? (j == 0 ? col : half + col) : -1;
  }
  const int64_t row = 32 * q + 16 * j + lane;
  return row < n ? row : -1;
}

}  // namespace mskern
