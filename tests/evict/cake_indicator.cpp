// Tests of kvc/evict/cake_indicator.hpp: the indicator and pooling on a hand-made event,
// a hand-checked kept set through the cache, a float64 re-implementation (window attention,
// mean + γ·unbiased variance, average pooling, group mean, top-k + window), decode
// invariants and bytes, and the composition with PyramidKV and Int8.
#include <kvc/evict/cake_indicator.hpp>

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
using kvc::evict::CakeIndicator;
using kvc::test::random_tensor;
using kvc::test::Tensor3;
using CakeCache = kvc::KvCache<CakeIndicator>;

static_assert(kvc::EvictionScorer<CakeIndicator>);
static_assert(kvc::ObservesQueries<CakeIndicator>);
static_assert(!kvc::ConsumesAttention<CakeIndicator>);
static_assert(kvc::ReportsStateBytes<CakeIndicator>);

constexpr float inf = std::numeric_limits<float>::infinity();

using kvc::test::iota_positions;

using kvc::test::concat;

// CAKE's indicator in float64 on keys k ([kv_heads][n][dim], positions 0..n-1) of one kv
// head: the last w window queries of each group head attend to all keys (causal inside
// the window); mean + γ·unbiased variance over those rows, average pooling over the
// prefix, group mean; keep the top budget − w prefix tokens and the window.
struct ReferenceCake {
  std::size_t window, kernel;
  double gamma;

  std::vector<double> scores(const Tensor3& k, std::size_t kv_head, const Tensor3& q) const {
    const std::size_t n = k.tokens, dim = k.dim, rows = q.tokens;
    const std::size_t group = q.heads / k.heads;
    const std::size_t w = std::min(window, rows), prefix = n - w;
    std::vector<Position> positions(n);
    std::iota(positions.begin(), positions.end(), 0);
    const float* keys = k.data.data() + kv_head * n * dim;
    std::vector<double> total(prefix, 0.0);
    for (std::size_t a = 0; a < group; ++a) {
      std::vector<std::vector<double>> weights;
      for (std::size_t j = rows - w; j < rows; ++j) {
        std::vector<float> query(dim);
        for (std::size_t c = 0; c < dim; ++c) query[c] = q.at(kv_head * group + a, j, c);
        weights.push_back(kvc::test::reference_weights(query, keys, positions,
                                                       static_cast<Position>(n - rows + j), dim));
      }
      std::vector<double> indicator(prefix);
      for (std::size_t t = 0; t < prefix; ++t) {
        double mean = 0;
        for (const auto& row : weights) mean += row[t] / double(w);
        double variance = 0;
        for (const auto& row : weights) variance += (row[t] - mean) * (row[t] - mean);
        indicator[t] = mean + gamma * (w > 1 ? variance / double(w - 1) : 0.0);
      }
      const auto half = static_cast<std::ptrdiff_t>(kernel / 2);
      for (std::size_t t = 0; t < prefix; ++t) {
        double sum = 0;
        for (std::ptrdiff_t j = std::ptrdiff_t(t) - half; j <= std::ptrdiff_t(t) + half; ++j) {
          if (j >= 0 && j < std::ptrdiff_t(prefix)) sum += indicator[std::size_t(j)];
        }
        total[t] += sum / double(kernel) / double(group);
      }
    }
    return total;
  }

  std::vector<Position> kept(const Tensor3& k, std::size_t kv_head, const Tensor3& q,
                             std::size_t budget) const {
    const auto s = scores(k, kv_head, q);
    std::vector<std::size_t> order(s.size());
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(),
              [&](std::size_t a, std::size_t b) { return s[a] != s[b] ? s[a] > s[b] : a > b; });
    std::vector<Position> result;
    for (std::size_t i = 0; i < budget - (k.tokens - s.size()); ++i) {
      result.push_back(static_cast<Position>(order[i]));
    }
    for (std::size_t t = s.size(); t < k.tokens; ++t) result.push_back(static_cast<Position>(t));
    std::sort(result.begin(), result.end());
    return result;
  }
};

}  // namespace

