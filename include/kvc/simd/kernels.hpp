// kvc/simd/kernels.hpp — the SIMD kernels of kvc's CPU attend, generic over xsimd's arch.
//
//   dot(a, b, n)               Σ a[i]·b[i]                      b in f32, f16 or bf16
//   axpy(alpha, x, y, n)       y[i] += alpha·x[i]               x in f32, f16 or bf16
//   scale(alpha, y, n)         y[i] *= alpha
//   max_value(x, n)            max x[i]  (−inf for n == 0)
//   exp_shift_sum(x, n, shift) x[i] = exp(x[i] − shift) in place, returns Σ x[i]
//   dot_block(...)             scores[r][j] = q_r · k_j          (GQA: all rows × a key tile)
//   axpy_block(...)            acc[r][c] += Σ_j p[r][j]·v[j][c]  (GQA: all rows × a value tile)
// plus convert / load_as_float (kvc/simd/convert.hpp) and PrefetchStream (attend's reads).
//
// Each kernel has a scalar twin of the same signature in kvc/simd/reference.hpp that defines
// what it computes; tests compare the two. The arch is the first template parameter,
// defaulting to xsimd::default_arch, i.e. the best instruction set the translation unit is
// compiled for (-march): AVX-512, AVX2, SSE2 (x86-64 without -march)... `arch_name()` reports
// it, and benchmarks record it. Because the arch is part of every instantiation, translation
// units built for different targets never share (and never mix up) a kernel.
//
// All kernels take raw pointers and any n (tails handled), and need no alignment. Sums are
// accumulated in fp32 in a different order than the reference (several lanes, several
// accumulators), so they differ from it by rounding only: at most ~n·eps·Σ|terms|.
#pragma once

#include <kvc/simd/convert.hpp>
#include <kvc/simd/reference.hpp>
#include <kvc/simd/xsimd_compat.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

// Forces inlining of the unrolled lambda bodies below: an accumulator array stays in registers
// only if no out-of-line call takes its address (g++ 12 otherwise outlines the larger bodies
// and spills the accumulators on every iteration).
#if defined(__GNUC__) || defined(__clang__)
#define KVC_SIMD_ALWAYS_INLINE __attribute__((always_inline))
#else
#define KVC_SIMD_ALWAYS_INLINE
#endif

namespace kvc::simd {

template <class Arch = default_arch>
constexpr const char* arch_name() noexcept {
  return Arch::name();
}

// A software pipeline for reads from DRAM: the byte ranges a loop will read, in the order
// it reads them, prefetched a fixed distance ahead of use (a head's pages are not
// contiguous, and the hardware stream prefetcher stops at every 4 KiB boundary). After consuming n
// bytes the loop calls pump(n), which prefetches the next n bytes of the stream, so about
// `distance` bytes stay in flight. Prefetching a whole page at once instead issues hundreds of
// prefetches in a burst: the core stalls on full miss buffers while DRAM works, then computes while
// DRAM idles; interleaved, the two overlap.
class PrefetchStream {
 public:
  void clear() noexcept {
    ranges_.clear();
    range_ = 0;
    offset_ = 0;
  }
  void add(const void* pointer, std::size_t bytes) {
    if (bytes > 0) ranges_.push_back({static_cast<const char*>(pointer), bytes});
  }
  // Prefetches the next `bytes` bytes of the stream (fewer at its end).
  void pump(std::size_t bytes) noexcept {
    while (bytes > 0 && range_ < ranges_.size()) {
      const Range& range = ranges_[range_];
      const std::size_t take = std::min(bytes, range.bytes - offset_);
      // Whole cache lines: from the line holding the first byte to the one holding the last.
      const auto first = reinterpret_cast<std::uintptr_t>(range.first + offset_) & ~line_mask;
      const auto end = reinterpret_cast<std::uintptr_t>(range.first + offset_ + take);
      for (std::uintptr_t line = first; line < end; line += line_mask + 1) {
        __builtin_prefetch(reinterpret_cast<const void*>(line), 0, 3);
      }
      offset_ += take;
      bytes -= take;
      if (offset_ == range.bytes) {
        ++range_;
        offset_ = 0;
      }
    }
  }

