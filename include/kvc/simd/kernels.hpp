// kvc/simd/kernels.hpp — the SIMD kernels of kvc's CPU attend, generic over xsimd's arch.
//
// Each kernel has a scalar twin in kvc/simd/reference.hpp with the same signature; tests
// compare the two. The arch is a template parameter defaulting to xsimd::default_arch,
// i.e. the best instruction set the translation unit is compiled for (-march): AVX-512,
// AVX2, SSE2... `arch_name()` reports it (benchmarks record it).
//
// All kernels take raw pointers, any n (tails handled), no alignment requirement.
#pragma once

#include <kvc/simd/convert.hpp>
#include <kvc/simd/reference.hpp>
#include <kvc/simd/xsimd_compat.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cstddef>
#include <limits>
#include <type_traits>

namespace kvc::simd {

using default_arch = xsimd::default_arch;

template <class Arch = default_arch>
constexpr const char* arch_name() noexcept {
  return Arch::name();
}

// Σ a[i]·b[i], b in f32 (f16/bf16 rows go through convert() into an fp32 tile first).
template <class Arch = default_arch>
inline float dot(const float* a, const float* b, std::size_t n) noexcept {
  using batch = xsimd::batch<float, Arch>;
  constexpr std::size_t lanes = batch::size;
  batch acc0(0.0F), acc1(0.0F);
  std::size_t i = 0;
  for (; i + 2 * lanes <= n; i += 2 * lanes) {
    acc0 = xsimd::fma(batch::load_unaligned(a + i), batch::load_unaligned(b + i), acc0);
    acc1 = xsimd::fma(batch::load_unaligned(a + i + lanes), batch::load_unaligned(b + i + lanes),
                      acc1);
  }
  for (; i + lanes <= n; i += lanes) {
    acc0 = xsimd::fma(batch::load_unaligned(a + i), batch::load_unaligned(b + i), acc0);
  }
  float sum = detail::reduce_add(acc0 + acc1);
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// y[i] += alpha · x[i]
template <class Arch = default_arch>
inline void axpy(float alpha, const float* x, float* y, std::size_t n) noexcept {
  using batch = xsimd::batch<float, Arch>;
  constexpr std::size_t lanes = batch::size;
  const batch a(alpha);
  std::size_t i = 0;
  for (; i + lanes <= n; i += lanes) {
    xsimd::fma(a, batch::load_unaligned(x + i), batch::load_unaligned(y + i))
        .store_unaligned(y + i);
  }
  for (; i < n; ++i) y[i] += alpha * x[i];
}

// y[i] *= alpha
template <class Arch = default_arch>
inline void scale(float alpha, float* y, std::size_t n) noexcept {
  using batch = xsimd::batch<float, Arch>;
  constexpr std::size_t lanes = batch::size;
  const batch a(alpha);
  std::size_t i = 0;
  for (; i + lanes <= n; i += lanes) (a * batch::load_unaligned(y + i)).store_unaligned(y + i);
  for (; i < n; ++i) y[i] *= alpha;
}

// max_i x[i]; −inf for n == 0.
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

// x[i] = exp(x[i] − shift) in place; returns Σ x[i]. −inf entries become 0. Uses
// xsimd::exp (a few ulp from std::exp over the range softmax produces, ≤ 0).
template <class Arch = default_arch>
inline float exp_shift_sum(float* x, std::size_t n, float shift) noexcept {
  using batch = xsimd::batch<float, Arch>;
  constexpr std::size_t lanes = batch::size;
  const batch s(shift);
  batch acc(0.0F);
  std::size_t i = 0;
  for (; i + lanes <= n; i += lanes) {
    const batch e = xsimd::exp(batch::load_unaligned(x + i) - s);
    e.store_unaligned(x + i);
    acc += e;
  }
  float sum = detail::reduce_add(acc);
  for (; i < n; ++i) sum += (x[i] = std::exp(x[i] - shift));
  return sum;
}

// scores[r·lds + j] = q_r · k_j for r < rows, j < n_keys (fp32 keys, one L1-resident tile).
// Four keys per pass: each query vector loaded is used four times.
template <class Arch = default_arch>
inline void dot_block(const float* q, std::size_t rows, std::size_t ldq, const float* k,
                      std::size_t n_keys, std::size_t ldk, std::size_t d, float* scores,
                      std::size_t lds) noexcept {
  using batch = xsimd::batch<float, Arch>;
  constexpr std::size_t lanes = batch::size;
  const std::size_t vector_end = d / lanes * lanes;
  for (std::size_t r = 0; r < rows; ++r) {
    const float* query = q + r * ldq;
    float* out = scores + r * lds;
    const std::size_t blocked_keys = n_keys / 4 * 4;
    for (std::size_t j = 0; j < blocked_keys; j += 4) {
      const float* k0 = k + j * ldk;
      const float* k1 = k0 + ldk;
      const float* k2 = k1 + ldk;
      const float* k3 = k2 + ldk;
      batch a0(0.0F), a1(0.0F), a2(0.0F), a3(0.0F);
      for (std::size_t c = 0; c < vector_end; c += lanes) {
        const batch qv = batch::load_unaligned(query + c);
        a0 = xsimd::fma(qv, batch::load_unaligned(k0 + c), a0);
        a1 = xsimd::fma(qv, batch::load_unaligned(k1 + c), a1);
        a2 = xsimd::fma(qv, batch::load_unaligned(k2 + c), a2);
        a3 = xsimd::fma(qv, batch::load_unaligned(k3 + c), a3);
      }
      float s0 = detail::reduce_add(a0), s1 = detail::reduce_add(a1);
      float s2 = detail::reduce_add(a2), s3 = detail::reduce_add(a3);
      for (std::size_t c = vector_end; c < d; ++c) {
        s0 += query[c] * k0[c];
        s1 += query[c] * k1[c];
        s2 += query[c] * k2[c];
        s3 += query[c] * k3[c];
      }
      out[j] = s0;
      out[j + 1] = s1;
      out[j + 2] = s2;
      out[j + 3] = s3;
    }
    for (std::size_t j = blocked_keys; j < n_keys; ++j) out[j] = dot<Arch>(query, k + j * ldk, d);
  }
}

// acc[r·ldacc + c] += Σ_j p[r·ldp + j] · v[j·ldv + c]. The accumulator slice stays in
// registers across all j (up to 8 vectors at once), so each row streams the V tile once.
template <class Arch = default_arch>
inline void axpy_block(const float* p, std::size_t rows, std::size_t ldp, const float* v,
                       std::size_t n_values, std::size_t ldv, std::size_t d, float* acc,
                       std::size_t ldacc) noexcept {
  using batch = xsimd::batch<float, Arch>;
  constexpr std::size_t lanes = batch::size;
  constexpr std::size_t held = 8;  // accumulator vectors kept in registers
  const std::size_t vector_end = d / lanes * lanes;
  for (std::size_t r = 0; r < rows; ++r) {
    const float* weights = p + r * ldp;
    float* out = acc + r * ldacc;
    for (std::size_t c0 = 0; c0 < vector_end; c0 += held * lanes) {
      const std::size_t count = std::min(held, (vector_end - c0) / lanes);
      batch a[held];
      // All `held` are initialized (not only `count`): g++ 12 otherwise warns falsely.
      for (std::size_t u = 0; u < held; ++u) {
        a[u] = u < count ? batch::load_unaligned(out + c0 + u * lanes) : batch(0.0F);
      }
      for (std::size_t j = 0; j < n_values; ++j) {
        const batch w(weights[j]);
        const float* value = v + j * ldv + c0;
        for (std::size_t u = 0; u < count; ++u) {
          a[u] = xsimd::fma(w, batch::load_unaligned(value + u * lanes), a[u]);
        }
      }
      for (std::size_t u = 0; u < count; ++u) a[u].store_unaligned(out + c0 + u * lanes);
    }
    for (std::size_t c = vector_end; c < d; ++c) {
      float sum = out[c];
      for (std::size_t j = 0; j < n_values; ++j) sum += weights[j] * v[j * ldv + c];
      out[c] = sum;
    }
  }
}

}  // namespace kvc::simd
