// kvc/evict/expected_attention.hpp — evict::ExpectedAttention: the attention future queries
// are expected to pay, from the statistics of the queries seen so far.
//
// Paper:      Devoto et al., "Expected Attention: KV Cache Compression by Estimating
//             Attention from Future Queries Distribution", 2025 (arXiv 2510.00636);
//             reference: kvpress ExpectedAttentionPress.
// Keeps:      the first `sink` (4) positions (+inf) and the B − sink other tokens with the
//             highest score
//               s_i = mean_{a ∈ group} softmax_{j ∉ sinks}( μ_aᵀk_j/√d + k_jᵀΣ_a k_j/(2d) )[i]
//             where μ_a, Σ_a are the mean and (population) covariance of query head a's
//             queries seen so far — the expected logit of a Gaussian query, so no
//             attention weight is ever computed. The value factor (‖v_i‖ + ε) of the
//             reference is left out: see Choices.
// Needs:      the queries, handed to the scorer before the append they belong to:
//               cache.scorer().stage_queries(cache.geometry(), layer, q);  // [q_heads][m][d]
//               cache.append(seq, layer, k, v);
//             (post-RoPE, as the host attends with them). No attention weights: the scorer
//             is neither ConsumesAttention nor ObservesQueries, so attend() keeps no weights.
// Cost:       stage_queries: O(q_heads·m·d²) for the batch covariance (O(q_heads·m·d)
//             without covariance); append: O(g·d²) per kv head to merge it; compression:
//             the cache decodes the n stored keys (`scores_stored_keys`), then
//             O(g·n·d²) (O(g·n·d) without covariance). State per (layer, kv head):
//             g·(d + d(d+1)/2) floats, independent of n (d = 128, g = 4: 131 KiB).
// When:       prefill and decode, whenever a head is over budget. Queries staged at every
//             step keep the statistics current; staging only the prompt's queries gives
//             kvpress's prefill statistics. A full head re-scores all n tokens at each
//             compression: during decode, CacheOptions::eviction_slack (or compress() every
//             N steps, kvpress DecodingPress style) spreads that cost over many steps.
// Defaults:   sink = 4, covariance on (kvpress: n_sink 4, use_covariance True).
// Choices:
//   * Values. kvpress multiplies by ‖v_i‖ (use_vnorm). AppendEvent carries no values and
//     ScoreContext only keys, so a scorer cannot see them without a core change; kvc scores
//     keys only (as kvpress with use_vnorm = False, where ε has no effect).
//   * Post-RoPE statistics. kvpress takes pre-RoPE queries and rotates μ, Σ by the RoPE
//     rotation averaged over the next 512 positions; kvc never sees pre-RoPE queries or
//     the model's RoPE, so it uses the statistics of the post-RoPE queries the host gives
//     (the deviation ALGORITHMS.md allows).
//   * Which queries. The statistics accumulate over every staged query (Chan's parallel
//     mean/scatter update), leaving out queries at positions < sink (kvpress drops the
//     first n_sink hidden states). kvpress uses the queries of the forward being
//     compressed; staging only the prompt reproduces it. The m staged queries are the
//     last m positions once the append is done (the attend/observe convention), so a
//     prompt chunk stages its own m = count queries.
//   * Staging belongs to the scorer, not to a sequence: the next append of that layer (of
//     any sequence) consumes it, kv head by kv head; stage right before the append. A
//     second stage before the append replaces the first; an append with nothing staged
//     leaves the statistics as they are.
//   * Sinks are positions < sink and are pinned with +inf (kvpress pads them with the max
//     score). The softmax runs over the other stored tokens only.
//   * A head with no statistics yet scores every non-sink token alike: ties keep the
//     newest, i.e. it behaves as StreamingLLM.
//   * Scores use the stored keys (after the quantizer), decoded at each compression;
//     the statistics live in float, merged in double.
#pragma once

#include <kvc/core/element.hpp>
#include <kvc/core/error.hpp>
#include <kvc/core/events.hpp>
#include <kvc/core/geometry.hpp>
#include <kvc/core/view.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string_view>
#include <type_traits>
#include <vector>

