// Tests of kvc/budget/duo_attention.hpp with evict::DuoAttention: the planned budgets, exact
// kept sets through prefill and decode (retrieval heads keep everything, streaming heads
// sinks + recent), ragged bytes in stats(), the cache budget as a cap, what a plain
// planner does instead, a float64 re-implementation over random roles and chunks, and
// calibrated roles from a cache's own observe().
#include <kvc/budget/duo_attention.hpp>

#include <kvc/core/concepts.hpp>
#include <kvc/core/kv_cache.hpp>
#include <kvc/evict/duo_attention.hpp>

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
using kvc::evict::HeadRole;
using kvc::evict::HeadRoles;
using kvc::test::random_tensor;
using kvc::test::Tensor3;
using DuoCache =
    kvc::KvCache<kvc::evict::DuoAttention, kvc::quant::Dense<float>, kvc::retrieval::Exhaustive,
                 kvc::offload::None, kvc::budget::DuoAttention>;

static_assert(kvc::BudgetPlanner<kvc::budget::DuoAttention>);

using kvc::test::iota_positions;

using kvc::test::concat;

DuoCache make_duo(const kvc::Geometry& geometry, const HeadRoles& roles, std::size_t sink,
                  std::size_t recent, kvc::CacheOptions options = {}) {
  return DuoCache(geometry, options, kvc::evict::DuoAttention(roles, {.sink = sink}), {}, {}, {},
                  kvc::budget::DuoAttention(roles, {.sink = sink, .recent = recent}));
}

}  // namespace

TEST_CASE("DuoAttention plans stored tokens for retrieval heads, sink + recent for streaming",
          "[duo_attention]") {
  const kvc::budget::DuoAttention planner(HeadRoles::parse("RS\nSR\n"), {.sink = 4, .recent = 8});
  const kvc::Geometry geometry{.layers = 2, .q_heads = 2, .kv_heads = 2, .head_dim = 8};
  const std::vector<std::size_t> stored{100, 90};
  std::vector<std::size_t> budgets(2);
  const std::size_t unlimited = std::numeric_limits<std::size_t>::max();
  planner.plan_layer(kvc::LayerPlan{geometry, 0, unlimited, 100, stored}, budgets);
  CHECK(budgets == std::vector<std::size_t>{100, 12});
  planner.plan_layer(kvc::LayerPlan{geometry, 1, unlimited, 100, stored}, budgets);
  CHECK(budgets == std::vector<std::size_t>{12, 90});
  // The cache budget caps the streaming heads only.
  planner.plan_layer(kvc::LayerPlan{geometry, 1, 10, 100, stored}, budgets);
  CHECK(budgets == std::vector<std::size_t>{10, 90});
  CHECK(kvc::budget::DuoAttention{}.options().sink == 64);
  CHECK(kvc::budget::DuoAttention{}.options().recent == 256);
  CHECK(kvc::budget::DuoAttention{}.roles() == HeadRoles::alternating(2));
}

