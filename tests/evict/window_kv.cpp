// Tests of kvc/evict/window_kv.hpp: window sums on hand-made states, a hand-checked kept set
// through the cache (a planted heavy token keeps its whole window), a float64
// re-implementation (SnapKV votes, window sums by position, top-k + window), and the
// invariants through prefill and decode.
#include <kvc/evict/window_kv.hpp>

#include <kvc/core/concepts.hpp>
#include <kvc/core/kv_cache.hpp>

#include <catch2/catch.hpp>

#include "../support/reference.hpp"
#include "../support/snapkv_reference.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <numeric>
#include <random>
#include <vector>

namespace {

using kvc::Position;
using kvc::evict::WindowKV;
using kvc::test::random_tensor;
using kvc::test::Tensor3;
using WindowKVCache = kvc::KvCache<WindowKV>;

static_assert(kvc::EvictionScorer<WindowKV>);
static_assert(kvc::ObservesQueries<WindowKV>);
static_assert(kvc::ReportsStateBytes<WindowKV>);
static_assert(!kvc::ConsumesAttention<WindowKV>);

constexpr float inf = std::numeric_limits<float>::infinity();

using kvc::test::iota_positions;

using kvc::test::concat;
using kvc::test::ReferenceSnapKV;

// Kept prefix positions (below `limit`) grouped by window: window → tokens kept.
std::map<Position, std::size_t> windows_of(const std::vector<Position>& positions, Position limit,
                                           Position block) {
  std::map<Position, std::size_t> count;
  for (Position p : positions) {
    if (p < limit) ++count[p / block];
  }
  return count;
}

}  // namespace

TEST_CASE("WindowKV scores every token with its window's sum of votes", "[window_kv]") {
  const WindowKV scorer({.window = 2, .kernel = 1, .block = 4});
  WindowKV::HeadState state;
  // Slots hold positions 0..3 | 8, 9, 11 | 12, 13 (14 unobserved). Votes as observed:
  state.observed = {1, 2, 3, 4, 0.5F, 0.25F, 0.25F, 6, inf};
  const std::vector<Position> positions{0, 1, 2, 3, 8, 9, 11, 12, 13, 14};
  std::vector<float> scores(positions.size());
  scorer.score(state, kvc::ScoreContext{0, 0, positions, 5, 15}, scores);
  const std::vector<float> expected{10, 10, 10, 10, 1, 1, 1, 6, inf, inf};
  CHECK(scores == expected);
}

TEST_CASE("WindowKV rejects a zero block and SnapKV's bad options", "[window_kv]") {
  CHECK_THROWS_AS(WindowKV({.block = 0}), kvc::UnsupportedError);
  CHECK_THROWS_AS(WindowKV({.kernel = 4}), kvc::UnsupportedError);
  CHECK_THROWS_AS(WindowKV({.window = 0}), kvc::UnsupportedError);
  CHECK(WindowKV{}.options().block == 8);
  CHECK(WindowKV{}.options().window == 64);
}

