// Tests of kvc/budget/prefix_kv.hpp: hand-checked global coverages (prefixes, ties, pins,
// dropped tokens, heads without mass), the plans before and after the sequence plan, a
// brute-force float64 search over every candidate p on random scores, and KvCaches (SnapKV,
// H2O, Int8) planned by compress(seq) and by auto_compress at the last layer, then decoded.
#include <kvc/budget/prefix_kv.hpp>

#include <kvc/core/concepts.hpp>
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

using kvc::Position;
using kvc::budget::PrefixKV;
using kvc::test::random_tensor;
using kvc::test::Tensor3;

static_assert(kvc::BudgetPlanner<PrefixKV>);
static_assert(kvc::PlansLayersWithState<PrefixKV>);
static_assert(kvc::PlansSequence<PrefixKV>);
static_assert(!kvc::PlansLayers<PrefixKV>);
static_assert(!kvc::ObservesLayers<PrefixKV>);
static_assert(!kvc::Cascades<PrefixKV>);
static_assert(!kvc::PlansFromScores<PrefixKV>);

constexpr float inf = std::numeric_limits<float>::infinity();

// plan_sequence on per-(layer, kv head) scores [layer · heads + head], budget B per layer.
PrefixKV::SequenceState plan_of(PrefixKV& planner, std::size_t layers, std::size_t heads,
                                const std::vector<std::vector<float>>& scores, std::size_t base) {
  const kvc::Geometry geometry{
      .layers = layers, .q_heads = heads, .kv_heads = heads, .head_dim = 8};
  std::vector<std::size_t> stored;
  std::vector<std::span<const float>> views;
  for (const auto& head : scores) {
    stored.push_back(head.size());
    views.emplace_back(head);
  }
  std::vector<kvc::LayerPlan> plans;
  for (std::size_t l = 0; l < layers; ++l) {
    plans.push_back({geometry, l, base, 1000,
                     std::span<const std::size_t>(stored).subspan(l * heads, heads),
                     std::span<const std::span<const float>>(views).subspan(l * heads, heads)});
  }
  PrefixKV::SequenceState state;
  planner.plan_sequence(state, kvc::SequencePlan{geometry, plans});
  return state;
}

std::size_t sum(const std::vector<std::size_t>& values) {
  return std::accumulate(values.begin(), values.end(), std::size_t{0});
}

// ---- float64 reference -----------------------------------------------------------------

// One head: its pins, and per ranked token (best first) the normalized mass before it C and
// its own normalized importance; zero-importance tokens last at C = 1.
struct RankedHead {
  std::size_t pins = 0;
  std::vector<double> before, importance;
};

RankedHead rank(const std::vector<float>& scores) {
  RankedHead head;
  std::vector<float> positive;
  std::size_t zeros = 0;
  for (float s : scores) {
    if (s == inf) {
      ++head.pins;
    } else if (std::isfinite(s) && s > 0) {
      positive.push_back(s);
    } else {
      ++zeros;
    }
  }
  std::sort(positive.begin(), positive.end(), std::greater<>());
  double mass = 0;
  for (float v : positive) mass += double(v);
  double covered = 0;
  for (float v : positive) {
    head.before.push_back(std::min(covered, 1.0));
    head.importance.push_back(double(v) / mass);
    covered += double(v) / mass;
  }
  head.before.insert(head.before.end(), zeros, 1.0);
  head.importance.insert(head.importance.end(), zeros, 0.0);
  return head;
}

// The shortest prefix of the ranked tokens whose covered mass reaches p (the mass covered by
// the first k tokens is before[k], and everything for k = all).
std::size_t shortest_prefix(const RankedHead& head, double p) {
  for (std::size_t k = 0; k < head.before.size(); ++k) {
    if (head.before[k] >= p) return k;
  }
  return head.before.size();
}

std::size_t kept_at(const std::vector<RankedHead>& heads, double p) {
  std::size_t kept = 0;
  for (const RankedHead& head : heads) kept += head.pins + shortest_prefix(head, p);
  return kept;
}

struct ReferencePlan {
  std::vector<std::size_t> budgets;
  double p = 0;
};