 private:
  static constexpr std::uintptr_t line_mask = 63;
  struct Range {
    const char* first;
    std::size_t bytes;
  };
  std::vector<Range> ranges_;
  std::size_t range_ = 0;
  std::size_t offset_ = 0;
};

namespace detail {

// Calls body(std::integral_constant<std::size_t, i>{}) for i = 0 .. Count-1, unrolled at
// compile time: arrays of batches indexed only by constants stay in registers.
template <std::size_t Count, class Body>
KVC_SIMD_ALWAYS_INLINE inline void unroll(Body&& body) noexcept {
  [&]<std::size_t... I>(std::index_sequence<I...>) KVC_SIMD_ALWAYS_INLINE {
    (body(std::integral_constant<std::size_t, I>{}), ...);
  }
  (std::make_index_sequence<Count>{});
}

// Horizontal sums of four batches, written to sums[0..3]. On x86 a transpose-and-add (three
// adds and a few shuffles for all four) instead of four separate reductions.
template <class Arch>
inline void reduce_add_4(const xsimd::batch<float, Arch>& a, const xsimd::batch<float, Arch>& b,
                         const xsimd::batch<float, Arch>& c, const xsimd::batch<float, Arch>& d,
                         float* sums) noexcept {
  constexpr std::size_t lanes = xsimd::batch<float, Arch>::size;
#if defined(__AVX512F__)
  if constexpr (lanes == 16) {
    // In each 128-bit lane: ab = [a0+a2, b0+b2, a1+a3, b1+b3], likewise cd; then abcd =
    // [Σa, Σb, Σc, Σd] of that lane; finally the four 128-bit lanes are added.
    const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    const __m512d ab_d = _mm512_castps_pd(ab), cd_d = _mm512_castps_pd(cd);
    const __m512 abcd = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(ab_d, cd_d)),
                                      _mm512_castpd_ps(_mm512_unpackhi_pd(ab_d, cd_d)));
    const __m256 half =
        _mm256_add_ps(_mm512_castps512_ps256(abcd),
                      _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(abcd), 1)));
    _mm_storeu_ps(sums, _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1)));
    return;
  }
#endif
#if defined(__AVX__)
  if constexpr (lanes == 8) {
    const __m256 ab = _mm256_add_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
    const __m256 cd = _mm256_add_ps(_mm256_unpacklo_ps(c, d), _mm256_unpackhi_ps(c, d));
    const __m256d ab_d = _mm256_castps_pd(ab), cd_d = _mm256_castps_pd(cd);
    const __m256 abcd = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(ab_d, cd_d)),
                                      _mm256_castpd_ps(_mm256_unpackhi_pd(ab_d, cd_d)));
    _mm_storeu_ps(sums, _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1)));
    return;
  }
#endif
#if defined(__SSE2__)
  if constexpr (lanes == 4) {
    const __m128 ab = _mm_add_ps(_mm_unpacklo_ps(a, b), _mm_unpackhi_ps(a, b));
    const __m128 cd = _mm_add_ps(_mm_unpacklo_ps(c, d), _mm_unpackhi_ps(c, d));
    const __m128d ab_d = _mm_castps_pd(ab), cd_d = _mm_castps_pd(cd);
    _mm_storeu_ps(sums, _mm_add_ps(_mm_castpd_ps(_mm_unpacklo_pd(ab_d, cd_d)),
                                   _mm_castpd_ps(_mm_unpackhi_pd(ab_d, cd_d))));
    return;
  }
#endif
  sums[0] = reduce_add(a);
  sums[1] = reduce_add(b);
  sums[2] = reduce_add(c);
  sums[3] = reduce_add(d);
}