TEST_CASE("WindowKV keeps the whole window of a planted heavy token", "[window_kv]") {
  // 20 tokens, observation window 4 (16..19), windows of 4, kernel 1 (no pooling). Head a's
  // window queries see logit 4 on token 5 and 0 elsewhere; head b's zero queries are
  // uniform: every prefix token but 5 gets the same vote. Budget 10 = the window 16..19 +
  // window 1 (4..7, holding token 5) + 2 tokens of the next window: windows 0, 2, 3 tie, so
  // the newest (12..15) is next and its newest two tokens (14, 15) fill the budget.
  // SnapKV on the same input keeps 5 and the newest prefix tokens 11..15 instead.
  const kvc::Geometry geometry{.layers = 1, .q_heads = 2, .kv_heads = 1, .head_dim = 4};
  std::mt19937 rng(21);
  Tensor3 k = random_tensor(rng, 1, 20, 4);
  for (std::size_t t = 0; t < 20; ++t) k.at(0, t, 0) = t == 5 ? 2.0F : 0.0F;
  Tensor3 q(2, 4, 4);
  for (std::size_t j = 0; j < 4; ++j) q.at(0, j, 0) = 4.0F;
  const Tensor3 v = random_tensor(rng, 1, 20, 4);

  WindowKVCache cache(geometry, {.budget = kvc::Budget::tokens(10)},
                      WindowKV({.window = 4, .kernel = 1, .block = 4}));
  const auto seq = cache.open_sequence();
  cache.append(seq, 0, k.view(), v.view());
  cache.observe(seq, 0, q.view());
  cache.compress(seq);
  CHECK(cache.positions(seq, 0, 0) ==
        concat(concat(iota_positions(4, 7), {14, 15}), iota_positions(16, 19)));

  kvc::KvCache<kvc::evict::SnapKV> snap(geometry, {.budget = kvc::Budget::tokens(10)},
                                        kvc::evict::SnapKV({.window = 4, .kernel = 1}));
  const auto other = snap.open_sequence();
  snap.append(other, 0, k.view(), v.view());
  snap.observe(other, 0, q.view());
  snap.compress(other);
  CHECK(snap.positions(other, 0, 0) == concat({5}, iota_positions(11, 19)));
}

namespace {

// WindowKV in float64 on a fresh prompt of n tokens: SnapKV's votes (per head the mean of
// the last w window rows, pooling over the prefix, the group mean), window sums by
// position / block, every token ranked by its window's sum (ties: the newer token); the top
// budget − w prefix tokens and the w window tokens.
struct ReferenceWindowKV {
  std::size_t window, kernel, block;
  bool average;

  std::vector<double> votes(const Tensor3& k, const Tensor3& q) const {
    return ReferenceSnapKV{window, kernel, average}.scores(k, q);
  }

  std::vector<Position> kept(const Tensor3& k, const Tensor3& q, std::size_t budget) const {
    const auto v = votes(k, q);
    const std::size_t prefix = v.size();
    std::vector<double> window_sum((prefix + block - 1) / block, 0.0);
    for (std::size_t t = 0; t < prefix; ++t) window_sum[t / block] += v[t];
    std::vector<std::size_t> order(prefix);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
      const double sa = window_sum[a / block], sb = window_sum[b / block];
      return sa != sb ? sa > sb : a > b;
    });
    std::vector<Position> result;
    for (std::size_t i = 0; i < budget - (k.tokens - prefix); ++i) {
      result.push_back(static_cast<Position>(order[i]));
    }
    for (std::size_t t = prefix; t < k.tokens; ++t) result.push_back(static_cast<Position>(t));
    std::sort(result.begin(), result.end());
    return result;
  }
};

}  // namespace

TEST_CASE("WindowKV matches a float64 re-implementation on random prompts", "[window_kv]") {
  const std::size_t group = GENERATE(1, 4);
  const bool average = GENERATE(true, false);
  const std::size_t block = GENERATE(8, 5);
  const std::size_t budget = GENERATE(40, 77);
  CAPTURE(group, average, block, budget);
  const std::size_t kernel = budget == 40 ? 5 : 7;
  const kvc::Geometry geometry{.layers = 1, .q_heads = group, .kv_heads = 1, .head_dim = 32};
  std::mt19937 rng(static_cast<unsigned>(2000 + group * 100 + budget + block * 7 + average));
  WindowKVCache cache(
      geometry, {.budget = kvc::Budget::tokens(budget), .page_tokens = 8},
      WindowKV({.window = 16,
                .kernel = kernel,
                .pooling = average ? WindowKV::Pooling::avg : WindowKV::Pooling::max,
                .block = block}));
  const auto seq = cache.open_sequence();
  // Some keys share a direction with the queries, so the votes are far from uniform.
  Tensor3 k = random_tensor(rng, 1, 150, 32);
  const Tensor3 q = random_tensor(rng, group, 16, 32, 1.5F);
  cache.append(seq, 0, k.view(), random_tensor(rng, 1, 150, 32).view());
  cache.observe(seq, 0, q.view());
  cache.compress(seq);

  const ReferenceWindowKV reference{16, kernel, block, average};
  const auto expected = reference.kept(k, q, budget);
  REQUIRE(cache.positions(seq, 0, 0) == expected);
  // Whole windows, but for at most one partial one (and the one the window starts in).
  const auto windows = windows_of(expected, 150 - 16, static_cast<Position>(block));
  std::size_t partial = 0;
  for (const auto& [window, count] : windows) {
    const bool cut_by_window = static_cast<std::size_t>(window + 1) * block > 150 - 16;
    if (count != block && !cut_by_window) ++partial;
  }
  CHECK(partial <= 1);
}

