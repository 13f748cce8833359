// kvc/simd/hadamard.hpp — the orthonormal fast Walsh–Hadamard transform of fp32 rows, in place.
//
//   hadamard(x, d)             x ← H_d · x,  H_d = Sylvester Hadamard matrix / √d
//   hadamard_rows(x, rows, d)  the same on `rows` contiguous rows of d floats
//   is_power_of_two(d)         the transform's precondition on d
//
// H_d (d = 2^k) is the Sylvester matrix, H_1 = [1], H_2m = [[H_m, H_m], [H_m, −H_m]]
// (entry (i, j) = (−1)^popcount(i & j)), scaled by 1/√d: symmetric and orthonormal, so it is
// its own inverse and preserves the Euclidean norm. The fast transform: log2(d) butterfly
// stages of stride h = 1, 2, 4, ..., d/2 — for each pair (j, j + h) with j & h == 0,
//   x[j], x[j + h] ← x[j] + x[j + h], x[j] − x[j + h]
// — then every element times 1/√d (fp32, correctly rounded from float64; exact when log2(d) is
// even). Cost: d·log2(d) adds, d multiplies.
//
// Range: the stages sum up to d elements unscaled, so the transform is finite whenever
// d · max|x| ≤ FLT_MAX (its result is at most √d · max|x|). The scale comes last on purpose:
// no multiply feeds an add, so a compiler that contracts a·b + c into an FMA (g++ does by
// default, across statements) has nothing to contract, and every build computes the same bits.
//
// Every kernel has a twin in kvc::simd::reference (below) that defines it. The SIMD version
// performs, for every element, the same fp32 operations in the same order (one add or subtract
// per stage, then the multiply), so it equals the reference bit for bit. Paths: strides ≥ the
// batch width are butterflies between whole batches; strides below it stay in one batch and
// pair lanes j and j ^ h with an in-register permute (x86 intrinsics for 4, 8 or 16 lanes,
// chosen by the arch's lane count and the target macros; elsewhere through memory), then add
// sign·x (sign = +1 on the low lane of a pair, −1 on the high: p + (−x) is exactly p − x, and
// sign·x is exact, fused or not). Rows shorter than one batch take the scalar reference. d must
// be a power of two (d = 1 is the identity); other d are a precondition violation (the result
// is unspecified).
#pragma once

#include <kvc/simd/convert.hpp>
#include <kvc/simd/intrinsics.hpp>
#include <kvc/simd/xsimd_compat.hpp>

#include <cmath>
#include <cstddef>

