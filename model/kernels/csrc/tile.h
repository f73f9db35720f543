// What every linear-layer kernel shares: the accumulators of an MR-row x 32-column tile (one
// pair of 16-column panels) and writing them out through an epilogue.
#pragma once

#include <algorithm>
#include <cstdint>

#include "gemm.h"
#include "vec.h"

namespace mskern {

template <int MR>
struct Acc {
  Vec16 a0[MR], a1[MR];  // columns 0..15 and 16..31 of the pair
  Acc() {
    for (int r = 0; r < MR; ++r) a0[r] = a1[r] = Vec16::zero();
  }
};

inline void store_cols(Vec16 v, float* o, int64_t cols, bool accumulate) {
  if (cols <= 0) return;
  if (cols >= 16) {
    if (accumulate) v = v + Vec16::load(o);
    v.store(o);
  } else {
    if (accumulate) v = v + Vec16::load_partial(o, static_cast<int>(cols));
    v.store_partial(o, static_cast<int>(cols));
  }
}

template <int MR>
inline void write_tile(const Acc<MR>& acc, float* out, int64_t ldo, int64_t cols, Epilogue epilogue) {
  for (int r = 0; r < MR; ++r) {
    float* o = out + r * ldo;
    if (epilogue == Epilogue::kSiluMul) {
      store_cols(silu(acc.a0[r]) * acc.a1[r], o, cols, false);
    } else {
      const bool accumulate = epilogue == Epilogue::kAccumulate;
      store_cols(acc.a0[r], o, std::min<int64_t>(cols, 16), accumulate);
      store_cols(acc.a1[r], o + 16, cols - 16, accumulate);
    }
  }
}

}  // namespace mskern
