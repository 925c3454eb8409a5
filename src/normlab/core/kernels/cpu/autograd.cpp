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
#include <ATen/ExpandUtils.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/dynamo/compiled_autograd.h>
#include <torch/csrc/utils/pybind.h>

#include <array>
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

c10::IValue optional_arg(const at::Tensor& t) { return t.defined() ? c10::IValue(t) : c10::IValue(); }

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

// ---- the nodes -----------------------------------------------------------------------------

// What the three nodes share: `Family` names the saved tensors (kSaved of them, slot kOutput
// an output of the node, saved without a reference cycle; -1 when none), the gradient edges
// (kEdges), the scalars (a struct whose `each` visits them in one order, for packing,
// unpacking and compiled autograd's collection alike) and `backward`(grads, tensors, scalars,
// needs, traced): the one backward of the family, run by `apply` on the kernels (traced =
// false) and recorded by `apply_with_saved` as a call of the registered operator (traced =
// true).
template <typename Family>
struct KernelNode : public Node {
  using Scalars = typename Family::Scalars;
  using Tensors = std::array<at::Tensor, Family::kSaved>;
  using Needs = std::array<bool, Family::kEdges>;

  std::array<SavedVariable, Family::kSaved> saved_;
  Scalars scalars_;

  std::string name() const override { return Family::kName; }

  void save(int slot, const at::Tensor& t) {
    if (t.defined()) saved_[slot] = SavedVariable(t, /*is_output=*/slot == Family::kOutput);
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable& v : saved_) v.reset_data();
  }

  void compiled_args(CompiledNodeArgs& args) const override {
    for (int i = 0; i < Family::kSaved; ++i) args.collect(saved_[i], i == Family::kOutput);
    Scalars::each(scalars_, [&](const auto& value) { args.collect(value); });  // eps: the double backward's
  }

  variable_list apply_with_saved(const variable_list& grads, SwapSavedVariables& saved) override {
    for (SavedVariable& v : saved_) saved.before(v);
    PackedArgs packed;
    for (bool need : needs()) packed.pack(need);
    for (const at::Tensor& t : unpacked()) packed.pack(t);
    Scalars::each(scalars_, [&](const auto& value) { packed.pack(value); });
    static bool bound = false;
    auto out = record_functional(*this, bound, traced, grads, packed, saved);
    for (SavedVariable& v : saved_) saved.after(v);
    return out;
  }

  // The lock guards the saved tensors against release_variables only while they are
  // unpacked: the backward itself runs unlocked, because a double backward (create_graph)
  // may re-enter this node — add + norm differentiates its own saved output, whose graph
  // leads back here on the way to γ and β — and std::mutex is not recursive (it deadlocked).
  variable_list apply(variable_list&& grads) override {
    Tensors tensors;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      tensors = unpacked();
    }
    return Family::backward(grads, tensors, scalars_, needs(), /*traced=*/false);
  }

 private:
  Needs needs() const {
    Needs out;
    for (int i = 0; i < Family::kEdges; ++i) out[i] = task_should_compute_output(i);
    return out;
  }

  Tensors unpacked() {
    Tensors out;
    for (int i = 0; i < Family::kSaved; ++i)
      out[i] = i == Family::kOutput ? saved_[i].unpack(getptr()) : saved_[i].unpack();
    return out;
  }

  // The traced backward: the arguments as apply_with_saved packs them.
  static variable_list traced(const variable_list& grads, const std::vector<c10::IValue>& args) {
    PackedArgs packed{args};
    Needs needs;
    for (bool& need : needs) need = packed.unpack<bool>();
    Tensors tensors;
    for (at::Tensor& t : tensors) t = packed.unpack<at::Tensor>();
    Scalars scalars;
    Scalars::each(scalars, [&](auto& value) { value = packed.unpack<std::decay_t<decltype(value)>>(); });
    return Family::backward(grads, tensors, scalars, needs, /*traced=*/true);
  }
};

