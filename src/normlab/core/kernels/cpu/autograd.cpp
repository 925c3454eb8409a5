// The eager call path: kernels.cpp's operations with their autograd written in C++, so that
// an eager forward crosses from Python into C++ once and its backward runs without Python, as
// torch.nn's norms do. On small tensors the Python around a call (an autograd.Function on each
// side, a dozen tiny tensor ops, the running-estimate update) cost 2-3x the whole torch.nn call.
//
// Traced code — torch.compile, export, FakeTensor, meta, torch.func — never comes here: it
// calls the registered operators (torch.ops.normlab.*, ops.py), whose autograd formula is the
// same kernels'. The `fast_*` entries decide for themselves whether a call can run here and
// return None when not, so the caller falls back to the general dispatch (core/dispatch.py);
// the `eager_*` entries run what that dispatch has already chosen.
//
// Double backward (create_graph=True): the kernels' gradient carries no graph, so backward
// with grad mode on hands the saved operands to ops.py, which differentiates normlab's
// composed reference — the same rule as the operators'.
//
// Compiled autograd (torch._dynamo.compiled_autograd) traces a backward graph whose tensors
// are proxies and fake tensors, so the kernels cannot read them: there each node records a
// call of the registered backward operator (normlab::channel_norm_backward /
// row_norm_backward, which have fake kernels) through the dispatcher, as torch's generated
// nodes record their formulas. The eager `apply` below stays as it was.

#include "kernels.h"

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/TracerMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/dynamo/compiled_autograd.h>

#include <optional>
#include <stdexcept>
#include <tuple>
#include <vector>

