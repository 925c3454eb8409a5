// The kernels as Python calls them — one eager entry per norm family, and the bodies of the
// registered operators (operators.py) — and the compiled module's bindings.
//
// The eager entries run what the path rule (normlab/core/paths.py) has chosen: an eager call
// on plain float32 CPU tensors, outside any tracer, mode or transform. They choose nothing.
// They check only what the kernels need and the rule does not guarantee — parameters and
// buffers that fit the input, two or more values per group in training (and BatchNorm's
// eps > 0) — and
// where one of those fails they do nothing and return None: the caller then runs normlab's
// checks, which report the error with the message every path gives (a C++ message would be a
// second one). A call crosses from Python into C++ once: checks, kernel, the running-estimate
// update, and the autograd node (autograd.cpp).
//
// The operator bodies are what torch.ops.normlab.* run on real tensors (traced code, modes,
// subclasses): the same kernels, with the layout handled here (plan.h) rather than in Python.

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/TracerMode.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "autograd.h"
#include "kernels.h"
#include "loops.h"
#include "plan.h"

namespace normlab {
namespace {

namespace py = pybind11;
using OptTensor = std::optional<at::Tensor>;

at::Tensor value_or_undefined(const OptTensor& t) { return t.has_value() ? *t : at::Tensor(); }

// γ or β as the row kernels read it, without a view when it already is contiguous.
at::Tensor contiguous_or_flat(const at::Tensor& t) { return !t.defined() || t.is_contiguous() ? t : flat(t); }

// A plain float32 CPU tensor: no tensor subclass, functorch wrapper, functional tensor or
// negative-bit view, whose data the kernels may read directly.
bool plain_float_cpu(const at::Tensor& t) {
  static const c10::DispatchKeySet wrapped({c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot,
                                            c10::DispatchKey::Functionalize, c10::DispatchKey::FuncTorchBatched,
                                            c10::DispatchKey::FuncTorchGradWrapper, c10::DispatchKey::Negative,
                                            c10::DispatchKey::Conjugate});
  return t.defined() && t.layout() == at::kStrided && t.device().is_cpu() && t.scalar_type() == at::kFloat &&
         !t.key_set().has_any(wrapped);
}

// The path rule's first row (normlab/core/paths.py) asks this, and decides: x is a plain
// float32 CPU tensor with values, and no jit.trace (it includes the Tracer key while tracing),
// torch.func transform (the dynamic-layer key while its stack is not empty),
// TorchDispatchMode or TorchFunctionMode is active. Read here in one call, where the same
// questions asked one by one from Python cost more than a small tensor's whole kernel.
bool plain_eager(const at::Tensor& x) {
  return plain_float_cpu(x) && x.numel() > 0 && !at::tracer::impl::is_dispatch_enabled() &&
         !c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) &&
         c10::impl::TorchDispatchModeTLS::stack_len() == 0 && at::impl::PythonTorchFunctionTLS::stack_len() == 0;
}

// Absent, or a plain float32 CPU tensor of n values (any strides: the kernels copy what
// they read of γ and β).
bool fits(const at::Tensor& t, int64_t n) { return !t.defined() || (plain_float_cpu(t) && t.numel() == n); }
// γ/β of the row family: the normalized shape itself, not only its element count (a module's
// weight replaced after construction reaches here unchecked)
bool fits(const at::Tensor& t, at::IntArrayRef shape) {
  return !t.defined() || (plain_float_cpu(t) && t.sizes() == shape);
}

// The channel family's γ, β and PReLU slopes (C or 1 of them) as the kernels read them, for the
// plain and the masked entry alike.
bool channel_parameters_fit(const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& prelu, int64_t C) {
  return fits(weight, C) && fits(bias, C) && (!prelu.defined() || fits(prelu, C) || fits(prelu, 1));
}

// Below autograd: the tensor ops inside a kernel call (allocations, views, conversions) are
// dispatched past the autograd and view-tracking layers, as in any C++ operator's autograd
// kernel — on small tensors those layers cost more than the ops. Nothing there is
// differentiated: one autograd node (autograd.cpp) records the whole call.
// (y, shift, offset, rstd, mean, var): y written into `into` (x itself in the in-place mode),
// or a new tensor laid out like x when `into` is undefined.
std::vector<at::Tensor> channel_run(const at::Tensor& x, const Plan& p, const at::Tensor& weight,
                                    const at::Tensor& bias, const at::Tensor& running_mean,
                                    const at::Tensor& running_var, const at::Tensor& prelu, double eps, int64_t act,
                                    double param, const at::Tensor& into, bool keep_stats = true) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  at::Tensor y = into.defined() ? into : at::empty_like(x);
  auto s = channel_forward(p.view(x), p.planes, p.N, p.C, p.S, p.G, weight, bias, running_mean, running_var, eps, act,
                           param, slope_of(prelu, act, p.C), p.view(y), keep_stats);
  return {y, s[0], s[1], s[2], s[3], s[4]};
}

