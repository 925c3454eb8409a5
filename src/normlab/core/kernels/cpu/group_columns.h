// The fused per-sample route of channels-last GroupNorm (group_columns.cpp): one task sums a
// sample's (S, C) block per channel, turns the sums into its groups' statistics and normalizes
// it — or, backward, reduces and differentiates it — while the block is still in cache, in
// one parallel region. channel.cpp takes it where fuse_columns says so; BatchNorm's columns
// (groups spanning samples) and the given statistics keep the two-pass route.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace normlab {

// Whether a (N, S, C) GroupNorm input takes the fused per-sample route: a sample's block fits
// the fused size and there is a sample for every thread.
bool fuse_columns(int64_t N, int64_t S, int64_t C);

// y = act((x − shift)·scale + bias) for xv (N, S, C), G groups per sample; fills the groups'
// statistics (N·G each) as channel_forward returns them.
void fused_column_forward(const at::Tensor& xv, const at::Tensor& y, int64_t G, const std::vector<double>& gamma,
                          const std::vector<double>& beta, double eps, int64_t act, double param, const float* slope,
                          std::vector<double>& shift, std::vector<double>& offset, std::vector<double>& rstd,
                          std::vector<double>& mean, std::vector<double>& var);

// dx into `dx` (shaped like srcv); the per-(sample, channel) sums A = Σdz, B = Σdz·u, D (PReLU's)
// into Au, Bu, Du (N·C each) for the parameter gradients.
void fused_column_backward(const at::Tensor& dyv, const at::Tensor& srcv, const at::Tensor& dx, int64_t G,
                           bool from_output, const std::vector<double>& gamma, const std::vector<double>& beta,
                           const std::vector<double>& shift, const std::vector<double>& offset,
                           const std::vector<double>& rstd, int64_t act, double param, const float* slope,
                           std::vector<double>& Au, std::vector<double>& Bu, std::vector<double>& Du);

}  // namespace normlab