// Brute force: every C in the sequence is a candidate p; take the largest whose Σ kept fits
// T; hand the slots left to the tokens at C = p (importance, rank, head).
ReferencePlan reference_plan(const std::vector<std::vector<float>>& scores, std::size_t total) {
  std::vector<RankedHead> heads;
  std::size_t pins = 0, everything = 0;
  for (const auto& s : scores) {
    heads.push_back(rank(s));
    pins += heads.back().pins;
    everything += s.size();
  }
  ReferencePlan plan;
  plan.budgets.assign(heads.size(), 0);
  if (pins >= total) {  // round-robin over the pins
    std::size_t slots = total;
    for (std::size_t round = 0; slots > 0; ++round) {
      for (std::size_t i = 0; i < heads.size() && slots > 0; ++i) {
        if (heads[i].pins > round) {
          ++plan.budgets[i];
          --slots;
        }
      }
    }
    return plan;
  }
  if (everything <= total) {
    for (std::size_t i = 0; i < heads.size(); ++i) plan.budgets[i] = scores[i].size();
    plan.p = 1;
    return plan;
  }
  double best = -1;
  for (const RankedHead& head : heads) {
    for (double c : head.before) {
      if (c > best && kept_at(heads, c) <= total) best = c;
    }
  }
  REQUIRE(best >= 0);
  plan.p = best;
  std::vector<std::tuple<double, std::size_t, std::size_t>> ties;  // −importance, rank, head
  for (std::size_t i = 0; i < heads.size(); ++i) {
    plan.budgets[i] = heads[i].pins + shortest_prefix(heads[i], best);
    for (std::size_t k = 0; k < heads[i].before.size(); ++k) {
      if (heads[i].before[k] == best) ties.emplace_back(-heads[i].importance[k], k, i);
    }
  }
  std::sort(ties.begin(), ties.end());
  const std::size_t left = total - kept_at(heads, best);
  REQUIRE(left <= ties.size());
  for (std::size_t i = 0; i < left; ++i) ++plan.budgets[std::get<2>(ties[i])];
  // A float64 bisection of p (the reference's search, run to convergence) finds the same p.
  double low = 0, high = 1 + 1e-9;
  for (int step = 0; step < 200; ++step) {
    const double middle = (low + high) / 2;
    (kept_at(heads, middle) <= total ? low : high) = middle;
  }
  CHECK(low == Approx(best).margin(1e-12));
  return plan;
}

// A head's slots best first: higher score, then the newer (higher) slot — the cache's order.
std::vector<Position> top_positions(const std::vector<float>& scores,
                                    const std::vector<Position>& positions, std::size_t budget) {
  std::vector<std::size_t> order(scores.size());
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    if (scores[a] != scores[b]) return scores[a] > scores[b];
    return a > b;
  });
  std::vector<Position> kept;
  for (std::size_t i = 0; i < budget; ++i) kept.push_back(positions[order[i]]);
  std::sort(kept.begin(), kept.end());
  return kept;
}

}  // namespace

TEST_CASE("PrefixKV on hand-checked layers: one coverage p, shortest prefixes", "[prefix_kv]") {
  // Layer 0 (mass 8): sorted 4, 2, 1, 1 → C = 0, .5, .75, .875.
  // Layer 1 (mass 16): sorted 8, 6, 1, 1 → C = 0, .5, .875, .9375.
  const std::vector<std::vector<float>> scores{{1, 4, 1, 2}, {1, 8, 6, 1}};
  PrefixKV planner;
  SECTION("B 2: T = 4, p = .75 covers layer 0 with 2 tokens (.75) and layer 1 with 2 (.875)") {
    const auto state = plan_of(planner, 2, 1, scores, 2);
    CHECK(state.budgets == std::vector<std::size_t>{2, 2});
    CHECK(state.coverage == 0.75);
  }
  SECTION("B 3: T = 6, p = .875 keeps 3 + 2, the slot left goes to the tie of higher mass") {
    // At C = .875 layer 0's 4th token (1/8) beats layer 1's 3rd (1/16).
    const auto state = plan_of(planner, 2, 1, scores, 3);
    CHECK(state.budgets == std::vector<std::size_t>{4, 2});
    CHECK(state.coverage == 0.875);
  }
  SECTION("B 4: everything fits, p = 1") {
    const auto state = plan_of(planner, 2, 1, scores, 4);
    CHECK(state.budgets == std::vector<std::size_t>{4, 4});
    CHECK(state.coverage == 1.0);
  }
  SECTION("the state records the split") {
    const auto state = plan_of(planner, 2, 1, scores, 2);
    CHECK(state.layers == 2);
    CHECK(state.kv_heads == 1);
    CHECK(state.base_budgets == std::vector<std::size_t>{2, 2});
    CHECK(state.planned == std::vector<std::uint8_t>{1, 1});
  }
}

