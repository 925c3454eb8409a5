// LayerNorm and RMSNorm, and the residual add before them (declared in kernels.h): each row
// is summed and normalized while it sits in L1, forward and backward in one pass per row.

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>

#include <vector>

#include "kernels.h"
#include "loops.h"

namespace normlab {
namespace {

#if defined(__AVX2__) && defined(__FMA__)
inline float lane_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

// Σ(x − k) and Σ(x − k)² over one row: shifted_moments' sums (each block of kBlock values in
// float, the blocks added in double), with four independent vector sums per block. The
// compiler gives shifted_moments' loop one vector accumulator per sum, so each vector of 8
// values waits for the previous add (3-4 cycles): on a row in L1 that chain, not the loads,
// was the moments pass's time — the pass took longer than writing the output.
NL_INLINE Sums row_moments(const float* x, int64_t n, float k) {
#if defined(__AVX2__) && defined(__FMA__)
  Sums sums;
  const __m256 kv = _mm256_set1_ps(k);
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const int64_t i1 = std::min(n, i0 + kBlock);
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0, q0 = s0, q1 = s0, q2 = s0, q3 = s0;
    int64_t i = i0;
    for (; i + 32 <= i1; i += 32) {
      const __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(x + i), kv);
      const __m256 d1 = _mm256_sub_ps(_mm256_loadu_ps(x + i + 8), kv);
      const __m256 d2 = _mm256_sub_ps(_mm256_loadu_ps(x + i + 16), kv);
      const __m256 d3 = _mm256_sub_ps(_mm256_loadu_ps(x + i + 24), kv);
      s0 = _mm256_add_ps(s0, d0);
      s1 = _mm256_add_ps(s1, d1);
      s2 = _mm256_add_ps(s2, d2);
      s3 = _mm256_add_ps(s3, d3);
      q0 = _mm256_fmadd_ps(d0, d0, q0);
      q1 = _mm256_fmadd_ps(d1, d1, q1);
      q2 = _mm256_fmadd_ps(d2, d2, q2);
      q3 = _mm256_fmadd_ps(d3, d3, q3);
    }
    for (; i + 8 <= i1; i += 8) {
      const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(x + i), kv);
      s0 = _mm256_add_ps(s0, d);
      q0 = _mm256_fmadd_ps(d, d, q0);
    }
    float a1 = lane_sum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    float a2 = lane_sum(_mm256_add_ps(_mm256_add_ps(q0, q1), _mm256_add_ps(q2, q3)));
    for (; i < i1; ++i) {
      const float d = x[i] - k;
      a1 += d;
      a2 += d * d;
    }
    sums.first += a1;
    sums.second += a2;
  }
  return sums;
#else
  return shifted_moments(x, n, k);
#endif
}

// Whether the row holds ±inf: asked only of a row whose mean square is already infinite.
inline bool holds_infinity(const float* row, int64_t K) {
  for (int64_t i = 0; i < K; ++i)
    if (std::isinf(row[i])) return true;
  return false;
}