namespace normlab {
namespace {

namespace py = pybind11;
using torch::autograd::InputMetadata;
using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;
using torch::dynamo::autograd::CompiledNodeArgs;
using torch::dynamo::autograd::PackedArgs;
using torch::dynamo::autograd::SwapSavedVariables;

at::Tensor value_or_undefined(const OptTensor& t) { return t.has_value() ? *t : at::Tensor(); }

// ---- where a call may run ------------------------------------------------------------------

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

// No jit.trace (it includes the Tracer key while tracing), torch.func transform (it includes the dynamic-layer key while its stack is not
// empty), TorchDispatchMode or TorchFunctionMode is active: each of them must see the call as
// operators (the general dispatch takes it).
bool eager_context() {
  return !at::tracer::impl::is_dispatch_enabled() &&
         !c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) &&
         c10::impl::TorchDispatchModeTLS::stack_len() == 0 && at::impl::PythonTorchFunctionTLS::stack_len() == 0;
}

bool records(const at::Tensor& t) { return t.defined() && t.requires_grad(); }

// Below autograd: the tensor ops inside a kernel call (allocations, views, conversions) are
// dispatched past the autograd and view-tracking layers, as in any C++ operator's autograd
// kernel — on small tensors those layers cost more than the ops. Nothing there is
// differentiated: one autograd node records the whole call.

// A parameter's gradient, from the kernels' float64 per-element sums, in the parameter's
// dtype and shape (a plain loop for float32: a tensor op costs more than the conversion).
at::Tensor grad_like(const at::Tensor& sums, const at::Tensor& param) {
  if (param.scalar_type() != at::kFloat || sums.scalar_type() != at::kDouble || !sums.is_contiguous() ||
      sums.numel() != param.numel())
    return sums.to(param.scalar_type()).view(param.sizes());
  at::Tensor out = at::empty(param.sizes(), param.options().memory_format(at::MemoryFormat::Contiguous));
  const double* src = sums.data_ptr<double>();
  float* dst = out.data_ptr<float>();
  for (int64_t i = 0, n = out.numel(); i < n; ++i) dst[i] = static_cast<float>(src[i]);
  return out;
}

const at::Tensor& empty_float() {
  static const at::Tensor empty = at::empty({0}, at::TensorOptions().dtype(at::kFloat));
  return empty;
}

// ---- channel norms (BatchNorm, GroupNorm, InstanceNorm; optional fused activation) ---------

// How an (N, C, *spatial) tensor maps onto the kernels, as ops.py's ChannelPlan: "planes"
// (NCHW-contiguous, one row per (n, c)) or "columns" (channels last, as (units, S, C)).
struct Plan {
  bool planes;
  int64_t N, C, S, G;
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

Layout layout_of(const at::Tensor& x) {
  if (x.dim() == 2) return x.is_contiguous() ? Layout::columns : Layout::other;
  if (x.is_contiguous()) return Layout::planes;
  if ((x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
      (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d)))
    return Layout::columns;
  return Layout::other;
}

Plan plan_of(const at::Tensor& x, int64_t groups) {
  const Layout layout = layout_of(x);
  TORCH_CHECK(layout != Layout::other, "normlab: the channel kernels read NCHW-contiguous or channels_last "
              "inputs, got strides ", x.strides());
  const int64_t N = x.size(0), C = x.size(1);
  return Plan{layout == Layout::planes, N, C, x.numel() / (N * C), groups};
}

// The incoming gradient in the saved input's memory format (a copy only if needed).
at::Tensor same_layout(const at::Tensor& dy, const Plan& p, const at::Tensor& like) {
  if (p.planes || like.dim() == 2) return dy.contiguous();
  return dy.contiguous(like.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d);
}

at::Tensor slope_of(const at::Tensor& prelu, int64_t act, int64_t C) {
  if (act == kernels.prelu && prelu.defined()) return prelu.detach().expand({C}).to(at::kFloat).contiguous();
  return empty_float();
}

struct ChannelResult {
  at::Tensor y, shift, offset, rstd, mean, var;  // mean, var undefined for given statistics
};

ChannelResult channel_run(const at::Tensor& x, const Plan& p, const at::Tensor& weight, const at::Tensor& bias,
                          const at::Tensor& running_mean, const at::Tensor& running_var, const at::Tensor& prelu,
                          double eps, int64_t act, double param) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // see `Below autograd` above
  at::Tensor y = at::empty_like(x);
  auto r = kernels.channel_forward(p.view(x), p.planes, p.N, p.C, p.S, p.G, weight, bias, running_mean, running_var,
                                   eps, act, param, slope_of(prelu, act, p.C), p.view(y));
  return {y, r[0], r[1], r[2], r[3], r[4]};
}

// ops.py's `name`(*args): a tuple of gradients (None where not wanted), for create_graph=True.
std::vector<at::Tensor> call_python(const char* name, const py::tuple& args) {
  try {
    py::tuple found = py::module_::import("normlab.core.fast.ops").attr(name)(*args);
    std::vector<at::Tensor> out;
    for (auto item : found) out.push_back(item.is_none() ? at::Tensor() : item.cast<at::Tensor>());
    return out;
  } catch (py::error_already_set& err) {
    throw std::runtime_error(err.what());
  }
}

// The autograd nodes are written as torch's generated ones are (a Node with its saved
// variables as members), not as a torch::autograd::Function, whose context (argument
// metadata, a keyed map for the non-tensor arguments) costs as much again on small tensors.
void save(SavedVariable& slot, const at::Tensor& t) {
  if (t.defined()) slot = SavedVariable(t, false);
}

// ---- compiled autograd ---------------------------------------------------------------------

// The outputs of the registered operator `name` on `args`, through the dispatcher: under
// compiled autograd's tracing its fake kernel answers, at run time its CPU kernel.
std::vector<at::Tensor> call_operator(const c10::OperatorHandle& op, torch::jit::Stack&& stack) {
  op.callBoxed(&stack);
  std::vector<at::Tensor> out;
  for (const auto& value : stack) out.push_back(value.toTensor());
  return out;
}

c10::OperatorHandle operator_named(const char* name) {
  // ops.py registers the operators on import, which every path into eager.cpp has done.
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

// A parameter's gradient from the operator's float64 sums, as grad_like does in eager calls
// (the same rounding), written with tensor ops so that it traces.
at::Tensor traced_grad_like(const at::Tensor& sums, const at::Tensor& param) {
  return sums.to(param.scalar_type()).view_symint(param.sym_sizes());
}

// The schema of a node's packed arguments, for compiled autograd's call into Python and back.
std::vector<at::TypePtr> schema_of(const std::vector<c10::IValue>& args) {
  std::vector<at::TypePtr> schema;
  for (const auto& value : args) schema.push_back(value.isTensor() ? at::TensorType::get() : value.type());
  return schema;
}

// Records `fn`(grads, *args) as one call in compiled autograd's graph (bound under the node's
// name on the first call, as torch's generated nodes are).
variable_list record_functional(const Node& node, bool& bound, torch::autograd::functional_apply_t fn,
                                const variable_list& grads, const PackedArgs& packed, SwapSavedVariables& saved) {
  const auto& interface = torch::dynamo::autograd::getPyCompilerInterface();
  const auto& args = packed.vec();
  if (!bound) {
    interface->bind_function(saved.get_py_compiler(), node.name(), std::move(fn), schema_of(args));
    bound = true;
  }
  auto output_metadata = torch::dynamo::autograd::IValuePacker<std::vector<std::optional<InputMetadata>>>::pack(
      torch::dynamo::autograd::get_input_metadata(node.next_edges()));
  return interface->call_function(saved.get_py_compiler(), "apply_functional", node.name(), grads, args,
                                  output_metadata);
}

// The traced backward of a channel norm: the arguments as ChannelNormBackward packs them.
variable_list channel_functional(const variable_list& grads, const std::vector<c10::IValue>& args) {
  PackedArgs packed{args};
  const bool need_x = packed.unpack<bool>(), need_w = packed.unpack<bool>(), need_b = packed.unpack<bool>(),
             need_p = packed.unpack<bool>();
  const at::Tensor x = packed.unpack<at::Tensor>(), weight = packed.unpack<at::Tensor>(),
                   bias = packed.unpack<at::Tensor>(), prelu = packed.unpack<at::Tensor>(),
                   shift = packed.unpack<at::Tensor>(), offset = packed.unpack<at::Tensor>(),
                   rstd = packed.unpack<at::Tensor>();
  const int64_t groups = packed.unpack<int64_t>();
  const bool given = packed.unpack<bool>();
  const int64_t act = packed.unpack<int64_t>();
  const double param = packed.unpack<double>(), eps = packed.unpack<double>();
  variable_list out(4);
  const at::Tensor& dy = grads[0];
  if (!dy.defined()) return out;
  if (at::GradMode::is_enabled()) {  // create_graph=True: as in eager calls
    py::gil_scoped_acquire gil;
    return call_python("_eager_channel_double_backward",
                       py::make_tuple(dy, x, weight, bias, prelu, shift, rstd, groups, given, eps, act, param,
                                      py::make_tuple(need_x, need_w, need_b, false, false, need_p)));
  }
  auto opt = [](const at::Tensor& t) { return t.defined() ? c10::IValue(t) : c10::IValue(); };
  static const c10::OperatorHandle op = operator_named("normlab::channel_norm_backward");
  auto r = call_operator(op, {dy, x, opt(weight), opt(bias), opt(prelu), shift, offset, rstd, groups, given, act,
                              param});
  if (need_x) out[0] = r[0];
  if (need_w && weight.defined()) out[1] = traced_grad_like(r[1], weight);
  if (need_b && bias.defined()) out[2] = traced_grad_like(r[2], bias);
  if (need_p && prelu.defined() && act == kernels.prelu)
    out[3] = prelu.sym_numel() == 1 ? r[3].to(prelu.scalar_type()).sum().reshape_symint(prelu.sym_sizes())
                                    : traced_grad_like(r[3], prelu);
  return out;
}

// The traced backward of a row norm: the arguments as RowNormBackward packs them.
variable_list row_functional(const variable_list& grads, const std::vector<c10::IValue>& args) {
  PackedArgs packed{args};
  const bool need_x = packed.unpack<bool>(), need_w = packed.unpack<bool>(), need_b = packed.unpack<bool>();
  const at::Tensor x = packed.unpack<at::Tensor>(), weight = packed.unpack<at::Tensor>(),
                   bias = packed.unpack<at::Tensor>(), shift = packed.unpack<at::Tensor>(),
                   rstd = packed.unpack<at::Tensor>(), offr = packed.unpack<at::Tensor>();
  const int64_t k = packed.unpack<int64_t>();
  const bool centered = packed.unpack<bool>();
  const double eps = packed.unpack<double>();
  variable_list out(3);
  const at::Tensor& dy = grads[0];
  if (!dy.defined()) return out;
  if (at::GradMode::is_enabled()) {  // create_graph=True: as in eager calls
    py::gil_scoped_acquire gil;
    return call_python("_eager_row_double_backward",
                       py::make_tuple(dy, x, weight, bias, k, eps, centered, py::make_tuple(need_x, need_w, need_b)));
  }
  static const c10::OperatorHandle op = operator_named("normlab::row_norm_backward");
  auto r = call_operator(op, {dy, x, weight.defined() ? c10::IValue(weight) : c10::IValue(), shift, rstd, offr, k,
                              centered});
  if (need_x) out[0] = r[0];
  if (need_w && weight.defined()) out[1] = traced_grad_like(r[1], weight);
  if (need_b && bias.defined()) out[2] = traced_grad_like(r[2], bias);
  return out;
}

// Backward of channel_forward. Gradient edges: x, γ, β, the PReLU slope (an absent tensor's
// edge is empty); the batch statistics are outputs without a gradient.
struct ChannelNormBackward : public Node {
  SavedVariable x_, weight_, bias_, prelu_, shift_, offset_, rstd_;
  int64_t groups_ = -1, act_ = 0;
  double eps_ = 0, param_ = 0;
  bool given_ = false;

  std::string name() const override { return "NormlabChannelNormBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable* v : {&x_, &weight_, &bias_, &prelu_, &shift_, &offset_, &rstd_}) v->reset_data();
  }

  void compiled_args(CompiledNodeArgs& args) const override {
    for (const SavedVariable* v : {&x_, &weight_, &bias_, &prelu_, &shift_, &offset_, &rstd_}) args.collect(*v, false);
    args.collect(groups_);
    args.collect(act_);
    args.collect(param_);
    args.collect(given_);
    args.collect(eps_);  // the double backward's
  }

  variable_list apply_with_saved(const variable_list& grads, SwapSavedVariables& saved) override {
    const std::initializer_list<SavedVariable*> vars{&x_, &weight_, &bias_, &prelu_, &shift_, &offset_, &rstd_};
    for (SavedVariable* v : vars) saved.before(*v);
    PackedArgs packed;
    for (size_t i = 0; i < 4; ++i) packed.pack(task_should_compute_output(i));
    for (SavedVariable* v : vars) packed.pack(v->unpack());
    packed.pack(groups_);
    packed.pack(given_);
    packed.pack(act_);
    packed.pack(param_);
    packed.pack(eps_);
    static bool bound = false;
    auto out = record_functional(*this, bound, channel_functional, grads, packed, saved);
    for (SavedVariable* v : vars) saved.after(*v);
    return out;
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    variable_list out(4);
    const at::Tensor& dy = grads[0];
    if (!dy.defined()) return out;
    const at::Tensor x = x_.unpack(), weight = weight_.unpack(), bias = bias_.unpack(), prelu = prelu_.unpack(),
                     shift = shift_.unpack(), offset = offset_.unpack(), rstd = rstd_.unpack();
    const bool need_x = task_should_compute_output(0), need_w = task_should_compute_output(1),
               need_b = task_should_compute_output(2), need_p = task_should_compute_output(3);
    if (at::GradMode::is_enabled()) {  // create_graph=True
      py::gil_scoped_acquire gil;
      return call_python("_eager_channel_double_backward",
                         py::make_tuple(dy, x, weight, bias, prelu, shift, rstd, groups_, given_, eps_, act_, param_,
                                        py::make_tuple(need_x, need_w, need_b, false, false, need_p)));
    }
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const Plan p = plan_of(x, groups_);
    auto r = kernels.channel_backward(p.view(same_layout(dy, p, x)), p.view(x), p.planes, p.N, p.C, p.S, groups_,
                                      given_, false, weight, bias, shift, offset, rstd, act_, param_,
                                      slope_of(prelu, act_, p.C));
    if (need_x) out[0] = p.unview(r[0], x);
    if (need_w) out[1] = grad_like(r[1], weight);
    if (need_b) out[2] = grad_like(r[2], bias);
    if (need_p && act_ == kernels.prelu)
      out[3] = prelu.numel() == 1 ? r[3].to(prelu.scalar_type()).sum().reshape(prelu.sizes()) : grad_like(r[3], prelu);
    return out;
  }
};

// (y, mean, var), recording the backward node when a gradient is wanted; the statistics
// undefined when given.
std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_call(const at::Tensor& x, const at::Tensor& weight,
                                                           const at::Tensor& bias, const at::Tensor& running_mean,
                                                           const at::Tensor& running_var, const at::Tensor& prelu,
                                                           int64_t groups, double eps, int64_t act, double param) {
  auto r = channel_run(x, plan_of(x, groups), weight, bias, running_mean, running_var, prelu, eps, act, param);
  if (at::GradMode::is_enabled() && (records(x) || records(weight) || records(bias) || records(prelu))) {
    auto node = c10::make_intrusive<ChannelNormBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(x, weight, bias, prelu));
    save(node->x_, x);
    save(node->weight_, weight);
    save(node->bias_, bias);
    save(node->prelu_, prelu);
    save(node->shift_, r.shift);
    save(node->offset_, r.offset);
    save(node->rstd_, r.rstd);
    node->groups_ = groups;
    node->act_ = act;
    node->eps_ = eps;
    node->param_ = param;
    node->given_ = running_mean.defined();
    torch::autograd::set_history(r.y, node);
  }
  return {r.y, r.mean, r.var};
}

// The dispatch has chosen the kernels: (y, mean, var), the statistics None when given.
std::tuple<at::Tensor, at::Tensor, at::Tensor> eager_channel_norm(const at::Tensor& x, const OptTensor& weight,
                                                                 const OptTensor& bias, const OptTensor& running_mean,
                                                                 const OptTensor& running_var, const OptTensor& prelu,
                                                                 int64_t groups, double eps, int64_t act,
                                                                 double param) {
  return channel_call(x, value_or_undefined(weight), value_or_undefined(bias), value_or_undefined(running_mean),
                      value_or_undefined(running_var), value_or_undefined(prelu), groups, eps, act, param);
}

// A module's whole call — normalization and, for BatchNorm in training, the running-estimate
// update — when the kernels apply; None when they do not (then nothing has been done).
// Returns y, or (y, mean, var) when the running estimates were not updated here (a batch that
// is not finite, or a policy other than skipping it): the caller updates them.
py::object fast_channel_norm(const at::Tensor& input, const OptTensor& weight_, const OptTensor& bias_,
                             const OptTensor& running_mean_, const OptTensor& running_var_,
                             const OptTensor& num_batches_tracked_, int64_t groups, bool batch_stats,
                             std::optional<double> momentum, bool unbiased, bool fold, double eps, int64_t act,
                             double param, const OptTensor& prelu_) {
  if (!plain_float_cpu(input) || input.dim() < 2 || input.numel() == 0 || !eager_context()) return py::none();
  const at::Tensor weight = value_or_undefined(weight_), bias = value_or_undefined(bias_),
                   running_mean = value_or_undefined(running_mean_), running_var = value_or_undefined(running_var_),
                   counter = value_or_undefined(num_batches_tracked_), prelu = value_or_undefined(prelu_);
  const int64_t N = input.size(0), C = input.size(1), S = input.numel() / (N * C);
  auto per_channel = [C](const at::Tensor& t) {
    return !t.defined() || (plain_float_cpu(t) && t.is_contiguous() && t.numel() == C);
  };
  if (!per_channel(weight) || !per_channel(bias) || !per_channel(running_mean) || !per_channel(running_var) ||
      running_mean.defined() != running_var.defined())
    return py::none();
  if (prelu.defined() && !(plain_float_cpu(prelu) && (prelu.numel() == 1 || prelu.numel() == C)))
    return py::none();
  if (counter.defined() && !(counter.device().is_cpu() && counter.scalar_type() == at::kLong && counter.numel() == 1))
    return py::none();
  if (batch_stats) {  // the cases the general path refuses, with its messages
    if (!(eps > 0)) return py::none();
    if (groups < 0 ? N * S <= 1 : (groups == 0 || C % groups != 0 || (C / groups) * S <= 1)) return py::none();
  } else if (!running_mean.defined() || groups >= 0) {
    return py::none();
  }
  const at::Tensor x = layout_of(input) == Layout::other ? input.contiguous() : input;
  auto [y, mean, var] = channel_call(x, weight, bias, batch_stats ? at::Tensor() : running_mean,
                                     batch_stats ? at::Tensor() : running_var, prelu, groups, eps, act, param);
  if (batch_stats && running_mean.defined()) {
    static const at::Tensor no_counter = at::empty({0}, at::TensorOptions().dtype(at::kLong));
    const bool folded = fold && (momentum.has_value() || counter.defined()) &&
                        kernels.running_update(running_mean, running_var, mean, var, N * S, momentum.value_or(-1.0),
                                               counter.defined() ? counter : no_counter, unbiased);
    if (!folded) return py::make_tuple(y, mean, var);
  }
  return py::cast(y);
}

// ---- row norms (LayerNorm, RMSNorm) ---------------------------------------------------------

at::Tensor flat(const at::Tensor& t) { return t.defined() ? t.reshape({-1}).contiguous() : t; }

struct RowResult {
  at::Tensor y, shift, rstd, offr;
};

RowResult row_run(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, int64_t k, double eps,
                  bool centered) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  at::Tensor y = at::empty_like(x);
  auto r = kernels.row_forward(x.view({-1, k}), flat(weight), flat(bias), eps, centered, y.view({-1, k}));
  return {y, r[0], r[1], r[2]};
}

