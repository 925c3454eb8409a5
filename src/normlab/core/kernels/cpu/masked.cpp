// The channel norms over the valid positions of a mask (declared in kernels.h): BatchNorm,
// InstanceNorm and GroupNorm, with a fused activation, forward and closed-form backward — the
// math of normlab/core/masked.py (derivation in docs/derivations.md), on the two routes the
// unmasked kernels have: fused per group for planes, or a pass for the moments and one for the
// output (backward: a reduction pass and a gradient pass).
//
// The mask is one bool per (sample, position), shared by every channel: planes (N·C, S) read a
// plane's mask row beside it; columns (N, S, C) skip a padded row whole. Padding never enters a
// result: every sum and output selects (never multiplies by) the mask, so NaN or inf padding
// cannot leak through 0·NaN; outputs and input gradients are 0 there.
//
// Moments are shifted as everywhere in the kernels (loops.h's sample_shift): the shift is the
// mean of up to 16 valid values of the group, spread over its first sample with any, so
// x − shift stays exact on large-mean data. A group without a valid position gets mean 0,
// variance 0 (no 0/0), as the composed ops give.

#include "masked_passes.h"  // ATen, activation.h, kernels.h and loops.h come with it

namespace normlab {
namespace {

// (MaskedGroups, ValidPositions, the shifts and the per-pass route: masked_passes.h.)

// ---------------------------------------------------------------------------------------
// Fused per-group route for planes, as channel.cpp's: one task sums a group's planes over
// their valid positions, then normalizes them (backward: reduces, then differentiates) while
// they are in cache. A plane is read only over its sample's valid span [lo, hi); the rest of
// its output is zeroed. Groups over kFuseBytes (channel.cpp's limit) take the per-pass route,
// and so do BatchNorm's short planes: a channel's N planes lie C·S apart, and runs of under
// 512 values read that way cost more than the second pass saves (BatchNorm1d 32x64x256: 1.5x
// the per-pass time forward, 1.8x backward; BatchNorm2d 8x64x28x28, runs of 784: 0.84x, 0.90x).

bool fuses(const MaskedGroups& g) {
  return g.planes && g.size() * g.S * 4 <= kFuseBytes && (!g.per_channel || g.S >= 512);
}

// dst[s] = 0 outside [lo, hi) of a plane of S values.
NL_INLINE void zero_outside(float* dst, int64_t S, int64_t lo, int64_t hi) {
  std::fill(dst, dst + lo, 0.f);
  std::fill(dst + hi, dst + S, 0.f);
}

// Forward with batch statistics: writes y, and per group shift, offset, rstd, mean, var, count.
template <int A>
void fused_masked_forward(const float* xp, const int32_t* mp, float* yp, const MaskedGroups& g,
                          const ValidPositions& v, const std::vector<double>& gamma, const std::vector<double>& beta,
                          double eps, float param, const float* slope, bool stream, std::vector<double>& shift,
                          std::vector<double>& offset, std::vector<double>& rstd, std::vector<double>& mean,
                          std::vector<double>& var, std::vector<double>& count) {
  const int64_t C = g.C, S = g.S, np = g.size();
  at::parallel_for(0, g.groups(), 1, [&](int64_t kb, int64_t ke) {
    for (int64_t k = kb; k < ke; ++k) {
      // the next group's first plane, asked for now: its shift's scattered reads would
      // otherwise start it with a wait on memory (as channel.cpp's fused route does)
      if (k + 1 < ke) prefetch_floats(xp + g.plane(k + 1, 0) * S, S);
      const double K = masked_shift(xp, g, v, k);
      const float Kf = static_cast<float>(K);
      double t1 = 0, t2 = 0, cnt = 0;
      for (int64_t j = 0; j < np; ++j) {
        const int64_t p = g.plane(k, j), n = p / C;
        const float* row = xp + p * S;
        const int32_t* m = mp + n * S;
        const Sums t = block_sums(v.lo[n], v.hi[n], [&](int64_t s) __attribute__((always_inline)) {
          const float d = keep(row[s] - Kf, m[s]);
          return Terms{d, d * d, 0.f};
        });
        t1 += t.first;
        t2 += t.second;
        cnt += static_cast<double>(v.count[n]);
      }
      const double nv = std::max(cnt, 1.0);  // an empty group: mean 0, variance 0
      const double off = t1 / nv, vr = std::max(t2 / nv - off * off, 0.0), r = inv_std(vr, eps);
      shift[k] = K;
      offset[k] = off;
      rstd[k] = r;
      mean[k] = K + off;
      var[k] = vr;
      count[k] = cnt;
      for (int64_t j = 0; j < np; ++j) {
        const int64_t p = g.plane(k, j), c = p % C, n = p / C, lo = v.lo[n];
        const double scd = r * gamma[c];
        const float sc = static_cast<float>(scd), b = static_cast<float>(beta[c] - off * scd);
        const float q = (A == PRELU) ? slope[c] : param;
        const float* row = xp + p * S;
        const int32_t* m = mp + n * S;
        float* dst = yp + p * S;
        emit(dst + lo, v.hi[n] - lo, stream, [&](int64_t i) __attribute__((always_inline)) {
          return keep(act_forward<A>((row[lo + i] - Kf) * sc + b, q), m[lo + i]);
        });
        zero_outside(dst, S, lo, v.hi[n]);
      }
    }
    stream_fence(stream);
  });
}

// Backward: writes dx, and per plane A = Σ m·dz, B = Σ m·dz·(x − shift), D = Σ m·dy·min(z, 0)
// (PReLU) for the parameters' gradients. With given statistics each group is a channel whose
// planes are independent (dx = γ·rstd·dz).
template <int A>
void fused_masked_backward(const float* gp, const float* xp, const int32_t* mp, float* dp, const MaskedGroups& g,
                           const ValidPositions& v, bool given, const std::vector<double>& gamma,
                           const std::vector<double>& beta, const std::vector<double>& shift,
                           const std::vector<double>& offset, const std::vector<double>& rstd,
                           const std::vector<double>& count, float param, const float* slope, bool stream,
                           std::vector<double>& Ap, std::vector<double>& Bp, std::vector<double>& Dp) {
  const int64_t C = g.C, S = g.S, np = g.size();
  at::parallel_for(0, g.groups(), 1, [&](int64_t kb, int64_t ke) {
    std::vector<float> scale(np), bias(np);
    for (int64_t k = kb; k < ke; ++k) {
      const float K = static_cast<float>(shift[k]);
      const double r = rstd[k];
      double m1 = 0, m2 = 0;
      for (int64_t j = 0; j < np; ++j) {
        const int64_t p = g.plane(k, j), c = p % C, n = p / C;
        const double scd = r * gamma[c];
        const float sc = static_cast<float>(scd), b = static_cast<float>(beta[c] - offset[k] * scd);
        scale[j] = sc;
        bias[j] = b;
        const float q = (A == PRELU) ? slope[c] : param;
        const float *dy = gp + p * S, *row = xp + p * S;
        const int32_t* m = mp + n * S;
        const Sums t = masked_plane_sums<A>(dy, row, m, v.lo[n], v.hi[n], K, sc, b, q);
        Ap[p] = t.first;
        Bp[p] = t.second;
        Dp[p] = t.third;
        m1 += gamma[c] * t.first;
        m2 += gamma[c] * (r * t.second - offset[k] * r * t.first);  // γ·Σ m·dz·x̂
      }
      // dx = γr·dz − r·m2/n·x̂ − r·m1/n over the valid positions (as masked_channel_backward);
      // a group of fewer than 2 valid values: dx = 0 exactly
      const bool degenerate = !given && count[k] < 2;
      const double cnt = given ? 1.0 : count[k];
      const float wu = given || degenerate ? 0.f : static_cast<float>(-r * (m2 / cnt) * r);
      const float wc = given || degenerate ? 0.f : static_cast<float>(-r * (m1 / cnt - (m2 / cnt) * offset[k] * r));
      for (int64_t j = 0; j < np; ++j) {
        const int64_t p = g.plane(k, j), c = p % C, n = p / C, lo = v.lo[n];
        const float q = (A == PRELU) ? slope[c] : param;
        const float sc = scale[j], b = bias[j], wz = degenerate ? 0.f : sc;
        const float *dy = gp + p * S, *row = xp + p * S;
        const int32_t* m = mp + n * S;
        float* dst = dp + p * S;
        emit(dst + lo, v.hi[n] - lo, stream, [&](int64_t i) __attribute__((always_inline)) {
          float u, dz, z;
          recover<A, false>(row[lo + i], dy[lo + i], K, sc, b, q, u, dz, z);
          return keep(wz * dz + u_term(wu, u) + wc, m[lo + i]);
        });
        zero_outside(dst, S, lo, v.hi[n]);
      }
    }
    stream_fence(stream);
  });
}

}  // namespace

// Forward over the valid positions: {shift, offset, rstd, mean, var, count} per group in
// double (mean, var, count empty when given); y written into `out`, 0 at padded positions.
std::vector<at::Tensor> masked_channel_forward(const at::Tensor& xv, const at::Tensor& mask, bool planes, int64_t N,
                                               int64_t C, int64_t S, int64_t G, const at::Tensor& weight,
                                               const at::Tensor& bias, const at::Tensor& running_mean,
                                               const at::Tensor& running_var, double eps, int64_t act, double param,
                                               const at::Tensor& slope, const at::Tensor& out) {
  const bool given = running_mean.defined() && running_mean.numel();
  const MaskedGroups g{planes, N, C, S, G, G < 0 || given};
  const int64_t NG = g.groups(), UC = N * C;
  const float* xp = xv.data_ptr<float>();
  const bool* bp = mask.data_ptr<bool>();
  const std::vector<int32_t> lanes = lane_mask(bp, N * S);
  const int32_t* mp = lanes.data();
  const auto gamma = as_double(weight, C, 1.0), beta = as_double(bias, C, 0.0);
  std::vector<double> shift(NG, 0.0), offset(NG, 0.0), rstd(NG), mean, var, count;
  if (given) {
    const auto rm = as_double(running_mean, C, 0.0), rv = as_double(running_var, C, 1.0);
    for (int64_t c = 0; c < C; ++c) {
      shift[c] = rm[c];
      rstd[c] = 1.0 / std::sqrt(rv[c] + eps);
    }
  } else if (fuses(g)) {
    const ValidPositions v = valid_positions(bp, N, S);
    mean.resize(NG);
    var.resize(NG);
    count.resize(NG);
    const bool stream = should_stream(out);
    dispatch_act(act, [&](auto tag) {
      fused_masked_forward<decltype(tag)::value>(xp, mp, out.data_ptr<float>(), g, v, gamma, beta, eps,
                                                 static_cast<float>(param), opt_ptr(slope), stream, shift, offset,
                                                 rstd, mean, var, count);
    });
    return {double_tensor(shift, xv), double_tensor(offset, xv), double_tensor(rstd, xv),
            double_tensor(mean, xv),  double_tensor(var, xv),    double_tensor(count, xv)};
  } else {
    const ValidPositions v = valid_positions(bp, N, S);
    shift = masked_shifts(xp, g, v);
    std::vector<float> ushift(UC);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < C; ++c) ushift[n * C + c] = static_cast<float>(shift[g.group_of(n, c)]);
    std::vector<double> s1(UC), s2(UC), g1(NG, 0.0), g2(NG, 0.0);
    masked_unit_moments(xp, mp, g, ushift, s1, s2);
    count.assign(NG, 0.0);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < C; ++c) {
        const int64_t k = g.group_of(n, c);
        g1[k] += s1[n * C + c];
        g2[k] += s2[n * C + c];
        count[k] += static_cast<double>(v.count[n]);
      }
    mean.resize(NG);
    var.resize(NG);
    for (int64_t k = 0; k < NG; ++k) {
      const double n = std::max(count[k], 1.0);  // an empty group: mean 0, variance 0
      offset[k] = g1[k] / n;
      var[k] = std::max(g2[k] / n - offset[k] * offset[k], 0.0);
      rstd[k] = inv_std(var[k], eps);
      mean[k] = shift[k] + offset[k];
    }
  }
  std::vector<float> us, usc, ub;
  unit_affine(g, gamma, beta, shift, offset, rstd, us, usc, ub);
  const float* sp = opt_ptr(slope);
  dispatch_act(act, [&](auto tag) {
    masked_apply<decltype(tag)::value>(xp, mp, out.data_ptr<float>(), g, us, usc, ub, static_cast<float>(param), sp);
  });
  at::Tensor empty;
  return {double_tensor(shift, xv),
          double_tensor(offset, xv),
          double_tensor(rstd, xv),
          given ? empty : double_tensor(mean, xv),
          given ? empty : double_tensor(var, xv),
          given ? empty : double_tensor(count, xv)};
}

