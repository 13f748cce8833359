// kvc/evict/d2o.hpp — evict::D2O<Base>: Base's survivors, with each evicted token merged into
// its most similar survivor (when similar enough) instead of dropped.
//
// Paper:      Wan et al., "D2O: Dynamic Discriminative Operations for Efficient Generative
//             Inference of Large Language Models", 2024 (arXiv 2406.13035). Official code:
//             AIoT-MLSys-Lab/d2o, D2O_LayerKVCache (METHOD_NOTES.md §11b).
// Keeps:      exactly the tokens Base keeps (D2O scores, budgets and tie-breaks are Base's).
//             Then, per (sequence, layer, kv head), for each evicted token e:
//               c_e = max_{j ∈ kept} cos(k_e, k_j),   j*(e) = the argmax,
//               τ   = mean_e c_e                  at the head's first merge,
//               τ   = α·τ + β·mean_e c_e          at every later one,
//             and e is merged iff c_e ≥ τ (the τ just updated), into its j*:
//               k_j ← (k_j + Σ_{e→j} c_e·k_e) / (1 + n_j),   v_j likewise, same weights c_e,
//             n_j = the number of tokens merged into j (a scatter-mean with include_self,
//             as the reference's scatter_reduce). A token below τ is dropped.
// Needs:      whatever Base needs (D2O<H2O> consumes attention, D2O<SnapKV> observes window
//             queries, D2O<Knorm> wants the appended keys); the cache decodes the head's
//             stored K/V to fp32 at each compression (MergesEvicted) and re-encodes the rows
//             merged into.
// Cost:       per compression of a head with n stored tokens, n_e evicted and n_k kept:
//             O(n_e · n_k · d) for the cosines (fp32 SIMD dot products of unit keys),
//             O(n_merged · d) for the merge, plus the cache's O(n · d) decode and the
//             re-encoding of the targets. Evicting one token per decode step: O(n · d) per
//             step. State: Base's, plus a threshold and two counters per kv head.
// When:       whenever Base evicts: the official code compresses the prompt at the first
//             decode step, then evicts (and maybe merges) one token per decode step.
// Defaults:   Base = H2O (the official token-level policy: accumulated attention + recent
//             window), α = β = 0.5.
//   kvc::KvCache<kvc::evict::D2O<>> cache(geometry, {.budget = kvc::Budget::tokens(512)});
//   kvc::evict::D2O<kvc::evict::SnapKV> d2o(kvc::evict::SnapKV({.window = 32}), {.alpha = 0.7});
// Choices:
//   * Per-head decision. The reference (MHA, one kept set shared by all heads) merges a
//     token iff mean_heads(c_e) ≥ τ, in all heads or none. In kvc every kv head has its own
//     kept set (and, with AdaKV or DuoAttention, its own budget), so c_e, j*, τ and the
//     decision are per kv head; each head's τ evolves with that head's compressions.
//   * Order: τ is updated with this compression's mean first, then compared (the reference
//     defines τ₀ = mean(c) at the first merge, the only threshold that step has; kvc keeps
//     that order at every step). A compression that evicts nothing, or whose kept set is
//     empty (nothing to merge into), leaves τ alone.
//   * Similarities are taken on the keys as stored (decoded from the quantizer), as the
//     reference takes them on its cache; merged rows are re-encoded by the cache.
//   * Zero keys: cos is undefined for a zero-norm key. An evicted zero key gets c_e = 0
//     (torch's eps-clamped cosine gives 0 too), counts as 0 in the mean and is never merged;
//     a kept zero key is never a merge target (its cosine counts as undefined, not 0). An
//     evicted key whose every kept key is zero gets c_e = 0 and is not merged either.
//   * Ties for j*: the oldest kept token (torch.max returns the first maximum).
//   * Weights: c_e is clamped to [−1, 1] (fp32 rounding can leave a cosine just past 1).
//     When τ < 0, tokens with c_e < 0 are merged with negative weights, as the reference
//     does. Since |c_e| ≤ 1, each merged component is bounded by the largest |component|
//     of the rows it combines: |k_j + Σ c_e k_e| / (1 + n_j) ≤ max(|k_j|, |k_e|). The sums
//     run in double and the result is clamped to that bound, so a merged row stays finite
//     and within any format's max_magnitude (f16's 65504) whatever the weights.
//   * Only K/V are merged: Base's per-token state of a target (H2O's accumulated attention,
//     Knorm's norm of the key as appended) is compacted as Base does, neither combined with
//     the merged tokens' nor recomputed from the merged key. A Base that scores the stored
//     keys (scores_stored_keys: KeyDiff) sees the merged keys at its next compression.
//   * The official layer allocation (variance-based layer budgets; layers 0, 1 and the last
//     never compressed) and its 4 forced sinks are a planner's and Base's business, not
//     this wrapper's: pair D2O with the planner and Base that do them.
#pragma once