TEST_CASE("CakeIndicator adds gamma times the unbiased variance, then average-pools",
          "[cake_indicator]") {
  // One head, two window rows over 6 tokens (prefix 4, window 2). Row means over the prefix
  // (0.2, 0.3, 0.2, 0.1), unbiased variances (0.02, 0.08, 0, 0.02): with γ = 200 the
  // indicator is (4.2, 16.3, 0.2, 4.1). Kernel 3 pools it to (20.5, 20.7, 20.6, 4.3) / 3.
  const std::vector<float> rows{0.1F, 0.5F, 0.2F, 0.0F, 0.1F, 0.1F,
                                0.3F, 0.1F, 0.2F, 0.2F, 0.1F, 0.1F};
  const kvc::ObserveEvent event{0, 0, rows, 2, 2, 6};
  CakeIndicator::HeadState state;
  CakeIndicator({.window = 2, .kernel = 1}).on_observe(state, event);
  const std::vector<double> indicator{4.2, 16.3, 0.2, 4.1};
  REQUIRE(state.observed.size() == 6);
  for (std::size_t t = 0; t < 4; ++t)
    CHECK(state.observed[t] == Approx(indicator[t]).epsilon(1e-5));
  CHECK(state.observed[4] == inf);
  CHECK(state.observed[5] == inf);
  CakeIndicator({.window = 2, .kernel = 3}).on_observe(state, event);
  const std::vector<double> pooled{20.5 / 3, 20.7 / 3, 20.6 / 3, 4.3 / 3};
  for (std::size_t t = 0; t < 4; ++t) CHECK(state.observed[t] == Approx(pooled[t]).epsilon(1e-5));

  // A single window row has no variance: the indicator is the row itself.
  CakeIndicator({.window = 1, .kernel = 1})
      .on_observe(state, kvc::ObserveEvent{0, 0, std::span<const float>(rows).subspan(6), 1, 1, 6});
  REQUIRE(state.observed.size() == 6);
  for (std::size_t t = 0; t < 5; ++t) CHECK(state.observed[t] == Approx(rows[6 + t]));
  CHECK(state.observed[5] == inf);

  // Group of 2 (rows a·W + j): the group mean of the two heads' pooled indicators.
  std::vector<float> group_rows(rows);
  group_rows.insert(group_rows.end(), 12, 0.0F);  // head b: all zero, indicator 0
  CakeIndicator({.window = 2, .kernel = 1})
      .on_observe(state, kvc::ObserveEvent{0, 0, group_rows, 4, 2, 6});
  for (std::size_t t = 0; t < 4; ++t) {
    CHECK(state.observed[t] == Approx(indicator[t] / 2).epsilon(1e-5));
  }

  CHECK_THROWS_AS(CakeIndicator({.kernel = 4}), kvc::UnsupportedError);
  CHECK_THROWS_AS(CakeIndicator({.window = 0}), kvc::UnsupportedError);
  CHECK_THROWS_AS(CakeIndicator({.gamma = -1.0}), kvc::UnsupportedError);
}

TEST_CASE("CakeIndicator on a hand-checked case: uniform window attention and pooling edges",
          "[cake_indicator]") {
  // Zero queries attend uniformly: window query j (position 8 + j) gives 1/(9 + j) to every
  // token it sees, so every prefix token 0..7 has the same indicator u = mean + γ·var of
  // (1/9, 1/10, 1/11, 1/12). Pooling (kernel 5, zero padding, divisor 5) lowers the edges:
  // 3u/5, 4u/5, u, u, u, u, 4u/5, 3u/5. Budget 8 keeps the window 8..11 and tokens 2..5.
  const kvc::Geometry geometry{.layers = 1, .q_heads = 2, .kv_heads = 1, .head_dim = 4};
  std::mt19937 rng(11);
  CakeCache cache(geometry, {.budget = kvc::Budget::tokens(8)}, CakeIndicator({.window = 4}));
  const auto seq = cache.open_sequence();
  cache.append(seq, 0, random_tensor(rng, 1, 12, 4).view(), random_tensor(rng, 1, 12, 4).view());
  cache.observe(seq, 0, Tensor3(2, 4, 4).view());
  cache.compress(seq);
  CHECK(cache.positions(seq, 0, 0) == concat(iota_positions(2, 5), iota_positions(8, 11)));
  double mean = 0, variance = 0;
  for (int j = 0; j < 4; ++j) mean += 1.0 / (9 + j) / 4;
  for (int j = 0; j < 4; ++j) variance += (1.0 / (9 + j) - mean) * (1.0 / (9 + j) - mean) / 3;
  const double u = mean + 200 * variance;
  const auto& observed = cache.scorer_state(seq, 0, 0).observed;
  REQUIRE(observed.size() == 8);
  for (std::size_t t = 0; t < 4; ++t) CHECK(observed[t] == Approx(u).epsilon(1e-5));
  for (std::size_t t = 4; t < 8; ++t) CHECK(observed[t] == inf);
}

