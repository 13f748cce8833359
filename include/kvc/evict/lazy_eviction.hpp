// kvc/evict/lazy_eviction.hpp — evict::LazyEviction: keep the tokens that are due to recur.
//
// Paper:      "LazyEviction: Lagged KV Eviction with Attention Pattern Observation for
//             Efficient Long Reasoning", 2025 (arXiv 2506.15969). No reference code was
//             available: the rule below is ALGORITHMS.md's reading of the paper.
// Keeps:      the `window` (W) newest tokens, plus the tokens with the highest
//               s_i = MRI_i − (t_now − t_last,i)
//             where, counting steps in attend calls, t_last,i is the last step at which
//             token i was attended, A_i ≥ α/n (α = 1, n = tokens stored at that step), and
//             MRI_i its maximum recurrence interval, the largest gap between two
//             consecutive steps at which it was attended. Tokens still inside their
//             recurrence pattern survive; overdue ones go first.
// Needs:      attention weights — KvCache::attend hands them over.
// Cost:       O(n) per kv head and step to update t_last and MRI; O(n) to score. Two
//             32-bit integers per stored token of state, plus a step counter.
// When:       every W decode steps (lagged eviction): run the cache with
//               CacheOptions{.budget = Budget::tokens(B), .eviction_slack = W − 1}
//             so a head grows to B + W − 1 tokens and is then cut back to B, W tokens at
//             a time (or auto_compress off and compress(seq) every W steps). B includes
//             the W recent tokens.
// Defaults:   window W = 128, α = 1. The paper's W and thresholds are unverified (no code).
// Choices:
//   * A_i is the weight summed over the event's query rows divided by their number: the
//     mean over the GQA group (and over the query tokens of a multi-token attend).
//   * Before its first attended step a token's t_last is the step at which it was
//     appended, and its MRI is 0; the first attended step sets t_last only, later ones
//     also update the MRI (the gap from being appended is not a recurrence). A token
//     never attended thus scores −(its age in steps).
//   * The recent window is pinned with +inf, so it survives whatever the budget, as
//     long as the budget holds it.
#pragma once

#include <kvc/core/error.hpp>
#include <kvc/core/events.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string_view>
#include <vector>

namespace kvc::evict {

class LazyEviction {
 public:
  struct Options {
    std::size_t window = 128;  // W: newest tokens always kept; evict every W steps
    double alpha = 1.0;        // attended: A_i ≥ alpha / n
  };
  struct HeadState {
    std::vector<std::uint32_t> last;     // t_last per stored token, storage order
    std::vector<std::int32_t> interval;  // MRI per stored token; −1 until first attended
    std::uint32_t step = 0;              // attend calls seen by this head
  };
  static constexpr bool evicts = true;
  static constexpr std::string_view name() noexcept { return "lazy_eviction"; }

  LazyEviction() = default;
  explicit LazyEviction(Options options) : options_(checked(options)) {}
  const Options& options() const noexcept { return options_; }

  void on_append(HeadState& state, const AppendEvent& event) const {
    state.last.resize(state.last.size() + event.count, state.step);
    state.interval.resize(state.interval.size() + event.count, -1);
  }

  void on_attention(HeadState& state, const AttentionEvent& event) const noexcept {
    const std::uint32_t now = ++state.step;
    if (event.query_rows == 0) return;
    const std::size_t n = std::min(state.last.size(), event.weights.size());
    // A_i ≥ α/n  ⇔  w_i · n ≥ α · rows.
    const double threshold = options_.alpha * static_cast<double>(event.query_rows);
    const auto count = static_cast<double>(event.weights.size());
    for (std::size_t i = 0; i < n; ++i) {
      if (static_cast<double>(event.weights[i]) * count < threshold) continue;
      if (state.interval[i] >= 0) {
        state.interval[i] =
            std::max(state.interval[i], static_cast<std::int32_t>(now - state.last[i]));
      } else {
        state.interval[i] = 0;
      }
      state.last[i] = now;
    }
  }

  void score(const HeadState& state, const ScoreContext&, std::span<float> scores) const noexcept {
    const std::size_t n = std::min(scores.size(), state.last.size());
    const std::size_t recent = std::min(options_.window, n);
    const auto now = static_cast<std::int64_t>(state.step);
    for (std::size_t i = 0; i < n - recent; ++i) {
      const std::int64_t interval = std::max<std::int32_t>(state.interval[i], 0);
      scores[i] = static_cast<float>(interval - (now - static_cast<std::int64_t>(state.last[i])));
    }
    std::fill(scores.begin() + static_cast<std::ptrdiff_t>(n - recent), scores.end(),
              std::numeric_limits<float>::infinity());
  }

  void on_compact(HeadState& state, std::span<const std::uint32_t> kept) const noexcept {
    for (std::size_t k = 0; k < kept.size(); ++k) {
      state.last[k] = state.last[kept[k]];
      state.interval[k] = state.interval[kept[k]];
    }
    state.last.resize(kept.size());
    state.interval.resize(kept.size());
  }

  std::size_t state_bytes(const HeadState& state) const noexcept {
    return state.last.capacity() * sizeof(std::uint32_t) +
           state.interval.capacity() * sizeof(std::int32_t);
  }

 private:
  static Options checked(Options options) {
    if (!(options.alpha >= 0.0)) {
      detail::fail<UnsupportedError>("LazyEviction: alpha {} is negative", options.alpha);
    }
    return options;
  }

  Options options_{};
};

}  // namespace kvc::evict
