// Tests of kvc/evict/knorm.hpp: hand-checked norms, the recent option, a float64
// re-implementation over prefill and decode, per-head choices and bytes.
#include <kvc/evict/knorm.hpp>

#include <kvc/core/concepts.hpp>
#include <kvc/core/kv_cache.hpp>

#include <catch2/catch.hpp>

#include "../support/reference.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

namespace {

using kvc::Position;
using kvc::evict::Knorm;
using kvc::test::random_tensor;
using kvc::test::Tensor3;
using KnormCache = kvc::KvCache<Knorm>;

static_assert(kvc::EvictionScorer<Knorm>);
static_assert(kvc::WantsAppendedKeys<Knorm>);
static_assert(!kvc::ScoresStoredKeys<Knorm>);
static_assert(!kvc::ConsumesAttention<Knorm>);

// Keys (c_t, 0, 0, 0): the norm of token t is |c_t|.
Tensor3 keys_along_x(const std::vector<float>& c) {
  Tensor3 k(1, c.size(), 4);
  for (std::size_t t = 0; t < c.size(); ++t) k.at(0, t, 0) = c[t];
  return k;
}

}  // namespace

TEST_CASE("Knorm on a hand-checked case keeps the lowest-norm keys", "[knorm]") {
  // Norms 5, 1, 4, 2, 3, 0.5 (signs do not matter). Budget 3 keeps 1, 3, 5; with
  // recent = 2 it keeps 4, 5 and the lowest norm of the rest, 1.
  const kvc::Geometry geometry{.layers = 1, .q_heads = 2, .kv_heads = 1, .head_dim = 4};
  const std::size_t recent = GENERATE(0, 2);
  CAPTURE(recent);
  std::mt19937 rng(31);
  KnormCache cache(geometry, {.budget = kvc::Budget::tokens(3)}, Knorm({.recent = recent}));
  const auto seq = cache.open_sequence();
  cache.append(seq, 0, keys_along_x({5.0F, -1.0F, 4.0F, 2.0F, -3.0F, 0.5F}).view(),
               random_tensor(rng, 1, 6, 4).view());
  cache.compress(seq);
  const auto& norms = cache.scorer_state(seq, 0, 0).norms;
  if (recent == 0) {
    CHECK(cache.positions(seq, 0, 0) == std::vector<Position>{1, 3, 5});
    CHECK(norms == std::vector<float>{1.0F, 2.0F, 0.5F});
  } else {
    CHECK(cache.positions(seq, 0, 0) == std::vector<Position>{1, 4, 5});
    CHECK(norms == std::vector<float>{1.0F, 3.0F, 0.5F});
  }
}