TEST_CASE("WindowKV through prefill and decode: window kept, budget held, pages freed",
          "[window_kv]") {
  const kvc::Geometry geometry{.layers = 2, .q_heads = 8, .kv_heads = 2, .head_dim = 32};
  std::mt19937 rng(23);
  constexpr std::size_t prompt = 300, window = 32, budget = 100, block = 8;
  WindowKVCache cache(geometry, {.budget = kvc::Budget::tokens(budget), .page_tokens = 16},
                      WindowKV({.window = window, .block = block}));
  const auto seq = cache.open_sequence();
  Tensor3 out(8, prompt, 32);
  for (std::size_t l = 0; l < 2; ++l) {
    const Tensor3 q = random_tensor(rng, 8, prompt, 32);
    cache.append(seq, l, random_tensor(rng, 2, prompt, 32).view(),
                 random_tensor(rng, 2, prompt, 32).view());
    cache.observe(seq, l, q.slice(prompt - window, window));
    cache.attend(seq, l, q.view(), out.mutable_view());
  }
  auto stats = cache.stats();
  CHECK(stats.tokens_stored == 2 * 2 * budget);
  CHECK(stats.pages_in_use == 2 * 2 * ((budget + 15) / 16));
  const auto prompt_window =
      iota_positions(static_cast<Position>(prompt - window), static_cast<Position>(prompt - 1));
  const auto contains_all = [](const std::vector<Position>& positions,
                               const std::vector<Position>& wanted) {
    return std::includes(positions.begin(), positions.end(), wanted.begin(), wanted.end());
  };
  for (std::size_t l = 0; l < 2; ++l) {
    for (std::size_t h = 0; h < 2; ++h) {
      const auto positions = cache.positions(seq, l, h);
      REQUIRE(contains_all(positions, prompt_window));
      // 68 prefix tokens: 8 whole windows and 4 tokens of a ninth.
      const auto windows = windows_of(positions, prompt - window, block);
      std::size_t whole = 0, partial = 0;
      for (const auto& [unused, count] : windows) (count == block ? whole : partial) += 1;
      CHECK(whole == 8);
      CHECK(partial == 1);
    }
  }
  Tensor3 step_out(8, 1, 32);
  for (std::size_t step = 0; step < 12; ++step) {
    for (std::size_t l = 0; l < 2; ++l) {
      cache.append(seq, l, random_tensor(rng, 2, 1, 32).view(),
                   random_tensor(rng, 2, 1, 32).view());
      cache.attend(seq, l, random_tensor(rng, 8, 1, 32).view(), step_out.mutable_view());
      for (std::size_t h = 0; h < 2; ++h) {
        const auto positions = cache.positions(seq, l, h);
        REQUIRE(positions.size() == budget);
        REQUIRE(contains_all(positions, prompt_window));
        REQUIRE(contains_all(positions, iota_positions(static_cast<Position>(prompt),
                                                       static_cast<Position>(prompt + step))));
      }
    }
  }
  stats = cache.stats();
  CHECK(stats.pages_in_use == 2 * 2 * ((budget + 15) / 16));
  CHECK(stats.metadata_bytes >= 2 * 2 * (budget - 12 - window) * sizeof(float));
}
