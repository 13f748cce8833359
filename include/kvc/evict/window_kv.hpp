// kvc/evict/window_kv.hpp — evict::WindowKV: whole windows of consecutive tokens, ranked by
// the sum of their SnapKV votes, + the observation window.
//
// Paper:      Zuo et al., "WindowKV: Task-Adaptive Group-Wise KV Cache Window Selection for
//             Efficient LLM Inference", 2025 (arXiv 2503.17922).
// Keeps:      the w newest tokens (the observation window, always kept: score +inf) and
//             whole windows of c consecutive positions: window j = positions
//             [j·c, (j + 1)·c); its score is
//               S_j = Σ_{i ∈ window j, i observed, i outside the observation window} s_i
//             with s_i the SnapKV score (evict/snapkv.hpp: per query head the mean of the
//             window rows, pooling over the prefix, the mean over the GQA group). Every
//             token of window j scores S_j, so the budget B (window included) keeps the
//             observation window and then the windows with the highest S_j, whole.
// Needs:      the window queries: observe(seq, layer, q_window), as for SnapKV.
// Cost:       observe: O(g·w·n + k·n) per kv head (SnapKV's); compression: O(n) to sum the
//             windows. One float per observed token of state (SnapKV's).
// When:       prefill (observe, then compress or attend with auto_compress); any later
//             observe re-scores every stored token, as for SnapKV.
// Defaults:   c = 8 (the paper's window size), observation window 64, kernel 5, average
//             pooling (kvc's SnapKV defaults).
// Choices:
//   * Windows are cut by absolute position (position / c), not by storage slot: a window is
//     the same c positions at every compression, whatever was evicted before it. After a
//     first compression the stored tokens are whole windows (and at most one partial one,
//     below), so a later compression ranks the same windows again.
//   * Budget not a multiple of c: the cache keeps exactly B tokens, so after the whole
//     windows that fit, the next-ranked window is kept in part — its newest tokens (equal
//     scores: the newer token wins). Likewise the window the observation window starts in
//     is scored over its tokens before the observation window only; its other tokens are
//     the observation window's (+inf).
//   * No tie-break is added: all tokens of a window share one float score, and equal
//     scores rank the newer token first, so in the cache's order the tokens of one window
//     are always consecutive — two windows with the same score are ranked whole, newer
//     window first. A per-token offset could only split windows.
//   * Tokens appended after the last observe (decode tokens) are unobserved and score
//     +inf, as in SnapKV; a window holding observed and unobserved tokens sums its
//     observed ones.
//   * Not done: the paper's task classifier (it picks, per task, between window selection
//     for "localization" tasks and a token-level selection for "aggregation" tasks;
//     kvc always selects windows — use evict::SnapKV for the token-level mode) and the
//     intra-group layer sharing (layers of a group reuse the indices chosen at the group's
//     first layer): kvc keeps a scorer state per (layer, kv head) and compresses each layer
//     on its own, so every layer selects its own windows from its own votes. Its budget
//     allocation across layer groups is a planner's job (budget::PyramidKV is close).
#pragma once

#include <kvc/core/error.hpp>
#include <kvc/core/events.hpp>
#include <kvc/evict/snapkv.hpp>
#include <kvc/evict/window_votes.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string_view>

namespace kvc::evict {

class WindowKV : public detail::WindowVotes {
 public:
  using Pooling = SnapKV::Pooling;
  struct Options {
    std::size_t window = 64;  // observation window w (included in the budget)
    std::size_t kernel = 5;   // SnapKV pooling kernel, odd
    Pooling pooling = Pooling::avg;
    std::size_t block = 8;  // c: consecutive positions per selection window
  };
  using HeadState = detail::WindowVotesState;
  static constexpr bool evicts = true;
  static constexpr std::string_view name() noexcept { return "windowkv"; }

  WindowKV() = default;
  explicit WindowKV(Options options)
      : options_(checked(options)),
        votes_({.window = options.window, .kernel = options.kernel, .pooling = options.pooling}) {}
  const Options& options() const noexcept { return options_; }

  void on_append(HeadState&, const AppendEvent&) const noexcept {}

  // Per-token SnapKV scores, in storage order (the window sums are taken at score time,
  // where the positions are known).
  void on_observe(HeadState& state, const ObserveEvent& event) const {
    votes_.on_observe(state, event);
  }

  // Every observed token scores its window's sum of finite votes; the observation window
  // and unobserved tokens keep +inf.
  void score(const HeadState& state, const ScoreContext& context,
             std::span<float> scores) const noexcept {
    WindowVotes::score(state, context, scores);
    const std::size_t observed = std::min(state.observed.size(), scores.size());
    const auto block = static_cast<Position>(options_.block);
    std::size_t begin = 0;
    while (begin < observed) {
      // Slots ascend in position, so a window's stored tokens are consecutive slots.
      const Position window = context.positions[begin] / block;
      std::size_t end = begin;
      double sum = 0.0;
      for (; end < observed && context.positions[end] / block == window; ++end) {
        if (std::isfinite(scores[end])) sum += scores[end];
      }
      for (std::size_t i = begin; i < end; ++i) {
        if (std::isfinite(scores[i])) scores[i] = static_cast<float>(sum);
      }
      begin = end;
    }
  }

 private:
  static Options checked(Options options) {
    if (options.block == 0) detail::fail<UnsupportedError>("WindowKV: block (window size c) is 0");
    return options;
  }

  Options options_{};
  SnapKV votes_{};  // the per-token scores, exactly SnapKV's
};

}  // namespace kvc::evict
