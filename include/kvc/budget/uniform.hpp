// kvc/budget/uniform.hpp — budget::Uniform: every (layer, kv head) keeps the same budget.
//
// Keeps:      B tokens per head in every layer (B = the cache budget resolved for the
//             tokens seen).
// Needs:      nothing.
// Cost:       O(kv_heads) per layer compression.
// Paper:      the default of every eviction paper (SnapKV, H2O, StreamingLLM).
#pragma once

#include <kvc/core/events.hpp>

#include <algorithm>
#include <cstddef>
#include <span>
#include <string_view>

namespace kvc::budget {

struct Uniform {
  static constexpr std::string_view name() noexcept { return "uniform"; }

  void plan_layer(const LayerPlan& plan, std::span<std::size_t> head_budgets) const noexcept {
    std::fill(head_budgets.begin(), head_budgets.end(), plan.base_budget);
  }
};

}  // namespace kvc::budget
