// The whole-operation kernels of kernels.cpp as seen from eager.cpp, the autograd layer for
// eager calls. A table of function pointers, filled in kernels.cpp: the kernels stay private to
// their file, and a signature that drifts from this one fails to compile there.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/csrc/utils/pybind.h>

#include <cstdint>
#include <vector>

namespace normlab {

struct Kernels {
  // {shift, offset, rstd, mean, var} per group (float64); y written into `out`.
  std::vector<at::Tensor> (*channel_forward)(const at::Tensor& xv, bool planes, int64_t N, int64_t C, int64_t S,
                                             int64_t G, const at::Tensor& weight, const at::Tensor& bias,
                                             const at::Tensor& running_mean, const at::Tensor& running_var,
                                             double eps, int64_t act, double param, const at::Tensor& slope,
                                             const at::Tensor& out);
  // {dx (view shape), dγ, dβ, d slope} (parameters in float64).
  std::vector<at::Tensor> (*channel_backward)(const at::Tensor& dyv, const at::Tensor& srcv, bool planes, int64_t N,
                                              int64_t C, int64_t S, int64_t G, bool given, bool from_output,
                                              const at::Tensor& weight, const at::Tensor& bias,
                                              const at::Tensor& shift, const at::Tensor& offset,
                                              const at::Tensor& rstd, int64_t act, double param,
                                              const at::Tensor& slope);
  // {shift, rstd, offr} per row (float32); y written into `out`.
  std::vector<at::Tensor> (*row_forward)(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, double eps,
                                         bool centered, const at::Tensor& out);
  // {dx, dw, db} (dw, db float64 over the row).
  std::vector<at::Tensor> (*row_backward)(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                                          const at::Tensor& shift, const at::Tensor& rstd, const at::Tensor& offr,
                                          bool centered);
  // The running-estimate update of a finite batch; false (nothing written) otherwise.
  bool (*running_update)(const at::Tensor& running_mean, const at::Tensor& running_var, const at::Tensor& mean,
                         const at::Tensor& var, int64_t count, double momentum,
                         const at::Tensor& num_batches_tracked, bool unbiased);
  int64_t prelu;  // the activation code whose slope is a tensor
};

extern const Kernels kernels;

// Adds eager.cpp's functions to the extension module.
void bind_eager(pybind11::module_& m);

}  // namespace normlab
