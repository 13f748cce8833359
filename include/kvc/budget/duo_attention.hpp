// kvc/budget/duo_attention.hpp — budget::DuoAttention: retrieval heads keep everything,
// streaming heads sink + recent tokens (the planner half of evict::DuoAttention).
//
// Paper:      Xiao et al., "DuoAttention: Efficient Long-Context LLM Inference with
//             Retrieval and Streaming Heads", 2024 (arXiv 2410.10819).
// Keeps:      per (layer, kv head), from an evict::HeadRoles:
//               retrieval  its stored length (LayerPlan::stored): never over budget, so
//                          never scored nor evicted, whatever the cache budget;
//               streaming  min(sink + recent, B), B = the cache budget resolved for the
//                          tokens seen (SIZE_MAX when unlimited: then sink + recent).
//             The budgets are ragged across the heads of a layer: a streaming head's pages
//             hold sink + recent tokens, a retrieval head's all of them, and stats()
//             counts exactly those bytes.
// Needs:      the roles (the same HeadRoles as the scorer's) and a scorer that keeps sinks
//             + the newest tokens on the streaming heads: evict::DuoAttention with the
//             same sink (evict::StreamingLLM with sink = 64 keeps the same set).
// Cost:       O(kv_heads) per layer plan.
// When:       every compression check (prefill and decode).
// Defaults:   sink 64, recent 256 (DuoAttention's), roles HeadRoles::alternating(2).
// Choices:
//   * The cache budget only caps the streaming heads (a recipe's default budget is
//     sink + recent, so it caps nothing); retrieval heads are never capped, which is the
//     method: their memory grows with the context.
//   * A head outside a HeadRoles table is retrieval (kept whole), as evict::HeadRoles says.
#pragma once

#include <kvc/core/events.hpp>
#include <kvc/evict/duo_attention.hpp>

#include <algorithm>
#include <cstddef>
#include <span>
#include <string_view>
#include <utility>

namespace kvc::budget {

class DuoAttention {
 public:
  struct Options {
    std::size_t sink = 64;     // first positions a streaming head keeps
    std::size_t recent = 256;  // newest tokens a streaming head keeps
  };
  static constexpr std::string_view name() noexcept { return "duo_attention"; }

  DuoAttention() = default;
  explicit DuoAttention(evict::HeadRoles roles) : roles_(std::move(roles)) {}
  DuoAttention(evict::HeadRoles roles, Options options)
      : roles_(std::move(roles)), options_(options) {}
  const evict::HeadRoles& roles() const noexcept { return roles_; }
  const Options& options() const noexcept { return options_; }

  // Tokens a streaming head keeps under the cache budget `base_budget`.
  std::size_t streaming_budget(std::size_t base_budget) const noexcept {
    return std::min(options_.sink + options_.recent, base_budget);
  }

  void plan_layer(const LayerPlan& plan, std::span<std::size_t> head_budgets) const noexcept {
    const std::size_t streaming = streaming_budget(plan.base_budget);
    for (std::size_t h = 0; h < head_budgets.size(); ++h) {
      head_budgets[h] = roles_.retrieval(plan.layer, h)
                            ? (h < plan.stored.size() ? plan.stored[h] : 0)
                            : streaming;
    }
  }

 private:
  evict::HeadRoles roles_ = evict::HeadRoles::alternating(2);
  Options options_{};
};

}  // namespace kvc::budget