// Returns x from a register the optimizer cannot see into. g++ folds a load that feeds several
// FMAs into each of them (`vfmadd231ps (mem), k, acc`): in dot_tile that is one load per FMA,
// and the loads, not the FMAs, then bound the loop (20 loads per 16 FMAs; Zen 5 issues two
// 512-bit loads per cycle). Loaded once and held, a query vector costs one load per Keys FMAs.
// The integer kernels (int8_dot.hpp, bfp.hpp) hold their query registers the same way.
template <class Register>
KVC_SIMD_ALWAYS_INLINE inline Register in_register(Register x) noexcept {
#if (defined(__GNUC__) || defined(__clang__)) && defined(__AVX512F__)
  asm("" : "+v"(x));  // "v": any of xmm/ymm/zmm 0-31, whichever x is
#endif
  return x;
}
template <class Arch>
KVC_SIMD_ALWAYS_INLINE inline xsimd::batch<float, Arch> in_register(
    xsimd::batch<float, Arch> x) noexcept {
  using register_type = typename xsimd::batch<float, Arch>::register_type;
  return in_register(static_cast<register_type>(x));
}

// dot_block on Rows query rows × Keys keys: Rows·Keys accumulators in registers, so each key
// vector loaded (and widened) serves Rows rows and each query vector serves Keys keys.
template <std::size_t Rows, std::size_t Keys, class Arch, class T>
inline void dot_tile(const float* q, std::size_t ldq, const T* k, std::size_t ldk, std::size_t d,
                     float* scores, std::size_t lds) noexcept {
  using batch = xsimd::batch<float, Arch>;
  constexpr std::size_t lanes = batch::size;
  const std::size_t vector_end = d / lanes * lanes;
  batch acc[Rows][Keys];
  unroll<Rows>([&](auto r) KVC_SIMD_ALWAYS_INLINE {
    unroll<Keys>([&](auto j) KVC_SIMD_ALWAYS_INLINE { acc[r][j] = batch(0.0F); });
  });
  for (std::size_t c = 0; c < vector_end; c += lanes) {
    batch key[Keys];
    unroll<Keys>([&](auto j)
                     KVC_SIMD_ALWAYS_INLINE { key[j] = load_as_float<Arch>(k + j * ldk + c); });
    unroll<Rows>([&](auto r) KVC_SIMD_ALWAYS_INLINE {
      const batch query = in_register<Arch>(batch::load_unaligned(q + r * ldq + c));
      unroll<Keys>(
          [&](auto j) KVC_SIMD_ALWAYS_INLINE { acc[r][j] = xsimd::fma(query, key[j], acc[r][j]); });
    });
  }
  unroll<Rows>([&](auto r) KVC_SIMD_ALWAYS_INLINE {
    float sums[Keys];
    if constexpr (Keys == 4) {
      reduce_add_4<Arch>(acc[r][0], acc[r][1], acc[r][2], acc[r][3], sums);
    } else {
      unroll<Keys>([&](auto j) KVC_SIMD_ALWAYS_INLINE { sums[j] = reduce_add(acc[r][j]); });
    }
    const float* query = q + r * ldq;
    for (std::size_t c = vector_end; c < d; ++c) {
      unroll<Keys>([&](auto j) KVC_SIMD_ALWAYS_INLINE {
        sums[j] += query[c] * static_cast<float>(k[j * ldk + c]);
      });
    }
    unroll<Keys>([&](auto j) KVC_SIMD_ALWAYS_INLINE { scores[r * lds + j] = sums[j]; });
  });
}

// dot_block over Rows query rows and every key: blocks of four keys, then single keys.
template <std::size_t Rows, class Arch, class T>
inline void dot_rows(const float* q, std::size_t ldq, const T* k, std::size_t n_keys,
                     std::size_t ldk, std::size_t d, float* scores, std::size_t lds) noexcept {
  const std::size_t blocked_keys = n_keys / 4 * 4;
  for (std::size_t j = 0; j < blocked_keys; j += 4) {
    dot_tile<Rows, 4, Arch>(q, ldq, k + j * ldk, ldk, d, scores + j, lds);
  }
  for (std::size_t j = blocked_keys; j < n_keys; ++j) {
    dot_tile<Rows, 1, Arch>(q, ldq, k + j * ldk, ldk, d, scores + j, lds);
  }
}

