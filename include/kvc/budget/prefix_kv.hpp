// kvc/budget/prefix_kv.hpp — budget::PrefixKV: one global coverage p; each head keeps the
// shortest prefix of its importance-sorted tokens that covers p of its importance mass.
//
// Paper:      Wang et al., "PrefixKV: Adaptive Prefix KV Cache is What Vision
//             Instruction-Following Models Need for Efficient Generation", 2024
//             (arXiv 2412.03409); reference: THU-MIG/PrefixKV, prefixkv.py (obtain_cdf_num).
// Keeps:      with the scorer's score s_i of every stored token of every (layer, kv head)
//             (LayerPlan::scores: the cache scores every head of every layer for this
//             planner), per head:
//               importance  v_i = s_i for finite s_i > 0, else 0 (negative, −inf, NaN);
//                           s_i = +inf is a pinned token ("must keep"): always kept, outside
//                           the mass;
//               order       v sorted descending, C_k = Σ_{i<k} v_i / Σ v (normalized
//                           cumulative mass of the k best; tokens of zero importance, and
//                           every token of a head with no mass, get C = 1);
//               kept(p)     pins + min{k : C_k ≥ p} (every ranked token if no C_k ≥ p),
//                           i.e. the pins and every token whose mass before it is below p.
//             One p for the whole sequence: the largest p with Σ_{l,h} kept_{l,h}(p) ≤ T,
//             T = Σ_l H·B_l (B_l = the cache budget resolved for layer l: L·H·B with a
//             token budget); the T − Σ kept(p) slots left go to the next tokens whose C
//             equals p exactly (see Choices), so Σ budgets = min(T, Σ stored) exactly. A
//             head's budget is its kept count, and the cache keeps that head's `budget`
//             highest scores — the same tokens. Heads whose importance is spread out keep
//             more, concentrated heads less; real ragged storage (stats() counts it).
// Needs:      a scorer whose scores are non-negative importance masses: SnapKV,
//             CakeIndicator, H2O, TOVA, Keyformer, ExpectedAttention. Scores on another
//             scale (Knorm's −‖k‖: all zero importance here) make the split meaningless,
//             though it still runs. No host call beyond the scorer's: the cache plans when
//             the last layer goes over budget (auto_compress) or at compress(seq).
// Cost:       per plan, the cache scores all N stored tokens of the sequence; here one
//             sort per head, O(N log N), and an O(N) selection of p; a scratch of 24 bytes
//             per stored token, kept between plans. plan_layer is O(H). Sequence state:
//             one size_t per (layer, kv head), a size_t and a byte per layer.
// When:       prefill: layers 0 … L−2 keep everything they hold until the last layer goes
//             over its budget B (append/attend with auto_compress), or until compress(seq)
//             (before the first plan, compress(seq, layer) plans the whole sequence too);
//             then every layer is planned at once and compressed. After that each layer
//             evicts back to its recorded budgets as it grows (decode), and every
//             compression of the last layer re-plans the whole sequence with fresh scores
//             (use CacheOptions::eviction_slack to space the re-plans out).
// Defaults:   none to set (the paper's ratio is the cache budget).
// Choices:
//   * Granularity. The paper's importance is the layer's attention mass per token (mean
//     over heads, summed over the prompt's queries), giving one prefix per layer and the
//     same tokens in every head; kvc's is the scorer's. kvc stores, scores and evicts per
//     kv head, whose scored tokens differ after any eviction, so the rule runs per kv head:
//     each head covers p of its own mass. With identical heads it is the paper's layer
//     prefix; within a layer a diffuse head keeps more than a concentrated one.
//   * Exact search. The reference bisects p until the forgotten count is within 5 of the
//     target, then rescales the counts. Here kept(p) counts the tokens whose C is below p,
//     so the largest p with Σ kept(p) ≤ T is the C at index T − pins (from 0) of all the
//     sequence's C in ascending order: found by selection, no tolerance. Ties at that C
//     (equal cumulative masses in different heads, or zero-importance tokens at C = 1)
//     fill the leftover slots by the token's own normalized importance (higher first),
//     then its rank in its head (lower first), then layer, then kv head (lower first).
//   * Pins. +inf tokens (SnapKV's window, H2O's recent tokens) are kept before any finite
//     token and are not part of the mass. If the pins alone exceed T, they are shared
//     round-robin: every head keeps its first r pins (the largest r that fits), the rest
//     go one each to the heads with more, lower (layer, kv head) first, and p = 0.
//   * Budget mapping. The paper's compression ratio r is kvc's budget: T = (1 − r)·Σ n with
//     Budget::ratio(1 − r), or L·H·B with a token budget. The reference always keeps 4
//     start tokens and the last token (outside the search); in kvc that is the scorer's
//     business (pins).
//   * Decode. The reference fixes each layer's ratio offline and, during decode, drops one
//     token at a fixed distance per step. kvc keeps the recorded budgets (scaled by
//     B_now / B_planned for a budget that changed since the plan, e.g. a ratio budget, and
//     everything for an unlimited one) and lets the scorer pick, re-planning at the last
//     layer. A layer that held no tokens when the sequence was planned is treated as
//     unplanned.
#pragma once