// ---- the running-statistics policy (normlab.core.running.RunningStats) ---------------------

struct Running {
  at::Tensor mean, var, counter;
  std::optional<double> momentum;  // none: the cumulative average
  bool unbiased = true, skip = true;
};

at::Tensor buffer(py::handle buffers, const char* name) {
  PyObject* t = PyDict_GetItemString(buffers.ptr(), name);  // a borrowed reference, or null
  return t == nullptr || t == Py_None ? at::Tensor() : py::handle(t).cast<at::Tensor>();
}

Running running_of(py::handle policy) {
  Running r;
  py::handle buffers = policy.attr("buffers");
  r.mean = buffer(buffers, "running_mean");
  r.var = buffer(buffers, "running_var");
  r.counter = buffer(buffers, "num_batches_tracked");
  py::object momentum = policy.attr("momentum");
  if (!momentum.is_none()) r.momentum = momentum.cast<double>();
  r.unbiased = policy.attr("unbiased").cast<bool>();
  r.skip = policy.attr("skips_nonfinite").cast<bool>();
  return r;
}

// Both estimates of C values the kernels can read, or neither.
bool running_estimates_fit(const Running& r, int64_t C) {
  return fits(r.mean, C) && fits(r.var, C) && r.mean.defined() == r.var.defined();
}

// The kernels' running-estimate update (running.cpp) of a batch's float64 statistics, per
// channel or per (sample, channel); false, having written nothing, where it is left to the
// policy's torch ops: a batch that is not finite, on_nonfinite="raise" (both need Python's
// warning or error), buffers that are not contiguous float32/float64, a counter that is not a
// CPU long scalar.
bool update(const Running& r, const at::Tensor& mean, const at::Tensor& var, int64_t count) {
  const bool counted = r.counter.defined() && r.counter.device().is_cpu() && r.counter.scalar_type() == at::kLong &&
                       r.counter.numel() == 1;
  const bool buffers = r.mean.defined() && r.var.defined() && r.mean.device().is_cpu() &&
                       r.mean.scalar_type() == r.var.scalar_type() &&
                       (r.mean.scalar_type() == at::kFloat || r.mean.scalar_type() == at::kDouble) &&
                       r.mean.is_contiguous() && r.var.is_contiguous() && r.mean.numel() == r.var.numel();
  if (!(r.skip && buffers && (counted || !r.counter.defined()) && (r.momentum.has_value() || counted))) return false;
  if (mean.scalar_type() != at::kDouble || !mean.is_contiguous() || mean.numel() % r.mean.numel() != 0) return false;
  static const at::Tensor no_counter = at::empty({0}, at::TensorOptions().dtype(at::kLong));
  return running_update(r.mean, r.var, mean, var.contiguous(), count, r.momentum.value_or(-1.0),
                        counted ? r.counter : no_counter, r.unbiased);
}

// The same for Python: the kernels' calls that do not take the direct entry (the in-place
// mode, the operator a mode sees) update this way on real tensors.
bool update_running(py::handle policy, const at::Tensor& mean, const at::Tensor& var, int64_t count) {
  return update(running_of(policy), mean, var, count);
}

// ---- channel norms (BatchNorm, GroupNorm, InstanceNorm; optional fused activation) ---------

