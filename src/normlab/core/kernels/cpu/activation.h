// The fused activations, element by element: forward, derivative, and — for the invertible
// ones — the inverse that the in-place (output-only) mode recovers its input with. Every
// function is inline and branch-free per instantiation, so the loops that call them still
// vectorize. The codes are normlab.core.activation.ACTIVATIONS'; the loader refuses a module
// whose `activation_codes` table (bindings.cpp) differs from that registry.
#pragma once

#include <cstdint>
#include <type_traits>

#include "loops.h"

namespace normlab {

// The codes of normlab.core.activation.ACTIVATIONS; exported as `activation_codes`.
enum Act : int { IDENTITY = 0, RELU = 1, LEAKY = 2, ELU = 3, SILU = 4, PRELU = 5 };

// b ? a : c by bits. GCC compiles a ternary like `z > 0 ? 1 : p` in the reducing loops into a
// branch per value, which no loop vectorizes (ReLU's backward took 4-5x identity's, LeakyReLU's
// 6x); and where one side of a ternary folds to a constant (fast_exp's clamp: every value below
// −87 gives the same exp) it threads the constant path apart from the other, a branch again,
// which it may not merge back since float arithmetic may trap (-ftrapping-math, the default).
// A mask and an OR vectorize and select the very same value (a NaN included).
// __builtin_bit_cast, as in fast_exp: a memcpy may stop the vectorizer.
NL_INLINE float select_bits(bool b, float a, float c) {
  const uint32_t m = 0u - static_cast<uint32_t>(b);
  return __builtin_bit_cast(float, (__builtin_bit_cast(uint32_t, a) & m) | (__builtin_bit_cast(uint32_t, c) & ~m));
}

// w·u for the backward's u term, and exactly 0 where w is 0 (given statistics: dx = a·dz) even
// where u is NaN or ±inf: ∂y/∂x does not depend on x there, as torch.nn's eval backward shows.
NL_INLINE float u_term(float w, float u) { return select_bits(w != 0.f, w * u, 0.f); }

// z where PReLU's slope acts on it (z ≤ 0), NaN included, as torch.nn's slope gradient keeps
// a NaN (z < 0 ? z : 0 dropped it, so the slope trained on as if the bad value were not there).
NL_INLINE float prelu_slope_input(float z) { return select_bits(z > 0.f, 0.f, z); }

// exp(x) to ~2 ulp with plain arithmetic, so loops calling it still vectorize (std::floor
// and a memcpy bit-cast both stop GCC's vectorizer). Cody–Waite reduction x = n·ln2 + r,
// |r| ≤ ln2/2, with n rounded to nearest by the 1.5·2^23 trick (exact under the default
// round-to-nearest mode, and not folded away without -ffast-math), then a degree-6
// polynomial and 2^n built from its exponent bits. The clamp selects by bits: as
// std::min/std::max (or ternaries) it was a branch per value, and no loop calling fast_exp
// vectorized — ELU and SiLU ran one value at a time in every kernel (GroupNormAct silu 2.4x
// torch.nn's GroupNorm + SiLU). NaN passes through both selects, as through min and max.
NL_INLINE float fast_exp(float x) {
  const bool overflows = x > 88.72283906f;  // ln(FLT_MAX): expf gives +inf (SiLU(z) = z / inf = -0 there)
  x = select_bits(x < -87.0f, -87.0f, x);
  x = select_bits(x > 88.0f, 88.0f, x);
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return select_bits(overflows, __builtin_huge_valf(), p * __builtin_bit_cast(float, bits));
}

// log(x) for normal x > 0 (Cephes' logf): x = m·2^e with m in [√½, √2), then a polynomial.
NL_INLINE float fast_log(float x) {
  const int32_t bits = __builtin_bit_cast(int32_t, x);
  float e = static_cast<float>(((bits >> 23) & 0xff) - 127);
  float m = __builtin_bit_cast(float, (bits & 0x007fffff) | 0x3f800000);  // [1, 2)
  const bool big = m > 1.41421356f;  // selects by bits, so ELU's inverse vectorizes
  m = select_bits(big, m * 0.5f, m);
  e = select_bits(big, e + 1.0f, e);
  const float f = m - 1.0f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z - 2.12194440e-4f * e - 0.5f * z;
  return f + y + 0.693359375f * e;
}

// log1p(u) for u > −1, accurate for small |u| too: log(w)·u/(w − 1) with w = 1 + u
// (Goldberg's correction of the rounding in w).
NL_INLINE float fast_log1p(float u) {
  const float w = 1.0f + u;
  const float d = w - 1.0f;
  return select_bits(d == 0.0f, u, fast_log(w) * (u / d));
}

// act(z); param is LeakyReLU's slope, ELU's alpha, or PReLU's per-channel slope. Templates
// with `if constexpr`, so each instantiated loop has no branch on the activation kind.
template <int A>
NL_INLINE float act_forward(float z, float param) {
  if constexpr (A == RELU) return select_bits(z < 0.f, 0.f, z);  // not z > 0 ? z : 0, which turns NaN into 0
  else if constexpr (A == LEAKY || A == PRELU) return select_bits(z > 0.f, z, z * param);
  else if constexpr (A == ELU) return select_bits(z > 0.f, z, param * (fast_exp(z) - 1.f));
  else if constexpr (A == SILU) return z / (1.f + fast_exp(-z));
  else return z;
}

// d act / dz at z.
template <int A>
NL_INLINE float act_grad_z(float z, float param) {
  if constexpr (A == RELU) return select_bits(z <= 0.f, 0.f, 1.f);  // 1 at a NaN: torch's relu backward passes it
  else if constexpr (A == LEAKY || A == PRELU) return select_bits(z > 0.f, 1.f, param);
  else if constexpr (A == ELU) return select_bits(z > 0.f, 1.f, param * fast_exp(z));
  else if constexpr (A == SILU) {
    const float s = 1.f / (1.f + fast_exp(-z));
    return s * (1.f + z * (1.f - s));
  } else return 1.f;
}

// For invertible activations (identity, LeakyReLU/PReLU with slope > 0, ELU): z from y, and
// d act / dz from y — what In-Place ABN needs to drop the input.
template <int A>
NL_INLINE float act_inverse(float y, float param) {
  if constexpr (A == LEAKY || A == PRELU) return select_bits(y > 0.f, y, y / param);
  else if constexpr (A == ELU) return select_bits(y > 0.f, y, fast_log1p(y / param));
  else return y;
}

template <int A>
NL_INLINE float act_grad_y(float y, float param) {
  if constexpr (A == LEAKY || A == PRELU) return select_bits(y > 0.f, 1.f, param);
  else if constexpr (A == ELU) return select_bits(y > 0.f, 1.f, y + param);
  else return 1.f;
}

template <typename F>
inline void dispatch_act(int64_t act, F&& f) {
  switch (act) {
    case RELU: f(std::integral_constant<int, RELU>{}); break;
    case LEAKY: f(std::integral_constant<int, LEAKY>{}); break;
    case ELU: f(std::integral_constant<int, ELU>{}); break;
    case SILU: f(std::integral_constant<int, SILU>{}); break;
    case PRELU: f(std::integral_constant<int, PRELU>{}); break;
    default: f(std::integral_constant<int, IDENTITY>{}); break;
  }
}

// u (what x̂ is affine in) and dz = dy·act'(z) for one element; Y: from the saved output.
template <int A, bool Y>
NL_INLINE void recover(float v, float g, float k, float m, float c, float q, float& u, float& dz, float& z) {
  if constexpr (Y) {
    u = act_inverse<A>(v, q);
    z = u;
    dz = g * act_grad_y<A>(v, q);
  } else {
    u = v - k;
    z = u * m + c;
    dz = g * act_grad_z<A>(z, q);
  }
}

// f(activation tag, source tag): the backward kernels' instantiation for `act` and the saved
// tensor (std::true_type: the output, as in the in-place mode; std::false_type: the input).
template <typename F>
inline void dispatch_act_source(int64_t act, bool from_output, F&& f) {
  dispatch_act(act, [&](auto tag) {
    if (from_output) f(tag, std::true_type{});
    else f(tag, std::false_type{});
  });
}

// The backward sums of one plane of S values, u and dz as recover gives them: sum_dz = Σ dz,
// sum_dz_u = Σ dz·u and, for PReLU, sum_prelu = Σ dy·min(z, 0) (its slope's gradient); in
// blocks of kBlock float partial sums, added up in double.
template <int A, bool Y>
NL_INLINE void plane_sums(const float* g, const float* v, int64_t S, float k, float m, float c, float q,
                          double& sum_dz, double& sum_dz_u, double& sum_prelu) {
  const Sums t = block_sums<A == PRELU>(0, S, [&](int64_t s) __attribute__((always_inline)) {
    float u, dz, z;
    recover<A, Y>(v[s], g[s], k, m, c, q, u, dz, z);
    return Terms{dz, dz * u, g[s] * prelu_slope_input(z)};
  });
  sum_dz = t.first;
  sum_dz_u = t.second;
  sum_prelu = t.third;
}

// The same sums per channel of rows of C values (channels innermost), over the rows
// begin ≤ s < end of g and v for which valid(s) (the masked kernels skip padded rows): added
// into sum_dz, sum_dz_u, sum_prelu (C doubles each), summed in float over 64 rows at a time in
// fA, fB, fD (C floats each). Channel j's shift, scale and bias are k[j], m[j], c[j]; its
// activation parameter slope[j] for PReLU, q otherwise.
template <int A, bool Y, typename Valid>
NL_INLINE void column_sums(const float* g, const float* v, int64_t C, int64_t begin, int64_t end, Valid&& valid,
                           const float* k, const float* m, const float* c, float q, const float* slope, float* fA,
                           float* fB, float* fD, double* sum_dz, double* sum_dz_u, double* sum_prelu) {
  for (int64_t s0 = begin; s0 < end; s0 += 64) {
    const int64_t s1 = std::min(end, s0 + 64);
    std::fill(fA, fA + C, 0.f);
    std::fill(fB, fB + C, 0.f);
    std::fill(fD, fD + C, 0.f);
    for (int64_t s = s0; s < s1; ++s) {
      if (!valid(s)) continue;
      const float* gs = g + s * C;
      const float* vs = v + s * C;
#pragma omp simd
      for (int64_t j = 0; j < C; ++j) {
        const float qj = (A == PRELU) ? slope[j] : q;
        float u, dz, z;
        recover<A, Y>(vs[j], gs[j], k[j], m[j], c[j], qj, u, dz, z);
        fA[j] += dz;
        fB[j] += dz * u;
        if constexpr (A == PRELU) fD[j] += gs[j] * prelu_slope_input(z);
      }
    }
    for (int64_t j = 0; j < C; ++j) {
      sum_dz[j] += fA[j];
      sum_dz_u[j] += fB[j];
      sum_prelu[j] += fD[j];
    }
  }
}

// dx = w_dz·dz + w_u·u + w_c over one plane of S values, u and dz as recover gives them.
template <int A, bool Y>
NL_INLINE void plane_dx(const float* g, const float* v, int64_t S, float k, float m, float c, float q, float w_dz,
                        float w_u, float w_c, float* dst, bool stream) {
  emit(dst, S, stream, [&](int64_t s) __attribute__((always_inline)) {
    float u, dz, z;
    recover<A, Y>(v[s], g[s], k, m, c, q, u, dz, z);
    return w_dz * dz + u_term(w_u, u) + w_c;
  });
}

// x̂ = alpha·u + delta for u as recover gives it: from the output (u = z), x̂ = (z − β)/γ with
// |γ| kept away from 0 (the guard of the in-place mode); from the input (u = x − shift),
// x̂ = (u − offset)·rstd.
struct XhatAffine {
  double alpha, delta;
};
inline XhatAffine xhat_affine(bool from_output, double gamma, double beta, double offset, double rstd) {
  if (from_output) {
    const double safe = std::abs(gamma) < 1e-5 ? std::copysign(1e-5, gamma) : gamma;
    return {1.0 / safe, -beta / safe};
  }
  return {rstd, -offset * rstd};
}

}  // namespace normlab