TEST_CASE("DuoAttention keeps retrieval heads whole and streaming heads at sinks + recent",
          "[duo_attention]") {
  // 2 layers × 4 kv heads, roles RSRS / SSRR, sink 4, recent 8, unlimited cache budget.
  const kvc::Geometry geometry{.layers = 2, .q_heads = 8, .kv_heads = 4, .head_dim = 16};
  const HeadRoles roles = HeadRoles::parse("RSRS\nSSRR\n");
  DuoCache cache = make_duo(geometry, roles, 4, 8, {.page_tokens = 8});
  kvc::KvCache<> full(geometry, {.page_tokens = 8});
  const auto seq = cache.open_sequence();
  const auto full_seq = full.open_sequence();
  std::mt19937 rng(31);
  for (std::size_t step = 0; step <= 10; ++step) {
    const std::size_t n = step == 0 ? 100 : 1;
    for (std::size_t l = 0; l < 2; ++l) {
      const Tensor3 k = random_tensor(rng, 4, n, 16), v = random_tensor(rng, 4, n, 16);
      const Tensor3 q = random_tensor(rng, 8, n, 16);
      Tensor3 out(8, n, 16);
      cache.append(seq, l, k.view(), v.view());
      cache.attend(seq, l, q.view(), out.mutable_view());
      full.append(full_seq, l, k.view(), v.view());
      const auto seen = static_cast<Position>(cache.tokens_seen(seq, l));
      for (std::size_t h = 0; h < 4; ++h) {
        CAPTURE(step, l, h);
        const auto positions = cache.positions(seq, l, h);
        if (roles.retrieval(l, h)) {
          REQUIRE(positions == iota_positions(0, seen - 1));
        } else {
          REQUIRE(positions == concat(iota_positions(0, 3), iota_positions(seen - 8, seen - 1)));
        }
      }
    }
  }
  const auto stats = cache.stats();
  const auto full_stats = full.stats();
  std::size_t stored = 0;
  for (std::size_t l = 0; l < 2; ++l) {
    for (std::size_t h = 0; h < 4; ++h) {
      CAPTURE(l, h);
      if (roles.retrieval(l, h)) {
        CHECK(stats.tokens(l, h) == 110);
        CHECK(stats.tokens(l, h) == full_stats.tokens(l, h));
      } else {
        CHECK(stats.tokens(l, h) == 12);
      }
      stored += stats.tokens(l, h);
    }
  }
  CHECK(stored == 4 * 110 + 4 * 12);
  CHECK(stats.tokens_stored == stored);
  CHECK(stats.code_bytes == stored * cache.bytes_per_token());
  // Pages of 8: a retrieval head 14 pages (as in the full cache), a streaming head 2.
  CHECK(stats.pages_in_use == 4 * 14 + 4 * 2);
  CHECK(full_stats.pages_in_use == 8 * 14);
  CHECK(stats.page_bytes * full_stats.pages_in_use == full_stats.page_bytes * stats.pages_in_use);
  CHECK(stats.bytes_held() < full_stats.bytes_held());
}

TEST_CASE("DuoAttention with a cache budget caps streaming heads only", "[duo_attention]") {
  const kvc::Geometry geometry{.layers = 1, .q_heads = 2, .kv_heads = 2, .head_dim = 8};
  DuoCache cache =
      make_duo(geometry, HeadRoles::parse("RS"), 4, 8, {.budget = kvc::Budget::tokens(6)});
  const auto seq = cache.open_sequence();
  std::mt19937 rng(32);
  cache.append(seq, 0, random_tensor(rng, 2, 50, 8).view(), random_tensor(rng, 2, 50, 8).view());
  cache.compress(seq);
  CHECK(cache.positions(seq, 0, 0) == iota_positions(0, 49));
  CHECK(cache.positions(seq, 0, 1) == concat(iota_positions(0, 3), {48, 49}));
}

TEST_CASE("DuoAttention under a uniform planner cuts retrieval heads at the budget",
          "[duo_attention]") {
  // The documented limit: +inf ranks first but the cache still keeps `budget` tokens, so
  // without budget::DuoAttention a retrieval head keeps its newest `budget` tokens.
  const kvc::Geometry geometry{.layers = 1, .q_heads = 2, .kv_heads = 2, .head_dim = 8};
  kvc::KvCache<kvc::evict::DuoAttention> cache(
      geometry, {.budget = kvc::Budget::tokens(20)},
      kvc::evict::DuoAttention(HeadRoles::parse("RS"), {.sink = 4}));
  const auto seq = cache.open_sequence();
  std::mt19937 rng(33);
  cache.append(seq, 0, random_tensor(rng, 2, 100, 8).view(), random_tensor(rng, 2, 100, 8).view());
  cache.compress(seq);
  CHECK(cache.positions(seq, 0, 0) == iota_positions(80, 99));
  CHECK(cache.positions(seq, 0, 1) == concat(iota_positions(0, 3), iota_positions(84, 99)));
}

namespace {

// DuoAttention in float64 terms: per head the positions held; a retrieval head keeps all;
// a streaming head over b = min(sink + recent, budget) tokens keeps its b best by
// (sink: +inf, else the position), ties the newer.
struct ReferenceHead {
  bool retrieval = false;
  std::vector<Position> positions;
  std::vector<std::vector<double>> keys, values;

