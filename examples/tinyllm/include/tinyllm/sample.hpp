// tinyllm/sample.hpp — picking the next token from a row of logits.
//
//   int next = tinyllm::argmax(logits);                                  // greedy
//   tinyllm::Sampler sampler({.temperature = 0.7F, .top_k = 20, .seed = 7});
//   int next = sampler(logits);                                          // sampled
//
// argmax: the first index of the largest logit. Sampler: temperature ≤ 0 is argmax;
// otherwise the top_k largest logits (0 or ≥ vocab: all of them; ties broken towards the
// lower id) are kept and one is drawn with probability ∝ exp((logit − max) / temperature),
// in double. The draw uses std::mt19937 seeded with `seed` and maps its 32-bit output to
// [0, 1) by hand (not through std::uniform_real_distribution, whose algorithm the standard
// leaves open), so a seed gives the same tokens with every standard library.
// Errors (std::invalid_argument): empty logits, a NaN logit. Cost: O(vocab) per call plus
// O(vocab · log k) for top-k; the Sampler reuses its buffers (no allocation once warm).
#pragma once

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <random>
#include <span>
#include <stdexcept>
#include <vector>

namespace tinyllm {

namespace detail {

inline void check_logits(std::span<const float> logits, const char* function) {
  if (logits.empty()) throw std::invalid_argument(fmt::format("{}: no logits", function));
  for (std::size_t i = 0; i < logits.size(); ++i) {
    if (std::isnan(logits[i])) {
      throw std::invalid_argument(fmt::format("{}: logits[{}] is NaN", function, i));
    }
  }
}

}  // namespace detail

// Greedy decoding: the first index of the largest logit.
inline int argmax(std::span<const float> logits) {
  detail::check_logits(logits, "argmax");
  return static_cast<int>(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

struct SamplerOptions {
  float temperature = 1.0F;  // ≤ 0: greedy
  std::size_t top_k = 0;     // 0: no truncation
  std::uint32_t seed = 0;
};

class Sampler {
 public:
  using Options = SamplerOptions;

  explicit Sampler(Options options = {}) : options_(options), rng_(options.seed) {}

  const Options& options() const noexcept { return options_; }

  int operator()(std::span<const float> logits) {
    detail::check_logits(logits, "Sampler");
    if (!(options_.temperature > 0.0F)) return argmax(logits);

    candidates_.resize(logits.size());
    for (std::size_t i = 0; i < logits.size(); ++i) candidates_[i] = static_cast<int>(i);
    const auto higher = [&](int a, int b) {
      const float la = logits[static_cast<std::size_t>(a)];
      const float lb = logits[static_cast<std::size_t>(b)];
      return la > lb || (la == lb && a < b);
    };
    std::size_t kept = logits.size();
    if (options_.top_k > 0 && options_.top_k < logits.size()) {
      kept = options_.top_k;
      std::partial_sort(candidates_.begin(),
                        candidates_.begin() + static_cast<std::ptrdiff_t>(kept), candidates_.end(),
                        higher);
    }
    const auto top = *std::min_element(
        candidates_.begin(), candidates_.begin() + static_cast<std::ptrdiff_t>(kept), higher);
    const double max = logits[static_cast<std::size_t>(top)];
    if (std::isinf(max)) {
      // All kept logits are ±inf or the largest is +inf: the largest one wins outright.
      return top;
    }

    weights_.resize(kept);
    double total = 0.0;
    for (std::size_t i = 0; i < kept; ++i) {
      const double logit = logits[static_cast<std::size_t>(candidates_[i])];
      weights_[i] = std::exp((logit - max) / static_cast<double>(options_.temperature));
      total += weights_[i];
    }
    const double u = static_cast<double>(rng_()) / 4294967296.0;  // [0, 1)
    double target = u * total;
    int last = top;
    for (std::size_t i = 0; i < kept; ++i) {
      if (weights_[i] == 0.0) continue;
      last = candidates_[i];
      target -= weights_[i];
      if (target < 0.0) return last;
    }
    return last;  // rounding left target >= 0 after the last weight
  }

 private:
  Options options_;
  std::mt19937 rng_;
  std::vector<int> candidates_;
  std::vector<double> weights_;
};

}  // namespace tinyllm
