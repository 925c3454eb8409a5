// The two-pass route of the channel norms (declared in channel_passes.h): moments, then the
// normalization, each a pass over memory — for groups larger than channel.cpp's fused route
// keeps in cache. Moments are one pass over shifted data: the shift is a value of the group
// itself (loops.h's sample_shift), so x − shift is exact for data with a large mean, and sums of
// (x − shift) and (x − shift)² are accumulated in float blocks flushed to double; channel.cpp
// turns the sums into statistics.
//
// Activations are fused: forward writes act(z) for z = (x − shift)·scale + bias without
// materializing z; backward recomputes z from x ("X" source), or, in the memory-saving mode,
// recovers z = act⁻¹(y) from the saved output ("Y" source, In-Place Activated BatchNorm).

#include "channel_passes.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include <vector>

#include "activation.h"
#include "loops.h"

namespace normlab {

// ---------------------------------------------------------------------------------------
// planes (P, S)

// Σ(x − shift_p) and Σ(x − shift_p)² per plane, in double.
std::vector<at::Tensor> plane_moments(const at::Tensor& x, const at::Tensor& shift) {
  const int64_t P = x.size(0), S = x.size(1);
  auto opts = x.options().dtype(at::kDouble);
  auto s1 = at::empty({P}, opts), s2 = at::empty({P}, opts);
  const float* xp = x.data_ptr<float>();
  const float* kp = shift.data_ptr<float>();
  double* o1 = s1.data_ptr<double>();
  double* o2 = s2.data_ptr<double>();
  at::parallel_for(0, P, grain_for(S), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const Sums m = shifted_moments(xp + p * S, S, kp[p]);
      o1[p] = m.first;
      o2[p] = m.second;
    }
  });
  return {s1, s2};
}

// y = act((x − shift_p)·scale_p + bias_p); slope (per plane) only for PReLU. With `out`
// given (possibly x itself: the in-place mode), y is written there.
at::Tensor plane_apply(const at::Tensor& x, const Coefficients& pass, const at::Tensor& out) {
  const float *kp = pass.shift, *ap = pass.scale, *bp = pass.bias, *sp = pass.slope;
  const int64_t P = x.size(0), S = x.size(1);
  at::Tensor y = out.defined() && out.numel() ? out : at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const bool stream = should_stream(y);
  dispatch_act(pass.act, [&](auto tag) {
    constexpr int A = decltype(tag)::value;
    at::parallel_for(0, P, grain_for(S), [&](int64_t begin, int64_t end) {
      // plane p's coefficients: at i = p, or i = p % channels (kept without a division per plane)
      for (int64_t p = begin, i = pass.channels > 0 ? begin % pass.channels : begin; p < end; ++p, ++i) {
        if (pass.channels > 0 && i == pass.channels) i = 0;
        const float k = kp[i], m = ap[i], c = bp[i];
        const float q = (A == PRELU) ? sp[i] : static_cast<float>(pass.param);
        const float* row = xp + p * S;
        emit(yp + p * S, S, stream, [&](int64_t s) __attribute__((always_inline)) { return act_forward<A>((row[s] - k) * m + c, q); });
      }
      stream_fence(stream);
    });
  });
  return y;
}

// Backward sums per plane, in double: A = Σ dz, B = Σ dz·u, and for PReLU D = Σ dy·min(z, 0)
// (its slope's gradient). u = x − shift and z = u·scale + bias (source X), or u = z =
// act⁻¹(y) (source Y); dz = dy·act'(z).
std::vector<at::Tensor> plane_backward_reduce(const at::Tensor& dy, const at::Tensor& src, int64_t from_output,
                                              const Coefficients& pass) {
  const int64_t P = src.size(0), S = src.size(1);
  auto opts = src.options().dtype(at::kDouble);
  auto A_ = at::empty({P}, opts), B_ = at::empty({P}, opts), D_ = at::zeros({P}, opts);
  const float *gp = dy.data_ptr<float>(), *xp = src.data_ptr<float>();
  const float *kp = pass.shift, *ap = pass.scale, *bp = pass.bias, *sp = pass.slope;
  double *oA = A_.data_ptr<double>(), *oB = B_.data_ptr<double>(), *oD = D_.data_ptr<double>();
  auto body = [&](auto tag, auto ytag) {
    constexpr int A = decltype(tag)::value;
    constexpr bool Y = decltype(ytag)::value;
    at::parallel_for(0, P, grain_for(S), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const float q = (A == PRELU) ? sp[p] : static_cast<float>(pass.param);
        plane_sums<A, Y>(gp + p * S, xp + p * S, S, kp[p], ap[p], bp[p], q, oA[p], oB[p], oD[p]);
      }
    });
  };
  dispatch_act_source(pass.act, from_output, body);
  return {A_, B_, D_};
}

