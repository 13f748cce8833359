// Tests of kvc/evict/lazy_eviction.hpp: a hand-checked recurrence history and kept set, a
// float64 re-implementation driven through a real KvCache (prefill + decode, GQA, evicting
// every step or every W steps), the lagged-eviction invariants and bytes, and the
// composition with PyramidKV and Q8_0.
#include <kvc/evict/lazy_eviction.hpp>

#include <kvc/budget/pyramid_kv.hpp>
#include <kvc/core/concepts.hpp>
#include <kvc/core/kv_cache.hpp>
#include <kvc/quant/q8_0.hpp>

#include <catch2/catch.hpp>

#include "../support/reference.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <utility>
#include <vector>

namespace {

using kvc::Position;
using kvc::evict::LazyEviction;
using kvc::test::random_tensor;
using kvc::test::Tensor3;
using LazyCache = kvc::KvCache<LazyEviction>;

static_assert(kvc::EvictionScorer<LazyEviction>);
static_assert(kvc::ConsumesAttention<LazyEviction>);
static_assert(!kvc::ObservesQueries<LazyEviction>);
static_assert(kvc::ReportsStateBytes<LazyEviction>);

constexpr float inf = std::numeric_limits<float>::infinity();

// LazyEviction in float64: per attend the exact softmax of every query row of the group,
// averaged; a token is attended when A_i ≥ α/n; t_last and MRI as the header says; at
// compression the newest W stay and the highest MRI − (t_now − t_last) fill the budget.
// `closest` records how near A_i·n came to α (relative), so a test can insist that float
// rounding in the cache cannot flip a decision.
struct ReferenceLazy {
  std::size_t window, dim, group, kv_head;
  double alpha = 1.0;
  std::vector<Position> positions{};
  std::vector<std::vector<float>> keys{};
  std::vector<long> last{}, interval{};
  long step = 0;
  double closest = INFINITY;

  void append(const Tensor3& k, std::size_t first) {
    for (std::size_t t = 0; t < k.tokens; ++t) {
      positions.push_back(static_cast<Position>(first + t));
      keys.emplace_back(
          k.data.begin() + static_cast<std::ptrdiff_t>((kv_head * k.tokens + t) * dim),
          k.data.begin() + static_cast<std::ptrdiff_t>((kv_head * k.tokens + t + 1) * dim));
      last.push_back(step);
      interval.push_back(-1);
    }
  }
  void attend(const Tensor3& q, std::size_t seen) {
    std::vector<float> flat;
    for (const auto& key : keys) flat.insert(flat.end(), key.begin(), key.end());
    std::vector<double> mean(positions.size(), 0.0);
    const double rows = static_cast<double>(group * q.tokens);
    for (std::size_t a = 0; a < group; ++a) {
      for (std::size_t t = 0; t < q.tokens; ++t) {
        std::vector<float> query(dim);
        for (std::size_t c = 0; c < dim; ++c) query[c] = q.at(kv_head * group + a, t, c);
        const auto row = kvc::test::reference_weights(
            query, flat.data(), positions, static_cast<Position>(seen - q.tokens + t), dim);
        for (std::size_t i = 0; i < mean.size(); ++i) mean[i] += row[i] / rows;
      }
    }
    ++step;
    const double n = static_cast<double>(positions.size());
    for (std::size_t i = 0; i < mean.size(); ++i) {
      closest = std::min(closest, std::abs(mean[i] * n - alpha) / alpha);
      if (mean[i] < alpha / n) continue;
      if (interval[i] >= 0) interval[i] = std::max(interval[i], step - last[i]);
      if (interval[i] < 0) interval[i] = 0;
      last[i] = step;
    }
  }
  void compress(std::size_t budget) {
    const std::size_t n = positions.size();
    if (n <= budget) return;
    std::vector<double> scores(n);
    for (std::size_t i = 0; i < n; ++i) {
      scores[i] =
          i + window >= n ? INFINITY : double(std::max(interval[i], 0L)) - double(step - last[i]);
    }
    std::vector<std::size_t> order(n);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
      return scores[a] != scores[b] ? scores[a] > scores[b] : a > b;
    });
    order.resize(budget);
    std::sort(order.begin(), order.end());
    std::size_t k = 0;
    for (std::size_t i : order) {
      positions[k] = positions[i];
      keys[k] = keys[i];
      last[k] = last[i];
      interval[k] = interval[i];
      ++k;
    }
    positions.resize(k);
    keys.resize(k);
    last.resize(k);
    interval.resize(k);
  }
};

}  // namespace