TEST_CASE("CakeIndicator matches a float64 re-implementation on random prompts",
          "[cake_indicator]") {
  const std::size_t group = GENERATE(1, 4);
  const std::size_t budget = GENERATE(40, 77);
  const double gamma = GENERATE(200.0, 0.0);
  const std::size_t rows = budget == 40 ? 16 : 20;  // 20 queries for a window of 16: last 16
  CAPTURE(group, budget, gamma);
  constexpr std::size_t dim = 32, n = 150;
  const kvc::Geometry geometry{.layers = 1, .q_heads = 2 * group, .kv_heads = 2, .head_dim = dim};
  std::mt19937 rng(static_cast<unsigned>(2000 + group * 100 + budget + (gamma > 0 ? 1 : 0)));
  const CakeIndicator::Options options{.window = 16, .kernel = 5, .gamma = gamma};
  CakeCache cache(geometry, {.budget = kvc::Budget::tokens(budget), .page_tokens = 8},
                  CakeIndicator(options));
  const auto seq = cache.open_sequence();
  const Tensor3 k = random_tensor(rng, 2, n, dim);
  const Tensor3 q = random_tensor(rng, 2 * group, rows, dim, 2.0F);
  cache.append(seq, 0, k.view(), random_tensor(rng, 2, n, dim).view());
  cache.observe(seq, 0, q.view());
  cache.compress(seq);

  const ReferenceCake reference{16, 5, gamma};
  for (std::size_t h = 0; h < 2; ++h) {
    CAPTURE(h);
    const auto expected = reference.kept(k, h, q, budget);
    REQUIRE(cache.positions(seq, 0, h) == expected);
    const auto scores = reference.scores(k, h, q);
    const auto& observed = cache.scorer_state(seq, 0, h).observed;
    REQUIRE(observed.size() == budget);
    for (std::size_t i = 0; i < budget - 16; ++i) {
      REQUIRE(observed[i] ==
              Approx(scores[static_cast<std::size_t>(expected[i])]).epsilon(1e-4).margin(1e-9));
    }
    for (std::size_t i = budget - 16; i < budget; ++i) REQUIRE(observed[i] == inf);
  }
}

