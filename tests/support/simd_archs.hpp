// tests/support/simd_archs.hpp — the xsimd archs a SIMD test runs each kernel on: the
// default one and the narrower x86 ones the target also supports, so one -march=native
// build checks the AVX-512, AVX2 and SSE2 paths.
#pragma once

#include <xsimd/xsimd.hpp>

#include <tuple>

namespace kvc::test {

using tested_archs = std::tuple<xsimd::default_arch
#if defined(__AVX512BW__) && defined(__FMA__)
                                ,
                                xsimd::fma3<xsimd::avx2>, xsimd::sse2
#elif defined(__AVX2__)
                                ,
                                xsimd::sse2
#endif
                                >;

template <class Check>
void for_each_arch(Check&& check) {
  std::apply([&](auto... arch) { (check(arch), ...); }, tested_archs{});
}

}  // namespace kvc::test
