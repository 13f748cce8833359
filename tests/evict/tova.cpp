// Tests of kvc/evict/tova.hpp: a hand-checked decode where the newest token itself is
// evicted, a float64 re-implementation over prefill and decode, the exact prefill rule via
// observe, and bytes.
#include <kvc/evict/tova.hpp>

#include <kvc/core/concepts.hpp>
#include <kvc/core/kv_cache.hpp>

#include <catch2/catch.hpp>

#include "../support/reference.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <type_traits>
#include <vector>

namespace {

using kvc::Position;
using kvc::evict::TOVA;
using kvc::test::random_tensor;
using kvc::test::Tensor3;
using TOVACache = kvc::KvCache<TOVA>;

static_assert(kvc::EvictionScorer<TOVA>);
static_assert(kvc::ConsumesAttention<TOVA>);
static_assert(kvc::ObservesQueries<TOVA>);
static_assert(std::is_empty_v<TOVA>);

// One token whose key is (c, 0, 0, 0).
Tensor3 key_along_x(float c) {
  Tensor3 k(1, 1, 4);
  k.at(0, 0, 0) = c;
  return k;
}

}  // namespace

TEST_CASE("TOVA on a hand-checked decode: the newest token can be evicted", "[tova]") {
  // Keys (c, 0, 0, 0) and decode queries (2, 0, 0, 0) in both heads of the group: the logit
  // of a token is 2c/sqrt(4) = c. Budget 4.
  const kvc::Geometry geometry{.layers = 1, .q_heads = 2, .kv_heads = 1, .head_dim = 4};
  std::mt19937 rng(21);
  TOVACache cache(geometry, {.budget = kvc::Budget::tokens(4)});
  const auto seq = cache.open_sequence();
  Tensor3 prompt_k(1, 4, 4);
  const float prompt_c[] = {3.0F, 0.0F, 2.0F, 0.0F};
  for (std::size_t t = 0; t < 4; ++t) prompt_k.at(0, t, 0) = prompt_c[t];
  Tensor3 prompt_out(2, 4, 4);
  cache.append(seq, 0, prompt_k.view(), random_tensor(rng, 1, 4, 4).view());
  cache.attend(seq, 0, random_tensor(rng, 2, 4, 4).view(), prompt_out.mutable_view());
  REQUIRE(cache.tokens(seq, 0, 0) == 4);

  Tensor3 q(2, 1, 4);
  q.at(0, 0, 0) = q.at(1, 0, 0) = 2.0F;
  Tensor3 out(2, 1, 4);
  // Token 4 (c = -5) draws the least attention of the five: it goes at once.
  cache.append(seq, 0, key_along_x(-5.0F).view(), random_tensor(rng, 1, 1, 4).view());
  cache.attend(seq, 0, q.view(), out.mutable_view());
  CHECK(cache.positions(seq, 0, 0) == std::vector<Position>{0, 1, 2, 3});
  // Token 5 (c = 4): tokens 1 and 3 tie lowest (c = 0); the tie keeps the newer, 1 goes.
  cache.append(seq, 0, key_along_x(4.0F).view(), random_tensor(rng, 1, 1, 4).view());
  cache.attend(seq, 0, q.view(), out.mutable_view());
  CHECK(cache.positions(seq, 0, 0) == std::vector<Position>{0, 2, 3, 5});
  // The scores are that step's weights only: e^c / (e^3 + e^0 + e^2 + e^0 + e^4).
  const double total = std::exp(3.0) + 1.0 + std::exp(2.0) + 1.0 + std::exp(4.0);
  const auto& latest = cache.scorer_state(seq, 0, 0).latest;
  REQUIRE(latest.size() == 4);
  CHECK(latest[0] == Approx(std::exp(3.0) / total).epsilon(1e-5));
  CHECK(latest[1] == Approx(std::exp(2.0) / total).epsilon(1e-5));
  CHECK(latest[2] == Approx(1.0 / total).epsilon(1e-5));
  CHECK(latest[3] == Approx(std::exp(4.0) / total).epsilon(1e-5));
  // A zero query is uniform (not accumulated: the past no longer counts): the oldest goes.
  cache.append(seq, 0, key_along_x(1.0F).view(), random_tensor(rng, 1, 1, 4).view());
  cache.attend(seq, 0, Tensor3(2, 1, 4).view(), out.mutable_view());
  CHECK(cache.positions(seq, 0, 0) == std::vector<Position>{2, 3, 5, 6});
  for (float x : cache.scorer_state(seq, 0, 0).latest) CHECK(x == Approx(0.2).epsilon(1e-5));
}

