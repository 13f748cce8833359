// kvc/core/view.hpp — a small non-owning strided view, kvc's stand-in for std::mdspan
// (C++23, not in our toolchain).
//
// Host tensors cross the API as views: kvc never copies them at the boundary and never
// keeps a view past the call that received it. Extents and strides are in elements.
#pragma once

#include <array>
#include <cstddef>
#include <type_traits>

namespace kvc {

template <class T, std::size_t Rank>
class View {
 public:
  using element_type = T;
  using value_type = std::remove_cv_t<T>;
  using extents_type = std::array<std::size_t, Rank>;
  using strides_type = std::array<std::ptrdiff_t, Rank>;

  constexpr View() noexcept = default;

  // Contiguous row-major (the last index moves fastest).
  constexpr View(T* data, const extents_type& extents) noexcept : data_(data), extents_(extents) {
    std::ptrdiff_t stride = 1;
    for (std::size_t r = Rank; r-- > 0;) {
      strides_[r] = stride;
      stride *= static_cast<std::ptrdiff_t>(extents_[r]);
    }
  }

  constexpr View(T* data, const extents_type& extents, const strides_type& strides) noexcept
      : data_(data), extents_(extents), strides_(strides) {}

  // View<float, 3> converts to View<const float, 3>.
  template <class U>
    requires(!std::is_same_v<U, T> && std::is_convertible_v<U (*)[], T (*)[]>)
  constexpr View(const View<U, Rank>& other) noexcept  // NOLINT(google-explicit-constructor)
      : data_(other.data()), extents_(other.extents()), strides_(other.strides()) {}

  constexpr T* data() const noexcept { return data_; }
  constexpr const extents_type& extents() const noexcept { return extents_; }
  constexpr const strides_type& strides() const noexcept { return strides_; }
  constexpr std::size_t extent(std::size_t r) const noexcept { return extents_[r]; }
  constexpr std::ptrdiff_t stride(std::size_t r) const noexcept { return strides_[r]; }
  constexpr static std::size_t rank() noexcept { return Rank; }

  constexpr std::size_t size() const noexcept {
    std::size_t n = 1;
    for (std::size_t e : extents_) n *= e;
    return n;
  }

  template <class... I>
    requires(sizeof...(I) == Rank && (std::is_integral_v<I> && ...))
  constexpr T& operator()(I... indices) const noexcept { return *pointer(indices...); }

  // Address of an element; with fewer indices than Rank, the start of that sub-block.
  template <class... I>
    requires(sizeof...(I) <= Rank && (std::is_integral_v<I> && ...))
  constexpr T* pointer(I... indices) const noexcept {
    const std::array<std::ptrdiff_t, sizeof...(I)> idx{static_cast<std::ptrdiff_t>(indices)...};
    std::ptrdiff_t offset = 0;
    for (std::size_t r = 0; r < sizeof...(I); ++r) offset += idx[r] * strides_[r];
    return data_ + offset;
  }

 private:
  T* data_ = nullptr;
  extents_type extents_{};
  strides_type strides_{};
};

// K, V and queries cross the API as [heads][tokens][head_dim]; head_dim must be contiguous.
template <class T>
using HeadsView = View<const T, 3>;

template <class T>
using MutableHeadsView = View<T, 3>;

}  // namespace kvc
