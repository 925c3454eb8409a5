// The masked channel norms' shared pieces and their per-pass route, included by masked.cpp
// (which holds the design notes, the fused route and the entries) inside the kernels' one
// translation unit (unit_kernels.cpp): the grouping of a masked call, the valid positions of
// each sample, the shifts, and the passes for the moments and the output (backward: a
// reduction pass and a gradient pass) that columns, BatchNorm's short planes and groups over
// the fused size take.

#pragma once

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <cstring>
#include <vector>

#include "activation.h"
#include "kernels.h"
#include "loops.h"

namespace normlab {
namespace {

// v where the lane mask m is all ones, +0 where it is 0: a bitwise AND, which vectorizes.
NL_INLINE float keep(float v, int32_t m) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  bits &= static_cast<uint32_t>(m);
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

// Statistics groups of a masked call. Units are (n, c) for both layouts; a group is channel c
// (BatchNorm, or given statistics) or (n, c / (C/G)).
struct MaskedGroups {
  bool planes;
  int64_t N, C, S, G;
  bool per_channel;
  int64_t groups() const { return per_channel ? C : N * G; }
  int64_t group_of(int64_t n, int64_t c) const { return per_channel ? c : n * G + c / (C / G); }
  int64_t at(int64_t n, int64_t s, int64_t c) const { return planes ? (n * C + c) * S + s : (n * S + s) * C + c; }
  // planes: group k's planes, j < size() (a channel's N planes, or C/G adjacent ones)
  int64_t size() const { return per_channel ? N : C / G; }
  int64_t plane(int64_t k, int64_t j) const { return per_channel ? j * C + k : (k / G) * C + (k % G) * (C / G) + j; }
};

// For the columns layout: write(i, n, dst) fills row i = n·S + s of C values at dst where the
// row is valid; a padded row gets zeros. Rows in parallel.
template <typename F>
void valid_rows(const MaskedGroups& g, const int32_t* mp, float* out, F&& write) {
  at::parallel_for(0, g.N * g.S, grain_for(g.C), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* dst = out + i * g.C;
      if (!mp[i]) {
        std::fill(dst, dst + g.C, 0.f);
        continue;
      }
      write(i, i / g.S, dst);
    }
  });
}

// For the planes layout: body(p, m) for each plane p = n·C + c, in parallel, m its sample's
// lane mask (S values).
template <typename F>
void each_plane(const MaskedGroups& g, const int32_t* mp, F&& body) {
  at::parallel_for(0, g.N * g.C, grain_for(g.S), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) body(p, mp + (p / g.C) * g.S);
  });
}

// Valid positions per sample, and up to 16 of them spread evenly over each sample's valid ones.
// Also each sample's valid span [lo, hi), the first valid position to one past the last (0, 0
// for a sample without one): a padded sequence's tail is never read, only zeroed.
struct ValidPositions {
  std::vector<int64_t> count;                 // (N,)
  std::vector<std::vector<int64_t>> samples;  // (N, ≤16)
  std::vector<int64_t> lo, hi;                // (N,)
};

ValidPositions valid_positions(const bool* mp, int64_t N, int64_t S) {
  ValidPositions v{std::vector<int64_t>(N, 0), std::vector<std::vector<int64_t>>(N), std::vector<int64_t>(N, 0),
                   std::vector<int64_t>(N, 0)};
  for (int64_t n = 0; n < N; ++n) {
    const bool* m = mp + n * S;
    int64_t total = 0;
    for (int64_t s = 0; s < S; ++s) total += m[s];
    v.count[n] = total;
    if (total) {
      int64_t lo = 0, hi = S;
      while (!m[lo]) ++lo;
      while (!m[hi - 1]) --hi;
      v.lo[n] = lo;
      v.hi[n] = hi;
    }
    const int64_t want = std::min<int64_t>(total, 16);
    if (!want) continue;
    // the ((j·total) >> 4)-th valid position for j < 16 (every one when fewer than 16)
    if (total == v.hi[n] - v.lo[n]) {  // one unbroken span (a padded sequence): no search
      for (int64_t j = 0; j < want; ++j) v.samples[n].push_back(v.lo[n] + (total >= 16 ? (j * total) >> 4 : j));
      continue;
    }
    int64_t j = 0, seen = 0;
    for (int64_t s = 0; s < S && j < want; ++s) {
      if (!m[s]) continue;
      const int64_t target = total >= 16 ? (j * total) >> 4 : j;
      if (seen == target) {
        v.samples[n].push_back(s);
        ++j;
      }
      ++seen;
    }
  }
  return v;
}

