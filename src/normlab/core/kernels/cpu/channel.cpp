// The channel norms' whole operations — BatchNorm, GroupNorm and InstanceNorm with a fused
// activation, forward and closed-form backward — declared in kernels.h.
//
// Two routes: groups small enough to stay in cache are summed and normalized by one task in
// one trip through memory (the fused per-group passes here); larger groups take the two-pass
// route of channel_passes.cpp. Either way the per-group bookkeeping — statistics, per-unit
// scales, backward coefficients, at most N×C numbers in double — is done here, in C++, rather
// than as a few dozen tiny tensor ops whose dispatch would cost more than the kernel on small
// tensors.

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <cstring>
#include <vector>

#include "activation.h"
#include "channel_passes.h"
#include "group_columns.h"
#include "kernels.h"
#include "loops.h"

namespace normlab {
namespace {

// ---------------------------------------------------------------------------------------
// Fused per-group passes for planes. A group's planes — a channel's N planes for BatchNorm,
// Cg consecutive planes for GroupNorm, one plane for InstanceNorm — are summed and then
// normalized (forward), or reduced and then differentiated (backward), by one task while they
// are still in cache: one trip through memory instead of two. Used when a group is at most
// kFuseBytes; larger groups take the two-pass route above.

constexpr int64_t kFuseBytes = 4 << 20;

struct PlaneGroups {
  int64_t N, C, S, G;  // G < 0: one group per channel (BatchNorm)
  int64_t groups() const { return G < 0 ? C : N * G; }
  int64_t size() const { return G < 0 ? N : C / G; }  // planes per group
  int64_t plane(int64_t k, int64_t j) const {
    return G < 0 ? j * C + k : (k / G) * C + (k % G) * (C / G) + j;
  }
  // Group k's planes without a division per plane (three 64-bit divisions a plane were ~7% of
  // GroupNorm's forward at 2×512×14×14): plane first + j·step, channel c0 + j·cstep.
  struct Walk {
    int64_t first, step, c0, cstep;
    int64_t plane(int64_t j) const { return first + j * step; }
    int64_t channel(int64_t j) const { return c0 + j * cstep; }
  };
  Walk walk(int64_t k) const { return G < 0 ? Walk{k, C, k, 0} : Walk{plane(k, 0), 1, (k % G) * (C / G), 1}; }
};

// Prefetches n floats from p, four cache lines a step (one line a step spent more
// instructions on the loop than on the prefetches); up to 48 floats past n, which is harmless.
NL_INLINE void prefetch_run(const float* p, int64_t n) {
  for (int64_t s = 0; s < n; s += 64) {
    __builtin_prefetch(p + s);
    __builtin_prefetch(p + s + 16);
    __builtin_prefetch(p + s + 32);
    __builtin_prefetch(p + s + 48);
  }
}

template <int A>
void fused_plane_forward(const float* xp, float* yp, const PlaneGroups& pg, const std::vector<double>& gamma,
                         const std::vector<double>& beta, double eps, float param, const float* slope, bool stream,
                         std::vector<double>& shift, std::vector<double>& offset, std::vector<double>& rstd,
                         std::vector<double>& mean, std::vector<double>& var) {
  const int64_t S = pg.S, np = pg.size();
  at::parallel_for(0, pg.groups(), 1, [&](int64_t kb, int64_t ke) {
    for (int64_t k = kb; k < ke; ++k) {
      const auto w = pg.walk(k);
      const float K = sample_shift(xp + w.first * S, S, 1);
      double t1 = 0, t2 = 0;
      // A GroupNorm/InstanceNorm group's planes are adjacent in memory: its moments are summed
      // as one run of np·S values, not np runs of S (at 8x8 or 14x14, runs of 64 or 196 values
      // each paid a block's reduction tail and flush). BatchNorm's planes are C apart.
      const bool one_run = pg.G >= 0;
      const int64_t runs = one_run ? 1 : np, run = one_run ? np * S : S;
      for (int64_t j = 0; j < runs; ++j) {
        const float* row = xp + w.plane(j) * S;
        // The same stretch of the next group, one group ahead: its sampled shift and first
        // lines would otherwise start each group with a wait on memory (the hardware
        // prefetcher does not carry across groups). GroupNorm(32) at 32x64x56x56: 1.5x a copy
        // before, 1.3x after, one thread.
        const float* ahead = k + 1 < ke ? xp + pg.plane(k + 1, j) * S : nullptr;
        for (int64_t s0 = 0; s0 < run; s0 += kBlock) {
          const int64_t s1e = std::min(run, s0 + kBlock);
          if (ahead) prefetch_run(ahead + s0, s1e - s0);
          const Sums m = shifted_moments(row + s0, s1e - s0, K);
          t1 += m.first;
          t2 += m.second;
        }
      }
      const double n = static_cast<double>(np * S);
      const double off = t1 / n, v = std::max(t2 / n - off * off, 0.0), r = inv_std(v, eps);
      shift[k] = K;
      offset[k] = off;
      rstd[k] = r;
      mean[k] = K + off;
      var[k] = v;
      for (int64_t j = 0; j < np; ++j) {
        const int64_t p = w.plane(j), c = w.channel(j);
        const float m = static_cast<float>(r * gamma[c]);
        const float b = static_cast<float>(beta[c] - off * r * gamma[c]);
        const float q = (A == PRELU) ? slope[c] : param;
        const float* row = xp + p * S;
        emit(yp + p * S, S, stream, [&](int64_t s) __attribute__((always_inline)) {
          return act_forward<A>((row[s] - K) * m + b, q);
        });
      }
    }
    stream_fence(stream);
  });
}

// Returns per-plane (Σdz, Σdz·x̂, D) for the parameter gradients; writes dx. given: fixed statistics.
template <int A, bool Y>
void fused_plane_backward(const float* gp, const float* vp, float* dp, const PlaneGroups& pg, bool given,
                          const std::vector<double>& gamma, const std::vector<double>& beta,
                          const std::vector<double>& shift, const std::vector<double>& offset,
                          const std::vector<double>& rstd, float param, const float* slope, bool stream,
                          std::vector<double>& Ap, std::vector<double>& Bp, std::vector<double>& Dp) {
  const int64_t S = pg.S, np = pg.size();
  at::parallel_for(0, pg.groups(), 1, [&](int64_t kb, int64_t ke) {
    std::vector<float> scale(np), bias(np), alpha(np), delta(np);
    for (int64_t k = kb; k < ke; ++k) {
      const auto w = pg.walk(k);
      const float K = static_cast<float>(shift[k]);
      double m1 = 0, m2 = 0;
      for (int64_t j = 0; j < np; ++j) {
        const int64_t p = w.plane(j), c = w.channel(j);
        const double sc = rstd[k] * gamma[c];
        scale[j] = static_cast<float>(sc);
        bias[j] = static_cast<float>(beta[c] - offset[k] * sc);
        const auto [al, de] = xhat_affine(Y, gamma[c], beta[c], offset[k], rstd[k]);
        alpha[j] = static_cast<float>(al);
        delta[j] = static_cast<float>(de);
        const float q = (A == PRELU) ? slope[c] : param;
        plane_sums<A, Y>(gp + p * S, vp + p * S, S, K, scale[j], bias[j], q, Ap[p], Bp[p], Dp[p]);
        Bp[p] = al * Bp[p] + de * Ap[p];  // Σ dz·x̂ from here on: dγ's term, summed here in parallel
        m1 += gamma[c] * Ap[p];
        m2 += gamma[c] * Bp[p];
      }
      const double n = static_cast<double>(np * S);
      m1 /= n;
      m2 /= n;
      for (int64_t j = 0; j < np; ++j) {
        const int64_t p = w.plane(j), c = w.channel(j);
        const float q = (A == PRELU) ? slope[c] : param;
        const float wu = given ? 0.f : static_cast<float>(-rstd[k] * m2 * alpha[j]);
        const float wc = given ? 0.f : static_cast<float>(-rstd[k] * (m1 + m2 * delta[j]));
        plane_dx<A, Y>(gp + p * S, vp + p * S, S, K, scale[j], bias[j], q, scale[j], wu, wc, dp + p * S, stream);
      }
    }
    stream_fence(stream);
  });
}

// ---------------------------------------------------------------------------------------
// Whole operations in one call: the per-group bookkeeping (statistics, per-unit scales,
// backward coefficients — arrays of at most N×C numbers, in double) done here rather than as
// a few dozen tiny torch ops from Python, whose dispatch cost dominates small tensors.
//
// Units: for planes, unit u·C + c is plane (n = u, c); for columns, row u of the (U, C) grid
// (U = 1 for BatchNorm, whose column view folds N into S). Groups: channel c for BatchNorm
// or given statistics; (n, c / (C/G)) for GroupNorm.

struct Grouping {
  bool planes;
  int64_t N, C, S, G;  // G = -1: one group per channel
  bool per_channel;     // BatchNorm or given statistics
  int64_t U() const { return (!planes && G < 0) ? 1 : N; }
  int64_t groups() const { return per_channel ? C : N * G; }
  int64_t group_of(int64_t u, int64_t c) const { return per_channel ? c : u * G + c / (C / G); }
  int64_t count() const { return G < 0 ? N * S : (C / G) * S; }
};

std::vector<double> as_double(const at::Tensor& t, int64_t n, double fill) {
  std::vector<double> out(n, fill);
  if (!t.defined() || !t.numel()) return out;
  if (t.scalar_type() == at::kFloat && t.is_contiguous()) {  // the common case: no conversion op
    const float* p = t.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) out[i] = p[i];
  } else {
    auto d = t.to(at::kDouble).contiguous();
    std::memcpy(out.data(), d.data_ptr<double>(), n * sizeof(double));
  }
  return out;
}

at::Tensor float_tensor(const std::vector<double>& v, std::vector<int64_t> shape, const at::Tensor& like) {
  auto t = at::empty(shape, like.options().dtype(at::kFloat));
  float* p = t.data_ptr<float>();
  for (size_t i = 0; i < v.size(); ++i) p[i] = static_cast<float>(v[i]);
  return t;
}

at::Tensor double_tensor(const std::vector<double>& v, const at::Tensor& like) {
  auto t = at::empty({static_cast<int64_t>(v.size())}, like.options().dtype(at::kDouble));
  std::memcpy(t.data_ptr<double>(), v.data(), v.size() * sizeof(double));
  return t;
}

// Unit-grid (U×C) sums from a kernel's output: planes give (P,), columns (U, chunks, C).
std::vector<double> unit_sums(const at::Tensor& t, const Grouping& g) {
  const int64_t UC = g.U() * g.C;
  std::vector<double> out(UC, 0.0);
  const double* p = t.data_ptr<double>();
  if (g.planes) {
    std::memcpy(out.data(), p, UC * sizeof(double));
  } else {
    const int64_t chunks = t.size(1);
    for (int64_t u = 0; u < g.U(); ++u)
      for (int64_t k = 0; k < chunks; ++k)
        for (int64_t c = 0; c < g.C; ++c) out[u * g.C + c] += p[(u * chunks + k) * g.C + c];
  }
  return out;
}

// sample_shift(x + u·Sv·C + c, Sv, C) for the first channel c of every group of a (U, Sv, C)
// column view. The sampled positions are the same for every channel, so each sampled row is
// read once, C contiguous values, rather than 16 scattered values per channel (for
// channels_last BatchNorm, 16·C cache misses before any work could start). The same sums in
// the same order: the same shifts.
void column_sample_shifts(const float* xp, int64_t U, int64_t Sv, int64_t C, int64_t G,
                                 std::vector<double>& shift) {
  const int64_t per_unit = G < 0 ? C : G, step = G < 0 ? 1 : C / G;
  const int64_t m = std::min<int64_t>(Sv, 16);
  for (int64_t u = 0; u < U; ++u) {
    double* acc = shift.data() + u * per_unit;
    std::fill(acc, acc + per_unit, 0.0);
    for (int64_t j = 0; j < m; ++j) {
      const int64_t pos = Sv >= 16 ? (j * Sv) >> 4 : j;
      const float* row = xp + (u * Sv + pos) * C;
      for (int64_t k = 0; k < per_unit; ++k) acc[k] += row[k * step];
    }
    for (int64_t k = 0; k < per_unit; ++k) acc[k] = static_cast<float>(acc[k] / static_cast<double>(m));
  }
}

// A parameter or buffer of n values as the given-statistics route reads it: in place when it
// is contiguous float32 (a module's own), otherwise converted to double once.
struct Values {
  const float* f = nullptr;
  std::vector<double> d;
  double fill = 0.0;
  double operator[](int64_t i) const { return f ? f[i] : (d.empty() ? fill : d[i]); }
};

Values values_of(const at::Tensor& t, int64_t n, double fill) {
  Values v;
  v.fill = fill;
  if (!t.defined() || !t.numel()) return v;
  if (t.scalar_type() == at::kFloat && t.is_contiguous()) {
    v.f = t.data_ptr<float>();
  } else {
    v.d = as_double(t, n, fill);
  }
  return v;
}

// Given statistics (eval BatchNorm): y = act((x − μ)·a + β), a = γ/√(var + ε) per channel,
// computed in double and stored once in float. The group statistics the autograd node keeps
// are built only when a backward will need them (`keep_stats`): an eval call under no_grad
// then allocates nothing but y — at batch 1 the double vectors and tensors of the general
// route cost more than the normalization.
std::vector<at::Tensor> given_forward(const at::Tensor& xv, bool planes, int64_t C,
                                      const at::Tensor& weight, const at::Tensor& bias,
                                      const at::Tensor& running_mean, const at::Tensor& running_var, double eps,
                                      int64_t act, double param, const at::Tensor& slope, const at::Tensor& out,
                                      bool keep_stats) {
  const Values gamma = values_of(weight, C, 1.0), beta = values_of(bias, C, 0.0),
               rm = values_of(running_mean, C, 0.0), rv = values_of(running_var, C, 1.0);
  std::vector<float> coef(3 * C);  // shift, scale, bias per channel (for every unit)
  float *us = coef.data(), *usc = us + C, *ub = usc + C;
  std::vector<double> shift, rstd;
  if (keep_stats) {
    shift.resize(C);
    rstd.resize(C);
  }
  for (int64_t c = 0; c < C; ++c) {
    const double r = 1.0 / std::sqrt(rv[c] + eps);
    us[c] = static_cast<float>(rm[c]);
    usc[c] = static_cast<float>(r * gamma[c]);
    ub[c] = static_cast<float>(beta[c]);
    if (keep_stats) {
      shift[c] = rm[c];
      rstd[c] = r;
    }
  }
  // NCHW: plane (n, c) reads channel c's coefficients, not a copy per sample (3·N·C floats
  // written and read again, 2.4 % of the bytes of x and y at 128x256x8x8); channels last:
  // one unit, whose columns are the channels
  if (planes)
    plane_apply(xv, {us, usc, ub, opt_ptr(slope), act, param, C}, out);
  else
    column_apply(xv, {us, usc, ub, opt_ptr(slope), act, param}, out);
  at::Tensor none;
  if (!keep_stats) return {none, none, none, none, none};
  return {double_tensor(shift, xv), double_tensor(std::vector<double>(C, 0.0), xv), double_tensor(rstd, xv), none,
          none};
}

// The per-unit coefficients of the plane and column passes, y = act((x − shift)·scale + bias),
// from the groups' statistics and the channels' γ, β: float tensors shaped (U·C) for planes,
// (U, C) for columns; PReLU's per-channel slope repeated per unit for planes.
struct UnitPass {
  std::vector<int64_t> shape;
  at::Tensor shift, scale, bias, slope;

