// The fused per-sample route of channels-last GroupNorm (declared in group_columns.h). The
// two-pass route (channel_passes.cpp) sums the whole input, does the per-(sample, channel)
// bookkeeping on one thread — N·C values: 32768 at 128×256×8×8, as much serial work as a
// third of the kernel — and then normalizes in a second parallel region. Here one task takes
// a sample: its per-channel sums, its groups' statistics and coefficients, and its output,
// all while its (S, C) block is in cache. The shifts, sums and coefficients are the two-pass
// route's, computed in the same way.

#include "group_columns.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "activation.h"
#include "loops.h"

namespace normlab {

namespace {

constexpr int64_t kFuseColumnBytes = 512 << 10;  // a sample read twice (sums, then output) from half the 1 MiB L2: at 4 MiB, GroupNorm(32) channels_last 32x64x56x56 (800 KB samples) forward went 1.12 -> 1.36x torch.nn at one thread

// The shift of each of a sample's G groups: sample_shift over its first channel (the mean of
// up to 16 of its values, spread evenly), read row by row as column_sample_shifts does.
void sample_group_shifts(const float* x, int64_t S, int64_t C, int64_t G, double* shift) {
  const int64_t step = C / G, m = std::min<int64_t>(S, 16);
  std::fill(shift, shift + G, 0.0);
  for (int64_t j = 0; j < m; ++j) {
    const float* row = x + (S >= 16 ? (j * S) >> 4 : j) * C;
    for (int64_t k = 0; k < G; ++k) shift[k] += row[k * step];
  }
  for (int64_t k = 0; k < G; ++k) shift[k] = static_cast<float>(shift[k] / static_cast<double>(m));
}

}  // namespace

bool fuse_columns(int64_t N, int64_t S, int64_t C) {
  return S * C * 4 <= kFuseColumnBytes && N >= at::get_num_threads();
}

void fused_column_forward(const at::Tensor& xv, const at::Tensor& y, int64_t G, const std::vector<double>& gamma,
                          const std::vector<double>& beta, double eps, int64_t act, double param, const float* slope,
                          std::vector<double>& shift, std::vector<double>& offset, std::vector<double>& rstd,
                          std::vector<double>& mean, std::vector<double>& var) {
  const int64_t N = xv.size(0), S = xv.size(1), C = xv.size(2), Cg = C / G;
  const float* xp = xv.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const bool stream = should_stream(y);
  const double count = static_cast<double>(Cg * S);
  const float q0 = static_cast<float>(param);
  dispatch_act(act, [&](auto tag) {
    constexpr int A = decltype(tag)::value;
    at::parallel_for(0, N, 1, [&](int64_t nb, int64_t ne) {
      std::vector<float> k(C), f1(C), f2(C), sc(C), bc(C);
      std::vector<double> s1(C), s2(C);
      for (int64_t n = nb; n < ne; ++n) {
        const float* x = xp + n * S * C;
        double* sh = shift.data() + n * G;
        sample_group_shifts(x, S, C, G, sh);
        for (int64_t c = 0; c < C; ++c) k[c] = static_cast<float>(sh[c / Cg]);
        std::fill(s1.begin(), s1.end(), 0.0);
        std::fill(s2.begin(), s2.end(), 0.0);
        column_moment_sums(x, C, 0, S, AllRows{}, k.data(), f1.data(), f2.data(), s1.data(), s2.data());
        for (int64_t g = 0; g < G; ++g) {
          double t1 = 0, t2 = 0;
          for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
            t1 += s1[c];
            t2 += s2[c];
          }
          const int64_t i = n * G + g;
          offset[i] = t1 / count;
          var[i] = std::max(t2 / count - offset[i] * offset[i], 0.0);
          rstd[i] = inv_std(var[i], eps);
          mean[i] = sh[g] + offset[i];
          for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
            const double scale = rstd[i] * gamma[c];
            sc[c] = static_cast<float>(scale);
            bc[c] = static_cast<float>(beta[c] - offset[i] * scale);
          }
        }
        float* yn = yp + n * S * C;
        for (int64_t s = 0; s < S; ++s) {
          const float* row = x + s * C;
          emit(yn + s * C, C, stream, [&](int64_t j) __attribute__((always_inline)) {
            const float q = (A == PRELU) ? slope[j] : q0;
            return act_forward<A>((row[j] - k[j]) * sc[j] + bc[j], q);
          });
        }
      }
      stream_fence(stream);
    });
  });
}

