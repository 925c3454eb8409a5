// The kernels' whole operations: what the autograd layer (autograd.cpp) and the bindings
// (bindings.cpp) call. Each takes float32 CPU tensors already laid out as the kernels read them
// — the caller (autograd.cpp's Plan) views them — and returns its statistics in double.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace normlab {

// Channel norms (channel.cpp): BatchNorm, GroupNorm, InstanceNorm, with a fused activation.
// xv is (P, S) planes (NCHW: one plane per (n, c)) or (U, S, C) columns (channels last).
// Forward: y = act((x − shift)·scale + bias) written into `out` (x itself in the in-place
// mode); returns {shift, offset, rstd, mean, var} per group (mean, var empty when given; with
// given statistics and keep_stats false, all five undefined: no backward will read them).
std::vector<at::Tensor> channel_forward(const at::Tensor& xv, bool planes, int64_t N, int64_t C, int64_t S,
                                        int64_t G, const at::Tensor& weight, const at::Tensor& bias,
                                        const at::Tensor& running_mean, const at::Tensor& running_var, double eps,
                                        int64_t act, double param, const at::Tensor& slope, const at::Tensor& out,
                                        bool keep_stats = true);
// Backward: {dx (view shape), dγ, dβ, d slope} (parameters in float64); from_output: the saved
// tensor is the output (in-place mode).
std::vector<at::Tensor> channel_backward(const at::Tensor& dyv, const at::Tensor& srcv, bool planes, int64_t N,
                                         int64_t C, int64_t S, int64_t G, bool given, bool from_output,
                                         const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& shift,
                                         const at::Tensor& offset, const at::Tensor& rstd, int64_t act, double param,
                                         const at::Tensor& slope);

// Masked channel norms (masked.cpp): the same over the valid positions of `mask`, a contiguous
// (N, S) bool tensor; xv is (N·C, S) planes or (N, S, C) columns (one unit per sample even
// for BatchNorm). Forward returns {shift, offset, rstd, mean, var, count} per group (the last
// three empty when given); y is 0 at padded positions, and so is dx.
std::vector<at::Tensor> masked_channel_forward(const at::Tensor& xv, const at::Tensor& mask, bool planes, int64_t N,
                                               int64_t C, int64_t S, int64_t G, const at::Tensor& weight,
                                               const at::Tensor& bias, const at::Tensor& running_mean,
                                               const at::Tensor& running_var, double eps, int64_t act, double param,
                                               const at::Tensor& slope, const at::Tensor& out);
std::vector<at::Tensor> masked_channel_backward(const at::Tensor& dyv, const at::Tensor& xv, const at::Tensor& mask,
                                                bool planes, int64_t N, int64_t C, int64_t S, int64_t G, bool given,
                                                const at::Tensor& weight, const at::Tensor& bias,
                                                const at::Tensor& shift_g, const at::Tensor& offset_g,
                                                const at::Tensor& rstd_g, const at::Tensor& count_g, int64_t act,
                                                double param, const at::Tensor& slope);

// The running-estimate update of one batch (running.cpp); false (nothing written) when the
// batch or the updated estimate is not finite.
bool running_update(const at::Tensor& running_mean, const at::Tensor& running_var, const at::Tensor& mean,
                    const at::Tensor& var, int64_t count, double momentum, const at::Tensor& num_batches_tracked,
                    bool unbiased);

// Row norms (row.cpp): LayerNorm (centered) and RMSNorm over the rows of a contiguous (R, K)
// view, optionally after a residual add. {shift, rstd, offr} per row (float32).
std::vector<at::Tensor> row_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, double eps,
                                    bool centered, const at::Tensor& out);
// The same on raw contiguous rows: y into yp; the statistics into kp, rp, op (R values each)
// unless they are null.
void row_forward(const float* x, int64_t R, int64_t K, const float* w, const float* b, double eps, bool centered,
                 float* y, float* shift, float* rstd, float* offr);
std::vector<at::Tensor> row_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                                     const at::Tensor& shift, const at::Tensor& rstd, const at::Tensor& offr,
                                     bool centered);
std::vector<at::Tensor> add_row_forward(const at::Tensor& x, const at::Tensor& res, const at::Tensor& w,
                                        const at::Tensor& b, double eps, bool centered, const at::Tensor& summed,
                                        const at::Tensor& out);
std::vector<at::Tensor> add_row_backward(const at::Tensor& dy, const at::Tensor& ds, const at::Tensor& src,
                                         const at::Tensor& w, const at::Tensor& shift, const at::Tensor& rstd,
                                         const at::Tensor& offr, bool centered);

}  // namespace normlab
