// Tests of kvc/evict/h2o.hpp: hand-checked heavy hitters, a float64 re-implementation of
// H2O with decode-time eviction, ratio budgets and bytes.
#include <kvc/evict/h2o.hpp>

#include <kvc/core/kv_cache.hpp>

#include <catch2/catch.hpp>

#include "../support/reference.hpp"

#include <algorithm>
#include <numeric>
#include <random>

namespace {

using kvc::test::random_tensor;
using kvc::test::Tensor3;
using H2OCache = kvc::KvCache<kvc::evict::H2O>;

double harmonic(std::size_t n) {
  double sum = 0;
  for (std::size_t i = 1; i <= n; ++i) sum += 1.0 / static_cast<double>(i);
  return sum;
}

}  // namespace

TEST_CASE("H2O on a hand-checked case: uniform attention makes the oldest tokens heavy", "[h2o]") {
  // Zero queries attend uniformly: causal prefill query t gives 1/(t+1) to tokens 0..t, so
  // token i accumulates H_8 − H_i (harmonic numbers), summed over the 2 query heads of the
  // group. Budget 4 with 2 recent: keep the two heaviest (0, 1) and the two newest (6, 7).
  const kvc::Geometry geometry{.layers = 1, .q_heads = 2, .kv_heads = 1, .head_dim = 4};
  std::mt19937 rng(1);
  H2OCache cache(geometry, {.budget = kvc::Budget::tokens(4)},
                 kvc::evict::H2O({.recent_tokens = 2}));
  const auto seq = cache.open_sequence();
  const Tensor3 zeros(2, 8, 4);
  Tensor3 out(2, 8, 4);
  cache.append(seq, 0, random_tensor(rng, 1, 8, 4).view(), random_tensor(rng, 1, 8, 4).view());
  cache.attend(seq, 0, zeros.view(), out.mutable_view());
  CHECK(cache.positions(seq, 0, 0) == std::vector<kvc::Position>{0, 1, 6, 7});
  const auto& accumulated = cache.scorer_state(seq, 0, 0).accumulated;
  REQUIRE(accumulated.size() == 4);
  CHECK(accumulated[0] == Approx(2 * (harmonic(8) - harmonic(0))).epsilon(1e-5));
  CHECK(accumulated[1] == Approx(2 * (harmonic(8) - harmonic(1))).epsilon(1e-5));
  CHECK(accumulated[2] == Approx(2 * (1.0 / 7 + 1.0 / 8)).epsilon(1e-5));
  CHECK(accumulated[3] == Approx(2 * (1.0 / 8)).epsilon(1e-5));

  // Decode token 8 attends uniformly (1/5) over the 5 stored tokens: 7 and 8 are recent,
  // 0 and 1 still the heaviest of the rest; 6 goes.
  const Tensor3 zero_step(2, 1, 4);
  Tensor3 step_out(2, 1, 4);
  cache.append(seq, 0, random_tensor(rng, 1, 1, 4).view(), random_tensor(rng, 1, 1, 4).view());
  cache.attend(seq, 0, zero_step.view(), step_out.mutable_view());
  CHECK(cache.positions(seq, 0, 0) == std::vector<kvc::Position>{0, 1, 7, 8});
  CHECK(cache.scorer_state(seq, 0, 0).accumulated[3] == Approx(2 * 0.2).epsilon(1e-5));
}

TEST_CASE("H2O with a planted heavy hitter keeps it through decode", "[h2o]") {
  // Token 5's key aligns with every query: it absorbs most attention and must survive
  // however long the decode runs, while the other old tokens are evicted.
  const kvc::Geometry geometry{.layers = 1, .q_heads = 4, .kv_heads = 1, .head_dim = 64};
  std::mt19937 rng(2);
  H2OCache cache(geometry, {.budget = kvc::Budget::tokens(8)});
  const auto seq = cache.open_sequence();
  Tensor3 k = random_tensor(rng, 1, 32, 64, 0.1F);
  std::vector<float> direction(64);
  for (std::size_t c = 0; c < 64; ++c) direction[c] = (c % 2 == 0) ? 1.0F : -1.0F;
  for (std::size_t c = 0; c < 64; ++c) k.at(0, 5, c) = 3.0F * direction[c];
  cache.append(seq, 0, k.view(), random_tensor(rng, 1, 32, 64).view());
  Tensor3 q(4, 32, 64);
  for (std::size_t h = 0; h < 4; ++h) {
    for (std::size_t t = 0; t < 32; ++t) {
      for (std::size_t c = 0; c < 64; ++c) q.at(h, t, c) = direction[c];
    }
  }
  Tensor3 out(4, 32, 64);
  cache.attend(seq, 0, q.view(), out.mutable_view());
  Tensor3 step_q(4, 1, 64);
  std::copy(q.data.begin(), q.data.begin() + 64, step_q.data.begin());
  for (std::size_t h = 1; h < 4; ++h)
    std::copy_n(step_q.data.begin(), 64, step_q.data.begin() + h * 64);
  Tensor3 step_out(4, 1, 64);
  for (int step = 0; step < 50; ++step) {
    cache.append(seq, 0, random_tensor(rng, 1, 1, 64, 0.1F).view(),
                 random_tensor(rng, 1, 1, 64).view());
    cache.attend(seq, 0, step_q.view(), step_out.mutable_view());
    const auto positions = cache.positions(seq, 0, 0);
    REQUIRE(positions.size() == 8);
    REQUIRE(std::find(positions.begin(), positions.end(), 5) != positions.end());
    // The 4 newest are always there (recent = B/2).
    const auto newest = static_cast<kvc::Position>(32 + step);
    for (kvc::Position p = newest - 3; p <= newest; ++p) {
      REQUIRE(std::find(positions.begin(), positions.end(), p) != positions.end());
    }
  }
}

