// Tests of kvc/budget/pyramid_kv.hpp: hand-computed pyramids, the clamp and the fallback,
// total and monotonicity over a sweep, and a KvCache whose layers really hold ragged
// per-layer memory.
#include <kvc/budget/pyramid_kv.hpp>

#include <kvc/core/kv_cache.hpp>
#include <kvc/evict/h2o.hpp>

#include <catch2/catch.hpp>

#include "../support/reference.hpp"

#include <cstdlib>
#include <random>
#include <vector>

namespace {

using kvc::budget::PyramidKV;

// Budgets of every layer of an L-layer model, as plan_layer gives them (one kv head each).
std::vector<std::size_t> pyramid(const PyramidKV& planner, std::size_t layers,
                                 std::size_t base_budget, std::size_t tokens_seen) {
  std::vector<std::size_t> budgets;
  const std::vector<std::size_t> stored{tokens_seen};
  for (std::size_t layer = 0; layer < layers; ++layer) {
    std::vector<std::size_t> heads(1, 0);
    planner.plan_layer(
        kvc::LayerPlan{{.layers = layers, .q_heads = 1, .kv_heads = 1, .head_dim = 8},
                       layer,
                       base_budget,
                       tokens_seen,
                       stored},
        heads);
    budgets.push_back(heads[0]);
  }
  return budgets;
}

std::size_t total(const std::vector<std::size_t>& budgets) {
  std::size_t sum = 0;
  for (std::size_t b : budgets) sum += b;
  return sum;
}

}  // namespace

TEST_CASE("PyramidKV on a hand-computed case: 4 layers, B 48, window 8", "[pyramid_kv]") {
  // B − w = 40: min = 40/20 = 2, max = 80 − 2 = 78 (< n − w = 992), step = 76/3.
  // Prefix budgets 78, 52.67, 27.33, 2 → rounded 78, 53, 27, 2, plus the window 8.
  const PyramidKV planner({.window = 8, .beta = 20});
  const auto budgets = pyramid(planner, 4, 48, 1000);
  CHECK(budgets == std::vector<std::size_t>{86, 61, 35, 10});
  CHECK(total(budgets) == 4 * 48);
}

TEST_CASE("PyramidKV gives every kv head of a layer the layer's budget", "[pyramid_kv]") {
  const PyramidKV planner({.window = 8});
  std::vector<std::size_t> heads(4, 0);
  const std::vector<std::size_t> stored{1000, 3, 500, 0};
  planner.plan_layer(
      kvc::LayerPlan{
          {.layers = 4, .q_heads = 8, .kv_heads = 4, .head_dim = 8}, 1, 48, 1000, stored},
      heads);
  CHECK(heads == std::vector<std::size_t>(4, 61));
}

TEST_CASE("PyramidKV clamps the top layer to every prefix token", "[pyramid_kv]") {
  // n = 60: max = 78 ≥ n − w = 52, so max = 52 and min = 80 − 52 = 28, step 8: layer 0
  // keeps all 60 tokens and the total is still 4·48.
  const PyramidKV planner({.window = 8});
  const auto budgets = pyramid(planner, 4, 48, 60);
  CHECK(budgets == std::vector<std::size_t>{60, 52, 44, 36});
  CHECK(total(budgets) == 4 * 48);
}

TEST_CASE("PyramidKV falls back to the uniform budget when the numbers are not ordered",
          "[pyramid_kv]") {
  const PyramidKV planner({.window = 8});
  SECTION("fewer tokens than the budget: the clamp makes min exceed max") {
    // n = 40 < B: max = 32, min = 80 − 32 = 48 > max.
    CHECK(pyramid(planner, 4, 48, 40) == std::vector<std::size_t>(4, 48));
  }
  SECTION("a budget smaller than the window") {
    const PyramidKV wide({.window = 64});
    CHECK(pyramid(wide, 4, 32, 1000) == std::vector<std::size_t>(4, 32));
  }
  SECTION("a single layer") {
    CHECK(pyramid(planner, 1, 48, 1000) == std::vector<std::size_t>{48});
  }
  SECTION("an unlimited budget stays unlimited") {
    const auto unlimited = kvc::Budget::unlimited().resolve(1000);
    CHECK(pyramid(planner, 4, unlimited, 1000) == std::vector<std::size_t>(4, unlimited));
  }
  SECTION("beta below 1 is rejected") {
    CHECK_THROWS_AS(PyramidKV({.beta = 0.5}), kvc::BudgetError);
  }
}