namespace kvc::evict {

class ExpectedAttention {
 public:
  struct Options {
    std::size_t sink = 4;        // first positions: always kept, their queries left out
    bool use_covariance = true;  // the k_jᵀΣk_j/(2d) term (kvpress use_covariance)
  };
  struct HeadState {
    std::uint64_t queries = 0;  // queries in the statistics (per query head of the group)
    std::vector<float> mean;    // [group][d]
    std::vector<float> scatter;  // [group][d(d+1)/2]: Σ_j (q_j − μ)(q_j − μ)ᵀ, upper, by rows
  };
  static constexpr bool evicts = true;
  static constexpr bool scores_stored_keys = true;
  static constexpr std::string_view name() noexcept { return "expected_attention"; }

  ExpectedAttention() = default;
  explicit ExpectedAttention(Options options) : options_(options) {}
  const Options& options() const noexcept { return options_; }

  // The queries of the next append(…, layer, …): q is [q_heads][m][head_dim], the last m
  // positions of the layer once that append is done. Validated here (shape, finite), so a
  // rejected call changes nothing; nothing of q is retained past the call but its
  // statistics (and its first `sink` rows, which may turn out to be sinks).
  template <class T>
    requires Element<std::remove_const_t<T>>
  void stage_queries(const Geometry& geometry, std::size_t layer, View<T, 3> q) {
    check(geometry, layer, q);
    const std::size_t d = geometry.head_dim, m = q.extent(1);
    Staged batch;
    batch.head_dim = d;
    batch.group = geometry.group_size();
    batch.tokens = m;
    batch.lead = std::min(options_.sink, m);
    batch.pending.assign(geometry.kv_heads, true);
    batch.remaining = geometry.kv_heads;
    batch.lead_rows.resize(geometry.q_heads * batch.lead * d);
    batch.mean.assign(geometry.q_heads * d, 0.0);
    if (options_.use_covariance) batch.scatter.assign(geometry.q_heads * packed(d), 0.0);

    // Rows [lead, m) are past any sink: their batch mean and scatter, per query head.
    const std::size_t rest = m - batch.lead;
    Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic> centered(static_cast<Eigen::Index>(d),
                                                                  static_cast<Eigen::Index>(rest));
    Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic> product;
    for (std::size_t a = 0; a < geometry.q_heads; ++a) {
      for (std::size_t t = 0; t < batch.lead; ++t) {
        for (std::size_t c = 0; c < d; ++c) {
          batch.lead_rows[(a * batch.lead + t) * d + c] = static_cast<float>(q(a, t, c));
        }
      }
      if (rest == 0) continue;
      double* mean = batch.mean.data() + a * d;
      for (std::size_t t = batch.lead; t < m; ++t) {
        for (std::size_t c = 0; c < d; ++c) mean[c] += static_cast<float>(q(a, t, c));
      }
      for (std::size_t c = 0; c < d; ++c) mean[c] /= static_cast<double>(rest);
      if (!options_.use_covariance) continue;
      for (std::size_t t = 0; t < rest; ++t) {
        for (std::size_t c = 0; c < d; ++c) {
          centered(static_cast<Eigen::Index>(c), static_cast<Eigen::Index>(t)) =
              static_cast<float>(static_cast<float>(q(a, batch.lead + t, c)) - mean[c]);
        }
      }
      product.noalias() = centered * centered.transpose();
      double* scatter = batch.scatter.data() + a * packed(d);
      for (std::size_t r = 0, p = 0; r < d; ++r) {
        for (std::size_t c = r; c < d; ++c, ++p) {
          scatter[p] = product(static_cast<Eigen::Index>(r), static_cast<Eigen::Index>(c));
        }
      }
    }
    batch.rest = rest;
    if (staged_.size() <= layer) staged_.resize(layer + 1);
    staged_[layer] = std::move(batch);
  }

  // Whether queries staged for `layer` still wait for an append.
  bool staged(std::size_t layer) const noexcept {
    return layer < staged_.size() && staged_[layer].remaining > 0;
  }

  // Merges the queries staged for this layer into the head's statistics (if any).
  void on_append(HeadState& state, const AppendEvent& event) {
    if (event.layer >= staged_.size()) return;
    Staged& batch = staged_[event.layer];
    if (event.kv_head >= batch.pending.size() || !batch.pending[event.kv_head]) return;
    batch.pending[event.kv_head] = false;
    if (event.head_dim == batch.head_dim) merge(state, batch, event);
    if (--batch.remaining == 0) batch = Staged{};
  }

