// Tests of kvc/evict/full.hpp: never evicts, and refuses to pretend it honours a budget.
#include <kvc/evict/full.hpp>

#include <kvc/core/kv_cache.hpp>

#include <catch2/catch.hpp>

#include "../support/reference.hpp"

#include <random>

TEST_CASE("Full marks every token as kept and never compresses", "[full]") {
  kvc::evict::Full full;
  std::vector<float> scores(5, 0.0F);
  const std::vector<kvc::Position> positions{0, 1, 2, 3, 4};
  full.score({}, kvc::ScoreContext{0, 0, positions, 2, 5}, scores);
  for (float s : scores) CHECK(std::isinf(s));

  std::mt19937 rng(1);
  kvc::KvCache<> cache({.layers = 1, .q_heads = 1, .kv_heads = 1, .head_dim = 64});
  const auto seq = cache.open_sequence();
  cache.append(seq, 0, kvc::test::random_tensor(rng, 1, 300, 64).view(),
               kvc::test::random_tensor(rng, 1, 300, 64).view());
  cache.compress(seq);
  CHECK(cache.tokens(seq, 0, 0) == 300);
}
