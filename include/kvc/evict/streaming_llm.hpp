// kvc/evict/streaming_llm.hpp — evict::StreamingLLM: attention sinks + a recent window.
//
// Paper:      Xiao et al., "Efficient Streaming Language Models with Attention Sinks",
//             ICLR 2024 (arXiv 2309.17453).
// Keeps:      the first `sink` positions ever appended (the attention sinks, default 4)
//             and the most recent B − sink tokens, where B is the head's budget. With a
//             budget B ≤ sink only the first B sinks survive.
// Needs:      nothing from the host (no queries, no attention weights).
// Cost/step:  O(n) to score the n stored tokens when a head is over budget; no state.
// When:       prefill and decode (whenever a head exceeds its budget).
// Choice:     the window is what the budget leaves after the sinks, so one budget knob
//             governs memory; recipes spell it as sink + window.
#pragma once

#include <kvc/core/events.hpp>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string_view>

namespace kvc::evict {

class StreamingLLM {
 public:
  struct Options {
    std::size_t sink = 4;
  };
  struct HeadState {};
  static constexpr bool evicts = true;
  static constexpr std::string_view name() noexcept { return "streaming_llm"; }

  constexpr StreamingLLM() noexcept = default;
  constexpr explicit StreamingLLM(Options options) noexcept : options_(options) {}
  constexpr const Options& options() const noexcept { return options_; }

  void on_append(HeadState&, const AppendEvent&) noexcept {}

  // Sinks score +inf; every other token scores its position, so the newest win.
  void score(const HeadState&, const ScoreContext& context,
             std::span<float> scores) const noexcept {
    const auto sink = static_cast<Position>(options_.sink);
    for (std::size_t i = 0; i < scores.size(); ++i) {
      const Position position = context.positions[i];
      scores[i] =
          position < sink ? std::numeric_limits<float>::infinity() : static_cast<float>(position);
    }
  }

  void on_compact(HeadState&, std::span<const std::uint32_t>) noexcept {}

 private:
  Options options_{};
};

}  // namespace kvc::evict
