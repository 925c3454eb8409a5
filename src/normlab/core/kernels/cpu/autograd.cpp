// The autograd nodes of the kernels' eager calls (declared in autograd.h). An eager forward
// crosses from Python into C++ once (entries.cpp) and records one of these nodes, whose
// backward runs the backward kernel with no Python, as torch.nn's norms do. They are written
// as torch's generated nodes are (a Node with its saved variables as members), not as a
// torch::autograd::Function, whose context (argument metadata, a keyed map for the non-tensor
// arguments) costs as much again on small tensors.
//
// Double backward (create_graph=True): the kernels' gradient carries no graph, so backward
// with grad mode on hands the saved operands to double_backward.py, which differentiates
// normlab's composed reference — the same rule as the registered operators' (operators.py).
//
// Compiled autograd (torch._dynamo.compiled_autograd) traces a backward graph whose tensors
// are proxies and fake tensors, so the kernels cannot read them: there each node records a
// call of the registered backward operator (normlab::channel_norm_backward, row_norm_backward,
// add_row_norm_backward, which have fake kernels) through the dispatcher, as torch's
// generated nodes record their formulas. The eager `apply` stays as it is.

#include "autograd.h"

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/dynamo/compiled_autograd.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <stdexcept>
#include <vector>

#include "kernels.h"
#include "plan.h"

namespace normlab {
namespace {

namespace py = pybind11;
using torch::autograd::InputMetadata;
using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;
using torch::dynamo::autograd::CompiledNodeArgs;
using torch::dynamo::autograd::PackedArgs;
using torch::dynamo::autograd::SwapSavedVariables;

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

// double_backward.py's `name`(*args): a tuple of gradients (None where not wanted), for
// create_graph=True.
std::vector<at::Tensor> call_python(const char* name, const py::tuple& args) {
  try {
    py::tuple found = py::module_::import("normlab.core.kernels.cpu.double_backward").attr(name)(*args);
    std::vector<at::Tensor> out;
    for (auto item : found) out.push_back(item.is_none() ? at::Tensor() : item.cast<at::Tensor>());
    return out;
  } catch (py::error_already_set& err) {
    throw std::runtime_error(err.what());
  }
}

void save(SavedVariable& slot, const at::Tensor& t, bool is_output = false) {
  if (t.defined()) slot = SavedVariable(t, is_output);
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
  // operators.py registers the operators on import, which every path here has done.
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
    return call_python("channel",
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
  if (need_p && prelu.defined() && act == PRELU)
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
    return call_python("row",
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

// The traced backward of an add + row norm: the arguments as AddRowNormBackward packs them.
variable_list add_row_functional(const variable_list& grads, const std::vector<c10::IValue>& args) {
  PackedArgs packed{args};
  const bool need_x = packed.unpack<bool>(), need_r = packed.unpack<bool>(), need_w = packed.unpack<bool>(),
             need_b = packed.unpack<bool>();
  const at::Tensor s = packed.unpack<at::Tensor>(), weight = packed.unpack<at::Tensor>(),
                   bias = packed.unpack<at::Tensor>(), shift = packed.unpack<at::Tensor>(),
                   rstd = packed.unpack<at::Tensor>(), offr = packed.unpack<at::Tensor>();
  const int64_t k = packed.unpack<int64_t>();
  const bool centered = packed.unpack<bool>();
  const double eps = packed.unpack<double>();
  variable_list out(4);
  const at::Tensor &dy = grads[0], &ds = grads[1];
  at::Tensor d_sum;
  if (!dy.defined()) {  // only the sum was differentiated
    d_sum = ds;
    if (need_w && weight.defined()) out[2] = at::zeros_like(weight);
    if (need_b && bias.defined()) out[3] = at::zeros_like(bias);
  } else if (at::GradMode::is_enabled()) {  // create_graph=True: as in eager calls
    py::gil_scoped_acquire gil;
    auto g = call_python("add_row", py::make_tuple(dy, ds.defined() ? py::cast(ds) : py::none(), s, weight, bias, k,
                                                   eps, centered, py::make_tuple(need_w, need_b)));
    d_sum = g[0];
    out[2] = g[1];
    out[3] = g[2];
  } else {
    auto opt = [](const at::Tensor& t) { return t.defined() ? c10::IValue(t) : c10::IValue(); };
    static const c10::OperatorHandle op = operator_named("normlab::add_row_norm_backward");
    auto r = call_operator(op, {dy, opt(ds), s, opt(weight), shift, rstd, offr, k, centered});
    d_sum = r[0];
    if (need_w && weight.defined()) out[2] = traced_grad_like(r[1], weight);
    if (need_b && bias.defined()) out[3] = traced_grad_like(r[2], bias);
  }
  if (!d_sum.defined()) d_sum = at::zeros_like(s);
  if (need_x) out[0] = d_sum;
  if (need_r) out[1] = d_sum;
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
      return call_python("channel",
                         py::make_tuple(dy, x, weight, bias, prelu, shift, rstd, groups_, given_, eps_, act_, param_,
                                        py::make_tuple(need_x, need_w, need_b, false, false, need_p)));
    }
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const Plan p = plan_of(x, groups_);
    auto r = channel_backward(p.view(same_layout(dy, p, x)), p.view(x), p.planes, p.N, p.C, p.S, groups_,
                                      given_, false, weight, bias, shift, offset, rstd, act_, param_,
                                      slope_of(prelu, act_, p.C));
    if (need_x) out[0] = p.unview(r[0], x);
    if (need_w) out[1] = grad_like(r[1], weight);
    if (need_b) out[2] = grad_like(r[2], bias);
    if (need_p && act_ == PRELU)
      out[3] = prelu.numel() == 1 ? r[3].to(prelu.scalar_type()).sum().reshape(prelu.sizes()) : grad_like(r[3], prelu);
    return out;
  }
};

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
      return call_python("row",
                         py::make_tuple(dy, x, weight, bias, k_, eps_, centered_, py::make_tuple(need_x, need_w, need_b)));
    }
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto r = row_backward(dy.contiguous().view({-1, k_}), x.view({-1, k_}), flat(weight), shift_.unpack(),
                                  rstd_.unpack(), offr_.unpack(), centered_);
    if (need_x) out[0] = r[0].view_as(x);
    if (need_w) out[1] = grad_like(r[1], weight);
    if (need_b) out[2] = grad_like(r[2], bias);
    return out;
  }
};

