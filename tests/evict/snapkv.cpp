// Tests of kvc/evict/snapkv.hpp: pooling and reduction order on hand-made events,
// hand-checked kept sets through the cache, a float64 re-implementation of SnapKV
// (window attention, row mean, pooling, group mean, top-k + window), decode invariants.
#include <kvc/evict/snapkv.hpp>

#include <kvc/core/concepts.hpp>
#include <kvc/core/kv_cache.hpp>

#include <catch2/catch.hpp>

#include "../support/reference.hpp"
#include "../support/snapkv_reference.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

namespace {

using kvc::Position;
using kvc::evict::SnapKV;
using kvc::test::random_tensor;
using kvc::test::Tensor3;
using SnapKVCache = kvc::KvCache<SnapKV>;

static_assert(kvc::EvictionScorer<SnapKV>);
static_assert(kvc::ObservesQueries<SnapKV>);
static_assert(!kvc::ConsumesAttention<SnapKV>);

constexpr float inf = std::numeric_limits<float>::infinity();

using kvc::test::iota_positions;

using kvc::test::concat;

}  // namespace

TEST_CASE("SnapKV pools the window-row mean with zero or -inf padding", "[snapkv]") {
  // One head, one window row over 7 tokens: the prefix is the first 6, token 6 is the window.
  const std::vector<float> row{0.3F, 0.0F, 0.6F, 0.0F, 0.0F, 0.9F, 0.2F};
  const kvc::ObserveEvent event{0, 0, row, 1, 1, 7};
  SnapKV::HeadState state;

  SnapKV({.window = 1, .kernel = 3, .pooling = SnapKV::Pooling::avg}).on_observe(state, event);
  // Average pooling divides by the full kernel (3) at both edges.
  const std::vector<double> avg{0.1, 0.3, 0.2, 0.2, 0.3, 0.3};
  REQUIRE(state.observed.size() == 7);
  for (std::size_t t = 0; t < 6; ++t) CHECK(state.observed[t] == Approx(avg[t]).margin(1e-7));
  CHECK(state.observed[6] == inf);

  SnapKV({.window = 1, .kernel = 3, .pooling = SnapKV::Pooling::max}).on_observe(state, event);
  const std::vector<double> max{0.3, 0.6, 0.6, 0.6, 0.9, 0.9};
  for (std::size_t t = 0; t < 6; ++t) CHECK(state.observed[t] == Approx(max[t]).margin(1e-7));
  CHECK(state.observed[6] == inf);

  // Only the last `window` rows count: with two rows and window 1, row 0 is ignored.
  std::vector<float> two_rows(14, 0.0F);
  std::copy(row.begin(), row.end(), two_rows.begin() + 7);
  std::fill_n(two_rows.begin(), 7, 5.0F);
  SnapKV({.window = 1, .kernel = 3, .pooling = SnapKV::Pooling::max})
      .on_observe(state, kvc::ObserveEvent{0, 0, two_rows, 2, 2, 7});
  for (std::size_t t = 0; t < 6; ++t) CHECK(state.observed[t] == Approx(max[t]).margin(1e-7));
}

TEST_CASE("SnapKV max-pools each query head before the group mean", "[snapkv]") {
  // Group of 2, window 1, 4 tokens (3 prefix). Head a: [1, 0, 0], head b: [0, 0, 1].
  // Pool then mean: ([1,1,0] + [0,1,1]) / 2 = [0.5, 1, 0.5]. (Mean then pool would give
  // [0.5, 0.5, 0.5].)
  const std::vector<float> rows{1.0F, 0.0F, 0.0F, 0.0F, 0.0F, 0.0F, 1.0F, 0.0F};
  SnapKV::HeadState state;
  SnapKV({.window = 1, .kernel = 3, .pooling = SnapKV::Pooling::max})
      .on_observe(state, kvc::ObserveEvent{0, 0, rows, 2, 1, 4});
  REQUIRE(state.observed.size() == 4);
  CHECK(state.observed[0] == Approx(0.5));
  CHECK(state.observed[1] == Approx(1.0));
  CHECK(state.observed[2] == Approx(0.5));
  CHECK(state.observed[3] == inf);
}

