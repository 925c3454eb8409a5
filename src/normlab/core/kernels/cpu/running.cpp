// The running-estimate update inside a kernels call (declared in kernels.h): BatchNorm's and
// InstanceNorm's batch statistics folded into the running estimates, in place, with normlab's
// conventions — momentum (or the cumulative average), the unbiased variance, and a batch that
// is not finite left out. The same update in torch ops, for the other paths and the
// exceptional cases (a warning, an error), is normlab.core.running.RunningStats.update.

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "kernels.h"

namespace normlab {

// Fold one batch's per-channel statistics (or per-instance ones, averaged over the batch) into
// the running estimates, in place, when every one of them is finite: running = (1 − m)·running
// + m·batch, with the variance unbiased by count/(count − 1) if asked; m < 0 means the
// cumulative average, m = 1/(k + 1) with k read from and then incremented in
// num_batches_tracked. Returns whether the batch was folded.
bool running_update(const at::Tensor& running_mean, const at::Tensor& running_var, const at::Tensor& mean,
                    const at::Tensor& var, int64_t count, double momentum, const at::Tensor& num_batches_tracked,
                    bool unbiased) {
  const int64_t C = running_mean.numel();
  const double* bm = mean.data_ptr<double>();
  const double* bv = var.data_ptr<double>();
  // InstanceNorm's statistics are per (sample, channel): a channel's estimate follows the
  // batch average of its instances' (each has the same count, so unbiasing after averaging
  // is exact).
  std::vector<double> average_mean, average_var;
  if (mean.numel() != C) {
    const int64_t N = mean.numel() / C;
    average_mean.assign(C, 0.0);
    average_var.assign(C, 0.0);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < C; ++c) {
        average_mean[c] += bm[n * C + c];
        average_var[c] += bv[n * C + c];
      }
    for (int64_t c = 0; c < C; ++c) {
      average_mean[c] /= static_cast<double>(N);
      average_var[c] /= static_cast<double>(N);
    }
    bm = average_mean.data();
    bv = average_var.data();
  }
  for (int64_t c = 0; c < C; ++c)
    if (!std::isfinite(bm[c]) || !std::isfinite(bv[c])) return false;
  const bool counted = num_batches_tracked.defined() && num_batches_tracked.numel();
  double m = momentum;
  if (m < 0) m = 1.0 / (static_cast<double>(num_batches_tracked.item<int64_t>()) + 1.0);
  const double correction = unbiased && count > 1 ? static_cast<double>(count) / (count - 1) : 1.0;
  // Compute every new value first and write only if all of them are finite: a finite batch
  // can still overflow the estimate (float16 buffers), and a half-written update is worse.
  auto fold = [&](auto* rm, auto* rv) -> bool {
    using T = std::remove_pointer_t<decltype(rm)>;
    std::vector<T> nm(C), nv(C);
    for (int64_t c = 0; c < C; ++c) {
      nm[c] = static_cast<T>(rm[c] * (1 - m) + static_cast<T>(bm[c]) * m);
      nv[c] = static_cast<T>(rv[c] * (1 - m) + static_cast<T>(bv[c] * correction) * m);
      if (!std::isfinite(static_cast<double>(nm[c])) || !std::isfinite(static_cast<double>(nv[c]))) return false;
    }
    std::copy(nm.begin(), nm.end(), rm);
    std::copy(nv.begin(), nv.end(), rv);
    return true;
  };
  const bool folded = running_mean.scalar_type() == at::kFloat
                          ? fold(running_mean.data_ptr<float>(), running_var.data_ptr<float>())
                          : fold(running_mean.data_ptr<double>(), running_var.data_ptr<double>());
  if (!folded) return false;
  if (counted) num_batches_tracked.add_(1);
  return true;
}

}  // namespace normlab