#include <kvc/core/events.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string_view>
#include <vector>

namespace kvc::budget {

class PrefixKV {
 public:
  // Per sequence: the split of the last plan.
  struct SequenceState {
    std::size_t layers = 0;  // layers of the last plan; 0: never planned
    std::size_t kv_heads = 0;
    double coverage = 0.0;                  // p of the last plan
    std::vector<std::size_t> budgets;       // [layer · kv_heads + kv head]
    std::vector<std::size_t> base_budgets;  // [layer]: B_l when planned
    std::vector<std::uint8_t> planned;      // [layer]: 1 if the layer held tokens then
  };

  static constexpr std::string_view name() noexcept { return "prefix_kv"; }

  // Bytes one sequence's state holds (stats().metadata_bytes).
  std::size_t state_bytes(const SequenceState& state) const noexcept {
    return sizeof(SequenceState) +
           (state.budgets.capacity() + state.base_budgets.capacity()) * sizeof(std::size_t) +
           state.planned.capacity();
  }

  // PlansSequence: compressing the last layer (or any layer before the first plan) plans
  // every layer at once.
  bool wants_sequence_plan(const SequenceState& state, const LayerPlan& plan) const noexcept {
    return state.layers == 0 || plan.layer + 1 == plan.geometry.layers;
  }

  void plan_layer(const LayerPlan& plan, const SequenceState& state,
                  std::span<std::size_t> head_budgets) const noexcept {
    const std::size_t heads = head_budgets.size();
    const std::size_t layer = plan.layer;
    if (layer < state.layers && state.planned[layer] != 0 && state.kv_heads == heads) {
      for (std::size_t h = 0; h < heads; ++h) {
        head_budgets[h] =
            scaled(state.budgets[layer * heads + h], state.base_budgets[layer], plan.base_budget);
      }
      return;
    }
    // Not planned yet: only the last layer can go over budget, and its compression plans.
    for (std::size_t h = 0; h < heads; ++h) {
      head_budgets[h] = layer + 1 < plan.geometry.layers
                            ? (h < plan.stored.size() ? plan.stored[h] : 0)
                            : plan.base_budget;
    }
  }

  void plan_sequence(SequenceState& state, const SequencePlan& plan) {
    const std::size_t layers = plan.layers.size();
    const std::size_t heads = plan.geometry.kv_heads;
    state.layers = layers;
    state.kv_heads = heads;
    state.budgets.assign(layers * heads, 0);
    state.base_budgets.assign(layers, 0);
    state.planned.assign(layers, 0);
    std::size_t total = 0;  // T, saturating (an unlimited budget resolves to SIZE_MAX)
    heads_.assign(layers * heads, Head{});
    cumulative_.clear();
    importance_.clear();
    std::size_t pins = 0;
    for (std::size_t layer = 0; layer < layers; ++layer) {
      const LayerPlan& layer_plan = plan.layers[layer];
      state.base_budgets[layer] = layer_plan.base_budget;
      total = saturating_add(total, saturating_multiply(heads, layer_plan.base_budget));
      for (std::size_t h = 0; h < heads; ++h) {
        Head& head = heads_[layer * heads + h];
        head.offset = cumulative_.size();
        if (h < layer_plan.scores.size()) {
          add_head(head, layer_plan.scores[h]);
        } else {  // no scores: every stored token has zero importance
          head.count = h < layer_plan.stored.size() ? layer_plan.stored[h] : 0;
          cumulative_.resize(cumulative_.size() + head.count, 1.0);
          importance_.resize(importance_.size() + head.count, 0.0);
        }
        pins += head.pins;
        if (head.pins + head.count > 0) state.planned[layer] = 1;
      }
    }
    const std::size_t ranked = cumulative_.size();
    if (pins >= total) {
      share_pins(state, total);
      state.coverage = 0.0;
      return;
    }
    if (ranked <= total - pins) {  // everything fits
      for (std::size_t i = 0; i < heads_.size(); ++i) {
        state.budgets[i] = heads_[i].pins + heads_[i].count;
      }
      state.coverage = 1.0;
      return;
    }
    // p = the m-th smallest C: Σ kept(p) = pins + #{C < p} ≤ T, and any larger p exceeds T.
    const std::size_t m = total - pins;
    selection_.assign(cumulative_.begin(), cumulative_.end());
    std::nth_element(selection_.begin(), selection_.begin() + static_cast<std::ptrdiff_t>(m),
                     selection_.end());
    const double p = selection_[m];
    std::size_t kept = pins;
    ties_.clear();
    for (std::size_t i = 0; i < heads_.size(); ++i) {
      const Head& head = heads_[i];
      const auto first = cumulative_.begin() + static_cast<std::ptrdiff_t>(head.offset);
      const auto last = first + static_cast<std::ptrdiff_t>(head.count);
      const auto [below, above] = std::equal_range(first, last, p);
      const auto prefix = static_cast<std::size_t>(below - first);
      state.budgets[i] = head.pins + prefix;
      kept += prefix;
      for (auto tie = below; tie != above; ++tie) {
        const auto rank = static_cast<std::size_t>(tie - first);
        ties_.push_back({importance_[head.offset + rank], rank, i});
      }
    }
    // The T − Σ kept(p) slots left: the best of the tokens at C = p.
    const std::size_t left = std::min(total - kept, ties_.size());
    std::sort(ties_.begin(), ties_.end(), [](const Tie& a, const Tie& b) {
      if (a.importance != b.importance) return a.importance > b.importance;
      if (a.rank != b.rank) return a.rank < b.rank;
      return a.head < b.head;
    });
    for (std::size_t i = 0; i < left; ++i) ++state.budgets[ties_[i].head];
    state.coverage = p;
  }