// Each group's shift: the mean of the sampled valid values of its first channel, in its first
// sample with a valid position (0 for a group without one).
double masked_shift(const float* xp, const MaskedGroups& g, const ValidPositions& v, int64_t k) {
  int64_t n = -1, c;
  if (g.per_channel) {
    c = k;
    for (int64_t i = 0; i < g.N && n < 0; ++i)
      if (v.count[i]) n = i;
  } else {
    n = k / g.G;
    c = (k % g.G) * (g.C / g.G);
    if (!v.count[n]) n = -1;
  }
  if (n < 0) return 0.0;
  double acc = 0;
  for (int64_t s : v.samples[n]) acc += xp[g.at(n, s, c)];
  return static_cast<float>(acc / static_cast<double>(v.samples[n].size()));
}

std::vector<double> masked_shifts(const float* xp, const MaskedGroups& g, const ValidPositions& v) {
  std::vector<double> shift(g.groups(), 0.0);
  for (int64_t k = 0; k < g.groups(); ++k) shift[k] = masked_shift(xp, g, v, k);
  return shift;
}

// Per unit (n, c): Σ m·(x − k) and Σ m·(x − k)², in double, k the unit's group shift.
void masked_unit_moments(const float* xp, const int32_t* mp, const MaskedGroups& g, const std::vector<float>& ushift,
                         std::vector<double>& s1, std::vector<double>& s2) {
  const int64_t N = g.N, C = g.C, S = g.S;
  if (g.planes) {
    each_plane(g, mp, [&](int64_t p, const int32_t* m) {
      const float* row = xp + p * S;
      const float k = ushift[p];
      const Sums t = block_sums(0, S, [&](int64_t s) __attribute__((always_inline)) {
        const float d = keep(row[s] - k, m[s]);
        return Terms{d, d * d, 0.f};
      });
      s1[p] = t.first;
      s2[p] = t.second;
    });
    return;
  }
  // columns: one task per sample; a padded row is skipped whole
  at::parallel_for(0, N, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, S * C)), [&](int64_t nb, int64_t ne) {
    std::vector<float> f1(C), f2(C);
    for (int64_t n = nb; n < ne; ++n) {
      double *d1 = s1.data() + n * C, *d2 = s2.data() + n * C;
      std::fill(d1, d1 + C, 0.0);
      std::fill(d2, d2 + C, 0.0);
      const int32_t* m = mp + n * S;
      column_moment_sums(xp + n * S * C, C, 0, S, [&](int64_t s) { return m[s] != 0; }, ushift.data() + n * C,
                         f1.data(), f2.data(), d1, d2);
    }
  });
}

// y = m ? act((x − shift_u)·scale_u + bias_u) : 0 per unit u = (n, c).
template <int A>
void masked_apply(const float* xp, const int32_t* mp, float* yp, const MaskedGroups& g, const std::vector<float>& us,
                  const std::vector<float>& usc, const std::vector<float>& ub, float param, const float* slope) {
  const int64_t C = g.C, S = g.S;
  if (g.planes) {
    each_plane(g, mp, [&](int64_t p, const int32_t* m) {
      const float k = us[p], sc = usc[p], b = ub[p];
      const float q = (A == PRELU) ? slope[p % C] : param;
      const float* row = xp + p * S;
      float* dst = yp + p * S;
#pragma omp simd
      for (int64_t s = 0; s < S; ++s) {
        const float z = act_forward<A>((row[s] - k) * sc + b, q);
        dst[s] = keep(z, m[s]);
      }
    });
    return;
  }
  valid_rows(g, mp, yp, [&](int64_t i, int64_t n, float* dst) {
    const float *k = us.data() + n * C, *sc = usc.data() + n * C, *b = ub.data() + n * C;
    const float* row = xp + i * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const float q = (A == PRELU) ? slope[c] : param;
      dst[c] = act_forward<A>((row[c] - k[c]) * sc[c] + b[c], q);
    }
  });
}

// Per unit: A = Σ m·dz, B = Σ m·dz·(x − shift), and for PReLU D = Σ m·dy·min(z, 0).
// The backward sums of one plane's positions lo ≤ s < hi, padding excluded by the lane mask m:
// Σ dz, Σ dz·u and PReLU's Σ dy·min(z, 0), as activation.h's plane_sums (the per-pass route
// and masked.cpp's fused route both take them).
template <int A>
NL_INLINE Sums masked_plane_sums(const float* dy, const float* v, const int32_t* m, int64_t lo, int64_t hi, float k,
                                 float sc, float b, float q) {
  return block_sums<A == PRELU>(lo, hi, [&](int64_t s) __attribute__((always_inline)) {
    float u, dz, z;
    recover<A, false>(v[s], dy[s], k, sc, b, q, u, dz, z);
    return Terms{keep(dz, m[s]), keep(dz * u, m[s]), keep(dy[s] * prelu_slope_input(z), m[s])};
  });
}