// Backward of add_row_forward: s = x + residual, y = norm(s). Gradient edges: x, the residual,
// γ, β; both outputs receive gradients (y from the next sublayer, s from the residual stream),
// either possibly none. x and the residual get the same gradient, ds + norm_backward(dy).
struct AddRowNormBackward : public Node {
  SavedVariable s_, weight_, bias_, shift_, rstd_, offr_;
  int64_t k_ = 1;
  double eps_ = 0;
  bool centered_ = true;

  std::string name() const override { return "NormlabAddRowNormBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable* v : {&s_, &weight_, &bias_, &shift_, &rstd_, &offr_}) v->reset_data();
  }

  void compiled_args(CompiledNodeArgs& args) const override {
    args.collect(s_, true);  // an output of this node
    for (const SavedVariable* v : {&weight_, &bias_, &shift_, &rstd_, &offr_}) args.collect(*v, false);
    args.collect(k_);
    args.collect(centered_);
    args.collect(eps_);
  }

  variable_list apply_with_saved(const variable_list& grads, SwapSavedVariables& saved) override {
    const std::initializer_list<SavedVariable*> vars{&s_, &weight_, &bias_, &shift_, &rstd_, &offr_};
    for (SavedVariable* v : vars) saved.before(*v);
    PackedArgs packed;
    for (size_t i = 0; i < 4; ++i) packed.pack(task_should_compute_output(i));
    for (SavedVariable* v : vars) packed.pack(v->unpack(getptr()));
    packed.pack(k_);
    packed.pack(centered_);
    packed.pack(eps_);
    static bool bound = false;
    auto out = record_functional(*this, bound, add_row_functional, grads, packed, saved);
    for (SavedVariable* v : vars) saved.after(*v);
    return out;
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    variable_list out(4);
    const at::Tensor &dy = grads[0], &ds = grads[1];
    const at::Tensor s = s_.unpack(getptr()), weight = weight_.unpack(), bias = bias_.unpack();
    const bool need_x = task_should_compute_output(0), need_r = task_should_compute_output(1),
               need_w = task_should_compute_output(2), need_b = task_should_compute_output(3);
    at::Tensor d_sum;
    if (!dy.defined()) {  // only the sum was differentiated: the norm's parameters get zeros, as the operator's do
      d_sum = ds;
      if (need_w && weight.defined()) out[2] = at::zeros_like(weight);
      if (need_b && bias.defined()) out[3] = at::zeros_like(bias);
    } else if (at::GradMode::is_enabled()) {  // create_graph=True
      py::gil_scoped_acquire gil;
      auto g = call_python("add_row", py::make_tuple(dy, ds.defined() ? py::cast(ds) : py::none(), s, weight, bias,
                                                     k_, eps_, centered_, py::make_tuple(need_w, need_b)));
      d_sum = g[0];
      out[2] = g[1];
      out[3] = g[2];
    } else {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      auto r = add_row_backward(dy.contiguous().view({-1, k_}), ds.defined() ? ds.contiguous().view({-1, k_}) : empty_float(),
                                s.view({-1, k_}), flat(weight), shift_.unpack(), rstd_.unpack(), offr_.unpack(),
                                centered_);
      d_sum = r[0].view_as(s);
      if (need_w) out[2] = grad_like(r[1], weight);
      if (need_b) out[3] = grad_like(r[2], bias);
    }
    if (!d_sum.defined()) d_sum = at::zeros_like(s);
    if (need_x) out[0] = d_sum;
    if (need_r) out[1] = d_sum;
    return out;
  }
};

}  // namespace

