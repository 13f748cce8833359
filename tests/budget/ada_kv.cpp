// Tests of kvc/budget/ada_kv.hpp: hand-checked splits (the floor, the layer-wide rest, pinned
// and dropped tokens, ties), the plan without scores, invariants and a float64 re-implementation
// on random scores, and KvCaches (H2O, SnapKV + Int8) whose heads really hold ragged memory.
#include <kvc/budget/ada_kv.hpp>

#include <kvc/core/kv_cache.hpp>
#include <kvc/evict/h2o.hpp>
#include <kvc/evict/snapkv.hpp>
#include <kvc/quant/int8.hpp>

#include <catch2/catch.hpp>

#include "../support/reference.hpp"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <numeric>
#include <random>
#include <span>
#include <tuple>
#include <vector>

namespace {

using kvc::budget::AdaKV;

constexpr float inf = std::numeric_limits<float>::infinity();

kvc::Geometry geometry_of(std::size_t kv_heads) {
  return {.layers = 1, .q_heads = kv_heads, .kv_heads = kv_heads, .head_dim = 8};
}

// plan_layer on per-head scores (stored = their lengths), budget B.
std::vector<std::size_t> plan(AdaKV& planner, const std::vector<std::vector<float>>& scores,
                              std::size_t base_budget) {
  std::vector<std::size_t> stored;
  std::vector<std::span<const float>> views;
  for (const auto& head : scores) {
    stored.push_back(head.size());
    views.emplace_back(head);
  }
  std::vector<std::size_t> budgets(scores.size(), 0);
  planner.plan_layer(
      kvc::LayerPlan{geometry_of(scores.size()), 0, base_budget, 1000, stored, views}, budgets);
  return budgets;
}

// plan_layer without scores: the over-budget check's plan.
std::vector<std::size_t> plan_unscored(AdaKV& planner, const std::vector<std::size_t>& stored,
                                       std::size_t base_budget) {
  std::vector<std::size_t> budgets(stored.size(), 0);
  planner.plan_layer(kvc::LayerPlan{geometry_of(stored.size()), 0, base_budget, 1000, stored},
                     budgets);
  return budgets;
}

std::size_t sum(const std::vector<std::size_t>& values) {
  return std::accumulate(values.begin(), values.end(), std::size_t{0});
}

// A head's slots best first: higher score, then the newer (higher) slot — the cache's order.
std::vector<std::size_t> ranked(const std::vector<double>& scores) {
  std::vector<std::size_t> order(scores.size());
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    if (scores[a] != scores[b]) return scores[a] > scores[b];
    return a > b;
  });
  return order;
}

// The straightforward AdaKV: float64 scores, full sorts. Returns the kept slots per head.
std::vector<std::vector<std::size_t>> reference_kept(const std::vector<std::vector<float>>& scores,
                                                     std::size_t base_budget, double alpha) {
  const std::size_t heads = scores.size();
  std::vector<std::vector<std::size_t>> kept(heads);
  std::size_t total = 0;
  for (const auto& head : scores) total += head.size();
  if (total <= heads * base_budget) {
    for (std::size_t h = 0; h < heads; ++h) {
      kept[h].resize(scores[h].size());
      std::iota(kept[h].begin(), kept[h].end(), std::size_t{0});
    }
    return kept;
  }
  const auto floor = static_cast<std::size_t>(std::floor(alpha * static_cast<double>(base_budget)));
  std::size_t slots = heads * base_budget;
  // (score, slots from the head's end, head, slot) of every token past its head's floor.
  std::vector<std::tuple<double, std::size_t, std::size_t, std::size_t>> rest;
  for (std::size_t h = 0; h < heads; ++h) {
    const std::vector<double> head(scores[h].begin(), scores[h].end());
    const std::vector<std::size_t> order = ranked(head);
    const std::size_t first = std::min(floor, order.size());
    kept[h].assign(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(first));
    slots -= first;
    for (std::size_t i = first; i < order.size(); ++i) {
      rest.emplace_back(head[order[i]], head.size() - 1 - order[i], h, order[i]);
    }
  }
  std::sort(rest.begin(), rest.end(), [](const auto& a, const auto& b) {
    if (std::get<0>(a) != std::get<0>(b)) return std::get<0>(a) > std::get<0>(b);
    if (std::get<1>(a) != std::get<1>(b)) return std::get<1>(a) < std::get<1>(b);
    return std::get<2>(a) < std::get<2>(b);
  });
  for (std::size_t i = 0; i < slots; ++i)
    kept[std::get<2>(rest[i])].push_back(std::get<3>(rest[i]));
  for (auto& head : kept) std::sort(head.begin(), head.end());
  return kept;
}