// Backward of channel_forward. Gradient edges: x, γ, β, the PReLU slope (an absent tensor's
// edge is empty); the batch statistics are outputs without a gradient.
struct ChannelFamily {
  static constexpr const char* kName = "NormlabChannelNormBackward";
  enum { X, WEIGHT, BIAS, PRELU_WEIGHT, SHIFT, OFFSET, RSTD, kSaved };
  static constexpr int kOutput = -1, kEdges = 4;
  struct Scalars {
    int64_t groups = -1, act = 0;
    bool given = false;
    double param = 0, eps = 0;
    template <typename Self, typename F>
    static void each(Self& s, F&& f) {
      f(s.groups), f(s.given), f(s.act), f(s.param), f(s.eps);
    }
  };

  static variable_list backward(const variable_list& grads, const std::array<at::Tensor, kSaved>& t,
                                const Scalars& s, const std::array<bool, kEdges>& need, bool traced) {
    variable_list out(kEdges);
    const at::Tensor& dy = grads[0];
    if (!dy.defined()) return out;
    const at::Tensor &x = t[X], &weight = t[WEIGHT], &bias = t[BIAS], &prelu = t[PRELU_WEIGHT];
    if (at::GradMode::is_enabled()) {  // create_graph=True
      py::gil_scoped_acquire gil;
      return call_python("channel", py::make_tuple(dy, x, weight, bias, prelu, t[SHIFT], t[RSTD], s.groups, s.given,
                                                   s.eps, s.act, s.param,
                                                   py::make_tuple(need[0], need[1], need[2], false, false, need[3])));
    }
    std::vector<at::Tensor> r;
    if (traced) {
      static const c10::OperatorHandle op = operator_named("normlab::channel_norm_backward");
      r = call_operator(op, {dy, x, optional_arg(weight), optional_arg(bias), optional_arg(prelu), t[SHIFT],
                             t[OFFSET], t[RSTD], s.groups, s.given, s.act, s.param});
    } else {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      const Plan p = plan_of(x, s.groups);
      r = channel_backward(p.view(same_layout(dy, p, x)), p.view(x), p.planes, p.N, p.C, p.S, s.groups, s.given,
                           false, weight, bias, t[SHIFT], t[OFFSET], t[RSTD], s.act, s.param,
                           slope_of(prelu, s.act, p.C));
      r[0] = p.unview(r[0], x);
    }
    const auto like = traced ? traced_grad_like : grad_like;
    if (need[0]) out[0] = r[0];
    if (need[1] && weight.defined()) out[1] = like(r[1], weight);
    if (need[2] && bias.defined()) out[2] = like(r[2], bias);
    if (need[3] && prelu.defined() && s.act == normlab::PRELU)
      out[3] = prelu.sym_numel() == 1 ? r[3].to(prelu.scalar_type()).sum().reshape_symint(prelu.sym_sizes())
                                      : like(r[3], prelu);
    return out;
  }
};

// Backward of masked_channel_forward (entries.cpp's masked_channel_norm). Gradient edges: x,
// γ, β, the PReLU slope. The mask, the valid counts and (with given statistics) the running
// estimates are saved for the kernels' backward and for a double backward's composed reference.
struct MaskedChannelFamily {
  static constexpr const char* kName = "NormlabMaskedChannelNormBackward";
  enum { X, MASK, WEIGHT, BIAS, PRELU_WEIGHT, SHIFT, OFFSET, RSTD, COUNT, RUNNING_MEAN, RUNNING_VAR, kSaved };
  static constexpr int kOutput = -1, kEdges = 4;
  using Scalars = ChannelFamily::Scalars;