  void score(const HeadState& state, const ScoreContext& context, std::span<float> scores) const {
    constexpr float keep = std::numeric_limits<float>::infinity();
    const std::size_t n = scores.size();
    const std::size_t d = context.head_dim;
    const auto sink = static_cast<Position>(std::min<std::size_t>(options_.sink, 1U << 30));
    // Non-sink slots; positions ascend, so they are the tail [first, n).
    std::size_t first = 0;
    while (first < n && context.positions[first] < sink) scores[first++] = keep;
    const std::size_t m = n - first;
    if (m == 0) return;
    const std::size_t group = d == 0 ? 0 : state.mean.size() / d;
    if (state.queries == 0 || group == 0 || context.keys.size() < n * d) {
      std::fill(scores.begin() + static_cast<std::ptrdiff_t>(first), scores.end(),
                static_cast<float>(1.0 / static_cast<double>(m)));
      return;
    }

    using Matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    const Eigen::Map<const Matrix> keys(context.keys.data() + first * d,
                                        static_cast<Eigen::Index>(m), static_cast<Eigen::Index>(d));
    const bool covariance = options_.use_covariance && !state.scatter.empty();
    Matrix sigma(static_cast<Eigen::Index>(d), static_cast<Eigen::Index>(d));
    Matrix projected;
    std::vector<double> logits(m), total(m, 0.0);
    const double inverse_sqrt_d = 1.0 / std::sqrt(static_cast<double>(d));
    const double half_inverse_d = 0.5 / static_cast<double>(d);
    for (std::size_t a = 0; a < group; ++a) {
      const Eigen::Map<const Eigen::VectorXf> mean(state.mean.data() + a * d,
                                                   static_cast<Eigen::Index>(d));
      const Eigen::VectorXf linear = keys * mean;
      for (std::size_t j = 0; j < m; ++j) {
        logits[j] = static_cast<double>(linear(static_cast<Eigen::Index>(j))) * inverse_sqrt_d;
      }
      if (covariance) {
        unpack(state.scatter.data() + a * packed(d), d, 1.0F / static_cast<float>(state.queries),
               sigma);
        projected.noalias() = keys * sigma;
        for (std::size_t j = 0; j < m; ++j) {
          const auto row = static_cast<Eigen::Index>(j);
          logits[j] += static_cast<double>(projected.row(row).dot(keys.row(row))) * half_inverse_d;
        }
      }
      const double shift = *std::max_element(logits.begin(), logits.end());
      double sum = 0.0;
      for (double& x : logits) sum += (x = std::exp(x - shift));
      for (std::size_t j = 0; j < m; ++j) total[j] += logits[j] / sum;
    }
    for (std::size_t j = 0; j < m; ++j) {
      scores[first + j] = static_cast<float>(total[j] / static_cast<double>(group));
    }
  }

  // No per-token state: the statistics describe queries, not the stored tokens.
  void on_compact(HeadState&, std::span<const std::uint32_t>) const noexcept {}

  std::size_t state_bytes(const HeadState& state) const noexcept {
    return (state.mean.capacity() + state.scatter.capacity()) * sizeof(float);
  }

 private:
  // Queries staged for one layer: per query head, the batch statistics of rows [lead, m)
  // and the raw rows [0, lead), whose positions (sink or not) the append decides.
  struct Staged {
    std::size_t head_dim = 0, group = 0, tokens = 0, lead = 0, rest = 0;
    std::vector<float> lead_rows;  // [q_heads][lead][d]
    std::vector<double> mean;      // [q_heads][d]
    std::vector<double> scatter;   // [q_heads][d(d+1)/2]
    std::vector<bool> pending;     // per kv head: not merged yet
    std::size_t remaining = 0;
  };

  static constexpr std::size_t packed(std::size_t d) noexcept { return d * (d + 1) / 2; }

  template <class T>
  void check(const Geometry& geometry, std::size_t layer, const View<T, 3>& q) const {
    if (layer >= geometry.layers) {
      detail::fail<ShapeError>("stage_queries: layer {} out of range, cache has {} layers", layer,
                               geometry.layers);
    }
    if (q.extent(0) != geometry.q_heads) {
      detail::fail<ShapeError>("stage_queries: q has {} query heads, cache has {}", q.extent(0),
                               geometry.q_heads);
    }
    if (q.extent(2) != geometry.head_dim) {
      detail::fail<ShapeError>("stage_queries: q has head_dim {}, cache has {}", q.extent(2),
                               geometry.head_dim);
    }
    if (q.extent(1) == 0) detail::fail<ShapeError>("stage_queries: q has 0 tokens");
    if (q.data() == nullptr) {
      detail::fail<ShapeError>("stage_queries: q has {} tokens but no data", q.extent(1));
    }
    for (std::size_t a = 0; a < q.extent(0); ++a) {
      for (std::size_t t = 0; t < q.extent(1); ++t) {
        for (std::size_t c = 0; c < q.extent(2); ++c) {
          const auto x = static_cast<float>(q(a, t, c));
          if (!std::isfinite(x)) {
            detail::fail<ValueError>("stage_queries: q[{}][{}][{}] is {}, queries must be finite",
                                     a, t, c, x);
          }
        }
      }
    }
  }