namespace {

// TOVA from the paper in float64, per kv head: the score is the latest attend's weights
// averaged over the group's query heads and the call's query tokens (for a decode step,
// exactly the group mean of the last query); keep the top `budget`.
struct ReferenceTOVA {
  std::size_t budget, dim, group;
  std::vector<Position> positions;
  std::vector<float> keys;
  std::vector<double> latest;

  void append(const Tensor3& k, std::size_t first) {
    for (std::size_t t = 0; t < k.tokens; ++t) {
      positions.push_back(static_cast<Position>(first + t));
      keys.insert(keys.end(), k.data.begin() + static_cast<std::ptrdiff_t>(t * dim),
                  k.data.begin() + static_cast<std::ptrdiff_t>((t + 1) * dim));
    }
    latest.resize(positions.size(), INFINITY);
  }
  std::vector<double> weights(const Tensor3& q, std::size_t h, std::size_t t,
                              Position position) const {
    const std::vector<float> query(
        q.data.begin() + static_cast<std::ptrdiff_t>((h * q.tokens + t) * dim),
        q.data.begin() + static_cast<std::ptrdiff_t>((h * q.tokens + t + 1) * dim));
    return kvc::test::reference_weights(query, keys.data(), positions, position, dim);
  }
  void attend(const Tensor3& q, std::size_t seen) {
    std::fill(latest.begin(), latest.end(), 0.0);
    for (std::size_t h = 0; h < group; ++h) {
      for (std::size_t t = 0; t < q.tokens; ++t) {
        const auto w = weights(q, h, t, static_cast<Position>(seen - q.tokens + t));
        for (std::size_t i = 0; i < w.size(); ++i) {
          latest[i] += w[i] / static_cast<double>(group * q.tokens);
        }
      }
    }
  }
  void compress() {
    const std::size_t n = positions.size();
    if (n <= budget) return;
    std::vector<std::size_t> order(n);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
      return latest[a] != latest[b] ? latest[a] > latest[b] : a > b;
    });
    order.resize(budget);
    std::sort(order.begin(), order.end());
    std::vector<Position> kept_positions;
    std::vector<float> kept_keys;
    std::vector<double> kept_latest;
    for (std::size_t i : order) {
      kept_positions.push_back(positions[i]);
      kept_keys.insert(kept_keys.end(), keys.begin() + static_cast<std::ptrdiff_t>(i * dim),
                       keys.begin() + static_cast<std::ptrdiff_t>((i + 1) * dim));
      kept_latest.push_back(latest[i]);
    }
    positions = std::move(kept_positions);
    keys = std::move(kept_keys);
    latest = std::move(kept_latest);
  }
};

}  // namespace

TEST_CASE("TOVA matches a float64 re-implementation over prefill and decode", "[tova]") {
  const std::size_t group = GENERATE(1, 4);
  const std::size_t budget = GENERATE(16, 33);
  CAPTURE(group, budget);
  const kvc::Geometry geometry{.layers = 1, .q_heads = group, .kv_heads = 1, .head_dim = 64};
  std::mt19937 rng(static_cast<unsigned>(2000 + group * 100 + budget));
  TOVACache cache(geometry, {.budget = kvc::Budget::tokens(budget), .page_tokens = 8});
  const auto seq = cache.open_sequence();
  ReferenceTOVA reference{budget, 64, group, {}, {}, {}};

  const Tensor3 k = random_tensor(rng, 1, 80, 64);
  const Tensor3 q = random_tensor(rng, group, 80, 64, 2.0F);
  Tensor3 out(group, 80, 64);
  cache.append(seq, 0, k.view(), random_tensor(rng, 1, 80, 64).view());
  cache.attend(seq, 0, q.view(), out.mutable_view());
  reference.append(k, 0);
  reference.attend(q, 80);
  reference.compress();
  REQUIRE(cache.positions(seq, 0, 0) == reference.positions);

  Tensor3 step_out(group, 1, 64);
  for (std::size_t step = 0; step < 60; ++step) {
    const Tensor3 step_k = random_tensor(rng, 1, 1, 64);
    const Tensor3 step_q = random_tensor(rng, group, 1, 64, 2.0F);
    cache.append(seq, 0, step_k.view(), random_tensor(rng, 1, 1, 64).view());
    cache.attend(seq, 0, step_q.view(), step_out.mutable_view());
    reference.append(step_k, 80 + step);
    reference.attend(step_q, 81 + step);
    reference.compress();
    const auto positions = cache.positions(seq, 0, 0);
    REQUIRE(positions == reference.positions);
    REQUIRE(positions.size() == budget);  // one in, one out
    const auto& latest = cache.scorer_state(seq, 0, 0).latest;
    for (std::size_t i = 0; i < latest.size(); ++i) {
      REQUIRE(latest[i] == Approx(reference.latest[i]).epsilon(1e-4).margin(1e-7));
    }
  }
}