// The cache's selection: a head's `budget` best slots, ascending.
std::vector<std::size_t> top_slots(const std::vector<float>& scores, std::size_t budget) {
  std::vector<std::size_t> order = ranked(std::vector<double>(scores.begin(), scores.end()));
  order.resize(budget);
  std::sort(order.begin(), order.end());
  return order;
}

}  // namespace

TEST_CASE("AdaKV on a hand-checked layer: 3 heads, B 4", "[ada_kv]") {
  // h0 spreads its attention, h1 concentrates it on one token, h2 is in between.
  const std::vector<std::vector<float>> scores{{0.30F, 0.25F, 0.20F, 0.15F, 0.06F, 0.04F},
                                               {0.01F, 0.90F, 0.02F, 0.03F, 0.02F, 0.02F},
                                               {0.10F, 0.05F, 0.40F, 0.35F, 0.07F, 0.03F}};
  SECTION("alpha 0.5: each head keeps its best 2, the other 6 slots go to the layer's best") {
    // Floors: h0 {.30, .25}, h1 {.90, .03}, h2 {.40, .35}. The rest ranked: .20 h0, .15 h0,
    // .10 h2, .07 h2, .06 h0, .05 h2 | .04 h0 ... → h0 2 + 3, h1 2, h2 2 + 3.
    AdaKV planner({.alpha = 0.5});
    CHECK(plan(planner, scores, 4) == std::vector<std::size_t>{5, 2, 5});
  }
  SECTION("alpha 0.2 (the default): ⌊0.8⌋ = 0, the layer's 12 best scores decide alone") {
    // .90 h1, .40 .35 h2, .30 .25 .20 .15 h0, .10 .07 h2, .06 h0, .05 h2, .04 h0 (12th;
    // it beats h1's and h2's .03).
    AdaKV planner;
    CHECK(planner.floor_budget(4) == 0);
    CHECK(plan(planner, scores, 4) == std::vector<std::size_t>{6, 1, 5});
  }
  SECTION("alpha 1: every head keeps exactly B (Uniform)") {
    AdaKV planner({.alpha = 1.0});
    CHECK(plan(planner, scores, 4) == std::vector<std::size_t>{4, 4, 4});
  }
  SECTION("a layer within H·B keeps everything, however the heads are spread") {
    AdaKV planner({.alpha = 0.5});
    const std::vector<std::vector<float>> small{{1, 2, 3, 4, 5, 6, 7, 8, 9}, {1}, {1, 2}};
    CHECK(plan(planner, small, 4) == std::vector<std::size_t>{9, 1, 2});
    const auto unlimited = kvc::Budget::unlimited().resolve(1000);
    CHECK(plan(planner, scores, unlimited) == std::vector<std::size_t>{6, 6, 6});
  }
  SECTION("a head shorter than its floor keeps all it has; the rest of its floor is shared") {
    // B 4, alpha 0.5: f = 2, h1 holds 1. Slots 12 − (2 + 1 + 2) = 7 for the rest.
    AdaKV planner({.alpha = 0.5});
    const std::vector<std::vector<float>> uneven{
        {9, 8, 7, 6, 5, 4, 3, 2}, {0.5F}, {10, 1, 1, 1, 1, 1, 1, 1}};
    // Rest: h0 7 6 5 4 3 2, h2 1 ×6 → h0 takes 6, h2 one more (its newest: slot 7).
    CHECK(plan(planner, uneven, 4) == std::vector<std::size_t>{8, 1, 3});
  }
  SECTION("alpha outside [0, 1] is rejected") {
    CHECK_THROWS_AS(AdaKV({.alpha = 1.5}), kvc::BudgetError);
    CHECK_THROWS_AS(AdaKV({.alpha = -0.1}), kvc::BudgetError);
    CHECK_THROWS_AS(AdaKV({.alpha = std::nan("")}), kvc::BudgetError);
  }
}