TEST_CASE("PrefixKV: +inf is always kept, zero importance goes last", "[prefix_kv]") {
  PrefixKV planner;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  // Layer 0: pins 2; ranked 3, 1 (C = 0, .75); zero importance −inf, −2, NaN (C = 1).
  // Layer 1: pin 1; ranked 2, 2 (C = 0, .5).
  const std::vector<std::vector<float>> scores{{inf, 3, -inf, 1, inf, -2, nan}, {2, inf, 2}};
  SECTION("B 3: T = 6, 3 pins, p = .75 takes one ranked token of layer 0 and two of layer 1") {
    const auto state = plan_of(planner, 2, 1, scores, 3);
    CHECK(state.budgets == std::vector<std::size_t>{3, 3});
    CHECK(state.coverage == 0.75);
  }
  SECTION("B 4: T = 8, p = 1, the slot left goes to a zero-importance token") {
    const auto state = plan_of(planner, 2, 1, scores, 4);
    CHECK(state.budgets == std::vector<std::size_t>{5, 3});
    CHECK(state.coverage == 1.0);
  }
  SECTION("a head without mass keeps its tokens only after every token with mass") {
    // Layer 1: C = 0, .25, .5, .75; layer 0: all at C = 1. T = 6: layer 1 all 4, then 2.
    const auto state = plan_of(planner, 2, 1, {{0, 0, 0, 0}, {1, 1, 1, 1}}, 3);
    CHECK(state.budgets == std::vector<std::size_t>{2, 4});
    CHECK(state.coverage == 1.0);
  }
  SECTION("more pins than slots: shared round-robin, lower heads first") {
    // T = 6, pins 5, 1, 3: two rounds give 2, 1, 2; the 6th slot goes to head 0.
    const auto state =
        plan_of(planner, 3, 1, {std::vector<float>(5, inf), {inf}, {inf, inf, inf, 1.0F}}, 2);
    CHECK(state.budgets == std::vector<std::size_t>{3, 1, 2});
    CHECK(state.coverage == 0.0);
  }
}

TEST_CASE("PrefixKV plans layers before and after the sequence plan", "[prefix_kv]") {
  PrefixKV planner;
  const kvc::Geometry geometry{.layers = 3, .q_heads = 4, .kv_heads = 2, .head_dim = 8};
  const std::vector<std::size_t> stored{50, 40};
  const auto plan_layer = [&](const PrefixKV::SequenceState& state, std::size_t layer,
                              std::size_t base) {
    std::vector<std::size_t> budgets(2, 0);
    planner.plan_layer(kvc::LayerPlan{geometry, layer, base, 50, stored}, state, budgets);
    return budgets;
  };
  PrefixKV::SequenceState state;
  // Before any plan: layers 0, 1 keep what they hold; the last layer gets B; any layer's
  // compression plans the sequence.
  CHECK(plan_layer(state, 0, 10) == std::vector<std::size_t>{50, 40});
  CHECK(plan_layer(state, 1, 10) == std::vector<std::size_t>{50, 40});
  CHECK(plan_layer(state, 2, 10) == std::vector<std::size_t>{10, 10});
  const auto wants = [&](const PrefixKV::SequenceState& state, std::size_t layer) {
    return planner.wants_sequence_plan(state, kvc::LayerPlan{geometry, layer, 10, 50, stored});
  };
  CHECK(wants(state, 0));
  CHECK(wants(state, 2));

  // Layers 0 and 2 hold tokens, layer 1 none (2 kv heads each).
  std::vector<std::vector<float>> scores(6);
  scores[0] = {5, 1, 1, 1};
  scores[1] = {1, 1, 1, 1};
  scores[4] = {2, 2, 2, 2};
  scores[5] = {9, 1, 1, 1};
  state = plan_of(planner, 3, 2, scores, 2);
  REQUIRE(sum(state.budgets) == 12);
  CHECK(state.planned == std::vector<std::uint8_t>{1, 0, 1});
  CHECK_FALSE(wants(state, 0));
  CHECK_FALSE(wants(state, 1));
  CHECK(wants(state, 2));
  const std::vector<std::size_t> layer0{state.budgets[0], state.budgets[1]};
  CHECK(plan_layer(state, 0, 2) == layer0);
  // A budget that changed since the plan scales the recorded split.
  CHECK(plan_layer(state, 0, 4) == std::vector<std::size_t>{2 * layer0[0], 2 * layer0[1]});
  const std::size_t unlimited = kvc::Budget::unlimited().resolve(50);
  CHECK(plan_layer(state, 0, unlimited) == std::vector<std::size_t>{unlimited, unlimited});
  // Layer 1 held nothing when planned: still unplanned.
  CHECK(plan_layer(state, 1, 2) == std::vector<std::size_t>{50, 40});
}

