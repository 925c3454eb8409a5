// normlab's CPU kernels for float32 normalization, built on first use by
// torch.utils.cpp_extension. Every loop is written so that the compiler vectorizes it
// (`#pragma omp simd`, compiled with -O3 -march=native -fopenmp-simd) and threads come from
// ATen's intra-op pool (at::parallel_for), so torch.set_num_threads governs them.
//
// Two layout families cover every norm:
//   planes  (P, S): contiguous runs of S values — NCHW BatchNorm/GroupNorm/InstanceNorm
//                   (one plane per (n, c)) and LayerNorm/RMSNorm (one plane per row);
//   columns (N, S, C): channels innermost — channels_last BatchNorm (N = 1, S = N·H·W),
//                   GroupNorm and InstanceNorm (per-sample statistics).
// Moments are one pass over shifted data: the shift is a value of the group itself, so
// x − shift is exact for data with a large mean, and sums of (x − shift) and (x − shift)²
// are accumulated in float blocks flushed to double. Python turns the sums into statistics.
//
// Activations are fused: forward writes act(z) for z = (x − shift)·scale + bias without
// materializing z; backward recomputes z from x ("X" source), or, in the memory-saving mode,
// recovers z = act⁻¹(y) from the saved output ("Y" source, In-Place Activated BatchNorm).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/sum.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <unistd.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif
#include <vector>

// Inlining is what lets the per-element helpers and lambdas vectorize; with many template
// instantiations GCC's inliner gives up on some by default (then every element is a call).
#define NL_INLINE inline __attribute__((always_inline))

namespace {

// The codes of normlab.core.activation.ACTIVATIONS; exported as `activation_codes`.
enum Act : int { IDENTITY = 0, RELU = 1, LEAKY = 2, ELU = 3, SILU = 4, PRELU = 5 };

constexpr int64_t kBlock = 512;      // floats summed in float before flushing to double
constexpr int64_t kGrainElems = 1 << 15;

// exp(x) to ~2 ulp with plain arithmetic, so loops calling it still vectorize (std::floor
// and a memcpy bit-cast both stop GCC's vectorizer). Cody–Waite reduction x = n·ln2 + r,
// |r| ≤ ln2/2, with n rounded to nearest by the 1.5·2^23 trick (exact under the default
// round-to-nearest mode, and not folded away without -ffast-math), then a degree-6
// polynomial and 2^n built from its exponent bits.
// 1/√(var + ε). A variance that overflowed (finite values whose squares exceed the float range,
// e.g. 1e19·randn) gives NaN — as the docs promise — never 1/√∞ = 0, which would silently
// return β for every output.
static inline double inv_std(double var, double eps) {
  return std::isinf(var) ? std::numeric_limits<double>::quiet_NaN() : 1.0 / std::sqrt(var + eps);
}

static NL_INLINE float fast_exp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}

// log(x) for normal x > 0 (Cephes' logf): x = m·2^e with m in [√½, √2), then a polynomial.
static NL_INLINE float fast_log(float x) {
  const int32_t bits = __builtin_bit_cast(int32_t, x);
  float e = static_cast<float>(((bits >> 23) & 0xff) - 127);
  float m = __builtin_bit_cast(float, (bits & 0x007fffff) | 0x3f800000);  // [1, 2)
  const bool big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  e = big ? e + 1.0f : e;
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
static NL_INLINE float fast_log1p(float u) {
  const float w = 1.0f + u;
  const float d = w - 1.0f;
  return d == 0.0f ? u : fast_log(w) * (u / d);
}

// act(z); param is LeakyReLU's slope, ELU's alpha, or PReLU's per-channel slope. Templates
// with `if constexpr`, so each instantiated loop has no branch on the activation kind.
template <int A>
static NL_INLINE float act_forward(float z, float param) {
  if constexpr (A == RELU) return z > 0.f ? z : 0.f;
  else if constexpr (A == LEAKY || A == PRELU) return z > 0.f ? z : z * param;
  else if constexpr (A == ELU) return z > 0.f ? z : param * (fast_exp(z) - 1.f);
  else if constexpr (A == SILU) return z / (1.f + fast_exp(-z));
  else return z;
}

// d act / dz at z.
template <int A>
static NL_INLINE float act_grad_z(float z, float param) {
  if constexpr (A == RELU) return z > 0.f ? 1.f : 0.f;
  else if constexpr (A == LEAKY || A == PRELU) return z > 0.f ? 1.f : param;
  else if constexpr (A == ELU) return z > 0.f ? 1.f : param * fast_exp(z);
  else if constexpr (A == SILU) {
    const float s = 1.f / (1.f + fast_exp(-z));
    return s * (1.f + z * (1.f - s));
  } else return 1.f;
}

// For invertible activations (identity, LeakyReLU/PReLU with slope > 0, ELU): z from y, and
// d act / dz from y — what In-Place ABN needs to drop the input.
template <int A>
static NL_INLINE float act_inverse(float y, float param) {
  if constexpr (A == LEAKY || A == PRELU) return y > 0.f ? y : y / param;
  else if constexpr (A == ELU) return y > 0.f ? y : fast_log1p(y / param);
  else return y;
}

template <int A>
static NL_INLINE float act_grad_y(float y, float param) {
  if constexpr (A == LEAKY || A == PRELU) return y > 0.f ? 1.f : param;
  else if constexpr (A == ELU) return y > 0.f ? 1.f : y + param;
  else return 1.f;
}

template <typename F>
void dispatch_act(int64_t act, F&& f) {
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
static NL_INLINE void recover(float v, float g, float k, float m, float c, float q, float& u, float& dz, float& z) {
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

// Outputs larger than the last-level cache are written with non-temporal (streaming) stores:
// a normal store first reads the destination line (read-for-ownership), so a kernel that
// reads x and writes y would move 3 bytes per byte of y instead of 2. glibc's memcpy does
// the same above 3/4 of the shared cache; below that, y is better left in cache for the
// next layer.
int64_t last_level_cache_bytes() {
  // sysfs is what lscpu reads; sysconf can report the host's cache inside a VM.
  if (FILE* f = std::fopen("/sys/devices/system/cpu/cpu0/cache/index3/size", "r")) {
    long value = 0;
    char unit = 0;
    const int got = std::fscanf(f, "%ld%c", &value, &unit);
    std::fclose(f);
    if (got >= 1 && value > 0) return value * (unit == 'K' ? 1024L : unit == 'M' ? (1L << 20) : 1L);
  }
  const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
  return l3 > 0 ? l3 : (32L << 20);
}

int64_t stream_threshold_bytes() {
  static const int64_t bytes = [] {
    if (const char* env = std::getenv("NORMLAB_STREAM_BYTES")) return static_cast<int64_t>(std::atoll(env));
    return last_level_cache_bytes() * 3 / 4;
  }();
  return bytes;
}

bool should_stream(const at::Tensor& out) {
#if defined(__AVX__)
  return out.numel() * static_cast<int64_t>(sizeof(float)) >= stream_threshold_bytes();
#else
  (void)out;
  return false;
#endif
}

static inline void stream_out(float* dst, const float* buf, int64_t n) {
#if defined(__AVX__)
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 31u); ++i) dst[i] = buf[i];
  for (; i + 8 <= n; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(buf + i));
  for (; i < n; ++i) dst[i] = buf[i];
#else
  std::memcpy(dst, buf, static_cast<size_t>(n) * sizeof(float));
#endif
}

static inline void stream_fence(bool stream) {
#if defined(__AVX__)
  if (stream) _mm_sfence();
#else
  (void)stream;
#endif
}

// dst[i] = value(i) for i < n, through an L1 buffer and streaming stores when `stream`.
template <typename F>
static NL_INLINE void emit(float* dst, int64_t n, bool stream, F&& value) {
  if (!stream) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = value(i);
    return;
  }
  alignas(64) float buf[kBlock];
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const int64_t m = std::min<int64_t>(kBlock, n - i0);
#pragma omp simd
    for (int64_t i = 0; i < m; ++i) buf[i] = value(i0 + i);
    stream_out(dst + i0, buf, m);
  }
}

