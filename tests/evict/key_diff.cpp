// Tests of kvc/evict/key_diff.hpp: a hand-checked anchor, zero keys, a float64
// re-implementation over chunked prefill and decode, and bytes.
#include <kvc/evict/key_diff.hpp>

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
using kvc::evict::KeyDiff;
using kvc::test::random_tensor;
using kvc::test::Tensor3;
using KeyDiffCache = kvc::KvCache<KeyDiff>;

static_assert(kvc::EvictionScorer<KeyDiff>);
static_assert(kvc::ScoresStoredKeys<KeyDiff>);
static_assert(!kvc::WantsAppendedKeys<KeyDiff>);
static_assert(std::is_empty_v<KeyDiff::HeadState>);

}  // namespace

TEST_CASE("KeyDiff on a hand-checked case keeps the keys least like the mean direction",
          "[key_diff]") {
  // Keys (1,0), (2,0), (0,1), (3,0), (-1,0) in the first two of 4 channels. Unit keys sum
  // to (2, 1), anchor (0.4, 0.2): cos = 2/sqrt(5) for +x, 1/sqrt(5) for +y, -2/sqrt(5) for
  // -x. Scores (-cos): token 4 first, token 2 second, then the +x tokens tied.
  const kvc::Geometry geometry{.layers = 1, .q_heads = 2, .kv_heads = 1, .head_dim = 4};
  std::mt19937 rng(41);
  Tensor3 k(1, 5, 4);
  k.at(0, 0, 0) = 1.0F;
  k.at(0, 1, 0) = 2.0F;
  k.at(0, 2, 1) = 1.0F;
  k.at(0, 3, 0) = 3.0F;
  k.at(0, 4, 0) = -1.0F;

  SECTION("budget 2 keeps the two distinctive keys") {
    KeyDiffCache cache(geometry, {.budget = kvc::Budget::tokens(2)});
    const auto seq = cache.open_sequence();
    cache.append(seq, 0, k.view(), random_tensor(rng, 1, 5, 4).view());
    cache.compress(seq);
    CHECK(cache.positions(seq, 0, 0) == std::vector<Position>{2, 4});
  }
  SECTION("recent 2 and budget 3 keep tokens 3, 4 and the best of the rest, 2") {
    KeyDiffCache cache(geometry, {.budget = kvc::Budget::tokens(3)}, KeyDiff({.recent = 2}));
    const auto seq = cache.open_sequence();
    cache.append(seq, 0, k.view(), random_tensor(rng, 1, 5, 4).view());
    cache.compress(seq);
    CHECK(cache.positions(seq, 0, 0) == std::vector<Position>{2, 3, 4});
  }
  SECTION("the scores themselves") {
    std::vector<float> scores(5);
    const std::vector<Position> positions{0, 1, 2, 3, 4};
    KeyDiff().score({}, kvc::ScoreContext{0, 0, positions, 2, 5, k.data, 4}, scores);
    const double root5 = std::sqrt(5.0);
    CHECK(scores[0] == Approx(-2 / root5));
    CHECK(scores[1] == Approx(-2 / root5));
    CHECK(scores[2] == Approx(-1 / root5));
    CHECK(scores[3] == Approx(-2 / root5));
    CHECK(scores[4] == Approx(2 / root5));
  }
}

TEST_CASE("KeyDiff gives a zero key cosine 0 and leaves it out of the anchor", "[key_diff]") {
  // Keys (1,0), (0,0), (1,0): the anchor is (2/3, 0); cosines 1, 0, 1.
  std::vector<float> keys(3 * 2, 0.0F);
  keys[0] = 1.0F;
  keys[4] = 1.0F;
  std::vector<float> scores(3);
  const std::vector<Position> positions{0, 1, 2};
  KeyDiff().score({}, kvc::ScoreContext{0, 0, positions, 2, 3, keys, 2}, scores);
  CHECK(scores[0] == Approx(-1.0));
  CHECK(scores[1] == 0.0F);
  CHECK(scores[2] == Approx(-1.0));
}

namespace {

// KeyDiff in float64 on one kv head: the anchor is the mean unit key of the stored
// tokens; keep the top budget by −cos (ties: the newer token).
struct ReferenceKeyDiff {
  std::size_t budget, dim;
  std::vector<Position> positions;
  std::vector<float> keys;