// axpy_block on Rows accumulator rows × Vectors batches of columns: the Rows·Vectors
// accumulator batches stay in registers across all n_values, and each value vector loaded
// (and widened) serves Rows rows. p, v and acc point at the tile's first row / column.
template <std::size_t Rows, std::size_t Vectors, class Arch, class T>
inline void axpy_tile(const float* p, std::size_t ldp, const T* v, std::size_t n_values,
                      std::size_t ldv, float* acc, std::size_t ldacc) noexcept {
  using batch = xsimd::batch<float, Arch>;
  constexpr std::size_t lanes = batch::size;
  batch sum[Rows][Vectors];
  unroll<Rows>([&](auto r) KVC_SIMD_ALWAYS_INLINE {
    unroll<Vectors>([&](auto u) KVC_SIMD_ALWAYS_INLINE {
      sum[r][u] = batch::load_unaligned(acc + r * ldacc + u * lanes);
    });
  });
  for (std::size_t j = 0; j < n_values; ++j) {
    batch value[Vectors];
    unroll<Vectors>([&](auto u) KVC_SIMD_ALWAYS_INLINE {
      value[u] = load_as_float<Arch>(v + j * ldv + u * lanes);
    });
    unroll<Rows>([&](auto r) KVC_SIMD_ALWAYS_INLINE {
      const batch weight(p[r * ldp + j]);
      unroll<Vectors>([&](auto u) KVC_SIMD_ALWAYS_INLINE {
        sum[r][u] = xsimd::fma(weight, value[u], sum[r][u]);
      });
    });
  }
  unroll<Rows>([&](auto r) KVC_SIMD_ALWAYS_INLINE {
    unroll<Vectors>([&](auto u) KVC_SIMD_ALWAYS_INLINE {
      sum[r][u].store_unaligned(acc + r * ldacc + u * lanes);
    });
  });
}

// Register budget of the tile kernels: AVX-512 has 32 vector registers, the others 16.
template <class Arch>
inline constexpr std::size_t vector_registers = xsimd::batch<float, Arch>::size >= 16 ? 32 : 16;

// axpy_block over Rows accumulator rows and all d columns.
template <std::size_t Rows, class Arch, class T>
inline void axpy_rows(const float* p, std::size_t ldp, const T* v, std::size_t n_values,
                      std::size_t ldv, std::size_t d, float* acc, std::size_t ldacc) noexcept {
  constexpr std::size_t lanes = xsimd::batch<float, Arch>::size;
  // Rows·Vectors accumulators plus Vectors values plus a weight must fit in the registers:
  // 16 accumulators on AVX-512 (4 rows × 4 vectors, or 2 × 8: d = 128 in one pass), 8
  // elsewhere (2 × 4).
  constexpr std::size_t accumulators = vector_registers<Arch> >= 32 ? 16 : 8;
  constexpr std::size_t vectors = Rows >= 4 ? accumulators / 4 : accumulators / 2;
  const std::size_t vector_end = d / lanes * lanes;
  std::size_t c = 0;
  for (; c + vectors * lanes <= vector_end; c += vectors * lanes) {
    axpy_tile<Rows, vectors, Arch>(p, ldp, v + c, n_values, ldv, acc + c, ldacc);
  }
  for (; c < vector_end; c += lanes) {
    axpy_tile<Rows, 1, Arch>(p, ldp, v + c, n_values, ldv, acc + c, ldacc);
  }
  for (; c < d; ++c) {
    for (std::size_t r = 0; r < Rows; ++r) {
      float sum = acc[r * ldacc + c];
      for (std::size_t j = 0; j < n_values; ++j)
        sum += p[r * ldp + j] * static_cast<float>(v[j * ldv + c]);
      acc[r * ldacc + c] = sum;
    }
  }
}

}  // namespace detail

