// kvc/evict/knorm.hpp — evict::Knorm: keep the keys with the smallest L2 norm.
//
// Paper:      Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache
//             Compression", EMNLP 2024 (arXiv 2406.11430).
// Keeps:      the B tokens with the highest score −‖k_i‖₂, i.e. the lowest-norm keys
//             (low key norm goes with high attention). Nothing is protected by default
//             (kvpress KnormPress, KVCache-Factory L2NormCluster); Options::recent keeps the
//             newest `recent` tokens (+inf) for hosts that want them.
// Needs:      keys only (post-RoPE, as the host appends them) — no queries, no attention.
// Cost:       O(d) per appended token (the norm, computed once); O(n) per compression,
//             no key decode. One float per stored token of state.
// When:       any time a head is over budget: prefill and decode.
// Defaults:   recent = 0.
// Choices:    the norm is taken on the host's fp32 keys as they are appended
//             (`wants_appended_keys`) and cached per token, not on the stored keys at
//             scoring time (`scores_stored_keys`): the score of a token never changes, so
//             recomputing it would decode n·d values per compression (every decode step
//             once over budget) to get the same numbers; and the reference scores the
//             unquantized keys, which a lossy quantizer would no longer hold.
#pragma once

#include <kvc/core/events.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string_view>
#include <vector>

namespace kvc::evict {

class Knorm {
 public:
  struct Options {
    std::size_t recent = 0;  // newest tokens always kept (0: none, as in the paper)
  };
  struct HeadState {
    std::vector<float> norms;  // ‖k_i‖₂ per stored token, storage order
  };
  static constexpr bool evicts = true;
  static constexpr bool wants_appended_keys = true;
  static constexpr std::string_view name() noexcept { return "knorm"; }

  constexpr Knorm() noexcept = default;
  constexpr explicit Knorm(Options options) noexcept : options_(options) {}
  constexpr const Options& options() const noexcept { return options_; }

  void on_append(HeadState& state, const AppendEvent& event) const {
    const std::size_t d = event.head_dim;
    state.norms.reserve(state.norms.size() + event.count);
    for (std::size_t t = 0; t < event.count; ++t) {
      double sum = 0.0;
      for (std::size_t c = 0; c < d; ++c) {
        const double x = event.keys[t * d + c];
        sum += x * x;
      }
      state.norms.push_back(static_cast<float>(std::sqrt(sum)));
    }
  }

  void score(const HeadState& state, const ScoreContext&, std::span<float> scores) const noexcept {
    const std::size_t n = std::min(state.norms.size(), scores.size());
    const std::size_t recent = std::min(options_.recent, n);
    for (std::size_t i = 0; i < n - recent; ++i) scores[i] = -state.norms[i];
    for (std::size_t i = n - recent; i < n; ++i) {
      scores[i] = std::numeric_limits<float>::infinity();
    }
  }

  void on_compact(HeadState& state, std::span<const std::uint32_t> kept) const noexcept {
    for (std::size_t k = 0; k < kept.size(); ++k) state.norms[k] = state.norms[kept[k]];
    state.norms.resize(kept.size());
  }

  std::size_t state_bytes(const HeadState& state) const noexcept {
    return state.norms.capacity() * sizeof(float);
  }

 private:
  Options options_{};
};

}  // namespace kvc::evict
