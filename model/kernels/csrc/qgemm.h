// Linear layers on quantized weights that stay quantized in memory: out = x @ W^T with fp32
// activations, where every weight is w = scale * q + min over groups of G consecutive inputs
// (one scale and min per output row and group), q 4-bit unsigned or 8-bit signed.
//
// The GGUF block types map onto it exactly (see model/quant.py): Q8_0 = 8-bit, G 32, no min;
// Q4_0 = 4-bit, G 32, min -8 scale; Q4_1 = 4-bit, G 32; Q4_K = 4-bit, G 32, scale d * sc and
// min -dmin * m per sub-block; Q6_K = 8-bit (q - 32), G 16, scale d * sc.
//
// Packing (once, at load): output columns in pairs of 16-column panels as for PackedLinear
// (gemm.h, gated layers too); per pair and group, contiguous:
//   values  4-bit: G/2 x 32 bytes, byte [i][c] = q[2i][c] | q[2i+1][c] << 4  (c: the pair's column);
//                  where the CPU has AVX512-VNNI (and G % 4 == 0), quads instead: G/4 x 64 bytes,
//                  byte [t][c][j] = q[4t+j][c] | q[4t+j][c+16] << 4 for c < 16, so one 64-byte load
//                  masked and shifted gives both panels' 4 x 16 values as vpdpbusd reads them
//           8-bit: G x 32 int8, [k][c]
//   scales  32 (fp16 when every scale of the layer is exactly an fp16, else fp32), mins likewise
//           (none where every min is zero, or -8 scale: Q4_0, whose packed size is then the file's)
// The inputs are padded to a multiple of G with zero weights; the kernels never read x past K.
//
// Products: each group's q are converted to fp32 (in registers for a few rows; once per pair and
// block of rows into an L2-resident panel for many) and accumulated against x, then scaled once
// per group (w = scale q + min is never formed: sum_k x_k w_k = scale sum_k x_k q_k + min sum_k
// x_k). Both paths do the same arithmetic per row, so results do not depend on the batch. No
// activation is rounded: the result is the dequantized matrix's product up to summation order.
//
// Integer products (4-bit quads, every row count): converting q to fp32 costs more instructions
// than the bandwidth allows at batch 1, so instead each row of x is split per group into three
// int8 parts, x ~ fx (254^2 x1 + 254 x2 + x3) with fx = max|x| / (127 * 254^2): within 6e-8 of the
// group's largest |x|, as close as fp32 rounding. The sums Ap = sum_k q_k xp_k are exact int32
// (vpdpbusd); 254 A1 + A2 is exact in fp32 (< 2^24 for G <= 32), 254 (254 A1 + A2) + A3 rounds
// once, then each group is scaled once. The integer sums do not depend on order and the fp32 steps
// per row are fixed, so these results are batch-invariant too.
#pragma once

#include <torch/extension.h>

#include "gemm.h"

namespace mskern {

class QuantLinear {
 public:
  // An (N, K) layer of zero weights in this form, filled by set_rows; fp16: scales and mins are
  // stored as fp16 (every one must be exactly an fp16); offset8: no stored mins, every min is
  // -8 scale (Q4_0: w = scale (q - 8)); gated: gate rows then up rows.
  QuantLinear(int64_t n, int64_t k, int64_t group, int64_t bits, bool has_min, bool offset8, bool fp16, bool gated);
  // Rows [start, start + R): values (R, K) uint8 or int8 (0..15 for 4 bits); scales, mins (R, ceil(K / G))
  // (mins empty: zero). Loaders fill a layer chunk by chunk, so no other copy of it is ever whole.
  void set_rows(int64_t start, const torch::Tensor& values, const torch::Tensor& scales, const torch::Tensor& mins);

  void forward(const torch::Tensor& x, torch::Tensor& out, int64_t epilogue) const;
  torch::Tensor call(const torch::Tensor& x) const;
  torch::Tensor unpack() const;  // the dequantized (N, K) fp32 matrix
  void gather_rows(const torch::Tensor& ids, torch::Tensor& out) const;

  int64_t in_features() const { return k_; }
  int64_t out_features() const { return gated_ ? n_ / 2 : n_; }
  bool gated() const { return gated_; }
  int64_t bits() const { return bits_; }
  int64_t group() const { return group_; }
  bool fp16_scales() const { return f16_; }
  int64_t nbytes() const { return data_.nbytes(); }
  bool integer_products() const { return quads_; }

 private:
  const uint8_t* group_ptr(int64_t pair, int64_t g) const;
  // pairs q .. q + npairs - 1 (npairs <= 2): their packed groups, their output columns, and where
  // those start in row 0 of out
  struct PairTile {
    const uint8_t* w[2] = {nullptr, nullptr};
    int64_t cols[2] = {0, 0};
    float* out[2] = {nullptr, nullptr};
  };
  PairTile pair_tile(int64_t q, int npairs, float* out) const;
  float scale_of(const uint8_t* group, int64_t c, bool min) const;
  void forward_integer(const float* x, int64_t ldx, int64_t M, float* out, int64_t ldo, Epilogue epilogue) const;
  // the pair's q as fp32 into panel [K][32]; scaled: the weights (scale q + min) instead
  void expand_pair(int64_t pair, float* panel, bool scaled) const;

  torch::Tensor data_;
  int64_t n_, k_, group_, groups_, bits_, pairs_;
  int64_t value_bytes_, scale_bytes_, group_bytes_;
  bool gated_, has_min_, offset8_, f16_, quads_;
};

}  // namespace mskern