TEST_CASE("SnapKV rejects an even or zero kernel and a zero window", "[snapkv]") {
  CHECK_THROWS_AS(SnapKV({.window = 8, .kernel = 4}), kvc::UnsupportedError);
  CHECK_THROWS_AS(SnapKV({.window = 8, .kernel = 0}), kvc::UnsupportedError);
  CHECK_THROWS_AS(SnapKV({.window = 0, .kernel = 5}), kvc::UnsupportedError);
}

TEST_CASE("SnapKV on a hand-checked case: uniform window attention and pooling edges", "[snapkv]") {
  // Zero queries attend uniformly: window query j (position 8 + j) gives 1/(9 + j) to every
  // token it sees, so every prefix token 0..7 gets the same row mean u. Average pooling
  // (kernel 5, zero padding, divisor 5) lowers the edges: 3u/5, 4u/5, u, u, u, u, 4u/5,
  // 3u/5. Budget 8 = window 4 + the 4 interior tokens 2..5. Max pooling leaves all at u:
  // ties keep the newer tokens 4..7.
  const kvc::Geometry geometry{.layers = 1, .q_heads = 2, .kv_heads = 1, .head_dim = 4};
  const bool average = GENERATE(true, false);
  CAPTURE(average);
  std::mt19937 rng(11);
  SnapKVCache cache(
      geometry, {.budget = kvc::Budget::tokens(8)},
      SnapKV({.window = 4, .pooling = average ? SnapKV::Pooling::avg : SnapKV::Pooling::max}));
  const auto seq = cache.open_sequence();
  cache.append(seq, 0, random_tensor(rng, 1, 12, 4).view(), random_tensor(rng, 1, 12, 4).view());
  cache.observe(seq, 0, Tensor3(2, 4, 4).view());
  cache.compress(seq);
  const auto window = iota_positions(8, 11);
  if (average) {
    CHECK(cache.positions(seq, 0, 0) == concat(iota_positions(2, 5), window));
    double u = 0;
    for (int j = 0; j < 4; ++j) u += 1.0 / (9 + j) / 4;
    const auto& observed = cache.scorer_state(seq, 0, 0).observed;
    REQUIRE(observed.size() == 8);
    for (std::size_t t = 0; t < 4; ++t) CHECK(observed[t] == Approx(u).epsilon(1e-5));
    for (std::size_t t = 4; t < 8; ++t) CHECK(observed[t] == inf);
  } else {
    CHECK(cache.positions(seq, 0, 0) == concat(iota_positions(4, 7), window));
  }
}

TEST_CASE("SnapKV keeps the pooled neighbourhood of a planted heavy token", "[snapkv]") {
  // Head a's window queries (4, 0, 0, 0) see logit 4 on token 5 (key channel 0 = 2) and 0
  // elsewhere; head b's zero queries are uniform. After pooling (kernel 5) tokens 3..7 share
  // token 5's mass and beat every other prefix token for either pooling: budget 9 keeps
  // them and the window 12..15.
  const kvc::Geometry geometry{.layers = 1, .q_heads = 2, .kv_heads = 1, .head_dim = 4};
  const auto pooling = GENERATE(SnapKV::Pooling::avg, SnapKV::Pooling::max);
  std::mt19937 rng(12);
  SnapKVCache cache(geometry, {.budget = kvc::Budget::tokens(9)},
                    SnapKV({.window = 4, .pooling = pooling}));
  const auto seq = cache.open_sequence();
  Tensor3 k = random_tensor(rng, 1, 16, 4);
  for (std::size_t t = 0; t < 16; ++t) k.at(0, t, 0) = t == 5 ? 2.0F : 0.0F;
  Tensor3 q(2, 4, 4);
  for (std::size_t j = 0; j < 4; ++j) q.at(0, j, 0) = 4.0F;
  cache.append(seq, 0, k.view(), random_tensor(rng, 1, 16, 4).view());
  cache.observe(seq, 0, q.view());
  cache.compress(seq);
  CHECK(cache.positions(seq, 0, 0) == concat(iota_positions(3, 7), iota_positions(12, 15)));
}