  void append(const Tensor3& k, std::size_t head, std::size_t first) {
    for (std::size_t t = 0; t < k.tokens; ++t) {
      positions.push_back(static_cast<Position>(first + t));
      for (std::size_t c = 0; c < dim; ++c) keys.push_back(k.at(head, t, c));
    }
  }
  void compress() {
    const std::size_t n = positions.size();
    if (n <= budget) return;
    const auto norm = [&](std::size_t i) {
      double sum = 0;
      for (std::size_t c = 0; c < dim; ++c) sum += double(keys[i * dim + c]) * keys[i * dim + c];
      return std::sqrt(sum);
    };
    std::vector<double> anchor(dim, 0.0);
    for (std::size_t i = 0; i < n; ++i) {
      for (std::size_t c = 0; c < dim; ++c) {
        anchor[c] += keys[i * dim + c] / norm(i) / static_cast<double>(n);
      }
    }
    double anchor_norm = 0;
    for (double x : anchor) anchor_norm += x * x;
    anchor_norm = std::sqrt(anchor_norm);
    std::vector<double> score(n);
    for (std::size_t i = 0; i < n; ++i) {
      double dot = 0;
      for (std::size_t c = 0; c < dim; ++c) dot += keys[i * dim + c] * anchor[c];
      score[i] = -dot / (norm(i) * anchor_norm);
    }
    std::vector<std::size_t> order(n);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
      return score[a] != score[b] ? score[a] > score[b] : a > b;
    });
    order.resize(budget);
    std::sort(order.begin(), order.end());
    std::vector<Position> kept_positions;
    std::vector<float> kept_keys;
    for (std::size_t i : order) {
      kept_positions.push_back(positions[i]);
      kept_keys.insert(kept_keys.end(), keys.begin() + static_cast<std::ptrdiff_t>(i * dim),
                       keys.begin() + static_cast<std::ptrdiff_t>((i + 1) * dim));
    }
    positions = std::move(kept_positions);
    keys = std::move(kept_keys);
  }
};

// Keys sharing a common direction plus noise (as real keys do), so cosines spread.
Tensor3 biased_keys(std::mt19937& rng, std::size_t heads, std::size_t tokens,
                    const std::vector<float>& bias) {
  Tensor3 k = random_tensor(rng, heads, tokens, bias.size());
  for (std::size_t h = 0; h < heads; ++h) {
    for (std::size_t t = 0; t < tokens; ++t) {
      for (std::size_t c = 0; c < bias.size(); ++c) k.at(h, t, c) += bias[c];
    }
  }
  return k;
}

}  // namespace

TEST_CASE("KeyDiff matches a float64 re-implementation over chunked prefill and decode",
          "[key_diff]") {
  const std::size_t budget = GENERATE(24, 50);
  CAPTURE(budget);
  const kvc::Geometry geometry{.layers = 1, .q_heads = 4, .kv_heads = 2, .head_dim = 64};
  std::mt19937 rng(static_cast<unsigned>(4000 + budget));
  std::vector<float> bias(64);
  for (float& x : bias) x = std::normal_distribution<float>(0.0F, 1.0F)(rng);
  KeyDiffCache cache(geometry, {.budget = kvc::Budget::tokens(budget), .page_tokens = 8});
  const auto seq = cache.open_sequence();
  std::vector<ReferenceKeyDiff> reference(2, ReferenceKeyDiff{budget, 64, {}, {}});

  // Prefill in chunks of 32: each append over budget compresses first (block-wise).
  std::size_t seen = 0;
  for (std::size_t chunk = 0; chunk < 4; ++chunk) {
    const Tensor3 k = biased_keys(rng, 2, 32, bias);
    cache.append(seq, 0, k.view(), random_tensor(rng, 2, 32, 64).view());
    for (std::size_t h = 0; h < 2; ++h) {
      reference[h].compress();
      reference[h].append(k, h, seen);
    }
    seen += 32;
    for (std::size_t h = 0; h < 2; ++h)
      REQUIRE(cache.positions(seq, 0, h) == reference[h].positions);
  }
  cache.compress(seq);
  for (std::size_t h = 0; h < 2; ++h) {
    reference[h].compress();
    REQUIRE(cache.positions(seq, 0, h) == reference[h].positions);
  }
  for (std::size_t step = 0; step < 40; ++step) {
    const Tensor3 k = biased_keys(rng, 2, 1, bias);
    cache.append(seq, 0, k.view(), random_tensor(rng, 2, 1, 64).view());
    cache.compress(seq);
    for (std::size_t h = 0; h < 2; ++h) {
      reference[h].append(k, h, seen);
      reference[h].compress();
      const auto kept = cache.positions(seq, 0, h);
      REQUIRE(kept.size() == budget);
      REQUIRE(kept == reference[h].positions);
    }
    ++seen;
  }
}

TEST_CASE("KeyDiff frees pages and holds no state", "[key_diff]") {
  const kvc::Geometry geometry{.layers = 1, .q_heads = 8, .kv_heads = 2, .head_dim = 64};
  std::mt19937 rng(42);
  KeyDiffCache cache(geometry, {.budget = kvc::Budget::tokens(32), .page_tokens = 16});
  const auto seq = cache.open_sequence();
  cache.append(seq, 0, random_tensor(rng, 2, 200, 64).view(),
               random_tensor(rng, 2, 200, 64).view());
  CHECK(cache.stats().pages_in_use == 2 * 13);
  cache.compress(seq);
  const auto stats = cache.stats();
  CHECK(stats.pages_in_use == 2 * 2);
  CHECK(stats.tokens_stored == 2 * 32);
}