TEST_CASE("LazyEviction on a hand-checked recurrence history", "[lazy_eviction]") {
  // Six prompt tokens (appended at step 0), one query row per step, threshold 1/6.
  //   step 1: tokens 0, 1 attended   step 2: 2, 3   step 3: 4, 5
  //   step 4: 0 (gap 3), 3 (gap 2)   step 5: 4, 5 (gap 2)
  // At step 5: s = MRI − (5 − t_last): token 0: 3 − 1 = 2, 1: 0 − 4 = −4, 2: 0 − 3 = −3,
  // 3: 2 − 1 = 1; tokens 4, 5 are the recent window (W = 2). Budget 4 keeps 0, 3, 4, 5;
  // budget 3 keeps 0, 4, 5.
  const LazyEviction scorer({.window = 2});
  LazyEviction::HeadState state;
  scorer.on_append(state, kvc::AppendEvent{0, 0, 0, 6, {}, 4});
  const std::vector<std::vector<float>> steps{{0.4F, 0.3F, 0.05F, 0.05F, 0.1F, 0.1F},
                                              {0.05F, 0.05F, 0.4F, 0.3F, 0.1F, 0.1F},
                                              {0.05F, 0.05F, 0.05F, 0.05F, 0.4F, 0.4F},
                                              {0.5F, 0.05F, 0.05F, 0.3F, 0.05F, 0.05F},
                                              {0.05F, 0.05F, 0.05F, 0.05F, 0.4F, 0.4F}};
  for (const auto& weights : steps)
    scorer.on_attention(state, kvc::AttentionEvent{0, 0, weights, 1});
  CHECK(state.step == 5);
  CHECK(state.last == std::vector<std::uint32_t>{4, 1, 2, 4, 5, 5});
  CHECK(state.interval == std::vector<std::int32_t>{3, 0, 0, 2, 2, 2});

  const std::vector<Position> positions{0, 1, 2, 3, 4, 5};
  std::vector<float> scores(6);
  scorer.score(state, kvc::ScoreContext{0, 0, positions, 4, 6, {}, 4}, scores);
  CHECK(scores == std::vector<float>{2, -4, -3, 1, inf, inf});

  // Through a cache, with real attention: prompt keys 4·e_j (j < 6), decode keys 0, and
  // each decode query 4·(e_a + e_b) gives tokens a, b ≈ 0.49 each and the rest ≈ 0.002,
  // far from the 1/n threshold: the same history as above. The decode tokens 6..10
  // (appended at steps 0..4, never attended) score −5..−1; 9, 10 are the window. Budget 6
  // keeps 0, 3, 4, 5 (scores 2, 1, 2, 2) and 9, 10; budget 4 keeps the newer two of the
  // three tied at 2.
  const kvc::Geometry geometry{.layers = 1, .q_heads = 1, .kv_heads = 1, .head_dim = 8};
  const std::vector<std::pair<std::size_t, std::size_t>> attended{
      {0, 1}, {2, 3}, {4, 5}, {0, 3}, {4, 5}};
  for (const std::size_t budget : {6U, 5U, 4U}) {
    CAPTURE(budget);
    LazyCache cache(geometry, {.budget = kvc::Budget::tokens(budget), .auto_compress = false},
                    LazyEviction({.window = 2}));
    const auto seq = cache.open_sequence();
    Tensor3 prompt(1, 6, 8);
    for (std::size_t j = 0; j < 6; ++j) prompt.at(0, j, j) = 4.0F;
    cache.append(seq, 0, prompt.view(), prompt.view());
    for (const auto& [a, b] : attended) {
      Tensor3 q(1, 1, 8), out(1, 1, 8);
      q.at(0, 0, a) = 4.0F;
      q.at(0, 0, b) = 4.0F;
      cache.append(seq, 0, Tensor3(1, 1, 8).view(), Tensor3(1, 1, 8).view());
      cache.attend(seq, 0, q.view(), out.mutable_view());
    }
    const auto& state = cache.scorer_state(seq, 0, 0);
    CHECK(state.last == std::vector<std::uint32_t>{4, 1, 2, 4, 5, 5, 0, 1, 2, 3, 4});
    CHECK(state.interval == std::vector<std::int32_t>{3, 0, 0, 2, 2, 2, -1, -1, -1, -1, -1});
    cache.compress(seq);
    const std::vector<std::vector<Position>> expected{
        {0, 3, 4, 5, 9, 10}, {0, 4, 5, 9, 10}, {4, 5, 9, 10}};
    CHECK(cache.positions(seq, 0, 0) == expected[6 - budget]);
    CHECK(cache.scorer_state(seq, 0, 0).interval.size() == budget);
  }

  // A multi-row event divides by the rows: 2 rows summing to 0.35 are a mean of 0.175.
  LazyEviction::HeadState pooled;
  scorer.on_append(pooled, kvc::AppendEvent{0, 0, 0, 6, {}, 4});
  const std::vector<float> two_rows{0.35F, 0.3F, 0.35F, 0.3F, 0.35F, 0.35F};
  scorer.on_attention(pooled, kvc::AttentionEvent{0, 0, two_rows, 2});
  CHECK(pooled.interval == std::vector<std::int32_t>{0, -1, 0, -1, 0, 0});
  CHECK_THROWS_AS(LazyEviction({.alpha = -1.0}), kvc::UnsupportedError);
}