namespace {

using kvc::test::ReferenceSnapKV;

}  // namespace

TEST_CASE("SnapKV matches a float64 re-implementation on random prompts", "[snapkv]") {
  const std::size_t group = GENERATE(1, 4);
  const bool average = GENERATE(true, false);
  const std::size_t budget = GENERATE(40, 77);
  const std::size_t kernel = budget == 40 ? 5 : 7;
  // With budget 77 the host passes 20 window queries for a window of 16: the last 16 count.
  const std::size_t rows = budget == 40 ? 16 : 20;
  CAPTURE(group, average, budget, kernel);
  const kvc::Geometry geometry{.layers = 1, .q_heads = group, .kv_heads = 1, .head_dim = 64};
  std::mt19937 rng(static_cast<unsigned>(1000 + group * 100 + budget + (average ? 1 : 0)));
  const SnapKV::Options options{.window = 16,
                                .kernel = kernel,
                                .pooling = average ? SnapKV::Pooling::avg : SnapKV::Pooling::max};
  SnapKVCache cache(geometry, {.budget = kvc::Budget::tokens(budget), .page_tokens = 8},
                    SnapKV(options));
  const auto seq = cache.open_sequence();
  const Tensor3 k = random_tensor(rng, 1, 150, 64);
  const Tensor3 q = random_tensor(rng, group, rows, 64, 2.0F);
  cache.append(seq, 0, k.view(), random_tensor(rng, 1, 150, 64).view());
  cache.observe(seq, 0, q.view());
  cache.compress(seq);

  const ReferenceSnapKV reference{16, kernel, average};
  const auto expected = reference.kept(k, q, budget);
  REQUIRE(cache.positions(seq, 0, 0) == expected);
  const auto scores = reference.scores(k, q);
  const auto& observed = cache.scorer_state(seq, 0, 0).observed;
  REQUIRE(observed.size() == budget);
  for (std::size_t i = 0; i < budget - 16; ++i) {
    const double want = scores[static_cast<std::size_t>(expected[i])];
    REQUIRE(observed[i] == Approx(want).epsilon(1e-4).margin(1e-9));
  }
  for (std::size_t i = budget - 16; i < budget; ++i) REQUIRE(observed[i] == inf);
}

TEST_CASE("SnapKV through prefill and decode: window kept, budget held, pages freed", "[snapkv]") {
  // append the prompt, observe its last w queries, attend (auto_compress compresses at its
  // end); then decode with a fixed budget: unobserved decode tokens are kept, the
  // lowest-scored observed tokens go one per step, the window stays.
  const kvc::Geometry geometry{.layers = 2, .q_heads = 8, .kv_heads = 2, .head_dim = 64};
  std::mt19937 rng(13);
  constexpr std::size_t prompt = 300, window = 32, budget = 100;
  SnapKVCache cache(geometry, {.budget = kvc::Budget::tokens(budget), .page_tokens = 16},
                    SnapKV({.window = window}));
  const auto seq = cache.open_sequence();
  Tensor3 out(8, prompt, 64);
  std::size_t pages_layer0 = 0;
  for (std::size_t l = 0; l < 2; ++l) {
    const Tensor3 q = random_tensor(rng, 8, prompt, 64);
    cache.append(seq, l, random_tensor(rng, 2, prompt, 64).view(),
                 random_tensor(rng, 2, prompt, 64).view());
    if (l == 0) pages_layer0 = cache.stats().pages_in_use;
    cache.observe(seq, l, q.slice(prompt - window, window));
    cache.attend(seq, l, q.view(), out.mutable_view());
  }
  CHECK(pages_layer0 == 2 * ((prompt + 15) / 16));  // one full layer: 2 heads × 19 pages
  auto stats = cache.stats();
  CHECK(stats.pages_in_use == 2 * 2 * ((budget + 15) / 16));  // 2 layers × 2 heads × 7 pages
  CHECK(stats.tokens_stored == 2 * 2 * budget);
  const auto prompt_window =
      iota_positions(static_cast<Position>(prompt - window), static_cast<Position>(prompt - 1));
  const auto contains_all = [](const std::vector<Position>& positions,
                               const std::vector<Position>& wanted) {
    return std::includes(positions.begin(), positions.end(), wanted.begin(), wanted.end());
  };
  for (std::size_t l = 0; l < 2; ++l) {
    for (std::size_t h = 0; h < 2; ++h)
      REQUIRE(contains_all(cache.positions(seq, l, h), prompt_window));
  }
  // The two kv heads of a layer choose different prefix tokens (random data).
  CHECK(cache.positions(seq, 0, 0) != cache.positions(seq, 0, 1));

  Tensor3 step_out(8, 1, 64);
  for (std::size_t step = 0; step < 20; ++step) {
    for (std::size_t l = 0; l < 2; ++l) {
      cache.append(seq, l, random_tensor(rng, 2, 1, 64).view(),
                   random_tensor(rng, 2, 1, 64).view());
      cache.attend(seq, l, random_tensor(rng, 8, 1, 64).view(), step_out.mutable_view());
      for (std::size_t h = 0; h < 2; ++h) {
        const auto positions = cache.positions(seq, l, h);
        REQUIRE(positions.size() == budget);
        REQUIRE(contains_all(positions, prompt_window));
        REQUIRE(contains_all(positions, iota_positions(static_cast<Position>(prompt),
                                                       static_cast<Position>(prompt + step))));
        // Observed scores cover the prefix still held; the decode tokens are unobserved.
        REQUIRE(cache.scorer_state(seq, l, h).observed.size() == budget - step - 1);
      }
    }
  }
  stats = cache.stats();
  CHECK(stats.pages_in_use == 2 * 2 * ((budget + 15) / 16));
  // State: one float per observed token, counted in metadata.
  CHECK(stats.metadata_bytes >= 2 * 2 * (budget - 20) * sizeof(float));
}