int64_t grain_for(int64_t inner) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, inner)); }

const float* opt_ptr(const at::Tensor& t) { return t.defined() && t.numel() ? t.data_ptr<float>() : nullptr; }

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
      const float* row = xp + p * S;
      const float k = kp[p];
      double t1 = 0, t2 = 0;
      for (int64_t s0 = 0; s0 < S; s0 += kBlock) {
        const int64_t s1e = std::min(S, s0 + kBlock);
        float a1 = 0.f, a2 = 0.f;
#pragma omp simd reduction(+ : a1, a2)
        for (int64_t s = s0; s < s1e; ++s) {
          const float d = row[s] - k;
          a1 += d;
          a2 += d * d;
        }
        t1 += a1;
        t2 += a2;
      }
      o1[p] = t1;
      o2[p] = t2;
    }
  });
  return {s1, s2};
}

// y = act((x − shift_p)·scale_p + bias_p); slope (per plane) only for PReLU. With `out`
// given (possibly x itself: the in-place mode), y is written there.
at::Tensor plane_apply(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale,
                       const at::Tensor& bias, int64_t act, double param, const at::Tensor& slope,
                       const at::Tensor& out) {
  const int64_t P = x.size(0), S = x.size(1);
  at::Tensor y = out.defined() && out.numel() ? out : at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float *kp = shift.data_ptr<float>(), *ap = scale.data_ptr<float>(), *bp = bias.data_ptr<float>();
  const float* sp = opt_ptr(slope);
  const bool stream = should_stream(y);
  dispatch_act(act, [&](auto tag) {
    constexpr int A = decltype(tag)::value;
    at::parallel_for(0, P, grain_for(S), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const float k = kp[p], m = ap[p], c = bp[p];
        const float q = (A == PRELU) ? sp[p] : static_cast<float>(param);
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
                                              const at::Tensor& shift, const at::Tensor& scale,
                                              const at::Tensor& bias, int64_t act, double param,
                                              const at::Tensor& slope) {
  const int64_t P = src.size(0), S = src.size(1);
  auto opts = src.options().dtype(at::kDouble);
  auto A_ = at::empty({P}, opts), B_ = at::empty({P}, opts), D_ = at::zeros({P}, opts);
  const float *gp = dy.data_ptr<float>(), *xp = src.data_ptr<float>();
  const float *kp = shift.data_ptr<float>(), *ap = scale.data_ptr<float>(), *bp = bias.data_ptr<float>();
  const float* sp = opt_ptr(slope);
  double *oA = A_.data_ptr<double>(), *oB = B_.data_ptr<double>(), *oD = D_.data_ptr<double>();
  auto body = [&](auto tag, auto ytag) {
    constexpr int A = decltype(tag)::value;
    constexpr bool Y = decltype(ytag)::value;
    at::parallel_for(0, P, grain_for(S), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const float k = kp[p], m = ap[p], c = bp[p];
        const float q = (A == PRELU) ? sp[p] : static_cast<float>(param);
        const float* g = gp + p * S;
        const float* v = xp + p * S;
        double tA = 0, tB = 0, tD = 0;
        for (int64_t s0 = 0; s0 < S; s0 += kBlock) {
          const int64_t s1e = std::min(S, s0 + kBlock);
          float a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+ : a1, a2, a3)
          for (int64_t s = s0; s < s1e; ++s) {
            float u, dz, z;
            recover<A, Y>(v[s], g[s], k, m, c, q, u, dz, z);
            a1 += dz;
            a2 += dz * u;
            if constexpr (A == PRELU) a3 += g[s] * (z < 0.f ? z : 0.f);
          }
          tA += a1;
          tB += a2;
          tD += a3;
        }
        oA[p] = tA;
        oB[p] = tB;
        oD[p] = tD;
      }
    });
  };
  dispatch_act(act, [&](auto tag) {
    if (from_output) body(tag, std::true_type{});
    else body(tag, std::false_type{});
  });
  return {A_, B_, D_};
}

