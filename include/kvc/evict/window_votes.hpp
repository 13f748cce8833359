// kvc/evict/window_votes.hpp — detail::WindowVotes: the state and bookkeeping shared by the
// window-attention scorers (evict::SnapKV, evict::CakeIndicator).
//
// Each head keeps one float per token scored at the last observe, in storage order; slots
// appended since score +inf until the next observe re-scores them. on_observe (the score
// itself) stays with each policy; pool_into is the pooling over the prefix tokens they share.
//
// Lives in kvc::detail, not kvc::evict::detail: a kvc::evict::detail namespace would hide
// kvc::detail::fail from the evict policies' unqualified `detail::fail` calls.
#pragma once

#include <kvc/core/events.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

namespace kvc::detail {

struct WindowVotesState {
  // Score per slot as of the last observe, storage order. Slots past its end were
  // appended since and are unobserved (+inf).
  std::vector<float> observed;
};

// Base of SnapKV and CakeIndicator: score, on_compact and state_bytes over WindowVotesState.
class WindowVotes {
 public:
  void score(const WindowVotesState& state, const ScoreContext&,
             std::span<float> scores) const noexcept {
    const std::size_t observed = std::min(state.observed.size(), scores.size());
    std::copy_n(state.observed.begin(), observed, scores.begin());
    std::fill(scores.begin() + static_cast<std::ptrdiff_t>(observed), scores.end(),
              std::numeric_limits<float>::infinity());
  }

  // Kept slots ascend, and the unobserved slots are the tail of storage, so the kept
  // observed slots stay a prefix of the new storage.
  void on_compact(WindowVotesState& state, std::span<const std::uint32_t> kept) const noexcept {
    std::size_t k = 0;
    for (; k < kept.size() && kept[k] < state.observed.size(); ++k) {
      state.observed[k] = state.observed[kept[k]];
    }
    state.observed.resize(k);
  }

  std::size_t state_bytes(const WindowVotesState& state) const noexcept {
    return state.observed.capacity() * sizeof(float);
  }
};

// What a window-vote scorer reads of an ObserveEvent: the last `window` (≤ the policy's
// window) rows of each of the `group` query heads, over the `prefix` tokens before the
// window, of `tokens` in all. Marks every slot observed and kept (+inf) first, so the
// window, and every slot when prefix is 0, stays.
struct VoteRows {
  std::size_t tokens = 0, window = 0, prefix = 0, group = 0;
};

inline VoteRows begin_votes(WindowVotesState& state, const ObserveEvent& event,
                            std::size_t max_window) {
  VoteRows rows{.tokens = event.tokens};
  state.observed.assign(event.tokens, std::numeric_limits<float>::infinity());
  if (event.window == 0 || event.query_rows == 0) return rows;
  rows.window = std::min(max_window, event.window);
  rows.prefix = event.tokens > rows.window ? event.tokens - rows.window : 0;
  rows.group = event.query_rows / event.window;
  return rows;
}

// out[t] += pool(x)[t], same length, stride 1, padding kernel / 2 (kernel odd). Average
// pooling pads with zeros and divides by the full kernel at the edges too
// (count_include_pad); max pooling pads with −inf.
inline void pool_into(const std::vector<double>& x, std::vector<double>& out, std::size_t kernel,
                      bool max_pooling = false) {
  const std::size_t n = x.size();
  const std::size_t half = kernel / 2;
  for (std::size_t t = 0; t < n; ++t) {
    const std::size_t begin = t >= half ? t - half : 0;
    const std::size_t end = std::min(n, t + half + 1);
    if (!max_pooling) {
      double sum = 0.0;
      for (std::size_t j = begin; j < end; ++j) sum += x[j];
      out[t] += sum / static_cast<double>(kernel);
    } else {
      double best = -std::numeric_limits<double>::infinity();
      for (std::size_t j = begin; j < end; ++j) best = std::max(best, x[j]);
      out[t] += best;
    }
  }
}

}  // namespace kvc::detail
