// Tests of kvc/evict/external.hpp: a hand-checked kept set, unscored tokens and supply
// checks, a float64 re-implementation over a chunked prefill and decode, decode invariants
// and bytes, and the composition with PyramidKV and Q8_0.
#include <kvc/evict/external.hpp>

#include <kvc/budget/pyramid_kv.hpp>
#include <kvc/core/concepts.hpp>
#include <kvc/core/kv_cache.hpp>
#include <kvc/quant/q8_0.hpp>

#include <catch2/catch.hpp>

#include "../support/reference.hpp"

#include <algorithm>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

namespace {

using kvc::Position;
using kvc::evict::External;
using kvc::test::random_tensor;
using kvc::test::Tensor3;
using ExternalCache = kvc::KvCache<External>;

static_assert(kvc::EvictionScorer<External>);
static_assert(kvc::ReportsStateBytes<External>);
static_assert(!kvc::ConsumesAttention<External>);
static_assert(!kvc::ObservesQueries<External>);

using kvc::test::iota_positions;

std::vector<float> random_scores(std::mt19937& rng, std::size_t n) {
  std::normal_distribution<float> normal(0.0F, 1.0F);
  std::vector<float> scores(n);
  for (float& x : scores) x = normal(rng);
  return scores;
}

// External in float64: sinks and the recent window stay, then the highest scores.
struct ReferenceExternal {
  std::size_t sink, recent;
  std::vector<Position> positions;
  std::vector<double> scores;

  void append(const std::vector<float>& supplied, std::size_t first) {
    for (std::size_t t = 0; t < supplied.size(); ++t) {
      positions.push_back(static_cast<Position>(first + t));
      scores.push_back(supplied[t]);
    }
  }
  void compress(std::size_t budget) {
    const std::size_t n = positions.size();
    if (n <= budget) return;
    std::vector<double> ranked(n);
    for (std::size_t i = 0; i < n; ++i) {
      const bool pinned = static_cast<std::size_t>(positions[i]) < sink || i + recent >= n;
      ranked[i] = pinned ? INFINITY : scores[i];
    }
    std::vector<std::size_t> order(n);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
      return ranked[a] != ranked[b] ? ranked[a] > ranked[b] : a > b;
    });
    order.resize(budget);
    std::sort(order.begin(), order.end());
    std::vector<Position> kept_positions;
    std::vector<double> kept_scores;
    for (std::size_t i : order) {
      kept_positions.push_back(positions[i]);
      kept_scores.push_back(scores[i]);
    }
    positions = std::move(kept_positions);
    scores = std::move(kept_scores);
  }
};

}  // namespace

TEST_CASE("External on a hand-checked case: sinks, recent and the best supplied scores",
          "[external]") {
  // 10 tokens, sink 2, recent 2, budget 6: positions 0, 1 and 8, 9 stay whatever their
  // scores; of 2..7 (scores 5, 1, 7, 3, 6, 2) the two best are 4 (7) and 6 (6).
  const kvc::Geometry geometry{.layers = 1, .q_heads = 2, .kv_heads = 1, .head_dim = 4};
  ExternalCache cache(geometry, {.budget = kvc::Budget::tokens(6)},
                      External({.sink = 2, .recent = 2}));
  const auto seq = cache.open_sequence();
  const std::vector<float> scores{-9, -9, 5, 1, 7, 3, 6, 2, -9, -9};
  cache.scorer().supply(0, 0, scores);
  CHECK(cache.scorer().supplied(0, 0));
  std::mt19937 rng(1);
  cache.append(seq, 0, random_tensor(rng, 1, 10, 4).view(), random_tensor(rng, 1, 10, 4).view());
  CHECK_FALSE(cache.scorer().supplied(0, 0));
  CHECK(cache.scorer_state(seq, 0, 0).scores == scores);
  cache.compress(seq);
  CHECK(cache.positions(seq, 0, 0) == std::vector<Position>{0, 1, 4, 6, 8, 9});
  CHECK(cache.scorer_state(seq, 0, 0).scores == std::vector<float>{-9, -9, 7, 6, -9, -9});
  CHECK(cache.scorer_state(seq, 0, 0).unscored == 0);
}