// dx = coef_dz·dz + coef_u·u + coef_c, with u and dz as in plane_backward_reduce.
at::Tensor plane_backward_apply(const at::Tensor& dy, const at::Tensor& src, int64_t from_output,
                                const at::Tensor& shift, const at::Tensor& scale, const at::Tensor& bias,
                                int64_t act, double param, const at::Tensor& slope, const at::Tensor& coef_dz,
                                const at::Tensor& coef_u, const at::Tensor& coef_c) {
  const int64_t P = src.size(0), S = src.size(1);
  auto dx = at::empty_like(src);
  const float *gp = dy.data_ptr<float>(), *xp = src.data_ptr<float>();
  const float *kp = shift.data_ptr<float>(), *ap = scale.data_ptr<float>(), *bp = bias.data_ptr<float>();
  const float *cz = coef_dz.data_ptr<float>(), *cu = coef_u.data_ptr<float>(), *cc = coef_c.data_ptr<float>();
  const float* sp = opt_ptr(slope);
  float* op = dx.data_ptr<float>();
  const bool stream = should_stream(dx);
  auto body = [&](auto tag, auto ytag) {
    constexpr int A = decltype(tag)::value;
    constexpr bool Y = decltype(ytag)::value;
    at::parallel_for(0, P, grain_for(S), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const float k = kp[p], m = ap[p], c = bp[p];
        const float q = (A == PRELU) ? sp[p] : static_cast<float>(param);
        const float w1 = cz[p], w2 = cu[p], w3 = cc[p];
        const float* g = gp + p * S;
        const float* v = xp + p * S;
        emit(op + p * S, S, stream, [&](int64_t s) __attribute__((always_inline)) {
          float u, dz, z;
          recover<A, Y>(v[s], g[s], k, m, c, q, u, dz, z);
          return w1 * dz + w2 * u + w3;
        });
      }
      stream_fence(stream);
    });
  };
  dispatch_act(act, [&](auto tag) {
    if (from_output) body(tag, std::true_type{});
    else body(tag, std::false_type{});
  });
  return dx;
}

// ---------------------------------------------------------------------------------------
// columns (N, S, C): channels innermost. Work is split over (n, chunk of S); each task sums
// into its own row of a (N, chunks, C) buffer, which Python adds up.

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
      const float* k = kp + n * C;
      double* d1 = o1 + t * C;
      double* d2 = o2 + t * C;
      for (int64_t s0 = sb; s0 < se; s0 += 64) {
        const int64_t s1e = std::min(se, s0 + 64);
        std::fill(f1.begin(), f1.end(), 0.f);
        std::fill(f2.begin(), f2.end(), 0.f);
        float *a1 = f1.data(), *a2 = f2.data();
        int64_t s = s0;
        // Four rows per sweep: the partial sums are loaded and stored once per four rows
        // instead of every row, which made this loop store-bound.
        for (; s + 4 <= s1e; s += 4) {
          const float* r0 = xp + (n * S + s) * C;
          const float *r1 = r0 + C, *r2 = r1 + C, *r3 = r2 + C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const float d0 = r0[c] - k[c], d1 = r1[c] - k[c], d2 = r2[c] - k[c], d3 = r3[c] - k[c];
            a1[c] += (d0 + d1) + (d2 + d3);
            a2[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
          }
        }
        for (; s < s1e; ++s) {
          const float* row = xp + (n * S + s) * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const float d = row[c] - k[c];
            a1[c] += d;
            a2[c] += d * d;
          }
        }
        for (int64_t c = 0; c < C; ++c) {
          d1[c] += f1[c];
          d2[c] += f2[c];
        }
      }
    }
  });
  return {s1, s2};
}

at::Tensor column_apply(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale, const at::Tensor& bias,
                        int64_t act, double param, const at::Tensor& slope, const at::Tensor& out) {
  const int64_t N = x.size(0), S = x.size(1), C = x.size(2);
  at::Tensor y = out.defined() && out.numel() ? out : at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float *kp = shift.data_ptr<float>(), *ap = scale.data_ptr<float>(), *bp = bias.data_ptr<float>();
  const float* sp = opt_ptr(slope);
  const float q0 = static_cast<float>(param);
  const bool stream = should_stream(y);
  dispatch_act(act, [&](auto tag) {
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
                                               const at::Tensor& shift, const at::Tensor& scale,
                                               const at::Tensor& bias, int64_t act, double param,
                                               const at::Tensor& slope) {
  const int64_t N = src.size(0), S = src.size(1), C = src.size(2);
  const auto split = column_split(N, S, C);
  auto opts = src.options().dtype(at::kDouble);
  auto A_ = at::zeros({N, split.chunks, C}, opts), B_ = at::zeros({N, split.chunks, C}, opts);
  auto D_ = at::zeros({N, split.chunks, C}, opts);
  const float *gp = dy.data_ptr<float>(), *xp = src.data_ptr<float>();
  const float *kp = shift.data_ptr<float>(), *ap = scale.data_ptr<float>(), *bp = bias.data_ptr<float>();
  const float* sp = opt_ptr(slope);
  double *oA = A_.data_ptr<double>(), *oB = B_.data_ptr<double>(), *oD = D_.data_ptr<double>();
  const float q0 = static_cast<float>(param);
  auto body = [&](auto tag, auto ytag) {
    constexpr int A = decltype(tag)::value;
    constexpr bool Y = decltype(ytag)::value;
    at::parallel_for(0, N * split.chunks, 1, [&](int64_t tb, int64_t te) {
      std::vector<float> fA(C), fB(C), fD(C);
      for (int64_t t = tb; t < te; ++t) {
        const int64_t n = t / split.chunks, ch = t % split.chunks;
        const int64_t sb = S * ch / split.chunks, se = S * (ch + 1) / split.chunks;
        const float *k = kp + n * C, *m = ap + n * C, *c = bp + n * C;
        double *dA = oA + t * C, *dB = oB + t * C, *dD = oD + t * C;
        for (int64_t s0 = sb; s0 < se; s0 += 64) {
          const int64_t s1e = std::min(se, s0 + 64);
          std::fill(fA.begin(), fA.end(), 0.f);
          std::fill(fB.begin(), fB.end(), 0.f);
          std::fill(fD.begin(), fD.end(), 0.f);
          for (int64_t s = s0; s < s1e; ++s) {
            const float* g = gp + (n * S + s) * C;
            const float* v = xp + (n * S + s) * C;
#pragma omp simd
            for (int64_t j = 0; j < C; ++j) {
              const float q = (A == PRELU) ? sp[j] : q0;
              float u, dz, z;
              recover<A, Y>(v[j], g[j], k[j], m[j], c[j], q, u, dz, z);
              fA[j] += dz;
              fB[j] += dz * u;
              if constexpr (A == PRELU) fD[j] += g[j] * (z < 0.f ? z : 0.f);
            }
          }
          for (int64_t j = 0; j < C; ++j) {
            dA[j] += fA[j];
            dB[j] += fB[j];
            dD[j] += fD[j];
          }
        }
      }
    });
  };
  dispatch_act(act, [&](auto tag) {
    if (from_output) body(tag, std::true_type{});
    else body(tag, std::false_type{});
  });
  return {A_, B_, D_};
}

at::Tensor column_backward_apply(const at::Tensor& dy, const at::Tensor& src, int64_t from_output,
                                 const at::Tensor& shift, const at::Tensor& scale, const at::Tensor& bias, int64_t act,
                                 double param, const at::Tensor& slope, const at::Tensor& coef_dz,
                                 const at::Tensor& coef_u, const at::Tensor& coef_c) {
  const int64_t N = src.size(0), S = src.size(1), C = src.size(2);
  auto dx = at::empty_like(src);
  const float *gp = dy.data_ptr<float>(), *xp = src.data_ptr<float>();
  const float *kp = shift.data_ptr<float>(), *ap = scale.data_ptr<float>(), *bp = bias.data_ptr<float>();
  const float *cz = coef_dz.data_ptr<float>(), *cu = coef_u.data_ptr<float>(), *cc = coef_c.data_ptr<float>();
  const float* sp = opt_ptr(slope);
  float* op = dx.data_ptr<float>();
  const float q0 = static_cast<float>(param);
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
          return w1[j] * dz + w2[j] * u + w3[j];
        });
      }
      stream_fence(stream);
    });
  };
  dispatch_act(act, [&](auto tag) {
    if (from_output) body(tag, std::true_type{});
    else body(tag, std::false_type{});
  });
  return dx;
}



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
};

