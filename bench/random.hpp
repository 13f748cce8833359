// bench/random.hpp — the benchmarks' input data: deterministic, cheap, realistic in scale.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace kvc::bench {

// `count` floats uniform on [−√3, √3) (mean 0, variance 1) from splitmix64: fast enough that
// filling 2 × 32M floats costs well under a second, and the same on every machine. The
// kernels' cost does not depend on the values, only on their being finite.
inline std::vector<float> random_floats(std::size_t count, std::uint64_t seed) {
  std::uint64_t state = seed * 0x9E3779B97F4A7C15ULL;
  std::vector<float> result(count);
  for (float& x : result) {
    std::uint64_t z = (state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z ^= z >> 31;
    const float unit = static_cast<float>(z >> 40) * 0x1.0p-24F;  // [0, 1)
    x = (2.0F * unit - 1.0F) * 1.7320508F;
  }
  return result;
}

}  // namespace kvc::bench
