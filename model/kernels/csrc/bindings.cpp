// The Python module of the CPU kernels (built by model/kernels/__init__.py).
#include <torch/extension.h>

#include "gemm.h"
#include "qgemm.h"
#include "vec.h"

namespace mskern {
void rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps, torch::Tensor& out);
void rotary_cache(torch::Tensor& qkv, const torch::Tensor& positions, const torch::Tensor& cos,
                  const torch::Tensor& sin, const torch::Tensor& slots, torch::Tensor& key_cache,
                  torch::Tensor& value_cache, int64_t num_heads);
void paged_attention(const torch::Tensor& q, const torch::Tensor& key_cache, const torch::Tensor& value_cache,
                     const torch::Tensor& row_start, const torch::Tensor& num_queries,
                     const torch::Tensor& start_pos, const torch::Tensor& first_block,
                     const torch::Tensor& table_offset, const torch::Tensor& table_len, const torch::Tensor& tables,
                     int64_t num_heads, int64_t window, double softmax_scale, torch::Tensor& out);
}  // namespace mskern

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using mskern::PackedLinear;
  m.attr("ISA") = MSKERN_ISA;
  m.def("has_bf16_dot", &mskern::has_bf16_dot, "whether the build has the vdpbf16ps path (AVX512-BF16)");
  // module_local: builds for several -march values may be loaded side by side (tests)
  pybind11::class_<PackedLinear>(m, "PackedLinear", pybind11::module_local())
      .def(pybind11::init<const torch::Tensor&, bool, bool, int64_t>(), pybind11::arg("weight"),
           pybind11::arg("gated"), pybind11::arg("bf16"), pybind11::arg("bf16_compute") = 0)
      .def("forward", &PackedLinear::forward, pybind11::arg("x"), pybind11::arg("out"), pybind11::arg("epilogue"))
      .def("__call__", &PackedLinear::call)
      .def("unpack", &PackedLinear::unpack)
      .def("gather_rows", &PackedLinear::gather_rows, pybind11::arg("ids"), pybind11::arg("out"))
      .def_property_readonly("in_features", &PackedLinear::in_features)
      .def_property_readonly("out_features", &PackedLinear::out_features)
      .def_property_readonly("gated", &PackedLinear::gated)
      .def_property_readonly("is_bf16", &PackedLinear::is_bf16)
      .def_property_readonly("nbytes", &PackedLinear::nbytes)
      .def_property("bf16_compute", &PackedLinear::bf16_compute, &PackedLinear::set_bf16_compute);
  pybind11::class_<mskern::QuantLinear>(m, "QuantLinear", pybind11::module_local())
      .def(pybind11::init<int64_t, int64_t, int64_t, int64_t, bool, bool, bool, bool>(), pybind11::arg("n"),
           pybind11::arg("k"), pybind11::arg("group"), pybind11::arg("bits"), pybind11::arg("has_min"),
           pybind11::arg("offset8"), pybind11::arg("fp16"), pybind11::arg("gated"))
      .def("set_rows", &mskern::QuantLinear::set_rows, pybind11::arg("start"), pybind11::arg("values"),
           pybind11::arg("scales"), pybind11::arg("mins"))
      .def("forward", &mskern::QuantLinear::forward, pybind11::arg("x"), pybind11::arg("out"),
           pybind11::arg("epilogue"))
      .def("__call__", &mskern::QuantLinear::call)
      .def("unpack", &mskern::QuantLinear::unpack)
      .def("gather_rows", &mskern::QuantLinear::gather_rows, pybind11::arg("ids"), pybind11::arg("out"))
      .def_property_readonly("in_features", &mskern::QuantLinear::in_features)
      .def_property_readonly("out_features", &mskern::QuantLinear::out_features)
      .def_property_readonly("gated", &mskern::QuantLinear::gated)
      .def_property_readonly("bits", &mskern::QuantLinear::bits)
      .def_property_readonly("group", &mskern::QuantLinear::group)
      .def_property_readonly("fp16_scales", &mskern::QuantLinear::fp16_scales)
      .def_property_readonly("nbytes", &mskern::QuantLinear::nbytes)
      .def_property_readonly("integer_products", &mskern::QuantLinear::integer_products);
  m.def("rms_norm", &mskern::rms_norm, "out = weight * x / rms(x)");
  m.def("rotary_cache", &mskern::rotary_cache, "rotate q and k in place, write k and v to their cache slots");
  m.def("paged_attention", &mskern::paged_attention, "paged attention for prefill and decode chunks");
}
