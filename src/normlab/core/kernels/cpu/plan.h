// How a tensor maps onto the kernels: the one place that knows the layouts they read. An
// (N, C, *spatial) tensor of a channel norm is "planes" (NCHW-contiguous, one row of S values
// per (n, c)) or "columns" (channels last, viewed as (units, S, C)); a row norm reads
// contiguous rows of K values. Python never views tensors for the kernels: every entry
// (entries.cpp) and every autograd node (autograd.cpp) goes through this file.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <vector>

#include "activation.h"

namespace normlab {

struct Plan {
  bool planes;
  int64_t N, C, S, G;  // G < 0: one statistics group per channel (BatchNorm, given statistics)
  int64_t units() const { return (G < 0 && !planes) ? 1 : N; }

  at::Tensor view(const at::Tensor& x) const {
    if (planes) return x.view({N * C, S});
    if (x.dim() == 2) return x.view({units(), -1, C});
    std::vector<int64_t> order{0};
    for (int64_t d = 2; d < x.dim(); ++d) order.push_back(d);
    order.push_back(1);
    return x.permute(order).view({units(), -1, C});  // channels last: a view, no copy
  }

  // A kernel's (P, S) or (U, S, C) result shaped and laid out like `like`.
  at::Tensor unview(const at::Tensor& v, const at::Tensor& like) const {
    if (planes || like.dim() == 2) return v.view(like.sizes());
    std::vector<int64_t> shape{like.size(0)}, order{0, like.dim() - 1};
    for (int64_t d = 2; d < like.dim(); ++d) shape.push_back(like.size(d));
    shape.push_back(like.size(1));
    for (int64_t d = 1; d < like.dim() - 1; ++d) order.push_back(d);
    return v.view(shape).permute(order);
  }
};

enum class Layout { planes, columns, other };

inline Layout layout_of(const at::Tensor& x) {
  if (x.dim() == 2) return x.is_contiguous() ? Layout::columns : Layout::other;
  if (x.is_contiguous()) return Layout::planes;
  if ((x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
      (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d)))
    return Layout::columns;
  return Layout::other;
}

// The plan of `x`, which must be in a layout the kernels read (the callers make other
// layouts contiguous first; the in-place mode never gets one: the path rule sends it to the
// composed ops).
inline Plan plan_of(const at::Tensor& x, int64_t groups) {
  const Layout layout = layout_of(x);
  TORCH_CHECK(layout != Layout::other, "normlab: the channel kernels read NCHW-contiguous or channels_last "
              "inputs, got strides ", x.strides());
  const int64_t N = x.size(0), C = x.size(1);
  return Plan{layout == Layout::planes, N, C, x.numel() / (N * C), groups};
}

// The plan of a masked call: one unit per sample in both layouts (the mask varies by sample),
// so a channels_last input is viewed (N, S, C) even for BatchNorm.
inline Plan masked_plan(const at::Tensor& x) {
  Plan p = plan_of(x, 0);
  p.G = 0;
  return p;
}

// The incoming gradient in the saved input's memory format (a copy only if needed).
inline at::Tensor same_layout(const at::Tensor& dy, const Plan& p, const at::Tensor& like) {
  if (p.planes || like.dim() == 2) return dy.contiguous();
  return dy.contiguous(like.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d);
}

inline const at::Tensor& empty_float() {
  static const at::Tensor empty = at::empty({0}, at::TensorOptions().dtype(at::kFloat));
  return empty;
}

// PReLU's slopes, one per channel, as the kernels read them; empty for other activations.
inline at::Tensor slope_of(const at::Tensor& prelu, int64_t act, int64_t C) {
  if (act == PRELU && prelu.defined()) return prelu.detach().expand({C}).to(at::kFloat).contiguous();
  return empty_float();
}

// A row norm's γ or β as the kernels read it: K contiguous values (undefined stays undefined).
inline at::Tensor flat(const at::Tensor& t) { return t.defined() ? t.reshape({-1}).contiguous() : t; }

}  // namespace normlab