namespace {

// H2O written out straight from the paper, in float64: the set kept, the accumulated
// scores, causal prefill, one eviction per decode step.
struct ReferenceH2O {
  std::size_t budget, recent, dim, group;
  std::vector<kvc::Position> positions;
  std::vector<std::vector<float>> keys;
  std::vector<double> accumulated;

  void append(const Tensor3& k, std::size_t first) {
    for (std::size_t t = 0; t < k.tokens; ++t) {
      positions.push_back(static_cast<kvc::Position>(first + t));
      keys.emplace_back(k.data.begin() + static_cast<std::ptrdiff_t>(t * dim),
                        k.data.begin() + static_cast<std::ptrdiff_t>((t + 1) * dim));
      accumulated.push_back(0.0);
    }
  }
  void attend(const Tensor3& q, std::size_t seen) {
    std::vector<float> flat;
    for (const auto& key : keys) flat.insert(flat.end(), key.begin(), key.end());
    for (std::size_t h = 0; h < group; ++h) {
      for (std::size_t t = 0; t < q.tokens; ++t) {
        std::vector<float> query(
            q.data.begin() + static_cast<std::ptrdiff_t>((h * q.tokens + t) * dim),
            q.data.begin() + static_cast<std::ptrdiff_t>((h * q.tokens + t + 1) * dim));
        const auto w = kvc::test::reference_weights(
            query, flat.data(), positions, static_cast<kvc::Position>(seen - q.tokens + t), dim);
        for (std::size_t i = 0; i < w.size(); ++i) accumulated[i] += w[i];
      }
    }
  }
  void compress() {
    const std::size_t n = positions.size();
    if (n <= budget) return;
    std::vector<std::size_t> order(n - recent);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
      return accumulated[a] != accumulated[b] ? accumulated[a] > accumulated[b] : a > b;
    });
    std::vector<bool> keep(n, false);
    for (std::size_t i = 0; i < budget - recent; ++i) keep[order[i]] = true;
    for (std::size_t i = n - recent; i < n; ++i) keep[i] = true;
    std::size_t kept = 0;
    for (std::size_t i = 0; i < n; ++i) {
      if (!keep[i]) continue;
      positions[kept] = positions[i];
      keys[kept] = keys[i];
      accumulated[kept] = accumulated[i];
      ++kept;
    }
    positions.resize(kept);
    keys.resize(kept);
    accumulated.resize(kept);
  }
};

}  // namespace

TEST_CASE("H2O matches a float64 re-implementation over prefill and decode", "[h2o]") {
  const std::size_t group = GENERATE(1, 4);
  const std::size_t budget = GENERATE(16, 33);
  CAPTURE(group, budget);
  const kvc::Geometry geometry{.layers = 1, .q_heads = group, .kv_heads = 1, .head_dim = 64};
  std::mt19937 rng(static_cast<unsigned>(group * 100 + budget));
  H2OCache cache(geometry, {.budget = kvc::Budget::tokens(budget), .page_tokens = 8});
  const auto seq = cache.open_sequence();
  ReferenceH2O reference{budget, budget / 2, 64, group, {}, {}, {}};

  const Tensor3 k = random_tensor(rng, 1, 80, 64);
  const Tensor3 q = random_tensor(rng, group, 80, 64);
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
    const Tensor3 step_q = random_tensor(rng, group, 1, 64);
    cache.append(seq, 0, step_k.view(), random_tensor(rng, 1, 1, 64).view());
    cache.attend(seq, 0, step_q.view(), step_out.mutable_view());
    reference.append(step_k, 80 + step);
    reference.attend(step_q, 81 + step);
    reference.compress();
    REQUIRE(cache.positions(seq, 0, 0) == reference.positions);
    const auto& accumulated = cache.scorer_state(seq, 0, 0).accumulated;
    for (std::size_t i = 0; i < accumulated.size(); ++i) {
      REQUIRE(accumulated[i] == Approx(reference.accumulated[i]).epsilon(1e-4).margin(1e-6));
    }
  }
}

