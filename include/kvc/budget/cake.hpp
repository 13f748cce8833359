// kvc/budget/cake.hpp — budget::Cake: CAKE's layer budgets from each layer's attention
// dispersion and shift, re-split in a cascade as the layers are prefilled.
//
// Paper:      Qin et al., "CAKE: Cascading and Adaptive KV Cache Eviction with Layer
//             Preferences", ICLR 2025 (arXiv 2503.12491); reference: antgroup/cakekv,
//             cake/model/modify_llama.py (the preference), cake/utils.py (calculate_entropy,
//             adjust_budgets), cake/cake_cache.py (CakeprefillKVCache).
// Keeps:      with B = the cache budget resolved for the tokens seen (LayerPlan::base_budget,
//             the average per-head budget, window included), n = tokens seen, w = window,
//             L = layers, and A the window attention of a layer (the last w' = min(w, window
//             rows observed) rows of each query head's softmax over the n stored tokens),
//             restricted to the prefix columns t < n − w':
//               H_l = −Σ A·log(A + 1e−10)             over query heads, rows, prefix columns
//               V_l = Σ_{heads, t} var_rows(A[·, t])   (unbiased variance over the w' rows)
//               P_l = H_l^(1/τ1) · V_l^(1/τ2)
//             H_l is the layer's spatial dispersion, V_l its temporal shift. Over the set S
//             of the layers observed so far, with total = (B − w)·L:
//               b_l = ⌊P_l / Σ_{k∈S} P_k · total⌋,  then adjust_budgets (cap at n − w, spread)
//               B_l = b_l + w
//             and every kv head of layer l keeps B_l tokens (the scorer picks them: pair it
//             with evict::CakeIndicator, whose window should be this window). At the end of
//             prefill Σ_l B_l = L·B: the model-wide memory Uniform would hold, redistributed
//             towards layers whose attention is spread out and shifting.
// Needs:      the window queries of every layer: the host calls observe(seq, layer,
//             q_window) with the last w appended queries (post-RoPE), as for SnapKV; the
//             cache hands each kv head's window softmax to on_observe. Observe a layer
//             before its attend: a layer compressed before any observe keeps the uniform B,
//             and tokens it evicted then cannot come back with a larger share.
// Cost:       per observe, O(g·w·n) per kv head (one pass for the entropy and the column
//             means, one for the variance; a scratch of n doubles). Per plan (every
//             over-budget check and compression of a layer) O(L) for the allocation; the
//             cascade re-plans every earlier layer after each attend (and compression), so
//             O(L²) per layer step. Sequence state: two doubles and a flag per layer.
// When:       prefill, layer by layer (append, observe, attend with auto_compress): each new
//             layer re-splits the budget among the layers seen so far, and the cache
//             (`cascades`) squeezes every earlier layer to its new share at the new layer's
//             attend (even when the new layer keeps everything it holds). During
//             decode the budgets stay those of the prefill (P_l is fixed unless the layer is
//             observed again) and each layer evicts back to B_l.
// Defaults:   window 32, τ1 = τ2 = 1 (cakekv pred_cake.py: window 32; τ1, τ2 per model and
//             budget in config/model2tau.json, e.g. llama3.1-8b at 1024: τ1 = 1.6, τ2 = 0.4;
//             pred_cake.py falls back to 1.0 for a model or budget the file lacks).
// Choices:
//   * Budget mapping. cakekv's cache_size C is the average per-layer capacity *including*
//     the window (total_size = (C − w)·L); kvc's B is exactly C, so B_l adds w back.
//   * Cascading total. The reference splits the *model-wide* total (B − w)·L among the
//     layers seen so far (its total_size never changes, only Σ P grows). So every share
//     only shrinks as layers arrive (up to a truncation remainder of one token): memory
//     never exceeds L·B during prefill, the early layers keep everything while the total
//     allows, and the final budgets are exactly the one-shot allocation over all layers
//     (the paper's cascading guarantee). kvc does the
//     same; splitting (B − w)·|S| instead would squeeze early layers below shares they are
//     given back later, when their evicted tokens are gone.
//   * adjust_budgets. Reference: (1) truncate; (2) cap each budget at n − w and spread the
//     excess evenly over the layers below the cap, remainder one each to the lowest
//     indices; (3) hand total − Σ b out the same way to the layers below the cap. The
//     reference does each spread once, so a spread can push a layer over the cap again
//     (the eviction then clamps it and the budget is lost); kvc repeats a spread with
//     whatever went over the cap until nothing does or every layer is capped. When no
//     spread overflows (the usual case) the result is the reference's, number for number.
//     Step (3) never subtracts: truncation only loses tokens.
//   * Skip. No compression while n ≤ B (every head keeps what it holds). The reference
//     skips while n ≤ C + w; kvc's B already counts the window, so a prompt that fits in B
//     is the natural bound. A budget B ≤ w cannot hold the window: every layer keeps B
//     (budget::Uniform).
//   * Preference. Accumulated in double; H and V are clamped at 0 before the powers (the
//     1e−10 inside the log can make H a hair negative). With a single window row the
//     unbiased variance is undefined (torch gives NaN); kvc uses 0. If every observed
//     layer has P = 0 the total is split evenly. Each observe of a layer replaces its P_l
//     (the accumulators reset at kv head 0): observe during decode (or
//     CacheOptions::query_buffer with a query-aware scorer) re-measures the layer; the
//     reference measures once, at prefill.
//   * Tokens seen. The cap n − w uses the tokens seen by the layer being planned (the
//     reference has one prompt length for all layers); during decode, layers that were
//     already given the new token see n + 1, the rest n, which only moves a capped
//     layer's budget by a token.
#pragma once

