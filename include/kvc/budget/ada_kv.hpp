// kvc/budget/ada_kv.hpp — budget::AdaKV: one budget per layer, split across its kv heads by
// the scorer's scores.
//
// Paper:      Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget
//             Allocation for Efficient LLM Inference", 2024 (arXiv 2407.11550); reference:
//             kvpress AdaKVPress (reviewed by the paper's first author).
// Keeps:      with B = the cache budget resolved for the tokens seen (LayerPlan::base_budget)
//             and H kv heads, the layer keeps H·B tokens in all:
//               1. each head first keeps its top f = ⌊α·B⌋ tokens (all of them if it holds
//                  fewer): the safeguard that no head is starved;
//               2. the other H·B − Σ_h min(stored_h, f) slots go to the highest scores
//                  among the tokens not yet kept, across every head of the layer.
//             A head's budget is what it got in 1 + 2, and the cache keeps that head's
//             `budget` highest scores — the same tokens. Heads whose attention is spread
//             out take slots from heads whose attention is concentrated. The heads end with
//             different lengths: real ragged storage (a head's pages hold its budget, and
//             stats() counts exactly those bytes). A layer holding ≤ H·B tokens is not
//             touched (every head keeps all it holds).
// Needs:      a scorer whose scores are comparable across the kv heads of a layer —
//             normalized attention mass, which is what the paper allocates:
//               SnapKV, CakeIndicator (pooled window-query softmax), H2O, Keyformer
//               (softmax accumulated over the same queries for every head), TOVA (the last
//               query's softmax), ExpectedAttention (softmax of the expected logits).
//             Scores on another scale per head make the split meaningless though it still
//             runs: Knorm (−‖k‖, whose scale differs per head), KeyDiff (−cosine),
//             LazyEviction (steps), StreamingLLM (positions: the same in every head, so the
//             split is uniform), External (whatever the host supplies). The cache hands
//             the scores over (PlansFromScores: LayerPlan::scores), so any scorer works.
// Cost:       per compression of a layer, the cache scores every kv head (not only the
//             heads over budget), then O(Σ_h n_h) here (one selection per head for the
//             floor, one across the layer for the rest; a scratch of 12 bytes per stored
//             token, kept between calls). The over-budget check is O(H) (see Choices).
//             Memory: the same tokens (code bytes) as Uniform, but each ragged head's last
//             page is partly empty: up to page_tokens − 1 slots more page memory per head
//             than Uniform at a page-aligned B (stats().page_bytes shows it).
// When:       every compression (prefill and decode). With a token budget during decode,
//             CacheOptions::eviction_slack spreads the cost over several steps.
// Defaults:   α = 0.2 (the paper's safeguard, kvpress alpha_safeguard).
// Choices:
//   * Pinned and dropped tokens. +inf scores ("must keep": SnapKV's window, H2O's recent
//     tokens) rank above every finite score, so they fill the head's floor first, then take
//     slots of step 2 before any finite score. −inf (and NaN, which the cache maps to −inf)
//     ranks last: such a token gets a slot only when the layer has fewer other tokens than
//     slots, as in a head under budget::Uniform.
//   * Ties. Within a head the newer token wins (the cache's rule). Across heads, equal
//     scores go first to the token that is newer *in its own head* (fewer slots from that
//     head's end), then to the lower head: pinned recent windows of unequal heads are
//     shared round-robin when they alone exceed H·B.
//   * α·B is computed in double and truncated (kvpress int(n_kept · alpha_safeguard)); a
//     head holding fewer than ⌊α·B⌋ tokens keeps them all and its unused floor goes to
//     step 2, so Σ budgets = min(H·B, Σ stored).
//   * Step 2 is kvpress's "raise the floor tokens to the maximum score, keep the layer's
//     H·B best": the same sets. The paper's Ada-SnapKV keeps the observation window
//     outside the budget; kvc's SnapKV pins it inside B (+inf), so the window is paid from
//     the head's floor and step 2 like any pinned token.
//   * Layers. B is the same for every layer (AdaKV splits within a layer); Ada-PyramidKV's
//     per-layer B would need the two planners composed, which kvc does not do.
//   * GQA. Scores are per kv head (the cache's storage granularity), the group already
//     reduced by the scorer; the paper's GQA branch does the same.
//   * Over-budget check. Without scores (the check the cache runs at every append/attend
//     with auto_compress) the split is unknown; plan_layer then lets each head give up an
//     equal share of the layer's excess Σ stored − H·B (any share a head cannot give goes
//     to the longest head). A head is then "over budget + slack" exactly when the layer
//     holds more than H·(B + slack) tokens (when each head holds at least its share): the
//     same cadence as budget::Uniform, though the heads are ragged.
#pragma once

#include <kvc/core/error.hpp>
#include <kvc/core/events.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

namespace kvc::budget {

class AdaKV {
 public:
  struct Options {
    double alpha = 0.2;  // α: each head's floor is ⌊α·B⌋ of its own best tokens, 0 ≤ α ≤ 1
  };