TEST_CASE("PrefixKV matches a brute-force float64 search on random scores", "[prefix_kv]") {
  std::mt19937 rng(13);
  std::uniform_int_distribution<int> kind_of(0, 19);
  std::uniform_int_distribution<int> coarse(0, 4);  // ties
  std::uniform_real_distribution<float> fine(0.0F, 1.0F);
  std::size_t searched = 0;
  for (int trial = 0; trial < 1500; ++trial) {
    const std::size_t layers = 1 + rng() % 4, heads = 1 + rng() % 3;
    const std::size_t base = 1 + rng() % 12;
    std::vector<std::vector<float>> scores(layers * heads);
    std::size_t stored = 0;
    for (auto& head : scores) {
      head.resize(rng() % 24);
      stored += head.size();
      const float scale = std::exp(4.0F * fine(rng));
      const int pin_rate = trial % 7 == 0 ? 10 : 1;  // some trials pinned past the total
      for (float& score : head) {
        const int kind = kind_of(rng);
        score = kind < pin_rate ? inf
                : kind == 11    ? -inf
                : kind == 12    ? -fine(rng)
                : kind == 13    ? 0.0F
                : kind < 17     ? static_cast<float>(coarse(rng)) / 4.0F
                                : scale * fine(rng);
      }
    }
    CAPTURE(trial, layers, heads, base);
    PrefixKV planner;
    const auto state = plan_of(planner, layers, heads, scores, base);
    const std::size_t total = layers * heads * base;
    const ReferencePlan reference = reference_plan(scores, total);
    CHECK(state.budgets == reference.budgets);
    CHECK(state.coverage == reference.p);
    CHECK(sum(state.budgets) == std::min(total, stored));
    for (std::size_t i = 0; i < scores.size(); ++i) CHECK(state.budgets[i] <= scores[i].size());
    if (reference.p > 0 && reference.p < 1) ++searched;
  }
  CHECK(searched > 500);
}

namespace {

// Every (layer, kv head)'s scores as the cache computes them for a sequence plan.
template <class Cache>
std::vector<std::vector<float>> cache_scores(Cache& cache, kvc::SequenceId seq, std::size_t base) {
  const kvc::Geometry& g = cache.geometry();
  std::vector<std::vector<float>> scores;
  for (std::size_t layer = 0; layer < g.layers; ++layer) {
    for (std::size_t h = 0; h < g.kv_heads; ++h) {
      const auto positions = cache.positions(seq, layer, h);
      std::vector<float> head(positions.size());
      cache.scorer().score(cache.scorer_state(seq, layer, h),
                           kvc::ScoreContext{layer,
                                             h,
                                             positions,
                                             std::min(base, positions.size()),
                                             cache.tokens_seen(seq, layer),
                                             {},
                                             g.head_dim},
                           head);
      scores.push_back(std::move(head));
    }
  }
  return scores;
}

// Prefill layer by layer: append, observe the window, attend; head h of layer l gets keys
// scaled by `sharpness(l, h)` so the heads' attention differs.
template <class Cache>
void prefill(Cache& cache, kvc::SequenceId seq, std::mt19937& rng, std::size_t n,
             std::size_t window, std::size_t last_layer) {
  const kvc::Geometry& g = cache.geometry();
  for (std::size_t layer = 0; layer <= last_layer; ++layer) {
    Tensor3 k = random_tensor(rng, g.kv_heads, n, g.head_dim);
    for (std::size_t h = 0; h < g.kv_heads; ++h) {
      const float sharpness = 0.2F + 0.9F * float((layer * g.kv_heads + h) % 4);
      for (std::size_t t = 0; t < n; ++t) {
        for (std::size_t c = 0; c < g.head_dim; ++c) k.at(h, t, c) *= sharpness;
      }
    }
    const Tensor3 q = random_tensor(rng, g.q_heads, n, g.head_dim);
    Tensor3 out(g.q_heads, n, g.head_dim);
    cache.append(seq, layer, k.view(), random_tensor(rng, g.kv_heads, n, g.head_dim).view());
    cache.observe(seq, layer, q.slice(n - window, window));
    cache.attend(seq, layer, q.view(), out.mutable_view());
    CHECK(std::all_of(out.data.begin(), out.data.end(), [](float x) { return std::isfinite(x); }));
  }
}

}  // namespace