TEST_CASE("SnapKV re-observing during decode re-scores every stored token", "[snapkv]") {
  const kvc::Geometry geometry{.layers = 1, .q_heads = 4, .kv_heads = 1, .head_dim = 32};
  std::mt19937 rng(14);
  SnapKVCache cache(geometry, {.budget = kvc::Budget::tokens(40), .auto_compress = false},
                    SnapKV({.window = 8}));
  const auto seq = cache.open_sequence();
  const Tensor3 k = random_tensor(rng, 1, 60, 32);
  cache.append(seq, 0, k.slice(0, 50), random_tensor(rng, 1, 50, 32).view());
  cache.observe(seq, 0, random_tensor(rng, 4, 8, 32).view());
  cache.compress(seq);
  REQUIRE(cache.tokens(seq, 0, 0) == 40);
  // Ten more tokens, then a new observation of the last 8 and a compression: the new
  // window is the last 8 positions, and everything stored was scored again.
  cache.append(seq, 0, k.slice(50, 10), random_tensor(rng, 1, 10, 32).view());
  REQUIRE(cache.scorer_state(seq, 0, 0).observed.size() == 40);
  cache.observe(seq, 0, random_tensor(rng, 4, 8, 32).view());
  REQUIRE(cache.scorer_state(seq, 0, 0).observed.size() == 50);
  cache.compress(seq);
  const auto positions = cache.positions(seq, 0, 0);
  REQUIRE(positions.size() == 40);
  CHECK(std::vector<Position>(positions.end() - 8, positions.end()) == iota_positions(52, 59));
  const auto& observed = cache.scorer_state(seq, 0, 0).observed;
  CHECK(std::count(observed.begin(), observed.end(), inf) == 8);
}

TEST_CASE("SnapKV never observed behaves as a recent window", "[snapkv]") {
  const kvc::Geometry geometry{.layers = 1, .q_heads = 2, .kv_heads = 1, .head_dim = 16};
  std::mt19937 rng(15);
  SnapKVCache cache(geometry, {.budget = kvc::Budget::tokens(10)});
  const auto seq = cache.open_sequence();
  cache.append(seq, 0, random_tensor(rng, 1, 30, 16).view(), random_tensor(rng, 1, 30, 16).view());
  cache.compress(seq);
  CHECK(cache.positions(seq, 0, 0) == iota_positions(20, 29));
}