// Backward of masked_channel_forward: {dx (the view's shape), dγ, dβ, d slope} (parameters in
// float64). `count`: the valid count per group (unused when given).
std::vector<at::Tensor> masked_channel_backward(const at::Tensor& dyv, const at::Tensor& xv, const at::Tensor& mask,
                                                bool planes, int64_t N, int64_t C, int64_t S, int64_t G, bool given,
                                                const at::Tensor& weight, const at::Tensor& bias,
                                                const at::Tensor& shift_g, const at::Tensor& offset_g,
                                                const at::Tensor& rstd_g, const at::Tensor& count_g, int64_t act,
                                                double param, const at::Tensor& slope) {
  const MaskedGroups g{planes, N, C, S, G, G < 0 || given};
  const int64_t NG = g.groups(), UC = N * C;
  const auto gamma = as_double(weight, C, 1.0), beta = as_double(bias, C, 0.0);
  const auto shift = as_double(shift_g, NG, 0.0), offset = as_double(offset_g, NG, 0.0),
             rstd = as_double(rstd_g, NG, 1.0), count = as_double(count_g, NG, 1.0);
  const float *gp = dyv.data_ptr<float>(), *xp = xv.data_ptr<float>(), *sp = opt_ptr(slope);
  const std::vector<int32_t> lanes = lane_mask(mask.data_ptr<bool>(), N * S);
  const int32_t* mp = lanes.data();
  const float q0 = static_cast<float>(param);
  std::vector<double> Au(UC), Bu(UC), Du(UC);
  if (fuses(g)) {
    const bool* bp = mask.data_ptr<bool>();
    const ValidPositions v = valid_positions(bp, N, S);
    auto dx = at::empty_like(xv);
    const bool stream = should_stream(dx);
    dispatch_act(act, [&](auto tag) {
      fused_masked_backward<decltype(tag)::value>(gp, xp, mp, dx.data_ptr<float>(), g, v, given, gamma, beta, shift,
                                                  offset, rstd, count, q0, sp, stream, Au, Bu, Du);
    });
    std::vector<double> dgamma(C, 0.0), dbeta(C, 0.0), dslope(C, 0.0);
    for (int64_t i = 0; i < UC; ++i) {  // planes: unit i = n·C + c is plane i
      const int64_t c = i % C, k = g.group_of(i / C, c);
      dbeta[c] += Au[i];
      dgamma[c] += rstd[k] * Bu[i] - offset[k] * rstd[k] * Au[i];
      dslope[c] += Du[i];
    }
    return {dx, double_tensor(dgamma, xv), double_tensor(dbeta, xv), double_tensor(dslope, xv)};
  }
  std::vector<float> us, usc, ub;
  unit_affine(g, gamma, beta, shift, offset, rstd, us, usc, ub);
  dispatch_act(act, [&](auto tag) {
    masked_backward_reduce<decltype(tag)::value>(gp, xp, mp, g, us, usc, ub, q0, sp, Au, Bu, Du);
  });
  // x̂ = α·u + δ with u = x − shift: α = rstd, δ = −offset·rstd
  std::vector<double> dgamma(C, 0.0), dbeta(C, 0.0), dslope(C, 0.0), m1(NG, 0.0), m2(NG, 0.0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = n * C + c, k = g.group_of(n, c);
      const double dzx = rstd[k] * Bu[i] - offset[k] * rstd[k] * Au[i];  // Σ m·dz·x̂ over the unit
      dbeta[c] += Au[i];
      dgamma[c] += dzx;
      dslope[c] += Du[i];
      m1[k] += gamma[c] * Au[i];
      m2[k] += gamma[c] * dzx;
    }
  std::vector<float> cz(UC), cu(UC, 0.f), cc(UC, 0.f);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = n * C + c, k = g.group_of(n, c);
      if (!given && count[k] < 2) {
        // A group of one valid value (or none) normalizes it to x̂ = 0 whatever it is: dx = 0
        // exactly. The general form below would get it as γr·dz − γr·dz from two roundings,
        // which at r = 1/√ε leaves ulp(γr·dz) (3e-5 in float32 where the answer is 0).
        cz[i] = 0.f;
        continue;
      }
      cz[i] = usc[i];  // γ·rstd
      if (!given) {    // dx = γr·dz − r·m2/n·x̂ − r·m1/n over the valid positions
        const double cnt = count[k], r = rstd[k];
        cu[i] = static_cast<float>(-r * (m2[k] / cnt) * r);
        cc[i] = static_cast<float>(-r * (m1[k] / cnt - (m2[k] / cnt) * offset[k] * r));
      }
    }
  auto dx = at::empty_like(xv);
  dispatch_act(act, [&](auto tag) {
    masked_backward_apply<decltype(tag)::value>(gp, xp, mp, dx.data_ptr<float>(), g, us, usc, ub, cz, cu, cc, q0,
                                                sp);
  });
  return {dx, double_tensor(dgamma, xv), double_tensor(dbeta, xv), double_tensor(dslope, xv)};
}

}  // namespace normlab
