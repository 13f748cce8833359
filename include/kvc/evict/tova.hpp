// kvc/evict/tova.hpp — evict::TOVA: keep the tokens the latest query attends to most.
//
// Paper:      Oren et al., "Transformers are Multi-State RNNs", EMNLP 2024
//             (arXiv 2401.06104). TOVA = Token Omission Via Attention.
// Keeps:      the B tokens with the largest attention weight from the *latest* query:
//               s_i = mean over the GQA group's query heads of A(last query, i)
//             Not accumulated over steps: each attend replaces the scores. Nothing is
//             protected, the newest token included (official TOVA can evict the token it
//             just appended).
// Needs:      attention weights — KvCache::attend hands them over (summed over the group
//             and the call's query tokens). Optionally observe(seq, layer, q_last) gives
//             the exact last-query softmax of a prompt (see Choices).
// Cost:       O(n) per kv head and step to copy the weights; O(n) to score. One float per
//             stored token of state.
// When:       every decode step once over budget — one append per step, so one token is
//             evicted per step; and after the prompt.
// Defaults:   none (the budget is the paper's cache size; its example is 512).
// Choices:
//   * Group reduction. Official TOVA averages the last query's weights over *all* query
//     heads of the layer and keeps one index set shared by the layer's kv heads. kvc stores
//     and scores per kv head, and on_attention sees one kv head, so kvc averages over the
//     GQA group only (g query heads): each kv head keeps its own set. With one kv head per
//     layer (or g = q_heads) this is exactly the paper's rule.
//   * A decode step has query_rows == g, so weights / query_rows is exactly the group mean
//     of the last query. For a multi-token attend (a prompt chunk) the event only carries
//     the sum over all rows, so the score becomes the mean over the chunk's queries — a
//     deviation from the reference, which uses the prompt's last query only. For the exact
//     rule, attend the prompt with auto_compress off, then observe(seq, layer, q) with the
//     prompt's last query (on_observe uses the last window row) and compress(seq).
//   * Tokens appended since the last attention have no score yet: +inf (kept until a query
//     has looked at them). Only matters when compression runs between append and attend.
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

class TOVA {
 public:
  struct Options {};
  struct HeadState {
    std::vector<float> latest;  // per stored token: the latest query's group-mean weight
  };
  static constexpr bool evicts = true;
  static constexpr std::string_view name() noexcept { return "tova"; }

  constexpr TOVA() noexcept = default;
  constexpr explicit TOVA(Options) noexcept {}

  void on_append(HeadState& state, const AppendEvent& event) const {
    state.latest.resize(state.latest.size() + event.count, std::numeric_limits<float>::infinity());
  }

  // Weights are summed over the group × the call's query tokens: divide by the row count.
  void on_attention(HeadState& state, const AttentionEvent& event) const noexcept {
    if (event.query_rows == 0) return;
    const float inverse = 1.0F / static_cast<float>(event.query_rows);
    const std::size_t n = std::min(state.latest.size(), event.weights.size());
    for (std::size_t i = 0; i < n; ++i) state.latest[i] = event.weights[i] * inverse;
  }

  // The exact rule for a prompt: the last window row of each group head, averaged.
  void on_observe(HeadState& state, const ObserveEvent& event) const noexcept {
    if (event.window == 0 || event.query_rows == 0) return;
    const std::size_t group = event.query_rows / event.window;
    const std::size_t n = std::min(state.latest.size(), event.tokens);
    std::fill_n(state.latest.begin(), n, 0.0F);
    for (std::size_t a = 0; a < group; ++a) {
      const float* row =
          event.weights.data() + (a * event.window + event.window - 1) * event.tokens;
      for (std::size_t i = 0; i < n; ++i) state.latest[i] += row[i];
    }
    const float inverse = 1.0F / static_cast<float>(group);
    for (std::size_t i = 0; i < n; ++i) state.latest[i] *= inverse;
  }

  void score(const HeadState& state, const ScoreContext&, std::span<float> scores) const noexcept {
    std::copy_n(state.latest.begin(), std::min(state.latest.size(), scores.size()), scores.begin());
  }

  void on_compact(HeadState& state, std::span<const std::uint32_t> kept) const noexcept {
    for (std::size_t k = 0; k < kept.size(); ++k) state.latest[k] = state.latest[kept[k]];
    state.latest.resize(kept.size());
  }

  std::size_t state_bytes(const HeadState& state) const noexcept {
    return state.latest.capacity() * sizeof(float);
  }
};

}  // namespace kvc::evict