  Coefficients coefficients(int64_t act, double param) const {
    return {shift.data_ptr<float>(), scale.data_ptr<float>(), bias.data_ptr<float>(), opt_ptr(slope), act, param};
  }
};

UnitPass unit_pass(const Grouping& g, const std::vector<double>& gamma, const std::vector<double>& beta,
                   const std::vector<double>& shift, const std::vector<double>& offset,
                   const std::vector<double>& rstd, int64_t act, const at::Tensor& slope, const at::Tensor& like) {
  const int64_t U = g.U(), C = g.C, UC = U * C;
  std::vector<double> us(UC), usc(UC), ub(UC);
  for (int64_t u = 0; u < U; ++u)
    for (int64_t c = 0; c < C; ++c) {
      const int64_t k = g.group_of(u, c), i = u * C + c;
      us[i] = shift[k];
      usc[i] = rstd[k] * gamma[c];
      ub[i] = beta[c] - offset[k] * usc[i];
    }
  UnitPass out;
  out.shape = g.planes ? std::vector<int64_t>{UC} : std::vector<int64_t>{U, C};
  out.shift = float_tensor(us, out.shape, like);
  out.scale = float_tensor(usc, out.shape, like);
  out.bias = float_tensor(ub, out.shape, like);
  out.slope = act == PRELU && g.planes ? slope.repeat({U}) : slope;
  return out;
}

}  // namespace