// dx = coef_dz·dz + coef_u·u + coef_c, with u and dz as in plane_backward_reduce.
at::Tensor plane_backward_apply(const at::Tensor& dy, const at::Tensor& src, int64_t from_output,
                                const Coefficients& pass, const at::Tensor& coef_dz, const at::Tensor& coef_u,
                                const at::Tensor& coef_c) {
  const int64_t P = src.size(0), S = src.size(1);
  auto dx = at::empty_like(src);
  const float *gp = dy.data_ptr<float>(), *xp = src.data_ptr<float>();
  const float *kp = pass.shift, *ap = pass.scale, *bp = pass.bias, *sp = pass.slope;
  const float *cz = coef_dz.data_ptr<float>(), *cu = coef_u.data_ptr<float>(), *cc = coef_c.data_ptr<float>();
  float* op = dx.data_ptr<float>();
  const bool stream = should_stream(dx);
  auto body = [&](auto tag, auto ytag) {
    constexpr int A = decltype(tag)::value;
    constexpr bool Y = decltype(ytag)::value;
    at::parallel_for(0, P, grain_for(S), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const float q = (A == PRELU) ? sp[p] : static_cast<float>(pass.param);
        plane_dx<A, Y>(gp + p * S, xp + p * S, S, kp[p], ap[p], bp[p], q, cz[p], cu[p], cc[p], op + p * S, stream);
      }
      stream_fence(stream);
    });
  };
  dispatch_act_source(pass.act, from_output, body);
  return dx;
}

// ---------------------------------------------------------------------------------------
// columns (N, S, C): channels innermost. Work is split over (n, chunk of S); each task sums
// into its own row of a (N, chunks, C) buffer, which channel.cpp's unit_sums adds up.

namespace {

struct ColumnSplit {
  int64_t chunks;  // chunks of S per sample
};

ColumnSplit column_split(int64_t N, int64_t S, int64_t C) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // Enough tasks for every thread, none smaller than ~kGrainElems values.
  int64_t want = (threads * 4 + N - 1) / N;
  const int64_t max_by_size = std::max<int64_t>(1, (S * C) / kGrainElems);
  return {std::max<int64_t>(1, std::min<int64_t>({want, max_by_size, S}))};
}

}  // namespace

// Σ over S of (x − shift_nc) and its square, per (n, chunk, c), in double.
std::vector<at::Tensor> column_moments(const at::Tensor& x, const at::Tensor& shift) {
  const int64_t N = x.size(0), S = x.size(1), C = x.size(2);
  const auto split = column_split(N, S, C);
  auto opts = x.options().dtype(at::kDouble);
  auto s1 = at::zeros({N, split.chunks, C}, opts), s2 = at::zeros({N, split.chunks, C}, opts);
  const float *xp = x.data_ptr<float>(), *kp = shift.data_ptr<float>();
  double *o1 = s1.data_ptr<double>(), *o2 = s2.data_ptr<double>();
  at::parallel_for(0, N * split.chunks, 1, [&](int64_t tb, int64_t te) {
    std::vector<float> f1(C), f2(C);
    for (int64_t t = tb; t < te; ++t) {
      const int64_t n = t / split.chunks, ch = t % split.chunks;
      const int64_t sb = S * ch / split.chunks, se = S * (ch + 1) / split.chunks;
      column_moment_sums(xp + n * S * C, C, sb, se, AllRows{}, kp + n * C, f1.data(), f2.data(), o1 + t * C,
                         o2 + t * C);
    }
  });
  return {s1, s2};
}