 private:
  struct Head {
    std::size_t offset = 0;  // of its ranked tokens in cumulative_ / importance_
    std::size_t count = 0;   // ranked (non-pinned) tokens
    std::size_t pins = 0;    // +inf tokens
  };
  struct Tie {
    double importance;
    std::size_t rank;
    std::size_t head;  // layer · kv_heads + kv head
  };

  // Appends the head's C (ascending) and normalized importance, best token first.
  void add_head(Head& head, std::span<const float> scores) {
    sorted_.clear();
    std::size_t zeros = 0;
    for (const float score : scores) {
      if (score == std::numeric_limits<float>::infinity()) {
        ++head.pins;
      } else if (score > 0.0F) {  // finite, positive (NaN fails the comparison)
        sorted_.push_back(score);
      } else {
        ++zeros;
      }
    }
    std::sort(sorted_.begin(), sorted_.end(), [](float a, float b) { return a > b; });
    double mass = 0.0;
    for (const float v : sorted_) mass += static_cast<double>(v);
    double before = 0.0;
    for (const float v : sorted_) {
      const double share = static_cast<double>(v) / mass;
      cumulative_.push_back(std::min(before, 1.0));  // rounding never passes the zeros' 1
      importance_.push_back(share);
      before += share;
    }
    cumulative_.resize(cumulative_.size() + zeros, 1.0);
    importance_.resize(importance_.size() + zeros, 0.0);
    head.count = sorted_.size() + zeros;
  }

  // The pins alone exceed T: each head keeps its first r, the rest one each in head order.
  void share_pins(SequenceState& state, std::size_t total) const {
    std::size_t low = 0, high = 0;  // the largest r with Σ min(pins, r) ≤ total
    for (const Head& head : heads_) high = std::max(high, head.pins);
    const auto kept_at = [&](std::size_t r) {
      std::size_t sum = 0;
      for (const Head& head : heads_) sum += std::min(head.pins, r);
      return sum;
    };
    while (low < high) {
      const std::size_t middle = low + (high - low + 1) / 2;
      if (kept_at(middle) <= total) {
        low = middle;
      } else {
        high = middle - 1;
      }
    }
    std::size_t left = total - kept_at(low);
    for (std::size_t i = 0; i < heads_.size(); ++i) {
      state.budgets[i] = std::min(heads_[i].pins, low);
      if (left > 0 && heads_[i].pins > low) {
        ++state.budgets[i];
        --left;
      }
    }
  }

  // A recorded budget under the base budget now (see Choices: Decode).
  static std::size_t scaled(std::size_t budget, std::size_t planned_base,
                            std::size_t base) noexcept {
    constexpr std::size_t unlimited = std::numeric_limits<std::size_t>::max();
    if (base == planned_base) return budget;
    if (base == unlimited) return unlimited;
    if (planned_base == unlimited || planned_base == 0) return base;
    const double value = std::round(static_cast<double>(budget) * static_cast<double>(base) /
                                    static_cast<double>(planned_base));
    return value >= 9.0e18 ? unlimited : static_cast<std::size_t>(value);
  }

  static std::size_t saturating_add(std::size_t a, std::size_t b) noexcept {
    return a > std::numeric_limits<std::size_t>::max() - b ? std::numeric_limits<std::size_t>::max()
                                                           : a + b;
  }
  static std::size_t saturating_multiply(std::size_t a, std::size_t b) noexcept {
    return a != 0 && b > std::numeric_limits<std::size_t>::max() / a
               ? std::numeric_limits<std::size_t>::max()
               : a * b;
  }

  // Scratch, reused across plans.
  std::vector<Head> heads_;
  std::vector<double> cumulative_;  // C per ranked token, per head ascending
  std::vector<double> importance_;  // v / Σ v per ranked token
  std::vector<double> selection_;
  std::vector<float> sorted_;
  std::vector<Tie> ties_;
};

}  // namespace kvc::budget