TEST_CASE("AdaKV: +inf counts against the head's budget first, -inf goes last", "[ada_kv]") {
  SECTION("pins fill the floor, then take layer slots before any finite score") {
    // B 2, alpha 0.5: f = 1; H·B = 4. h0's three pins: one in its floor, two from the rest.
    AdaKV planner({.alpha = 0.5});
    const std::vector<std::vector<float>> scores{{inf, inf, inf, 0.1F}, {0.5F, 0.6F, -inf, 0.2F}};
    CHECK(plan(planner, scores, 2) == std::vector<std::size_t>{3, 1});
  }
  SECTION("more pins than slots: shared round-robin from each head's newest") {
    AdaKV planner({.alpha = 0.0});
    const std::vector<std::vector<float>> scores{std::vector<float>(6, inf),
                                                 std::vector<float>(2, inf)};
    CHECK(plan(planner, scores, 2) == std::vector<std::size_t>{2, 2});
  }
  SECTION("-inf tokens get a slot only when nothing finite is left") {
    AdaKV planner({.alpha = 0.0});
    const std::vector<std::vector<float>> scores{{-inf, -inf, -inf}, {1, 2, 3}};
    CHECK(plan(planner, scores, 2) == std::vector<std::size_t>{1, 3});
  }
}

TEST_CASE("AdaKV without scores: each head gives up an equal share of the excess", "[ada_kv]") {
  AdaKV planner;
  // Within H·B: nothing over budget.
  CHECK(plan_unscored(planner, {3, 4, 5}, 4) == std::vector<std::size_t>{3, 4, 5});
  // 18 stored, 12 slots: 2 each.
  CHECK(plan_unscored(planner, {6, 6, 6}, 4) == std::vector<std::size_t>{4, 4, 4});
  CHECK(plan_unscored(planner, {10, 2, 6}, 4) == std::vector<std::size_t>{8, 0, 4});
  // h1 can give 1 of its 2: the longest head gives the other.
  CHECK(plan_unscored(planner, {12, 1, 5}, 4) == std::vector<std::size_t>{9, 0, 3});
  // Excess 7 over 3 heads: 3, 2, 2.
  CHECK(plan_unscored(planner, {7, 6, 6}, 4) == std::vector<std::size_t>{4, 4, 4});
  // A head is over "budget + slack" exactly when the layer holds more than H·(B + slack).
  const std::size_t slack = 3;
  for (std::size_t extra = 0; extra <= 3 * slack + 3; ++extra) {
    const std::vector<std::size_t> stored{20 + extra, 4, 12};  // ragged, Σ = 36 + extra
    const auto budgets = plan_unscored(planner, stored, 12);
    bool over = false;
    for (std::size_t h = 0; h < 3; ++h) over = over || stored[h] > budgets[h] + slack;
    INFO("extra " << extra);
    CHECK(over == (extra > 3 * slack));
  }
}

TEST_CASE("AdaKV matches a float64 re-implementation and keeps its invariants", "[ada_kv]") {
  std::mt19937 rng(11);
  std::uniform_int_distribution<std::size_t> heads_of(1, 8);
  std::uniform_int_distribution<std::size_t> tokens_of(0, 160);
  std::uniform_int_distribution<std::size_t> budget_of(1, 120);
  std::uniform_real_distribution<double> alpha_of(0.0, 1.0);
  std::uniform_int_distribution<int> kind_of(0, 19);
  std::uniform_int_distribution<int> coarse(0, 9);  // ties
  std::uniform_real_distribution<float> fine(0.0F, 1.0F);
  std::size_t over_budget_layers = 0;
  for (int trial = 0; trial < 1500; ++trial) {
    const std::size_t heads = heads_of(rng);
    const std::size_t base = budget_of(rng);
    const double alpha = trial % 5 == 0 ? 0.2 : alpha_of(rng);
    std::vector<std::vector<float>> scores(heads);
    for (auto& head : scores) {
      head.resize(tokens_of(rng));
      const float scale = std::exp(3.0F * fine(rng));  // heads on different scales
      for (float& score : head) {
        const int kind = kind_of(rng);
        score = kind == 0   ? inf
                : kind == 1 ? -inf
                : kind < 8  ? static_cast<float>(coarse(rng)) / 10.0F
                            : scale * fine(rng);
      }
    }
    AdaKV planner({.alpha = alpha});
    const std::vector<std::size_t> budgets = plan(planner, scores, base);
    const auto reference = reference_kept(scores, base, alpha);
    std::size_t stored = 0;
    for (const auto& head : scores) stored += head.size();
    INFO("trial " << trial << " heads " << heads << " B " << base << " alpha " << alpha);
    const std::size_t floor = planner.floor_budget(base);
    CHECK(floor == static_cast<std::size_t>(std::floor(alpha * static_cast<double>(base))));
    CHECK(sum(budgets) == std::min(stored, heads * base));
    if (stored > heads * base) ++over_budget_layers;
    for (std::size_t h = 0; h < heads; ++h) {
      CHECK(budgets[h] <= scores[h].size());
      CHECK(budgets[h] >= std::min(scores[h].size(), floor));
      CHECK(budgets[h] == reference[h].size());
      // The cache keeps the head's `budget` best: exactly the tokens the reference chose.
      CHECK(top_slots(scores[h], budgets[h]) == reference[h]);
    }
  }
  CHECK(over_budget_layers > 500);  // most trials exercise the allocation
}

