// The autograd nodes of the kernels' eager calls (autograd.cpp): each records one forward's
// backward on its output(s) when a gradient is wanted, so that backward runs the backward
// kernel with no Python, as torch.nn's norms do.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

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

// The backward of a masked channel norm (masked.cpp) on y: `mask` is the (N, *spatial) bool
// mask, `count` the valid count per group (undefined when `given`), `running_mean` and
// `running_var` the given statistics (undefined otherwise), which a double backward reads.
void record_masked_channel_node(const at::Tensor& y, const at::Tensor& x, const at::Tensor& mask,
                                const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& prelu,
                                const at::Tensor& shift, const at::Tensor& offset, const at::Tensor& rstd,
                                const at::Tensor& count, const at::Tensor& running_mean,
                                const at::Tensor& running_var, int64_t groups, bool given, double eps, int64_t act,
                                double param);

// That node's backward on the kernels: {dx (x's shape and layout), dγ, dβ, d slope}, the
// parameters' in float64 — also the body of the operator compiled autograd records
// (normlab::masked_channel_norm_backward, entries.cpp).
std::vector<at::Tensor> masked_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mask,
                                        const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& prelu,
                                        const at::Tensor& shift, const at::Tensor& offset, const at::Tensor& rstd,
                                        const at::Tensor& count, int64_t groups, bool given, int64_t act,
                                        double param);

bool wants_grad(const at::Tensor& t);

}  // namespace normlab