  // Chan et al.'s parallel update of (count, mean, scatter) with a batch of `count` rows.
  static void combine(std::uint64_t queries, std::uint64_t count, float* mean, float* scatter,
                      const double* batch_mean, const double* batch_scatter, std::size_t d,
                      std::vector<double>& delta) {
    const double total = static_cast<double>(queries + count);
    const double weight = static_cast<double>(count) / total;
    const double cross = static_cast<double>(queries) * static_cast<double>(count) / total;
    delta.resize(d);
    for (std::size_t c = 0; c < d; ++c) {
      delta[c] = batch_mean[c] - static_cast<double>(mean[c]);
      mean[c] = static_cast<float>(static_cast<double>(mean[c]) + delta[c] * weight);
    }
    if (scatter == nullptr) return;
    for (std::size_t r = 0, p = 0; r < d; ++r) {
      for (std::size_t c = r; c < d; ++c, ++p) {
        const double extra = batch_scatter == nullptr ? 0.0 : batch_scatter[p];
        scatter[p] = static_cast<float>(static_cast<double>(scatter[p]) + extra +
                                        delta[r] * delta[c] * cross);
      }
    }
  }

  void merge(HeadState& state, const Staged& batch, const AppendEvent& event) const {
    const std::size_t d = batch.head_dim, group = batch.group;
    const std::size_t first_head = event.kv_head * group;
    if (state.mean.size() != group * d) {
      state.queries = 0;
      state.mean.assign(group * d, 0.0F);
      state.scatter.assign(options_.use_covariance ? group * packed(d) : 0, 0.0F);
    }
    // Position of staged row t: the rows are the last `tokens` positions after the append.
    const auto end =
        static_cast<std::int64_t>(event.first_position) + static_cast<std::int64_t>(event.count);
    const std::int64_t first_row = end - static_cast<std::int64_t>(batch.tokens);
    const bool covariance = !state.scatter.empty();
    std::vector<double> row(d), delta;
    std::uint64_t queries = state.queries;
    for (std::size_t t = 0; t < batch.lead; ++t) {
      if (first_row + static_cast<std::int64_t>(t) < static_cast<std::int64_t>(options_.sink)) {
        continue;
      }
      for (std::size_t a = 0; a < group; ++a) {
        const float* source = batch.lead_rows.data() + ((first_head + a) * batch.lead + t) * d;
        std::copy(source, source + d, row.begin());
        combine(queries, 1, state.mean.data() + a * d,
                covariance ? state.scatter.data() + a * packed(d) : nullptr, row.data(), nullptr, d,
                delta);
      }
      ++queries;
    }
    if (batch.rest > 0) {
      for (std::size_t a = 0; a < group; ++a) {
        const std::size_t head = first_head + a;
        combine(queries, batch.rest, state.mean.data() + a * d,
                covariance ? state.scatter.data() + a * packed(d) : nullptr,
                batch.mean.data() + head * d,
                batch.scatter.empty() ? nullptr : batch.scatter.data() + head * packed(d), d,
                delta);
      }
      queries += batch.rest;
    }
    state.queries = queries;
  }

  // Full symmetric d×d matrix from the packed upper triangle, times `scale`.
  template <class Matrix>
  static void unpack(const float* packed_upper, std::size_t d, float scale, Matrix& out) {
    for (std::size_t r = 0, p = 0; r < d; ++r) {
      for (std::size_t c = r; c < d; ++c, ++p) {
        const float x = packed_upper[p] * scale;
        out(static_cast<Eigen::Index>(r), static_cast<Eigen::Index>(c)) = x;
        out(static_cast<Eigen::Index>(c), static_cast<Eigen::Index>(r)) = x;
      }
    }
  }

  Options options_{};
  std::vector<Staged> staged_;  // per layer
};

}  // namespace kvc::evict