TEST_CASE("PyramidKV budgets are non-increasing with depth and keep the total", "[pyramid_kv]") {
  std::mt19937 rng(7);
  std::uniform_int_distribution<std::size_t> layers_of(2, 40);
  std::uniform_int_distribution<std::size_t> window_of(1, 128);
  std::uniform_int_distribution<std::size_t> tokens_of(1, 20000);
  std::uniform_real_distribution<double> beta_of(1.0, 40.0);
  for (int trial = 0; trial < 2000; ++trial) {
    const PyramidKV planner({.window = window_of(rng), .beta = beta_of(rng)});
    const std::size_t layers = layers_of(rng);
    const std::size_t n = tokens_of(rng);
    const std::size_t base = std::uniform_int_distribution<std::size_t>(1, n + 100)(rng);
    const auto budgets = pyramid(planner, layers, base, n);
    INFO("layers " << layers << " B " << base << " n " << n << " w " << planner.options().window
                   << " beta " << planner.options().beta);
    for (std::size_t l = 1; l < layers; ++l) CHECK(budgets[l] <= budgets[l - 1]);
    // Each layer rounds once: the total is L·B within L/2 tokens.
    const auto difference =
        static_cast<long long>(total(budgets)) - static_cast<long long>(layers * base);
    CHECK(std::llabs(difference) * 2 <= static_cast<long long>(layers));
    // No layer keeps more than it has seen unless the budget itself does (fallback).
    if (base < n) CHECK(budgets.front() <= n);
  }
}

TEST_CASE("KvCache with H2O and PyramidKV holds ragged per-layer memory", "[pyramid_kv]") {
  // 4 layers, B 48, w 8, n 200: the pyramid is 86, 61, 35, 10 tokens per kv head.
  using Cache = kvc::KvCache<kvc::evict::H2O, kvc::quant::Dense<float>, kvc::retrieval::Exhaustive,
                             kvc::offload::None, PyramidKV>;
  const kvc::Geometry geometry{.layers = 4, .q_heads = 4, .kv_heads = 2, .head_dim = 16};
  Cache cache(geometry, {.budget = kvc::Budget::tokens(48)}, {}, {}, {}, {},
              PyramidKV({.window = 8}));
  const auto seq = cache.open_sequence();
  std::mt19937 rng(3);
  const std::vector<std::size_t> planned{86, 61, 35, 10};
  for (std::size_t layer = 0; layer < 4; ++layer) {
    const auto k = kvc::test::random_tensor(rng, 2, 200, 16);
    const auto v = kvc::test::random_tensor(rng, 2, 200, 16);
    const auto q = kvc::test::random_tensor(rng, 4, 200, 16);
    kvc::test::Tensor3 out(4, 200, 16);
    cache.append(seq, layer, k.view(), v.view());
    cache.attend(seq, layer, q.view(), out.mutable_view());
  }
  const auto check_planned = [&] {
    const kvc::CacheStats stats = cache.stats();
    const std::size_t page_tokens = cache.options().page_tokens;
    std::size_t pages = 0;
    for (std::size_t layer = 0; layer < 4; ++layer) {
      for (std::size_t head = 0; head < 2; ++head) {
        CHECK(stats.tokens(layer, head) == planned[layer]);
        CHECK(cache.positions(seq, layer, head).size() == planned[layer]);
        pages += (planned[layer] + page_tokens - 1) / page_tokens;
      }
    }
    // Real memory, not a mask: the pages in use are those the ragged lengths need.
    CHECK(stats.pages_in_use == pages);
    CHECK(stats.code_bytes == 2 * (86 + 61 + 35 + 10) * cache.bytes_per_token());
  };
  check_planned();

  // A decode step appends one token per layer; H2O evicts one and the pyramid stays put.
  for (std::size_t layer = 0; layer < 4; ++layer) {
    const auto k = kvc::test::random_tensor(rng, 2, 1, 16);
    const auto v = kvc::test::random_tensor(rng, 2, 1, 16);
    const auto q = kvc::test::random_tensor(rng, 4, 1, 16);
    kvc::test::Tensor3 out(4, 1, 16);
    cache.append(seq, layer, k.view(), v.view());
    cache.attend(seq, layer, q.view(), out.mutable_view());
  }
  check_planned();
}