TEST_CASE("H2O with a ratio budget keeps ceil(ratio × seen) and frees the rest", "[h2o]") {
  const kvc::Geometry geometry{.layers = 2, .q_heads = 8, .kv_heads = 2, .head_dim = 64};
  std::mt19937 rng(3);
  H2OCache cache(geometry, {.budget = kvc::Budget::ratio(0.25), .page_tokens = 16});
  const auto seq = cache.open_sequence();
  Tensor3 out(8, 200, 64);
  for (std::size_t l = 0; l < 2; ++l) {
    cache.append(seq, l, random_tensor(rng, 2, 200, 64).view(),
                 random_tensor(rng, 2, 200, 64).view());
    cache.attend(seq, l, random_tensor(rng, 8, 200, 64).view(), out.mutable_view());
  }
  auto stats = cache.stats();
  CHECK(stats.tokens_stored == 2 * 2 * 50);
  CHECK(stats.pages_in_use == 2 * 2 * 4);  // ceil(50 / 16)
  CHECK(stats.code_bytes == 2 * 2 * 50 * 2 * 64 * sizeof(float));
  Tensor3 step_out(8, 1, 64);
  for (std::size_t step = 1; step <= 20; ++step) {
    for (std::size_t l = 0; l < 2; ++l) {
      cache.append(seq, l, random_tensor(rng, 2, 1, 64).view(),
                   random_tensor(rng, 2, 1, 64).view());
      cache.attend(seq, l, random_tensor(rng, 8, 1, 64).view(), step_out.mutable_view());
      const auto expected =
          static_cast<std::size_t>(std::ceil(0.25 * static_cast<double>(200 + step)));
      REQUIRE(cache.tokens(seq, l, 0) == std::max<std::size_t>(expected, 50));
    }
  }
  // Metadata counts H2O's one float per kept token.
  stats = cache.stats();
  CHECK(stats.metadata_bytes >= stats.tokens_stored * sizeof(float));
}

TEST_CASE("H2O's bytes held drop with the budget against the full cache", "[h2o]") {
  const kvc::Geometry geometry{.layers = 2, .q_heads = 8, .kv_heads = 2, .head_dim = 128};
  std::mt19937 rng(4);
  const Tensor3 k = random_tensor(rng, 2, 512, 128);
  const Tensor3 v = random_tensor(rng, 2, 512, 128);
  const Tensor3 q = random_tensor(rng, 8, 512, 128);
  Tensor3 out(8, 512, 128);

  kvc::KvCache<> full(geometry);
  const auto full_seq = full.open_sequence();
  H2OCache compressed(geometry, {.budget = kvc::Budget::tokens(128)});
  const auto seq = compressed.open_sequence();
  for (std::size_t l = 0; l < 2; ++l) {
    full.append(full_seq, l, k.view(), v.view());
    full.attend(full_seq, l, q.view(), out.mutable_view());
    compressed.append(seq, l, k.view(), v.view());
    compressed.attend(seq, l, q.view(), out.mutable_view());
  }
  const auto full_stats = full.stats();
  const auto stats = compressed.stats();
  CHECK(stats.tokens_stored * 4 == full_stats.tokens_stored);
  CHECK(stats.page_bytes * 4 == full_stats.page_bytes);
  // Metadata (H2O's scores) is small next to the pages it frees.
  CHECK(stats.bytes_held() < full_stats.bytes_held() / 3);
  CHECK(stats.compression_ratio() > 3 * full_stats.compression_ratio());
}

TEST_CASE("H2O state follows fork: each branch accumulates its own attention", "[h2o]") {
  const kvc::Geometry geometry{.layers = 1, .q_heads = 2, .kv_heads = 1, .head_dim = 64};
  std::mt19937 rng(5);
  H2OCache cache(geometry, {.budget = kvc::Budget::tokens(64)});
  const auto parent = cache.open_sequence();
  Tensor3 out(2, 20, 64);
  cache.append(parent, 0, random_tensor(rng, 1, 20, 64).view(),
               random_tensor(rng, 1, 20, 64).view());
  cache.attend(parent, 0, random_tensor(rng, 2, 20, 64).view(), out.mutable_view());
  const auto child = cache.fork(parent);
  const auto before = cache.scorer_state(parent, 0, 0).accumulated;
  CHECK(cache.scorer_state(child, 0, 0).accumulated == before);
  Tensor3 step_out(2, 1, 64);
  cache.append(child, 0, random_tensor(rng, 1, 1, 64).view(), random_tensor(rng, 1, 1, 64).view());
  cache.attend(child, 0, random_tensor(rng, 2, 1, 64).view(), step_out.mutable_view());
  CHECK(cache.scorer_state(parent, 0, 0).accumulated == before);
  CHECK(cache.scorer_state(child, 0, 0).accumulated.size() == 21);
}
