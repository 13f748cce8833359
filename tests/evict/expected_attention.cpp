// Tests of kvc/evict/expected_attention.hpp: a hand-checked kept set (with and without the
// covariance term, sink queries left out), staging checks, a float64 re-implementation
// driven through a real KvCache (chunked prefill + decode, GQA), decode invariants and
// bytes, and the composition with PyramidKV and Int8.
#include <kvc/evict/expected_attention.hpp>

#include <kvc/budget/pyramid_kv.hpp>
#include <kvc/core/concepts.hpp>
#include <kvc/core/kv_cache.hpp>
#include <kvc/quant/int8.hpp>

#include <catch2/catch.hpp>

#include "../support/reference.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

namespace {

using kvc::Position;
using kvc::evict::ExpectedAttention;
using kvc::test::random_tensor;
using kvc::test::Tensor3;
using ExpectedCache = kvc::KvCache<ExpectedAttention>;

static_assert(kvc::EvictionScorer<ExpectedAttention>);
static_assert(kvc::ScoresStoredKeys<ExpectedAttention>);
static_assert(kvc::ReportsStateBytes<ExpectedAttention>);
// No attention weights at all: attend() keeps none for this scorer, observe() is unused.
static_assert(!kvc::ConsumesAttention<ExpectedAttention>);
static_assert(!kvc::ObservesQueries<ExpectedAttention>);

constexpr float inf = std::numeric_limits<float>::infinity();

// Indices of the `budget` highest scores (ties: the later index), ascending — the cache's
// selection rule, for references that score a list of tokens in position order.
std::vector<std::size_t> top(const std::vector<double>& scores, std::size_t budget) {
  std::vector<std::size_t> order(scores.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    return scores[a] != scores[b] ? scores[a] > scores[b] : a > b;
  });
  order.resize(std::min(budget, order.size()));
  std::sort(order.begin(), order.end());
  return order;
}

// ExpectedAttention for one kv head, written out from kvpress in float64: every query seen
// at a position ≥ sink is kept per query head of the group; at scoring time the mean and
// population covariance give the expected logits, a softmax over the non-sink tokens per
// query head, the mean over the group; sinks stay.
struct ReferenceExpected {
  std::size_t sink, dim, group;
  bool covariance;
  std::vector<Position> positions;
  std::vector<std::vector<double>> keys;
  std::vector<std::vector<std::vector<double>>> queries;  // [group][query][dim]

