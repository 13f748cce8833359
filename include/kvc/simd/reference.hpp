// kvc/simd/reference.hpp — portable scalar reference of every kernel in kvc/simd.
//
// These define what the kernels compute; tests compare the SIMD versions against them.
// Conversions go through Eigen::half / Eigen::bfloat16 (round to nearest even).
#pragma once

#include <Eigen/Core>

#include <cmath>
#include <cstddef>
#include <limits>

namespace kvc::simd::reference {

template <class T>
inline float dot(const float* a, const T* b, std::size_t n) noexcept {
  float sum = 0.0F;
  for (std::size_t i = 0; i < n; ++i) sum += a[i] * static_cast<float>(b[i]);
  return sum;
}

template <class T>
inline void axpy(float alpha, const T* x, float* y, std::size_t n) noexcept {
  for (std::size_t i = 0; i < n; ++i) y[i] += alpha * static_cast<float>(x[i]);
}

inline void scale(float alpha, float* y, std::size_t n) noexcept {
  for (std::size_t i = 0; i < n; ++i) y[i] *= alpha;
}

template <class S, class D>
inline void convert(const S* source, D* destination, std::size_t n) noexcept {
  for (std::size_t i = 0; i < n; ++i) {
    destination[i] = static_cast<D>(static_cast<float>(source[i]));
  }
}

inline float max_value(const float* x, std::size_t n) noexcept {
  float best = -std::numeric_limits<float>::infinity();
  for (std::size_t i = 0; i < n; ++i) best = x[i] > best ? x[i] : best;
  return best;
}

inline float exp_shift_sum(float* x, std::size_t n, float shift) noexcept {
  float sum = 0.0F;
  for (std::size_t i = 0; i < n; ++i) sum += (x[i] = std::exp(x[i] - shift));
  return sum;
}

template <class T = float>
inline void dot_block(const float* q, std::size_t rows, std::size_t ldq, const T* k,
                      std::size_t n_keys, std::size_t ldk, std::size_t d, float* scores,
                      std::size_t lds) noexcept {
  for (std::size_t r = 0; r < rows; ++r) {
    for (std::size_t j = 0; j < n_keys; ++j) scores[r * lds + j] = dot(q + r * ldq, k + j * ldk, d);
  }
}

template <class T = float>
inline void axpy_block(const float* p, std::size_t rows, std::size_t ldp, const T* v,
                       std::size_t n_values, std::size_t ldv, std::size_t d, float* acc,
                       std::size_t ldacc) noexcept {
  for (std::size_t r = 0; r < rows; ++r) {
    for (std::size_t j = 0; j < n_values; ++j)
      axpy(p[r * ldp + j], v + j * ldv, acc + r * ldacc, d);
  }
}

}  // namespace kvc::simd::reference
