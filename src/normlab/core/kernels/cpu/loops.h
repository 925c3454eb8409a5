// What every kernel loop shares: block sizes, the parallel grain, the shift that keeps
// moments exact on large-mean data, 1/sqrt(var + eps), prefetching, and the store helper that
// switches to streaming (non-temporal) stores for outputs larger than the cache.
//
// Loops are written so that the compiler vectorizes them (`#pragma omp simd`; build.py
// compiles with -O3 -march=native -fopenmp) and threads come from ATen's intra-op pool
// (at::parallel_for), so torch.set_num_threads governs them.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <unistd.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif

// Inlining is what lets the per-element helpers and lambdas vectorize; with many template
// instantiations GCC's inliner gives up on some by default (then every element is a call).
#define NL_INLINE inline __attribute__((always_inline))

namespace normlab {

constexpr int64_t kBlock = 512;  // floats summed in float before flushing to double
constexpr int64_t kGrainElems = 1 << 15;

// 1/√(var + ε). A variance that overflowed (finite values whose squares exceed the float range,
// e.g. 1e19·randn) gives NaN — as the docs promise — never 1/√∞ = 0, which would silently
// return β for every output.
inline double inv_std(double var, double eps) {
  return std::isinf(var) ? std::numeric_limits<double>::quiet_NaN() : 1.0 / std::sqrt(var + eps);
}

// Outputs larger than the last-level cache are written with non-temporal (streaming) stores:
// a normal store first reads the destination line (read-for-ownership), so a kernel that
// reads x and writes y would move 3 bytes per byte of y instead of 2. glibc's memcpy does
// the same above 3/4 of the shared cache; below that, y is better left in cache for the
// next layer.
inline int64_t last_level_cache_bytes() {
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

inline int64_t stream_threshold_bytes() {
  static const int64_t bytes = [] {
    if (const char* env = std::getenv("NORMLAB_STREAM_BYTES")) return static_cast<int64_t>(std::atoll(env));
    return last_level_cache_bytes() * 3 / 4;
  }();
  return bytes;
}

inline bool should_stream(const at::Tensor& out) {
#if defined(__AVX__)
  return out.numel() * static_cast<int64_t>(sizeof(float)) >= stream_threshold_bytes();
#else
  (void)out;
  return false;
#endif
}

inline void stream_out(float* dst, const float* buf, int64_t n) {
#if defined(__AVX__)
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 31u); ++i) dst[i] = buf[i];
  for (; i + 8 <= n; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(buf + i));
  for (; i < n; ++i) dst[i] = buf[i];
#else
  std::memcpy(dst, buf, static_cast<size_t>(n) * sizeof(float));
#endif
}

inline void stream_fence(bool stream) {
#if defined(__AVX__)
  if (stream) _mm_sfence();
#else
  (void)stream;
#endif
}

// dst[i] = value(i) for i < n, through an L1 buffer and streaming stores when `stream`.
template <typename F>
NL_INLINE void emit(float* dst, int64_t n, bool stream, F&& value) {
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

// What one element adds to each of up to three sums (block_sums).
struct Terms {
  float first, second, third;
};
struct Sums {
  double first = 0, second = 0, third = 0;
};

// Σ term(i) for begin ≤ i < end, term by term: each block of kBlock elements is summed in float
// (a vectorized reduction) and the blocks are added up in double, which keeps long sums
// accurate at float's speed. Every kernel's moments (Σd, Σd²) and backward sums (Σdz, Σdz·u,
// PReLU's Σdy·min(z, 0)) take this one loop; `third` is summed only where Three.
template <bool Three = false, typename F>
NL_INLINE Sums block_sums(int64_t begin, int64_t end, F&& term) {
  Sums sums;
  for (int64_t i0 = begin; i0 < end; i0 += kBlock) {
    const int64_t i1 = std::min(end, i0 + kBlock);
    float a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+ : a1, a2, a3)
    for (int64_t i = i0; i < i1; ++i) {
      const Terms t = term(i);
      a1 += t.first;
      a2 += t.second;
      if constexpr (Three) a3 += t.third;
    }
    sums.first += a1;
    sums.second += a2;
    if constexpr (Three) sums.third += a3;
  }
  return sums;
}

// Σ(x − k) and Σ(x − k)² over n values: the shifted moments.
NL_INLINE Sums shifted_moments(const float* x, int64_t n, float k) {
  return block_sums(0, n, [&](int64_t i) __attribute__((always_inline)) {
    const float d = x[i] - k;
    return Terms{d, d * d, 0.f};
  });
}

// Every row counts (the unmasked kernels): the column loops may then take four rows per sweep.
struct AllRows {
  bool operator()(int64_t) const { return true; }
};

// Σ(x − k) and Σ(x − k)² per channel, over the rows begin ≤ s < end of x (rows of C values,
// channels innermost) for which valid(s): added into sum1, sum2 (C doubles each), summed in
// float over 64 rows at a time in f1, f2 (C floats each); k holds each channel's shift.
template <typename Valid>
NL_INLINE void column_moment_sums(const float* x, int64_t C, int64_t begin, int64_t end, Valid&& valid,
                                  const float* k, float* f1, float* f2, double* sum1, double* sum2) {
  for (int64_t s0 = begin; s0 < end; s0 += 64) {
    const int64_t s1 = std::min(end, s0 + 64);
    std::fill(f1, f1 + C, 0.f);
    std::fill(f2, f2 + C, 0.f);
    int64_t s = s0;
    if constexpr (std::is_same_v<std::decay_t<Valid>, AllRows>) {
      // Four rows per sweep: the partial sums are loaded and stored once per four rows
      // instead of every row, which made this loop store-bound.
      for (; s + 4 <= s1; s += 4) {
        const float* r0 = x + s * C;
        const float *r1 = r0 + C, *r2 = r1 + C, *r3 = r2 + C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const float d0 = r0[c] - k[c], d1 = r1[c] - k[c], d2 = r2[c] - k[c], d3 = r3[c] - k[c];
          f1[c] += (d0 + d1) + (d2 + d3);
          f2[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
        }
      }
    }
    for (; s < s1; ++s) {
      if (!valid(s)) continue;
      const float* row = x + s * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const float d = row[c] - k[c];
        f1[c] += d;
        f2[c] += d * d;
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      sum1[c] += f1[c];
      sum2[c] += f2[c];
    }
  }
}

inline int64_t grain_for(int64_t inner) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, inner)); }

inline const float* opt_ptr(const at::Tensor& t) { return t.defined() && t.numel() ? t.data_ptr<float>() : nullptr; }

// A shift for the moments of one group: the mean of up to 16 of its values, spread evenly.
// Close to the group's mean, so Σd²/n − (Σd/n)² cancels little: a single value can sit 3σ
// from the mean, which multiplies the variance's rounding error by ~10 on small groups.
// For data with a large mean it is within a factor 2 of every value, so x − shift stays
// exact (Sterbenz) — what keeps normlab accurate where a plain Σx, Σx² is not.
// The positions are j·n/16, taken with a shift: sixteen 64-bit divisions were a quarter of
// the time of a cache-resident LayerNorm row of 768 values.
NL_INLINE float sample_shift(const float* p, int64_t n, int64_t stride) {
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
NL_INLINE void prefetch_floats(const float* p, int64_t n) {
  const int64_t m = std::min<int64_t>(n, 4096);
  for (int64_t i = 0; i < m; i += 16) __builtin_prefetch(p + i);
}


}  // namespace normlab
