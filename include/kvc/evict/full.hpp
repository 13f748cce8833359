// kvc/evict/full.hpp — evict::Full, the do-nothing eviction scorer: every token is kept.
//
// Keeps:      everything.
// Needs:      nothing from the host.
// Cost/step:  zero; its HeadState is empty and costs no memory.
// Paper:      none — the uncompressed baseline every method is measured against.
// A KvCache with evict::Full rejects a finite budget (BudgetError) instead of silently
// ignoring it.
#pragma once

#include <kvc/core/events.hpp>

#include <cstdint>
#include <limits>
#include <span>
#include <string_view>

namespace kvc::evict {

struct Full {
  struct HeadState {};
  static constexpr bool evicts = false;
  static constexpr std::string_view name() noexcept { return "full"; }

  void on_append(HeadState&, const AppendEvent&) noexcept {}
  void score(const HeadState&, const ScoreContext&, std::span<float> scores) const noexcept {
    for (float& s : scores) s = std::numeric_limits<float>::infinity();
  }
  void on_compact(HeadState&, std::span<const std::uint32_t>) noexcept {}
};

}  // namespace kvc::evict