// Σ a[i]·b[i]; a is the fp32 query, b a stored key in float, Eigen::half or Eigen::bfloat16
// (widened in registers).
template <class Arch = default_arch, class T>
inline float dot(const float* a, const T* b, std::size_t n) noexcept {
  using batch = xsimd::batch<float, Arch>;
  constexpr std::size_t lanes = batch::size;
  constexpr std::size_t chains = 4;  // independent FMA chains hide the FMA latency
  batch acc[chains];
  detail::unroll<chains>([&](auto u) KVC_SIMD_ALWAYS_INLINE { acc[u] = batch(0.0F); });
  std::size_t i = 0;
  for (; i + chains * lanes <= n; i += chains * lanes) {
    detail::unroll<chains>([&](auto u) KVC_SIMD_ALWAYS_INLINE {
      acc[u] = xsimd::fma(batch::load_unaligned(a + i + u * lanes),
                          load_as_float<Arch>(b + i + u * lanes), acc[u]);
    });
  }
  for (; i + lanes <= n; i += lanes) {
    acc[0] = xsimd::fma(batch::load_unaligned(a + i), load_as_float<Arch>(b + i), acc[0]);
  }
  float sum = detail::reduce_add((acc[0] + acc[1]) + (acc[2] + acc[3]));
  for (; i < n; ++i) sum += a[i] * static_cast<float>(b[i]);
  return sum;
}

// y[i] += alpha · x[i]; x in float, Eigen::half or Eigen::bfloat16. One fused multiply-add
// per element, so each y[i] is within one rounding of the reference's multiply-then-add.
template <class Arch = default_arch, class T>
inline void axpy(float alpha, const T* x, float* y, std::size_t n) noexcept {
  using batch = xsimd::batch<float, Arch>;
  constexpr std::size_t lanes = batch::size;
  const batch a(alpha);
  std::size_t i = 0;
  for (; i + lanes <= n; i += lanes) {
    xsimd::fma(a, load_as_float<Arch>(x + i), batch::load_unaligned(y + i)).store_unaligned(y + i);
  }
  for (; i < n; ++i) y[i] += alpha * static_cast<float>(x[i]);
}

// y[i] *= alpha (bit-identical to the reference).
template <class Arch = default_arch>
inline void scale(float alpha, float* y, std::size_t n) noexcept {
  using batch = xsimd::batch<float, Arch>;
  constexpr std::size_t lanes = batch::size;
  const batch a(alpha);
  std::size_t i = 0;
  for (; i + lanes <= n; i += lanes) (a * batch::load_unaligned(y + i)).store_unaligned(y + i);
  for (; i < n; ++i) y[i] *= alpha;
}

// max_i x[i]; −inf for n == 0. Exact (equal to the reference) for inputs without NaN; with a
// NaN the result is unspecified.
template <class Arch = default_arch>
inline float max_value(const float* x, std::size_t n) noexcept {
  using batch = xsimd::batch<float, Arch>;
  constexpr std::size_t lanes = batch::size;
  float best = -std::numeric_limits<float>::infinity();
  std::size_t i = 0;
  if (n >= lanes) {
    batch m = batch::load_unaligned(x);
    for (i = lanes; i + lanes <= n; i += lanes) m = xsimd::max(m, batch::load_unaligned(x + i));
    best = detail::reduce_max(m);
  }
  for (; i < n; ++i) best = x[i] > best ? x[i] : best;
  return best;
}