// The channel family's eager call: normalization and, in training with a policy, the
// running-estimate update. groups = -1: BatchNorm; G: GroupNorm (InstanceNorm: G = C, the
// only grouping with running estimates). Returns y; (y, mean, var, count) when the update is
// left to the policy's torch ops (a batch that is not finite, on_nonfinite="raise", buffers
// or a counter the kernel does not write); None when a check failed (see the top).
py::object channel_norm(const at::Tensor& input, const OptTensor& weight_, const OptTensor& bias_,
                        py::handle running, int64_t groups, bool batch_stats, double eps, int64_t act, double param,
                        const OptTensor& prelu_) {
  if (input.dim() < 2) return py::none();
  const at::Tensor weight = value_or_undefined(weight_), bias = value_or_undefined(bias_),
                   prelu = value_or_undefined(prelu_);
  const int64_t N = input.size(0), C = input.size(1), S = input.numel() / (N * C);
  if (!channel_parameters_fit(weight, bias, prelu, C)) return py::none();
  Running r;
  const bool tracked = !running.is_none();
  if (tracked) {
    r = running_of(running);
    if (!running_estimates_fit(r, C)) return py::none();
  }
  if (batch_stats) {
    if (groups < 0 && !(eps > 0)) return py::none();  // BatchNorm refuses eps = 0 in training, as torch.nn
    if (groups < 0 ? N * S <= 1 : (groups == 0 || C % groups != 0 || (C / groups) * S <= 1)) return py::none();
    if (tracked && r.mean.defined() && groups >= 0 && groups != C) return py::none();
  } else if (!r.mean.defined()) {
    return py::none();
  }
  const bool given = !batch_stats;
  const at::Tensor x = layout_of(input) == Layout::other ? input.contiguous() : input;
  const Plan p = plan_of(x, given ? -1 : groups);
  // with given statistics the kernel builds the saved statistics only for a backward
  const bool backward = at::GradMode::is_enabled() &&
                        (wants_grad(x) || wants_grad(weight) || wants_grad(bias) || wants_grad(prelu));
  auto s = channel_run(x, p, weight, bias, given ? r.mean : at::Tensor(), given ? r.var : at::Tensor(), prelu, eps,
                       act, param, at::Tensor(), backward);
  const at::Tensor& y = s[0];
  if (backward) record_channel_node(y, x, weight, bias, prelu, s[1], s[2], s[3], p.G, given, eps, act, param);
  if (!batch_stats || !r.mean.defined()) return py::cast(y);
  const int64_t count = groups < 0 ? N * S : S;  // values behind each statistic
  if (update(r, s[4], s[5], count)) return py::cast(y);
  return py::make_tuple(y, s[4], s[5], count);
}

// normlab::channel_norm's body: (y, shift, offset, rstd, mean, var), the statistics float64
// per group (mean, var empty when given). `inplace`: y is written over x (the in-place mode).
std::vector<at::Tensor> channel_forward_op(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
                                           const OptTensor& running_mean, const OptTensor& running_var,
                                           const OptTensor& prelu, int64_t groups, double eps, int64_t act,
                                           double param, bool inplace) {
  const bool given = running_mean.has_value();
  const Plan p = plan_of(x, given ? -1 : groups);
  auto s = channel_run(x, p, value_or_undefined(weight), value_or_undefined(bias), value_or_undefined(running_mean),
                       value_or_undefined(running_var), value_or_undefined(prelu), eps, act, param,
                       inplace ? x : at::Tensor());
  if (given) {  // an operator never returns one tensor twice
    const auto opts = at::TensorOptions().dtype(at::kDouble);
    return {s[0], s[1], s[2], s[3], at::empty({0}, opts), at::empty({0}, opts)};
  }
  return s;
}

// normlab::channel_norm_backward's body: (dx, dγ, dβ, dPReLU), the parameters' in float64 per
// channel. `src` is the forward's input, or its output in the in-place mode (`from_output`).
std::vector<at::Tensor> channel_backward_op(const at::Tensor& dy, const at::Tensor& src, const OptTensor& weight,
                                            const OptTensor& bias, const OptTensor& prelu, const at::Tensor& shift,
                                            const at::Tensor& offset, const at::Tensor& rstd, int64_t groups,
                                            bool given, bool from_output, int64_t act, double param) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Plan p = plan_of(src, given ? -1 : groups);
  auto r = channel_backward(p.view(same_layout(dy, p, src)), p.view(src), p.planes, p.N, p.C, p.S, p.G, given,
                            from_output, value_or_undefined(weight), value_or_undefined(bias), shift, offset, rstd,
                            act, param, slope_of(value_or_undefined(prelu), act, p.C));
  return {p.unview(r[0], src), r[1], r[2], r[3]};
}