// Backward of row_forward. Gradient edges: x, γ, β.
struct RowNormBackward : public Node {
  SavedVariable x_, weight_, bias_, shift_, rstd_, offr_;
  int64_t k_ = 1;
  double eps_ = 0;
  bool centered_ = true;

  std::string name() const override { return "NormlabRowNormBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable* v : {&x_, &weight_, &bias_, &shift_, &rstd_, &offr_}) v->reset_data();
  }

  void compiled_args(CompiledNodeArgs& args) const override {
    for (const SavedVariable* v : {&x_, &weight_, &bias_, &shift_, &rstd_, &offr_}) args.collect(*v, false);
    args.collect(k_);
    args.collect(centered_);
    args.collect(eps_);  // the double backward's
  }

  variable_list apply_with_saved(const variable_list& grads, SwapSavedVariables& saved) override {
    const std::initializer_list<SavedVariable*> vars{&x_, &weight_, &bias_, &shift_, &rstd_, &offr_};
    for (SavedVariable* v : vars) saved.before(*v);
    PackedArgs packed;
    for (size_t i = 0; i < 3; ++i) packed.pack(task_should_compute_output(i));
    for (SavedVariable* v : vars) packed.pack(v->unpack());
    packed.pack(k_);
    packed.pack(centered_);
    packed.pack(eps_);
    static bool bound = false;
    auto out = record_functional(*this, bound, row_functional, grads, packed, saved);
    for (SavedVariable* v : vars) saved.after(*v);
    return out;
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    variable_list out(3);
    const at::Tensor& dy = grads[0];
    if (!dy.defined()) return out;
    const at::Tensor x = x_.unpack(), weight = weight_.unpack(), bias = bias_.unpack();
    const bool need_x = task_should_compute_output(0), need_w = task_should_compute_output(1),
               need_b = task_should_compute_output(2);
    if (at::GradMode::is_enabled()) {  // create_graph=True
      py::gil_scoped_acquire gil;
      return call_python("_eager_row_double_backward",
                         py::make_tuple(dy, x, weight, bias, k_, eps_, centered_, py::make_tuple(need_x, need_w, need_b)));
    }
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto r = kernels.row_backward(dy.contiguous().view({-1, k_}), x.view({-1, k_}), flat(weight), shift_.unpack(),
                                  rstd_.unpack(), offr_.unpack(), centered_);
    if (need_x) out[0] = r[0].view_as(x);
    if (need_w) out[1] = grad_like(r[1], weight);
    if (need_b) out[2] = grad_like(r[2], bias);
    return out;
  }
};