  void compress(std::size_t sink, std::size_t b) {
    if (retrieval || positions.size() <= b) return;
    std::vector<std::size_t> order(positions.size());
    std::iota(order.begin(), order.end(), 0);
    const auto score = [&](std::size_t i) {
      return static_cast<std::size_t>(positions[i]) < sink ? INFINITY
                                                           : static_cast<double>(positions[i]);
    };
    std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t c) {
      return score(a) != score(c) ? score(a) > score(c) : positions[a] > positions[c];
    });
    order.resize(b);
    std::sort(order.begin(), order.end());
    ReferenceHead kept{retrieval, {}, {}, {}};
    for (std::size_t i : order) {
      kept.positions.push_back(positions[i]);
      kept.keys.push_back(keys[i]);
      kept.values.push_back(values[i]);
    }
    *this = std::move(kept);
  }
};

}  // namespace

TEST_CASE("DuoAttention matches a float64 re-implementation over random roles and chunks",
          "[duo_attention]") {
  const unsigned seed = GENERATE(1U, 2U, 3U);
  const bool capped = GENERATE(false, true);
  CAPTURE(seed, capped);
  std::mt19937 rng(4000 + seed);
  const kvc::Geometry geometry{.layers = 3, .q_heads = 6, .kv_heads = 3, .head_dim = 16};
  HeadRoles roles(3, 3, HeadRole::streaming);
  std::bernoulli_distribution coin(0.5);
  for (std::size_t l = 0; l < 3; ++l) {
    for (std::size_t h = 0; h < 3; ++h) {
      if (coin(rng)) roles.set(l, h, HeadRole::retrieval);
    }
  }
  const std::size_t sink = std::uniform_int_distribution<std::size_t>(0, 6)(rng);
  const std::size_t recent = std::uniform_int_distribution<std::size_t>(1, 20)(rng);
  const std::size_t budget = capped ? (sink + recent) / 2 + 1 : sink + recent;
  DuoCache cache =
      make_duo(geometry, roles, sink, recent,
               {.budget = capped ? kvc::Budget::tokens(budget) : kvc::Budget::unlimited(),
                .page_tokens = 4});
  const auto seq = cache.open_sequence();
  std::vector<std::vector<ReferenceHead>> reference(3, std::vector<ReferenceHead>(3));
  for (std::size_t l = 0; l < 3; ++l) {
    for (std::size_t h = 0; h < 3; ++h) reference[l][h].retrieval = roles.retrieval(l, h);
  }
  std::vector<std::size_t> chunks{37, 1, 9, 1, 1, 23};
  chunks.insert(chunks.end(), 15, 1);
  std::size_t seen = 0;
  for (const std::size_t n : chunks) {
    for (std::size_t l = 0; l < 3; ++l) {
      const Tensor3 k = random_tensor(rng, 3, n, 16), v = random_tensor(rng, 3, n, 16);
      const Tensor3 q = random_tensor(rng, 6, n, 16);
      Tensor3 out(6, n, 16);
      cache.append(seq, l, k.view(), v.view());
      cache.attend(seq, l, q.view(), out.mutable_view());
      for (std::size_t h = 0; h < 3; ++h) {
        ReferenceHead& head = reference[l][h];
        for (std::size_t t = 0; t < n; ++t) {
          head.positions.push_back(static_cast<Position>(seen + t));
          std::vector<double> key(16), value(16);
          for (std::size_t c = 0; c < 16; ++c) {
            key[c] = k.at(h, t, c);
            value[c] = v.at(h, t, c);
          }
          head.keys.push_back(key);
          head.values.push_back(value);
        }
        // attend ran on everything appended; the cache then compressed (auto_compress).
        head.compress(sink, std::min(sink + recent, budget));
        CAPTURE(seen, l, h, sink, recent);
        REQUIRE(cache.positions(seq, l, h) == head.positions);
        const kvc::DenseLayer dense = cache.export_dense(seq, l);
        for (std::size_t i = 0; i < head.positions.size(); ++i) {
          for (std::size_t c = 0; c < 16; ++c) {
            REQUIRE(dense.keys[h](static_cast<Eigen::Index>(i), static_cast<Eigen::Index>(c)) ==
                    static_cast<float>(head.keys[i][c]));
            REQUIRE(dense.values[h](static_cast<Eigen::Index>(i), static_cast<Eigen::Index>(c)) ==
                    static_cast<float>(head.values[i][c]));
          }
        }
      }
    }
    seen += n;
  }
  // One more decode step: attend on the ragged cache equals exact attention over the kept
  // tokens (before this step's compression there is nothing to evict: compare after).
  for (std::size_t l = 0; l < 3; ++l) {
    cache.append(seq, l, random_tensor(rng, 3, 1, 16).view(), random_tensor(rng, 3, 1, 16).view());
    cache.compress(seq, l);
    const Tensor3 q = random_tensor(rng, 6, 1, 16);
    Tensor3 out(6, 1, 16);
    cache.attend(seq, l, q.view(), out.mutable_view());
    CHECK(kvc::test::attend_error(cache, seq, l, q, out) < 1e-4);
  }
}