TEST_CASE("LazyEviction matches a float64 re-implementation over prefill and decode",
          "[lazy_eviction]") {
  const std::size_t group = GENERATE(1, 4);
  const std::size_t slack = GENERATE(0, 7);  // evict every step, or every W = 8 steps
  CAPTURE(group, slack);
  constexpr std::size_t dim = 32, budget = 40, window = 8;
  const kvc::Geometry geometry{.layers = 1, .q_heads = 2 * group, .kv_heads = 2, .head_dim = dim};
  std::mt19937 rng(static_cast<unsigned>(1000 + group * 10 + slack));
  LazyCache cache(
      geometry, {.budget = kvc::Budget::tokens(budget), .page_tokens = 8, .eviction_slack = slack},
      LazyEviction({.window = window}));
  const auto seq = cache.open_sequence();
  std::vector<ReferenceLazy> reference;
  for (std::size_t h = 0; h < 2; ++h) reference.push_back(ReferenceLazy{window, dim, group, h});
  std::vector<std::size_t> chunks{30, 20};
  chunks.insert(chunks.end(), 100, 1);
  std::size_t seen = 0;
  for (const std::size_t n : chunks) {
    const Tensor3 k = random_tensor(rng, 2, n, dim);
    const Tensor3 q = random_tensor(rng, 2 * group, n, dim, 2.0F);
    Tensor3 out(2 * group, n, dim);
    cache.append(seq, 0, k.view(), random_tensor(rng, 2, n, dim).view());
    cache.attend(seq, 0, q.view(), out.mutable_view());
    seen += n;
    for (std::size_t h = 0; h < 2; ++h) {
      CAPTURE(seen, h);
      reference[h].append(k, seen - n);
      reference[h].attend(q, seen);
      if (reference[h].positions.size() > budget + slack) reference[h].compress(budget);
      REQUIRE(cache.positions(seq, 0, h) == reference[h].positions);
      const auto& state = cache.scorer_state(seq, 0, h);
      REQUIRE(std::equal(state.last.begin(), state.last.end(), reference[h].last.begin(),
                         reference[h].last.end(),
                         [](std::uint32_t a, long b) { return long(a) == b; }));
      REQUIRE(std::equal(state.interval.begin(), state.interval.end(),
                         reference[h].interval.begin(), reference[h].interval.end(),
                         [](std::int32_t a, long b) { return long(a) == b; }));
    }
  }
  // No decision was within float rounding of the threshold (so the match is not luck).
  for (const auto& r : reference) CHECK(r.closest > 1e-5);
}