TEST_CASE("KvCache with SnapKV and PrefixKV: compress(seq) keeps each head's planned best",
          "[prefix_kv]") {
  using Cache = kvc::KvCache<kvc::evict::SnapKV, kvc::quant::Dense<float>,
                             kvc::retrieval::Exhaustive, kvc::offload::None, PrefixKV>;
  constexpr std::size_t layers = 3, kv_heads = 2, n = 90, budget = 20, window = 8;
  Cache cache({.layers = layers, .q_heads = 4, .kv_heads = kv_heads, .head_dim = 16},
              {.budget = kvc::Budget::tokens(budget), .page_tokens = 16, .auto_compress = false},
              kvc::evict::SnapKV({.window = window}));
  const auto seq = cache.open_sequence();
  std::mt19937 rng(3);
  prefill(cache, seq, rng, n, window, layers - 1);
  CHECK(cache.stats().tokens_stored == layers * kv_heads * n);

  const auto scores = cache_scores(cache, seq, budget);
  PrefixKV fresh;
  const auto expected = plan_of(fresh, layers, kv_heads, scores, budget);
  const ReferencePlan reference = reference_plan(scores, layers * kv_heads * budget);
  CHECK(expected.budgets == reference.budgets);
  std::vector<std::vector<Position>> kept;
  for (std::size_t layer = 0; layer < layers; ++layer) {
    for (std::size_t h = 0; h < kv_heads; ++h) {
      kept.push_back(top_positions(scores[layer * kv_heads + h], cache.positions(seq, layer, h),
                                   expected.budgets[layer * kv_heads + h]));
    }
  }

  cache.compress(seq);
  const auto& state = cache.planner_state(seq);
  CHECK(state.budgets == expected.budgets);
  CHECK(state.coverage == expected.coverage);
  CHECK(state.coverage > 0.0);
  CHECK(state.coverage < 1.0);
  std::size_t total = 0;
  for (std::size_t layer = 0; layer < layers; ++layer) {
    for (std::size_t h = 0; h < kv_heads; ++h) {
      CAPTURE(layer, h);
      const std::size_t i = layer * kv_heads + h;
      CHECK(cache.tokens(seq, layer, h) == expected.budgets[i]);
      CHECK(cache.positions(seq, layer, h) == kept[i]);
      CHECK(cache.tokens(seq, layer, h) >= window);  // SnapKV's window is pinned
      total += cache.tokens(seq, layer, h);
    }
  }
  CHECK(total == layers * kv_heads * budget);
  std::vector<std::size_t> distinct(expected.budgets);
  std::sort(distinct.begin(), distinct.end());
  CHECK(std::unique(distinct.begin(), distinct.end()) - distinct.begin() > 2);  // ragged
  const kvc::CacheStats stats = cache.stats();
  CHECK(stats.tokens_stored == layers * kv_heads * budget);
  CHECK(stats.code_bytes == stats.tokens_stored * cache.bytes_per_token());
}

