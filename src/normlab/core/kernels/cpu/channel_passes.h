// The two-pass route of the channel norms (channel_passes.cpp): a moments pass, then an apply
// pass, over planes (P, S) or columns (N, S, C). channel.cpp uses it for groups too large to
// stay in cache between the two (its fused route handles the rest).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace normlab {

std::vector<at::Tensor> plane_moments(const at::Tensor& x, const at::Tensor& shift);
at::Tensor plane_apply(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale, const at::Tensor& bias,
                       int64_t act, double param, const at::Tensor& slope, const at::Tensor& out);
// The same with the per-plane coefficients (and slopes, PReLU only) as pointers.
at::Tensor plane_apply(const at::Tensor& x, const float* shift, const float* scale, const float* bias, int64_t act,
                       double param, const float* slope, const at::Tensor& out);
std::vector<at::Tensor> plane_backward_reduce(const at::Tensor& dy, const at::Tensor& src, int64_t from_output,
                                              const at::Tensor& shift, const at::Tensor& scale,
                                              const at::Tensor& bias, int64_t act, double param,
                                              const at::Tensor& slope);
at::Tensor plane_backward_apply(const at::Tensor& dy, const at::Tensor& src, int64_t from_output,
                                const at::Tensor& shift, const at::Tensor& scale, const at::Tensor& bias,
                                int64_t act, double param, const at::Tensor& slope, const at::Tensor& coef_dz,
                                const at::Tensor& coef_u, const at::Tensor& coef_c);

std::vector<at::Tensor> column_moments(const at::Tensor& x, const at::Tensor& shift);
at::Tensor column_apply(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale, const at::Tensor& bias,
                        int64_t act, double param, const at::Tensor& slope, const at::Tensor& out);
// The same with the per-(unit, channel) coefficients (and per-channel slopes) as pointers.
at::Tensor column_apply(const at::Tensor& x, const float* shift, const float* scale, const float* bias, int64_t act,
                        double param, const float* slope, const at::Tensor& out);
std::vector<at::Tensor> column_backward_reduce(const at::Tensor& dy, const at::Tensor& src, int64_t from_output,
                                               const at::Tensor& shift, const at::Tensor& scale,
                                               const at::Tensor& bias, int64_t act, double param,
                                               const at::Tensor& slope);
at::Tensor column_backward_apply(const at::Tensor& dy, const at::Tensor& src, int64_t from_output,
                                 const at::Tensor& shift, const at::Tensor& scale, const at::Tensor& bias, int64_t act,
                                 double param, const at::Tensor& slope, const at::Tensor& coef_dz,
                                 const at::Tensor& coef_u, const at::Tensor& coef_c);

}  // namespace normlab
