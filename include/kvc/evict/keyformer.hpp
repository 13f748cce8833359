// kvc/evict/keyformer.hpp — evict::Keyformer: accumulated Gumbel-softmax of the logits.
//
// Paper:      Adnan et al., "Keyformer: KV Cache Reduction through Key Tokens Selection
//             for Efficient Generative Inference", MLSys 2024 (arXiv 2403.09054);
//             reference: d-matrix-ai/keyformer-llm, GPTJAttention._attn.
// Keeps:      the `recent` newest tokens, plus the B − recent tokens with the largest
//               f_i = Σ_t softmax_i((z_t + G_t) / τ_t)
//             where z_t are step t's attention logits, G_t i.i.d. Gumbel(0, 1) noise, and
//             τ_t = τ_init + min(t, steps)·(τ_end − τ_init)/steps rises linearly from
//             τ_init (1) to τ_end (2) over `tau_steps` generation steps (t = 0 for the
//             first attend, the prompt). Summed over the query rows of each step, as H2O.
// Needs:      attention weights — KvCache::attend hands them over. The logits are
//             recovered as z_i = log A_i: log softmax(z) = z − logsumexp(z), a constant per
//             row, which the softmax cancels — exact for one query row (see Choices).
// Cost:       O(n) per kv head and step (a log, a hash and an exp per stored token); O(n)
//             to score. One float per stored token of state, plus a step counter.
// When:       prefill and every decode step once a head is over budget (evicting one token
//             per step), as H2O.
// Defaults:   recent = ⌊0.3·B⌋ (Keyformer's summarization runs keep 30 % of the cache as
//             the recent window), τ 1 → 2 over 512 steps (set tau_steps to the tokens you
//             will generate: the reference uses max_new_tokens), seed 0, noise on.
// Choices:
//   * Pooled rows. AttentionEvent carries Σ_r A_r(i) over the GQA group's query heads and
//     the call's query tokens (R = query_rows rows), not the rows themselves. With R = 1
//     (g = 1, one decode token) log A is the row's logits up to a constant: exact. With
//     R > 1 kvc applies the Gumbel-softmax once, to the pooled distribution w/R, and
//     scales it by R: f_i += R·softmax_i((log(w_i/R) + G_i)/τ_t). At τ = 1 without noise
//     that is exactly Σ_r A_r(i), H2O's accumulation; with noise or τ ≠ 1 it differs from
//     the reference's per-row sum (per query head, then summed over the group). Tokens no
//     row sees (w_i = 0) have logit −inf and get nothing, as masked logits.
//   * The step t counts this head's attend calls: a prompt attended in chunks advances
//     τ once per chunk. After tau_steps, τ stays at τ_end; tau_steps = 0 keeps τ_init.
//   * Noise. G = −log(−log U) with U = (h + 0.5)/2⁵³ from a splitmix64 hash h of
//     (seed, layer, kv head, step, slot): deterministic for a seed, independent of call
//     order, no RNG state to copy on fork (a fork's branches draw the same noise).
//     Keyformer::gumbel(...) exposes it. noise = false gives the τ-scaled softmax alone.
//   * Recent window. The reference (like official H2O) keeps the recent window with an
//     off-by-one that includes the incoming token; kvc keeps exactly `recent` tokens.
//   * Budget. The reference freezes its budget at the prompt (60 % of the prompt, 30 % of
//     it recent); kvc takes B from CacheOptions::budget (Budget::ratio(0.6) after the
//     prompt approximates it).
#pragma once

#include <kvc/core/error.hpp>
#include <kvc/core/events.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string_view>
#include <vector>

namespace kvc::evict {

class Keyformer {
 public:
  struct Options {
    double recent_fraction = 0.3;   // share of the budget kept as the recent window
    std::size_t recent_tokens = 0;  // if non-zero, overrides recent_fraction
    double tau_init = 1.0;          // temperature at the prompt
    double tau_end = 2.0;           // temperature after tau_steps steps
    std::size_t tau_steps = 512;    // steps over which τ rises linearly
    std::uint64_t seed = 0;         // Gumbel noise seed
    bool noise = true;              // false: no Gumbel noise
  };
  struct HeadState {
    std::vector<float> accumulated;  // per stored token, storage order
    std::uint64_t steps = 0;         // attend calls seen by this head
  };
  static constexpr bool evicts = true;
  static constexpr std::string_view name() noexcept { return "keyformer"; }

  Keyformer() = default;
  explicit Keyformer(Options options) : options_(checked(options)) {}
  const Options& options() const noexcept { return options_; }