  void append(const Tensor3& k, std::size_t kv_head, std::size_t first) {
    for (std::size_t t = 0; t < k.tokens; ++t) {
      positions.push_back(static_cast<Position>(first + t));
      std::vector<double> key(dim);
      for (std::size_t c = 0; c < dim; ++c) key[c] = k.at(kv_head, t, c);
      keys.push_back(key);
    }
  }
  // q: [q_heads][m][dim], the last m positions once `seen` tokens have been appended.
  void add_queries(const Tensor3& q, std::size_t kv_head, std::size_t seen) {
    queries.resize(group);
    for (std::size_t t = 0; t < q.tokens; ++t) {
      if (seen - q.tokens + t < sink) continue;
      for (std::size_t a = 0; a < group; ++a) {
        std::vector<double> row(dim);
        for (std::size_t c = 0; c < dim; ++c) row[c] = q.at(kv_head * group + a, t, c);
        queries[a].push_back(row);
      }
    }
  }
  std::vector<double> scores() const {
    const std::size_t n = positions.size();
    std::vector<double> result(n, 0.0);
    std::vector<std::size_t> scored;
    for (std::size_t i = 0; i < n; ++i) {
      if (static_cast<std::size_t>(positions[i]) < sink) {
        result[i] = INFINITY;
      } else {
        scored.push_back(i);
      }
    }
    if (queries.empty() || queries[0].empty()) {
      for (std::size_t i : scored) result[i] = 1.0 / static_cast<double>(scored.size());
      return result;
    }
    for (std::size_t a = 0; a < group; ++a) {
      const auto& rows = queries[a];
      const double count = static_cast<double>(rows.size());
      std::vector<double> mu(dim, 0.0);
      for (const auto& row : rows) {
        for (std::size_t c = 0; c < dim; ++c) mu[c] += row[c] / count;
      }
      std::vector<double> sigma(dim * dim, 0.0);
      for (const auto& row : rows) {
        for (std::size_t r = 0; r < dim; ++r) {
          for (std::size_t c = 0; c < dim; ++c) {
            sigma[r * dim + c] += (row[r] - mu[r]) * (row[c] - mu[c]) / count;
          }
        }
      }
      std::vector<double> logits;
      for (std::size_t i : scored) {
        double linear = 0, quadratic = 0;
        for (std::size_t r = 0; r < dim; ++r) {
          linear += mu[r] * keys[i][r];
          for (std::size_t c = 0; c < dim; ++c) {
            quadratic += keys[i][r] * sigma[r * dim + c] * keys[i][c];
          }
        }
        logits.push_back(linear / std::sqrt(double(dim)) +
                         (covariance ? quadratic / (2.0 * double(dim)) : 0.0));
      }
      const double shift = *std::max_element(logits.begin(), logits.end());
      double total = 0;
      for (double& x : logits) total += (x = std::exp(x - shift));
      for (std::size_t j = 0; j < scored.size(); ++j) {
        result[scored[j]] += logits[j] / total / static_cast<double>(group);
      }
    }
    return result;
  }
  void compress(std::size_t budget) {
    if (positions.size() <= budget) return;
    const auto kept = top(scores(), budget);
    std::vector<Position> new_positions;
    std::vector<std::vector<double>> new_keys;
    for (std::size_t i : kept) {
      new_positions.push_back(positions[i]);
      new_keys.push_back(keys[i]);
    }
    positions = std::move(new_positions);
    keys = std::move(new_keys);
  }
};

// Queries with a common offset, so that the mean term matters as well as the covariance.
Tensor3 offset_queries(std::mt19937& rng, std::size_t heads, std::size_t tokens, std::size_t dim) {
  Tensor3 q = random_tensor(rng, heads, tokens, dim);
  for (std::size_t h = 0; h < heads; ++h) {
    for (std::size_t t = 0; t < tokens; ++t) {
      for (std::size_t c = 0; c < dim; ++c) {
        q.at(h, t, c) += 0.8F * std::sin(static_cast<float>(c + 3 * h));
      }
    }
  }
  return q;
}

}  // namespace