  static variable_list backward(const variable_list& grads, const std::array<at::Tensor, kSaved>& t,
                                const Scalars& s, const std::array<bool, kEdges>& need, bool traced) {
    variable_list out(kEdges);
    const at::Tensor& dy = grads[0];
    if (!dy.defined()) return out;
    const at::Tensor &x = t[X], &mask = t[MASK], &weight = t[WEIGHT], &bias = t[BIAS], &prelu = t[PRELU_WEIGHT];
    if (at::GradMode::is_enabled()) {  // create_graph=True
      py::gil_scoped_acquire gil;
      return call_python("masked_channel",
                         py::make_tuple(dy, x, mask, weight, bias, prelu, t[RUNNING_MEAN], t[RUNNING_VAR], s.groups,
                                        s.given, s.eps, s.act, s.param,
                                        py::make_tuple(need[0], need[1], need[2], need[3])));
    }
    std::vector<at::Tensor> r;
    if (traced) {
      static const c10::OperatorHandle op = operator_named("normlab::masked_channel_norm_backward");
      r = call_operator(op, {dy, x, mask, optional_arg(weight), optional_arg(bias), optional_arg(prelu), t[SHIFT],
                             t[OFFSET], t[RSTD], optional_arg(t[COUNT]), s.groups, s.given, s.act, s.param});
    } else {
      r = masked_backward(dy, x, mask, weight, bias, prelu, t[SHIFT], t[OFFSET], t[RSTD], t[COUNT], s.groups, s.given,
                          s.act, s.param);
    }
    const auto like = traced ? traced_grad_like : grad_like;
    if (need[0]) out[0] = r[0];
    if (need[1] && weight.defined()) out[1] = like(r[1], weight);
    if (need[2] && bias.defined()) out[2] = like(r[2], bias);
    // summed to the slopes' shape in float64 (one slope: the sum over the channels), then rounded
    if (need[3] && prelu.defined()) out[3] = at::sum_to(r[3], prelu.sym_sizes()).to(prelu.scalar_type());
    return out;
  }
};

// Backward of row_forward. Gradient edges: x, γ, β.
struct RowFamily {
  static constexpr const char* kName = "NormlabRowNormBackward";
  enum { X, WEIGHT, BIAS, SHIFT, RSTD, OFFR, kSaved };
  static constexpr int kOutput = -1, kEdges = 3;
  struct Scalars {
    int64_t k = 1;
    bool centered = true;
    double eps = 0;
    template <typename Self, typename F>
    static void each(Self& s, F&& f) {
      f(s.k), f(s.centered), f(s.eps);
    }
  };

  static variable_list backward(const variable_list& grads, const std::array<at::Tensor, kSaved>& t,
                                const Scalars& s, const std::array<bool, kEdges>& need, bool traced) {
    variable_list out(kEdges);
    const at::Tensor& dy = grads[0];
    if (!dy.defined()) return out;
    const at::Tensor &x = t[X], &weight = t[WEIGHT], &bias = t[BIAS];
    if (at::GradMode::is_enabled()) {  // create_graph=True
      py::gil_scoped_acquire gil;
      return call_python("row", py::make_tuple(dy, x, weight, bias, s.k, s.eps, s.centered,
                                               py::make_tuple(need[0], need[1], need[2])));
    }
    std::vector<at::Tensor> r;
    if (traced) {
      static const c10::OperatorHandle op = operator_named("normlab::row_norm_backward");
      r = call_operator(op, {dy, x, optional_arg(weight), t[SHIFT], t[RSTD], t[OFFR], s.k, s.centered});
    } else {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      r = row_backward(dy.contiguous().view({-1, s.k}), x.view({-1, s.k}), flat(weight), t[SHIFT], t[RSTD],
                       t[OFFR], s.centered);
      r[0] = r[0].view_as(x);
    }
    const auto like = traced ? traced_grad_like : grad_like;
    if (need[0]) out[0] = r[0];
    if (need[1] && weight.defined()) out[1] = like(r[1], weight);
    if (need[2] && bias.defined()) out[2] = like(r[2], bias);
    return out;
  }
};