at::Tensor row_call(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, int64_t k, double eps,
                    bool centered) {
  auto r = row_run(x, weight, bias, k, eps, centered);
  if (at::GradMode::is_enabled() && (records(x) || records(weight) || records(bias))) {
    auto node = c10::make_intrusive<RowNormBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(x, weight, bias));
    save(node->x_, x);
    save(node->weight_, weight);
    save(node->bias_, bias);
    save(node->shift_, r.shift);
    save(node->rstd_, r.rstd);
    save(node->offr_, r.offr);
    node->k_ = k;
    node->eps_ = eps;
    node->centered_ = centered;
    torch::autograd::set_history(r.y, node);
  }
  return r.y;
}

// The dispatch has chosen the kernels; `x` contiguous.
at::Tensor eager_row_norm(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias, int64_t k, double eps,
                          bool centered) {
  return row_call(x, value_or_undefined(weight), value_or_undefined(bias), k, eps, centered);
}

// A LayerNorm (centered) or RMSNorm call over the trailing `shape` when the kernels apply;
// None when they do not.
py::object fast_row_norm(const at::Tensor& input, const std::vector<int64_t>& shape, const OptTensor& weight_,
                         const OptTensor& bias_, double eps, bool centered) {
  const int64_t dims = static_cast<int64_t>(shape.size());
  if (!plain_float_cpu(input) || input.numel() == 0 || input.dim() < dims || !eager_context()) return py::none();
  int64_t k = 1;
  for (int64_t i = 0; i < dims; ++i) {
    if (input.size(input.dim() - dims + i) != shape[i]) return py::none();
    k *= shape[i];
  }
  const at::Tensor weight = value_or_undefined(weight_), bias = value_or_undefined(bias_);
  auto per_element = [k](const at::Tensor& t) { return !t.defined() || (plain_float_cpu(t) && t.numel() == k); };
  if (!per_element(weight) || !per_element(bias)) return py::none();
  // RMSNorm subtracts no mean: on other layouts torch's op, which keeps the layout, is as
  // accurate (the general dispatch's rule)
  if (!centered && !input.is_contiguous()) return py::none();
  return py::cast(row_call(input.contiguous(), weight, bias, k, eps, centered));
}

}  // namespace

void bind_eager(py::module_& m) {
  m.def("eager_channel_norm", &eager_channel_norm);
  m.def("fast_channel_norm", &fast_channel_norm);
  m.def("eager_row_norm", &eager_row_norm);
  m.def("fast_row_norm", &fast_row_norm);
}

}  // namespace normlab