TEST_CASE("TOVA's exact prefill rule: observe the prompt's last query, then compress", "[tova]") {
  const std::size_t group = GENERATE(1, 2);
  CAPTURE(group);
  const kvc::Geometry geometry{.layers = 1, .q_heads = 2 * group, .kv_heads = 2, .head_dim = 32};
  std::mt19937 rng(static_cast<unsigned>(22 + group));
  TOVACache cache(geometry, {.budget = kvc::Budget::tokens(12), .auto_compress = false});
  const auto seq = cache.open_sequence();
  const Tensor3 k = random_tensor(rng, 2, 50, 32);
  const Tensor3 q = random_tensor(rng, 2 * group, 50, 32, 2.0F);
  Tensor3 out(2 * group, 50, 32);
  cache.append(seq, 0, k.view(), random_tensor(rng, 2, 50, 32).view());
  cache.attend(seq, 0, q.view(), out.mutable_view());
  REQUIRE(cache.tokens(seq, 0, 0) == 50);
  cache.observe(seq, 0, q.slice(49, 1));
  cache.compress(seq);
  for (std::size_t h = 0; h < 2; ++h) {
    // Reference: the group mean of the last query's weights over all 50 tokens.
    ReferenceTOVA reference{12, 32, group, {}, {}, {}};
    Tensor3 head_k(1, 50, 32);
    std::copy_n(k.data.begin() + static_cast<std::ptrdiff_t>(h * 50 * 32), 50 * 32,
                head_k.data.begin());
    reference.append(head_k, 0);
    Tensor3 last(group, 1, 32);
    for (std::size_t a = 0; a < group; ++a) {
      for (std::size_t c = 0; c < 32; ++c) last.at(a, 0, c) = q.at(h * group + a, 49, c);
    }
    reference.attend(last, 50);
    reference.compress();
    CHECK(cache.positions(seq, 0, h) == reference.positions);
  }
}

TEST_CASE("TOVA frees pages: bytes held follow the budget during decode", "[tova]") {
  const kvc::Geometry geometry{.layers = 2, .q_heads = 8, .kv_heads = 2, .head_dim = 64};
  std::mt19937 rng(23);
  TOVACache cache(geometry, {.budget = kvc::Budget::tokens(64), .page_tokens = 16});
  const auto seq = cache.open_sequence();
  Tensor3 out(8, 256, 64);
  for (std::size_t l = 0; l < 2; ++l) {
    cache.append(seq, l, random_tensor(rng, 2, 256, 64).view(),
                 random_tensor(rng, 2, 256, 64).view());
    if (l == 0) CHECK(cache.stats().pages_in_use == 2 * 16);
    cache.attend(seq, l, random_tensor(rng, 8, 256, 64).view(), out.mutable_view());
  }
  CHECK(cache.stats().pages_in_use == 2 * 2 * 4);
  Tensor3 step_out(8, 1, 64);
  for (std::size_t step = 0; step < 30; ++step) {
    for (std::size_t l = 0; l < 2; ++l) {
      cache.append(seq, l, random_tensor(rng, 2, 1, 64).view(),
                   random_tensor(rng, 2, 1, 64).view());
      cache.attend(seq, l, random_tensor(rng, 8, 1, 64).view(), step_out.mutable_view());
      REQUIRE(cache.tokens(seq, l, 0) == 64);
      REQUIRE(cache.tokens(seq, l, 1) == 64);
    }
  }
  const auto stats = cache.stats();
  CHECK(stats.pages_in_use == 2 * 2 * 4);
  CHECK(stats.tokens_stored == 2 * 2 * 64);
  CHECK(stats.metadata_bytes >= stats.tokens_stored * sizeof(float));
}