bool wants_grad(const at::Tensor& t) { return t.defined() && t.requires_grad(); }

void record_channel_node(const at::Tensor& y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                         const at::Tensor& prelu, const at::Tensor& shift, const at::Tensor& offset,
                         const at::Tensor& rstd, int64_t groups, bool given, double eps, int64_t act, double param) {
  if (!(at::GradMode::is_enabled() && (wants_grad(x) || wants_grad(weight) || wants_grad(bias) || wants_grad(prelu))))
    return;
  auto node = c10::make_intrusive<ChannelNormBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(x, weight, bias, prelu));
  save(node->x_, x);
  save(node->weight_, weight);
  save(node->bias_, bias);
  save(node->prelu_, prelu);
  save(node->shift_, shift);
  save(node->offset_, offset);
  save(node->rstd_, rstd);
  node->groups_ = groups;
  node->act_ = act;
  node->eps_ = eps;
  node->param_ = param;
  node->given_ = given;
  torch::autograd::set_history(y, node);
}

void record_row_node(const at::Tensor& y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                     const at::Tensor& shift, const at::Tensor& rstd, const at::Tensor& offr, int64_t k, double eps,
                     bool centered) {
  if (!(at::GradMode::is_enabled() && (wants_grad(x) || wants_grad(weight) || wants_grad(bias)))) return;
  auto node = c10::make_intrusive<RowNormBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(x, weight, bias));
  save(node->x_, x);
  save(node->weight_, weight);
  save(node->bias_, bias);
  save(node->shift_, shift);
  save(node->rstd_, rstd);
  save(node->offr_, offr);
  node->k_ = k;
  node->eps_ = eps;
  node->centered_ = centered;
  torch::autograd::set_history(y, node);
}

void record_add_row_node(const at::Tensor& y, const at::Tensor& s, const at::Tensor& x, const at::Tensor& residual,
                         const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& shift,
                         const at::Tensor& rstd, const at::Tensor& offr, int64_t k, double eps, bool centered) {
  if (!(at::GradMode::is_enabled() &&
        (wants_grad(x) || wants_grad(residual) || wants_grad(weight) || wants_grad(bias))))
    return;
  auto node = c10::make_intrusive<AddRowNormBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(x, residual, weight, bias));
  torch::autograd::set_history(y, node);  // output 0
  torch::autograd::set_history(s, node);  // output 1
  save(node->s_, s, /*is_output=*/true);  // an output of this node: saved without a reference cycle
  save(node->weight_, weight);
  save(node->bias_, bias);
  save(node->shift_, shift);
  save(node->rstd_, rstd);
  save(node->offr_, offr);
  node->k_ = k;
  node->eps_ = eps;
  node->centered_ = centered;
}

}  // namespace normlab