// x[i] = exp(x[i] − shift) in place; returns Σ x[i] (the online-softmax step: shift is the
// running maximum). −inf entries (masked positions) become exactly 0. shift must be finite
// (an all −inf row has no softmax: −inf − −inf is NaN, in the reference too).
// Accuracy: the vector body uses xsimd::exp (range reduction + polynomial, Cephes-style),
// within 1.6 ulp of the exact exponential for arguments in [−87.3, 0] (1.52 ulp worst
// measured with xsimd 8.1 on AVX-512 and SSE2; the test checks ≤ 2 ulp), while the reference's
// std::exp is within 1 ulp. Below −87.3 the result is a float denormal and either may differ
// by up to FLT_MIN (1.2e−38) absolute, negligible next to the row's largest term, exp(0) = 1.
// The scalar tail uses std::exp, like the reference.
template <class Arch = default_arch>
inline float exp_shift_sum(float* x, std::size_t n, float shift) noexcept {
  using batch = xsimd::batch<float, Arch>;
  constexpr std::size_t lanes = batch::size;
  const batch s(shift);
  batch acc0(0.0F), acc1(0.0F);
  std::size_t i = 0;
  for (; i + 2 * lanes <= n; i += 2 * lanes) {
    const batch e0 = xsimd::exp(batch::load_unaligned(x + i) - s);
    const batch e1 = xsimd::exp(batch::load_unaligned(x + i + lanes) - s);
    e0.store_unaligned(x + i);
    e1.store_unaligned(x + i + lanes);
    acc0 += e0;
    acc1 += e1;
  }
  for (; i + lanes <= n; i += lanes) {
    const batch e = xsimd::exp(batch::load_unaligned(x + i) - s);
    e.store_unaligned(x + i);
    acc0 += e;
  }
  float sum = detail::reduce_add(acc0 + acc1);
  for (; i < n; ++i) sum += (x[i] = std::exp(x[i] - shift));
  return sum;
}

// scores[r·lds + j] = q_r · k_j for r < rows, j < n_keys, where q_r = q + r·ldq (fp32) and
// k_j = k + j·ldk (float, Eigen::half or Eigen::bfloat16, widened in registers). The GQA hot
// loop: every query row of a group against one L1-resident tile of keys. Register-blocked
// 4 rows × 4 keys on AVX-512 (2 × 4 with 16 registers): each key vector loaded serves all
// rows of the block, each query vector all four keys, and the four sums of a row are
// reduced together. Only scores[r·lds + j] for j < n_keys is written.
template <class Arch = default_arch, class T = float>
inline void dot_block(const float* q, std::size_t rows, std::size_t ldq, const T* k,
                      std::size_t n_keys, std::size_t ldk, std::size_t d, float* scores,
                      std::size_t lds) noexcept {
  constexpr std::size_t row_block = detail::vector_registers<Arch> >= 32 ? 4 : 2;
  std::size_t r = 0;
  for (; r + row_block <= rows; r += row_block) {
    detail::dot_rows<row_block, Arch>(q + r * ldq, ldq, k, n_keys, ldk, d, scores + r * lds, lds);
  }
  for (; r < rows; ++r) {
    detail::dot_rows<1, Arch>(q + r * ldq, ldq, k, n_keys, ldk, d, scores + r * lds, lds);
  }
}

// acc[r·ldacc + c] += Σ_j p[r·ldp + j] · v[j·ldv + c] for r < rows, c < d, j < n_values; v in
// float, Eigen::half or Eigen::bfloat16 (widened in registers). Up to 16 accumulator batches
// on AVX-512 (4 rows × 4 batches of columns, or 2 × 8; elsewhere 2 × 4) stay in registers
// across all j, so the accumulators are read and written once per tile and each value
// vector loaded serves every row of the pass.
template <class Arch = default_arch, class T = float>
inline void axpy_block(const float* p, std::size_t rows, std::size_t ldp, const T* v,
                       std::size_t n_values, std::size_t ldv, std::size_t d, float* acc,
                       std::size_t ldacc) noexcept {
  std::size_t r = 0;
  if constexpr (detail::vector_registers<Arch> >= 32) {
    // Four rows a pass: each value vector loaded and widened serves all four (GQA 4 decode).
    for (; r + 4 <= rows; r += 4) {
      detail::axpy_rows<4, Arch>(p + r * ldp, ldp, v, n_values, ldv, d, acc + r * ldacc, ldacc);
    }
  }
  for (; r + 2 <= rows; r += 2) {
    detail::axpy_rows<2, Arch>(p + r * ldp, ldp, v, n_values, ldv, d, acc + r * ldacc, ldacc);
  }
  if (r < rows)
    detail::axpy_rows<1, Arch>(p + r * ldp, ldp, v, n_values, ldv, d, acc + r * ldacc, ldacc);
}

}  // namespace kvc::simd