TEST_CASE("CakeIndicator through prefill and decode: window kept, budget held, pages freed",
          "[cake_indicator]") {
  const kvc::Geometry geometry{.layers = 2, .q_heads = 8, .kv_heads = 2, .head_dim = 64};
  std::mt19937 rng(13);
  constexpr std::size_t prompt = 300, window = 32, budget = 100;
  CakeCache cache(geometry, {.budget = kvc::Budget::tokens(budget), .page_tokens = 16});
  kvc::KvCache<> full(geometry, {.page_tokens = 16});
  const auto seq = cache.open_sequence();
  const auto full_seq = full.open_sequence();
  const auto prompt_window =
      iota_positions(static_cast<Position>(prompt - window), static_cast<Position>(prompt - 1));
  for (std::size_t step = 0; step <= 20; ++step) {
    const std::size_t n = step == 0 ? prompt : 1;
    for (std::size_t l = 0; l < 2; ++l) {
      const Tensor3 k = random_tensor(rng, 2, n, 64), v = random_tensor(rng, 2, n, 64);
      const Tensor3 q = random_tensor(rng, 8, n, 64);
      Tensor3 out(8, n, 64);
      cache.append(seq, l, k.view(), v.view());
      full.append(full_seq, l, k.view(), v.view());
      if (step == 0) cache.observe(seq, l, q.slice(prompt - window, window));
      cache.attend(seq, l, q.view(), out.mutable_view());
      for (std::size_t h = 0; h < 2; ++h) {
        const auto positions = cache.positions(seq, l, h);
        REQUIRE(positions.size() == budget);
        REQUIRE(std::includes(positions.begin(), positions.end(), prompt_window.begin(),
                              prompt_window.end()));
        // Decode tokens are unobserved (+inf): all of them are still there.
        REQUIRE(positions.back() == static_cast<Position>(prompt + step - 1));
        REQUIRE(cache.scorer_state(seq, l, h).observed.size() == budget - step);
      }
    }
  }
  const auto stats = cache.stats();
  const auto full_stats = full.stats();
  CHECK(stats.tokens_stored == 2 * 2 * budget);
  CHECK(stats.pages_in_use == 2 * 2 * ((budget + 15) / 16));
  CHECK(stats.page_bytes * 2 < full_stats.page_bytes);
  CHECK(stats.metadata_bytes >= 2 * 2 * (budget - 20) * sizeof(float));
  CHECK(stats.bytes_held() < full_stats.bytes_held());
}

TEST_CASE("CakeIndicator composes with PyramidKV and Int8", "[cake_indicator]") {
  // The window attention comes from the int8 keys: the reference runs on the stored keys.
  using Cache = kvc::KvCache<CakeIndicator, kvc::quant::Int8<>, kvc::retrieval::Exhaustive,
                             kvc::offload::None, kvc::budget::PyramidKV>;
  constexpr std::size_t layers = 4, prompt = 200, dim = 32, window = 8;
  const kvc::Geometry geometry{.layers = layers, .q_heads = 4, .kv_heads = 2, .head_dim = dim};
  const kvc::budget::PyramidKV planner({.window = window});
  Cache cache(geometry, {.budget = kvc::Budget::tokens(48)}, CakeIndicator({.window = window}), {},
              {}, {}, planner);
  const auto seq = cache.open_sequence();
  std::mt19937 rng(4);
  const ReferenceCake reference{window, 5, 200.0};
  for (std::size_t layer = 0; layer < layers; ++layer) {
    const Tensor3 q = random_tensor(rng, 4, prompt, dim, 2.0F);
    Tensor3 out(4, prompt, dim);
    cache.append(seq, layer, random_tensor(rng, 2, prompt, dim).view(),
                 random_tensor(rng, 2, prompt, dim).view());
    const kvc::DenseLayer dense = cache.export_dense(seq, layer);
    Tensor3 stored(2, prompt, dim);
    for (std::size_t h = 0; h < 2; ++h) {
      std::copy(dense.keys[h].data(), dense.keys[h].data() + prompt * dim,
                stored.data.begin() + static_cast<std::ptrdiff_t>(h * prompt * dim));
    }
    cache.observe(seq, layer, q.slice(prompt - window, window));
    cache.attend(seq, layer, q.view(), out.mutable_view());  // compresses at its end
    const std::size_t planned = planner.layer_budget(layer, layers, 48, prompt);
    Tensor3 window_q(4, window, dim);
    for (std::size_t a = 0; a < 4; ++a) {
      for (std::size_t j = 0; j < window; ++j) {
        for (std::size_t c = 0; c < dim; ++c)
          window_q.at(a, j, c) = q.at(a, prompt - window + j, c);
      }
    }
    for (std::size_t h = 0; h < 2; ++h) {
      CAPTURE(layer, h, planned);
      CHECK(cache.positions(seq, layer, h) == reference.kept(stored, h, window_q, planned));
      CHECK(cache.tokens(seq, layer, h) == planned);
    }
  }
  CHECK(cache.stats().code_bytes == 2 *
                                        (planner.layer_budget(0, layers, 48, prompt) +
                                         planner.layer_budget(1, layers, 48, prompt) +
                                         planner.layer_budget(2, layers, 48, prompt) +
                                         planner.layer_budget(3, layers, 48, prompt)) *
                                        cache.bytes_per_token());
}