TEST_CASE("Knorm matches a float64 re-implementation over prefill and decode", "[knorm]") {
  const std::size_t budget = GENERATE(16, 45);
  const std::size_t recent = GENERATE(0, 4);
  CAPTURE(budget, recent);
  const kvc::Geometry geometry{.layers = 1, .q_heads = 4, .kv_heads = 2, .head_dim = 64};
  std::mt19937 rng(static_cast<unsigned>(3000 + budget * 10 + recent));
  KnormCache cache(geometry, {.budget = kvc::Budget::tokens(budget), .page_tokens = 8},
                   Knorm({.recent = recent}));
  const auto seq = cache.open_sequence();
  // Per kv head: norms in float64 and positions, kept by (−norm desc, position desc).
  std::vector<std::vector<Position>> positions(2);
  std::vector<std::vector<double>> norms(2);
  const auto reference_append = [&](const Tensor3& k, std::size_t first) {
    for (std::size_t h = 0; h < 2; ++h) {
      for (std::size_t t = 0; t < k.tokens; ++t) {
        double sum = 0;
        for (std::size_t c = 0; c < k.dim; ++c) sum += double(k.at(h, t, c)) * k.at(h, t, c);
        positions[h].push_back(static_cast<Position>(first + t));
        norms[h].push_back(std::sqrt(sum));
      }
    }
  };
  const auto reference_compress = [&] {
    for (std::size_t h = 0; h < 2; ++h) {
      const std::size_t n = positions[h].size();
      if (n <= budget) continue;
      std::vector<std::size_t> order(n - recent);
      std::iota(order.begin(), order.end(), 0);
      std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
        return norms[h][a] != norms[h][b] ? norms[h][a] < norms[h][b] : a > b;
      });
      order.resize(budget - recent);
      for (std::size_t i = n - recent; i < n; ++i) order.push_back(i);
      std::sort(order.begin(), order.end());
      std::vector<Position> kept_positions;
      std::vector<double> kept_norms;
      for (std::size_t i : order) {
        kept_positions.push_back(positions[h][i]);
        kept_norms.push_back(norms[h][i]);
      }
      positions[h] = std::move(kept_positions);
      norms[h] = std::move(kept_norms);
    }
  };
  // Keys with a per-token scale, so norms spread widely.
  const auto scaled_keys = [&](std::size_t tokens) {
    Tensor3 k = random_tensor(rng, 2, tokens, 64);
    std::uniform_real_distribution<float> scale(0.2F, 2.0F);
    for (std::size_t h = 0; h < 2; ++h) {
      for (std::size_t t = 0; t < tokens; ++t) {
        const float s = scale(rng);
        for (std::size_t c = 0; c < 64; ++c) k.at(h, t, c) *= s;
      }
    }
    return k;
  };

  const Tensor3 k = scaled_keys(100);
  cache.append(seq, 0, k.view(), random_tensor(rng, 2, 100, 64).view());
  cache.compress(seq);
  reference_append(k, 0);
  reference_compress();
  for (std::size_t h = 0; h < 2; ++h) REQUIRE(cache.positions(seq, 0, h) == positions[h]);
  CHECK(cache.positions(seq, 0, 0) != cache.positions(seq, 0, 1));

  // Decode without attend: auto_compress runs at the start of each append.
  for (std::size_t step = 0; step < 40; ++step) {
    const Tensor3 step_k = scaled_keys(1);
    cache.append(seq, 0, step_k.view(), random_tensor(rng, 2, 1, 64).view());
    reference_compress();
    reference_append(step_k, 100 + step);
    for (std::size_t h = 0; h < 2; ++h) {
      const auto kept = cache.positions(seq, 0, h);
      REQUIRE(kept.size() <= budget + 1);
      REQUIRE(kept == positions[h]);
      const auto& stored_norms = cache.scorer_state(seq, 0, h).norms;
      for (std::size_t i = 0; i < stored_norms.size(); ++i) {
        REQUIRE(stored_norms[i] == Approx(norms[h][i]).epsilon(1e-5));
      }
    }
  }
}

TEST_CASE("Knorm frees pages and counts one float per token", "[knorm]") {
  const kvc::Geometry geometry{.layers = 2, .q_heads = 8, .kv_heads = 2, .head_dim = 64};
  std::mt19937 rng(32);
  KnormCache cache(geometry, {.budget = kvc::Budget::ratio(0.25), .page_tokens = 16});
  kvc::KvCache<> full(geometry, {.page_tokens = 16});
  const auto seq = cache.open_sequence();
  const auto full_seq = full.open_sequence();
  for (std::size_t l = 0; l < 2; ++l) {
    const Tensor3 k = random_tensor(rng, 2, 256, 64);
    const Tensor3 v = random_tensor(rng, 2, 256, 64);
    cache.append(seq, l, k.view(), v.view());
    full.append(full_seq, l, k.view(), v.view());
  }
  cache.compress(seq);
  const auto stats = cache.stats();
  CHECK(stats.tokens_stored == 2 * 2 * 64);
  CHECK(stats.pages_in_use * 4 == full.stats().pages_in_use);
  CHECK(stats.metadata_bytes >= stats.tokens_stored * sizeof(float));
  CHECK(stats.bytes_held() < full.stats().bytes_held() / 3);
}
