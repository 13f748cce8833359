// kvc/evict/h2o.hpp — evict::H2O: heavy hitters (accumulated attention) + recent tokens.
//
// Paper:      Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference
//             of Large Language Models", NeurIPS 2023 (arXiv 2306.14048).
// Keeps:      the `recent` newest tokens, plus the B − recent tokens with the largest
//             accumulated attention Σ_t A(t, i), summed over every query seen so far
//             (prefill queries included) and over the GQA group's query heads.
// Needs:      attention weights — KvCache::attend computes them in its single pass and
//             hands them over; a host that attends elsewhere gets no heavy-hitter signal.
// Cost/step:  O(n) per kv head to accumulate weights, O(n) to score; one float per
//             stored token of state.
// When:       prefill (the host attends the prompt through the cache, causal, so the
//             accumulated scores are the column sums of the causal attention matrix) and
//             every decode step once a head is over budget (evicting one token per step).
// Choices:    recent = recent_tokens if set, else floor(recent_fraction · B) (the paper's
//             B/2 split by default). Official H2O keeps recent+1 tokens by an off-by-one;
//             kvc keeps exactly `recent`.
#pragma once

#include <kvc/core/events.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string_view>
#include <vector>

namespace kvc::evict {

class H2O {
 public:
  struct Options {
    double recent_fraction = 0.5;   // share of the budget kept as the recent window
    std::size_t recent_tokens = 0;  // if non-zero, overrides recent_fraction
  };
  struct HeadState {
    std::vector<float> accumulated;  // per stored token, storage order
  };
  static constexpr bool evicts = true;
  static constexpr std::string_view name() noexcept { return "h2o"; }

  H2O() = default;
  explicit H2O(Options options) : options_(options) {}
  const Options& options() const noexcept { return options_; }

  std::size_t recent_for(std::size_t budget) const noexcept {
    const std::size_t recent =
        options_.recent_tokens != 0
            ? options_.recent_tokens
            : static_cast<std::size_t>(options_.recent_fraction * static_cast<double>(budget));
    return std::min(recent, budget);
  }

  void on_append(HeadState& state, const AppendEvent& event) const {
    state.accumulated.resize(state.accumulated.size() + event.count, 0.0F);
  }

  void on_attention(HeadState& state, const AttentionEvent& event) const noexcept {
    const std::size_t n = std::min(state.accumulated.size(), event.weights.size());
    for (std::size_t i = 0; i < n; ++i) state.accumulated[i] += event.weights[i];
  }

  void score(const HeadState& state, const ScoreContext& context,
             std::span<float> scores) const noexcept {
    const std::size_t n = scores.size();
    const std::size_t recent = std::min(recent_for(context.budget), n);
    // Stored positions ascend, so the recent window is the tail of storage.
    for (std::size_t i = 0; i < n - recent; ++i) scores[i] = state.accumulated[i];
    for (std::size_t i = n - recent; i < n; ++i) {
      scores[i] = std::numeric_limits<float>::infinity();
    }
  }

  void on_compact(HeadState& state, std::span<const std::uint32_t> kept) const noexcept {
    for (std::size_t k = 0; k < kept.size(); ++k) state.accumulated[k] = state.accumulated[kept[k]];
    state.accumulated.resize(kept.size());
  }

  std::size_t state_bytes(const HeadState& state) const noexcept {
    return state.accumulated.capacity() * sizeof(float);
  }

 private:
  Options options_{};
};

}  // namespace kvc::evict