template <int A>
void masked_backward_reduce(const float* gp, const float* xp, const int32_t* mp, const MaskedGroups& g,
                            const std::vector<float>& us, const std::vector<float>& usc,
                            const std::vector<float>& ub, float param, const float* slope, std::vector<double>& Au,
                            std::vector<double>& Bu, std::vector<double>& Du) {
  const int64_t N = g.N, C = g.C, S = g.S;
  if (g.planes) {
    each_plane(g, mp, [&](int64_t p, const int32_t* m) {
      const float k = us[p], sc = usc[p], b = ub[p];
      const float q = (A == PRELU) ? slope[p % C] : param;
      const float* dy = gp + p * S;
      const float* v = xp + p * S;
      const Sums t = masked_plane_sums<A>(dy, v, m, 0, S, k, sc, b, q);
      Au[p] = t.first;
      Bu[p] = t.second;
      Du[p] = t.third;
    });
    return;
  }
  at::parallel_for(0, N, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, S * C)), [&](int64_t nb, int64_t ne) {
    std::vector<float> fA(C), fB(C), fD(C);
    for (int64_t n = nb; n < ne; ++n) {
      const int64_t o = n * C;
      std::fill(Au.data() + o, Au.data() + o + C, 0.0);
      std::fill(Bu.data() + o, Bu.data() + o + C, 0.0);
      std::fill(Du.data() + o, Du.data() + o + C, 0.0);
      const int32_t* m = mp + n * S;
      column_sums<A, false>(gp + n * S * C, xp + n * S * C, C, 0, S, [&](int64_t s) { return m[s] != 0; },
                            us.data() + o, usc.data() + o, ub.data() + o, param, slope, fA.data(), fB.data(),
                            fD.data(), Au.data() + o, Bu.data() + o, Du.data() + o);
    }
  });
}

// dx = m ? cz·dz + cu·(x − shift) + cc : 0 per unit.
template <int A>
void masked_backward_apply(const float* gp, const float* xp, const int32_t* mp, float* dp, const MaskedGroups& g,
                           const std::vector<float>& us, const std::vector<float>& usc, const std::vector<float>& ub,
                           const std::vector<float>& cz, const std::vector<float>& cu, const std::vector<float>& cc,
                           float param, const float* slope) {
  const int64_t C = g.C, S = g.S;
  if (g.planes) {
    each_plane(g, mp, [&](int64_t p, const int32_t* m) {
      const float k = us[p], sc = usc[p], b = ub[p], w1 = cz[p], w2 = cu[p], w3 = cc[p];
      const float q = (A == PRELU) ? slope[p % C] : param;
      const float* dy = gp + p * S;
      const float* v = xp + p * S;
      float* dst = dp + p * S;
#pragma omp simd
      for (int64_t s = 0; s < S; ++s) {
        float u, dz, z;
        recover<A, false>(v[s], dy[s], k, sc, b, q, u, dz, z);
        const float d = w1 * dz + u_term(w2, u) + w3;
        dst[s] = keep(d, m[s]);
      }
    });
    return;
  }
  valid_rows(g, mp, dp, [&](int64_t i, int64_t n, float* dst) {
    const int64_t o = n * C;
    const float* dy = gp + i * C;
    const float* v = xp + i * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const float q = (A == PRELU) ? slope[c] : param;
      float u, dz, z;
      recover<A, false>(v[c], dy[c], us[o + c], usc[o + c], ub[o + c], q, u, dz, z);
      dst[c] = cz[o + c] * dz + u_term(cu[o + c], u) + cc[o + c];
    }
  });
}

// The per-unit (n, c) shift, scale γ·rstd and bias β − offset·γ·rstd of the groups' statistics.
void unit_affine(const MaskedGroups& g, const std::vector<double>& gamma, const std::vector<double>& beta,
                 const std::vector<double>& shift, const std::vector<double>& offset, const std::vector<double>& rstd,
                 std::vector<float>& us, std::vector<float>& usc, std::vector<float>& ub) {
  const int64_t UC = g.N * g.C;
  us.resize(UC);
  usc.resize(UC);
  ub.resize(UC);
  for (int64_t n = 0; n < g.N; ++n)
    for (int64_t c = 0; c < g.C; ++c) {
      const int64_t k = g.group_of(n, c), i = n * g.C + c;
      const double sc = rstd[k] * gamma[c];
      us[i] = static_cast<float>(shift[k]);
      usc[i] = static_cast<float>(sc);
      ub[i] = static_cast<float>(beta[c] - offset[k] * sc);
    }
}

// The mask as one int32 per (sample, position), all bits set where valid: a lane as wide as a
// float's, which keep() ANDs with a value's bits. GCC turned `m ? v : 0` into a branch per
// value, which no loop vectorizes (the masked BatchNorm1d forward took 7-10x the unmasked
// one); the AND vectorizes, and still never lets padding through (NaN & 0 is +0).
std::vector<int32_t> lane_mask(const bool* mp, int64_t n) {
  std::vector<int32_t> out(n);
  for (int64_t i = 0; i < n; ++i) out[i] = mp[i] ? -1 : 0;
  return out;
}


}  // namespace
}  // namespace normlab