// One row of K values, normalized: its shift k (a sample of the row when centered, else 0),
// rstd s and offset·rstd o, so that x̂ = (x − k)·s − o, stored at [r] of kp, rp, op unless kp
// is null; y = x̂·w + b written to dst. The row is read twice, so it should sit in L1.
NL_INLINE void normalize_row(const float* row, int64_t K, const float* wp, const float* bp, double eps, bool centered,
                             bool stream, float* dst, int64_t r, float* kp, float* rp, float* op) {
  const float k = centered ? sample_shift(row, K, 1) : 0.f;
  const Sums m = row_moments(row, K, k);
  const double off = centered ? m.first / K : 0.0;
  const double var = std::max(m.second / K - off * off, 0.0);
  // An RMSNorm row holding ±inf has an infinite mean square: 1/√∞ = 0, so its finite values
  // give 0 and the infinite ones NaN, as torch.nn's. Only a mean square that overflowed from
  // finite values (1e19·randn) is inv_std's NaN. LayerNorm's row is NaN either way: its
  // mean is infinite (torch.nn's too).
  const double rs = !centered && std::isinf(var) && holds_infinity(row, K) ? 0.0 : inv_std(var, eps);
  const float s = static_cast<float>(rs), o = static_cast<float>(off * rs);
  if (kp) {
    kp[r] = k;
    rp[r] = s;
    op[r] = o;
  }
  if (wp && bp) emit(dst, K, stream, [&](int64_t i) __attribute__((always_inline)) { return ((row[i] - k) * s - o) * wp[i] + bp[i]; });
  else if (wp) emit(dst, K, stream, [&](int64_t i) __attribute__((always_inline)) { return ((row[i] - k) * s - o) * wp[i]; });
  else if (bp) emit(dst, K, stream, [&](int64_t i) __attribute__((always_inline)) { return ((row[i] - k) * s - o) + bp[i]; });
  else emit(dst, K, stream, [&](int64_t i) __attribute__((always_inline)) { return (row[i] - k) * s - o; });
}

}  // namespace

// LayerNorm (centered) / RMSNorm over the rows of x (R, K), fused per row: each row is
// summed and normalized while it sits in L1. Returns {shift, rstd, offr} per row (float32),
// with x̂ = (x − shift)·rstd − offr; y is written into `out`. The affine w, b is over K.
std::vector<at::Tensor> row_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, double eps,
                                    bool centered, const at::Tensor& out) {
  const int64_t R = x.size(0), K = x.size(1);
  auto shift = at::empty({R}, x.options()), rstd = at::empty({R}, x.options()), offr = at::empty({R}, x.options());
  row_forward(x.data_ptr<float>(), R, K, opt_ptr(w), opt_ptr(b), eps, centered, out.data_ptr<float>(),
              shift.data_ptr<float>(), rstd.data_ptr<float>(), offr.data_ptr<float>());
  return {shift, rstd, offr};
}

// The same on raw rows; the per-row statistics are written where kp, rp, op point, or
// nowhere when they are null (no backward will read them).
void row_forward(const float* xp, int64_t R, int64_t K, const float* wp, const float* bp, double eps, bool centered,
                 float* yp, float* kp, float* rp, float* op) {
  // Ordinary stores even past the cache: streaming stores made this kernel slower on the
  // machine it was tuned on (LayerNorm 8192x768: 1.35-1.61x a copy streamed, 1.11-1.19x not;
  // 24576x768: 1.22-1.28x against 1.09-1.16x; one thread; RMSNorm unchanged).
  const bool stream = false;
  at::parallel_for(0, R, grain_for(K), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = xp + r * K;
      if (centered && r + 1 < end) prefetch_floats(row + K, K);
      normalize_row(row, K, wp, bp, eps, centered, stream, yp + r * K, r, kp, rp, op);
    }
    stream_fence(stream);
  });
}

namespace {

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
  const bool one_value = centered && K == 1;
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
          // A = Σ w·dy and B = Σ w·dy·u for dx, and dw and db's float partial sums on the way:
          // its own loop rather than block_sums, whose lambda with the two stores cost 3.5% more
          // instructions here (callgrind, LayerNorm 64x197x768 forward + backward).
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
          // A LayerNorm row of one value normalizes it to 0 whatever it is: dx = 0 exactly (the
          // general form gets it as γs·dy − γs·dy from two roundings, ulp(γs·dy) off).
          const float cz = one_value ? 0.f : s, cu = one_value ? 0.f : static_cast<float>(-s * s * m2),
                      cc = one_value ? 0.f : static_cast<float>(s * m2 * o - s * m1);
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

}  // namespace

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
      emit(sp + r * K, K, stream, [&](int64_t i) __attribute__((always_inline)) { return row[i]; });
      normalize_row(row, K, wp, bp, eps, centered, stream, yp + r * K, r, kp, rp, op);
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

}  // namespace normlab
