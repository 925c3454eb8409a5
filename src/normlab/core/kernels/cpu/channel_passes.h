// The two-pass route of the channel norms (channel_passes.cpp): a moments pass, then an apply
// pass, over planes (P, S) or columns (N, S, C). channel.cpp uses it for groups too large to
// stay in cache between the two (its fused route handles the rest).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace normlab {

// The per-unit coefficients of an apply or backward pass, y = act((x − shift)·scale + bias):
// one float per plane (planes) or per (unit, channel) (columns); PReLU's slope per plane or per
// channel (null for the other activations). plane_apply reads plane p's at p % channels where
// channels > 0 (given statistics: one set per channel, not a copy per sample).
struct Coefficients {
  const float* shift;
  const float* scale;
  const float* bias;
  const float* slope;
  int64_t act;
  double param;
  int64_t channels = 0;
};

std::vector<at::Tensor> plane_moments(const at::Tensor& x, const at::Tensor& shift);
// With `out` given (possibly x itself: the in-place mode), y is written there.
at::Tensor plane_apply(const at::Tensor& x, const Coefficients& pass, const at::Tensor& out);
std::vector<at::Tensor> plane_backward_reduce(const at::Tensor& dy, const at::Tensor& src, int64_t from_output,
                                              const Coefficients& pass);
at::Tensor plane_backward_apply(const at::Tensor& dy, const at::Tensor& src, int64_t from_output,
                                const Coefficients& pass, const at::Tensor& coef_dz, const at::Tensor& coef_u,
                                const at::Tensor& coef_c);

std::vector<at::Tensor> column_moments(const at::Tensor& x, const at::Tensor& shift);
at::Tensor column_apply(const at::Tensor& x, const Coefficients& pass, const at::Tensor& out);
std::vector<at::Tensor> column_backward_reduce(const at::Tensor& dy, const at::Tensor& src, int64_t from_output,
                                               const Coefficients& pass);
at::Tensor column_backward_apply(const at::Tensor& dy, const at::Tensor& src, int64_t from_output,
                                 const Coefficients& pass, const at::Tensor& coef_dz, const at::Tensor& coef_u,
                                 const at::Tensor& coef_c);

}  // namespace normlab