at::Tensor column_apply(const at::Tensor& x, const Coefficients& pass, const at::Tensor& out) {
  const float *kp = pass.shift, *ap = pass.scale, *bp = pass.bias, *sp = pass.slope;
  const int64_t N = x.size(0), S = x.size(1), C = x.size(2);
  at::Tensor y = out.defined() && out.numel() ? out : at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float q0 = static_cast<float>(pass.param);
  const bool stream = should_stream(y);
  dispatch_act(pass.act, [&](auto tag) {
    constexpr int A = decltype(tag)::value;
    at::parallel_for(0, N * S, grain_for(C), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t n = i / S;
        const float *k = kp + n * C, *m = ap + n * C, *c = bp + n * C;
        const float* row = xp + i * C;
        emit(yp + i * C, C, stream, [&](int64_t j) __attribute__((always_inline)) {
          const float q = (A == PRELU) ? sp[j] : q0;
          return act_forward<A>((row[j] - k[j]) * m[j] + c[j], q);
        });
      }
      stream_fence(stream);
    });
  });
  return y;
}

std::vector<at::Tensor> column_backward_reduce(const at::Tensor& dy, const at::Tensor& src, int64_t from_output,
                                               const Coefficients& pass) {
  const int64_t N = src.size(0), S = src.size(1), C = src.size(2);
  const auto split = column_split(N, S, C);
  auto opts = src.options().dtype(at::kDouble);
  auto A_ = at::zeros({N, split.chunks, C}, opts), B_ = at::zeros({N, split.chunks, C}, opts);
  auto D_ = at::zeros({N, split.chunks, C}, opts);
  const float *gp = dy.data_ptr<float>(), *xp = src.data_ptr<float>();
  const float *kp = pass.shift, *ap = pass.scale, *bp = pass.bias, *sp = pass.slope;
  double *oA = A_.data_ptr<double>(), *oB = B_.data_ptr<double>(), *oD = D_.data_ptr<double>();
  const float q0 = static_cast<float>(pass.param);
  auto body = [&](auto tag, auto ytag) {
    constexpr int A = decltype(tag)::value;
    constexpr bool Y = decltype(ytag)::value;
    at::parallel_for(0, N * split.chunks, 1, [&](int64_t tb, int64_t te) {
      std::vector<float> fA(C), fB(C), fD(C);
      for (int64_t t = tb; t < te; ++t) {
        const int64_t n = t / split.chunks, ch = t % split.chunks;
        const int64_t sb = S * ch / split.chunks, se = S * (ch + 1) / split.chunks;
        column_sums<A, Y>(gp + n * S * C, xp + n * S * C, C, sb, se, AllRows{}, kp + n * C,
                          ap + n * C, bp + n * C, q0, sp, fA.data(), fB.data(), fD.data(), oA + t * C, oB + t * C,
                          oD + t * C);
      }
    });
  };
  dispatch_act_source(pass.act, from_output, body);
  return {A_, B_, D_};
}

at::Tensor column_backward_apply(const at::Tensor& dy, const at::Tensor& src, int64_t from_output,
                                 const Coefficients& pass, const at::Tensor& coef_dz, const at::Tensor& coef_u,
                                 const at::Tensor& coef_c) {
  const int64_t N = src.size(0), S = src.size(1), C = src.size(2);
  auto dx = at::empty_like(src);
  const float *gp = dy.data_ptr<float>(), *xp = src.data_ptr<float>();
  const float *kp = pass.shift, *ap = pass.scale, *bp = pass.bias, *sp = pass.slope;
  const float *cz = coef_dz.data_ptr<float>(), *cu = coef_u.data_ptr<float>(), *cc = coef_c.data_ptr<float>();
  float* op = dx.data_ptr<float>();
  const float q0 = static_cast<float>(pass.param);
  const bool stream = should_stream(dx);
  auto body = [&](auto tag, auto ytag) {
    constexpr int A = decltype(tag)::value;
    constexpr bool Y = decltype(ytag)::value;
    at::parallel_for(0, N * S, grain_for(C), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t n = i / S;
        const float *k = kp + n * C, *m = ap + n * C, *c = bp + n * C;
        const float *w1 = cz + n * C, *w2 = cu + n * C, *w3 = cc + n * C;
        const float* g = gp + i * C;
        const float* v = xp + i * C;
        emit(op + i * C, C, stream, [&](int64_t j) __attribute__((always_inline)) {
          const float q = (A == PRELU) ? sp[j] : q0;
          float u, dz, z;
          recover<A, Y>(v[j], g[j], k[j], m[j], c[j], q, u, dz, z);
          return w1[j] * dz + u_term(w2[j], u) + w3[j];
        });
      }
      stream_fence(stream);
    });
  };
  dispatch_act_source(pass.act, from_output, body);
  return dx;
}

}  // namespace normlab