TEST_CASE("ExpectedAttention on a hand-checked case: mean, covariance and a left-out sink",
          "[expected_attention]") {
  // d = 2, sink 1. Staged queries: position 0 (a sink: left out) is (100, 100), then (2, 0),
  // (0, 0), (2, 0), (0, 0): μ = (1, 0), Σ = diag(1, 0). Expected logit of key k:
  // k0/√2 + k0²/4. Keys at positions 1..4: (−4, 0) → −2.828 + 4 = 1.172; (1, 0) → 0.957;
  // (0, 5) → 0; (−1, 3) → −0.457. Budget 3 keeps the sink and positions 1, 2. Without the
  // covariance the logits are −2.828, 0.707, 0, −0.707: positions 2 and 3.
  const bool covariance = GENERATE(true, false);
  CAPTURE(covariance);
  const kvc::Geometry geometry{.layers = 1, .q_heads = 1, .kv_heads = 1, .head_dim = 2};
  ExpectedCache cache(geometry, {.budget = kvc::Budget::tokens(3), .auto_compress = false},
                      ExpectedAttention({.sink = 1, .use_covariance = covariance}));
  const auto seq = cache.open_sequence();
  Tensor3 k(1, 5, 2), q(1, 5, 2);
  const float keys[5][2] = {{9, 9}, {-4, 0}, {1, 0}, {0, 5}, {-1, 3}};
  const float queries[5][2] = {{100, 100}, {2, 0}, {0, 0}, {2, 0}, {0, 0}};
  for (std::size_t t = 0; t < 5; ++t) {
    for (std::size_t c = 0; c < 2; ++c) {
      k.at(0, t, c) = keys[t][c];
      q.at(0, t, c) = queries[t][c];
    }
  }
  cache.scorer().stage_queries(geometry, 0, q.view());
  CHECK(cache.scorer().staged(0));
  cache.append(seq, 0, k.view(), k.view());
  CHECK_FALSE(cache.scorer().staged(0));

  const auto& state = cache.scorer_state(seq, 0, 0);
  CHECK(state.queries == 4);
  REQUIRE(state.mean.size() == 2);
  CHECK(state.mean[0] == Approx(1.0));
  CHECK(state.mean[1] == Approx(0.0).margin(1e-7));
  if (covariance) {
    REQUIRE(state.scatter.size() == 3);  // packed upper triangle of the 2×2 scatter
    CHECK(state.scatter[0] == Approx(4.0));
    CHECK(state.scatter[1] == Approx(0.0).margin(1e-6));
    CHECK(state.scatter[2] == Approx(0.0).margin(1e-6));
  } else {
    CHECK(state.scatter.empty());
  }

  // The scores themselves: the softmax of the four logits.
  std::vector<double> logits =
      covariance
          ? std::vector<double>{-4 / std::sqrt(2.0) + 4.0, 1 / std::sqrt(2.0) + 0.25, 0.0,
                                -1 / std::sqrt(2.0) + 0.25}
          : std::vector<double>{-4 / std::sqrt(2.0), 1 / std::sqrt(2.0), 0.0, -1 / std::sqrt(2.0)};
  double total = 0;
  for (double& x : logits) total += (x = std::exp(x));
  std::vector<float> scores(5);
  const std::vector<Position> positions{0, 1, 2, 3, 4};
  std::vector<float> stored_keys(&keys[0][0], &keys[0][0] + 10);
  cache.scorer().score(state, kvc::ScoreContext{0, 0, positions, 3, 5, stored_keys, 2}, scores);
  CHECK(scores[0] == inf);
  for (std::size_t i = 0; i < 4; ++i) CHECK(scores[i + 1] == Approx(logits[i] / total));

  cache.compress(seq);
  CHECK(cache.positions(seq, 0, 0) ==
        (covariance ? std::vector<Position>{0, 1, 2} : std::vector<Position>{0, 2, 3}));
}

TEST_CASE("ExpectedAttention staging rejects bad queries and leaves nothing behind",
          "[expected_attention]") {
  const kvc::Geometry geometry{.layers = 2, .q_heads = 4, .kv_heads = 2, .head_dim = 8};
  ExpectedAttention scorer;
  std::mt19937 rng(1);
  CHECK_THROWS_AS(scorer.stage_queries(geometry, 0, random_tensor(rng, 2, 3, 8).view()),
                  kvc::ShapeError);
  CHECK_THROWS_AS(scorer.stage_queries(geometry, 0, random_tensor(rng, 4, 3, 4).view()),
                  kvc::ShapeError);
  CHECK_THROWS_AS(scorer.stage_queries(geometry, 2, random_tensor(rng, 4, 3, 8).view()),
                  kvc::ShapeError);
  CHECK_THROWS_AS(scorer.stage_queries(geometry, 0, Tensor3(4, 0, 8).view()), kvc::ShapeError);
  Tensor3 nan = random_tensor(rng, 4, 3, 8);
  nan.at(3, 2, 7) = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_AS(scorer.stage_queries(geometry, 1, nan.view()), kvc::ValueError);
  CHECK_FALSE(scorer.staged(0));
  CHECK_FALSE(scorer.staged(1));

  // Staged queries wait for the append of their layer, kv head by kv head.
  kvc::KvCache<ExpectedAttention> cache(geometry);
  const auto seq = cache.open_sequence();
  cache.scorer().stage_queries(geometry, 1, random_tensor(rng, 4, 6, 8).view());
  cache.append(seq, 0, random_tensor(rng, 2, 6, 8).view(), random_tensor(rng, 2, 6, 8).view());
  CHECK(cache.scorer().staged(1));
  CHECK(cache.scorer_state(seq, 0, 0).queries == 0);
  cache.append(seq, 1, random_tensor(rng, 2, 6, 8).view(), random_tensor(rng, 2, 6, 8).view());
  CHECK_FALSE(cache.scorer().staged(1));
  CHECK(cache.scorer_state(seq, 1, 0).queries == 2);  // positions 4, 5: past the 4 sinks
  CHECK(cache.scorer_state(seq, 1, 1).queries == 2);
}

