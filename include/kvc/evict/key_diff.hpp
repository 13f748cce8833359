// kvc/evict/key_diff.hpp — evict::KeyDiff: keep the keys least like the average key.
//
// Paper:      Park et al., "KeyDiff: Key Similarity-Based KV Cache Eviction for
//             Long-Context LLM Inference in Resource-Constrained Environments", 2025
//             (arXiv 2504.15364).
// Keeps:      the B tokens with the highest score −cos(k_i, a), where the anchor
//             a = mean_j k_j/‖k_j‖ is the mean unit key over the head's stored tokens:
//             the most distinctive keys survive. Nothing is protected by default
//             (kvpress KeyDiffPress); Options::recent keeps the newest `recent` tokens.
// Needs:      keys only (`scores_stored_keys`: the cache decodes the stored keys to fp32
//             at each compression) — no queries, no attention weights.
// Cost:       O(n·d) per compression (anchor, then one cosine per token), plus the
//             cache's decode of the n stored keys; no state.
// When:       any time a head is over budget: prefill and decode. The paper evicts block
//             by block while prefilling; kvc does the same when the host appends the prompt
//             in chunks (each append over budget compresses before the next chunk lands).
// Defaults:   recent = 0.
// Choices:    the anchor is recomputed from the stored keys at every compression (it
//             depends on the whole kept set, so no per-token cache can replace it); it is
//             taken over the keys as stored, i.e. after the quantizer. A zero key has no
//             direction: it adds nothing to the anchor and its cosine is 0 (torch's eps
//             clamps give the same).
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

namespace kvc::evict {

class KeyDiff {
 public:
  struct Options {
    std::size_t recent = 0;  // newest tokens always kept (0: none, as in the paper)
  };
  struct HeadState {};
  static constexpr bool evicts = true;
  static constexpr bool scores_stored_keys = true;
  static constexpr std::string_view name() noexcept { return "key_diff"; }

  constexpr KeyDiff() noexcept = default;
  constexpr explicit KeyDiff(Options options) noexcept : options_(options) {}
  constexpr const Options& options() const noexcept { return options_; }

  void on_append(HeadState&, const AppendEvent&) const noexcept {}

  void score(const HeadState&, const ScoreContext& context, std::span<float> scores) const {
    const std::size_t d = context.head_dim;
    const std::size_t n = d == 0 ? 0 : std::min(scores.size(), context.keys.size() / d);
    if (n == 0) return;
    const std::size_t recent = std::min(options_.recent, n);
    const auto key = [&](std::size_t i) { return context.keys.subspan(i * d, d); };

    std::vector<double> anchor(d, 0.0);
    for (std::size_t i = 0; i < n; ++i) {
      const double norm = norm_of(key(i));
      if (norm == 0.0) continue;
      for (std::size_t c = 0; c < d; ++c) anchor[c] += key(i)[c] / norm;
    }
    double anchor_norm = 0.0;
    for (double& x : anchor) {
      x /= static_cast<double>(n);
      anchor_norm += x * x;
    }
    anchor_norm = std::sqrt(anchor_norm);

    for (std::size_t i = 0; i < n - recent; ++i) {
      const auto k = key(i);
      const double norm = norm_of(k) * anchor_norm;
      double dot = 0.0;
      for (std::size_t c = 0; c < d; ++c) dot += k[c] * anchor[c];
      scores[i] = norm == 0.0 ? 0.0F : static_cast<float>(-dot / norm);
    }
    for (std::size_t i = n - recent; i < n; ++i) {
      scores[i] = std::numeric_limits<float>::infinity();
    }
  }

  void on_compact(HeadState&, std::span<const std::uint32_t>) const noexcept {}

 private:
  static double norm_of(std::span<const float> k) noexcept {
    double sum = 0.0;
    for (const float x : k) sum += static_cast<double>(x) * x;
    return std::sqrt(sum);
  }

  Options options_{};
};

}  // namespace kvc::evict
