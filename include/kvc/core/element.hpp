// kvc/core/element.hpp — the element types host tensors may use at the API boundary.
#pragma once

// First, so that g++ 12's intrinsic-header warning is silenced before Eigen includes them.
#include <kvc/simd/intrinsics.hpp>

#include <Eigen/Core>

#include <concepts>
#include <string_view>

namespace kvc {

// float, IEEE half (Eigen::half) or bfloat16 (Eigen::bfloat16): what engines hand over.
template <class T>
concept Element =
    std::same_as<T, float> || std::same_as<T, Eigen::half> || std::same_as<T, Eigen::bfloat16>;

template <Element T>
constexpr std::string_view element_name() noexcept {
  if constexpr (std::same_as<T, float>) {
    return "f32";
  } else if constexpr (std::same_as<T, Eigen::half>) {
    return "f16";
  } else {
    return "bf16";
  }
}

}  // namespace kvc