TEST_CASE("ExpectedAttention matches a float64 re-implementation through prefill and decode",
          "[expected_attention]") {
  const std::size_t group = GENERATE(1, 3);
  const bool covariance = GENERATE(true, false);
  CAPTURE(group, covariance);
  constexpr std::size_t dim = 32, kv_heads = 2, budget = 48, sink = 4;
  const kvc::Geometry geometry{
      .layers = 1, .q_heads = kv_heads * group, .kv_heads = kv_heads, .head_dim = dim};
  std::mt19937 rng(static_cast<unsigned>(100 * group + (covariance ? 1 : 0)));
  ExpectedCache cache(geometry, {.budget = kvc::Budget::tokens(budget), .page_tokens = 16},
                      ExpectedAttention({.sink = sink, .use_covariance = covariance}));
  const auto seq = cache.open_sequence();
  std::vector<ReferenceExpected> reference(
      kv_heads, ReferenceExpected{sink, dim, group, covariance, {}, {}, {}});

  // A chunked prompt (the first chunk holds only sinks, the second starts with two), then
  // one token per decode step; the host stages each chunk's queries before appending it.
  std::vector<std::size_t> chunks{2, 38, 25, 35};
  chunks.insert(chunks.end(), 30, 1);
  std::size_t seen = 0;
  for (const std::size_t n : chunks) {
    const Tensor3 k = random_tensor(rng, kv_heads, n, dim);
    const Tensor3 q = offset_queries(rng, geometry.q_heads, n, dim);
    Tensor3 out(geometry.q_heads, n, dim);
    cache.scorer().stage_queries(geometry, 0, q.view());
    cache.append(seq, 0, k.view(), random_tensor(rng, kv_heads, n, dim).view());
    cache.attend(seq, 0, q.view(), out.mutable_view());  // compresses at its end
    for (std::size_t h = 0; h < kv_heads; ++h) {
      reference[h].append(k, h, seen);
      reference[h].add_queries(q, h, seen + n);
      reference[h].compress(budget);
    }
    seen += n;
    for (std::size_t h = 0; h < kv_heads; ++h) {
      CAPTURE(seen, h);
      REQUIRE(cache.positions(seq, 0, h) == reference[h].positions);
      const auto& state = cache.scorer_state(seq, 0, h);
      REQUIRE(state.queries == (seen > sink ? seen - sink : 0));
      if (state.queries > 0) {
        double mean = 0;
        for (const auto& row : reference[h].queries[group - 1]) mean += row[dim - 1];
        mean /= static_cast<double>(reference[h].queries[group - 1].size());
        REQUIRE(state.mean[(group - 1) * dim + dim - 1] == Approx(mean).epsilon(1e-4).margin(1e-5));
      }
    }
  }
}