TEST_CASE("KvCache with H2O and PrefixKV plans at the last layer, then decodes", "[prefix_kv]") {
  using Cache = kvc::KvCache<kvc::evict::H2O, kvc::quant::Dense<float>, kvc::retrieval::Exhaustive,
                             kvc::offload::None, PrefixKV>;
  constexpr std::size_t layers = 4, kv_heads = 2, q_heads = 4, dim = 16, n = 72, budget = 16;
  Cache cache({.layers = layers, .q_heads = q_heads, .kv_heads = kv_heads, .head_dim = dim},
              {.budget = kvc::Budget::tokens(budget)}, kvc::evict::H2O({.recent_tokens = 4}));
  const auto seq = cache.open_sequence();
  std::mt19937 rng(8);
  // Layers 0 … L−2 keep everything until the last layer goes over budget.
  prefill(cache, seq, rng, n, 8, layers - 2);
  CHECK(cache.stats().tokens_stored == (layers - 1) * kv_heads * n);
  CHECK(cache.planner_state(seq).layers == 0);
  {  // the last layer: over budget at its attend
    const Tensor3 k = random_tensor(rng, kv_heads, n, dim, 2.0F);
    const Tensor3 q = random_tensor(rng, q_heads, n, dim);
    Tensor3 out(q_heads, n, dim);
    cache.append(seq, layers - 1, k.view(), random_tensor(rng, kv_heads, n, dim).view());
    cache.attend(seq, layers - 1, q.view(), out.mutable_view());
  }
  const auto check_planned = [&] {
    const auto& state = cache.planner_state(seq);
    REQUIRE(state.layers == layers);
    std::size_t total = 0;
    for (std::size_t layer = 0; layer < layers; ++layer) {
      for (std::size_t h = 0; h < kv_heads; ++h) {
        CHECK(cache.tokens(seq, layer, h) == state.budgets[layer * kv_heads + h]);
        total += cache.tokens(seq, layer, h);
      }
    }
    CHECK(total == layers * kv_heads * budget);
    const kvc::CacheStats stats = cache.stats();
    CHECK(stats.code_bytes == stats.tokens_stored * cache.bytes_per_token());
  };
  check_planned();
  const double first_coverage = cache.planner_state(seq).coverage;
  CHECK(first_coverage > 0.0);
  CHECK(first_coverage < 1.0);

  // Decode: each layer evicts back to its recorded budgets; the last layer re-plans.
  for (std::size_t step = 0; step < 6; ++step) {
    for (std::size_t layer = 0; layer < layers; ++layer) {
      const auto before = cache.planner_state(seq).budgets;
      cache.append(seq, layer, random_tensor(rng, kv_heads, 1, dim).view(),
                   random_tensor(rng, kv_heads, 1, dim).view());
      Tensor3 out(q_heads, 1, dim);
      cache.attend(seq, layer, random_tensor(rng, q_heads, 1, dim).view(), out.mutable_view());
      if (layer + 1 < layers) {
        for (std::size_t h = 0; h < kv_heads; ++h) {
          CHECK(cache.tokens(seq, layer, h) == before[layer * kv_heads + h]);
          CHECK(cache.positions(seq, layer, h).back() == static_cast<Position>(n + step));
        }
      }
    }
    check_planned();
  }
}

namespace {

template <class Scorer, class Quant>
void prefix_kv_smoke(Scorer scorer) {
  using Cache =
      kvc::KvCache<Scorer, Quant, kvc::retrieval::Exhaustive, kvc::offload::None, PrefixKV>;
  constexpr std::size_t layers = 3, kv_heads = 4, n = 80, budget = 24;
  Cache cache({.layers = layers, .q_heads = 8, .kv_heads = kv_heads, .head_dim = 32},
              {.budget = kvc::Budget::tokens(budget)}, std::move(scorer));
  const auto seq = cache.open_sequence();
  std::mt19937 rng(21);
  prefill(cache, seq, rng, n, 8, layers - 1);
  const auto& state = cache.planner_state(seq);
  REQUIRE(state.layers == layers);
  std::size_t total = 0;
  for (std::size_t layer = 0; layer < layers; ++layer) {
    for (std::size_t h = 0; h < kv_heads; ++h) {
      CHECK(cache.tokens(seq, layer, h) == state.budgets[layer * kv_heads + h]);
      CHECK(cache.positions(seq, layer, h).back() == static_cast<Position>(n - 1));  // pinned
      total += cache.tokens(seq, layer, h);
    }
  }
  CHECK(total == layers * kv_heads * budget);
  const kvc::CacheStats stats = cache.stats();
  CHECK(stats.tokens_stored == total);
  CHECK(stats.code_bytes == stats.tokens_stored * cache.bytes_per_token());
}

}  // namespace

TEST_CASE("PrefixKV composes with H2O, SnapKV and the Int8 quantizer", "[prefix_kv]") {
  SECTION("H2O, Dense<float>") {
    prefix_kv_smoke<kvc::evict::H2O, kvc::quant::Dense<float>>(
        kvc::evict::H2O({.recent_tokens = 8}));
  }
  SECTION("H2O, Int8") {
    prefix_kv_smoke<kvc::evict::H2O, kvc::quant::Int8<>>(kvc::evict::H2O({.recent_tokens = 8}));
  }
  SECTION("SnapKV, Dense<float>") {
    prefix_kv_smoke<kvc::evict::SnapKV, kvc::quant::Dense<float>>(
        kvc::evict::SnapKV({.window = 8}));
  }
  SECTION("SnapKV, Int8") {
    prefix_kv_smoke<kvc::evict::SnapKV, kvc::quant::Int8<>>(kvc::evict::SnapKV({.window = 8}));
  }
}