TEST_CASE("KvCache with H2O and AdaKV holds ragged per-head memory", "[ada_kv]") {
  // kv head 0 attends sharply (large keys), head 1 almost uniformly (tiny keys): their H2O
  // scores are distributed differently, so AdaKV gives them different budgets.
  using Cache = kvc::KvCache<kvc::evict::H2O, kvc::quant::Dense<float>, kvc::retrieval::Exhaustive,
                             kvc::offload::None, AdaKV>;
  const kvc::Geometry geometry{.layers = 2, .q_heads = 4, .kv_heads = 2, .head_dim = 16};
  const std::size_t budget = 32;
  const std::size_t prompt = 160;
  Cache cache(geometry, {.budget = kvc::Budget::tokens(budget), .auto_compress = false},
              kvc::evict::H2O({.recent_tokens = 4}), {}, {}, {}, AdaKV({.alpha = 0.2}));
  const auto seq = cache.open_sequence();
  std::mt19937 rng(5);
  const auto make_keys = [&](std::size_t tokens) {
    auto k = kvc::test::random_tensor(rng, 2, tokens, 16);
    for (std::size_t t = 0; t < tokens; ++t) {
      for (std::size_t c = 0; c < 16; ++c) {
        k.at(0, t, c) *= 3.0F;
        k.at(1, t, c) *= 0.01F;
      }
    }
    return k;
  };
  const auto check_layer_bytes = [&] {
    const kvc::CacheStats stats = cache.stats();
    std::size_t tokens = 0, pages = 0;
    for (std::size_t layer = 0; layer < 2; ++layer) {
      for (std::size_t head = 0; head < 2; ++head) {
        tokens += stats.tokens(layer, head);
        CHECK(cache.positions(seq, layer, head).size() == stats.tokens(layer, head));
        pages += (stats.tokens(layer, head) + cache.options().page_tokens - 1) /
                 cache.options().page_tokens;
      }
    }
    CHECK(stats.tokens_stored == tokens);
    CHECK(stats.code_bytes == tokens * cache.bytes_per_token());
    CHECK(stats.pages_in_use == pages);
  };

  for (std::size_t layer = 0; layer < 2; ++layer) {
    const auto k = make_keys(prompt);
    const auto v = kvc::test::random_tensor(rng, 2, prompt, 16);
    const auto q = kvc::test::random_tensor(rng, 4, prompt, 16);
    kvc::test::Tensor3 out(4, prompt, 16);
    cache.append(seq, layer, k.view(), v.view());
    cache.attend(seq, layer, q.view(), out.mutable_view());
  }
  // What the cache will do, computed here: score each head as the cache does (budget B),
  // plan with the float64 reference, keep each head's best.
  std::vector<std::vector<std::vector<kvc::Position>>> expected(2);
  for (std::size_t layer = 0; layer < 2; ++layer) {
    std::vector<std::vector<float>> scores(2);
    std::vector<std::vector<kvc::Position>> positions(2);
    for (std::size_t head = 0; head < 2; ++head) {
      positions[head] = cache.positions(seq, layer, head);
      scores[head].resize(positions[head].size());
      cache.scorer().score(cache.scorer_state(seq, layer, head),
                           kvc::ScoreContext{layer, head, positions[head], budget, prompt, {}, 16},
                           scores[head]);
    }
    const auto kept = reference_kept(scores, budget, 0.2);
    expected[layer].resize(2);
    for (std::size_t head = 0; head < 2; ++head) {
      for (std::size_t slot : kept[head]) expected[layer][head].push_back(positions[head][slot]);
    }
  }
  cache.compress(seq);
  for (std::size_t layer = 0; layer < 2; ++layer) {
    const std::size_t h0 = cache.positions(seq, layer, 0).size();
    const std::size_t h1 = cache.positions(seq, layer, 1).size();
    INFO("layer " << layer << ": heads hold " << h0 << " and " << h1);
    CHECK(h0 + h1 == 2 * budget);
    CHECK(h0 != h1);  // ragged
    CHECK(h0 >= 6);   // ⌊0.2·32⌋ floor
    for (std::size_t head = 0; head < 2; ++head) {
      CHECK(cache.positions(seq, layer, head) == expected[layer][head]);
    }
  }
  check_layer_bytes();

  // Decode with auto_compress-style slack: the layer grows to H·(B + slack), then returns
  // to H·B, ragged.
  Cache decode(geometry,
               {.budget = kvc::Budget::tokens(budget), .auto_compress = true, .eviction_slack = 3},
               kvc::evict::H2O({.recent_tokens = 4}), {}, {}, {}, AdaKV{});
  const auto dseq = decode.open_sequence();
  bool ragged = false;
  for (std::size_t step = 0; step < 40; ++step) {
    for (std::size_t layer = 0; layer < 2; ++layer) {
      const std::size_t n = step == 0 ? prompt : 1;
      const auto k = make_keys(n);
      const auto v = kvc::test::random_tensor(rng, 2, n, 16);
      const auto q = kvc::test::random_tensor(rng, 4, n, 16);
      kvc::test::Tensor3 out(4, n, 16);
      decode.append(dseq, layer, k.view(), v.view());
      decode.attend(dseq, layer, q.view(), out.mutable_view());
      CHECK(
          std::all_of(out.data.begin(), out.data.end(), [](float x) { return std::isfinite(x); }));
      const kvc::CacheStats stats = decode.stats();
      const std::size_t held = stats.tokens(layer, 0) + stats.tokens(layer, 1);
      CHECK(held <= 2 * (budget + 3));
      CHECK(held >= 2 * budget);
      ragged = ragged || stats.tokens(layer, 0) != stats.tokens(layer, 1);
      CHECK(stats.code_bytes == stats.tokens_stored * decode.bytes_per_token());
    }
  }
  CHECK(ragged);
}