// Forward: y = act((x − shift)·scale + bias) per unit, into `out`. Returns the group
// statistics {shift, offset, rstd, mean, var} in double (mean, var undefined when given, and
// all five without keep_stats there).
std::vector<at::Tensor> channel_forward(const at::Tensor& xv, bool planes, int64_t N, int64_t C, int64_t S,
                                        int64_t G, const at::Tensor& weight, const at::Tensor& bias,
                                        const at::Tensor& running_mean, const at::Tensor& running_var, double eps,
                                        int64_t act, double param, const at::Tensor& slope, const at::Tensor& out,
                                        bool keep_stats) {
  const bool given = running_mean.defined() && running_mean.numel();
  Grouping g{planes, N, C, S, G, G < 0 || given};
  const int64_t U = g.U(), UC = U * C, NG = g.groups();
  if (given)
    return given_forward(xv, planes, C, weight, bias, running_mean, running_var, eps, act, param, slope, out,
                         keep_stats);
  const auto gamma = as_double(weight, C, 1.0), beta = as_double(bias, C, 0.0);
  std::vector<double> shift(NG), offset(NG, 0.0), rstd(NG), mean, var;
  if (planes && (G < 0 ? N : C / G) * S * 4 <= kFuseBytes) {
    const PlaneGroups pg{N, C, S, G};
    mean.resize(NG);
    var.resize(NG);
    at::Tensor y = out.defined() && out.numel() ? out : at::empty_like(xv);
    const bool stream = should_stream(y);
    const float* sp = opt_ptr(slope);
    dispatch_act(act, [&](auto tag) {
      fused_plane_forward<decltype(tag)::value>(xv.data_ptr<float>(), y.data_ptr<float>(), pg, gamma, beta, eps,
                                                static_cast<float>(param), sp, stream, shift, offset, rstd, mean,
                                                var);
    });
    return {double_tensor(shift, xv), double_tensor(offset, xv), double_tensor(rstd, xv), double_tensor(mean, xv),
            double_tensor(var, xv)};
  } else if (!planes && G >= 0 && fuse_columns(N, xv.size(1), C)) {
    mean.resize(NG);
    var.resize(NG);
    at::Tensor y = out.defined() && out.numel() ? out : at::empty_like(xv);
    fused_column_forward(xv, y, G, gamma, beta, eps, act, param, opt_ptr(slope), shift, offset, rstd, mean, var);
    return {double_tensor(shift, xv), double_tensor(offset, xv), double_tensor(rstd, xv), double_tensor(mean, xv),
            double_tensor(var, xv)};
  } else {
    // Each group's shift is sampled from its first channel (NCHW GroupNorm: from the whole
    // group, which is one contiguous block).
    const float* xp = xv.data_ptr<float>();
    if (planes) {
      for (int64_t k = 0; k < NG; ++k) {
        const int64_t u = (G < 0) ? 0 : k / G;
        const int64_t c = (G < 0) ? k : (k % G) * (C / G);
        shift[k] = sample_shift(xp + (u * C + c) * S, (G < 0) ? S : (C / G) * S, 1);
      }
    } else {
      column_sample_shifts(xp, U, xv.size(1), C, G, shift);
    }
    std::vector<float> unit_shift(UC);
    for (int64_t u = 0; u < U; ++u)
      for (int64_t c = 0; c < C; ++c) unit_shift[u * C + c] = static_cast<float>(shift[g.group_of(u, c)]);
    auto shift_t = at::empty({UC}, xv.options());
    std::memcpy(shift_t.data_ptr<float>(), unit_shift.data(), UC * sizeof(float));
    auto sums = planes ? plane_moments(xv, shift_t) : column_moments(xv, shift_t.view({U, C}));
    const auto s1 = unit_sums(sums[0], g), s2 = unit_sums(sums[1], g);
    std::vector<double> g1(NG, 0.0), g2(NG, 0.0);
    for (int64_t u = 0; u < U; ++u)
      for (int64_t c = 0; c < C; ++c) {
        g1[g.group_of(u, c)] += s1[u * C + c];
        g2[g.group_of(u, c)] += s2[u * C + c];
      }
    const double n = static_cast<double>(g.count());
    mean.resize(NG);
    var.resize(NG);
    for (int64_t k = 0; k < NG; ++k) {
      offset[k] = g1[k] / n;
      var[k] = std::max(g2[k] / n - offset[k] * offset[k], 0.0);  // offset is small: shift ≈ mean
      rstd[k] = inv_std(var[k], eps);
      mean[k] = shift[k] + offset[k];
    }
  }
  const UnitPass unit = unit_pass(g, gamma, beta, shift, offset, rstd, act, slope, xv);
  if (planes)
    plane_apply(xv, unit.coefficients(act, param), out);
  else
    column_apply(xv, unit.coefficients(act, param), out);
  return {double_tensor(shift, xv), double_tensor(offset, xv), double_tensor(rstd, xv), double_tensor(mean, xv),
          double_tensor(var, xv)};
}

