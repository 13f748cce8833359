// kvc/evict/snapkv.hpp — evict::SnapKV: pooled window-query attention + the window itself.
//
// Paper:      Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation",
//             NeurIPS 2024 (arXiv 2404.14469).
// Keeps:      the w newest tokens (the observation window, always kept: score +inf) and
//             the B − w prefix tokens with the highest score
//               s_i = mean_{a ∈ group} pool_t( mean_{j ∈ window} A_a(j, t) )[i]
//             where A_a(j, ·) is the softmax of query head a's window query j over *all*
//             stored keys (causal only inside the window). The budget B includes the
//             window (SnapKV's max_capacity_prompt convention).
// Needs:      the window queries: the host calls observe(seq, layer, q_window) with the
//             last w appended queries (post-RoPE); the cache hands their softmax here.
// Cost:       O(g·w·n) per kv head and observe (the mean over the window rows), O(k·n)
//             pooling; O(n) per compression. One float per observed token of state.
// When:       prefill: append the prompt, observe, then attend (auto_compress compresses
//             at its end) or compress(seq). Any later observe re-scores every stored token
//             (kvpress DecodingPress style: observe the last w queries, then compress).
// Defaults:   window 64, kernel 5, average pooling (kvpress SnapKVPress). The official
//             code's LongBench configs use window 32, kernel 7, max pooling:
//             SnapKV({.window = 32, .kernel = 7, .pooling = SnapKV::Pooling::max}).
// Choices:
//   * Order of the reductions (kvpress snapkv_press.py::score): per query head, the mean
//     over the window rows, then pooling over the prefix tokens, then the mean over the
//     GQA group. Official SnapKV selects per query head with g× memory (repeat_kv); kvc
//     stores per kv head, so the group mean is this policy's group reduction. With average
//     pooling the pool and the group mean commute; with max pooling they do not, and kvc
//     pools before averaging, as kvpress does.
//   * Pooling runs over the prefix (non-window) tokens only, same length: average pooling
//     pads with zeros and always divides by the full kernel (count_include_pad); max
//     pooling pads with −inf. The kernel must be odd.
//   * The window is the last w' = min(window, queries observed) stored slots at observe
//     time (the host appends the window's tokens before observing them); only the last w'
//     window rows are averaged, so a host may pass more queries than the window.
//   * Tokens appended after the last observe have never been scored: they score +inf
//     (kept, like the recent tokens they are) until the next observe re-scores them. With a
//     fixed budget during decode this evicts the lowest-scored observed tokens one per
//     step; official SnapKV compresses once and lets decode tokens grow the cache
//     (use a ratio budget, or observe + compress periodically, for that).
//   * A head that was never observed scores everything +inf: ties keep the newest tokens,
//     i.e. it behaves as a recent window.
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

class SnapKV : public detail::WindowVotes {
 public:
  enum class Pooling { avg, max };
  struct Options {
    std::size_t window = 64;  // observation window w (included in the budget)
    std::size_t kernel = 5;   // pooling kernel, odd
    Pooling pooling = Pooling::avg;
  };
  using HeadState = detail::WindowVotesState;
  static constexpr bool evicts = true;
  static constexpr std::string_view name() noexcept { return "snapkv"; }

  SnapKV() = default;
  explicit SnapKV(Options options) : options_(checked(options)) {}
  const Options& options() const noexcept { return options_; }

  void on_append(HeadState&, const AppendEvent&) const noexcept {}

  void on_observe(HeadState& state, const ObserveEvent& event) const {
    const auto [n, window, prefix, group] = detail::begin_votes(state, event, options_.window);
    if (prefix == 0) return;

    std::vector<double> row_mean(prefix), group_sum(prefix, 0.0);
    for (std::size_t a = 0; a < group; ++a) {
      // Mean over the last `window` rows of query head a (rows a·W + j, j < W).
      std::fill(row_mean.begin(), row_mean.end(), 0.0);
      for (std::size_t j = event.window - window; j < event.window; ++j) {
        const float* row = event.weights.data() + (a * event.window + j) * n;
        for (std::size_t t = 0; t < prefix; ++t) row_mean[t] += row[t];
      }
      for (double& x : row_mean) x /= static_cast<double>(window);
      detail::pool_into(row_mean, group_sum, options_.kernel, options_.pooling == Pooling::max);
    }
    for (std::size_t t = 0; t < prefix; ++t) {
      state.observed[t] = static_cast<float>(group_sum[t] / static_cast<double>(group));
    }
  }

 private:
  static Options checked(Options options) {
    if (options.window == 0) detail::fail<UnsupportedError>("SnapKV: window is 0");
    if (options.kernel % 2 == 0) {
      detail::fail<UnsupportedError>("SnapKV: kernel {} is even, pooling needs an odd kernel",
                                     options.kernel);
    }
    return options;
  }

  Options options_{};
};

}  // namespace kvc::evict