#include <kvc/core/concepts.hpp>
#include <kvc/core/error.hpp>
#include <kvc/core/events.hpp>
#include <kvc/evict/h2o.hpp>
#include <kvc/simd/kernels.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

namespace kvc::evict {

template <EvictionScorer Base = H2O>
class D2O {
  static_assert(Base::evicts, "D2O<Base>: Base never evicts, so there is nothing to merge");
  static_assert(!MergesEvicted<Base>, "D2O<Base>: Base already merges evicted tokens");

 public:
  using base_type = Base;
  struct Options {
    double alpha = 0.5;  // α: weight of the previous threshold
    double beta = 0.5;   // β: weight of this compression's mean similarity
  };
  struct HeadState {
    typename Base::HeadState base{};
    double threshold = 0.0;   // τ of the last merge (meaningful once updates > 0)
    std::size_t updates = 0;  // compressions that updated τ
    std::size_t merged = 0;   // tokens merged into this head so far
  };
  static constexpr bool evicts = true;
  static constexpr bool wants_appended_keys = WantsAppendedKeys<Base>;
  static constexpr bool scores_stored_keys = ScoresStoredKeys<Base>;
  static constexpr std::string_view name() noexcept { return "d2o"; }

  D2O() = default;
  explicit D2O(Options options) : options_(checked(options)) {}
  explicit D2O(Base base, Options options = {})
      : base_(std::move(base)), options_(checked(options)) {}

  const Options& options() const noexcept { return options_; }
  // Base itself, for a host API it offers (External::supply: cache.scorer().base()).
  Base& base() noexcept { return base_; }
  const Base& base() const noexcept { return base_; }

  // ---- Base's role, forwarded ---------------------------------------------------------

  void on_append(HeadState& state, const AppendEvent& event) { base_.on_append(state.base, event); }

  void on_attention(HeadState& state,
                    const AttentionEvent& event) requires ConsumesAttention<Base> {
    base_.on_attention(state.base, event);
  }

  void on_observe(HeadState& state, const ObserveEvent& event) requires ObservesQueries<Base> {
    base_.on_observe(state.base, event);
  }

  void score(const HeadState& state, const ScoreContext& context, std::span<float> scores) {
    base_.score(state.base, context, scores);
  }

  void on_compact(HeadState& state, std::span<const std::uint32_t> kept) {
    base_.on_compact(state.base, kept);
  }

  std::size_t state_bytes(const HeadState& state) const requires ReportsStateBytes<Base> {
    return base_.state_bytes(state.base);
  }

  // ---- the merge ------------------------------------------------------------------------

  void merge(HeadState& state, const MergeEvent& event) {
    const std::size_t d = event.head_dim;
    const std::size_t n = d == 0 ? 0 : event.keys.size() / d;
    const std::size_t n_kept = event.kept.size();
    if (n_kept == 0 || n_kept >= n) return;
    const std::size_t n_evicted = n - n_kept;

    // Scratch first (the only allocations): nothing is changed if one throws.
    kept_units_.resize(n_kept * d);
    kept_valid_.resize(n_kept);
    evicted_units_.resize(tile_rows * d);
    similarities_.resize(tile_rows * n_kept);
    matches_.clear();
    matches_.reserve(n_evicted);
    row_sums_.resize(d);
    row_bounds_.resize(d);

    for (std::size_t j = 0; j < n_kept; ++j) {
      kept_valid_[j] = unit(row(event.keys, event.kept[j], d), &kept_units_[j * d]) ? 1 : 0;
    }

    // c_e and j* for every evicted slot, tile_rows evicted keys at a time.
    double similarity_sum = 0.0;
    std::size_t kept_index = 0;  // event.kept is ascending: walk it beside the slots
    std::size_t slot = 0;
    while (slot < n) {
      std::size_t rows = 0;
      std::uint32_t tile_slots[tile_rows];
      bool tile_valid[tile_rows];
      for (; slot < n && rows < tile_rows; ++slot) {
        if (kept_index < n_kept && event.kept[kept_index] == slot) {
          ++kept_index;
          continue;
        }
        tile_slots[rows] = static_cast<std::uint32_t>(slot);
        tile_valid[rows] = unit(row(event.keys, slot, d), &evicted_units_[rows * d]);
        ++rows;
      }
      if (rows == 0) break;
      simd::dot_block(evicted_units_.data(), rows, d, kept_units_.data(), n_kept, d, d,
                      similarities_.data(), n_kept);
      for (std::size_t r = 0; r < rows; ++r) {
        const Match match = best_match(tile_slots[r], tile_valid[r], &similarities_[r * n_kept]);
        similarity_sum += match.similarity;
        matches_.push_back(match);
      }
    }

    const double mean = similarity_sum / static_cast<double>(n_evicted);
    const double threshold =
        state.updates == 0 ? mean : options_.alpha * state.threshold + options_.beta * mean;
    state.threshold = threshold;
    ++state.updates;

    // Keep the matches at or above τ, grouped by target (stable: by slot within a target).
    std::erase_if(matches_, [&](const Match& match) {
      return match.target == no_target || match.similarity < threshold;
    });
    std::stable_sort(matches_.begin(), matches_.end(),
                     [](const Match& a, const Match& b) { return a.target < b.target; });
    state.merged += matches_.size();

    for (std::size_t first = 0; first < matches_.size();) {
      const std::uint32_t target = event.kept[matches_[first].target];
      std::size_t last = first;
      while (last < matches_.size() && matches_[last].target == matches_[first].target) ++last;
      merge_rows(event.keys, target, first, last, d);
      merge_rows(event.values, target, first, last, d);
      event.changed[target] = 1;
      first = last;
    }
  }