  static constexpr std::string_view name() noexcept { return "ada_kv"; }
  // PlansFromScores: compressing a layer hands this planner every head's scores.
  static constexpr bool wants_scores() noexcept { return true; }

  AdaKV() = default;
  explicit AdaKV(Options options) : options_(options) {
    if (!(options_.alpha >= 0.0 && options_.alpha <= 1.0)) {
      detail::fail<BudgetError>("AdaKV: alpha {} is outside [0, 1]", options_.alpha);
    }
  }
  const Options& options() const noexcept { return options_; }

  // f = ⌊α·B⌋: the tokens each head keeps of its own before the layer-wide selection.
  std::size_t floor_budget(std::size_t base_budget) const noexcept {
    const double floor = std::floor(options_.alpha * static_cast<double>(base_budget));
    return std::min(base_budget, static_cast<std::size_t>(floor));
  }

  void plan_layer(const LayerPlan& plan, std::span<std::size_t> head_budgets) {
    const std::size_t heads = head_budgets.size();
    std::size_t total = 0;
    for (std::size_t h = 0; h < heads; ++h) total += stored(plan, h);
    // Nothing to evict: every head keeps what it holds (also covers an unlimited budget).
    if (plan.base_budget >= total || plan.base_budget * heads >= total) {
      for (std::size_t h = 0; h < heads; ++h) head_budgets[h] = stored(plan, h);
      return;
    }
    const std::size_t capacity = plan.base_budget * heads;
    if (plan.scores.size() != heads) {
      share_excess(plan, head_budgets, total - capacity);
    } else {
      allocate(plan, head_budgets, capacity);
    }
  }

 private:
  // A token competing for the layer-wide slots of step 2.
  struct Candidate {
    float score;
    std::uint32_t from_end;  // slots between it and its head's newest token (0 = newest)
    std::uint32_t head;
  };

  static std::size_t stored(const LayerPlan& plan, std::size_t h) noexcept {
    return h < plan.stored.size() ? plan.stored[h] : 0;
  }

  // Without scores: each head gives up an equal share of `excess`; what a head cannot give
  // (it holds less than its share) is taken from the longest head.
  static void share_excess(const LayerPlan& plan, std::span<std::size_t> head_budgets,
                           std::size_t excess) noexcept {
    const std::size_t heads = head_budgets.size();
    std::size_t left = 0;
    std::size_t longest = 0;
    for (std::size_t h = 0; h < heads; ++h) {
      const std::size_t share = excess / heads + (h < excess % heads ? 1 : 0);
      const std::size_t given = std::min(stored(plan, h), share);
      head_budgets[h] = stored(plan, h) - given;
      left += share - given;
      if (stored(plan, h) > stored(plan, longest)) longest = h;
    }
    head_budgets[longest] -= std::min(head_budgets[longest], left);
  }

  void allocate(const LayerPlan& plan, std::span<std::size_t> head_budgets, std::size_t capacity) {
    const std::size_t heads = head_budgets.size();
    const std::size_t floor = floor_budget(plan.base_budget);
    candidates_.clear();
    std::size_t slots = capacity;  // left for step 2
    for (std::size_t h = 0; h < heads; ++h) {
      const std::span<const float> scores = plan.scores[h];
      const std::size_t n = scores.size();
      const std::size_t kept = std::min(n, floor);
      head_budgets[h] = kept;
      slots -= kept;
      // Step 1: the head's `kept` best (score, then newer) go first; the rest compete.
      order_.resize(n);
      for (std::size_t slot = 0; slot < n; ++slot) order_[slot] = static_cast<std::uint32_t>(slot);
      const auto better = [&](std::uint32_t a, std::uint32_t b) {
        if (scores[a] != scores[b]) return scores[a] > scores[b];
        return a > b;
      };
      std::nth_element(order_.begin(), order_.begin() + static_cast<std::ptrdiff_t>(kept),
                       order_.end(), better);
      for (std::size_t i = kept; i < n; ++i) {
        const std::uint32_t slot = order_[i];
        candidates_.push_back({scores[slot], static_cast<std::uint32_t>(n - 1 - slot),
                               static_cast<std::uint32_t>(h)});
      }
    }
    // Step 2: the `slots` best remaining tokens of the layer.
    slots = std::min(slots, candidates_.size());
    const auto better = [](const Candidate& a, const Candidate& b) {
      if (a.score != b.score) return a.score > b.score;
      if (a.from_end != b.from_end) return a.from_end < b.from_end;
      return a.head < b.head;
    };
    std::nth_element(candidates_.begin(), candidates_.begin() + static_cast<std::ptrdiff_t>(slots),
                     candidates_.end(), better);
    for (std::size_t i = 0; i < slots; ++i) ++head_budgets[candidates_[i].head];
  }

  Options options_{};
  std::vector<Candidate> candidates_;  // scratch, reused across calls
  std::vector<std::uint32_t> order_;
};

}  // namespace kvc::budget