TEST_CASE("ExpectedAttention through decode: sinks kept, budget held, bytes counted",
          "[expected_attention]") {
  const kvc::Geometry geometry{.layers = 2, .q_heads = 8, .kv_heads = 2, .head_dim = 64};
  std::mt19937 rng(3);
  constexpr std::size_t prompt = 300, budget = 64;
  ExpectedCache cache(geometry, {.budget = kvc::Budget::tokens(budget), .page_tokens = 16});
  kvc::KvCache<> full(geometry, {.page_tokens = 16});
  const auto seq = cache.open_sequence();
  const auto full_seq = full.open_sequence();
  const auto step = [&](std::size_t n) {
    for (std::size_t l = 0; l < 2; ++l) {
      const Tensor3 k = random_tensor(rng, 2, n, 64);
      const Tensor3 v = random_tensor(rng, 2, n, 64);
      const Tensor3 q = offset_queries(rng, 8, n, 64);
      Tensor3 out(8, n, 64);
      cache.scorer().stage_queries(geometry, l, q.view());
      cache.append(seq, l, k.view(), v.view());
      cache.attend(seq, l, q.view(), out.mutable_view());
      full.append(full_seq, l, k.view(), v.view());
      for (std::size_t h = 0; h < 2; ++h) {
        const auto positions = cache.positions(seq, l, h);
        REQUIRE(positions.size() == std::min(budget, cache.tokens_seen(seq, l)));
        REQUIRE(std::vector<Position>(positions.begin(), positions.begin() + 4) ==
                std::vector<Position>{0, 1, 2, 3});
      }
    }
  };
  step(prompt);
  for (int t = 0; t < 20; ++t) step(1);

  const auto stats = cache.stats();
  const auto full_stats = full.stats();
  CHECK(stats.tokens_stored == 2 * 2 * budget);
  CHECK(stats.pages_in_use == 2 * 2 * (budget / 16));
  CHECK(stats.page_bytes * 4 < full_stats.page_bytes);  // 4 pages per head against 20
  CHECK(stats.bytes_held() < full_stats.bytes_held());
  // Statistics: g = 4 query heads × (64 + 64·65/2) floats per (layer, kv head).
  CHECK(stats.metadata_bytes >= 2 * 2 * 4 * (64 + 64 * 65 / 2) * sizeof(float));
}

TEST_CASE("ExpectedAttention composes with PyramidKV and Int8 (scores on the stored keys)",
          "[expected_attention]") {
  // Pyramid budgets per layer; the kept set is the reference's on the keys the cache
  // stores (int8, decoded), with every query of the prompt in the statistics.
  using Cache = kvc::KvCache<ExpectedAttention, kvc::quant::Int8<>, kvc::retrieval::Exhaustive,
                             kvc::offload::None, kvc::budget::PyramidKV>;
  constexpr std::size_t layers = 4, dim = 32, prompt = 200, group = 2;
  const kvc::Geometry geometry{
      .layers = layers, .q_heads = 2 * group, .kv_heads = 2, .head_dim = dim};
  const kvc::budget::PyramidKV planner({.window = 8});
  Cache cache(geometry, {.budget = kvc::Budget::tokens(48), .auto_compress = false}, {}, {}, {}, {},
              planner);
  const auto seq = cache.open_sequence();
  std::mt19937 rng(4);
  std::vector<std::vector<ReferenceExpected>> reference(layers);
  for (std::size_t layer = 0; layer < layers; ++layer) {
    const Tensor3 k = random_tensor(rng, 2, prompt, dim);
    const Tensor3 q = offset_queries(rng, 2 * group, prompt, dim);
    cache.scorer().stage_queries(geometry, layer, q.view());
    cache.append(seq, layer, k.view(), random_tensor(rng, 2, prompt, dim).view());
    const kvc::DenseLayer dense = cache.export_dense(seq, layer);
    for (std::size_t h = 0; h < 2; ++h) {
      Tensor3 stored(2, prompt, dim);
      std::copy(dense.keys[h].data(), dense.keys[h].data() + prompt * dim,
                stored.data.begin() + static_cast<std::ptrdiff_t>(h * prompt * dim));
      reference[layer].push_back(ReferenceExpected{4, dim, group, true, {}, {}, {}});
      reference[layer][h].append(stored, h, 0);
      reference[layer][h].add_queries(q, h, prompt);
    }
  }
  cache.compress(seq);
  const auto stats = cache.stats();
  std::size_t stored = 0;
  for (std::size_t layer = 0; layer < layers; ++layer) {
    const std::size_t planned = planner.layer_budget(layer, layers, 48, prompt);
    for (std::size_t h = 0; h < 2; ++h) {
      CAPTURE(layer, h, planned);
      reference[layer][h].compress(planned);
      CHECK(cache.positions(seq, layer, h) == reference[layer][h].positions);
      CHECK(stats.tokens(layer, h) == planned);
      stored += planned;
    }
  }
  CHECK(stats.tokens_stored == stored);
  CHECK(stats.code_bytes == stored * cache.bytes_per_token());
}
