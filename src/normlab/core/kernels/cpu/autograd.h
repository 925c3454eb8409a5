// The autograd nodes of the kernels' eager calls (autograd.cpp): each records one forward's
// backward on its output(s) when a gradient is wanted, so that backward runs the backward
// kernel with no Python, as torch.nn's norms do.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace normlab {

// The backward of a channel norm (BatchNorm, GroupNorm, InstanceNorm + activation) on y.
void record_channel_node(const at::Tensor& y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                         const at::Tensor& prelu, const at::Tensor& shift, const at::Tensor& offset,
                         const at::Tensor& rstd, int64_t groups, bool given, double eps, int64_t act, double param);

// The backward of a LayerNorm/RMSNorm over the trailing k elements on y.
void record_row_node(const at::Tensor& y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                     const at::Tensor& shift, const at::Tensor& rstd, const at::Tensor& offr, int64_t k, double eps,
                     bool centered);

// The backward of s = x + residual, y = norm(s) on both outputs.
void record_add_row_node(const at::Tensor& y, const at::Tensor& s, const at::Tensor& x, const at::Tensor& residual,
                         const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& shift,
                         const at::Tensor& rstd, const at::Tensor& offr, int64_t k, double eps, bool centered);

bool wants_grad(const at::Tensor& t);

}  // namespace normlab
