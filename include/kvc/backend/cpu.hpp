// kvc/backend/cpu.hpp — backend::Cpu: pages in host memory, kernels from kvc/simd (xsimd).
//
// Pages are 64-byte aligned (one cache line; the widest AVX-512 load) so kernels can
// stream them. The SIMD instruction set is fixed at compile time by xsimd's default
// architecture (-march); kvc::simd::arch_name() says which one was compiled in.
#pragma once

#include <cstddef>
#include <new>
#include <string_view>

namespace kvc::backend {

struct Cpu {
  static constexpr bool host_accessible = true;
  static constexpr std::size_t alignment = 64;
  static constexpr std::string_view name() noexcept { return "cpu"; }

  std::byte* allocate(std::size_t bytes) const {
    return static_cast<std::byte*>(::operator new (bytes, std::align_val_t{alignment}));
  }
  void deallocate(std::byte* pointer, std::size_t bytes) const noexcept {
    ::operator delete (pointer, bytes, std::align_val_t{alignment});
  }
};

}  // namespace kvc::backend