namespace {

// Records the ObserveEvents the cache hands it (a calibration pass over a long prompt).
struct Recorder {
  struct HeadState {};
  static constexpr bool evicts = false;
  static constexpr std::string_view name() noexcept { return "recorder"; }
  std::vector<std::vector<float>>* weights = nullptr;
  std::vector<kvc::ObserveEvent>* events = nullptr;
  void on_append(HeadState&, const kvc::AppendEvent&) {}
  void score(const HeadState&, const kvc::ScoreContext&, std::span<float>) {}
  void on_compact(HeadState&, std::span<const std::uint32_t>) {}
  void on_observe(HeadState&, const kvc::ObserveEvent& event) {
    weights->emplace_back(event.weights.begin(), event.weights.end());
    events->push_back(event);
  }
};
static_assert(kvc::EvictionScorer<Recorder> && kvc::ObservesQueries<Recorder>);

}  // namespace

TEST_CASE("DuoAttention calibrated from a cache's observe picks the heads that look far back",
          "[duo_attention]") {
  // 2 layers × 2 kv heads, 300 tokens. Heads (0, 1) and (1, 0) carry a key direction on
  // tokens 100..109 that their window queries ask for; the other heads' queries are zero
  // (uniform: most of their mass is long-range too, but spread thinly and less). Sink 4,
  // recent 32: the planted heads have the most long-range mass and become retrieval.
  const kvc::Geometry geometry{.layers = 2, .q_heads = 4, .kv_heads = 2, .head_dim = 16};
  std::vector<std::vector<float>> weights;
  std::vector<kvc::ObserveEvent> events;
  kvc::KvCache<Recorder> calibration(geometry, {}, Recorder{&weights, &events});
  const auto seq = calibration.open_sequence();
  std::mt19937 rng(34);
  const bool planted[2][2] = {{false, true}, {true, false}};
  for (std::size_t l = 0; l < 2; ++l) {
    Tensor3 k = random_tensor(rng, 2, 300, 16, 0.1F);
    Tensor3 q(4, 16, 16);
    for (std::size_t h = 0; h < 2; ++h) {
      if (!planted[l][h]) continue;
      for (std::size_t t = 100; t < 110; ++t) k.at(h, t, 0) = 8.0F;
      for (std::size_t qh = 2 * h; qh < 2 * h + 2; ++qh) {
        for (std::size_t j = 0; j < 16; ++j) q.at(qh, j, 0) = 4.0F;
      }
    }
    calibration.append(seq, l, k.view(), random_tensor(rng, 2, 300, 16).view());
    calibration.observe(seq, l, q.view());
  }
  REQUIRE(events.size() == 4);
  for (std::size_t i = 0; i < 4; ++i) events[i].weights = weights[i];
  const HeadRoles roles = kvc::evict::calibrate_head_roles(
      events, 2, 2, {.sink = 4, .recent = 32, .retrieval_fraction = 0.5});
  CHECK(roles == HeadRoles::parse("SR\nRS\n"));
  for (const kvc::ObserveEvent& event : events) {
    const double mass = kvc::evict::long_range_mass(event, 4, 32);
    CHECK((mass > 0.95) == planted[event.layer][event.kv_head]);
  }
}