TEST_CASE("LazyEviction evicts W tokens every W steps: window kept, memory bounded",
          "[lazy_eviction]") {
  const kvc::Geometry geometry{.layers = 2, .q_heads = 8, .kv_heads = 2, .head_dim = 64};
  std::mt19937 rng(3);
  constexpr std::size_t prompt = 256, budget = 96, window = 16;
  LazyCache cache(
      geometry,
      {.budget = kvc::Budget::tokens(budget), .page_tokens = 16, .eviction_slack = window - 1},
      LazyEviction({.window = window}));
  kvc::KvCache<> full(geometry, {.page_tokens = 16});
  const auto seq = cache.open_sequence();
  const auto full_seq = full.open_sequence();
  for (std::size_t step = 0; step <= 48; ++step) {
    const std::size_t n = step == 0 ? prompt : 1;
    for (std::size_t l = 0; l < 2; ++l) {
      const Tensor3 k = random_tensor(rng, 2, n, 64), v = random_tensor(rng, 2, n, 64);
      Tensor3 out(8, n, 64);
      cache.append(seq, l, k.view(), v.view());
      cache.attend(seq, l, random_tensor(rng, 8, n, 64).view(), out.mutable_view());
      full.append(full_seq, l, k.view(), v.view());
      const auto seen = static_cast<Position>(cache.tokens_seen(seq, l));
      for (std::size_t h = 0; h < 2; ++h) {
        const auto positions = cache.positions(seq, l, h);
        // Cut back to B after the prompt, then one token more per step until B + W.
        REQUIRE(positions.size() == budget + step % window);
        std::vector<Position> recent(window);
        std::iota(recent.begin(), recent.end(), seen - static_cast<Position>(window));
        REQUIRE(std::includes(positions.begin(), positions.end(), recent.begin(), recent.end()));
        REQUIRE(cache.scorer_state(seq, l, h).step == step + 1);
      }
    }
  }
  const auto stats = cache.stats();  // step 48: just cut back to the budget
  const auto full_stats = full.stats();
  CHECK(stats.tokens_stored == 2 * 2 * budget);
  CHECK(stats.pages_in_use == 2 * 2 * (budget / 16));
  CHECK(stats.page_bytes * 2 < full_stats.page_bytes);
  CHECK(stats.metadata_bytes >= stats.tokens_stored * 2 * sizeof(std::uint32_t));
  CHECK(stats.bytes_held() < full_stats.bytes_held());
}

TEST_CASE("LazyEviction composes with PyramidKV and Q8_0", "[lazy_eviction]") {
  // The weights come from the Q8_0 keys: the reference runs on the keys the cache stores.
  using Cache = kvc::KvCache<LazyEviction, kvc::quant::Q8_0, kvc::retrieval::Exhaustive,
                             kvc::offload::None, kvc::budget::PyramidKV>;
  constexpr std::size_t layers = 4, prompt = 200, dim = 32, window = 8;
  const kvc::Geometry geometry{.layers = layers, .q_heads = 4, .kv_heads = 2, .head_dim = dim};
  const kvc::budget::PyramidKV planner({.window = 8});
  Cache cache(geometry, {.budget = kvc::Budget::tokens(48), .auto_compress = false},
              LazyEviction({.window = window}), {}, {}, {}, planner);
  const auto seq = cache.open_sequence();
  std::mt19937 rng(4);
  for (std::size_t layer = 0; layer < layers; ++layer) {
    std::vector<ReferenceLazy> reference;
    for (std::size_t h = 0; h < 2; ++h) reference.push_back(ReferenceLazy{window, dim, 2, h});
    for (std::size_t step = 0; step < 4; ++step) {  // the prompt in 4 chunks of 50
      const Tensor3 q = random_tensor(rng, 4, 50, dim, 2.0F);
      Tensor3 out(4, 50, dim);
      cache.append(seq, layer, random_tensor(rng, 2, 50, dim).view(),
                   random_tensor(rng, 2, 50, dim).view());
      const kvc::DenseLayer dense = cache.export_dense(seq, layer);
      Tensor3 stored(2, 50, dim);
      for (std::size_t h = 0; h < 2; ++h) {
        std::copy(dense.keys[h].data() + step * 50 * dim,
                  dense.keys[h].data() + (step + 1) * 50 * dim,
                  stored.data.begin() + static_cast<std::ptrdiff_t>(h * 50 * dim));
      }
      cache.attend(seq, layer, q.view(), out.mutable_view());
      for (std::size_t h = 0; h < 2; ++h) {
        reference[h].append(stored, step * 50);
        reference[h].attend(q, (step + 1) * 50);
      }
    }
    const std::size_t planned = planner.layer_budget(layer, layers, 48, prompt);
    cache.compress(seq, layer);
    for (std::size_t h = 0; h < 2; ++h) {
      CAPTURE(layer, h, planned);
      reference[h].compress(planned);
      CHECK(reference[h].closest > 1e-5);
      CHECK(cache.positions(seq, layer, h) == reference[h].positions);
      CHECK(cache.tokens(seq, layer, h) == planned);
    }
  }
}
