// kvc/evict/cake_indicator.hpp — evict::CakeIndicator: CAKE's eviction indicator, the
// mean plus γ × the variance of window attention.
//
// Paper:      Qin et al., "CAKE: Cascading and Adaptive KV Cache Eviction with Layer
//             Preferences", ICLR 2025 (arXiv 2503.12491); reference: antgroup/cakekv,
//             cake/cake_cache.py.
// Keeps:      the w newest tokens (the observation window, +inf) and the B − w prefix
//             tokens with the highest score
//               s_i = mean_{a ∈ group} pool_t( mean_j A_a(j, t) + γ·var_j A_a(j, t) )[i]
//             over the last w window queries j, where A_a(j, ·) is the softmax of query
//             head a's window query j over all stored keys (causal only inside the window)
//             and var is the unbiased variance over the window rows: tokens that are
//             attended much, or unsteadily (their attention shifts between queries), stay.
//             The budget B includes the window.
// Needs:      the window queries, as SnapKV: observe(seq, layer, q_window) with the last w
//             appended queries (post-RoPE); the cache hands their softmax here.
// Cost:       O(g·w·n) per kv head and observe (mean and variance over the window rows),
//             O(k·n) pooling; O(n) per compression. One float per observed token of state.
// When:       prefill: append the prompt, observe, then attend or compress(seq); any later
//             observe re-scores every stored token.
// Defaults:   window 32, kernel 5, γ = 200 (cakekv pred_cake.py: window 32, gamma 200;
//             the average pooling kernel 5 is hard-coded there).
// Choices:
//   * This is CAKE's token score only. CAKE's layer budgets (P_l = H_l^(1/τ1)·V_l^(1/τ2)
//     from the entropy and variance of each layer's window attention, re-split as each
//     layer is prefilled) are a budget planner, not part of this scorer.
//   * Order of the reductions (cakekv): per query head, the indicator over the window
//     rows, average pooling over the prefix tokens (zero padding, divisor = kernel), then
//     the mean over the GQA group (pooling and the mean commute). Official CAKE keeps
//     its cache at query-head granularity; kvc stores per kv head and averages the group
//     as kvpress's port does (KVCache-Factory's port takes the max over the group).
//   * With a single window row the unbiased variance is undefined (torch gives NaN); kvc
//     uses 0, i.e. the score is the row's attention alone.
//   * As SnapKV: the window is the last w' = min(window, queries observed) stored slots at
//     observe time; tokens appended after the last observe score +inf until the next one;
//     a head never observed keeps its newest tokens. CAKE's decode phase (every step, the
//     current query's pooled attention) is SnapKV's decode behaviour here: observe the
//     last queries and compress to re-score.
#pragma once

#include <kvc/core/error.hpp>
#include <kvc/core/events.hpp>
#include <kvc/evict/window_votes.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string_view>
#include <vector>

namespace kvc::evict {

class CakeIndicator : public detail::WindowVotes {
 public:
  struct Options {
    std::size_t window = 32;  // observation window w (included in the budget)
    std::size_t kernel = 5;   // average pooling kernel, odd
    double gamma = 200.0;     // weight of the variance
  };
  using HeadState = detail::WindowVotesState;
  static constexpr bool evicts = true;
  static constexpr std::string_view name() noexcept { return "cake_indicator"; }

  CakeIndicator() = default;
  explicit CakeIndicator(Options options) : options_(checked(options)) {}
  const Options& options() const noexcept { return options_; }

  void on_append(HeadState&, const AppendEvent&) const noexcept {}

  void on_observe(HeadState& state, const ObserveEvent& event) const {
    const auto [n, window, prefix, group] = detail::begin_votes(state, event, options_.window);
    if (prefix == 0) return;

    std::vector<double> sum(prefix), square(prefix), indicator(prefix), group_sum(prefix, 0.0);
    const auto rows = static_cast<double>(window);
    for (std::size_t a = 0; a < group; ++a) {
      // Mean and unbiased variance over the last `window` rows of query head a.
      std::fill(sum.begin(), sum.end(), 0.0);
      std::fill(square.begin(), square.end(), 0.0);
      for (std::size_t j = event.window - window; j < event.window; ++j) {
        const float* row = event.weights.data() + (a * event.window + j) * n;
        for (std::size_t t = 0; t < prefix; ++t) {
          const double x = row[t];
          sum[t] += x;
          square[t] += x * x;
        }
      }
      for (std::size_t t = 0; t < prefix; ++t) {
        const double mean = sum[t] / rows;
        const double variance =
            window > 1 ? std::max(0.0, (square[t] - rows * mean * mean) / (rows - 1.0)) : 0.0;
        indicator[t] = mean + options_.gamma * variance;
      }
      detail::pool_into(indicator, group_sum, options_.kernel);
    }
    for (std::size_t t = 0; t < prefix; ++t) {
      state.observed[t] = static_cast<float>(group_sum[t] / static_cast<double>(group));
    }
  }

 private:
  static Options checked(Options options) {
    if (options.window == 0) detail::fail<UnsupportedError>("CakeIndicator: window is 0");
    if (options.kernel % 2 == 0) {
      detail::fail<UnsupportedError>(
          "CakeIndicator: kernel {} is even, pooling needs an odd kernel", options.kernel);
    }
    if (!(options.gamma >= 0.0)) {
      detail::fail<UnsupportedError>("CakeIndicator: gamma {} is negative", options.gamma);
    }
    return options;
  }

  Options options_{};
};

}  // namespace kvc::evict
