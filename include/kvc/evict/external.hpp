// kvc/evict/external.hpp — evict::External: the host scores each token (Locret-style).
//
// Paper:      Huang et al., "Locret: Enhancing Eviction in Long-Context LLM Inference with
//             Trained Retaining Heads", 2024 (arXiv 2410.01805).
// Keeps:      the first `sink` (4) positions and the `recent` (64) newest tokens (+inf),
//             plus the tokens with the highest host-supplied scores. A token's score is
//             fixed when it is appended (Locret's retaining heads predict it once, from
//             the token's own q, k, v) and never changes.
// Needs:      one score per appended token and kv head, handed to the scorer before the
//             append it belongs to:
//               for (kv_head …) cache.scorer().supply(layer, kv_head, scores);  // count floats
//               cache.append(seq, layer, k, v);
//             No queries, no attention weights.
// Cost:       O(count) per supply and per append; O(n) per compression. One float per
//             stored token of state.
// When:       prefill chunks and decode, whenever a head is over budget.
// Defaults:   sink = 4, recent = 64, unscored = −inf.
// Choices:
//   * Supplied scores belong to the scorer, not to a sequence: the next append of that
//     (layer, kv head), of whichever sequence, takes them. Supply right before the append.
//     A second supply before the append replaces the first.
//   * A token without a supplied score — nothing supplied, or a supply whose length is not
//     the append's token count (then none of its scores is used) — gets Options::unscored
//     (−inf: evicted first once it is past the sinks and the recent window; +inf would keep
//     such tokens, 0 rank them as neutral). on_append cannot throw without leaving the
//     cache half-appended, so the mismatch is counted instead: HeadState::unscored.
//   * supply() rejects NaN (ValueError) and an empty span (ShapeError); ±inf are allowed
//     and pin or drop a token like any other score.
//   * Locret's "stabilizers" keep the last tokens of each prefill chunk (except the last
//     chunk's); kvc's recent window keeps the newest tokens of the head: the same set when
//     the prompt is appended chunk by chunk, compressed after each, and recent ≤ the chunk.
//     Locret has no sinks; ALGORITHMS.md's External keeps them (sink = 0 turns them off).
#pragma once

#include <kvc/core/error.hpp>
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

class External {
 public:
  struct Options {
    std::size_t sink = 4;                                      // first positions, always kept
    std::size_t recent = 64;                                   // newest tokens, always kept
    float unscored = -std::numeric_limits<float>::infinity();  // score of an unscored token
  };
  struct HeadState {
    std::vector<float> scores;  // per stored token, storage order
    std::size_t unscored = 0;   // tokens ever appended without a supplied score
  };
  static constexpr bool evicts = true;
  static constexpr std::string_view name() noexcept { return "external"; }

  External() = default;
  explicit External(Options options) : options_(options) {}
  const Options& options() const noexcept { return options_; }

  // Scores for the tokens the next append(…, layer, …) brings to `kv_head`, in order.
  // Copied: the span is not retained.
  void supply(std::size_t layer, std::size_t kv_head, std::span<const float> scores) {
    if (scores.empty())
      detail::fail<ShapeError>("supply: 0 scores for layer {} kv head {}", layer, kv_head);
    for (std::size_t i = 0; i < scores.size(); ++i) {
      if (std::isnan(scores[i])) {
        detail::fail<ValueError>("supply: scores[{}] is NaN (layer {} kv head {})", i, layer,
                                 kv_head);
      }
    }
    if (pending_.size() <= layer) pending_.resize(layer + 1);
    if (pending_[layer].size() <= kv_head) pending_[layer].resize(kv_head + 1);
    Pending& pending = pending_[layer][kv_head];
    pending.scores.assign(scores.begin(), scores.end());
    pending.set = true;
  }

  // Whether scores supplied for (layer, kv_head) still wait for an append.
  bool supplied(std::size_t layer, std::size_t kv_head) const noexcept {
    return layer < pending_.size() && kv_head < pending_[layer].size() &&
           pending_[layer][kv_head].set;
  }

  void on_append(HeadState& state, const AppendEvent& event) {
    Pending* pending =
        supplied(event.layer, event.kv_head) ? &pending_[event.layer][event.kv_head] : nullptr;
    if (pending != nullptr && pending->scores.size() == event.count) {
      state.scores.insert(state.scores.end(), pending->scores.begin(), pending->scores.end());
    } else {
      state.scores.resize(state.scores.size() + event.count, options_.unscored);
      state.unscored += event.count;
    }
    if (pending != nullptr) {
      pending->set = false;
      pending->scores.clear();
    }
  }

  void score(const HeadState& state, const ScoreContext& context,
             std::span<float> scores) const noexcept {
    constexpr float keep = std::numeric_limits<float>::infinity();
    const std::size_t n = std::min(scores.size(), state.scores.size());
    const std::size_t recent = std::min(options_.recent, n);
    for (std::size_t i = 0; i < n - recent; ++i) {
      scores[i] =
          static_cast<std::size_t>(context.positions[i]) < options_.sink ? keep : state.scores[i];
    }
    std::fill(scores.begin() + static_cast<std::ptrdiff_t>(n - recent), scores.end(), keep);
  }

  void on_compact(HeadState& state, std::span<const std::uint32_t> kept) const noexcept {
    for (std::size_t k = 0; k < kept.size(); ++k) state.scores[k] = state.scores[kept[k]];
    state.scores.resize(kept.size());
  }

  std::size_t state_bytes(const HeadState& state) const noexcept {
    return state.scores.capacity() * sizeof(float);
  }

 private:
  struct Pending {
    std::vector<float> scores;
    bool set = false;
  };

  Options options_{};
  std::vector<std::vector<Pending>> pending_;  // [layer][kv_head]
};

}  // namespace kvc::evict