#include <kvc/core/error.hpp>
#include <kvc/core/events.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <span>
#include <string_view>
#include <vector>

namespace kvc::budget {

class Cake {
 public:
  struct Options {
    std::size_t window = 32;  // w: window rows measured, and tokens every layer keeps on top
    double tau1 = 1.0;        // τ1: temperature of the dispersion H_l (> 0)
    double tau2 = 1.0;        // τ2: temperature of the shift V_l (> 0)
  };

  // What one layer's last observe measured (summed over its kv heads).
  struct LayerPreference {
    double entropy = 0.0;   // H_l
    double variance = 0.0;  // V_l
    bool observed = false;
  };
  // Per sequence: the layers' measurements, indexed by layer (grown by on_observe).
  struct SequenceState {
    std::vector<LayerPreference> layers;
  };

  static constexpr std::string_view name() noexcept { return "cake"; }
  // Cascades: after a layer is compressed, the cache squeezes the earlier layers too.
  static constexpr bool cascades = true;

  Cake() = default;
  explicit Cake(Options options) : options_(checked(options)) {}

  // Bytes one sequence's state holds (stats().metadata_bytes).
  std::size_t state_bytes(const SequenceState& state) const noexcept {
    return sizeof(SequenceState) + state.layers.capacity() * sizeof(LayerPreference);
  }
  const Options& options() const noexcept { return options_; }

  // One kv head's window softmax; kv head 0 starts the layer afresh.
  void on_observe(SequenceState& state, const ObserveEvent& event) {
    if (state.layers.size() <= event.layer) state.layers.resize(event.layer + 1);
    LayerPreference& layer = state.layers[event.layer];
    if (event.kv_head == 0) layer = {};
    layer.observed = true;
    if (event.window == 0 || event.query_rows == 0) return;
    const std::size_t n = event.tokens;
    const std::size_t rows = std::min(options_.window, event.window);
    const std::size_t prefix = n > rows ? n - rows : 0;
    if (prefix == 0) return;
    const std::size_t group = event.query_rows / event.window;
    mean_.resize(prefix);
    for (std::size_t a = 0; a < group; ++a) {
      const float* first_row = event.weights.data() + (a * event.window + event.window - rows) * n;
      std::fill(mean_.begin(), mean_.end(), 0.0);
      for (std::size_t j = 0; j < rows; ++j) {
        const float* row = first_row + j * n;
        for (std::size_t t = 0; t < prefix; ++t) {
          const double x = row[t];
          mean_[t] += x;
          layer.entropy -= x * std::log(x + 1e-10);
        }
      }
      if (rows < 2) continue;
      for (double& mean : mean_) mean /= static_cast<double>(rows);
      double squares = 0.0;
      for (std::size_t j = 0; j < rows; ++j) {
        const float* row = first_row + j * n;
        for (std::size_t t = 0; t < prefix; ++t) {
          const double deviation = static_cast<double>(row[t]) - mean_[t];
          squares += deviation * deviation;
        }
      }
      layer.variance += squares / static_cast<double>(rows - 1);
    }
  }

  // P_l = H_l^(1/τ1)·V_l^(1/τ2) of an observed layer; 0 for one never observed.
  double preference(const SequenceState& state, std::size_t layer) const noexcept {
    if (layer >= state.layers.size() || !state.layers[layer].observed) return 0.0;
    const LayerPreference& measured = state.layers[layer];
    return std::pow(std::max(0.0, measured.entropy), 1.0 / options_.tau1) *
           std::pow(std::max(0.0, measured.variance), 1.0 / options_.tau2);
  }