// Backward of add_row_forward: s = x + residual, y = norm(s). Gradient edges: x, the residual,
// γ, β; both outputs receive gradients (y from the next sublayer, s from the residual stream),
// either possibly none. x and the residual get the same gradient, ds + norm_backward(dy).
struct AddRowFamily {
  static constexpr const char* kName = "NormlabAddRowNormBackward";
  enum { SUM, WEIGHT, BIAS, SHIFT, RSTD, OFFR, kSaved };
  static constexpr int kOutput = SUM, kEdges = 4;
  using Scalars = RowFamily::Scalars;

  static variable_list backward(const variable_list& grads, const std::array<at::Tensor, kSaved>& t,
                                const Scalars& sc, const std::array<bool, kEdges>& need, bool traced) {
    variable_list out(kEdges);
    const at::Tensor &dy = grads[0], &ds = grads[1];
    const at::Tensor &s = t[SUM], &weight = t[WEIGHT], &bias = t[BIAS];
    const int64_t k = sc.k;
    at::Tensor d_sum;
    if (!dy.defined()) {  // only the sum was differentiated: the norm's parameters get zeros, as the operator's do
      d_sum = ds;
      if (need[2] && weight.defined()) out[2] = at::zeros_like(weight);
      if (need[3] && bias.defined()) out[3] = at::zeros_like(bias);
    } else if (at::GradMode::is_enabled()) {  // create_graph=True
      py::gil_scoped_acquire gil;
      auto g = call_python("add_row", py::make_tuple(dy, ds.defined() ? py::cast(ds) : py::none(), s, weight, bias, k,
                                                     sc.eps, sc.centered, py::make_tuple(need[2], need[3])));
      d_sum = g[0];
      out[2] = g[1];
      out[3] = g[2];
    } else {
      std::vector<at::Tensor> r;
      if (traced) {
        static const c10::OperatorHandle op = operator_named("normlab::add_row_norm_backward");
        r = call_operator(op, {dy, optional_arg(ds), s, optional_arg(weight), t[SHIFT], t[RSTD], t[OFFR], k,
                               sc.centered});
      } else {
        at::AutoDispatchBelowADInplaceOrView below_autograd;
        const at::Tensor ds_rows = ds.defined() ? ds.contiguous().view({-1, k}) : empty_float();
        r = add_row_backward(dy.contiguous().view({-1, k}), ds_rows, s.view({-1, k}), flat(weight), t[SHIFT],
                             t[RSTD], t[OFFR], sc.centered);
        r[0] = r[0].view_as(s);
      }
      const auto like = traced ? traced_grad_like : grad_like;
      d_sum = r[0];
      if (need[2] && weight.defined()) out[2] = like(r[1], weight);
      if (need[3] && bias.defined()) out[3] = like(r[2], bias);
    }
    if (!d_sum.defined()) d_sum = at::zeros_like(s);
    if (need[0]) out[0] = d_sum;
    if (need[1]) out[1] = d_sum;
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
  using F = ChannelFamily;
  auto node = c10::make_intrusive<KernelNode<F>>();
  node->set_next_edges(torch::autograd::collect_next_edges(x, weight, bias, prelu));
  for (auto [slot, t] : {std::pair{F::X, &x}, {F::WEIGHT, &weight}, {F::BIAS, &bias}, {F::PRELU_WEIGHT, &prelu},
                         {F::SHIFT, &shift}, {F::OFFSET, &offset}, {F::RSTD, &rstd}})
    node->save(slot, *t);
  node->scalars_ = {groups, act, given, param, eps};
  torch::autograd::set_history(y, node);
}

void record_masked_channel_node(const at::Tensor& y, const at::Tensor& x, const at::Tensor& mask,
                                const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& prelu,
                                const at::Tensor& shift, const at::Tensor& offset, const at::Tensor& rstd,
                                const at::Tensor& count, const at::Tensor& running_mean,
                                const at::Tensor& running_var, int64_t groups, bool given, double eps, int64_t act,
                                double param) {
  if (!(at::GradMode::is_enabled() && (wants_grad(x) || wants_grad(weight) || wants_grad(bias) || wants_grad(prelu))))
    return;
  using F = MaskedChannelFamily;
  auto node = c10::make_intrusive<KernelNode<F>>();
  node->set_next_edges(torch::autograd::collect_next_edges(x, weight, bias, prelu));
  for (auto [slot, t] : {std::pair{F::X, &x}, {F::MASK, &mask}, {F::WEIGHT, &weight}, {F::BIAS, &bias},
                         {F::PRELU_WEIGHT, &prelu}, {F::SHIFT, &shift}, {F::OFFSET, &offset}, {F::RSTD, &rstd},
                         {F::COUNT, &count}, {F::RUNNING_MEAN, &running_mean}, {F::RUNNING_VAR, &running_var}})
    node->save(slot, *t);
  node->scalars_ = {groups, act, given, param, eps};
  torch::autograd::set_history(y, node);
}

std::vector<at::Tensor> masked_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mask,
                                        const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& prelu,
                                        const at::Tensor& shift, const at::Tensor& offset, const at::Tensor& rstd,
                                        const at::Tensor& count, int64_t groups, bool given, int64_t act,
                                        double param) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Plan p = masked_plan(x);
  const at::Tensor m = mask.reshape({p.N, p.S}).contiguous();
  auto r = masked_channel_backward(p.view(same_layout(dy, p, x)), p.view(x), m, p.planes, p.N, p.C, p.S, groups,
                                   given, weight, bias, shift, offset, rstd, count, act, param,
                                   slope_of(prelu, act, p.C));
  r[0] = p.unview(r[0], x);
  return r;
}