// The in-place mode's kept channels for an activation whose inverse loses nothing (all but
// ELU): normlab.core.activation.unrecoverable_channels's test, |γ| < guard or
// 4·eps·|β| > tolerance·|γ|, in float32 as its torch ops compute it, in one call rather than
// a dozen tensor ops (a third of the in-place forward at 2×512×14×14). The indices (int64),
// or None where every channel's x̂ comes back from the output.
py::object kept_channels(const OptTensor& weight_, const OptTensor& bias_, int64_t C, double four_eps,
                         double tolerance, double guard) {
  auto as_float = [](const OptTensor& t) {
    return !t.has_value() ? at::Tensor() : t->scalar_type() == at::kFloat && t->is_contiguous() ? *t
                                                                                               : t->to(at::kFloat).contiguous();
  };
  const at::Tensor weight = as_float(weight_), bias = as_float(bias_);
  const float *w = opt_ptr(weight), *b = opt_ptr(bias);
  const float e = static_cast<float>(four_eps), tol = static_cast<float>(tolerance), g0 = static_cast<float>(guard);
  std::vector<int64_t> kept;
  for (int64_t c = 0; c < C; ++c) {
    const float gamma = w ? std::abs(w[c]) : 1.f, beta = b ? std::abs(b[c]) : 0.f;
    if (gamma < g0 || e * beta > tol * gamma) kept.push_back(c);
  }
  if (kept.empty()) return py::none();
  at::Tensor out = at::empty({static_cast<int64_t>(kept.size())}, at::TensorOptions().dtype(at::kLong));
  std::copy(kept.begin(), kept.end(), out.data_ptr<int64_t>());
  return py::cast(out);
}

// ---- masked channel norms (masked.cpp) ----------------------------------------------------

// The mask as normlab's checks hand it on (normlab/core/call_checks.py): contiguous, then
// broadcast to (N, *spatial), a view; undefined where its shape does not broadcast there. Made
// with autograd's dispatch, so that the view shares the mask's version counter (the node saves
// it, and a mask changed in place before backward is refused as any saved tensor is).
at::Tensor positions_mask(const at::Tensor& mask, const at::Tensor& x) {
  std::vector<int64_t> positions{x.size(0)};
  for (int64_t d = 2; d < x.dim(); ++d) positions.push_back(x.size(d));
  const int64_t k = static_cast<int64_t>(positions.size());
  if (mask.dim() > k) return at::Tensor();
  for (int64_t i = 1; i <= mask.dim(); ++i) {
    const int64_t m = mask.size(mask.dim() - i), p = positions[k - i];
    if (m != 1 && m != p) return at::Tensor();
  }
  return (mask.is_contiguous() ? mask : mask.contiguous()).expand(positions);
}

// The masked channel family's eager call, as the path rule's "kernels, masked" runs it: the
// same crossing as channel_norm's — checks, the masked kernel, the running-estimate update,
// the autograd node — for a plain float32 CPU input in a layout the kernels read and a bool
// CPU `mask` of valid positions ((N, *spatial) or broadcast to it; the rule asked both). Returns
// y; (y, mean, var, count), the statistics per group in float64, where the running update is
// left to Python — InstanceNorm's (each instance unbiased with its own valid count, in the
// policy's torch ops) and, for BatchNorm, what channel_norm leaves (see update); None when a
// check failed. A batch with fewer than 2 valid values per channel leaves BatchNorm's
// estimates as they are.
py::object masked_channel_norm(const at::Tensor& input, const OptTensor& weight_, const OptTensor& bias_,
                               const at::Tensor& mask_, py::handle running, int64_t groups, bool batch_stats,
                               double eps, int64_t act, double param, const OptTensor& prelu_) {
  if (input.dim() < 2 || !(eps >= 0 && eps < std::numeric_limits<double>::infinity())) return py::none();
  const at::Tensor weight = value_or_undefined(weight_), bias = value_or_undefined(bias_),
                   prelu = value_or_undefined(prelu_);
  const int64_t C = input.size(1);
  if (!channel_parameters_fit(weight, bias, prelu, C)) return py::none();
  if (groups == 0 || (groups > 0 && C % groups != 0)) return py::none();
  Running r;
  const bool tracked = !running.is_none();
  if (tracked) {
    r = running_of(running);
    if (!running_estimates_fit(r, C)) return py::none();
  }
  if (batch_stats) {
    if (groups < 0 && !(eps > 0)) return py::none();  // BatchNorm refuses eps = 0 in training, as torch.nn
    if (tracked && r.mean.defined() && groups >= 0 && groups != C) return py::none();
  } else if (!r.mean.defined()) {
    return py::none();
  }
  const at::Tensor mask = positions_mask(mask_, input);
  if (!mask.defined()) return py::none();
  const bool given = !batch_stats;
  const at::Tensor x = layout_of(input) == Layout::other ? input.contiguous() : input;
  const Plan p = masked_plan(x);
  const at::Tensor m = mask.reshape({p.N, p.S}).contiguous();  // one bool per (sample, position)
  at::Tensor y;
  std::vector<at::Tensor> s;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    y = at::empty_like(x);
    s = masked_channel_forward(p.view(x), m, p.planes, p.N, p.C, p.S, groups, weight, bias,
                               given ? r.mean : at::Tensor(), given ? r.var : at::Tensor(), eps, act, param,
                               slope_of(prelu, act, p.C), p.view(y));
  }
  // s: shift, offset, rstd, mean, var, count per group (the last three undefined when given)
  record_masked_channel_node(y, x, mask, weight, bias, prelu, s[0], s[1], s[2], s[5], given ? r.mean : at::Tensor(),
                             given ? r.var : at::Tensor(), groups, given, eps, act, param);
  if (!batch_stats || !r.mean.defined()) return py::cast(y);
  if (groups < 0) {
    // every channel has the same valid count; under 2 the batch has no variance to merge
    const auto valid = static_cast<int64_t>(s[5].data_ptr<double>()[0]);
    if (valid < 2 || update(r, s[3], s[4], valid)) return py::cast(y);
  }
  return py::make_tuple(y, s[3], s[4], s[5]);
}