// A shift for the moments of one group: the mean of up to 16 of its values, spread evenly.
// Close to the group's mean, so Σd²/n − (Σd/n)² cancels little: a single value can sit 3σ
// from the mean, which multiplies the variance's rounding error by ~10 on small groups.
// For data with a large mean it is within a factor 2 of every value, so x − shift stays
// exact (Sterbenz) — what keeps normlab accurate where a plain Σx, Σx² is not.
// The positions are j·n/16, taken with a shift: sixteen 64-bit divisions were a quarter of
// the time of a cache-resident LayerNorm row of 768 values.
static NL_INLINE float sample_shift(const float* p, int64_t n, int64_t stride) {
  double acc = 0;
  if (n >= 16) {
    for (int64_t j = 0; j < 16; ++j) acc += p[((j * n) >> 4) * stride];
    return static_cast<float>(acc / 16);
  }
  for (int64_t j = 0; j < n; ++j) acc += p[j * stride];
  return static_cast<float>(acc / static_cast<double>(n));
}

// Asks for the next row's values while this one is processed. A row starts with
// sample_shift's scattered reads and only then walks its memory in order, so the hardware
// prefetcher starts late on every row: for LayerNorm rows of 768 values that stall made the
// forward 1.8× a copy instead of 1.1×. At most 16 KiB ahead, what L1 holds beside the
// current row.
static NL_INLINE void prefetch_floats(const float* p, int64_t n) {
  const int64_t m = std::min<int64_t>(n, 4096);
  for (int64_t i = 0; i < m; i += 16) __builtin_prefetch(p + i);
}