  std::size_t recent_for(std::size_t budget) const noexcept {
    const std::size_t recent =
        options_.recent_tokens != 0
            ? options_.recent_tokens
            : static_cast<std::size_t>(options_.recent_fraction * static_cast<double>(budget));
    return std::min(recent, budget);
  }

  // τ at step t (t = 0: the first attend).
  double temperature(std::uint64_t step) const noexcept {
    if (options_.tau_steps == 0) return options_.tau_init;
    const double progress = static_cast<double>(std::min<std::uint64_t>(step, options_.tau_steps)) /
                            static_cast<double>(options_.tau_steps);
    return options_.tau_init + progress * (options_.tau_end - options_.tau_init);
  }

  // The Gumbel(0, 1) noise kvc adds to token `slot`'s logit at `step` of (layer, kv_head).
  static double gumbel(std::uint64_t seed, std::size_t layer, std::size_t kv_head,
                       std::uint64_t step, std::size_t slot) noexcept {
    std::uint64_t h = mix(seed);
    h = mix(h ^ static_cast<std::uint64_t>(layer));
    h = mix(h ^ static_cast<std::uint64_t>(kv_head));
    h = mix(h ^ step);
    h = mix(h ^ static_cast<std::uint64_t>(slot));
    const double u = (static_cast<double>(h >> 11) + 0.5) * 0x1.0p-53;  // in (0, 1)
    return -std::log(-std::log(u));
  }

  void on_append(HeadState& state, const AppendEvent& event) const {
    state.accumulated.resize(state.accumulated.size() + event.count, 0.0F);
  }

  void on_attention(HeadState& state, const AttentionEvent& event) {
    const std::uint64_t step = state.steps++;
    if (event.query_rows == 0) return;
    const std::size_t n = std::min(state.accumulated.size(), event.weights.size());
    const double inverse_tau = 1.0 / temperature(step);
    constexpr double minus_infinity = -std::numeric_limits<double>::infinity();
    std::vector<double>& y = logits_;  // scratch reused across steps
    y.resize(n);
    double shift = minus_infinity;
    for (std::size_t i = 0; i < n; ++i) {
      const double w = event.weights[i];
      if (!(w > 0.0)) {
        y[i] = minus_infinity;  // masked: no row saw this token
        continue;
      }
      const double noise =
          options_.noise ? gumbel(options_.seed, event.layer, event.kv_head, step, i) : 0.0;
      y[i] = (std::log(w) + noise) * inverse_tau;
      shift = std::max(shift, y[i]);
    }
    if (shift == minus_infinity) return;
    double total = 0.0;
    for (double& x : y) total += (x = std::exp(x - shift));
    const double scale = static_cast<double>(event.query_rows) / total;
    for (std::size_t i = 0; i < n; ++i) {
      state.accumulated[i] += static_cast<float>(y[i] * scale);
    }
  }

  void score(const HeadState& state, const ScoreContext& context,
             std::span<float> scores) const noexcept {
    const std::size_t n = std::min(scores.size(), state.accumulated.size());
    const std::size_t recent = std::min(recent_for(context.budget), n);
    std::copy_n(state.accumulated.begin(), n - recent, scores.begin());
    std::fill(scores.begin() + static_cast<std::ptrdiff_t>(n - recent), scores.end(),
              std::numeric_limits<float>::infinity());
  }

  void on_compact(HeadState& state, std::span<const std::uint32_t> kept) const noexcept {
    for (std::size_t k = 0; k < kept.size(); ++k) state.accumulated[k] = state.accumulated[kept[k]];
    state.accumulated.resize(kept.size());
  }

  std::size_t state_bytes(const HeadState& state) const noexcept {
    return state.accumulated.capacity() * sizeof(float);
  }

 private:
  static Options checked(Options options) {
    if (!(options.tau_init > 0.0) || !(options.tau_end > 0.0)) {
      detail::fail<UnsupportedError>("Keyformer: temperatures must be positive, got {} and {}",
                                     options.tau_init, options.tau_end);
    }
    if (!(options.recent_fraction >= 0.0 && options.recent_fraction <= 1.0)) {
      detail::fail<UnsupportedError>("Keyformer: recent_fraction {} is outside [0, 1]",
                                     options.recent_fraction);
    }
    return options;
  }

  // splitmix64's finalizer (Steele, Lea, Flood 2014).
  static constexpr std::uint64_t mix(std::uint64_t x) noexcept {
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
  }

  Options options_{};
  std::vector<double> logits_;
};

}  // namespace kvc::evict