// normlab::masked_channel_norm_backward's body — the masked node's backward where compiled
// autograd traces it: (dx, dγ, dβ, d slope), the parameters' in float64. `mask`: bool,
// (N, *spatial) or broadcast to it; `count`: the valid count per group (None when given).
std::vector<at::Tensor> masked_channel_backward_op(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mask,
                                                   const OptTensor& weight, const OptTensor& bias,
                                                   const OptTensor& prelu, const at::Tensor& shift,
                                                   const at::Tensor& offset, const at::Tensor& rstd,
                                                   const OptTensor& count, int64_t groups, bool given, int64_t act,
                                                   double param) {
  return masked_backward(dy, x, mask, value_or_undefined(weight), value_or_undefined(bias), value_or_undefined(prelu),
                         shift, offset, rstd, value_or_undefined(count), groups, given, act, param);
}

// ---- row norms (LayerNorm, RMSNorm, and the residual add before them) ----------------------

// The row family's eager call over the trailing `shape`: y, or (y, x + residual) with a
// residual of x's shape; None when a check failed (see the top).
py::object row_norm(const at::Tensor& input, const std::vector<int64_t>& shape, const OptTensor& weight_,
                    const OptTensor& bias_, double eps, bool centered, const OptTensor& residual_) {
  const int64_t dims = static_cast<int64_t>(shape.size());
  if (input.dim() < dims) return py::none();
  int64_t k = 1;
  for (int64_t i = 0; i < dims; ++i) {
    if (input.size(input.dim() - dims + i) != shape[i]) return py::none();
    k *= shape[i];
  }
  const at::Tensor weight = value_or_undefined(weight_), bias = value_or_undefined(bias_),
                   residual = value_or_undefined(residual_);
  if (k == 0 || !fits(weight, shape) || !fits(bias, shape)) return py::none();
  const at::Tensor x = input.contiguous();
  if (residual.defined()) {
    if (!plain_float_cpu(residual) || residual.sizes() != input.sizes()) return py::none();
    const at::Tensor r = residual.contiguous();
    at::Tensor y, s;
    std::vector<at::Tensor> stats;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      y = at::empty_like(x);
      s = at::empty_like(x);
      stats = add_row_forward(x.view({-1, k}), r.view({-1, k}), flat(weight), flat(bias), eps, centered,
                              s.view({-1, k}), y.view({-1, k}));
    }
    record_add_row_node(y, s, x, r, weight, bias, stats[0], stats[1], stats[2], k, eps, centered);
    return py::make_tuple(y, s);
  }
  at::Tensor y;
  std::vector<at::Tensor> stats;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    y = at::empty_like(x);
    if (!(at::GradMode::is_enabled() && (wants_grad(x) || wants_grad(weight) || wants_grad(bias)))) {
      // no backward: no statistics to keep, and no views — at batch 1 the tensors' bookkeeping
      // costs as much as the rows' arithmetic
      const at::Tensor w = contiguous_or_flat(weight), b = contiguous_or_flat(bias);
      row_forward(x.data_ptr<float>(), x.numel() / k, k, opt_ptr(w), opt_ptr(b), eps, centered, y.data_ptr<float>(),
                  nullptr, nullptr, nullptr);
      return py::cast(y);
    }
    stats = row_forward(x.view({-1, k}), flat(weight), flat(bias), eps, centered, y.view({-1, k}));
  }
  record_row_node(y, x, weight, bias, stats[0], stats[1], stats[2], k, eps, centered);
  return py::cast(y);
}