template <int A>
void fused_plane_forward(const float* xp, float* yp, const PlaneGroups& pg, const std::vector<double>& gamma,
                         const std::vector<double>& beta, double eps, float param, const float* slope, bool stream,
                         std::vector<double>& shift, std::vector<double>& offset, std::vector<double>& rstd,
                         std::vector<double>& mean, std::vector<double>& var) {
  const int64_t S = pg.S, C = pg.C, np = pg.size();
  at::parallel_for(0, pg.groups(), 1, [&](int64_t kb, int64_t ke) {
    for (int64_t k = kb; k < ke; ++k) {
      const float K = sample_shift(xp + pg.plane(k, 0) * S, S, 1);
      double t1 = 0, t2 = 0;
      for (int64_t j = 0; j < np; ++j) {
        const float* row = xp + pg.plane(k, j) * S;
        // The same stretch of the next group, one group ahead: its sampled shift and first
        // lines would otherwise start each group with a wait on memory (the hardware
        // prefetcher does not carry across groups). GroupNorm(32) at 32x64x56x56: 1.5x a copy
        // before, 1.3x after, one thread.
        const float* ahead = k + 1 < ke ? xp + pg.plane(k + 1, j) * S : nullptr;
        for (int64_t s0 = 0; s0 < S; s0 += kBlock) {
          const int64_t s1e = std::min(S, s0 + kBlock);
          if (ahead)
            for (int64_t s = s0; s < s1e; s += 16) __builtin_prefetch(ahead + s);
          float a1 = 0.f, a2 = 0.f;
#pragma omp simd reduction(+ : a1, a2)
          for (int64_t s = s0; s < s1e; ++s) {
            const float d = row[s] - K;
            a1 += d;
            a2 += d * d;
          }
          t1 += a1;
          t2 += a2;
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
        const int64_t p = pg.plane(k, j), c = p % C;
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

// Returns per-plane (A, B, D) for the parameter gradients; writes dx. given: fixed statistics.
template <int A, bool Y>
void fused_plane_backward(const float* gp, const float* vp, float* dp, const PlaneGroups& pg, bool given,
                          const std::vector<double>& gamma, const std::vector<double>& beta,
                          const std::vector<double>& shift, const std::vector<double>& offset,
                          const std::vector<double>& rstd, float param, const float* slope, bool stream,
                          std::vector<double>& Ap, std::vector<double>& Bp, std::vector<double>& Dp) {
  const int64_t S = pg.S, C = pg.C, np = pg.size();
  at::parallel_for(0, pg.groups(), 1, [&](int64_t kb, int64_t ke) {
    std::vector<float> scale(np), bias(np), alpha(np), delta(np);
    for (int64_t k = kb; k < ke; ++k) {
      const float K = static_cast<float>(shift[k]);
      double m1 = 0, m2 = 0;
      for (int64_t j = 0; j < np; ++j) {
        const int64_t p = pg.plane(k, j), c = p % C;
        const double sc = rstd[k] * gamma[c];
        scale[j] = static_cast<float>(sc);
        bias[j] = static_cast<float>(beta[c] - offset[k] * sc);
        double al, de;
        if (Y) {
          const double safe = std::abs(gamma[c]) < 1e-5 ? std::copysign(1e-5, gamma[c]) : gamma[c];
          al = 1.0 / safe;
          de = -beta[c] / safe;
        } else {
          al = rstd[k];
          de = -offset[k] * rstd[k];
        }
        alpha[j] = static_cast<float>(al);
        delta[j] = static_cast<float>(de);
        const float m = scale[j], b = bias[j];
        const float q = (A == PRELU) ? slope[c] : param;
        const float* g = gp + p * S;
        const float* v = vp + p * S;
        double tA = 0, tB = 0, tD = 0;
        for (int64_t s0 = 0; s0 < S; s0 += kBlock) {
          const int64_t s1e = std::min(S, s0 + kBlock);
          float a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+ : a1, a2, a3)
          for (int64_t s = s0; s < s1e; ++s) {
            float u, dz, z;
            recover<A, Y>(v[s], g[s], K, m, b, q, u, dz, z);
            a1 += dz;
            a2 += dz * u;
            if constexpr (A == PRELU) a3 += g[s] * (z < 0.f ? z : 0.f);
          }
          tA += a1;
          tB += a2;
          tD += a3;
        }
        Ap[p] = tA;
        Bp[p] = tB;
        Dp[p] = tD;
        m1 += gamma[c] * tA;
        m2 += gamma[c] * (al * tB + de * tA);
      }
      const double n = static_cast<double>(np * S);
      m1 /= n;
      m2 /= n;
      for (int64_t j = 0; j < np; ++j) {
        const int64_t p = pg.plane(k, j), c = p % C;
        const float m = scale[j], b = bias[j];
        const float q = (A == PRELU) ? slope[c] : param;
        const float wz = scale[j];
        const float wu = given ? 0.f : static_cast<float>(-rstd[k] * m2 * alpha[j]);
        const float wc = given ? 0.f : static_cast<float>(-rstd[k] * (m1 + m2 * delta[j]));
        const float* g = gp + p * S;
        const float* v = vp + p * S;
        emit(dp + p * S, S, stream, [&](int64_t s) __attribute__((always_inline)) {
          float u, dz, z;
          recover<A, Y>(v[s], g[s], K, m, b, q, u, dz, z);
          return wz * dz + wu * u + wc;
        });
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

static std::vector<double> as_double(const at::Tensor& t, int64_t n, double fill) {
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

static at::Tensor float_tensor(const std::vector<double>& v, std::vector<int64_t> shape, const at::Tensor& like) {
  auto t = at::empty(shape, like.options().dtype(at::kFloat));
  float* p = t.data_ptr<float>();
  for (size_t i = 0; i < v.size(); ++i) p[i] = static_cast<float>(v[i]);
  return t;
}

static at::Tensor double_tensor(const std::vector<double>& v, const at::Tensor& like) {
  auto t = at::empty({static_cast<int64_t>(v.size())}, like.options().dtype(at::kDouble));
  std::memcpy(t.data_ptr<double>(), v.data(), v.size() * sizeof(double));
  return t;
}

// Unit-grid (U×C) sums from a kernel's output: planes give (P,), columns (U, chunks, C).
static std::vector<double> unit_sums(const at::Tensor& t, const Grouping& g) {
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
static void column_sample_shifts(const float* xp, int64_t U, int64_t Sv, int64_t C, int64_t G,
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

// Forward: y = act((x − shift)·scale + bias) per unit, into `out`. Returns the group
// statistics {shift, offset, rstd, mean, var} in double (mean, var empty when given).
std::vector<at::Tensor> channel_forward(const at::Tensor& xv, bool planes, int64_t N, int64_t C, int64_t S,
                                        int64_t G, const at::Tensor& weight, const at::Tensor& bias,
                                        const at::Tensor& running_mean, const at::Tensor& running_var, double eps,
                                        int64_t act, double param, const at::Tensor& slope, const at::Tensor& out) {
  const bool given = running_mean.defined() && running_mean.numel();
  Grouping g{planes, N, C, S, G, G < 0 || given};
  const int64_t U = g.U(), UC = U * C, NG = g.groups();
  const auto gamma = as_double(weight, C, 1.0), beta = as_double(bias, C, 0.0);
  std::vector<double> shift(NG), offset(NG, 0.0), rstd(NG), mean, var;
  if (given) {
    const auto rm = as_double(running_mean, C, 0.0), rv = as_double(running_var, C, 1.0);
    for (int64_t c = 0; c < C; ++c) {
      shift[c] = rm[c];
      rstd[c] = 1.0 / std::sqrt(rv[c] + eps);
    }
  } else if (planes && (G < 0 ? N : C / G) * S * 4 <= kFuseBytes) {
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
  std::vector<double> us(UC), usc(UC), ub(UC);
  for (int64_t u = 0; u < U; ++u)
    for (int64_t c = 0; c < C; ++c) {
      const int64_t k = g.group_of(u, c), i = u * C + c;
      us[i] = shift[k];
      usc[i] = rstd[k] * gamma[c];
      ub[i] = beta[c] - offset[k] * usc[i];
    }
  std::vector<int64_t> shape = planes ? std::vector<int64_t>{UC} : std::vector<int64_t>{U, C};
  at::Tensor unit_slope = slope;
  if (act == PRELU && planes) unit_slope = slope.repeat({U});
  if (planes)
    plane_apply(xv, float_tensor(us, shape, xv), float_tensor(usc, shape, xv), float_tensor(ub, shape, xv), act,
                param, unit_slope, out);
  else
    column_apply(xv, float_tensor(us, shape, xv), float_tensor(usc, shape, xv), float_tensor(ub, shape, xv), act,
                 param, unit_slope, out);
  at::Tensor empty;
  return {double_tensor(shift, xv), double_tensor(offset, xv), double_tensor(rstd, xv),
          given ? empty : double_tensor(mean, xv), given ? empty : double_tensor(var, xv)};
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
    dispatch_act(act, [&](auto tag) {
      if (from_output) run(tag, std::true_type{});
      else run(tag, std::false_type{});
    });
    std::vector<double> dgamma(C, 0.0), dbeta(C, 0.0), dslope(C, 0.0);
    for (int64_t p = 0; p < P; ++p) {
      const int64_t c = p % C, k = given ? c : g.group_of(p / C, c);
      double al, de;
      if (from_output) {
        const double safe = std::abs(gamma[c]) < 1e-5 ? std::copysign(1e-5, gamma[c]) : gamma[c];
        al = 1.0 / safe;
        de = -beta[c] / safe;
      } else {
        al = rstd[k];
        de = -offset[k] * rstd[k];
      }
      dbeta[c] += Ap[p];
      dgamma[c] += al * Bp[p] + de * Ap[p];
      dslope[c] += Dp[p];
    }
    return {dx, double_tensor(dgamma, srcv), double_tensor(dbeta, srcv), double_tensor(dslope, srcv)};
  }
  std::vector<double> us(UC), usc(UC), ub(UC), alpha(UC), delta(UC);
  for (int64_t u = 0; u < U; ++u)
    for (int64_t c = 0; c < C; ++c) {
      const int64_t k = g.group_of(u, c), i = u * C + c;
      us[i] = shift[k];
      usc[i] = rstd[k] * gamma[c];
      ub[i] = beta[c] - offset[k] * usc[i];
      if (from_output) {  // x̂ = (z − β)/γ, |γ| kept away from 0
        const double safe = std::abs(gamma[c]) < 1e-5 ? std::copysign(1e-5, gamma[c]) : gamma[c];
        alpha[i] = 1.0 / safe;
        delta[i] = -beta[c] / safe;
      } else {  // x̂ = (x − shift − offset)·rstd
        alpha[i] = rstd[k];
        delta[i] = -offset[k] * rstd[k];
      }
    }
  std::vector<int64_t> shape = planes ? std::vector<int64_t>{UC} : std::vector<int64_t>{U, C};
  auto t_shift = float_tensor(us, shape, srcv), t_scale = float_tensor(usc, shape, srcv),
       t_bias = float_tensor(ub, shape, srcv);
  at::Tensor unit_slope = slope;
  if (act == PRELU && planes) unit_slope = slope.repeat({U});
  auto sums = planes ? plane_backward_reduce(dyv, srcv, from_output, t_shift, t_scale, t_bias, act, param, unit_slope)
                     : column_backward_reduce(dyv, srcv, from_output, t_shift, t_scale, t_bias, act, param, unit_slope);
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
      cz[i] = usc[i];  // γ·rstd
      if (!given) {  // dx = γr·dz − r·m2/n·x̂ − r·m1/n, with x̂ = α·u + δ
        cu[i] = -rstd[k] * (m2[k] / n) * alpha[i];
        cc[i] = -rstd[k] * ((m1[k] / n) + (m2[k] / n) * delta[i]);
      }
    }
  auto apply = planes ? plane_backward_apply : column_backward_apply;
  auto dx = apply(dyv, srcv, from_output, t_shift, t_scale, t_bias, act, param, unit_slope,
                  float_tensor(cz, shape, srcv), float_tensor(cu, shape, srcv), float_tensor(cc, shape, srcv));
  return {dx, double_tensor(dgamma, srcv), double_tensor(dbeta, srcv), double_tensor(dslope, srcv)};
}

// Fold one batch's per-channel statistics into the running estimates, in place, when every
// one of them is finite: running = (1 − m)·running + m·batch, with the variance unbiased by
// count/(count − 1) if asked; m < 0 means the cumulative average, m = 1/(k + 1) with k read
// from and then incremented in num_batches_tracked. Returns whether the batch was folded.
bool running_update(const at::Tensor& running_mean, const at::Tensor& running_var, const at::Tensor& mean,
                    const at::Tensor& var, int64_t count, double momentum, const at::Tensor& num_batches_tracked,
                    bool unbiased) {
  const int64_t C = running_mean.numel();
  const double* bm = mean.data_ptr<double>();
  const double* bv = var.data_ptr<double>();
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

// LayerNorm (centered) / RMSNorm over the rows of x (R, K), fused per row: each row is
// summed and normalized while it sits in L1. Returns {shift, rstd, offr} per row (float32),
// with x̂ = (x − shift)·rstd − offr; y is written into `out`. The affine w, b is over K.
std::vector<at::Tensor> row_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, double eps,
                                    bool centered, const at::Tensor& out) {
  const int64_t R = x.size(0), K = x.size(1);
  auto shift = at::empty({R}, x.options()), rstd = at::empty({R}, x.options()), offr = at::empty({R}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = out.data_ptr<float>();
  float *kp = shift.data_ptr<float>(), *rp = rstd.data_ptr<float>(), *op = offr.data_ptr<float>();
  const float *wp = opt_ptr(w), *bp = opt_ptr(b);
  // Ordinary stores even past the cache: streaming stores made this kernel slower on the
  // machine it was tuned on (LayerNorm 8192x768: 1.35-1.61x a copy streamed, 1.11-1.19x not;
  // 24576x768: 1.22-1.28x against 1.09-1.16x; one thread; RMSNorm unchanged).
  const bool stream = false;
  at::parallel_for(0, R, grain_for(K), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = xp + r * K;
      if (centered && r + 1 < end) prefetch_floats(row + K, K);
      const float k = centered ? sample_shift(row, K, 1) : 0.f;
      double t1 = 0, t2 = 0;
      for (int64_t i0 = 0; i0 < K; i0 += kBlock) {
        const int64_t i1 = std::min(K, i0 + kBlock);
        float a1 = 0.f, a2 = 0.f;
#pragma omp simd reduction(+ : a1, a2)
        for (int64_t i = i0; i < i1; ++i) {
          const float d = row[i] - k;
          a1 += d;
          a2 += d * d;
        }
        t1 += a1;
        t2 += a2;
      }
      const double off = centered ? t1 / K : 0.0;
      const double rs = inv_std(std::max(t2 / K - off * off, 0.0), eps);
      const float s = static_cast<float>(rs), o = static_cast<float>(off * rs);
      kp[r] = k;
      rp[r] = s;
      op[r] = o;
      float* dst = yp + r * K;
      if (wp && bp) emit(dst, K, stream, [&](int64_t i) __attribute__((always_inline)) { return ((row[i] - k) * s - o) * wp[i] + bp[i]; });
      else if (wp) emit(dst, K, stream, [&](int64_t i) __attribute__((always_inline)) { return ((row[i] - k) * s - o) * wp[i]; });
      else if (bp) emit(dst, K, stream, [&](int64_t i) __attribute__((always_inline)) { return ((row[i] - k) * s - o) + bp[i]; });
      else emit(dst, K, stream, [&](int64_t i) __attribute__((always_inline)) { return (row[i] - k) * s - o; });
    }
    stream_fence(stream);
  });
  return {shift, rstd, offr};
}

// Backward of row_forward and add_row_forward, fused per row: {dx, dw (K, float64), db (K,
// float64)}. Per row, A = Σ w·dy and B = Σ w·dy·(x − shift) give dx at once (plus ds, the
// gradient reaching the residual sum from later on, when defined); dw and db are summed
// per thread in float and flushed to double every 256 rows.
std::vector<at::Tensor> row_backward_impl(const at::Tensor& dy, const at::Tensor& ds, const at::Tensor& src,
                                          const at::Tensor& w, const at::Tensor& shift, const at::Tensor& rstd,
                                          const at::Tensor& offr, bool centered, bool stream) {
  const int64_t R = src.size(0), K = src.size(1);
  // One chunk for a small input: no thread would take a second one, and then dw/db need no
  // cross-chunk sum — a tensor op that cost as much as the kernel on tiny inputs.
  const int64_t chunks =
      R * K < kGrainElems ? 1 : std::max<int64_t>(1, std::min<int64_t>(R, 4 * at::get_num_threads()));
  auto opts = src.options().dtype(at::kDouble);
  auto dW = chunks == 1 ? at::empty({K}, opts) : at::empty({chunks, K}, opts);
  auto dB = chunks == 1 ? at::empty({K}, opts) : at::empty({chunks, K}, opts);
  auto dx = at::empty_like(src);
  const float *gp = dy.data_ptr<float>(), *xp = src.data_ptr<float>(), *wp = opt_ptr(w), *hp = opt_ptr(ds);
  const float *kp = shift.data_ptr<float>(), *rp = rstd.data_ptr<float>(), *op = offr.data_ptr<float>();
  double *pW = dW.data_ptr<double>(), *pB = dB.data_ptr<double>();
  float* dp = dx.data_ptr<float>();
  // W: with a weight, a template parameter rather than a test in the loop.
  auto body = [&](auto wtag) {
    constexpr bool W = decltype(wtag)::value;
    at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
      std::vector<float> fW(K), fB(K);
      // Plain local pointers: through the captured `wp`, GCC reloaded the pointer in every
      // iteration and vectorized that as gathers.
      const float* wl = wp;
      float *fw = fW.data(), *fb = fB.data();
      for (int64_t ch = cb; ch < ce; ++ch) {
        const int64_t r0 = R * ch / chunks, r1 = R * (ch + 1) / chunks;
        std::fill(fW.begin(), fW.end(), 0.f);
        std::fill(fB.begin(), fB.end(), 0.f);
        std::fill(pW + ch * K, pW + (ch + 1) * K, 0.0);  // each chunk's row is its own
        std::fill(pB + ch * K, pB + (ch + 1) * K, 0.0);
        int64_t since_flush = 0;
        for (int64_t r = r0; r < r1; ++r) {
          const float k = kp[r], s = rp[r], o = op[r];
          const float* g = gp + r * K;
          const float* v = xp + r * K;
          double tA = 0, tB = 0;
          for (int64_t i0 = 0; i0 < K; i0 += kBlock) {
            const int64_t i1 = std::min(K, i0 + kBlock);
            float a1 = 0.f, a2 = 0.f;
#pragma omp simd reduction(+ : a1, a2)
            for (int64_t i = i0; i < i1; ++i) {
              const float u = v[i] - k;
              const float gw = W ? g[i] * wl[i] : g[i];
              a1 += gw;
              a2 += gw * u;
              fw[i] += g[i] * (u * s - o);
              fb[i] += g[i];
            }
            tA += a1;
            tB += a2;
          }
          const double m1 = centered ? tA / K : 0.0;
          const double m2 = (s * tB - o * tA) / K;
          const float cz = s, cu = static_cast<float>(-s * s * m2), cc = static_cast<float>(s * m2 * o - s * m1);
          float* d = dp + r * K;
          const float* h = hp ? hp + r * K : nullptr;
          if (W && h) emit(d, K, stream, [&](int64_t i) __attribute__((always_inline)) { return cz * wp[i] * g[i] + cu * (v[i] - k) + cc + h[i]; });
          else if (W) emit(d, K, stream, [&](int64_t i) __attribute__((always_inline)) { return cz * wp[i] * g[i] + cu * (v[i] - k) + cc; });
          else if (h) emit(d, K, stream, [&](int64_t i) __attribute__((always_inline)) { return cz * g[i] + cu * (v[i] - k) + cc + h[i]; });
          else emit(d, K, stream, [&](int64_t i) __attribute__((always_inline)) { return cz * g[i] + cu * (v[i] - k) + cc; });
          if (++since_flush == 256 || r + 1 == r1) {  // keep the float partial sums short
            double* accW = pW + ch * K;
            double* accB = pB + ch * K;
            for (int64_t i = 0; i < K; ++i) {
              accW[i] += fW[i];
              accB[i] += fB[i];
            }
            std::fill(fW.begin(), fW.end(), 0.f);
            std::fill(fB.begin(), fB.end(), 0.f);
            since_flush = 0;
          }
        }
      }
      stream_fence(stream);
    });
  };
  if (wp) body(std::true_type{});
  else body(std::false_type{});
  if (chunks == 1) return {dx, dW, dB};
  return {dx, dW.sum(0), dB.sum(0)};
}

// Backward of row_forward: row_backward_impl without a residual gradient. Ordinary stores, as
// in row_forward: 1.64-1.87x a copy streamed, 1.58-1.74x not.
std::vector<at::Tensor> row_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                                     const at::Tensor& shift, const at::Tensor& rstd, const at::Tensor& offr,
                                     bool centered) {
  return row_backward_impl(dy, at::Tensor(), x, w, shift, rstd, offr, centered, false);
}

// Residual add + LayerNorm/RMSNorm, the pre-norm transformer step: s = x + r, y = norm(s).
// One pass per row: x and r are read once, the row of s is built in an L1 buffer, its
// moments are taken there (shift from the buffer, as row_forward does from x), and s and y
// are written from it. Returns {shift, rstd, offr} per row, as row_forward; s and y go into
// `summed` and `out`.
std::vector<at::Tensor> add_row_forward(const at::Tensor& x, const at::Tensor& res, const at::Tensor& w,
                                        const at::Tensor& b, double eps, bool centered, const at::Tensor& summed,
                                        const at::Tensor& out) {
  const int64_t R = x.size(0), K = x.size(1);
  auto shift = at::empty({R}, x.options()), rstd = at::empty({R}, x.options()), offr = at::empty({R}, x.options());
  const float *xp = x.data_ptr<float>(), *rp_in = res.data_ptr<float>();
  float *sp = summed.data_ptr<float>(), *yp = out.data_ptr<float>();
  float *kp = shift.data_ptr<float>(), *rp = rstd.data_ptr<float>(), *op = offr.data_ptr<float>();
  const float *wp = opt_ptr(w), *bp = opt_ptr(b);
  // s and y together are what leaves the cache: stream them when they do not fit
#if defined(__AVX__)
  const bool stream = 2 * out.numel() * static_cast<int64_t>(sizeof(float)) >= stream_threshold_bytes();
#else
  const bool stream = false;
#endif
  at::parallel_for(0, R, grain_for(K), [&](int64_t begin, int64_t end) {
    std::vector<float> row_buf(K);
    float* row = row_buf.data();
    for (int64_t r = begin; r < end; ++r) {
      const float* xa = xp + r * K;
      const float* ra = rp_in + r * K;
#pragma omp simd
      for (int64_t i = 0; i < K; ++i) row[i] = xa[i] + ra[i];
      const float k = centered ? sample_shift(row, K, 1) : 0.f;
      double t1 = 0, t2 = 0;
      for (int64_t i0 = 0; i0 < K; i0 += kBlock) {
        const int64_t i1 = std::min(K, i0 + kBlock);
        float a1 = 0.f, a2 = 0.f;
#pragma omp simd reduction(+ : a1, a2)
        for (int64_t i = i0; i < i1; ++i) {
          const float d = row[i] - k;
          a1 += d;
          a2 += d * d;
        }
        t1 += a1;
        t2 += a2;
      }
      const double off = centered ? t1 / K : 0.0;
      const double rs = 1.0 / std::sqrt(std::max(t2 / K - off * off, 0.0) + eps);
      const float s = static_cast<float>(rs), o = static_cast<float>(off * rs);
      kp[r] = k;
      rp[r] = s;
      op[r] = o;
      emit(sp + r * K, K, stream, [&](int64_t i) __attribute__((always_inline)) { return row[i]; });
      float* dst = yp + r * K;
      if (wp && bp) emit(dst, K, stream, [&](int64_t i) __attribute__((always_inline)) { return ((row[i] - k) * s - o) * wp[i] + bp[i]; });
      else if (wp) emit(dst, K, stream, [&](int64_t i) __attribute__((always_inline)) { return ((row[i] - k) * s - o) * wp[i]; });
      else if (bp) emit(dst, K, stream, [&](int64_t i) __attribute__((always_inline)) { return ((row[i] - k) * s - o) + bp[i]; });
      else emit(dst, K, stream, [&](int64_t i) __attribute__((always_inline)) { return (row[i] - k) * s - o; });
    }
    stream_fence(stream);
  });
  return {shift, rstd, offr};
}

// Backward of add_row_forward, one pass per row: {dsum, dw (K, float64), db (K, float64)}
// where dsum = ds + (norm backward of dy) is the gradient of both x and the residual. `ds`
// (the gradient reaching s directly) may be empty: s fed nothing that was differentiated.
std::vector<at::Tensor> add_row_backward(const at::Tensor& dy, const at::Tensor& ds, const at::Tensor& src,
                                         const at::Tensor& w, const at::Tensor& shift, const at::Tensor& rstd,
                                         const at::Tensor& offr, bool centered) {
  return row_backward_impl(dy, ds, src, w, shift, rstd, offr, centered, should_stream(src));
}

}  // namespace

// What eager.cpp, the autograd layer for eager calls, calls through.
#include "kernels.h"
const normlab::Kernels normlab::kernels{&channel_forward, &channel_backward, &row_forward,
                                        &row_backward,    &running_update,   PRELU};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "normlab float32 CPU normalization kernels";
  m.def("channel_forward", &channel_forward);
  m.def("channel_backward", &channel_backward);
  m.def("row_forward", &row_forward);
  m.def("running_update", &running_update);
  m.def("row_backward", &row_backward);
  m.def("add_row_forward", &add_row_forward);
  m.def("add_row_backward", &add_row_backward);
  // enum Act by normlab's activation names: normlab.core.activation.ACTIVATIONS holds the
  // same codes, and the loader refuses a module whose table differs from it.
  pybind11::dict activation_codes;
  activation_codes["identity"] = static_cast<int>(IDENTITY);
  activation_codes["relu"] = static_cast<int>(RELU);
  activation_codes["leaky_relu"] = static_cast<int>(LEAKY);
  activation_codes["elu"] = static_cast<int>(ELU);
  activation_codes["silu"] = static_cast<int>(SILU);
  activation_codes["prelu"] = static_cast<int>(PRELU);
  m.attr("activation_codes") = activation_codes;
  normlab::bind_eager(m);
}
