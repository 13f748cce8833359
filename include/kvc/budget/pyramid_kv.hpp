// kvc/budget/pyramid_kv.hpp — budget::PyramidKV: budgets that shrink linearly with depth.
//
// Paper:      Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal
//             Information Funneling", 2024 (arXiv 2406.02069).
// Keeps:      with B = the cache budget resolved for the tokens seen (LayerPlan::base_budget,
//             the average per-head budget, window included), n = tokens seen, w = window,
//             L = layers, the prefix budgets (window excluded)
//               min = (B − w)/β
//               max = 2(B − w) − min
//               if max ≥ n − w:  max = n − w,  min = 2(B − w) − max
//             and layer l keeps
//               B_l = round(max − l·(max − min)/(L − 1)) + w
//             tokens in each of its kv heads: layer 0 keeps the most, the last layer the
//             least, and Σ_l B_l = L·B up to rounding (at most L/2 tokens off), so the
//             model-wide memory is what Uniform would hold. All kv heads of a layer get
//             the layer's budget; the scorer decides which tokens fill it.
// Needs:      nothing from the host beyond the geometry (L) and the cache budget.
// Cost:       O(1) per layer plus O(kv_heads) to fill the budgets.
// When:       every compression of a layer (prefill and decode): with a fixed token
//             budget the pyramid stays put once n − w > max; with a ratio budget it
//             follows B.
// Defaults:   window 64, β = 20 (kvpress PyramidKVPress; the official code's class default
//             β is 20 too, its window 32 in init_pyramidkv and 8 in run_longbench.py).
// Choices:
//   * Mapping from the paper's code. KVCache-Factory's `max_capacity_prompt` C is the
//     average per-layer capacity *including* the window; kvc's B is exactly C, so C − w is
//     the prefix budget the pyramid redistributes and each layer adds its w window tokens
//     back. kvpress writes the same thing as max_capacity_prompt = w + n·(1 − r) with its
//     compression ratio r (so kvpress's n·(1 − r) is our B − w, and it compares kept counts
//     that include the window).
//   * Arithmetic. Float arithmetic and one round per layer (kvpress), with step
//     (max − min)/(L − 1) so that the average over layers is exactly B − w + w = B.
//     KVCache-Factory uses integer division throughout (C − w)//β, (max − min)//(L − 1),
//     which can leave up to L − 1 tokens per layer unspent.
//   * Fallback. kvpress falls back to a uniform budget unless n ≥ max ≥ min ≥ w in its
//     window-included counts. In kvc's window-excluded counts that reads
//     n − w ≥ max ≥ min ≥ 0 (and n ≥ w); otherwise every layer keeps B (budget::Uniform).
//     This covers n ≤ B (nothing to evict; the clamp makes min > max), B < w (the budget
//     cannot hold the window) and L = 1. The official code also switches to a uniform
//     SnapKV budget while n < 2(C − w); kvc keeps the pyramid there (kvpress's choice):
//     the clamp already gives layer 0 every token.
//   * A layer never gets 0 tokens: with w = 0 and a small B the last layer keeps at least 1.
#pragma once

#include <kvc/core/error.hpp>
#include <kvc/core/events.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <span>
#include <string_view>

namespace kvc::budget {

class PyramidKV {
 public:
  struct Options {
    std::size_t window = 64;  // w: tokens every layer keeps on top of its pyramid share
    double beta = 20;         // β: max/min ratio knob; larger β makes the pyramid steeper
  };

  static constexpr std::string_view name() noexcept { return "pyramid_kv"; }

  PyramidKV() = default;
  explicit PyramidKV(Options options) : options_(options) {
    if (!(options_.beta >= 1.0)) {
      detail::fail<BudgetError>("PyramidKV: beta {} is below 1", options_.beta);
    }
  }
  const Options& options() const noexcept { return options_; }

  // Tokens each kv head of `layer` (of `layers`) keeps, given the average budget B and the
  // tokens seen n — the formula in the header comment.
  std::size_t layer_budget(std::size_t layer, std::size_t layers, std::size_t base_budget,
                           std::size_t tokens_seen) const noexcept {
    if (layers < 2 || base_budget >= tokens_seen || tokens_seen < options_.window) {
      return base_budget;
    }
    const double n = static_cast<double>(tokens_seen);
    const double w = static_cast<double>(options_.window);
    const double prefix = static_cast<double>(base_budget) - w;  // B − w
    double min = prefix / options_.beta;
    double max = 2.0 * prefix - min;
    if (max >= n - w) {
      max = n - w;
      min = 2.0 * prefix - max;
    }
    if (!(n - w >= max && max >= min && min >= 0.0)) return base_budget;
    const double step = (max - min) / static_cast<double>(layers - 1);
    const double kept = std::round(max - static_cast<double>(layer) * step) + w;
    return std::max<std::size_t>(1, static_cast<std::size_t>(kept));
  }

  void plan_layer(const LayerPlan& plan, std::span<std::size_t> head_budgets) const noexcept {
    std::fill(head_budgets.begin(), head_budgets.end(),
              layer_budget(plan.layer, plan.geometry.layers, plan.base_budget, plan.tokens_seen));
  }

 private:
  Options options_{};
};

}  // namespace kvc::budget