TEST_CASE("External gives unscored tokens the default and counts them", "[external]") {
  const kvc::Geometry geometry{.layers = 1, .q_heads = 2, .kv_heads = 2, .head_dim = 4};
  std::mt19937 rng(2);
  ExternalCache cache(geometry, {.budget = kvc::Budget::tokens(6), .auto_compress = false},
                      External({.sink = 1, .recent = 1}));
  const auto seq = cache.open_sequence();
  // kv head 0 gets its 8 scores; kv head 1 a supply of the wrong length (none is used).
  cache.scorer().supply(0, 0, std::vector<float>{0, 1, 2, 3, 4, 5, 6, 7});
  cache.scorer().supply(0, 1, std::vector<float>{0, 1, 2});
  cache.append(seq, 0, random_tensor(rng, 2, 8, 4).view(), random_tensor(rng, 2, 8, 4).view());
  CHECK_FALSE(cache.scorer().supplied(0, 1));
  CHECK(cache.scorer_state(seq, 0, 0).unscored == 0);
  CHECK(cache.scorer_state(seq, 0, 1).unscored == 8);
  // Then 4 tokens with nothing supplied: −inf, so they go first (past the recent one).
  cache.append(seq, 0, random_tensor(rng, 2, 4, 4).view(), random_tensor(rng, 2, 4, 4).view());
  CHECK(cache.scorer_state(seq, 0, 0).unscored == 4);
  cache.compress(seq);
  // Head 0: sink 0, recent 11, then the best scored: 7, 6, 5, 4.
  CHECK(cache.positions(seq, 0, 0) == std::vector<Position>{0, 4, 5, 6, 7, 11});
  // Head 1: everything unscored ties at −inf: the sink, the recent token, then the newest.
  CHECK(cache.positions(seq, 0, 1) == std::vector<Position>{0, 7, 8, 9, 10, 11});

  // A neutral default instead keeps scored tokens above 0 and unscored ones above the rest.
  ExternalCache neutral(geometry, {.budget = kvc::Budget::tokens(4), .auto_compress = false},
                        External({.sink = 0, .recent = 0, .unscored = 0.0F}));
  const auto other = neutral.open_sequence();
  for (std::size_t h = 0; h < 2; ++h)
    neutral.scorer().supply(0, h, std::vector<float>{-1, 2, -3, 4});
  neutral.append(other, 0, random_tensor(rng, 2, 4, 4).view(), random_tensor(rng, 2, 4, 4).view());
  neutral.append(other, 0, random_tensor(rng, 2, 2, 4).view(), random_tensor(rng, 2, 2, 4).view());
  neutral.compress(other);
  CHECK(neutral.positions(other, 0, 0) == std::vector<Position>{1, 3, 4, 5});
}

TEST_CASE("External supply rejects NaN and empty scores", "[external]") {
  External scorer;
  CHECK_THROWS_AS(scorer.supply(0, 0, std::vector<float>{}), kvc::ShapeError);
  CHECK_THROWS_AS(
      scorer.supply(0, 0, std::vector<float>{1, std::numeric_limits<float>::quiet_NaN()}),
      kvc::ValueError);
  CHECK_FALSE(scorer.supplied(0, 0));
  scorer.supply(3, 2, std::vector<float>{std::numeric_limits<float>::infinity()});
  CHECK(scorer.supplied(3, 2));
  CHECK_FALSE(scorer.supplied(3, 1));
}

TEST_CASE("External matches a float64 re-implementation through prefill and decode", "[external]") {
  const std::size_t recent = GENERATE(0, 8);
  const std::size_t budget = GENERATE(24, 41);
  CAPTURE(recent, budget);
  const kvc::Geometry geometry{.layers = 1, .q_heads = 4, .kv_heads = 2, .head_dim = 16};
  std::mt19937 rng(static_cast<unsigned>(recent * 100 + budget));
  ExternalCache cache(geometry, {.budget = kvc::Budget::tokens(budget), .page_tokens = 8},
                      External({.sink = 4, .recent = recent}));
  const auto seq = cache.open_sequence();
  std::vector<ReferenceExternal> reference(2, ReferenceExternal{4, recent, {}, {}});
  std::vector<std::size_t> chunks{30, 20, 25};
  chunks.insert(chunks.end(), 40, 1);
  std::size_t seen = 0;
  for (const std::size_t n : chunks) {
    for (std::size_t h = 0; h < 2; ++h) {
      const auto scores = random_scores(rng, n);
      cache.scorer().supply(0, h, scores);
      reference[h].append(scores, seen);
    }
    Tensor3 out(4, n, 16);
    cache.append(seq, 0, random_tensor(rng, 2, n, 16).view(), random_tensor(rng, 2, n, 16).view());
    cache.attend(seq, 0, random_tensor(rng, 4, n, 16).view(), out.mutable_view());
    seen += n;
    for (std::size_t h = 0; h < 2; ++h) {
      CAPTURE(seen, h);
      reference[h].compress(budget);
      REQUIRE(cache.positions(seq, 0, h) == reference[h].positions);
      const auto& stored = cache.scorer_state(seq, 0, h).scores;
      REQUIRE(std::equal(stored.begin(), stored.end(), reference[h].scores.begin(),
                         reference[h].scores.end()));
    }
  }
}