// Backward of channel_forward: {dx (in the view's shape), dγ, dβ, d slope} (float64 for the
// parameters). from_output: the saved tensor is the output (in-place mode).
std::vector<at::Tensor> channel_backward(const at::Tensor& dyv, const at::Tensor& srcv, bool planes, int64_t N,
                                         int64_t C, int64_t S, int64_t G, bool given, bool from_output,
                                         const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& shift_g,
                                         const at::Tensor& offset_g, const at::Tensor& rstd_g, int64_t act,
                                         double param, const at::Tensor& slope) {
  Grouping g{planes, N, C, S, G, G < 0 || given};
  const int64_t U = g.U(), UC = U * C, NG = g.groups();
  const auto gamma = as_double(weight, C, 1.0), beta = as_double(bias, C, 0.0);
  const auto shift = as_double(shift_g, NG, 0.0), offset = as_double(offset_g, NG, 0.0),
             rstd = as_double(rstd_g, NG, 1.0);
  if (planes && (given || (G < 0 ? N : C / G) * S * 4 <= kFuseBytes)) {
    // Fused per group (given statistics: groups are channels, each plane on its own).
    const PlaneGroups pg{N, C, S, given ? -1 : G};
    const int64_t P = N * C;
    std::vector<double> Ap(P), Bp(P), Dp(P);
    auto dx = at::empty_like(srcv);
    const bool stream = should_stream(dx);
    const float* sp = opt_ptr(slope);
    auto run = [&](auto tag, auto ytag) {
      fused_plane_backward<decltype(tag)::value, decltype(ytag)::value>(
          dyv.data_ptr<float>(), srcv.data_ptr<float>(), dx.data_ptr<float>(), pg, given, gamma, beta, shift,
          offset, rstd, static_cast<float>(param), sp, stream, Ap, Bp, Dp);
    };
    dispatch_act_source(act, from_output, run);
    // One thread adds up the N·C terms, nothing per plane but the adds: the per-plane x̂
    // coefficients and index divisions it did here (~50 instructions a plane, 32768 planes at
    // 128×256×8×8) now run in the parallel loop.
    std::vector<double> dgamma(C, 0.0), dbeta(C, 0.0), dslope(C, 0.0);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < C; ++c) {
        dbeta[c] += Ap[n * C + c];
        dgamma[c] += Bp[n * C + c];
        dslope[c] += Dp[n * C + c];
      }
    return {dx, double_tensor(dgamma, srcv), double_tensor(dbeta, srcv), double_tensor(dslope, srcv)};
  }
  if (!planes && !given && G >= 0 && fuse_columns(N, srcv.size(1), C)) {
    // Fused per sample (group_columns.cpp): Au, Bu, Du come back as Σdz, Σdz·x̂ and PReLU's sum.
    std::vector<double> Au(UC, 0.0), Bu(UC, 0.0), Du(UC, 0.0);
    auto dx = at::empty_like(srcv);
    fused_column_backward(dyv, srcv, dx, G, from_output, gamma, beta, shift, offset, rstd, act, param,
                          opt_ptr(slope), Au, Bu, Du);
    std::vector<double> dgamma(C, 0.0), dbeta(C, 0.0), dslope(C, 0.0);
    for (int64_t u = 0; u < U; ++u)
      for (int64_t c = 0; c < C; ++c) {
        dbeta[c] += Au[u * C + c];
        dgamma[c] += Bu[u * C + c];
        dslope[c] += Du[u * C + c];
      }
    return {dx, double_tensor(dgamma, srcv), double_tensor(dbeta, srcv), double_tensor(dslope, srcv)};
  }
  std::vector<double> alpha(UC), delta(UC);
  for (int64_t u = 0; u < U; ++u)
    for (int64_t c = 0; c < C; ++c) {
      const int64_t k = g.group_of(u, c), i = u * C + c;
      const auto xhat = xhat_affine(from_output, gamma[c], beta[c], offset[k], rstd[k]);
      alpha[i] = xhat.alpha;
      delta[i] = xhat.delta;
    }
  const UnitPass unit = unit_pass(g, gamma, beta, shift, offset, rstd, act, slope, srcv);
  auto reduce = planes ? plane_backward_reduce : column_backward_reduce;
  auto sums = reduce(dyv, srcv, from_output, unit.coefficients(act, param));
  const auto A = unit_sums(sums[0], g), B = unit_sums(sums[1], g), D = unit_sums(sums[2], g);
  std::vector<double> dgamma(C, 0.0), dbeta(C, 0.0), dslope(C, 0.0), dzx(UC);
  std::vector<double> m1(NG, 0.0), m2(NG, 0.0);
  for (int64_t u = 0; u < U; ++u)
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = u * C + c, k = g.group_of(u, c);
      dzx[i] = alpha[i] * B[i] + delta[i] * A[i];  // Σ dz·x̂ over the unit
      dbeta[c] += A[i];
      dgamma[c] += dzx[i];
      dslope[c] += D[i];
      m1[k] += gamma[c] * A[i];
      m2[k] += gamma[c] * dzx[i];
    }
  const double n = static_cast<double>(g.count());
  std::vector<double> cz(UC), cu(UC, 0.0), cc(UC, 0.0);
  for (int64_t u = 0; u < U; ++u)
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = u * C + c, k = g.group_of(u, c);
      cz[i] = rstd[k] * gamma[c];
      if (!given) {  // dx = γr·dz − r·m2/n·x̂ − r·m1/n, with x̂ = α·u + δ
        cu[i] = -rstd[k] * (m2[k] / n) * alpha[i];
        cc[i] = -rstd[k] * ((m1[k] / n) + (m2[k] / n) * delta[i]);
      }
    }
  auto apply = planes ? plane_backward_apply : column_backward_apply;
  auto dx = apply(dyv, srcv, from_output, unit.coefficients(act, param),
                  float_tensor(cz, unit.shape, srcv), float_tensor(cu, unit.shape, srcv),
                  float_tensor(cc, unit.shape, srcv));
  return {dx, double_tensor(dgamma, srcv), double_tensor(dbeta, srcv), double_tensor(dslope, srcv)};
}

}  // namespace normlab