// normlab::row_norm's body: (y, shift, rstd, offr) over the trailing k elements of a
// contiguous x.
std::vector<at::Tensor> row_forward_op(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias, int64_t k,
                                       double eps, bool centered) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  at::Tensor y = at::empty_like(x);
  auto s = row_forward(x.view({-1, k}), flat(value_or_undefined(weight)), flat(value_or_undefined(bias)), eps,
                       centered, y.view({-1, k}));
  return {y, s[0], s[1], s[2]};
}

// normlab::row_norm_backward's body: (dx, dγ, dβ), the parameters' float64 over the k elements.
std::vector<at::Tensor> row_backward_op(const at::Tensor& dy, const at::Tensor& x, const OptTensor& weight,
                                        const at::Tensor& shift, const at::Tensor& rstd, const at::Tensor& offr,
                                        int64_t k, bool centered) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto r = row_backward(dy.contiguous().view({-1, k}), x.view({-1, k}), flat(value_or_undefined(weight)), shift,
                        rstd, offr, centered);
  return {r[0].view(x.sizes()), r[1], r[2]};
}

// normlab::add_row_norm's body: (y, s, shift, rstd, offr) for contiguous, same-shaped x and
// residual.
std::vector<at::Tensor> add_row_forward_op(const at::Tensor& x, const at::Tensor& residual, const OptTensor& weight,
                                           const OptTensor& bias, int64_t k, double eps, bool centered) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  at::Tensor y = at::empty_like(x), s = at::empty_like(x);
  auto st = add_row_forward(x.view({-1, k}), residual.view({-1, k}), flat(value_or_undefined(weight)),
                            flat(value_or_undefined(bias)), eps, centered, s.view({-1, k}), y.view({-1, k}));
  return {y, s, st[0], st[1], st[2]};
}

// normlab::add_row_norm_backward's body: (d_sum, dγ, dβ), d_sum = ds + norm_backward(dy) the
// gradient of x and of the residual.
std::vector<at::Tensor> add_row_backward_op(const at::Tensor& dy, const OptTensor& ds, const at::Tensor& s,
                                            const OptTensor& weight, const at::Tensor& shift, const at::Tensor& rstd,
                                            const at::Tensor& offr, int64_t k, bool centered) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto r = add_row_backward(dy.contiguous().view({-1, k}), ds.has_value() ? ds->contiguous().view({-1, k}) : empty_float(),
                            s.view({-1, k}), flat(value_or_undefined(weight)), shift, rstd, offr, centered);
  return {r[0].view(s.sizes()), r[1], r[2]};
}

}  // namespace
}  // namespace normlab

// The compiled module: the entries above, and the activation codes the kernels switch on
// (activation.h's enum Act) by normlab's names — normlab.core.activation.ACTIVATIONS holds the
// same codes, and the loader (build.py) refuses a module whose table differs from it.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace normlab;
  m.doc() = "normlab's float32 CPU normalization kernels";
  pybind11::dict activation_codes;
  for (const auto& [name, code] : {std::pair<const char*, Act>{"identity", IDENTITY}, {"relu", RELU},
                                   {"leaky_relu", LEAKY}, {"elu", ELU}, {"silu", SILU}, {"prelu", PRELU}})
    activation_codes[name] = static_cast<int>(code);
  m.attr("activation_codes") = activation_codes;
  m.def("plain_eager", &plain_eager);
  m.def("channel_norm", &channel_norm);
  m.def("row_norm", &row_norm);
  m.def("update_running", &update_running);
  m.def("kept_channels", &kept_channels);
  m.def("channel_forward", &channel_forward_op);
  m.def("channel_backward", &channel_backward_op);
  m.def("masked_channel_norm", &masked_channel_norm);
  m.def("masked_channel_backward", &masked_channel_backward_op);
  m.def("row_forward", &row_forward_op);
  m.def("row_backward", &row_backward_op);
  m.def("add_row_forward", &add_row_forward_op);
  m.def("add_row_backward", &add_row_backward_op);
}