void record_row_node(const at::Tensor& y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                     const at::Tensor& shift, const at::Tensor& rstd, const at::Tensor& offr, int64_t k, double eps,
                     bool centered) {
  if (!(at::GradMode::is_enabled() && (wants_grad(x) || wants_grad(weight) || wants_grad(bias)))) return;
  using F = RowFamily;
  auto node = c10::make_intrusive<KernelNode<F>>();
  node->set_next_edges(torch::autograd::collect_next_edges(x, weight, bias));
  for (auto [slot, t] : {std::pair{F::X, &x}, {F::WEIGHT, &weight}, {F::BIAS, &bias}, {F::SHIFT, &shift},
                         {F::RSTD, &rstd}, {F::OFFR, &offr}})
    node->save(slot, *t);
  node->scalars_ = {k, centered, eps};
  torch::autograd::set_history(y, node);
}

void record_add_row_node(const at::Tensor& y, const at::Tensor& s, const at::Tensor& x, const at::Tensor& residual,
                         const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& shift,
                         const at::Tensor& rstd, const at::Tensor& offr, int64_t k, double eps, bool centered) {
  if (!(at::GradMode::is_enabled() &&
        (wants_grad(x) || wants_grad(residual) || wants_grad(weight) || wants_grad(bias))))
    return;
  using F = AddRowFamily;
  auto node = c10::make_intrusive<KernelNode<F>>();
  node->set_next_edges(torch::autograd::collect_next_edges(x, residual, weight, bias));
  torch::autograd::set_history(y, node);  // output 0
  torch::autograd::set_history(s, node);  // output 1
  // s after set_history: an output of this node, saved without a reference cycle
  for (auto [slot, t] : {std::pair{F::SUM, &s}, {F::WEIGHT, &weight}, {F::BIAS, &bias}, {F::SHIFT, &shift},
                         {F::RSTD, &rstd}, {F::OFFR, &offr}})
    node->save(slot, *t);
  node->scalars_ = {k, centered, eps};
}

}  // namespace normlab