  // Tokens each kv head of `layer` (of `layers`) keeps: B_l as in the header comment;
  // tokens_seen (everything) while n ≤ B; B for a layer never observed or when B ≤ w.
  std::size_t layer_budget(const SequenceState& state, std::size_t layer, std::size_t layers,
                           std::size_t base_budget, std::size_t tokens_seen) {
    const bool observed =
        layer < layers && layer < state.layers.size() && state.layers[layer].observed;
    if (!observed) return base_budget;
    if (tokens_seen <= base_budget) return tokens_seen;
    const std::size_t window = options_.window;
    if (base_budget <= window) return base_budget;
    const std::size_t cap = tokens_seen - window;  // n > B > w
    const std::size_t total = (base_budget - window) * layers;
    preferences_.clear();
    std::size_t index = 0;  // of `layer` among the observed layers
    for (std::size_t l = 0; l < std::min(layers, state.layers.size()); ++l) {
      if (!state.layers[l].observed) continue;
      if (l == layer) index = preferences_.size();
      preferences_.push_back(preference(state, l));
    }
    double sum = 0.0;
    for (const double p : preferences_) sum += p;
    const bool proportional = sum > 0.0 && std::isfinite(sum);
    budgets_.resize(preferences_.size());
    for (std::size_t i = 0; i < preferences_.size(); ++i) {
      const double share = proportional
                               ? preferences_[i] / sum * static_cast<double>(total)
                               : static_cast<double>(total) / static_cast<double>(budgets_.size());
      budgets_[i] = static_cast<std::size_t>(share);  // truncate, as np.array(dtype=int)
    }
    adjust_budgets(budgets_, total, cap);
    return std::min(budgets_[index], cap) + window;
  }

  void plan_layer(const LayerPlan& plan, const SequenceState& state,
                  std::span<std::size_t> head_budgets) {
    std::fill(
        head_budgets.begin(), head_budgets.end(),
        layer_budget(state, plan.layer, plan.geometry.layers, plan.base_budget, plan.tokens_seen));
  }

  // cakekv's adjust_budgets on truncated budgets (window excluded): cap at `cap`, spread
  // the excess, then hand out total − Σ budgets, each spread repeated while it overflows the
  // cap (see Choices). Afterwards every budget is ≤ cap and Σ = min(total, size·cap) when
  // the input sums to at most `total`.
  static void adjust_budgets(std::span<std::size_t> budgets, std::size_t total, std::size_t cap) {
    std::size_t excess = 0;
    for (std::size_t& budget : budgets) {
      excess += budget > cap ? budget - cap : 0;
      budget = std::min(budget, cap);
    }
    spread(budgets, excess, cap);
    std::size_t sum = 0;
    for (const std::size_t budget : budgets) sum += budget;
    if (sum < total) spread(budgets, total - sum, cap);
  }

 private:
  // Hands `amount` out evenly to the budgets below `cap` (remainder one each to the lowest
  // indices), then again whatever that pushed over the cap.
  static void spread(std::span<std::size_t> budgets, std::size_t amount, std::size_t cap) {
    while (amount > 0) {
      std::size_t below = 0;
      for (const std::size_t budget : budgets) below += budget < cap ? 1 : 0;
      if (below == 0) return;
      const std::size_t each = amount / below;
      std::size_t remainder = amount % below;
      amount = 0;
      for (std::size_t& budget : budgets) {
        if (budget >= cap) continue;
        budget += each + (remainder > 0 ? 1 : 0);
        remainder -= remainder > 0 ? 1 : 0;
        if (budget > cap) {
          amount += budget - cap;
          budget = cap;
        }
      }
    }
  }

  static Options checked(Options options) {
    if (options.window == 0) detail::fail<BudgetError>("Cake: window is 0");
    if (!(options.tau1 > 0.0 && std::isfinite(options.tau1))) {
      detail::fail<BudgetError>("Cake: tau1 {} is not a positive number", options.tau1);
    }
    if (!(options.tau2 > 0.0 && std::isfinite(options.tau2))) {
      detail::fail<BudgetError>("Cake: tau2 {} is not a positive number", options.tau2);
    }
    return options;
  }

  Options options_{};
  std::vector<double> mean_;          // on_observe scratch: column means
  std::vector<double> preferences_;   // plan scratch: P of the observed layers
  std::vector<std::size_t> budgets_;  // plan scratch: their budgets
};

}  // namespace kvc::budget