TEST_CASE("External through decode: sinks and recent kept, budget held, bytes freed",
          "[external]") {
  const kvc::Geometry geometry{.layers = 2, .q_heads = 4, .kv_heads = 2, .head_dim = 64};
  std::mt19937 rng(3);
  constexpr std::size_t prompt = 256, budget = 96, recent = 32;
  ExternalCache cache(geometry, {.budget = kvc::Budget::tokens(budget), .page_tokens = 16},
                      External({.recent = recent}));
  kvc::KvCache<> full(geometry, {.page_tokens = 16});
  const auto seq = cache.open_sequence();
  const auto full_seq = full.open_sequence();
  for (std::size_t step = 0; step <= 30; ++step) {
    const std::size_t n = step == 0 ? prompt : 1;
    for (std::size_t l = 0; l < 2; ++l) {
      const Tensor3 k = random_tensor(rng, 2, n, 64), v = random_tensor(rng, 2, n, 64);
      for (std::size_t h = 0; h < 2; ++h) cache.scorer().supply(l, h, random_scores(rng, n));
      Tensor3 out(4, n, 64);
      cache.append(seq, l, k.view(), v.view());
      cache.attend(seq, l, random_tensor(rng, 4, n, 64).view(), out.mutable_view());
      full.append(full_seq, l, k.view(), v.view());
      for (std::size_t h = 0; h < 2; ++h) {
        const auto positions = cache.positions(seq, l, h);
        const auto seen = static_cast<Position>(cache.tokens_seen(seq, l));
        REQUIRE(positions.size() == budget);
        REQUIRE(std::vector<Position>(positions.begin(), positions.begin() + 4) ==
                iota_positions(0, 3));
        const auto tail = iota_positions(seen - static_cast<Position>(recent), seen - 1);
        REQUIRE(std::includes(positions.begin(), positions.end(), tail.begin(), tail.end()));
      }
    }
  }
  const auto stats = cache.stats();
  const auto full_stats = full.stats();
  CHECK(stats.tokens_stored == 2 * 2 * budget);
  CHECK(stats.pages_in_use == 2 * 2 * (budget / 16));
  CHECK(stats.page_bytes * 2 < full_stats.page_bytes);
  CHECK(stats.metadata_bytes >= stats.tokens_stored * sizeof(float));
  CHECK(stats.bytes_held() < full_stats.bytes_held());
}

TEST_CASE("External composes with PyramidKV and Q8_0", "[external]") {
  using Cache = kvc::KvCache<External, kvc::quant::Q8_0, kvc::retrieval::Exhaustive,
                             kvc::offload::None, kvc::budget::PyramidKV>;
  constexpr std::size_t layers = 4, prompt = 200;
  const kvc::Geometry geometry{.layers = layers, .q_heads = 4, .kv_heads = 2, .head_dim = 32};
  const kvc::budget::PyramidKV planner({.window = 8});
  Cache cache(geometry, {.budget = kvc::Budget::tokens(48)}, External({.recent = 8}), {}, {}, {},
              planner);
  const auto seq = cache.open_sequence();
  std::mt19937 rng(4);
  std::vector<std::vector<ReferenceExternal>> reference(layers);
  for (std::size_t layer = 0; layer < layers; ++layer) {
    for (std::size_t h = 0; h < 2; ++h) {
      const auto scores = random_scores(rng, prompt);
      cache.scorer().supply(layer, h, scores);
      reference[layer].push_back(ReferenceExternal{4, 8, {}, {}});
      reference[layer][h].append(scores, 0);
    }
    Tensor3 out(4, prompt, 32);
    cache.append(seq, layer, random_tensor(rng, 2, prompt, 32).view(),
                 random_tensor(rng, 2, prompt, 32).view());
    cache.attend(seq, layer, random_tensor(rng, 4, prompt, 32).view(), out.mutable_view());
  }
  const auto stats = cache.stats();
  std::size_t stored = 0;
  for (std::size_t layer = 0; layer < layers; ++layer) {
    const std::size_t planned = planner.layer_budget(layer, layers, 48, prompt);
    for (std::size_t h = 0; h < 2; ++h) {
      CAPTURE(layer, h, planned);
      reference[layer][h].compress(planned);
      CHECK(cache.positions(seq, layer, h) == reference[layer][h].positions);
      stored += planned;
    }
  }
  CHECK(stats.tokens_stored == stored);
  CHECK(stats.code_bytes == stored * cache.bytes_per_token());
  CHECK(cache.bytes_per_token() == 2 * 34);  // one Q8_0 block each for K and V
}