TEST_CASE("AdaKV composes with SnapKV and the Int8 quantizer", "[ada_kv]") {
  using Cache = kvc::KvCache<kvc::evict::SnapKV, kvc::quant::Int8<>, kvc::retrieval::Exhaustive,
                             kvc::offload::None, AdaKV>;
  const kvc::Geometry geometry{.layers = 2, .q_heads = 8, .kv_heads = 4, .head_dim = 32};
  const std::size_t budget = 24;
  Cache cache(geometry, {.budget = kvc::Budget::tokens(budget)}, kvc::evict::SnapKV({.window = 8}));
  const auto seq = cache.open_sequence();
  std::mt19937 rng(9);
  const std::size_t prompt = 96;
  for (std::size_t layer = 0; layer < 2; ++layer) {
    auto k = kvc::test::random_tensor(rng, 4, prompt, 32);
    for (std::size_t t = 0; t < prompt; ++t) {
      for (std::size_t c = 0; c < 32; ++c) k.at(layer, t, c) *= 4.0F;  // one sharp head
    }
    const auto v = kvc::test::random_tensor(rng, 4, prompt, 32);
    const auto q = kvc::test::random_tensor(rng, 8, prompt, 32);
    kvc::test::Tensor3 out(8, prompt, 32);
    cache.append(seq, layer, k.view(), v.view());
    cache.observe(seq, layer, q.slice(prompt - 8, 8));
    cache.attend(seq, layer, q.view(), out.mutable_view());
    CHECK(std::all_of(out.data.begin(), out.data.end(), [](float x) { return std::isfinite(x); }));
  }
  const kvc::CacheStats stats = cache.stats();
  std::size_t tokens = 0;
  for (std::size_t layer = 0; layer < 2; ++layer) {
    std::size_t held = 0;
    for (std::size_t head = 0; head < 4; ++head) {
      held += stats.tokens(layer, head);
      // Every head keeps its window (pinned) at least.
      const auto positions = cache.positions(seq, layer, head);
      REQUIRE(positions.size() >= 8);
      CHECK(positions.back() == static_cast<kvc::Position>(prompt - 1));
    }
    CHECK(held == 4 * budget);
    tokens += held;
  }
  CHECK(stats.code_bytes == tokens * cache.bytes_per_token());
  CHECK(cache.bytes_per_token() ==
        kvc::quant::Int8<>{}.key_bytes(32) + kvc::quant::Int8<>{}.value_bytes(32));
}