void fused_column_backward(const at::Tensor& dyv, const at::Tensor& srcv, const at::Tensor& dx, int64_t G,
                           bool from_output, const std::vector<double>& gamma, const std::vector<double>& beta,
                           const std::vector<double>& shift, const std::vector<double>& offset,
                           const std::vector<double>& rstd, int64_t act, double param, const float* slope,
                           std::vector<double>& Au, std::vector<double>& Bu, std::vector<double>& Du) {
  const int64_t N = srcv.size(0), S = srcv.size(1), C = srcv.size(2), Cg = C / G;
  const float *gp = dyv.data_ptr<float>(), *vp = srcv.data_ptr<float>();
  float* op = dx.data_ptr<float>();
  const bool stream = should_stream(dx);
  const double count = static_cast<double>(Cg * S);
  const float q0 = static_cast<float>(param);
  auto body = [&](auto tag, auto ytag) {
    constexpr int A = decltype(tag)::value;
    constexpr bool Y = decltype(ytag)::value;
    at::parallel_for(0, N, 1, [&](int64_t nb, int64_t ne) {
      std::vector<float> k(C), m(C), c0(C), fA(C), fB(C), fD(C), w1(C), w2(C), w3(C);
      std::vector<double> alpha(C), delta(C);
      for (int64_t n = nb; n < ne; ++n) {
        for (int64_t c = 0; c < C; ++c) {
          const int64_t i = n * G + c / Cg;
          const double scale = rstd[i] * gamma[c];
          k[c] = static_cast<float>(shift[i]);
          m[c] = static_cast<float>(scale);
          c0[c] = static_cast<float>(beta[c] - offset[i] * scale);
          const auto xhat = xhat_affine(Y, gamma[c], beta[c], offset[i], rstd[i]);
          alpha[c] = xhat.alpha;
          delta[c] = xhat.delta;
        }
        double *a = Au.data() + n * C, *b = Bu.data() + n * C, *d = Du.data() + n * C;
        const float *g = gp + n * S * C, *v = vp + n * S * C;
        column_sums<A, Y>(g, v, C, 0, S, AllRows{}, k.data(), m.data(), c0.data(), q0, slope, fA.data(), fB.data(),
                          fD.data(), a, b, d);
        for (int64_t grp = 0; grp < G; ++grp) {
          const int64_t i = n * G + grp;
          double m1 = 0, m2 = 0;
          for (int64_t c = grp * Cg; c < (grp + 1) * Cg; ++c) {
            b[c] = alpha[c] * b[c] + delta[c] * a[c];  // Σ dz·x̂ from here on
            m1 += gamma[c] * a[c];
            m2 += gamma[c] * b[c];
          }
          m1 /= count;
          m2 /= count;
          for (int64_t c = grp * Cg; c < (grp + 1) * Cg; ++c) {
            w1[c] = static_cast<float>(rstd[i] * gamma[c]);
            w2[c] = static_cast<float>(-rstd[i] * m2 * alpha[c]);
            w3[c] = static_cast<float>(-rstd[i] * (m1 + m2 * delta[c]));
          }
        }
        float* o = op + n * S * C;
        for (int64_t s = 0; s < S; ++s) {
          const float *gs = g + s * C, *vs = v + s * C;
          emit(o + s * C, C, stream, [&](int64_t j) __attribute__((always_inline)) {
            const float q = (A == PRELU) ? slope[j] : q0;
            float u, dz, z;
            recover<A, Y>(vs[j], gs[j], k[j], m[j], c0[j], q, u, dz, z);
            return w1[j] * dz + u_term(w2[j], u) + w3[j];
          });
        }
      }
      stream_fence(stream);
    });
  };
  dispatch_act_source(act, from_output, body);
}

}  // namespace normlab