 private:
  static constexpr std::size_t tile_rows = 8;
  static constexpr std::uint32_t no_target = std::numeric_limits<std::uint32_t>::max();

  // One evicted slot: its best cosine c_e (clamped to [−1, 1]; 0 without a target) and the
  // index into event.kept of its most similar kept key.
  struct Match {
    std::uint32_t slot = 0;
    std::uint32_t target = no_target;
    double similarity = 0.0;
  };

  static Options checked(Options options) {
    if (!std::isfinite(options.alpha) || !std::isfinite(options.beta)) {
      detail::fail<UnsupportedError>("D2O: alpha {} and beta {} must be finite", options.alpha,
                                     options.beta);
    }
    return options;
  }

  static std::span<float> row(std::span<float> rows, std::size_t slot, std::size_t d) {
    return rows.subspan(slot * d, d);
  }

  // out = x / ‖x‖ (norm in double); false (and out = 0) for a zero key.
  static bool unit(std::span<const float> x, float* out) {
    double norm = 0.0;
    for (const float value : x) norm += static_cast<double>(value) * static_cast<double>(value);
    norm = std::sqrt(norm);
    if (!(norm > 0.0)) {
      std::fill_n(out, x.size(), 0.0F);
      return false;
    }
    for (std::size_t c = 0; c < x.size(); ++c) {
      out[c] = static_cast<float>(static_cast<double>(x[c]) / norm);
    }
    return true;
  }

  Match best_match(std::uint32_t slot, bool valid, const float* similarities) const {
    Match match{slot, no_target, 0.0};
    if (!valid) return match;
    double best = -std::numeric_limits<double>::infinity();
    for (std::size_t j = 0; j < kept_valid_.size(); ++j) {
      if (kept_valid_[j] == 0) continue;
      const double similarity = std::clamp(static_cast<double>(similarities[j]), -1.0, 1.0);
      if (similarity > best) {  // strict: ties keep the oldest kept token
        best = similarity;
        match.target = static_cast<std::uint32_t>(j);
      }
    }
    if (match.target != no_target) match.similarity = best;
    return match;
  }

  // rows[target] ← (rows[target] + Σ c_e·rows[e]) / (1 + count) over matches_[first, last),
  // in double, clamped per component to the largest |component| combined.
  void merge_rows(std::span<float> rows, std::uint32_t target, std::size_t first, std::size_t last,
                  std::size_t d) {
    double* sums = row_sums_.data();
    double* bounds = row_bounds_.data();
    const std::span<float> to = row(rows, target, d);
    for (std::size_t c = 0; c < d; ++c) {
      sums[c] = to[c];
      bounds[c] = std::abs(static_cast<double>(to[c]));
    }
    for (std::size_t m = first; m < last; ++m) {
      const std::span<const float> from = row(rows, matches_[m].slot, d);
      const double weight = matches_[m].similarity;
      for (std::size_t c = 0; c < d; ++c) {
        sums[c] += weight * static_cast<double>(from[c]);
        bounds[c] = std::max(bounds[c], std::abs(static_cast<double>(from[c])));
      }
    }
    const auto count = static_cast<double>(1 + (last - first));
    for (std::size_t c = 0; c < d; ++c) {
      to[c] = static_cast<float>(std::clamp(sums[c] / count, -bounds[c], bounds[c]));
    }
  }

  [[no_unique_address]] Base base_{};
  Options options_{};
  // Scratch reused across calls (one cache, one thread): unit kept keys, a tile of unit
  // evicted keys and their cosines, the matches, one row of sums and bounds.
  std::vector<float> kept_units_, evicted_units_, similarities_;
  std::vector<std::uint8_t> kept_valid_;
  std::vector<Match> matches_;
  std::vector<double> row_sums_, row_bounds_;
};

}  // namespace kvc::evict