namespace kvc::simd {

constexpr bool is_power_of_two(std::size_t d) noexcept {
  return d != 0 && (d & (d - 1)) == 0;
}

// 1/√d rounded once to fp32 (exact when log2(d) is even).
inline float hadamard_scale(std::size_t d) noexcept {
  return static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
}

namespace reference {

inline void hadamard(float* x, std::size_t d) noexcept {
  for (std::size_t h = 1; h < d; h *= 2) {
    for (std::size_t i = 0; i < d; i += 2 * h) {
      for (std::size_t j = i; j < i + h; ++j) {
        const float a = x[j];
        const float b = x[j + h];
        x[j] = a + b;
        x[j + h] = a - b;
      }
    }
  }
  const float s = hadamard_scale(d);
  for (std::size_t i = 0; i < d; ++i) x[i] *= s;
}

inline void hadamard_rows(float* x, std::size_t rows, std::size_t d) noexcept {
  for (std::size_t r = 0; r < rows; ++r) hadamard(x + r * d, d);
}

}  // namespace reference

namespace detail {

// Lane j of the result is lane j ^ Stride of x (Stride < lanes, a power of two).
template <std::size_t Stride, class Arch>
inline xsimd::batch<float, Arch> hadamard_partner(const xsimd::batch<float, Arch>& x) noexcept {
  using batch = xsimd::batch<float, Arch>;
  constexpr std::size_t lanes = batch::size;
#if defined(__AVX512F__)
  if constexpr (lanes == 16) {
    if constexpr (Stride == 1) return batch(_mm512_permute_ps(x, 0xB1));  // [1, 0, 3, 2]
    if constexpr (Stride == 2) return batch(_mm512_permute_ps(x, 0x4E));  // [2, 3, 0, 1]
    if constexpr (Stride == 4) return batch(_mm512_shuffle_f32x4(x, x, 0xB1));
    if constexpr (Stride == 8) return batch(_mm512_shuffle_f32x4(x, x, 0x4E));
  }
#endif
#if defined(__AVX__)
  if constexpr (lanes == 8) {
    if constexpr (Stride == 1) return batch(_mm256_permute_ps(x, 0xB1));
    if constexpr (Stride == 2) return batch(_mm256_permute_ps(x, 0x4E));
    if constexpr (Stride == 4) return batch(_mm256_permute2f128_ps(x, x, 0x01));
  }
#endif
#if defined(__SSE2__)
  if constexpr (lanes == 4) {
    if constexpr (Stride == 1) return batch(_mm_shuffle_ps(x, x, 0xB1));
    if constexpr (Stride == 2) return batch(_mm_shuffle_ps(x, x, 0x4E));
  }
#endif
  alignas(64) float in[lanes];
  alignas(64) float out[lanes];
  x.store_aligned(in);
  for (std::size_t j = 0; j < lanes; ++j) out[j] = in[j ^ Stride];
  return batch::load_aligned(out);
}

// +1 on lanes j with j & Stride == 0 (the low element of a pair), −1 on the others.
template <std::size_t Stride, class Arch>
inline xsimd::batch<float, Arch> hadamard_sign() noexcept {
  using batch = xsimd::batch<float, Arch>;
  alignas(64) float sign[batch::size];
  for (std::size_t j = 0; j < batch::size; ++j) sign[j] = (j & Stride) != 0 ? -1.0F : 1.0F;
  return batch::load_aligned(sign);
}

// The stages of stride Stride, 2·Stride, ..., lanes/2 on one batch: lane j becomes
// x[j] + x[j ^ h] (low) or x[j ^ h] − x[j] (high).
template <std::size_t Stride, class Arch>
inline xsimd::batch<float, Arch> hadamard_in_batch(xsimd::batch<float, Arch> x) noexcept {
  if constexpr (Stride >= xsimd::batch<float, Arch>::size) {
    return x;
  } else {
    x = hadamard_partner<Stride, Arch>(x) + x * hadamard_sign<Stride, Arch>();
    return hadamard_in_batch<2 * Stride, Arch>(x);
  }
}

}  // namespace detail

// x ← H_d · x in place (see the top of this file); d a power of two; no alignment needed.
template <class Arch = default_arch>
inline void hadamard(float* x, std::size_t d) noexcept {
  using batch = xsimd::batch<float, Arch>;
  constexpr std::size_t lanes = batch::size;
  if (d < lanes) {
    reference::hadamard(x, d);
    return;
  }
  const batch s(hadamard_scale(d));
  if (d == lanes) {
    (detail::hadamard_in_batch<1, Arch>(batch::load_unaligned(x)) * s).store_unaligned(x);
    return;
  }
  for (std::size_t i = 0; i < d; i += lanes) {
    detail::hadamard_in_batch<1, Arch>(batch::load_unaligned(x + i)).store_unaligned(x + i);
  }
  for (std::size_t h = lanes; h < d / 2; h *= 2) {
    for (std::size_t i = 0; i < d; i += 2 * h) {
      for (std::size_t j = i; j < i + h; j += lanes) {
        const batch a = batch::load_unaligned(x + j);
        const batch b = batch::load_unaligned(x + j + h);
        (a + b).store_unaligned(x + j);
        (a - b).store_unaligned(x + j + h);
      }
    }
  }
  // The last stage (stride d/2) and the scale in one pass.
  const std::size_t half = d / 2;
  for (std::size_t j = 0; j < half; j += lanes) {
    const batch a = batch::load_unaligned(x + j);
    const batch b = batch::load_unaligned(x + j + half);
    ((a + b) * s).store_unaligned(x + j);
    ((a - b) * s).store_unaligned(x + j + half);
  }
}

// hadamard on rows r = 0 .. rows−1 at x + r·d.
template <class Arch = default_arch>
inline void hadamard_rows(float* x, std::size_t rows, std::size_t d) noexcept {
  for (std::size_t r = 0; r < rows; ++r) hadamard<Arch>(x + r * d, d);
}

}  // namespace kvc::simd
